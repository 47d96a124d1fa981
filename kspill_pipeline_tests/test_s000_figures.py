"""Study S000 Figures 1-5 (studies.s000_figures, assets.s000_figures).

Expected numbers are derived independently in the tests: box statistics from numpy percentiles
(and matplotlib's own ``cbook.boxplot_stats``), kernel densities from the Gaussian formula summed
directly here (and scipy's ``gaussian_kde``), city and annual means by hand from the literal
values of tiny hand-built panels, the Fig. 3 years from the stated fallback rule.
"""

from __future__ import annotations

import base64
import math
import shutil

import numpy as np
import polars as pl
import pytest

from kspill_pipeline.studies import s000_figures as fig

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _rows(year: int, export: int, firm: list[float], city: list[float], region: str = "east",
          city_code: str = "110100") -> pl.DataFrame:
    n = len(firm)
    return pl.DataFrame({
        "year": [year] * n, "export": [export] * n, "density_firm": firm, "density_city": city,
        "macro_region": [region] * n, "city_code": [city_code] * n,
    }, schema={"year": pl.Int32, "export": pl.Int8, "density_firm": pl.Float64, "density_city": pl.Float64,
               "macro_region": pl.String, "city_code": pl.String})


def _poisoned(df: pl.DataFrame) -> pl.LazyFrame:
    """A lazy panel with an extra column that raises when evaluated: a figure function that
    materialises columns it does not use fails."""
    def boom(s):
        raise RuntimeError("unused panel column was materialised")

    return df.lazy().with_columns(pl.col("year").map_batches(boom, return_dtype=pl.Int64).alias("firm_id"))


def _np_box(x: np.ndarray) -> dict:
    q1, med, q3 = np.percentile(x, [25, 50, 75])
    lo, hi = q1 - 1.5 * (q3 - q1), q3 + 1.5 * (q3 - q1)
    inside = x[(x >= lo) & (x <= hi)]
    return {"n": x.size, "mean": x.mean(), "q1": q1, "median": med, "q3": q3, "whislo": inside.min(),
            "whishi": inside.max(), "min": x.min(), "max": x.max(), "n_outliers": x.size - inside.size}


def _assert_box(row: dict, x: np.ndarray) -> None:
    exp = _np_box(x)
    for k, v in exp.items():
        assert row[k] == pytest.approx(v, rel=1e-12, abs=1e-12), k
    # matplotlib's own implementation of the box statistics agrees
    from matplotlib.cbook import boxplot_stats

    mpl = boxplot_stats(x, whis=1.5)[0]
    for ours, theirs in (("q1", "q1"), ("median", "med"), ("q3", "q3"), ("whislo", "whislo"),
                         ("whishi", "whishi"), ("mean", "mean")):
        assert row[ours] == pytest.approx(float(mpl[theirs]), rel=1e-12, abs=1e-12), ours
    assert row["n_outliers"] == len(mpl["fliers"])


# 11 values: q1 = (0.14 + 0.16) / 2 = 0.15, q3 = (0.24 + 0.26) / 2 = 0.25 (linear percentiles at
# positions 2.5 and 7.5), IQR = 0.10, fences -0.00 and 0.40: 0.395 is the upper whisker (it would be
# an outlier with whis = 1.4, fence 0.39) and 0.45 the single outlier.
WHISKER_CASE = [0.10, 0.12, 0.14, 0.16, 0.18, 0.20, 0.22, 0.24, 0.26, 0.395, 0.45]


@pytest.fixture(scope="module")
def two_year_panel() -> pl.DataFrame:
    rng = np.random.default_rng(11)
    f0 = np.r_[rng.uniform(0.06, 0.2, 30), 0.93, 0.97]  # two outliers above the upper fence
    c0 = rng.uniform(0.2, 0.9, 32)
    f1 = rng.beta(2, 5, 25) * 0.9 + 0.06
    c1 = np.r_[rng.uniform(0.5, 0.95, 24), 0.01]  # one outlier below the lower fence
    return pl.concat([
        _rows(2016, 0, f0.tolist(), c0.tolist()),
        _rows(2016, 1, f1.tolist(), c1.tolist(), region="west", city_code="510100"),
        _rows(2015, 1, [0.5, 0.6, 0.7], [0.1, 0.2, 0.3]),  # another year: must not enter the 2016 figures
        _rows(2014, 0, WHISKER_CASE, WHISKER_CASE),
    ])


# ---- Fig. 2: box statistics ------------------------------------------------------------------------
def test_figure2_box_stats_equal_numpy_percentiles_latest_year(two_year_panel):
    d = fig.figure2_data(_poisoned(two_year_panel))
    assert d["year"].to_list() == [2016] * 4
    assert d.select("variable", "export").rows() == [("density_city", 0), ("density_city", 1),
                                                     ("density_firm", 0), ("density_firm", 1)]
    p16 = two_year_panel.filter(pl.col("year") == 2016)
    for row in d.iter_rows(named=True):
        x = p16.filter(pl.col("export") == row["export"])[row["variable"]].to_numpy()
        _assert_box(row, x)
    out = {(r["variable"], r["export"]): r["n_outliers"] for r in d.iter_rows(named=True)}
    assert out[("density_firm", 0)] >= 2 and out[("density_city", 1)] >= 1  # whisker rule is exercised
    # an explicit year
    d15 = fig.figure2_data(two_year_panel, 2015)
    r = d15.filter((pl.col("variable") == "density_firm") & (pl.col("export") == 1)).row(0, named=True)
    assert (r["n"], r["median"], r["q1"]) == (3, pytest.approx(0.6), pytest.approx(0.55))
    r0 = d15.filter((pl.col("variable") == "density_firm") & (pl.col("export") == 0)).row(0, named=True)
    assert r0["n"] == 0 and r0["median"] is None and r0["n_outliers"] == 0
    # the hand-derived whisker case
    r = fig.figure2_data(two_year_panel, 2014).filter(pl.col("export") == 0).row(0, named=True)
    assert (r["q1"], r["median"], r["q3"], r["whislo"], r["whishi"], r["n_outliers"], r["n"]) == (
        pytest.approx(0.15), pytest.approx(0.20), pytest.approx(0.25), 0.10, 0.395, 1, 11)
    assert r["mean"] == pytest.approx(2.465 / 11)
    with pytest.raises(ValueError, match="year 2012 has no rows"):
        fig.figure2_data(two_year_panel, 2012)


# ---- Fig. 1: kernel densities ----------------------------------------------------------------------
def _silverman(x: np.ndarray) -> float:
    sd = np.std(x, ddof=1)
    iqr = np.subtract(*np.percentile(x, [75, 25]))
    return 0.9 * min(sd, iqr / 1.34) * x.size ** -0.2


def test_figure1_kde_equals_direct_sum_of_gaussians_and_integrates_to_one(two_year_panel):
    from scipy.stats import gaussian_kde

    d = fig.figure1_data(_poisoned(two_year_panel))
    assert set(d["year"]) == {2016}
    p16 = two_year_panel.filter(pl.col("year") == 2016)
    for var in fig.VARIABLES:
        for e in (0, 1):
            g = d.filter((pl.col("variable") == var) & (pl.col("export") == e)).sort("point")
            xi = p16.filter(pl.col("export") == e)[var].to_numpy()
            h = _silverman(xi)
            assert g.height == fig.KDE_GRID_POINTS and g["n"][0] == xi.size
            assert g["bandwidth"][0] == pytest.approx(h, rel=1e-12)
            x, k = g["x"].to_numpy(), g["kde"].to_numpy()
            for i in (0, 40, 100, 128, 200, 255):
                direct = np.exp(-0.5 * ((x[i] - xi) / h) ** 2).sum() / (xi.size * h * math.sqrt(2 * math.pi))
                assert k[i] == pytest.approx(direct, rel=1e-9, abs=1e-12)
            assert np.trapezoid(k, x) == pytest.approx(1.0, abs=2e-3)
            ref = gaussian_kde(xi, bw_method=h / np.std(xi, ddof=1))(x[[10, 90, 170]])
            np.testing.assert_allclose(k[[10, 90, 170]], ref, rtol=1e-9)
    # both export groups of a variable share one grid
    a = d.filter((pl.col("variable") == "density_firm") & (pl.col("export") == 0))["x"]
    b = d.filter((pl.col("variable") == "density_firm") & (pl.col("export") == 1))["x"]
    assert a.to_list() == b.to_list()


def test_scott_rule_and_degenerate_groups(two_year_panel):
    xi = two_year_panel.filter((pl.col("year") == 2016) & (pl.col("export") == 1))["density_city"].to_numpy()
    assert fig.bandwidth(xi, "scott") == pytest.approx(1.06 * np.std(xi, ddof=1) * xi.size ** -0.2, rel=1e-12)
    assert fig.bandwidth(np.array([0.3]), "silverman") is None
    assert fig.bandwidth(np.array([0.3, 0.3, 0.3]), "silverman") is None
    # IQR = 0 but sd > 0: sd alone
    x = np.array([0.2, 0.2, 0.2, 0.2, 0.2, 0.9])
    assert fig.bandwidth(x) == pytest.approx(0.9 * np.std(x, ddof=1) * 6 ** -0.2, rel=1e-12)
    with pytest.raises(ValueError, match="unknown"):
        fig.figure1_data(two_year_panel, bw_rule="normal")
    # one exporting row in the year: no kernel density, one row with null x and n = 1
    panel = pl.concat([_rows(2016, 0, [0.1, 0.2, 0.4, 0.5], [0.3, 0.4, 0.6, 0.8]), _rows(2016, 1, [0.3], [0.7])])
    d = fig.figure1_data(panel.lazy())
    g = d.filter((pl.col("variable") == "density_firm") & (pl.col("export") == 1))
    assert g.height == 1 and g["n"][0] == 1 and g["x"][0] is None and g["kde"][0] is None
    png = fig.render_figure1(d)
    assert png.startswith(PNG_SIGNATURE)


def test_binned_kde_matches_direct_formula():
    rng = np.random.default_rng(5)
    xi = rng.beta(2, 6, 4000)
    h = _silverman(xi)
    grid = np.linspace(xi.min() - 3 * h, xi.max() + 3 * h, 256)
    direct = np.exp(-0.5 * ((grid[:, None] - xi[None, :]) / h) ** 2).sum(1) / (xi.size * h * math.sqrt(2 * math.pi))
    binned = fig.gaussian_kde_grid(xi, grid, h, exact_max=0)  # forces the binned path
    exact = fig.gaussian_kde_grid(xi, grid, h)
    np.testing.assert_allclose(exact, direct, rtol=1e-10, atol=1e-12)
    assert np.max(np.abs(binned - direct)) < 1e-4 * direct.max()


# ---- Fig. 3: macro-regions, two years, fallback ------------------------------------------------------
def test_resolve_fig3_years_rule():
    assert fig.resolve_fig3_years([2016, 2009, 2010]) == ([2009, 2016], "requested")
    # 10 years 2003..2012: middle = sorted[(10 - 1) // 2] = 2007, last = 2012
    assert fig.resolve_fig3_years(range(2003, 2013)) == ([2007, 2012], "fallback_middle_last")
    # 3 years: middle = 2011, last = 2016 (2009 missing)
    assert fig.resolve_fig3_years([2010, 2011, 2016]) == ([2011, 2016], "fallback_middle_last")
    assert fig.resolve_fig3_years([2016]) == ([2016], "fallback_middle_last")
    with pytest.raises(ValueError, match="no year with exporting rows"):
        fig.resolve_fig3_years([])


def test_figure3_box_stats_by_region_exporters_only_and_fallback():
    e09 = [0.12, 0.31, 0.08, 0.44, 0.27, 0.95]
    c09 = [0.5, 0.62, 0.71, 0.4, 0.58, 0.66]
    panel = pl.concat([
        _rows(2009, 1, e09, c09, region="east"),
        _rows(2009, 1, [0.2, 0.3], [0.4, 0.5], region="west"),
        _rows(2009, 0, [0.99, 0.99, 0.99], [0.99, 0.99, 0.99], region="east"),  # not exported: excluded
        _rows(2012, 1, [0.5], [0.5], region="central"),
        _rows(2016, 1, [0.1, 0.2, 0.3], [0.6, 0.7, 0.8], region="central"),
    ])
    d = fig.figure3_data(_poisoned(panel))
    assert d.height == 2 * 4 * 2 and sorted(set(d["year"])) == [2009, 2016]
    assert d.filter(pl.col("year") == 2009)["macro_region"].to_list()[:4] == ["east", "central", "west", "northeast"]
    east = d.filter((pl.col("year") == 2009) & (pl.col("macro_region") == "east"))
    _assert_box(east.filter(pl.col("variable") == "density_firm").row(0, named=True), np.array(e09))
    _assert_box(east.filter(pl.col("variable") == "density_city").row(0, named=True), np.array(c09))
    ne = d.filter(pl.col("macro_region") == "northeast")
    assert ne["n"].to_list() == [0, 0, 0, 0] and ne["median"].null_count() == 4
    c16 = d.filter((pl.col("year") == 2016) & (pl.col("macro_region") == "central") & (pl.col("variable") == "density_city"))
    assert c16["n"][0] == 3 and c16["mean"][0] == pytest.approx(0.7) and c16["median"][0] == pytest.approx(0.7)
    # without 2009: years with exporters are 2012, 2016 (2017 has none) -> middle 2012 and last 2016
    no09 = pl.concat([panel.filter(pl.col("year") != 2009), _rows(2017, 0, [0.3], [0.4])])
    assert fig.figure3_years(no09) == ([2012, 2016], "fallback_middle_last")
    d2 = fig.figure3_data(no09)
    assert sorted(set(d2["year"])) == [2012, 2016]
    c12 = d2.filter((pl.col("year") == 2012) & (pl.col("macro_region") == "central"))
    assert c12["n"].to_list() == [1, 1] and c12["q1"].to_list() == [0.5, 0.5]


# ---- Fig. 4: city means with coordinates -------------------------------------------------------------
def _prefectures() -> pl.DataFrame:
    return pl.DataFrame({
        "city_code": ["110100", "469000", "310100"], "city_name": ["北京市", "省直辖县级行政区划", "上海市"],
        "province_code": ["11", "46", "31"], "province_name": ["北京市", "海南省", "上海市"],
        "macro_region": ["east", "east", "east"],
        "longitude": [116.4, None, 121.5], "latitude": [39.9, None, 31.2],
    })


def test_figure4_city_means_by_hand_and_cities_without_coordinates():
    panel = pl.concat([
        _rows(2016, 1, [0.1, 0.3], [0.5, 0.7], city_code="110100"),
        _rows(2016, 0, [0.9], [0.9], city_code="110100"),  # not exported: excluded
        _rows(2015, 1, [0.8], [0.8], city_code="110100"),  # other year: excluded
        _rows(2016, 1, [0.4], [0.8], city_code="469000"),  # in the table, no coordinates
        _rows(2016, 1, [0.25, 0.35, 0.45], [0.35, 0.45, 0.55], city_code="999900"),  # not in the table
    ])
    d = fig.figure4_data(_poisoned(panel), _prefectures().lazy())
    assert d["city_code"].to_list() == ["110100", "469000", "999900"]  # 310100 has no exporters
    r = {row["city_code"]: row for row in d.iter_rows(named=True)}
    assert (r["110100"]["n"], r["110100"]["mean_density_firm"], r["110100"]["mean_density_city"]) == (
        2, pytest.approx(0.2), pytest.approx(0.6))
    assert (r["110100"]["longitude"], r["110100"]["latitude"], r["110100"]["city_name"]) == (116.4, 39.9, "北京市")
    assert (r["469000"]["n"], r["469000"]["longitude"], r["469000"]["city_name"]) == (1, None, "省直辖县级行政区划")
    assert (r["999900"]["n"], r["999900"]["mean_density_firm"], r["999900"]["city_name"]) == (
        3, pytest.approx(0.35), None)
    assert set(d["year"]) == {2016}
    assert fig.cities_without_coordinates(d) == ["469000", "999900"]
    assert fig.figure4_data(panel, _prefectures(), 2015)["n"].to_list() == [1]
    png = fig.render_figure4(d)
    assert png.startswith(PNG_SIGNATURE) and png == fig.render_figure4(d)
    with pytest.raises(ValueError, match="not unique"):
        fig.figure4_data(panel, pl.concat([_prefectures(), _prefectures().head(1)]))


# ---- Fig. 5: annual means ---------------------------------------------------------------------------
def test_figure5_annual_means_by_hand():
    panel = pl.concat([
        _rows(2014, 1, [0.1, 0.2, 0.6], [0.3, 0.3, 0.6]),
        _rows(2014, 0, [0.9, 0.9], [0.1, 0.1]),  # not exported: excluded
        _rows(2015, 0, [0.5], [0.5]),  # a year with rows but no exporters
        _rows(2016, 1, [0.5], [0.9]),
    ])
    d = fig.figure5_data(_poisoned(panel), years=[2013, 2014, 2015, 2016])
    m = {(r["variable"], r["year"]): (r["mean"], r["n"]) for r in d.iter_rows(named=True)}
    assert m[("density_firm", 2014)] == (pytest.approx(0.3), 3)
    assert m[("density_city", 2014)] == (pytest.approx(0.4), 3)
    assert m[("density_firm", 2016)] == (pytest.approx(0.5), 1)
    assert m[("density_city", 2016)] == (pytest.approx(0.9), 1)
    assert m[("density_firm", 2015)] == (None, 0) and m[("density_city", 2013)] == (None, 0)
    assert d.height == 8
    assert fig.figure5_data(panel)["year"].unique().sort().to_list() == [2014, 2015, 2016]


# ---- rendering ----------------------------------------------------------------------------------------
def test_pngs_are_deterministic_and_carry_no_software_stamp(two_year_panel):
    panel = two_year_panel.lazy()
    cases = [
        (fig.figure1_data(panel), fig.render_figure1),
        (fig.figure2_data(panel), fig.render_figure2),
        (fig.figure3_data(panel), fig.render_figure3),
        (fig.figure4_data(panel, _prefectures()), fig.render_figure4),
        (fig.figure5_data(panel), fig.render_figure5),
    ]
    for data, render in cases:
        a, b = render(data), render(data)
        assert a.startswith(PNG_SIGNATURE) and len(a) > 5000
        assert a == b
        assert b"Software" not in a and b"matplotlib version" not in a


def test_empty_panel_is_an_error_not_a_blank_figure():
    empty = _rows(2016, 1, [], [])
    with pytest.raises(ValueError, match="no rows"):
        fig.figure2_data(empty)


# ---- Dagster: the five assets on a small hand-made store ---------------------------------------------
YEARS = (2014, 2015, 2016)


def _store_panel() -> pl.DataFrame:
    """A contract-conforming s000_panel for 2014-2016 (values chosen by hand)."""
    rows = []
    cities = [("110100", "east"), ("440300", "east"), ("510100", "west"), ("210100", "northeast"),
              ("469000", "east")]
    rng = np.random.default_rng(2)
    for y in YEARS:
        for k in range(40):
            city, region = cities[k % len(cities)]
            f = float(rng.uniform(0.06, 0.6))
            c = float(min(1.0, f + rng.uniform(0.0, 0.4)))
            rows.append({"year": y, "firm_id": f"F{k:03d}", "hs4": f"{1000 + k:04d}", "export": int(k % 3 == 0),
                         "density_firm": f, "density_city": c, "interaction": f * c, "tradevalue": 10.0,
                         "newexport": 0.0, "industry": "10", "city_code": city, "macro_region": region,
                         "nonsoe_share": 0.5, "mkt_group": "mid"})
    return pl.DataFrame(rows)


@pytest.fixture(scope="module")
def figure_store(tmp_path_factory):
    from dagster import AssetKey, DagsterInstance, materialize

    from kspill_pipeline.contracts.loader import load_contract
    from kspill_pipeline.definitions import build_definitions
    from kspill_pipeline.io import store

    root = tmp_path_factory.mktemp("s000_figures")
    data, st = root / "data", root / "store"
    data.mkdir()
    (data / "source.yaml").write_text(f"name: t\nyears: {{start: {YEARS[0]}, end: {YEARS[-1]}}}\n")
    pc, tc = load_contract("s000_panel"), load_contract("trade_clean")
    panel = _store_panel()
    for y in YEARS:
        store.write_frame(pc.conform(panel.filter(pl.col("year") == y)), st, "s000_panel", y, schema=pc.arrow_schema())
        store.write_gate(st, "s000_panel", y, {"schema": True})
        store.write_frame(tc.conform(pl.DataFrame(schema=tc.polars_schema())), st, "trade_clean", y,
                          schema=tc.arrow_schema())
        store.write_gate(st, "trade_clean", y, {"schema": True})
    defs = build_definitions(data, st)
    names = [f"s000_figure{i}" for i in range(1, 6)]
    res = materialize(list(defs.assets), selection=[AssetKey(n) for n in ["ref_prefecture", *names]],
                      resources=dict(defs.resources), instance=DagsterInstance.ephemeral(), raise_on_error=False)
    return {"store": st, "data": data, "result": res, "names": names, "panel": panel, "defs": defs}


def test_figure_assets_write_png_data_and_markdown_image(figure_store):
    from kspill_pipeline.io import store

    st, res = figure_store["store"], figure_store["result"]
    assert res.success
    evals = res.get_asset_check_evaluations()
    assert evals and all(e.passed for e in evals)
    mats = {ev.event_specific_data.materialization.asset_key.to_user_string(): ev.event_specific_data.materialization
            for ev in res.get_asset_materialization_events()}
    render = {1: fig.render_figure1, 2: fig.render_figure2, 3: fig.render_figure3, 4: fig.render_figure4,
              5: fig.render_figure5}
    for i, name in enumerate(figure_store["names"], start=1):
        png = st / name / "figure.png"
        assert png.is_file() and png.read_bytes().startswith(PNG_SIGNATURE)
        assert (st / name / "part-0.parquet").is_file()
        md = mats[name].metadata
        text = md["figure"].value
        assert f"![Figure {i}](data:image/png;base64," in text
        b64 = text.split("base64,", 1)[1].rstrip(")")
        assert base64.b64decode(b64) == png.read_bytes()  # the UI image is the file
        assert md["figure_path"].value == str(png)
        assert md["caption"].value
        # the PNG is drawn from exactly the stored figure data
        assert render[i](store.scan(st, name).collect()) == png.read_bytes()
    assert mats["s000_figure1"].metadata["year"].value == 2016
    assert mats["s000_figure3"].metadata["years"].value == [2015, 2016]  # no 2009: middle + last
    assert mats["s000_figure3"].metadata["year_rule"].value == "fallback_middle_last"
    assert mats["s000_figure5"].metadata["years"].value == list(YEARS)
    # Fig. 4: the placeholder unit 469000 has no coordinates in ref_prefecture; it is kept and counted
    f4 = store.scan(st, "s000_figure4").collect()
    assert "469000" in f4["city_code"].to_list()
    assert mats["s000_figure4"].metadata["cities_without_coordinates"].value == 1
    assert mats["s000_figure4"].metadata["cities_without_coordinates_codes"].value == ["469000"]
    # Fig. 5 data equals the hand computation from the panel written to the store
    f5 = store.scan(st, "s000_figure5").collect()
    p = figure_store["panel"].filter(pl.col("export") == 1)
    for y in YEARS:
        got = f5.filter((pl.col("year") == y) & (pl.col("variable") == "density_city"))
        vals = p.filter(pl.col("year") == y)["density_city"].to_list()
        assert got["n"][0] == len(vals) and got["mean"][0] == pytest.approx(sum(vals) / len(vals))


def test_figure_asset_refuses_panel_year_without_recorded_checks(figure_store, tmp_path):
    from dagster import AssetKey, DagsterInstance, materialize

    from kspill_pipeline.definitions import build_definitions

    st = tmp_path / "store"
    shutil.copytree(figure_store["store"], st)
    (st / "s000_panel" / "year=2015" / "_checks.json").unlink()
    defs = build_definitions(figure_store["data"], st)
    res = materialize(list(defs.assets), selection=[AssetKey("s000_figure5")], resources=dict(defs.resources),
                      instance=DagsterInstance.ephemeral(), raise_on_error=False)
    assert not res.success
    msgs = []
    for ev in res.all_events:
        if ev.event_type_value == "STEP_FAILURE":
            err = ev.event_specific_data.error
            while err is not None:
                msgs.append(err.message)
                err = err.cause
    assert any("asset s000_panel partition 2015: no blocking-check evaluation recorded" in m for m in msgs), msgs


def test_no_png_is_drawn_from_figure_data_that_fails_its_contract(tmp_path):
    """A failing blocking check of the figure data: the stale PNG is removed, none is drawn, and
    the failed check is reported (n = -1 violates the contract range n >= 0)."""
    from kspill_pipeline.assets.s000_figures import _emit, png_path
    from kspill_pipeline.resources import KspillPaths

    paths = KspillPaths(data_dir=str(tmp_path), store_dir=str(tmp_path / "store"))
    stale = png_path(paths.store, "s000_figure5")
    stale.parent.mkdir(parents=True)
    stale.write_bytes(PNG_SIGNATURE + b"old")
    bad = pl.DataFrame({"year": [2016, 2016], "variable": ["density_firm", "density_city"], "mean": [0.3, 0.5],
                        "n": [-1, 2]})
    events = list(_emit("s000_figure5", 5, bad, fig.render_figure5, paths, "caption", {}))
    out, checks = events[0], events[1:]
    assert not stale.exists()
    assert "not drawn" in out.metadata["figure"].value and "ranges" in out.metadata["figure"].value
    assert "figure_path" not in out.metadata
    assert [c.check_name for c in checks if not c.passed] == ["ranges"]
    good = bad.with_columns(pl.Series("n", [1, 2]))
    events = list(_emit("s000_figure5", 5, good, fig.render_figure5, paths, "caption", {}))
    assert stale.read_bytes() == fig.render_figure5(good) and all(c.passed for c in events[1:])
