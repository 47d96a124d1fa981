"""Export quality (issue 5; spec S004 Eqs. 18-21): flows, sigma mapping, estimation, rqua, aggregation.

Expected numbers come from hand computation on tiny frames, from independent implementations
(numpy ``lstsq`` / statsmodels OLS with explicit dummy columns, a dummy-variable 2SLS, scipy
``lsqr``) or from the planted truth of the synthetic generator; never from the code's own output.
"""

from __future__ import annotations

import json
import math

import numpy as np
import polars as pl
import pytest

from kspill_pipeline.compute.quality import (
    QualityConfig,
    TwoWayFE,
    aggregate_quality,
    apply_rqua,
    drop_singletons,
    estimate_quality,
    map_sigma,
    normalise_rqua,
    quality_flows,
    rqua_bounds,
)

TOL = 1e-8


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def _dummies(codes: np.ndarray) -> np.ndarray:
    u, inv = np.unique(codes, return_inverse=True)
    D = np.zeros((len(codes), len(u)))
    D[np.arange(len(codes)), inv] = 1.0
    return D


def _lstsq_resid(y: np.ndarray, X: np.ndarray) -> np.ndarray:
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    return y - X @ coef


def _panel(seed: int = 3, n: int = 600, n_hs6: int = 14, n_dest: int = 9, years=(2010, 2011)) -> pl.DataFrame:
    """Random flows frame with the columns estimate_quality needs (no singleton cells by design)."""
    rng = np.random.default_rng(seed)
    hs6 = np.array([f"{c}{i:04d}" for c, i in zip(["84", "85", "61"] * 10, range(n_hs6))])[:n_hs6]
    dest = np.array([f"D{i:02d}" for i in range(n_dest)])
    h = rng.integers(0, n_hs6, n)
    d = rng.integers(0, n_dest, n)
    yr = rng.choice(np.array(years, dtype=np.int32), n)
    firm = rng.integers(0, 60, n)
    prov = rng.choice(np.array(["11", "31", "44", "51"]), n)
    ln_p = rng.normal(2, 1, n) + 0.3 * (firm % 5)
    loo = 0.6 * ln_p + rng.normal(0, 0.5, n)
    ln_q = 3 - 2.5 * ln_p + rng.normal(0, 1, n)
    return pl.DataFrame({
        "year": yr, "firm_id": [f"F{x:03d}" for x in firm], "province_code": prov,
        "hs6": hs6[h], "partner_iso3": dest[d], "ln_p": ln_p, "ln_q": ln_q, "ln_p_loo": loo,
        "value_usd": np.exp(rng.normal(8, 1, n)),
    }).with_row_index("row_id")


def _sigma_for(df: pl.DataFrame, seed: int = 5) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    codes = sorted(df["hs6"].unique().to_list())
    return pl.DataFrame({"hs6": codes, "sigma": rng.uniform(1.5, 9.0, len(codes))})


def _gdp(years=(2010, 2011)) -> pl.DataFrame:
    rows = [(p, y, 10 + 0.3 * i + 0.05 * (y - 2010) + 0.01 * i * i) for i, p in enumerate(["11", "31", "44", "51"])
            for y in years]
    return pl.DataFrame(rows, schema={"province_code": pl.String, "year": pl.Int32, "ln_gdp_real": pl.Float64},
                        orient="row")


def _design(pdf: pl.DataFrame, fe: str, gdp: bool) -> np.ndarray:
    a = pdf["hs6"].to_numpy() if fe == "hs6+dest_year" else (pdf["hs6"] + pdf["year"].cast(pl.String)).to_numpy()
    b = (pdf["partner_iso3"] + pdf["year"].cast(pl.String)).to_numpy()
    cols = [_dummies(a), _dummies(b)]
    if gdp:
        cols.append(pdf["ln_gdp_real"].to_numpy()[:, None])
    return np.hstack(cols)


# ------------------------------------------------------------------------------------------------
# variant A equals an independent dummy-variable least squares (1e-8)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fe", ["hs6+dest_year", "hs6_year+dest_year"])
@pytest.mark.parametrize("gdp", [False, True])
@pytest.mark.parametrize("solver", ["dense", "sparse_lu"])
def test_variant_a_equals_dummy_lstsq(fe, gdp, solver):
    """y = ln q + sigma_h ln p on explicit HS6 (or HS6 x year) and dest x year dummies [+ ln GDP]
    solved by numpy lstsq; residual / (sigma_h - 1) must equal qua to 1e-8."""
    df = _panel()
    sig = _sigma_for(df)
    cfg = QualityConfig(fixed_effects=fe, solver=solver, singletons="drop")
    fit = estimate_quality(df, sig, cfg, prov_gdp=_gdp() if gdp else None)
    out = fit.flows
    assert out["row_id"].to_list() == df["row_id"].to_list()  # row order preserved
    ok = out.filter(pl.col("est_status") == "ok")
    assert ok.height == df.height - fit.report["n_singletons"]
    pdf = ok
    y = (pdf["ln_q"] + pdf["sigma"] * pdf["ln_p"]).to_numpy()
    e = _lstsq_resid(y, _design(pdf, fe, gdp))
    expect = e / (pdf["sigma"].to_numpy() - 1)
    np.testing.assert_allclose(ok["resid"].to_numpy(), e, atol=TOL, rtol=0)
    np.testing.assert_allclose(ok["qua"].to_numpy(), expect, atol=TOL, rtol=0)
    assert fit.report["gdp_control_used"] is gdp


def test_variant_a_grouped_equals_separate_regressions():
    """grouping = by_hs2: one dummy regression per HS2 chapter (own dest x year effects and own GDP
    slope), each solved by lstsq, equals the single interacted solve."""
    df = _panel(seed=11, n=900)
    sig = _sigma_for(df)
    fit = estimate_quality(df, sig, QualityConfig(grouping="by_hs2"), prov_gdp=_gdp())
    ok = fit.flows.filter(pl.col("est_status") == "ok")
    assert fit.report["n_groups"] == 3
    for (ch,), part in ok.group_by(pl.col("hs6").str.slice(0, 2)):
        part = part.sort("row_id")
        y = (part["ln_q"] + part["sigma"] * part["ln_p"]).to_numpy()
        e = _lstsq_resid(y, _design(part, "hs6+dest_year", True))
        np.testing.assert_allclose(part["resid"].to_numpy(), e, atol=TOL, rtol=0, err_msg=ch)


# ------------------------------------------------------------------------------------------------
# variant B equals a dummy-variable 2SLS; first-stage F equals statsmodels t^2
# ------------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:The design matrix is rank-deficient")
@pytest.mark.parametrize("gdp", [False, True])
def test_variant_b_equals_dummy_2sls_and_first_stage_f(gdp):
    sm = pytest.importorskip("statsmodels.api")
    df = _panel(seed=7, n=700)
    sig = _sigma_for(df)
    fit = estimate_quality(df, sig, QualityConfig(variant="B_2sls_loo_price_iv"), prov_gdp=_gdp() if gdp else None)
    ok = fit.flows.filter(pl.col("est_status") == "ok")
    W = _design(ok, "hs6+dest_year", False)
    y = ok["ln_q"].to_numpy()
    x = ok["ln_p"].to_numpy()
    z = ok["ln_p_loo"].to_numpy()
    exog = [ok["ln_gdp_real"].to_numpy()[:, None]] if gdp else []
    Zf = np.hstack([z[:, None], *exog, W])
    xhat = Zf @ np.linalg.lstsq(Zf, x, rcond=None)[0]
    X2 = np.hstack([xhat[:, None], *exog, W])
    c2 = np.linalg.lstsq(X2, y, rcond=None)[0]
    yhat = X2 @ c2
    # structural residual: y - b x - (exog, FE part of the second-stage fit)
    resid = y - c2[0] * x - (yhat - c2[0] * xhat)
    np.testing.assert_allclose(ok["resid"].to_numpy(), resid, atol=TOL, rtol=0)
    np.testing.assert_allclose(ok["qua"].to_numpy(), resid / (ok["sigma"].to_numpy() - 1), atol=TOL, rtol=0)
    assert fit.report["price_coef"][0] == pytest.approx(c2[0], abs=1e-9)
    ols = sm.OLS(x, Zf).fit()
    assert fit.report["first_stage_F"][0] == pytest.approx(ols.tvalues[0] ** 2, rel=1e-7)


def test_variant_b_no_instrument_rows_flagged():
    df = _panel(seed=2, n=300).with_columns(
        pl.when(pl.col("row_id") % 10 == 0).then(None).otherwise(pl.col("ln_p_loo")).alias("ln_p_loo"))
    fit = estimate_quality(df, _sigma_for(df), QualityConfig(variant="B_2sls_loo_price_iv"))
    st = fit.flows.select("row_id", "est_status", "qua")
    no_iv = st.filter(pl.col("row_id") % 10 == 0)
    assert set(no_iv["est_status"]) == {"no_loo_iv"} and no_iv["qua"].null_count() == no_iv.height


# ------------------------------------------------------------------------------------------------
# singletons: dropped rows get a null quality and a reason, never a shifted residual
# ------------------------------------------------------------------------------------------------
def test_drop_singletons_iterates_hand_case():
    """a = product, b = destination-year. Row 0 is alone in product P9 -> dropped; that leaves row 1
    alone in destination X -> dropped; that leaves row 2 alone in product P8 -> dropped. Rows 3-6
    form a 2 x 2 block that survives."""
    a = np.array([9, 8, 8, 1, 1, 2, 2])
    b = np.array([7, 7, 6, 1, 2, 1, 2])  # b=7 holds rows 0,1; b=6 holds row 2 only
    keep = drop_singletons([a, b])
    assert keep.tolist() == [False, False, False, True, True, True, True]


def test_singleton_rows_aligned_after_shuffle():
    """Append planted singleton chains to a panel, shuffle, estimate: the planted rows (and only
    rows whose FE cells are singletons) get est_status 'singleton' and null qua; every other row's
    residual equals lstsq on the non-singleton sample, matched by row_id (not by position)."""
    base = _panel(seed=21, n=500)
    extra = pl.DataFrame({
        "row_id": pl.Series([10_000, 10_001, 10_002], dtype=pl.UInt32),
        "year": pl.Series([2010, 2010, 2011], dtype=pl.Int32),
        "firm_id": ["S1", "S2", "S3"], "province_code": ["11", "11", "11"],
        # 10_000: new product, known destination -> singleton by product
        # 10_001/10_002: new product 999998 twice, each with a new destination-year -> both
        #   singletons by destination; then 999998 is gone too
        "hs6": ["999999", "999998", "999998"], "partner_iso3": ["D01", "NEW", "NEW"],
        "ln_p": [1.0, 2.0, 3.0], "ln_q": [5.0, 4.0, 3.0], "ln_p_loo": [1.0, 1.0, 1.0],
        "value_usd": [1.0, 1.0, 1.0],
    })
    df = pl.concat([base, extra]).sample(fraction=1.0, shuffle=True, seed=5)
    sig = _sigma_for(df)
    fit = estimate_quality(df, sig, QualityConfig())
    out = fit.flows
    assert out["row_id"].to_list() == df["row_id"].to_list()
    sing = out.filter(pl.col("est_status") == "singleton")
    assert {10_000, 10_001, 10_002} <= set(sing["row_id"].to_list())
    assert sing["qua"].null_count() == sing.height and sing["resid"].null_count() == sing.height
    # independent singleton rule on the same rows
    keep_ref = drop_singletons([_codes(df["hs6"]), _codes(df["partner_iso3"] + df["year"].cast(pl.String))])
    assert (out["est_status"] == "ok").to_numpy().tolist() == keep_ref.tolist()
    ok = out.filter(pl.col("est_status") == "ok").sort("row_id")
    y = (ok["ln_q"] + ok["sigma"] * ok["ln_p"]).to_numpy()
    e = _lstsq_resid(y, _design(ok, "hs6+dest_year", False))
    np.testing.assert_allclose(ok["resid"].to_numpy(), e, atol=TOL, rtol=0)
    # keep: a singleton's own FE absorbs it exactly, residual 0; others unchanged
    kept = estimate_quality(df, sig, QualityConfig(singletons="keep")).flows
    k_s = kept.filter(pl.col("row_id").is_in(sing["row_id"].to_list()))
    np.testing.assert_allclose(k_s["resid"].to_numpy(), 0.0, atol=1e-9)
    k_ok = kept.filter(pl.col("row_id").is_in(ok["row_id"].to_list())).sort("row_id")
    np.testing.assert_allclose(k_ok["resid"].to_numpy(), e, atol=TOL, rtol=0)


def _codes(s: pl.Series) -> np.ndarray:
    return np.unique(s.to_numpy(), return_inverse=True)[1]


def test_two_way_fe_disconnected_components():
    """Two disconnected blocks (no product or destination shared): rank = n_a + n_b - 2, and the
    projection equals lstsq with all dummies (rank-deficient design)."""
    rng = np.random.default_rng(0)
    a = np.r_[rng.integers(0, 5, 60), rng.integers(5, 9, 50)]
    b = np.r_[rng.integers(0, 4, 60), rng.integers(4, 10, 50)]
    Y = rng.normal(size=(110, 2))
    for solver in ("dense", "sparse_lu"):
        fe = TwoWayFE(a, b, solver=solver)
        assert fe.n_components == 2
        assert fe.rank == len(np.unique(a)) + len(np.unique(b)) - 2
        X = np.hstack([_dummies(a), _dummies(b)])
        assert fe.rank == np.linalg.matrix_rank(X)
        R = fe.residualise(Y)
        for j in range(2):
            np.testing.assert_allclose(R[:, j], _lstsq_resid(Y[:, j], X), atol=1e-10)


def test_sample_statuses_sigma_and_control():
    df = _panel(seed=4, n=300)
    codes = sorted(df["hs6"].unique().to_list())
    sig = pl.DataFrame({"hs6": codes[1:], "sigma": [0.8] + [3.0] * (len(codes) - 2)})  # codes[0] none, codes[1] <= 1
    gdp = _gdp().filter(pl.col("province_code") != "51")
    fit = estimate_quality(df, sig, QualityConfig(), prov_gdp=gdp)
    f = fit.flows
    assert set(f.filter(pl.col("hs6") == codes[0])["est_status"]) == {"no_sigma"}
    assert set(f.filter(pl.col("hs6") == codes[1])["est_status"]) == {"sigma_le_1"}
    rest = f.filter(~pl.col("hs6").is_in(codes[:2]))
    assert set(rest.filter(pl.col("province_code") == "51")["est_status"]) == {"no_control"}
    assert f.filter(pl.col("est_status") != "ok")["qua"].null_count() == f.filter(pl.col("est_status") != "ok").height
    with pytest.raises(ValueError, match="required"):
        estimate_quality(df, sig, QualityConfig(gdp_control="required"))


# ------------------------------------------------------------------------------------------------
# flows: unit rule, exclusions, trimming, accounting, instrument
# ------------------------------------------------------------------------------------------------
def _tc(rows: list[dict]) -> pl.DataFrame:
    base = {"year": 2010, "firm_id": "F1", "city_code": "110100", "flow": "export", "hs6": "847130",
            "partner_iso3": "USA", "trade_mode_class": "ordinary", "value_usd": 100.0, "quantity": 10.0,
            "unit": "台", "source_rows": 1.0, "intermediary_keywords": [], "is_intermediary": False}
    return pl.DataFrame([{**base, **r} for r in rows], schema={
        "year": pl.Int32, "firm_id": pl.String, "city_code": pl.String, "flow": pl.String, "hs6": pl.String,
        "partner_iso3": pl.String, "trade_mode_class": pl.String, "value_usd": pl.Float64,
        "quantity": pl.Float64, "unit": pl.String, "source_rows": pl.Float64,
        "intermediary_keywords": pl.List(pl.String), "is_intermediary": pl.Boolean})


def test_flows_unit_rule_exclusions_and_accounting():
    rows = [
        # HS6 847130: unit 台 carries 100+200+50+80+30 = 460 of value, 千克 300 -> 台 is the HS6 unit
        {"value_usd": 100.0, "quantity": 10.0},                                            # F1 USA
        {"value_usd": 200.0, "quantity": 5.0, "trade_mode_class": "processing"},           # F1 USA (same flow)
        {"value_usd": 50.0, "quantity": 2.0, "partner_iso3": "JPN"},                       # F1 JPN
        {"value_usd": 300.0, "quantity": 30.0, "unit": "千克", "partner_iso3": "DEU"},     # mixed_unit
        {"value_usd": 40.0, "quantity": None, "partner_iso3": "KOR"},                      # no_quantity
        {"value_usd": 45.0, "quantity": 0.0, "partner_iso3": "FRA"},                       # no_quantity
        {"value_usd": 70.0, "firm_id": "F9", "intermediary_keywords": ["进出口"]},         # intermediary
        {"value_usd": 80.0, "firm_id": "F8", "intermediary_keywords": ["物流"]},           # not an S004 keyword
        {"value_usd": 90.0, "hs6": "100630"},                                              # ag_resource_hs
        {"value_usd": 60.0, "flow": "import"},                                             # not counted
        # F1 also exports from a second city (smaller value): flows take the main city 110100
        {"value_usd": 30.0, "quantity": 3.0, "city_code": "120100", "partner_iso3": "JPN"},
    ]
    tc = _tc(rows)
    cfg = QualityConfig(min_obs_per_hs6=0, trim_percentiles=None)
    kept, quar, acc = quality_flows(tc, cfg)
    assert acc["rows_in"] == 10 and acc["value_in"] == pytest.approx(1005.0)
    assert acc["rows_kept"] + acc["rows_quarantined"] == 10
    assert acc["value_kept"] + acc["value_quarantined"] == pytest.approx(1005.0)
    assert dict(zip(*np.unique(quar["reason"].to_numpy(), return_counts=True))) == {
        "mixed_unit": 1, "no_quantity": 2, "intermediary": 1, "ag_resource_hs": 1}
    assert acc["by_reason"]["no_quantity"] == 2 and acc["by_reason_value"]["no_quantity"] == pytest.approx(85.0)
    k = {(r["firm_id"], r["partner_iso3"]): r for r in kept.iter_rows(named=True)}
    assert set(k) == {("F1", "USA"), ("F1", "JPN"), ("F8", "USA")}
    usa = k[("F1", "USA")]
    assert usa["value_usd"] == 300.0 and usa["quantity"] == 15.0 and usa["unit_value"] == pytest.approx(20.0)
    assert usa["n_rows"] == 2 and usa["processing_share"] == pytest.approx(2 / 3)
    assert usa["ln_p"] == pytest.approx(math.log(20.0)) and usa["ln_q"] == pytest.approx(math.log(15.0))
    jpn = k[("F1", "JPN")]
    assert jpn["value_usd"] == 80.0 and jpn["quantity"] == 5.0 and jpn["city_code"] == "110100"
    # leave-one-destination-out mean ln p of F1 in 847130: USA sees JPN's ln 16, JPN sees USA's ln 20
    assert usa["n_dest"] == 2 and usa["ln_p_loo"] == pytest.approx(math.log(16.0))
    assert jpn["ln_p_loo"] == pytest.approx(math.log(20.0))
    assert k[("F8", "USA")]["ln_p_loo"] is None  # one destination: no instrument
    # is_intermediary instead of the S004 list: F8 (物流 flagged by the cleaning's list) goes too
    tc2 = tc.with_columns(pl.col("firm_id").is_in(["F8", "F9"]).alias("is_intermediary"))
    kept2, quar2, _ = quality_flows(tc2, cfg.model_copy(update={"intermediary_keywords": None}))
    assert (quar2["reason"] == "intermediary").sum() == 2


def test_flows_min_obs_and_trimming_accounting():
    """HS6 A: 250 flows with distinct unit values 1..250: k = floor(250 x 1%) = 2 flows go at each
    tail (unit values 1, 2, 249, 250). HS6 B: 120 flows, 119 of unit value 5 and one of 7:
    k = floor(1.2) = 1 at each tail, lower bound x_(1) = 5 trims nothing (ties), upper bound
    x_(118) = 5 trims the 7. HS6 C: 30 flows < min_obs 50 -> all min_obs_hs6. Each flow is two
    trade_clean rows, so quarantined rows = 2 x flows."""
    rows = []
    for i in range(250):
        for half in (0, 1):
            rows.append({"hs6": "847130", "firm_id": f"A{i}", "value_usd": (i + 1) * 5.0, "quantity": 5.0,
                         "trade_mode_class": ["ordinary", "processing"][half]})
    for i in range(120):
        for half in (0, 1):
            rows.append({"hs6": "851712", "firm_id": f"B{i}", "value_usd": (7.0 if i == 60 else 5.0),
                         "quantity": 1.0, "unit": "个"})
    for i in range(30):
        rows.append({"hs6": "610910", "firm_id": f"C{i}", "value_usd": 10.0, "quantity": 1.0, "unit": "件"})
        rows.append({"hs6": "610910", "firm_id": f"C{i}", "value_usd": 10.0, "quantity": 1.0, "unit": "件"})
    tc = _tc(rows)
    kept, quar, acc = quality_flows(tc, QualityConfig(min_obs_per_hs6=50))
    trimmed = quar.filter(pl.col("reason") == "unit_value_trim")
    a_trim = sorted(set((trimmed.filter(pl.col("hs6") == "847130")["value_usd"] * 2 / 10).to_list()))
    assert a_trim == [1.0, 2.0, 249.0, 250.0]
    assert trimmed.filter(pl.col("hs6") == "847130").height == 8
    b_trim = trimmed.filter(pl.col("hs6") == "851712")
    assert b_trim.height == 2 and set(b_trim["value_usd"]) == {7.0}
    assert quar.filter(pl.col("reason") == "min_obs_hs6").height == 60
    assert kept.filter(pl.col("hs6") == "847130").height == 246
    assert kept.filter(pl.col("hs6") == "851712").height == 119
    assert acc["rows_kept"] + acc["rows_quarantined"] == acc["rows_in"] == len(rows)
    assert acc["value_kept"] + acc["value_quarantined"] == pytest.approx(acc["value_in"], rel=1e-12)
    assert acc["flows_dropped"] == 4 + 1 + 30
    # trimming off keeps every flow of A and B
    kept0, _, _ = quality_flows(tc, QualityConfig(min_obs_per_hs6=50, trim_percentiles=None))
    assert kept0.height == 250 + 120


# ------------------------------------------------------------------------------------------------
# sigma mapping
# ------------------------------------------------------------------------------------------------
def test_map_sigma_concordance_unmatched_and_le1(shared_data):
    """HS2007 -> HS1992 (Broda-Weinstein vintage). The UN 1:1 table (shared data
    hs_concordance/hs3_to_hs0.csv, independent of the Growth Lab weights of the layer) gives
    847130 -> 847120 (HS3 847), 851712 -> 852520 (HS3 852: the HS3 changes), 610910 -> 610910.
    Table: 847 -> 3.5, 852 -> 0.9 (flagged), no 610 -> unmatched."""
    un = pl.read_csv(shared_data / "hs_concordance" / "hs3_to_hs0.csv", infer_schema=False)
    m = dict(zip(un["source_6d"], un["target_6d"]))
    assert (m["847130"], m["851712"], m["610910"]) == ("847120", "852520", "610910")
    table = pl.DataFrame({"hs3": ["847", "852", "851"], "sigma": [3.5, 0.9, 7.0]})
    sm = map_sigma(table, "HS1992", "HS2007", hs6_codes=["847130", "851712", "610910"])
    got = {r["hs6"]: (r["hs3_source"], r["sigma"], r["sigma_status"]) for r in sm.table.iter_rows(named=True)}
    assert got["847130"] == ("847", 3.5, "ok")
    assert got["851712"] == ("852", 0.9, "sigma_le_1")
    assert got["610910"] == ("610", None, "unmatched")
    assert sm.report["n_unmatched"] == 1 and sm.report["unmatched_hs6"] == ["610910"]
    assert sm.report["unmatched_hs3"] == ["610"] and sm.report["sigma_le_1_hs6"] == ["851712"]
    assert sm.report["match_rate"] == pytest.approx(2 / 3)


def test_map_sigma_value_split_weighted_mean():
    """071410 (HS2007) splits into HS1992 071410 (HS3 071) and 200899 (HS3 200) plus negligible
    codes: sigma = sum_w w sigma over the matched HS3s / sum of their weights."""
    from kspill_pipeline.reference.hs import concordance

    rows = concordance("HS2007", "HS1992", "value_split").filter(pl.col("source_hs6") == "071410")
    w = rows.with_columns(pl.col("target_hs6").str.slice(0, 3).alias("h3")).group_by("h3").agg(pl.col("weight").sum())
    wd = dict(zip(w["h3"], w["weight"]))
    expect = (wd["071"] * 2.0 + wd["200"] * 5.0) / (wd["071"] + wd["200"])
    sm = map_sigma(pl.DataFrame({"hs3": ["071", "200"], "sigma": [2.0, 5.0]}), "HS1992", "HS2007",
                   hs6_codes=["071410"], mode="value_split")
    r = sm.table.row(0, named=True)
    assert r["sigma"] == pytest.approx(expect, rel=1e-12) and r["hs3_source"] == "071"


def test_map_sigma_bad_tables():
    with pytest.raises(ValueError, match="row 2: sigma"):
        map_sigma(pl.DataFrame({"hs3": ["847", "848"], "sigma": [2.0, float("nan")]}), "HS2007", "HS2007")
    with pytest.raises(ValueError, match="occurs more than once"):
        map_sigma(pl.DataFrame({"hs3": ["847", "847"], "sigma": [2.0, 3.0]}), "HS2007", "HS2007")
    with pytest.raises(ValueError, match="set sigma_country"):
        map_sigma(pl.DataFrame({"country_code": ["USA", "CHN"], "hs3": ["847", "847"], "sigma": [2.0, 3.0]}),
                  "HS2007", "HS2007")


# ------------------------------------------------------------------------------------------------
# rqua (Eq. 20) and aggregation (Eq. 21)
# ------------------------------------------------------------------------------------------------
def test_rqua_hand_computed_windows_and_degenerate():
    q = pl.DataFrame({
        "year": [2010, 2010, 2011, 2010, 2011, 2011],
        "hs6": ["A", "A", "A", "B", "C", "C"],
        "qua": [-1.0, 0.0, 3.0, 0.7, None, 2.0],
    })
    r = normalise_rqua(q, "all_years")
    # A: min -1, max 3 -> (-1, 0, 3) -> 0, 0.25, 1; B: one value -> null; C: one non-null -> null
    assert r["rqua"].to_list() == [0.0, 0.25, 1.0, None, None, None]
    r_mid = normalise_rqua(q, "all_years", degenerate="midpoint")
    assert r_mid["rqua"].to_list() == [0.0, 0.25, 1.0, 0.5, None, 0.5]
    r_y = normalise_rqua(q, "per_year")
    # A 2010: min -1 max 0 -> 0, 1; A 2011 alone -> null
    assert r_y["rqua"].to_list() == [0.0, 1.0, None, None, None, None]
    b = rqua_bounds(q.lazy(), "all_years")
    assert b.filter(pl.col("hs6") == "A").row(0) == ("A", -1.0, 3.0, 3)
    assert apply_rqua(q, b)["rqua"].to_list() == r["rqua"].to_list()
    vals = r["rqua"].drop_nulls()
    assert vals.min() >= 0 and vals.max() <= 1


def test_aggregation_hand_weights():
    f = pl.DataFrame({
        "year": [2010] * 5,
        "firm_id": ["F1", "F1", "F2", "F2", "F3"],
        "city_code": ["110100", "110100", "110100", "110100", "310100"],
        "hs6": ["847130", "847130", "847141", "847130", "847130"],
        "partner_iso3": ["USA", "JPN", "USA", "USA", "USA"],
        "value_usd": [1.0, 3.0, 4.0, 2.0, 5.0],
        "rqua": [0.2, 0.6, 0.9, None, 0.4],
    })
    firm, ck = aggregate_quality(f, "firm_hs6")
    d = {(r["firm_id"], r["hs6"]): r for r in firm.iter_rows(named=True)}
    assert d[("F1", "847130")]["firm_hs6_qua"] == pytest.approx(0.25 * 0.2 + 0.75 * 0.6)  # 0.5
    assert ("F2", "847130") not in d  # only an unrated flow
    assert ck["passed"] and ck["max_abs_weight_sum_minus_1"] <= 1e-12
    c6, ck6 = aggregate_quality(f, "city_hs6")
    d6 = {(r["city_code"], r["hs6"]): r for r in c6.iter_rows(named=True)}
    assert d6[("110100", "847130")]["hs6_qua"] == pytest.approx(0.5)
    assert d6[("110100", "847130")]["value_usd"] == 4.0 and d6[("110100", "847130")]["value_usd_all"] == 6.0
    c4, ck4 = aggregate_quality(f, "city_hs4")
    d4 = {(r["city_code"], r["hs4"]): r for r in c4.iter_rows(named=True)}
    # 110100 x 8471: rated values 1, 3, 4 -> (0.2 + 1.8 + 3.6) / 8 = 0.7
    assert d4[("110100", "8471")]["hs4_qua"] == pytest.approx(0.7)
    assert d4[("110100", "8471")]["n_flows"] == 3 and d4[("110100", "8471")]["n_firms"] == 2
    assert d4[("310100", "8471")]["hs4_qua"] == pytest.approx(0.4)
    for c in (ck, ck6, ck4):
        assert c["passed"]
    assert all(abs(x - 1) <= 1e-12 for x in c4["weight_sum"].to_list())


def test_aggregation_weights_sum_to_one_random():
    rng = np.random.default_rng(1)
    n = 5000
    f = pl.DataFrame({
        "year": [2012] * n, "firm_id": rng.integers(0, 300, n).astype(str),
        "city_code": rng.choice(["110100", "310100", "440100"], n),
        "hs6": rng.choice([f"{h}{i:02d}" for h in ("8471", "8517", "6109") for i in range(10, 15)], n),
        "value_usd": np.exp(rng.normal(10, 3, n)), "rqua": rng.uniform(0, 1, n),
    })
    for level in ("firm_hs6", "city_hs6", "city_hs4"):
        agg, ck = aggregate_quality(f, level)
        assert ck["passed"] and ck["n_cells"] == agg.height > 0
        qn = {"firm_hs6": "firm_hs6_qua", "city_hs6": "hs6_qua", "city_hs4": "hs4_qua"}[level]
        assert agg[qn].min() >= 0 and agg[qn].max() <= 1


# ------------------------------------------------------------------------------------------------
# synthetic universe: planted quality recovered
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_clean(tiny_universe) -> pl.DataFrame:
    from kspill_pipeline.compute.cleaning import clean_customs
    from kspill_pipeline.config import CleaningConfig
    from kspill_pipeline.io.raw import discover_files, read_customs_file

    out = []
    for year, files in sorted(discover_files(tiny_universe).items()):
        frames = []
        for f in files:
            rf = read_customs_file(f, tiny_universe)
            frames.append(rf.df.with_columns(pl.lit(rf.numeric_hs).alias("source_numeric_hs")))
        out.append(clean_customs(pl.concat(frames, how="vertical_relaxed"), year, CleaningConfig()).clean)
    return pl.concat(out)


def test_planted_quality_recovered_tiny(tiny_universe, tiny_clean):
    r"""Variant A on the tiny universe (all years pooled, HS6 + destination x year effects) recovers
    the planted ln lambda up to the noise the generator adds.

    Derivation (numbers from ``_truth/planted.json``, "ces"): the generator draws
    ``ln q = a_h + delta_{d,t} - sigma_h ln p + (sigma_h - 1) ln_lambda + e``, ``e ~ N(0, s^2)``,
    ``s = quantity_noise_sd = 0.1``; ``ln p`` is observed (value rounded to 1 USD and quantity to
    0.001 on values of ~10^3-10^5: negligible). So ``y = ln q + sigma_h ln p = a_h + delta_{d,t} +
    (sigma_h - 1) ln_lambda + e`` exactly, and with ``M`` the annihilator of the FE dummies on the
    estimation sample, ``qua = t + u`` with the identifiable part ``t = M[(sigma - 1) ln_lambda] /
    (sigma - 1)`` (computed here from the truth by numpy lstsq with explicit dummies) and the noise
    ``u = (M e) / (sigma - 1)``, ``E u_i^2 = s^2 (1 - h_ii) / (sigma_i - 1)^2`` (``h_ii`` the leverage
    of the dummy design). With ``S = var(t)`` and ``N = mean(E u_i^2)``, a bivariate normal gives the
    attainable Pearson ``rho* = sqrt(S / (S + N))`` and Spearman ``(6/pi) asin(rho*/2)``. The test
    asserts (i) the Spearman correlation with ``t`` is at least that bound minus 0.005 (the sampling
    error of a Spearman near 0.998 with n ~ 2,800 is ~1e-4), and (ii) var(qua - t) is within 15 % of
    N (a variance with ~2,300 residual degrees of freedom has a relative SE of ~3 %). The
    correlation with the raw ln_lambda is lower because the fixed effects absorb the HS6 and
    destination-year means of quality; it must not fall below the raw correlation of ``t`` itself.
    """
    from scipy.stats import spearmanr

    planted = json.loads((tiny_universe / "_truth" / "planted.json").read_text(encoding="utf-8"))
    s_noise = planted["ces"]["quantity_noise_sd"]
    truth = (
        pl.read_parquet(tiny_universe / "_truth" / "quality.parquet")
        .group_by("year", "firm_id", "hs6", "partner_iso3")
        .agg(((pl.col("ln_lambda") * pl.col("value_usd")).sum() / pl.col("value_usd").sum()).alias("lam"))
    )
    cfg = QualityConfig(min_obs_per_hs6=0, exclude_hs2=[])
    kept, _, acc = quality_flows(tiny_clean, cfg)
    assert acc["identity_rows_ok"] and acc["identity_value_ok"]
    sig = pl.read_csv(tiny_universe / "companion" / "sigma_hs3.csv", schema_overrides={"hs3": pl.String})
    sm = map_sigma(sig, "HS2007", "HS2007", hs6_codes=kept["hs6"].unique())
    assert sm.report["n_unmatched"] == 0
    fit = estimate_quality(kept, sm, cfg)
    d = fit.flows.filter(pl.col("est_status") == "ok").join(
        truth, on=["year", "firm_id", "hs6", "partner_iso3"], how="left", maintain_order="left")
    assert d.height > 2000 and d["lam"].null_count() == 0
    # the planted sigma is the one used
    X = _design(d, "hs6+dest_year", False)
    sg = d["sigma"].to_numpy()
    target = (sg - 1) * d["lam"].to_numpy()
    t = _lstsq_resid(target, X) / (sg - 1)
    # leverage h_ii of the dummy design: drop one destination-year dummy (one connected component,
    # so the rest has full column rank; Cholesky fails loudly otherwise)
    n_a = d["hs6"].n_unique()
    Xr = np.delete(X, n_a, axis=1)
    L = np.linalg.cholesky(Xr.T @ Xr)
    Wm = np.linalg.solve(L, Xr.T)
    h = np.einsum("ij,ij->i", Wm.T, Wm.T)
    assert abs(h.sum() - Xr.shape[1]) < 1e-6  # trace of the hat matrix = rank
    N = float(np.mean(s_noise**2 * (1 - h) / (sg - 1) ** 2))
    S = float(np.var(t))
    rho = math.sqrt(S / (S + N))
    rho_s = 6 / math.pi * math.asin(rho / 2)
    qua = d["qua"].to_numpy()
    got = spearmanr(qua, t).statistic
    print(f"planted recovery: spearman(qua, t) {got:.4f} bound {rho_s:.4f}; var(qua - t) {np.var(qua - t):.8f} "
          f"N {N:.8f}; spearman(qua, ln_lambda) {spearmanr(qua, d['lam'].to_numpy()).statistic:.4f}; n {d.height}")
    assert got >= rho_s - 0.005, (got, rho_s)
    assert abs(np.var(qua - t) / N - 1) < 0.15, (np.var(qua - t), N)
    raw = spearmanr(qua, d["lam"].to_numpy()).statistic
    assert raw >= spearmanr(t, d["lam"].to_numpy()).statistic - 0.01
    assert raw > 0.7


# ------------------------------------------------------------------------------------------------
# real data: BACI (ZAF, AFG exports 2021, HS1992) with the Broda-Weinstein sigmas
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def baci(shared_data):
    b = pl.read_csv(shared_data / "baci_hs92_2021_zaf_afg" / "flows.csv",
                    schema_overrides={"hs6": pl.String, "exporter": pl.String, "importer": pl.String})
    tc = b.select(
        pl.col("year").cast(pl.Int32), pl.col("exporter").alias("firm_id"), pl.lit("000000").alias("city_code"),
        pl.lit("export").alias("flow"), "hs6", pl.col("importer").alias("partner_iso3"),
        pl.lit("ordinary").alias("trade_mode_class"), (pl.col("value_kusd") * 1000).alias("value_usd"),
        pl.col("quantity_tons").alias("quantity"), pl.lit("t").alias("unit"), pl.lit(1.0).alias("source_rows"),
        pl.lit([], dtype=pl.List(pl.String)).alias("intermediary_keywords"), pl.lit(False).alias("is_intermediary"),
    )
    cfg = QualityConfig(min_obs_per_hs6=0, exclude_hs2=[], study_vintage="HS1992")
    flows = quality_flows(tc, cfg)
    sig = pl.read_csv(shared_data / "elasticities" / "bgw_sigma_hs3.csv", schema_overrides={"hs3": pl.String})
    sm = map_sigma(sig, cfg.sigma_vintage, cfg.study_vintage, hs6_codes=flows.kept["hs6"].unique(),
                   country=cfg.sigma_country)
    fit = estimate_quality(flows.kept, sm, cfg)
    return flows, sm, fit


def test_baci_flows_and_sigma_merge(baci):
    flows, sm, fit = baci
    acc = flows.accounting
    # README of the shared data: 71,192 rows, 2,306 without quantity
    assert acc["rows_in"] == 71_192 and acc["by_reason"]["no_quantity"] == 2_306
    assert acc["identity_rows_ok"] and acc["identity_value_ok"]
    # every kept HS6 is valid HS1992; BGW USA covers 170 HS3s -> most products match
    assert sm.report["match_rate"] > 0.95 and sm.report["n_sigma_le_1"] == 0
    assert fit.report["sigma_coverage_value"] > 0.99


def test_baci_variant_a_normal_equations_full(baci):
    """On the whole extract, the residual is the OLS residual of y on HS6 + importer dummies iff
    (i) it sums to 0 within every HS6 and every importer (orthogonality), and (ii) y - resid lies
    in the span of the dummies: scipy lsqr (an iterative solver, independent of the Schur solve)
    of the fitted values on the sparse dummies leaves nothing."""
    import scipy.sparse as sp
    from scipy.sparse.linalg import lsqr

    _, _, fit = baci
    ok = fit.flows.filter(pl.col("est_status") == "ok")
    e = ok["resid"].to_numpy()
    y = ok["y"].to_numpy()
    scale = np.abs(y).max()
    for key in ("hs6", "partner_iso3"):
        sums = ok.group_by(key).agg(pl.col("resid").sum())["resid"].abs().max()
        assert sums < 1e-8 * scale * 100
    a = _codes(ok["hs6"])
    b = _codes(ok["partner_iso3"])
    n = ok.height
    D = sp.hstack([sp.csr_matrix((np.ones(n), (np.arange(n), a))), sp.csr_matrix((np.ones(n), (np.arange(n), b)))]).tocsr()
    f = y - e
    sol = lsqr(D, f, atol=1e-14, btol=1e-14, iter_lim=20_000)[0]
    assert np.abs(f - D @ sol).max() < 1e-6 * scale


@pytest.mark.filterwarnings("ignore:The design matrix is rank-deficient")
def test_baci_variant_a_equals_statsmodels_on_subset(shared_data, baci):
    """Chapters 61-62 (apparel) of the extract estimated alone: qua equals statsmodels OLS with
    explicit HS6 and importer dummies (to 1e-8)."""
    sm_api = pytest.importorskip("statsmodels.api")
    flows, sm, _ = baci
    sub = flows.kept.filter(pl.col("hs2").is_in(["61", "62"]))
    fit = estimate_quality(sub, sm, QualityConfig(study_vintage="HS1992"))
    ok = fit.flows.filter(pl.col("est_status") == "ok")
    assert ok.height > 3000 and fit.report["n_singletons"] > 0
    X = _design(ok, "hs6+dest_year", False)
    y = (ok["ln_q"] + ok["sigma"] * ok["ln_p"]).to_numpy()
    res = sm_api.OLS(y, X).fit()
    np.testing.assert_allclose(ok["resid"].to_numpy(), res.resid, atol=1e-8, rtol=0)
    np.testing.assert_allclose(ok["qua"].to_numpy(), res.resid / (ok["sigma"].to_numpy() - 1), atol=1e-8, rtol=0)


# ------------------------------------------------------------------------------------------------
# outputs conform to their data contracts (tiny universe, default configuration but min_obs)
# ------------------------------------------------------------------------------------------------
def _assert_contract(name: str, df: pl.DataFrame) -> None:
    from kspill_pipeline.contracts.checks import run_contract_checks
    from kspill_pipeline.contracts.loader import load_contract
    from kspill_pipeline.reference.admin import prefectures

    c = load_contract(name)
    frame = c.conform(df.select(c.column_names))
    c.to_arrow(frame)
    bad = [o.to_dict() for o in run_contract_checks(c, frame, context={"ref_prefecture": prefectures()})
           if not o.passed]
    assert not bad, (name, bad)


def test_outputs_conform_to_contracts(tiny_universe, tiny_clean):
    cfg = QualityConfig(min_obs_per_hs6=5)
    kept, quar, acc = quality_flows(tiny_clean, cfg)
    assert acc["by_reason"]["min_obs_hs6"] > 0 and acc["by_reason"]["ag_resource_hs"] > 0
    sig = pl.read_csv(tiny_universe / "companion" / "sigma_hs3.csv", schema_overrides={"hs3": pl.String})
    fit = estimate_quality(kept, map_sigma(sig, "HS2007", "HS2007"), cfg)
    _assert_contract("quality_flow", fit.flows)
    _assert_contract("quality_flow_quarantine", quar)
    norm = normalise_rqua(fit.flows, cfg.rqua_window, degenerate=cfg.rqua_degenerate)
    _assert_contract("quality_normalised", norm)
    for level, name in (("firm_hs6", "quality_firm_hs6"), ("city_hs6", "quality_city_hs6"),
                        ("city_hs4", "quality_city_hs4")):
        agg, ck = aggregate_quality(norm, level)
        assert ck["passed"] and agg.height > 0
        _assert_contract(name, agg)
    sigma_tbl = pl.read_csv(tiny_universe / "companion" / "sigma_hs3.csv", schema_overrides={"hs3": pl.String})
    _assert_contract("elasticity_sigma", sigma_tbl.with_columns(pl.lit(None, dtype=pl.String).alias("country_code")))


def test_chunked_flows_equal_single_pass(tiny_clean):
    """HS2-chapter chunks give the same kept flows, the same quarantined rows and accounting."""
    from polars.testing import assert_frame_equal

    from kspill_pipeline.compute.quality import quality_flows_chunked

    cfg = QualityConfig(min_obs_per_hs6=3)
    one = quality_flows(tiny_clean, cfg)
    many = quality_flows_chunked(tiny_clean.lazy(), cfg, n_chunks=4)
    assert many.accounting["n_chunks"] == 4
    assert_frame_equal(one.kept, many.kept, check_exact=False, rel_tol=1e-12)
    key = list(one.quarantine.columns)
    assert_frame_equal(one.quarantine.sort(key, nulls_last=True), many.quarantine.sort(key, nulls_last=True))
    for k in ("rows_in", "rows_kept", "rows_quarantined", "flows_kept", "flows_dropped", "by_reason"):
        assert one.accounting[k] == many.accounting[k], k
    assert many.accounting["identity_rows_ok"] and many.accounting["identity_value_ok"]
