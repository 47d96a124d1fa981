"""Study S000 (Liu & Zhu 2021) Figures 1-5: tidy figure data and deterministic PNG renderings.

Pure module (polars, numpy, matplotlib; never imports Dagster). Spec: ``shared/specs/
S000_import_spillovers_export_evolution.md`` section 5.3 (descriptive findings, Figs. 1-5) and
section 8.1 item 15 ("figure data for Figs. 1-5"). Every ``figureN_data`` function takes the
stacked ``s000_panel`` (a ``pl.LazyFrame`` or ``pl.DataFrame`` with one row per firm x HS4 x year)
and selects the few columns it needs (``year``, ``export``, ``density_firm``, ``density_city`` and,
for Figs. 3-4, ``macro_region`` / ``city_code``) lazily, before anything is collected. Only Fig. 1
(a kernel density needs the values) holds one year's two density columns in memory; the other
figures are lazy group-bys.

========  =====================================================================================
Figure    Data (one tidy frame; contract ``data_contracts/s000_figureN.yaml``)
========  =====================================================================================
1         Gaussian kernel densities of density_firm and density_city by export status, one
          year (default: the latest panel year; the paper uses 2016). Columns: year, variable,
          export, point, x, kde, n, bandwidth.
2         Box-plot statistics of both densities by export status, same year.
3         Box-plot statistics by macro-region (east, central, west, northeast; spec 2.5) for two
          years, export == 1 only (paper: 2009 and 2016; fallback rule in
          :func:`resolve_fig3_years`).
4         City means of both densities (export == 1, one year) with prefecture coordinates, drawn
          as a point map (not the official standard map GS(2020)4619 of the paper).
5         Annual means of both densities over all panel years, export == 1 only.
========  =====================================================================================

Kernel density (Fig. 1). Gaussian kernel ``f(x) = 1/(n h) * sum_i phi((x - x_i) / h)`` with the
bandwidth rule of thumb of Silverman (1986, eq. 3.31), ``h = 0.9 * min(sd, IQR / 1.34) * n^(-1/5)``
(sd with ddof = 1, IQR from numpy's linear percentiles; ``sd`` alone when IQR = 0), the default
of R's ``density()`` (``bw.nrd0``) and of Stata's ``kdensity``; ``bw_rule="scott"`` gives
``h = 1.06 * sd * n^(-1/5)`` (R ``bw.nrd``). The kernel is evaluated on a common grid per variable
of ``grid_points`` points from ``min - 3h`` to ``max + 3h`` over both export groups, so each curve
integrates to about 1. The support is not truncated at the [0, 1] bounds of the densities (as in
Stata/R defaults), so some mass lies below the 0.05 filter threshold. Evaluation is exact (a
chunked direct sum) while ``n * grid_points <= KDE_EXACT_MAX``; above that the values are first
linearly binned onto ``KDE_BIN_POINTS`` equally spaced points (Wand 1994; relative error of order
``(bin width / h)^2``, negligible at 2^14 bins). Groups with fewer than two values or zero spread
have no kernel density: they keep one row with null ``x``/``kde``/``bandwidth`` and their ``n``.

Box plots (Figs. 2-3) follow matplotlib's ``boxplot`` (``whis=1.5``): quartiles by linear
interpolation (numpy ``percentile`` default), whiskers at the most extreme values inside
``[q1 - 1.5 IQR, q3 + 1.5 IQR]`` (clamped to the box when no value is), ``mean`` and the number of
values outside the whiskers (``n_outliers``; fliers are not drawn). Groups without rows are kept
with ``n = 0`` and null statistics, so every figure frame has the full variable x group grid.

Rendering (``render_figureN(data) -> bytes``): matplotlib's Agg canvas is used directly
(``matplotlib.figure.Figure`` + ``FigureCanvasAgg``; no pyplot, no global backend switch) under
matplotlib's ``default`` style, at ``DPI`` dots per inch, with the ``Software`` PNG text chunk
removed; the PNG has no timestamp, so the same data gives byte-identical files.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
import polars as pl

__all__ = [
    "VARIABLES",
    "MACRO_REGIONS",
    "EXPORT_VALUES",
    "PAPER_FIG1_YEAR",
    "PAPER_FIG3_YEARS",
    "BANDWIDTH_RULES",
    "DPI",
    "WHIS",
    "CAPTIONS",
    "panel_years",
    "latest_year",
    "resolve_fig3_years",
    "bandwidth",
    "gaussian_kde_grid",
    "box_stats",
    "figure1_data",
    "figure2_data",
    "figure3_years",
    "figure3_data",
    "figure4_data",
    "cities_without_coordinates",
    "figure5_data",
    "render_figure1",
    "render_figure2",
    "render_figure3",
    "render_figure4",
    "render_figure5",
]

VARIABLES: tuple[str, ...] = ("density_firm", "density_city")
MACRO_REGIONS: tuple[str, ...] = ("east", "central", "west", "northeast")
EXPORT_VALUES: tuple[int, ...] = (0, 1)
PAPER_FIG1_YEAR = 2016  # Figs. 1, 2 and 4 of the paper: the 2016 cross-section
PAPER_FIG3_YEARS: tuple[int, ...] = (2009, 2016)
BANDWIDTH_RULES: tuple[str, ...] = ("silverman", "scott")
WHIS = 1.5
DPI = 100
KDE_GRID_POINTS = 256
KDE_CUT = 3.0
KDE_EXACT_MAX = 20_000_000
KDE_BIN_POINTS = 1 << 14
_KDE_CHUNK_CELLS = 4_000_000  # values x grid points per chunk of the direct sum (32 MB of float64)

BOX_STATS: tuple[str, ...] = ("n", "mean", "q1", "median", "q3", "whislo", "whishi", "min", "max", "n_outliers")

CAPTIONS: dict[int, str] = {
    1: "Kernel densities of density_firm and density_city by export status (Gaussian kernel, "
       "Silverman bandwidth); S000 Fig. 1.",
    2: "Box plots of density_firm and density_city by export status (whiskers at 1.5 IQR); S000 Fig. 2.",
    3: "Box plots of density_firm and density_city of exported products (export = 1) by macro-region; "
       "S000 Fig. 3.",
    4: "City means of density_firm and density_city of exported products (export = 1) as a point map of "
       "prefecture coordinates (cpca); not the official standard map GS(2020)4619; S000 Fig. 4.",
    5: "Annual means of density_firm and density_city of exported products (export = 1); S000 Fig. 5.",
}
_LABEL = {"density_firm": "density_firm (firm scale, eq. 2)", "density_city": "density_city (city scale, eq. 3)"}
_EXPORT_LABEL = {0: "not exported (export = 0)", 1: "exported (export = 1)"}
_REGION_LABEL = {"east": "East", "central": "Central", "west": "West", "northeast": "Northeast"}


# --------------------------------------------------------------------------------------------------
# panel helpers
# --------------------------------------------------------------------------------------------------
def _lazy(panel: pl.LazyFrame | pl.DataFrame) -> pl.LazyFrame:
    if isinstance(panel, pl.LazyFrame):
        return panel
    if isinstance(panel, pl.DataFrame):
        return panel.lazy()
    raise TypeError(f"expected a polars LazyFrame or DataFrame, got {type(panel).__name__}")


def panel_years(panel: pl.LazyFrame | pl.DataFrame, *, exporters_only: bool = False) -> list[int]:
    """Sorted years with at least one panel row (with ``export == 1`` when ``exporters_only``)."""
    lf = _lazy(panel).select("year", "export")
    if exporters_only:
        lf = lf.filter(pl.col("export") == 1)
    return sorted(int(y) for y in lf.select(pl.col("year").unique()).collect()["year"].to_list())


def latest_year(panel: pl.LazyFrame | pl.DataFrame) -> int:
    """The last year with panel rows; ``ValueError`` for an empty panel."""
    years = panel_years(panel)
    if not years:
        raise ValueError("s000_panel has no rows: nothing to draw")
    return years[-1]


def _one_year(panel: pl.LazyFrame | pl.DataFrame, year: int | None) -> int:
    years = panel_years(panel)
    if not years:
        raise ValueError("s000_panel has no rows: nothing to draw")
    if year is None:
        return years[-1]
    if int(year) not in years:
        raise ValueError(f"year {year} has no rows in s000_panel (years with rows: {years})")
    return int(year)


def resolve_fig3_years(available: Sequence[int], requested: Sequence[int] = PAPER_FIG3_YEARS) -> tuple[list[int], str]:
    """Years of Fig. 3 and the rule that chose them.

    The requested years (paper: 2009 and 2016) when every one of them is available; otherwise the
    fallback: the middle available year (``available[(k - 1) // 2]`` of the ``k`` sorted years, the
    lower middle when ``k`` is even) and the last one (one year when only one is available).
    Returns ``(years, rule)`` with rule ``"requested"`` or ``"fallback_middle_last"``.
    """
    avail = sorted({int(y) for y in available})
    if not avail:
        raise ValueError("no year with exporting rows (export == 1) in s000_panel: Fig. 3 has nothing to draw")
    req = sorted({int(y) for y in requested})
    if req and all(y in avail for y in req):
        return req, "requested"
    return sorted({avail[(len(avail) - 1) // 2], avail[-1]}), "fallback_middle_last"


# --------------------------------------------------------------------------------------------------
# kernel density (Fig. 1)
# --------------------------------------------------------------------------------------------------
def bandwidth(values: np.ndarray, rule: str = "silverman") -> float | None:
    """Rule-of-thumb bandwidth (module docstring); ``None`` when fewer than 2 values or sd = 0."""
    if rule not in BANDWIDTH_RULES:
        raise ValueError(f"bandwidth rule {rule!r} unknown; allowed: {', '.join(BANDWIDTH_RULES)}")
    x = np.asarray(values, dtype=np.float64)
    n = x.size
    if n < 2:
        return None
    sd = float(np.std(x, ddof=1))
    if not (sd > 0 and math.isfinite(sd)):
        return None
    if rule == "scott":
        return 1.06 * sd * n ** -0.2
    q75, q25 = np.percentile(x, [75, 25])
    iqr = float(q75 - q25)
    a = min(sd, iqr / 1.34) if iqr > 0 else sd
    return 0.9 * a * n ** -0.2


def _gauss_sum(points: np.ndarray, weights: np.ndarray, grid: np.ndarray, h: float) -> np.ndarray:
    """sum_j w_j * exp(-0.5 ((grid - p_j) / h)^2), in chunks of points."""
    out = np.zeros(grid.size, dtype=np.float64)
    step = max(1, _KDE_CHUNK_CELLS // max(grid.size, 1))
    for s in range(0, points.size, step):
        u = (grid[None, :] - points[s:s + step, None]) / h
        out += weights[s:s + step] @ np.exp(-0.5 * u * u)
    return out


def gaussian_kde_grid(values: np.ndarray, grid: np.ndarray, h: float, *,
                      exact_max: int = KDE_EXACT_MAX, bin_points: int = KDE_BIN_POINTS) -> np.ndarray:
    """Gaussian kernel density ``1/(n h) sum_i phi((x - x_i)/h)`` of ``values`` at ``grid``.

    Exact direct sum while ``n * len(grid) <= exact_max``; otherwise linear binning of the values
    onto ``bin_points`` equally spaced points between their min and max, then the same sum over the
    bin points weighted by the binned counts.
    """
    x = np.asarray(values, dtype=np.float64)
    g = np.asarray(grid, dtype=np.float64)
    n = x.size
    if n == 0 or not h > 0:
        raise ValueError("gaussian_kde_grid needs at least one value and a positive bandwidth")
    lo, hi = float(x.min()), float(x.max())
    if n * g.size <= exact_max or hi <= lo:
        pts, w = x, np.ones(n)
    else:
        delta = (hi - lo) / (bin_points - 1)
        pos = (x - lo) / delta
        k = np.minimum(np.floor(pos).astype(np.int64), bin_points - 2)
        frac = pos - k
        w = np.bincount(k, weights=1.0 - frac, minlength=bin_points) + np.bincount(
            k + 1, weights=frac, minlength=bin_points)
        pts = lo + delta * np.arange(bin_points)
        keep = w > 0
        pts, w = pts[keep], w[keep]
    return _gauss_sum(pts, w, g, h) / (n * h * math.sqrt(2.0 * math.pi))


_FIG1_SCHEMA = pl.Schema({"variable": pl.String(), "export": pl.Int8(), "point": pl.Int32(), "x": pl.Float64(),
                          "kde": pl.Float64(), "n": pl.Int64(), "bandwidth": pl.Float64()})


def figure1_data(panel: pl.LazyFrame | pl.DataFrame, year: int | None = None, *, bw_rule: str = "silverman",
                 grid_points: int = KDE_GRID_POINTS, cut: float = KDE_CUT) -> pl.DataFrame:
    """Fig. 1: kernel densities of density_firm and density_city by export status in ``year``
    (default: the latest panel year). One row per variable x export x grid point; a group without
    a kernel density (n < 2 or zero spread) keeps one row with null x, kde and bandwidth."""
    if grid_points < 2:
        raise ValueError("grid_points must be at least 2")
    if bw_rule not in BANDWIDTH_RULES:
        raise ValueError(f"bandwidth rule {bw_rule!r} unknown; allowed: {', '.join(BANDWIDTH_RULES)}")
    y = _one_year(panel, year)
    df = _lazy(panel).select("year", "export", *VARIABLES).filter(pl.col("year") == y).drop("year").collect()
    parts: list[pl.DataFrame] = []
    for var in VARIABLES:
        vals = {e: df.filter(pl.col("export") == e)[var].cast(pl.Float64).to_numpy() for e in EXPORT_VALUES}
        bws = {e: bandwidth(v, bw_rule) for e, v in vals.items()}
        spans = [(v.min() - cut * bws[e], v.max() + cut * bws[e]) for e, v in vals.items() if bws[e] is not None]
        grid = (np.linspace(min(s[0] for s in spans), max(s[1] for s in spans), grid_points) if spans else None)
        for e in EXPORT_VALUES:
            v, h = vals[e], bws[e]
            if h is None:
                parts.append(pl.DataFrame({"variable": [var], "export": [e], "point": [0], "x": [None],
                                           "kde": [None], "n": [v.size], "bandwidth": [None]},
                                          schema=_FIG1_SCHEMA))
                continue
            parts.append(pl.DataFrame({
                "variable": [var] * grid_points, "export": [e] * grid_points,
                "point": np.arange(grid_points), "x": grid, "kde": gaussian_kde_grid(v, grid, h),
                "n": [v.size] * grid_points, "bandwidth": [h] * grid_points,
            }, schema=_FIG1_SCHEMA))
    out = pl.concat(parts).with_columns(pl.lit(y, dtype=pl.Int32).alias("year"))
    return out.select("year", *_FIG1_SCHEMA.names()).sort("variable", "export", "point")



# --------------------------------------------------------------------------------------------------
# box-plot statistics (Figs. 2-3)
# --------------------------------------------------------------------------------------------------
def box_stats(values: pl.LazyFrame, keys: Sequence[str], *, whis: float = WHIS) -> pl.LazyFrame:
    """matplotlib box-plot statistics of column ``value`` by ``keys`` (lazy; see module docstring)."""
    keys = list(keys)
    v = pl.col("value")
    base = values.group_by(keys).agg(
        pl.len().cast(pl.Int64).alias("n"),
        v.mean().alias("mean"),
        v.quantile(0.25, interpolation="linear").alias("q1"),
        v.quantile(0.5, interpolation="linear").alias("median"),
        v.quantile(0.75, interpolation="linear").alias("q3"),
        v.min().alias("min"),
        v.max().alias("max"),
    )
    fences = base.select(*keys, "q1", "q3").with_columns(
        (pl.col("q1") - whis * (pl.col("q3") - pl.col("q1"))).alias("_lo"),
        (pl.col("q3") + whis * (pl.col("q3") - pl.col("q1"))).alias("_hi"),
    )
    whisk = values.join(fences, on=keys, how="inner").group_by(keys).agg(
        v.filter(v >= pl.col("_lo")).min().alias("_wlo"),
        v.filter(v <= pl.col("_hi")).max().alias("_whi"),
        ((v < pl.col("_lo")) | (v > pl.col("_hi"))).sum().cast(pl.Int64).alias("n_outliers"),
    )
    return base.join(whisk, on=keys, how="left").with_columns(
        # matplotlib.cbook.boxplot_stats: a whisker never ends inside the box
        pl.when(pl.col("_wlo").is_null() | (pl.col("_wlo") > pl.col("q1"))).then(pl.col("q1"))
        .otherwise(pl.col("_wlo")).alias("whislo"),
        pl.when(pl.col("_whi").is_null() | (pl.col("_whi") < pl.col("q3"))).then(pl.col("q3"))
        .otherwise(pl.col("_whi")).alias("whishi"),
    ).select(*keys, *BOX_STATS)


def _complete(stats: pl.DataFrame, grid: pl.DataFrame, keys: list[str]) -> pl.DataFrame:
    """Every group of ``grid`` once; groups without rows get n = 0 and null statistics."""
    out = grid.join(stats, on=keys, how="left")
    return out.with_columns(pl.col("n").fill_null(0), pl.col("n_outliers").fill_null(0))


def _long(lf: pl.LazyFrame, index: list[str]) -> pl.LazyFrame:
    return lf.unpivot(on=list(VARIABLES), index=index, variable_name="variable", value_name="value").with_columns(
        pl.col("value").cast(pl.Float64))


def figure2_data(panel: pl.LazyFrame | pl.DataFrame, year: int | None = None) -> pl.DataFrame:
    """Fig. 2: box-plot statistics of both densities by export status in ``year`` (default: latest)."""
    y = _one_year(panel, year)
    lf = _lazy(panel).select("year", "export", *VARIABLES).filter(pl.col("year") == y).drop("year")
    stats = box_stats(_long(lf, ["export"]).with_columns(pl.col("export").cast(pl.Int8)),
                      ["variable", "export"]).collect()
    grid = pl.DataFrame({"variable": list(VARIABLES)}).join(
        pl.DataFrame({"export": list(EXPORT_VALUES)}, schema={"export": pl.Int8}), how="cross")
    out = _complete(stats, grid, ["variable", "export"]).with_columns(pl.lit(y, dtype=pl.Int32).alias("year"))
    return out.select("year", "variable", "export", *BOX_STATS).sort("variable", "export")


def figure3_years(panel: pl.LazyFrame | pl.DataFrame,
                  requested: Sequence[int] = PAPER_FIG3_YEARS) -> tuple[list[int], str]:
    """Fig. 3 years: :func:`resolve_fig3_years` over the years with exporting rows."""
    return resolve_fig3_years(panel_years(panel, exporters_only=True), requested)


def figure3_data(panel: pl.LazyFrame | pl.DataFrame, requested: Sequence[int] = PAPER_FIG3_YEARS) -> pl.DataFrame:
    """Fig. 3: box-plot statistics of both densities by year x macro-region, export == 1 only, for
    the years of :func:`figure3_years` (paper: 2009 and 2016)."""
    years, _ = figure3_years(panel, requested)
    lf = (_lazy(panel).select("year", "export", "macro_region", *VARIABLES)
          .filter((pl.col("export") == 1) & pl.col("year").is_in(years)).drop("export")
          .with_columns(pl.col("year").cast(pl.Int32)))
    keys = ["year", "macro_region", "variable"]
    stats = box_stats(_long(lf, ["year", "macro_region"]), keys).collect()
    unknown = sorted(set(stats["macro_region"].to_list()) - set(MACRO_REGIONS))
    if unknown:
        raise ValueError(f"s000_panel macro_region values {unknown} not in {list(MACRO_REGIONS)}")
    grid = (pl.DataFrame({"year": years}, schema={"year": pl.Int32})
            .join(pl.DataFrame({"macro_region": list(MACRO_REGIONS)}), how="cross")
            .join(pl.DataFrame({"variable": list(VARIABLES)}), how="cross"))
    order = {r: i for i, r in enumerate(MACRO_REGIONS)}
    out = _complete(stats, grid, keys).select(*keys, *BOX_STATS)
    return (out.with_columns(pl.col("macro_region").replace_strict(order, return_dtype=pl.Int32).alias("_o"))
            .sort("year", "variable", "_o").drop("_o"))


# --------------------------------------------------------------------------------------------------
# city means (Fig. 4) and annual means (Fig. 5)
# --------------------------------------------------------------------------------------------------
def figure4_data(panel: pl.LazyFrame | pl.DataFrame, prefectures: pl.LazyFrame | pl.DataFrame,
                 year: int | None = None) -> pl.DataFrame:
    """Fig. 4: per city, the number of exporting firm x HS4 rows ``n`` and the means of both
    densities among them (export == 1) in ``year`` (default: latest panel year), with the city's
    name and coordinates from ``prefectures`` (ref_prefecture). Cities that are not in the table or
    have no coordinates stay in the data with null name/coordinates (see
    :func:`cities_without_coordinates`)."""
    y = _one_year(panel, year)
    ref = _lazy(prefectures).select("city_code", "city_name", "longitude", "latitude").collect()
    dup = ref.filter(pl.col("city_code").is_duplicated())["city_code"].unique().sort().to_list()
    if dup:
        raise ValueError(f"prefecture table: city_code not unique ({dup[:5]})")
    city = (_lazy(panel).select("year", "export", "city_code", *VARIABLES)
            .filter((pl.col("year") == y) & (pl.col("export") == 1))
            .group_by("city_code")
            .agg(pl.len().cast(pl.Int64).alias("n"),
                 *[pl.col(v).cast(pl.Float64).mean().alias(f"mean_{v}") for v in VARIABLES])
            .collect())
    out = city.join(ref, on="city_code", how="left").with_columns(pl.lit(y, dtype=pl.Int32).alias("year"))
    return out.select("year", "city_code", "city_name", "longitude", "latitude", "n",
                      *[f"mean_{v}" for v in VARIABLES]).sort("city_code")


def cities_without_coordinates(data: pl.DataFrame) -> list[str]:
    """City codes of a Fig. 4 frame that cannot be placed on the point map."""
    miss = data.filter(pl.col("longitude").is_null() | pl.col("latitude").is_null())
    return sorted(miss["city_code"].to_list())


def figure5_data(panel: pl.LazyFrame | pl.DataFrame, years: Sequence[int] | None = None) -> pl.DataFrame:
    """Fig. 5: annual mean and count of both densities among exported products (export == 1).

    Rows for every year with panel rows plus every year in ``years`` (e.g. all partitions); a year
    without exporting rows has ``n = 0`` and a null mean."""
    all_years = sorted(set(panel_years(panel)) | {int(y) for y in (years or [])})
    lf = (_lazy(panel).select("year", "export", *VARIABLES).filter(pl.col("export") == 1).drop("export")
          .with_columns(pl.col("year").cast(pl.Int32)))
    stats = (_long(lf, ["year"]).group_by("year", "variable")
             .agg(pl.col("value").mean().alias("mean"), pl.len().cast(pl.Int64).alias("n")).collect())
    grid = pl.DataFrame({"year": all_years}, schema={"year": pl.Int32}).join(
        pl.DataFrame({"variable": list(VARIABLES)}), how="cross")
    out = grid.join(stats, on=["year", "variable"], how="left").with_columns(pl.col("n").fill_null(0))
    return out.select("year", "variable", "mean", "n").sort("variable", "year")


# --------------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------------
def _figure(ncols: int, nrows: int = 1, size: tuple[float, float] = (10.0, 4.2)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def _style():
    import matplotlib.style

    return matplotlib.style.context("default")


def _single(values: pl.Series):
    vs = values.unique().to_list()
    return vs[0] if len(vs) == 1 else (f"{min(vs)}-{max(vs)}" if vs else "?")


def _empty_note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=9, color="0.3")


def render_figure1(data: pl.DataFrame) -> bytes:
    """PNG of Fig. 1 from :func:`figure1_data` output: one panel per density, one curve per export status."""
    year = _single(data["year"])
    style = {0: {"color": "0.45", "linestyle": "--"}, 1: {"color": "tab:blue", "linestyle": "-"}}
    with _style():
        fig, axes = _figure(len(VARIABLES))
        for ax, var in zip(axes[0], VARIABLES):
            for e in EXPORT_VALUES:
                g = data.filter((pl.col("variable") == var) & (pl.col("export") == e)).sort("point")
                n = int(g["n"][0]) if g.height else 0
                if g.height == 0 or g["x"].null_count() == g.height:
                    ax.plot([], [], label=f"{_EXPORT_LABEL[e]}: no density (n = {n})", **style[e])
                    continue
                h = float(g["bandwidth"][0])
                ax.plot(g["x"].to_numpy(), g["kde"].to_numpy(), linewidth=1.6,
                        label=f"{_EXPORT_LABEL[e]}, n = {n:,}, h = {h:.3g}", **style[e])
            ax.set_xlabel(_LABEL[var])
            ax.set_ylabel("kernel density")
            ax.legend(fontsize=8, frameon=False)
        fig.suptitle(f"Figure 1. Kernel densities by export status, {year} (Gaussian kernel)", fontsize=11)
        return _png(fig)


def _bxp_stats(rows: pl.DataFrame, label_col: str, labels: dict) -> tuple[list[dict], list[int], list[str]]:
    stats, pos, ticks = [], [], []
    for i, r in enumerate(rows.iter_rows(named=True), start=1):
        ticks.append(f"{labels.get(r[label_col], r[label_col])}\nn = {r['n']:,}")
        if r["n"] == 0:
            continue
        stats.append({"med": r["median"], "q1": r["q1"], "q3": r["q3"], "whislo": r["whislo"],
                      "whishi": r["whishi"], "mean": r["mean"], "fliers": []})
        pos.append(i)
    return stats, pos, ticks


def _draw_boxes(ax, rows: pl.DataFrame, label_col: str, labels: dict) -> None:
    stats, pos, ticks = _bxp_stats(rows, label_col, labels)
    if stats:
        ax.bxp(stats, positions=pos, showfliers=False, showmeans=True, widths=0.55,
               meanprops={"marker": "D", "markerfacecolor": "white", "markeredgecolor": "black", "markersize": 4})
    else:
        _empty_note(ax, "no rows")
    ax.set_xticks(range(1, len(ticks) + 1), ticks, fontsize=8)
    ax.set_xlim(0.4, len(ticks) + 0.6)


def render_figure2(data: pl.DataFrame) -> bytes:
    """PNG of Fig. 2 from :func:`figure2_data` output (boxes drawn from the stored statistics)."""
    year = _single(data["year"])
    with _style():
        fig, axes = _figure(len(VARIABLES))
        for ax, var in zip(axes[0], VARIABLES):
            rows = data.filter(pl.col("variable") == var).sort("export")
            _draw_boxes(ax, rows, "export", {0: "export = 0", 1: "export = 1"})
            ax.set_ylabel(_LABEL[var])
        fig.suptitle(f"Figure 2. Box plots by export status, {year} (whiskers 1.5 IQR, diamond = mean)",
                     fontsize=11)
        return _png(fig)


def render_figure3(data: pl.DataFrame) -> bytes:
    """PNG of Fig. 3 from :func:`figure3_data` output: rows = densities, columns = years."""
    years = sorted(data["year"].unique().to_list())
    order = {r: i for i, r in enumerate(MACRO_REGIONS)}
    with _style():
        fig, axes = _figure(max(len(years), 1), len(VARIABLES), size=(4.6 * max(len(years), 1) + 0.8, 7.0))
        for i, var in enumerate(VARIABLES):
            for j, y in enumerate(years):
                ax = axes[i][j]
                rows = (data.filter((pl.col("variable") == var) & (pl.col("year") == y))
                        .sort(pl.col("macro_region").replace_strict(order, default=99)))
                _draw_boxes(ax, rows, "macro_region", _REGION_LABEL)
                ax.set_title(f"{y}", fontsize=10)
                if j == 0:
                    ax.set_ylabel(_LABEL[var])
        fig.suptitle("Figure 3. Exported products (export = 1) by macro-region (whiskers 1.5 IQR)", fontsize=11)
        return _png(fig)


def render_figure4(data: pl.DataFrame) -> bytes:
    """PNG of Fig. 4 from :func:`figure4_data` output: a point map (lon/lat scatter of prefecture
    coordinates, colour = city mean, marker area proportional to n). No basemap: this is not the
    official standard map GS(2020)4619 used by the paper."""
    year = _single(data["year"]) if data.height else "?"
    placed = data.filter(pl.col("longitude").is_not_null() & pl.col("latitude").is_not_null())
    missing = data.height - placed.height
    with _style():
        fig, axes = _figure(len(VARIABLES), size=(11.0, 4.8))
        nmax = max(int(placed["n"].max() or 1), 1) if placed.height else 1
        for ax, var in zip(axes[0], VARIABLES):
            col = f"mean_{var}"
            if placed.height:
                sc = ax.scatter(placed["longitude"].to_numpy(), placed["latitude"].to_numpy(),
                                c=placed[col].to_numpy(), s=12 + 188 * placed["n"].to_numpy() / nmax,
                                cmap="viridis", edgecolors="black", linewidths=0.4, alpha=0.9)
                fig.colorbar(sc, ax=ax, shrink=0.85, label=f"city mean of {var}")
            else:
                _empty_note(ax, "no city with coordinates")
            ax.set_xlim(73, 135)
            ax.set_ylim(17, 54)
            ax.set_aspect(1.0 / math.cos(math.radians(35.0)))
            ax.set_xlabel("longitude (°E)")
            ax.set_ylabel("latitude (°N)")
            ax.set_title(_LABEL[var], fontsize=9)
            ax.grid(True, linewidth=0.3, color="0.85")
        fig.suptitle(f"Figure 4 (point map). City means of exported products (export = 1), {year}", fontsize=11)
        fig.text(0.5, 0.005, f"Prefecture coordinates (cpca); marker area ~ n; {placed.height} cities drawn, "
                 f"{missing} without coordinates not drawn. Not the official standard map GS(2020)4619.",
                 ha="center", va="bottom", fontsize=7.5, color="0.3")
        return _png(fig)


def render_figure5(data: pl.DataFrame) -> bytes:
    """PNG of Fig. 5 from :func:`figure5_data` output: annual means (gaps where n = 0)."""
    with _style():
        fig, axes = _figure(len(VARIABLES))
        for ax, var in zip(axes[0], VARIABLES):
            g = data.filter(pl.col("variable") == var).sort("year")
            yrs = g["year"].to_numpy()
            means = g["mean"].cast(pl.Float64).fill_null(float("nan")).to_numpy()
            if np.isfinite(means).any():
                ax.plot(yrs, means, marker="o", markersize=3.5, linewidth=1.5, color="tab:blue")
            else:
                _empty_note(ax, "no exporting rows")
            if yrs.size:
                ax.set_xticks(yrs[:: max(1, int(math.ceil(yrs.size / 8)))])
            ax.set_xlabel("year")
            ax.set_ylabel(f"mean {var}")
            ax.set_title(_LABEL[var], fontsize=9)
            ax.grid(True, linewidth=0.3, color="0.85")
        fig.suptitle("Figure 5. Annual means of exported products (export = 1)", fontsize=11)
        return _png(fig)
