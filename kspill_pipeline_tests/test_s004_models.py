"""Study S004 models (issue 6): Tables 2-8, 2SLS and first-stage F, permutation placebo, published
values, rendering.

Every expected number is derived independently of the code under test: planted coefficients of a
numpy simulation, an explicit-dummy numpy 2SLS / OLS with a hand-written CRV1 sandwich (fixest's
default small-sample factor (N-1)/(N-K) G/(G-1), K = rank of the full design), full pyfixest refits
of permuted data, hand-computed value-weighted means, and the numbers of spec S004 section 5 typed
from the spec.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from scipy import stats as sps

from kspill_pipeline.studies import s004_models as m
from kspill_pipeline.studies import s004_placebo as pb

CTL = m.CONTROLS
BETA = 0.8  # planted vagg effect on hs4_qua
GAMMA = dict(zip(CTL, (0.3, -0.2, 0.1, 0.05, 0.4, -0.1, 0.2, 0.0, 0.15), strict=True))


# --------------------------------------------------------------------------------------------------
# simulation (numpy, inside the test)
# --------------------------------------------------------------------------------------------------
def simulate(n_cities=40, n_hs4=12, years=range(2004, 2013), *, beta=BETA, drop=0.15, rho=0.0, seed=0,
             controls=CTL):
    """Cities x HS4 x years with city, HS4 and year FE, city-year controls and a city-year vagg.

    vagg_ct = a_c + d_t + 0.5 z_tel,ct + u_ct with z_tel,ct = tel_c * N_(t-1) (a known first stage);
    hs4_qua = beta vagg + controls . gamma + FE + rho u_ct + e. rho != 0 makes vagg endogenous.
    iv_post is pure noise (an irrelevant instrument: weak). Returns (quality, city_year, location).
    """
    rng = np.random.default_rng(seed)
    years = list(years)
    cities = [f"{p}{i:02d}00" for i in range(1, 21) for p in ("11", "32", "42", "51", "44")]
    cities = cities[:n_cities]
    nat = np.exp(0.16 * (np.arange(len(years) + 1)))  # N_(t-1) for t = years[0]..: index j -> N_(j)
    tel = rng.lognormal(0.0, 0.5, n_cities)
    a_c = rng.normal(0, 1, n_cities)
    d_t = rng.normal(0, 0.3, len(years))
    rows = []
    for i, c in enumerate(cities):
        for j, t in enumerate(years):
            z = tel[i] * nat[j] / 3.0
            u = rng.normal(0, 0.3)
            v = a_c[i] + d_t[j] + 0.5 * z + u
            ctl = {k: rng.normal(0, 1) for k in controls}
            rows.append({"city_code": c, "year": t, "vagg": v, "iv_tel": z, "iv_post": rng.normal(0, 1), "_u": u,
                         **ctl})
    cy = pl.DataFrame(rows).with_columns(pl.col("year").cast(pl.Int32))
    mu_c = dict(zip(cities, rng.normal(0, 1, n_cities), strict=True))
    nu_h = {f"{8400 + h:04d}": x for h, x in enumerate(rng.normal(0, 1, n_hs4))}
    de_t = dict(zip(years, rng.normal(0, 0.5, len(years)), strict=True))
    q = cy.join(pl.DataFrame({"hs4": list(nu_h)}), how="cross")
    keep = rng.random(q.height) >= drop
    q = q.filter(pl.Series(keep))
    lin = beta * pl.col("vagg") + sum(GAMMA.get(k, 0.1) * pl.col(k) for k in controls) if controls else \
        beta * pl.col("vagg")
    q = q.with_columns(
        (lin + pl.col("city_code").replace_strict(mu_c, return_dtype=pl.Float64)
         + pl.col("hs4").replace_strict(nu_h, return_dtype=pl.Float64)
         + pl.col("year").replace_strict(de_t, return_dtype=pl.Float64)
         + rho * pl.col("_u") + pl.Series(rng.normal(0, 0.5, q.height))).alias("hs4_qua"))
    quality = q.select("year", "city_code", "hs4", "hs4_qua")
    loc = pl.DataFrame({"city_code": cities}).with_columns(
        (pl.col("city_code").str.slice(2, 2) == "01").cast(pl.Int8).alias("centre"),
        pl.col("city_code").str.slice(0, 2).alias("_p"))
    loc = loc.with_columns((1 - pl.col("centre")).cast(pl.Int8).alias("peri"),
                           pl.col("_p").is_in(["11", "32", "44"]).cast(pl.Int8).alias("east"),
                           (pl.col("_p") == "42").cast(pl.Int8).alias("mid"),
                           (pl.col("_p") == "51").cast(pl.Int8).alias("west")).drop("_p")
    return quality, cy.drop("_u"), loc


@pytest.fixture(scope="module")
def sim():
    quality, cy, loc = simulate()
    city_year = m.assemble_city_year(cy.select("city_code", "year", "vagg"),
                                     cy.drop("vagg"), location=loc)
    panel, report = m.build_analysis_panel(quality, city_year)
    return panel, city_year, report


# --------------------------------------------------------------------------------------------------
# numpy reference: explicit dummies, OLS / 2SLS, CRV1 with fixest's default small-sample factor
# --------------------------------------------------------------------------------------------------
def dummies(df: pl.DataFrame, fes) -> np.ndarray:
    """Intercept + dummies of every FE level except the first of each FE."""
    cols = [np.ones(df.height)]
    for f in fes:
        v = df[f].to_numpy()
        for lev in np.unique(v)[1:]:
            cols.append((v == lev).astype(float))
    return np.column_stack(cols)


def crv1(A: np.ndarray, u: np.ndarray, cl: np.ndarray, bread: np.ndarray, K: int) -> np.ndarray:
    """ssc * bread (sum_g A_g'u_g u_g'A_g) bread with ssc = (N-1)/(N-K) * G/(G-1)."""
    _, inv = np.unique(cl, return_inverse=True)
    G = inv.max() + 1
    S = np.zeros((G, A.shape[1]))
    np.add.at(S, inv, A * u[:, None])
    N = A.shape[0]
    return (N - 1) / (N - K) * G / (G - 1) * bread @ (S.T @ S) @ bread


def ols_np(y, X, cl):
    b, *_ = np.linalg.lstsq(X, y, rcond=None)
    u = y - X @ b
    XtXi = np.linalg.pinv(X.T @ X)
    K = np.linalg.matrix_rank(X)
    V = crv1(X, u, cl, XtXi, K)
    return b, np.sqrt(np.diag(V)), u


# --------------------------------------------------------------------------------------------------
# configuration and panel
# --------------------------------------------------------------------------------------------------
def test_config_defaults_and_errors():
    cfg = m.S004Config()
    assert cfg.placebo_permutation == "row_level"  # spec 8 default
    assert cfg.singleton_handling == "drop_singletons"
    assert cfg.hs6_robust_cluster == "city_hs6"
    assert cfg.table8_city_outcomes_level == "duplicated_city_hs4_panel"
    assert cfg.coa_include_vagg is False
    assert cfg.placebo_replications == 1000
    with pytest.raises(ValueError, match=r"placebo_permutation.*row_level.*city_year_level"):
        m.make_config(placebo_permutation="shuffle")
    with pytest.raises(ValueError, match=r"unknown key.*placebo_reps"):
        m.make_config(placebo_reps=10)


def test_panel_merge_names_missing_city_years(sim):
    panel, city_year, report = sim
    assert report["n_rows"] == panel.height and report["n_rows_unmatched"] == 0
    assert report["share_rows_matched"] == 1.0
    # L_vagg = vagg of the same city in exactly t-1 (hand: look it up)
    r = city_year.filter((pl.col("city_code") == "110200") & (pl.col("year") == 2007)).row(0, named=True)
    prev = city_year.filter((pl.col("city_code") == "110200") & (pl.col("year") == 2006))["vagg"].item()
    assert r["L_vagg"] == prev
    assert city_year.filter(pl.col("year") == 2004)["L_vagg"].null_count() == city_year.filter(
        pl.col("year") == 2004).height
    quality = panel.select("year", "city_code", "hs4", "hs4_qua")
    cut = city_year.filter(~((pl.col("city_code") == "110300") & (pl.col("year") == 2008)))
    with pytest.raises(ValueError, match=r"110300/2008 \(\d+ rows\)"):
        m.build_analysis_panel(quality, cut)
    kept, rep = m.build_analysis_panel(quality, cut, missing="keep")
    n_lost = quality.filter((pl.col("city_code") == "110300") & (pl.col("year") == 2008)).height
    assert kept.height == quality.height and rep["n_rows_unmatched"] == n_lost
    assert rep["unmatched_city_years"] == ["110300/2008"]


# --------------------------------------------------------------------------------------------------
# Table 2: planted beta, and equality with explicit dummies
# --------------------------------------------------------------------------------------------------
def test_table2_recovers_planted_beta(sim):
    panel, _, _ = sim
    res = m.table2(panel)
    t = res.tidy.filter((pl.col("term") == "vagg"))
    assert t["model"].to_list() == ["(1)", "(2)", "(3)", "(4)"]
    r4 = t.filter(pl.col("model") == "(4)").row(0, named=True)
    q = sps.t.ppf(0.975, r4["n_clusters"] - 1)
    assert r4["estimate"] - q * r4["std_error"] <= BETA <= r4["estimate"] + q * r4["std_error"]
    assert r4["n_clusters"] == panel.select("city_hs4").n_unique()
    # controls recovered as well (within 4 SE)
    for k, g in GAMMA.items():
        rk = res.tidy.filter((pl.col("model") == "(4)") & (pl.col("term") == k)).row(0, named=True)
        assert abs(rk["estimate"] - g) < 4 * rk["std_error"], k
    # published values joined on the vagg rows
    assert r4["published"] == 0.3087 and r4["published_std_error"] == 0.0201 and r4["published_n_obs"] == 616591
    # column (4) equals a numpy OLS with explicit city, year and HS4 dummies and a CRV1 sandwich
    d = panel.drop_nulls(subset=["hs4_qua", "vagg", *CTL])
    X = np.column_stack([d.select(["vagg", *CTL]).to_numpy(), dummies(d, ["city_code", "year", "hs4"])])
    b, se, u = ols_np(d["hs4_qua"].to_numpy(), X, d["city_hs4"].to_numpy())
    assert r4["n_obs"] == d.height  # the simulated panel has no singleton
    assert r4["estimate"] == pytest.approx(b[0], abs=1e-8)
    assert r4["std_error"] == pytest.approx(se[0], abs=1e-8)
    tss = ((d["hs4_qua"].to_numpy() - d["hs4_qua"].mean()) ** 2).sum()
    assert r4["r2"] == pytest.approx(1 - (u @ u) / tss, abs=1e-8)


# --------------------------------------------------------------------------------------------------
# Table 3: 2SLS against an independent two-stage computation; first-stage F; weak-IV flag
# --------------------------------------------------------------------------------------------------
def test_2sls_equals_two_stage_numpy_and_first_stage_f():
    ctl = ("fdi", "open")
    quality, cy, _ = simulate(n_cities=14, n_hs4=5, years=range(2005, 2011), drop=0.0, rho=0.6, seed=3,
                              controls=ctl)
    city_year = m.assemble_city_year(cy.select("city_code", "year", "vagg"), cy.drop("vagg"))
    panel, _ = m.build_analysis_panel(quality, city_year)
    cfg = m.make_config(controls=ctl)
    spec = next(s for s in m.table3_specs(cfg) if s.model == "(5)")
    assert (spec.endog, spec.instrument, spec.regressors) == ("vagg", "iv_tel", ctl)
    fit = m.fit_model(panel, spec, cfg)
    d = panel  # full grid: no null, no singleton
    assert fit.n_obs == d.height
    y = d["hs4_qua"].to_numpy()
    D = dummies(d, ["city_code", "year", "hs4"])
    W = np.column_stack([d.select(list(ctl)).to_numpy(), D])
    x = d["vagg"].to_numpy()
    z = d["iv_tel"].to_numpy()
    cl = d["city_hs4"].to_numpy()
    # first stage by lstsq, fitted values, second stage on the fitted values
    Z = np.column_stack([z, W])
    pi, *_ = np.linalg.lstsq(Z, x, rcond=None)
    xhat = Z @ pi
    Xh = np.column_stack([xhat, W])
    b, *_ = np.linalg.lstsq(Xh, y, rcond=None)
    u = y - np.column_stack([x, W]) @ b  # correct 2SLS residuals: actual x, not xhat
    K = np.linalg.matrix_rank(Xh)
    V = crv1(Xh, u, cl, np.linalg.pinv(Xh.T @ Xh), K)
    row = next(r for r in fit.rows if r["term"] == "vagg")
    assert row["estimate"] == pytest.approx(b[0], abs=1e-8)
    assert row["std_error"] == pytest.approx(np.sqrt(V[0, 0]), abs=1e-8)
    assert row["estimator"] == "2sls"
    # within R2 from the structural residuals: 1 - SSR / SS of y net of the FE (explicit dummies)
    ey = y - D @ np.linalg.lstsq(D, y, rcond=None)[0]
    assert fit.r2_within == pytest.approx(1 - (u @ u) / (ey @ ey), abs=1e-8)
    # first-stage F: cluster-robust Wald F of the excluded instrument = (pi_z / se_z)^2
    v_fs = x - xhat
    Kf = np.linalg.matrix_rank(Z)
    Vf = crv1(Z, v_fs, cl, np.linalg.pinv(Z.T @ Z), Kf)
    f_np = pi[0] ** 2 / Vf[0, 0]
    assert fit.first_stage["coef"] == pytest.approx(pi[0], abs=1e-8)
    assert fit.first_stage["f"] == pytest.approx(f_np, rel=1e-8)
    assert fit.first_stage["pyfixest_f_stat_1st_stage"] == pytest.approx(f_np, rel=1e-8)
    assert "Wald F" in fit.first_stage["stat"] and row["weak_iv"] is False and f_np > 10


def test_table3_columns_and_weak_iv_flag(sim):
    panel, _, _ = sim
    res = m.table3(panel)
    t = res.tidy.filter(pl.col("kind") == "coef")
    keyrow = {r["model"]: r for r in t.iter_rows(named=True) if r["term"] in ("vagg", "L_vagg")}
    assert sorted(keyrow) == ["(1)", "(2)", "(3)", "(4)", "(5)", "(6)"]
    # (1): province FE is collinear with city FE -> identical to Table 2 (4)
    t2 = m.table2(panel).tidy.filter((pl.col("model") == "(4)") & (pl.col("term") == "vagg")).row(0, named=True)
    assert keyrow["(1)"]["estimate"] == pytest.approx(t2["estimate"], abs=1e-9)
    assert keyrow["(3)"]["term"] == "L_vagg"
    # the lag needs t-1: the first year's rows leave columns (3)-(4)
    n_first = panel.filter(pl.col("year") == 2004).height
    assert keyrow["(3)"]["n_obs"] == keyrow["(1)"]["n_obs"] - n_first
    # iv_post is pure noise: weak (F < 10) and flagged, not hidden; iv_tel strong
    assert keyrow["(6)"]["weak_iv"] is True and keyrow["(6)"]["first_stage_f"] < 10
    assert keyrow["(5)"]["weak_iv"] is False and keyrow["(5)"]["first_stage_f"] > 10
    assert keyrow["(2)"]["weak_iv"] is None
    fs = res.tidy.filter(pl.col("kind") == "first_stage")
    assert fs["term"].to_list() == ["first_stage:L_vagg", "first_stage:iv_tel", "first_stage:iv_post"]
    assert fs["published"].null_count() == 3  # published values only on coefficient rows


# --------------------------------------------------------------------------------------------------
# Table 4-6
# --------------------------------------------------------------------------------------------------
def test_table4_optional_columns_skipped_with_reason(sim):
    panel, _, _ = sim
    p = panel.with_columns((pl.col("vagg") * 2.0).alias("vagg_in"), (pl.col("vagg") + 1.0).alias("vagg_txt"))
    res = m.table4(p)
    assert set(res.skipped) == {"(2)", "(4)", "(5)"}
    assert "firm_panel" in res.skipped["(4)"]
    t = res.tidy.filter(pl.col("kind") == "coef")
    base = t.filter((pl.col("model") == "(6)") & (pl.col("term") == "vagg")).row(0, named=True)
    # vagg_in = 2 vagg -> coefficient halves exactly (same sample and FE)
    vin = t.filter((pl.col("model") == "(1)") & (pl.col("term") == "vagg_in")).row(0, named=True)
    assert vin["estimate"] == pytest.approx(base["estimate"] / 2, rel=1e-9)
    # (6) and (7): same point estimate, clusters = provinces / cities
    c7 = t.filter((pl.col("model") == "(7)") & (pl.col("term") == "vagg")).row(0, named=True)
    assert c7["estimate"] == pytest.approx(base["estimate"], abs=1e-12)
    assert base["n_clusters"] == panel["province_code"].n_unique() and c7["n_clusters"] == panel["city_code"].n_unique()
    assert t.filter(pl.col("model") == "(3)")["fixed_effects"].unique().to_list() == ["city_code+year"]


def test_table4_firm_and_hs6_columns_when_supplied(sim):
    panel, city_year, _ = sim
    rng = np.random.default_rng(8)
    # firm panel: 3 firms per city, c_qua = 0.5 vagg + firm effect + noise; firm controls
    cy = city_year.select("city_code", "year")
    firms = cy.join(pl.DataFrame({"k": [0, 1, 2]}), how="cross").with_columns(
        (pl.col("city_code") + "_" + pl.col("k").cast(pl.String)).alias("firm_id"))
    firms = firms.with_columns(pl.Series("firm_age", rng.normal(10, 2, firms.height)),
                               pl.Series("firm_size", rng.normal(5, 1, firms.height)),
                               pl.Series("firm_capital_per_worker", rng.normal(3, 1, firms.height)))
    fpanel, _ = m.build_analysis_panel(firms, city_year, product="firm_id")
    fpanel = fpanel.with_columns((0.5 * pl.col("vagg") + pl.col("k") * 0.3
                                  + pl.Series(rng.normal(0, 0.2, fpanel.height))).alias("c_qua"))
    hs6 = panel.with_columns((pl.col("hs4") + "10").alias("hs6"), pl.col("hs4_qua").alias("hs6_qua"))
    hs6 = hs6.with_columns((pl.col("city_code") + "_" + pl.col("hs6")).alias("city_hs6"))
    res = m.table4(panel.with_columns(pl.col("vagg").alias("vagg_in"), pl.col("vagg").alias("vagg_txt")),
                   hs6_panel=hs6, firm_panel=fpanel)
    assert res.skipped == {}
    t = {(r["model"], r["term"]): r for r in res.tidy.iter_rows(named=True)}
    r4, r5 = t[("(4)", "vagg")], t[("(5)", "vagg")]
    assert r4["n_clusters"] == fpanel["firm_id"].n_unique() and r4["fixed_effects"] == "firm_id+city_code+year"
    assert ("(5)", "firm_age") in t and ("(4)", "fdi") not in t
    q = sps.t.ppf(0.975, r4["n_clusters"] - 1)
    assert abs(r4["estimate"] - 0.5) < q * r4["std_error"]
    # HS6 column: the same cells relabelled -> identical to the HS4 baseline, clustered by city x HS6
    assert t[("(2)", "vagg")]["estimate"] == pytest.approx(t[("(6)", "vagg")]["estimate"], abs=1e-10)
    assert t[("(2)", "vagg")]["cluster"] == "city_hs6"


def test_table6_interactions_centre_peri_identity(sim):
    panel, _, _ = sim
    res = m.table6(panel)
    t = res.tidy.filter(pl.col("kind") == "coef")
    g = {(r["model"], r["term"]): r["estimate"] for r in t.iter_rows(named=True)}
    # peri = 1 - centre: vagg(2) = vagg(1) + b_centre(1) and b_peri(2) = -b_centre(1) (the spec's DERIVED check)
    assert g[("(2)", "vagg")] == pytest.approx(g[("(1)", "vagg")] + g[("(1)", "vagg_x_centre")], abs=1e-9)
    assert g[("(2)", "vagg_x_peri")] == pytest.approx(-g[("(1)", "vagg_x_centre")], abs=1e-9)
    assert {("(5)", "vagg_x_west"), ("(4)", "vagg_x_mid"), ("(3)", "vagg_x_east")} <= set(g)


def test_subsample_quality_hand_case():
    f = pl.DataFrame({
        "year": [2010, 2010, 2010], "city_code": ["110100"] * 3, "hs6": ["840110", "840120", "840130"],
        "value_usd": [100.0, 300.0, 50.0], "rqua": [0.2, 0.6, 0.9], "processing_share": [0.25, 1.0, 0.0],
    }).with_columns(pl.col("year").cast(pl.Int32))
    bec = pl.DataFrame({"hs_vintage": ["HS2007", "HS2007"], "hs6": ["840110", "840120"],
                        "goods_type": ["intermediate", "final"]})
    out, rep = m.subsample_quality(f, bec_map=bec)
    # value split: processing = 25 @0.2 + 300 @0.6; ordinary = 75 @0.2 + 50 @0.9
    assert out["processing"]["hs4_qua"].item() == pytest.approx((25 * 0.2 + 300 * 0.6) / 325)
    assert out["ordinary"]["hs4_qua"].item() == pytest.approx((75 * 0.2 + 50 * 0.9) / 125)
    assert out["intermediate"]["hs4_qua"].item() == pytest.approx(0.2)
    assert out["final"]["hs4_qua"].item() == pytest.approx(0.6)
    assert rep["n_flows_hs6_not_in_bec_map"] == 1 and rep["value_share_hs6_not_in_bec_map"] == pytest.approx(50 / 450)
    maj, _ = m.subsample_quality(f, trade_mode_rule="majority")
    assert maj["processing"]["hs4_qua"].item() == pytest.approx(0.6)
    assert maj["ordinary"]["hs4_qua"].item() == pytest.approx((100 * 0.2 + 50 * 0.9) / 150)
    pure, rp = m.subsample_quality(f, trade_mode_rule="pure_only")
    assert pure["ordinary"]["hs4_qua"].item() == pytest.approx(0.9) and rp["n_flows_mixed_left_out"] == 1
    cls = f.drop("processing_share").with_columns(pl.Series("trade_mode_class", ["ordinary", "processing", "other"]))
    byc, rc = m.subsample_quality(cls)
    assert byc["ordinary"]["hs4_qua"].item() == pytest.approx(0.2) and rc["n_flows_other_mode"] == 1


def test_table5_runs_each_subsample(sim):
    panel, _, _ = sim
    half = panel.filter(pl.col("hs4") < "8406")
    res = m.table5({"processing": half, "ordinary": panel})
    assert set(res.skipped) == {"(3)", "(4)"}
    t = res.tidy.filter(pl.col("term") == "vagg")
    assert t["sample"].to_list() == ["processing", "ordinary"] and t["n_obs"].to_list() == [half.height, panel.height]


# --------------------------------------------------------------------------------------------------
# Table 7 and Table 8: tiny hand cases
# --------------------------------------------------------------------------------------------------
def _tiny_grid(n_c=6, n_h=3, years=(2010, 2011, 2012, 2013)):
    rng = np.random.default_rng(11)
    cities = [f"3201{i:02d}" for i in range(1, n_c + 1)]
    cy = pl.DataFrame({"city_code": np.repeat(cities, len(years)), "year": np.tile(years, n_c)}).with_columns(
        pl.col("year").cast(pl.Int32), pl.Series("vagg", rng.normal(0, 1, n_c * len(years))))
    grid = cy.join(pl.DataFrame({"hs4": [f"{6100 + h}" for h in range(n_h)]}), how="cross")
    fe = (pl.col("city_code").cast(pl.Int64) % 7 * 0.3 + pl.col("hs4").cast(pl.Int64) % 5 * 0.2
          + (pl.col("year") - 2010) * 0.1)
    return cy, grid, fe


def test_table7_components_exact_hand_case():
    cy, grid, fe = _tiny_grid()
    slopes = {"within": 1.0, "between": -0.5, "entry": 2.0, "exit": 0.25}
    dec = grid.with_columns([(s * pl.col("vagg") + fe * (i + 1)).alias(k) for i, (k, s) in enumerate(slopes.items())])
    dec = dec.with_columns((pl.col("within") + pl.col("between") + pl.col("entry") + pl.col("exit")).alias("total"),
                           (pl.col("between") + pl.col("entry") + pl.col("exit")).alias("gap"))
    quality = dec.select("year", "city_code", "hs4", *m.DECOMP_COMPONENTS)
    panel, _ = m.build_analysis_panel(quality, m.assemble_city_year(cy))
    res = m.table7(panel, m.make_config(controls=()))
    got = {r["depvar"]: r["estimate"] for r in res.tidy.filter(pl.col("term") == "vagg").iter_rows(named=True)}
    want = {**slopes, "total": 2.75, "gap": 1.75}  # hand: sums of the planted slopes
    assert list(got) == list(m.DECOMP_COMPONENTS)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-9), k


def test_table7_linearity_with_noise(sim):
    panel, _, _ = sim
    rng = np.random.default_rng(5)
    p = panel.with_columns([pl.Series(k, rng.normal(0, 1, panel.height)) for k in ("within", "between", "entry", "exit")])
    p = p.with_columns((pl.col("within") + pl.col("between") + pl.col("entry") + pl.col("exit")).alias("total"),
                       (pl.col("between") + pl.col("entry") + pl.col("exit")).alias("gap"))
    got = {r["depvar"]: r["estimate"] for r in m.table7(p).tidy.filter(pl.col("term") == "vagg").iter_rows(named=True)}
    # OLS is linear in y on a common sample: the components add up exactly
    assert got["total"] == pytest.approx(got["within"] + got["between"] + got["entry"] + got["exit"], abs=1e-10)
    assert got["gap"] == pytest.approx(got["between"] + got["entry"] + got["exit"], abs=1e-10)


def test_table8_hand_case_levels_lag_and_coa():
    cy, grid, fe = _tiny_grid()
    lagv = cy.select("city_code", (pl.col("year") + 1).cast(pl.Int32).alias("year"), pl.col("vagg").alias("_lv"))
    cy2 = cy.join(lagv, on=["city_code", "year"], how="left")
    ce = pl.col("city_code").cast(pl.Int64) % 7 * 0.4 + (pl.col("year") - 2010) * 0.2
    rng = np.random.default_rng(2)
    cy2 = cy2.with_columns(
        (3.0 * pl.col("_lv") + ce).alias("minteg"),  # exact: minteg = 3 L.vagg + city + year
        (-1.5 * pl.col("vagg") + ce).alias("lnitff"),
        (0.5 * pl.col("vagg") + ce + pl.Series(rng.normal(0, 0.1, cy.height))).alias("lndiv"),
        (2.0 * pl.col("vagg") + ce + pl.Series(rng.normal(0, 0.1, cy.height))).alias("lnspe"),
        pl.Series("coa", rng.normal(0, 1, cy.height)), pl.Series("d_coa", rng.normal(0, 1, cy.height)),
    ).drop("_lv")
    city_year = m.assemble_city_year(cy2)
    q = grid.select("year", "city_code", "hs4").join(city_year.select("city_code", "year", "coa", "d_coa"),
                                                     on=["city_code", "year"])
    q = q.with_columns((0.5 * pl.col("coa") - 0.25 * pl.col("d_coa") + fe).alias("hs4_qua")).drop("coa", "d_coa")
    panel, _ = m.build_analysis_panel(q, city_year)
    res = m.table8(panel, city_year, m.make_config(controls=()))
    t = {(r["model"], r["term"]): r for r in res.tidy.iter_rows(named=True)}
    assert t[("(1)", "L_vagg")]["estimate"] == pytest.approx(3.0, abs=1e-9)
    assert t[("(1) city-year", "L_vagg")]["estimate"] == pytest.approx(3.0, abs=1e-9)
    assert t[("(2)", "vagg")]["estimate"] == pytest.approx(-1.5, abs=1e-9)
    # balanced panel (3 HS4 cells per city-year): duplication leaves the point estimate unchanged
    for k, term in (("(3)", "vagg"), ("(4)", "vagg")):
        assert t[(k, term)]["estimate"] == pytest.approx(t[(f"{k} city-year", term)]["estimate"], abs=1e-10)
        assert t[(k, term)]["n_obs"] == 3 * t[(f"{k} city-year", term)]["n_obs"]
    assert t[("(1)", "L_vagg")]["n_obs"] == panel.filter(pl.col("year") > 2010).height
    # (5)-(6): hs4_qua = 0.5 coa - 0.25 d_coa + FE; each regressor alone (coa_include_vagg false) -> compare
    # with a numpy OLS on the same design
    d = panel
    D = dummies(d, ["city_code", "year", "hs4"])
    b5, *_ = np.linalg.lstsq(np.column_stack([d["coa"].to_numpy(), D]), d["hs4_qua"].to_numpy(), rcond=None)
    assert t[("(5)", "coa")]["estimate"] == pytest.approx(b5[0], abs=1e-9)
    assert ("(5)", "vagg") not in t
    res_v = m.table8(panel, None, m.make_config(controls=(), coa_include_vagg=True))
    assert {r["term"] for r in res_v.tidy.filter(pl.col("model") == "(6)").iter_rows(named=True)} == {"d_coa", "vagg"}
    assert "no city-year frame" in res_v.skipped["(1) city-year"]


# --------------------------------------------------------------------------------------------------
# permutation placebo
# --------------------------------------------------------------------------------------------------
def test_placebo_fwl_equals_full_refits(sim):
    import pyfixest as pf
    from pyfixest.demeaners import MapDemeaner

    panel, _, _ = sim
    cfg = m.S004Config()
    spec = pb.placebo_spec(cfg)
    prep = m.prepare_sample(panel, spec.variables, spec.fe, cluster=spec.cluster)
    res = pb.permutation_placebo(prep, cfg, n_replications=3, seed=99, render=False)
    d = prep.frame
    x = d["vagg"].to_numpy()
    fml = "hs4_qua ~ vagg + " + " + ".join(CTL) + " | city_code + year + hs4"
    for r in range(3):
        xp = x[np.random.default_rng([99, r]).permutation(d.height)]  # the documented stream of replication r
        fit = pf.feols(fml, data=d.with_columns(pl.Series("vagg", xp)), vcov={"CRV1": "city_hs4"}, fixef_rm="none",
                       demeaner=MapDemeaner(fixef_tol=cfg.fixef_tol, fixef_maxiter=cfg.fixef_maxiter))
        row = res.draws.row(r, named=True)
        assert row["rep"] == r
        assert row["estimate"] == pytest.approx(float(fit.coef()["vagg"]), abs=1e-10)
        assert row["std_error"] == pytest.approx(float(fit.se()["vagg"]), abs=1e-10)
        assert row["t_stat"] == pytest.approx(float(fit.tstat()["vagg"]), abs=1e-8)
        assert row["p_value"] == pytest.approx(float(fit.pvalue()["vagg"]), abs=1e-10)
    s = res.summary
    assert s["fwl_check_abs_diff_estimate"] < 1e-10
    assert s["share_abs_t_ge_real"] == 0.0  # planted effect, t ~ 20: no permutation comes close
    assert s["published_mean_t"] == 0.2417


def test_placebo_city_year_scheme_and_workers(sim):
    import pyfixest as pf
    from pyfixest.demeaners import MapDemeaner

    panel, _, _ = sim
    cfg = m.make_config(placebo_permutation="city_year_level", controls=("fdi", "open"))
    spec = pb.placebo_spec(cfg)
    prep = m.prepare_sample(panel, spec.variables, spec.fe, cluster=spec.cluster)
    d = prep.frame
    plan = pb._plan(d["vagg"].to_numpy(), "city_year_level", d["_city"].to_numpy(), d["_year"].to_numpy())
    xp = pb.permute(plan, np.random.default_rng([7, 1]))
    pdf = d.with_columns(pl.Series("xp", xp))
    # constant within city-year, and the city-year values are a permutation of the original ones
    assert pdf.group_by("_city", "_year").agg(pl.col("xp").n_unique())["xp"].max() == 1
    orig = np.sort(d.group_by("_city", "_year").agg(pl.col("vagg").first())["vagg"].to_numpy())
    perm = np.sort(pdf.group_by("_city", "_year").agg(pl.col("xp").first())["xp"].to_numpy())
    assert np.array_equal(orig, perm)
    r1 = pb.permutation_placebo(prep, cfg, n_replications=6, seed=7, batch_size=2, render=False)
    fit = pf.feols("hs4_qua ~ vagg + fdi + open | city_code + year + hs4", data=pdf.with_columns(pl.col("xp").alias("vagg")),
                   vcov={"CRV1": "city_hs4"}, fixef_rm="none", demeaner=MapDemeaner(fixef_tol=cfg.fixef_tol))
    assert r1.draws.row(1, named=True)["estimate"] == pytest.approx(float(fit.coef()["vagg"]), abs=1e-10)
    r2 = pb.permutation_placebo(prep, cfg, n_replications=6, seed=7, batch_size=2, n_workers=2, render=False)
    assert r2.draws.equals(r1.draws)  # independent of workers and batching


def test_placebo_share_uniform_under_null():
    """Under H0 with x iid across rows, the real t is exchangeable with the row-level permutations:
    the permutation p-value (share of placebo |t| >= |t_real|) is uniform over datasets."""
    cfg = m.make_config(controls=())
    shares = []
    n_perm = 19
    for s in range(40):
        rng = np.random.default_rng([2024, s])
        n_c, n_h, n_t = 12, 4, 5
        c = np.repeat(np.arange(n_c), n_h * n_t)
        h = np.tile(np.repeat(np.arange(n_h), n_t), n_c)
        t = np.tile(np.arange(n_t), n_c * n_h)
        y = 0.5 * c / n_c + 0.2 * h + 0.1 * t + rng.normal(0, 1, c.size)
        df = pl.DataFrame({"city_code": [f"{110100 + 100 * k}" for k in c], "hs4": [f"{8400 + k}" for k in h],
                           "year": (2005 + t).astype(np.int32), "hs4_qua": y, "vagg": rng.normal(0, 1, c.size)})
        df = df.with_columns((pl.col("city_code") + "_" + pl.col("hs4")).alias("city_hs4"))
        r = pb.permutation_placebo(df, cfg, n_replications=n_perm, seed=s, render=False)
        shares.append(r.summary["share_abs_t_ge_real"])
    shares = np.array(shares)
    assert abs(shares.mean() - 0.5) < 0.15
    assert sps.kstest(shares, "uniform").pvalue > 0.001


def test_placebo_histogram_deterministic_png(sim):
    panel, _, _ = sim
    cfg = m.make_config(controls=("fdi",))
    r = pb.permutation_placebo(panel, cfg, n_replications=8, seed=1)
    assert r.png[:8] == b"\x89PNG\r\n\x1a\n" and b"Software" not in r.png
    again = pb.render_placebo_histogram(r.draws, r.summary)
    assert again == r.png


# --------------------------------------------------------------------------------------------------
# published values and rendering
# --------------------------------------------------------------------------------------------------
def test_published_yaml_matches_spec():
    pub = m.published_frame()
    g = {(r["table"], r["model"], r["term"]): r for r in pub.iter_rows(named=True)}
    # spot checks typed from spec S004 section 5
    assert (g[("table2", "(4)", "vagg")]["published"], g[("table2", "(4)", "vagg")]["published_std_error"]) == (0.3087, 0.0201)
    assert g[("table2", "(4)", "vagg")]["published_n_obs"] == 616591 and g[("table2", "(4)", "vagg")]["published_r2"] == 0.3262
    assert g[("table2", "(2)", "sci")]["published"] == 4.3661 and g[("table2", "(2)", "fixinv")]["published_stars"] == "**"
    assert g[("table2", "(1)", "vagg")]["published_n_obs"] == 624577
    assert (g[("table3", "(5)", "vagg")]["published"], g[("table3", "(5)", "vagg")]["published_std_error"]) == (13.776, 2.9166)
    assert g[("table3", "(5)", "vagg")]["published_r2"] == -0.7707
    assert g[("table3", "(3)", "L_vagg")]["published"] == 0.0991
    assert g[("table4", "(2)", "vagg")]["published_n_obs"] == 1455971
    assert g[("table4", "(7)", "vagg")]["published_std_error"] == 0.0548
    assert g[("table5", "(1)", "vagg")]["published"] == 0.0840 and g[("table5", "(1)", "vagg")]["published_stars"] == "**"
    assert g[("table6", "(4)", "vagg_x_mid")]["published"] == 0.0690
    assert g[("table6", "(1)", "vagg_x_centre")]["published_std_error"] == 0.0054
    assert (g[("table7", "(3)", "vagg")]["published"], g[("table7", "(3)", "vagg")]["published_std_error"]) == (0.4822, 0.1707)
    assert g[("table7", "(1)", "vagg")]["published_stars"] == "*"
    assert g[("table8", "(1)", "L_vagg")]["published"] == 20.5863 and g[("table8", "(1)", "L_vagg")]["published_n_obs"] == 575589
    assert g[("table8", "(6)", "d_coa")]["published"] == 0.0338
    doc = m.load_published()
    assert doc["table3"]["models"]["(5)"]["first_stage"]["wald_f"] == 42.751
    assert doc["table3"]["models"]["(6)"]["first_stage"]["lm"] == 1344.524
    assert doc["placebo"]["mean_coefficient"] == -0.0005


@pytest.mark.parametrize("fmt", ["markdown", "latex", "html"])
def test_render_all_formats(sim, fmt):
    panel, _, _ = sim
    t2 = m.table2(panel)
    t3 = m.table3(panel)
    out2 = m.render_s004(t2, "table2", fmt)
    out3 = m.render_s004(t3.tidy, "table3", fmt)
    assert "0.3087" in out2 and "published" in out2 and "fdi" in out2
    assert "First-stage F" in out3 and "Weak instrument" in out3 and "(6)" in out3
    if fmt == "latex":
        assert r"\begin{tabular}" in out2
    elif fmt == "html":
        assert out2.startswith("<!DOCTYPE html>")
    else:
        assert "| Observations |" in out2
