"""Study S000 panel (studies/s000.py): hand-computed phi, densities, controls, marketization and
panel on a tiny hand-made universe; the planted S000 mechanism of the synthetic tiny universe
recovered exactly (phi_lag = 1); backfill-order independence of the first-export history.

Every expected number below is derived by hand in the comments (never copied from output).
"""

from __future__ import annotations

import math
import random

import numpy as np
import polars as pl
import pytest

from kspill_pipeline.contracts import load_contract
from kspill_pipeline.contracts.checks import run_contract_checks
from kspill_pipeline.studies import s000 as S

# ------------------------------------------------------------------------------------------------
# hand-made universe
# ------------------------------------------------------------------------------------------------
# products p1..p5 (+ p0); cities C1 (east), C2 (west), C3 (central), C4 (east), C5 (east)
P1, P2, P3, P4, P5 = "8471", "8473", "8501", "6109", "9401"
P0 = "0101"  # imported in 2009, exported by nobody: outside the product space
C1, C2, C3, C4, C5 = "110100", "510100", "420100", "440100", "320100"
MACRO = {C1: "east", C2: "west", C3: "central", C4: "east", C5: "east"}
CITY = {"A": C1, "B": C1, "C": C2, "D": C3, "E": C1, "F": C4, "H": C4, "G": C5, "I": C5}
OWN = {"A": "soe", "B": "private", "C": "foreign", "D": "soe", "E": "private", "F": "private", "H": "soe",
       "G": "collective", "I": "soe"}

# (year, firm, flow, hs4, value, mode)
ROWS = [
    # 2008 (base year)
    (2008, "A", "export", P1, 10, "ordinary"), (2008, "A", "import", P3, 10, "ordinary"),
    (2008, "B", "export", P1, 10, "ordinary"), (2008, "B", "export", P2, 10, "ordinary"),
    (2008, "B", "export", P3, 10, "ordinary"),
    (2008, "C", "export", P2, 10, "ordinary"),
    (2008, "D", "export", P4, 10, "ordinary"), (2008, "D", "import", P5, 10, "ordinary"),
    # 2009
    (2009, "A", "export", P1, 100, "ordinary"), (2009, "A", "export", P2, 200, "ordinary"),
    (2009, "A", "export", P5, 1000, "processing"), (2009, "A", "import", P3, 50, "ordinary"),
    (2009, "A", "import", P4, 300, "processing"), (2009, "A", "import", P0, 20, "ordinary"),
    (2009, "B", "export", P1, 10, "ordinary"), (2009, "B", "export", P2, 20, "ordinary"),
    (2009, "B", "export", P3, 30, "ordinary"), (2009, "B", "import", P4, 40, "ordinary"),
    (2009, "C", "export", P2, 5, "ordinary"), (2009, "C", "export", P3, 5, "other"),
    (2009, "C", "export", P4, 10, "ordinary"), (2009, "C", "import", P1, 80, "ordinary"),
    (2009, "D", "export", P4, 7, "ordinary"),
    (2009, "E", "export", P5, 500, "ordinary"), (2009, "E", "import", P1, 500, "ordinary"),  # intermediary
    (2009, "F", "export", P5, 30, "ordinary"), (2009, "H", "export", P5, 70, "ordinary"),
    (2009, "G", "export", P5, 60, "ordinary"), (2009, "I", "import", P0, 40, "ordinary"),
    # 2010
    (2010, "A", "export", P1, 10, "ordinary"), (2010, "A", "export", P2, 10, "ordinary"),
    (2010, "A", "export", P3, 10, "ordinary"), (2010, "A", "export", P5, 10, "ordinary"),
    (2010, "B", "export", P1, 10, "ordinary"), (2010, "B", "export", P2, 10, "ordinary"),
    (2010, "C", "export", P2, 10, "ordinary"), (2010, "C", "export", P5, 10, "ordinary"),
    (2010, "D", "export", P1, 10, "ordinary"),
]


def hand_trade() -> pl.LazyFrame:
    recs = []
    for y, f, flow, h, v, mode in ROWS:
        c = CITY[f]
        recs.append({
            "year": y, "firm_id": f, "city_code": c, "province_code": c[:2], "macro_region": MACRO[c],
            "flow": flow, "hs6": h + "00", "hs4": h, "hs2": h[:2], "value_usd": float(v),
            "trade_mode_class": mode, "ownership_class": OWN[f],
            "intermediary_keywords": ["贸易"] if f == "E" else [],
        })
    return pl.DataFrame(recs, schema_overrides={"year": pl.Int32}).lazy()


def cfg(**kw) -> S.S000Config:
    return S.S000Config(base_year=2008, **kw)


# phi of 2009 (eq. 1). S000 exports 2009: A {p1,p2}, B {p1,p2,p3}, C {p2,p3,p4}, D {p4}
# and F, H, G {p5} (A's p5 is processing, E is an intermediary). N: p1 2, p2 3, p3 2, p4 2, p5 3.
# N12 = 2 (A,B) -> 2/3; N13 = 1 (B) -> 1/2; N14 = 0; N23 = 2 (B,C) -> 2/3; N24 = 1 (C) -> 1/3;
# N34 = 1 (C) -> 1/2; p5 is co-exported with nothing: phi_55 = 1, 0 elsewhere.
PHI09 = np.array([
    [1, 2 / 3, 1 / 2, 0, 0],
    [2 / 3, 1, 2 / 3, 1 / 3, 0],
    [1 / 2, 2 / 3, 1, 1 / 2, 0],
    [0, 1 / 3, 1 / 2, 1, 0],
    [0, 0, 0, 0, 1],
])
# column sums: p1 13/6, p2 8/3, p3 8/3, p4 11/6.
# baskets 2009: A {p3} (p4 processing dropped, p0 outside phi's space), B {p4}, C {p1}; D none;
# I {p0} has nothing in the space. Nobody imports p5, so no density on p5 is positive.
# density_firm (include_self): A: p1 (1/2)/(13/6) = 3/13, p2 (2/3)/(8/3) = 1/4, p3 1/(8/3) = 3/8,
#   p4 (1/2)/(11/6) = 3/11; B: p1 0, p2 (1/3)/(8/3) = 1/8, p3 (1/2)/(8/3) = 3/16, p4 6/11;
#   C: p1 6/13, p2 1/4, p3 3/16, p4 0.
# cities: C1 = A u B = {p3, p4}: p1 3/13, p2 (2/3+1/3)/(8/3) = 3/8, p3 (3/2)/(8/3) = 9/16,
#   p4 (3/2)/(11/6) = 9/11; C2 = {p1} = C's densities.
DF09 = {("A", P1): 3 / 13, ("A", P2): 1 / 4, ("A", P3): 3 / 8, ("A", P4): 3 / 11,
        ("B", P2): 1 / 8, ("B", P3): 3 / 16, ("B", P4): 6 / 11,
        ("C", P1): 6 / 13, ("C", P2): 1 / 4, ("C", P3): 3 / 16}
DC09 = {C1: {P1: 3 / 13, P2: 3 / 8, P3: 9 / 16, P4: 9 / 11}, C2: {P1: 6 / 13, P2: 1 / 4, P3: 3 / 16, P4: 0.0}}
# outcome 2009: A exports p1, p2; B p1, p2, p3; C p2, p3, p4
EXPORTS09 = {"A": {P1, P2}, "B": {P1, P2, P3}, "C": {P2, P3, P4}}


def _as_dict(df: pl.DataFrame, col: str) -> dict:
    return {(r["firm_id"], r["hs4"]): r[col] for r in df.iter_rows(named=True)}


# ------------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------------


def test_config_defaults_presets_and_errors():
    c = S.S000Config()
    assert (c.import_dummy_lag, c.density_include_self, c.city_density_leave_one_out) == (0, True, False)
    assert c.density_firm_threshold == 0.05 and c.industry_fe_level == "hs2_chapter"
    assert (c.newexport_zero, c.newexport_base_year, c.tradevalue_timing) == ("ln1p", "drop_2002",
                                                                             "after_processing_drop")
    assert (c.mkt_quantile_base, c.mkt_share_period, c.mkt_trade_definition, c.mkt_cutoffs) == (
        "cities", "pooled", "imports_plus_exports", "p25_p50")
    assert (c.phi_lag, c.base_year) == (0, 2002)
    assert S.preset("paper") == c
    assert S.preset("planted").phi_lag == 1 and S.S000Config.preset("planted", base_year=2005).base_year == 2005
    with pytest.raises(ValueError, match=r"mkt_cutoffs.*'p25_p50', 'p33_p67', 'p25_p75'"):
        S.S000Config(mkt_cutoffs="p10_p90")
    with pytest.raises(ValueError, match=r"phi_lag.*allowed values: 0, 1"):
        S.S000Config(phi_lag=2)
    with pytest.raises(ValueError, match="unknown S000 switch 'phi_lags'"):
        S.S000Config(phi_lags=1)
    with pytest.raises(ValueError, match="unknown S000 preset"):
        S.preset("nope")


# ------------------------------------------------------------------------------------------------
# phi and densities by hand
# ------------------------------------------------------------------------------------------------


def test_phi_by_hand():
    phi, products = S.s000_phi(hand_trade(), 2009, cfg())
    assert list(products) == sorted([P1, P2, P3, P4, P5])  # 6109 < 8471 < 8473 < 8501 < 9401
    order = [[P1, P2, P3, P4, P5].index(p) for p in products]
    np.testing.assert_allclose(phi, PHI09[np.ix_(order, order)], rtol=0, atol=1e-15)


def test_densities_candidates_by_hand():
    got = S.densities_for_year(hand_trade(), 2009, cfg())
    # threshold 0.05: every positive density above: A 4, B 3 (p1 = 0), C 3 (p4 = 0); D imports nothing
    assert set(_as_dict(got, "density_firm")) == set(DF09)
    for k, v in _as_dict(got, "density_firm").items():
        assert v == pytest.approx(DF09[k], abs=1e-14)
    for r in got.iter_rows(named=True):
        assert r["city_code"] == CITY[r["firm_id"]]
        assert r["density_city"] == pytest.approx(DC09[r["city_code"]][r["hs4"]], abs=1e-14)
        assert r["density_city"] >= r["density_firm"] - 1e-15
    # threshold 0.2: A all (3/13 = .2308, .25, .375, .2727), B p4 only, C p1, p2 (3/16 < .2)
    got2 = S.densities_for_year(hand_trade(), 2009, cfg(density_firm_threshold=0.2))
    assert set(_as_dict(got2, "density_firm")) == {("A", P1), ("A", P2), ("A", P3), ("A", P4), ("B", P4),
                                                  ("C", P1), ("C", P2)}


def test_densities_exclude_self_and_leave_one_out_by_hand():
    # include_self false: denominators colsum - 1 = 7/6, 5/3, 5/3, 5/6; the own product drops out
    # A {p3}: p1 (1/2)/(7/6) = 3/7, p2 (2/3)/(5/3) = 2/5, p3 0, p4 (1/2)/(5/6) = 3/5
    # B {p4}: p2 (1/3)/(5/3) = 1/5, p3 (1/2)/(5/3) = 3/10, p1 = p4 = 0
    # C {p1}: p2 2/5, p3 3/10, p1 = p4 = 0
    # C1 {p3,p4}: p1 3/7, p2 (2/3+1/3)/(5/3) = 3/5, p3 (1/2)/(5/3) = 3/10, p4 (1/2)/(5/6) = 3/5
    exp_f = {("A", P1): 3 / 7, ("A", P2): 2 / 5, ("A", P4): 3 / 5, ("B", P2): 1 / 5, ("B", P3): 3 / 10,
             ("C", P2): 2 / 5, ("C", P3): 3 / 10}
    exp_c = {C1: {P1: 3 / 7, P2: 3 / 5, P3: 3 / 10, P4: 3 / 5}, C2: {P2: 2 / 5, P3: 3 / 10}}
    got = S.densities_for_year(hand_trade(), 2009, cfg(density_include_self=False))
    assert set(_as_dict(got, "density_firm")) == set(exp_f)
    for r in got.iter_rows(named=True):
        assert r["density_firm"] == pytest.approx(exp_f[(r["firm_id"], r["hs4"])], abs=1e-14)
        assert r["density_city"] == pytest.approx(exp_c[r["city_code"]][r["hs4"]], abs=1e-14)
    # leave-one-out city basket: A's city basket without A = B's {p4}; B's = A's {p3}; C alone -> 0
    loo = {"A": {P1: 0.0, P2: 1 / 8, P3: 3 / 16, P4: 6 / 11}, "B": {P2: 1 / 4, P3: 3 / 8, P4: 3 / 11},
           "C": {P1: 0.0, P2: 0.0, P3: 0.0}}
    got = S.densities_for_year(hand_trade(), 2009, cfg(city_density_leave_one_out=True))
    assert set(_as_dict(got, "density_firm")) == set(DF09)
    for r in got.iter_rows(named=True):
        assert r["density_city"] == pytest.approx(loo[r["firm_id"]][r["hs4"]], abs=1e-14)
    # province: C1 is province 11 alone, so nothing changes here
    got = S.densities_for_year(hand_trade(), 2009, cfg(region_unit="province"))
    for r in got.iter_rows(named=True):
        assert r["density_city"] == pytest.approx(DC09[r["city_code"]][r["hs4"]], abs=1e-14)


def test_phi_lag_one_by_hand():
    # phi of 2008: exports A {p1}, B {p1,p2,p3}, C {p2}, D {p4}; N p1 2, p2 2, p3 1, p4 1;
    # N12 = N13 = N23 = 1 (B): phi 1/2 each; p4 isolated. Column sums 2, 2, 2, 1.
    # 2009 baskets: A {p3}: p1 1/4, p2 1/4, p3 1/2, p4 0; B {p4}: p4 1; C {p1}: p1 1/2, p2 1/4, p3 1/4
    # C1 {p3, p4}: p1 1/4, p2 1/4, p3 1/2, p4 1
    exp = {("A", P1): (0.25, 0.25), ("A", P2): (0.25, 0.25), ("A", P3): (0.5, 0.5), ("B", P4): (1.0, 1.0),
           ("C", P1): (0.5, 0.5), ("C", P2): (0.25, 0.25), ("C", P3): (0.25, 0.25)}
    got = S.densities_for_year(hand_trade(), 2009, cfg(phi_lag=1))
    assert set(_as_dict(got, "density_firm")) == set(exp)
    for r in got.iter_rows(named=True):
        df, dc = exp[(r["firm_id"], r["hs4"])]
        assert r["density_firm"] == pytest.approx(df, abs=1e-14)
        assert r["density_city"] == pytest.approx(dc, abs=1e-14)
    # the same from a given phi (as the Dagster layer feeds the t-1 product_relatedness partition)
    phi08, prods = S.s000_phi(hand_trade(), 2008, cfg())
    again = S.densities_for_year(hand_trade(), 2009, cfg(), phi=phi08, products=prods)
    assert again.equals(got)


# ------------------------------------------------------------------------------------------------
# export history, controls
# ------------------------------------------------------------------------------------------------


def test_first_exports_and_controls_by_hand():
    c = cfg()
    hist_in = S.export_presence(hand_trade(), c)
    # 2009 new: A p2 (p1 in 2008); B none (p1-p3 in 2008); C p3, p4 (p2 in 2008); D none (p4 in 2008);
    # F, G, H p5 (first trade in 2009)
    assert S.first_exports(hist_in, 2009, c).rows() == sorted(
        [("A", P2), ("C", P3), ("C", P4), ("F", P5), ("G", P5), ("H", P5)])
    # 2010: A p3 and p5 (p5 of 2009 was processing); B none (p2 exported 2008, not 2009: cumulative
    # window); C p5; D p1
    assert sorted(S.first_exports(hist_in, 2010, c).rows()) == sorted(
        [("A", P3), ("A", P5), ("C", P5), ("D", P1)])
    h09 = S.firm_export_history(hist_in, 2009, c)
    ctl = S.firm_controls(hand_trade(), h09, 2009, c)
    got = {r["firm_id"]: r for r in ctl.iter_rows(named=True)}
    # S000 sample firms of 2009: A B C D F G H I (E is an intermediary)
    assert set(got) == {"A", "B", "C", "D", "F", "G", "H", "I"}
    assert {f: got[f]["n_new"] for f in "ABCD"} == {"A": 1, "B": 0, "C": 2, "D": 0}
    # tradevalue after the processing drop: A 100+200+50+20 = 370; B 100; C 100; D 7
    for f, v in {"A": 370, "B": 100, "C": 100, "D": 7}.items():
        assert got[f]["tradevalue"] == pytest.approx(math.log(v), abs=1e-14)
    # ln1p: A ln 2, B 0, C ln 3, D 0
    for f, v in {"A": math.log(2), "B": 0.0, "C": math.log(3), "D": 0.0}.items():
        assert got[f]["newexport"] == pytest.approx(v, abs=1e-14)
    # before the processing drop: A adds 1000 + 300 -> ln 1670
    ctl_b = S.firm_controls(hand_trade(), h09, 2009, cfg(tradevalue_timing="before"))
    assert ctl_b.filter(pl.col("firm_id") == "A")["tradevalue"].item() == pytest.approx(math.log(1670), abs=1e-14)
    # drop_zero_rows: A ln 1 = 0, C ln 2, B and D null
    ctl_z = {r["firm_id"]: r["newexport"] for r in
             S.firm_controls(hand_trade(), h09, 2009, cfg(newexport_zero="drop_zero_rows")).iter_rows(named=True)}
    assert ctl_z["A"] == 0.0 and ctl_z["C"] == pytest.approx(math.log(2)) and ctl_z["B"] is None and ctl_z["D"] is None
    # base year 2008: literal count (all exports new: B 3) but newexport null (drop) or 0 (set_zero)
    h08 = S.firm_export_history(hist_in, 2008, c)
    c08 = S.firm_controls(hand_trade(), h08, 2008, c)
    assert c08.filter(pl.col("firm_id") == "B")["n_new"].item() == 3
    assert c08["newexport"].null_count() == c08.height
    c08z = S.firm_controls(hand_trade(), h08, 2008, cfg(newexport_base_year="set_zero_2002"))
    assert c08z["newexport"].to_list() == [0.0] * c08z.height
    # contracts
    for name, df in (("s000_firm_controls", ctl), ("s000_firm_controls", c08), ("firm_export_history", h09)):
        con = load_contract(name)
        assert all(o.passed for o in run_contract_checks(con, con.conform(df))), name


def test_history_backfill_order_and_rerun():
    c = cfg()
    hist_in = S.export_presence(hand_trade(), c).collect()
    full = {y: S.firm_export_history(hist_in, y, c) for y in (2008, 2009, 2010)}
    assert full[2010].filter(pl.col("is_new")).select("firm_id", "hs4").sort("firm_id", "hs4").equals(
        S.first_exports(hist_in, 2010, c))
    assert full[2010].filter((pl.col("firm_id") == "B") & (pl.col("hs4") == P2))["first_export_year"].item() == 2008
    rng = random.Random(5)
    for _ in range(5):
        # each partition from the raw per-year presence partitions in a random order, with only
        # the years <= t (a re-run of one year) or with later years present (a backfill in any order)
        order = [2008, 2009, 2010]
        rng.shuffle(order)
        for y in order:
            parts = [hist_in.filter(pl.col("year") == yy) for yy in (2008, 2009, 2010)]
            rng.shuffle(parts)
            upto = pl.concat([p for p in parts if p["year"].max() is not None and p["year"].max() <= y])
            assert S.firm_export_history(upto.lazy(), y, c).equals(full[y])
            assert S.firm_export_history(pl.concat(parts), y, c).equals(full[y])
    assert S.firm_export_history(hist_in, 2007, c).height == 0  # before the base year


# ------------------------------------------------------------------------------------------------
# marketization
# ------------------------------------------------------------------------------------------------


def test_weighted_quantile_matches_numpy():
    rng = np.random.default_rng(3)
    v = rng.random(13)
    w = rng.integers(0, 6, 13)
    w[0] = 1
    for q in (0.0, 0.25, 1 / 3, 0.5, 0.75, 1.0):
        assert S.weighted_linear_quantile(v, q) == pytest.approx(np.quantile(v, q), abs=1e-15)
        assert S.weighted_linear_quantile(v, q, w) == pytest.approx(np.quantile(np.repeat(v, w), q), abs=1e-15)


def test_marketization_by_hand():
    # 2009 non-SOE shares of imports + exports (S000 sample; A's processing and E dropped):
    # C1: A soe 370, B private 100 -> 10/47; C2: C foreign -> 1; C3: D soe -> 0; C4: F 30 private,
    # H 70 soe -> 0.3; C5: G 60 collective, I 40 soe -> 0.6. Sorted 0, 10/47, .3, .6, 1:
    # p25 at h = 1 -> 10/47, p50 at h = 2 -> 0.3. low < p25 <= mid < p50 <= high.
    m = S.city_marketization(hand_trade(), cfg(mkt_share_period="per_year"), years=[2009])
    got = {r["city_code"]: r for r in m.iter_rows(named=True)}
    for city, share in {C1: 10 / 47, C2: 1.0, C3: 0.0, C4: 0.3, C5: 0.6}.items():
        assert got[city]["nonsoe_share"] == pytest.approx(share, abs=1e-15)
    assert got[C1]["q_low"] == pytest.approx(10 / 47, abs=1e-15) and got[C1]["q_high"] == pytest.approx(0.3)
    assert {c: r["mkt_group"] for c, r in got.items()} == {C3: "low", C1: "mid", C4: "high", C5: "high", C2: "high"}
    # exports only: C1 60/360 = 1/6; C2 1; C3 0; C4 0.3; C5 60/60 = 1 -> p25 = 1/6, p50 = 0.3
    m = S.city_marketization(hand_trade(), cfg(mkt_share_period="per_year", mkt_trade_definition="exports_only"),
                             years=[2009])
    got = {r["city_code"]: r for r in m.iter_rows(named=True)}
    assert got[C1]["nonsoe_share"] == pytest.approx(1 / 6) and got[C5]["nonsoe_share"] == 1.0
    assert got[C1]["q_low"] == pytest.approx(1 / 6) and got[C1]["mkt_group"] == "mid"
    # pooled 2008-2010: C1: A 20 + 370 + 40 = 430 soe, B 30 + 100 + 20 = 150 -> 150/580 = 15/58;
    # C4 and C5 only trade in 2009; cut-offs 15/58 and 0.3 for every year row
    m = S.city_marketization(hand_trade(), cfg())
    c1 = m.filter(pl.col("city_code") == C1)
    assert c1["year"].to_list() == [2008, 2009, 2010]
    assert c1["nonsoe_share"].to_list() == pytest.approx([15 / 58] * 3)
    assert m["q_low"].unique().to_list() == pytest.approx([15 / 58]) and m["q_high"].unique().to_list() == [0.3]
    assert dict(m.filter(pl.col("year") == 2009).select("city_code", "mkt_group").iter_rows()) == {
        C1: "mid", C2: "high", C3: "low", C4: "high", C5: "high"}
    # observations: per-year weights C1 7 rows, C2 3 rows (others 0) -> expanded sample 7 x 10/47, 3 x 1:
    # p25 (h = 2.25) and p50 (h = 4.5) are both 10/47 -> C1 high (share >= p50), C3 low, nobody mid
    w = pl.DataFrame({"year": [2009, 2009], "city_code": [C1, C2], "n_obs": [7, 3]})
    m = S.city_marketization(hand_trade(), cfg(mkt_share_period="per_year", mkt_quantile_base="observations"),
                             years=[2009], obs_weights=w)
    got = {r["city_code"]: r["mkt_group"] for r in m.iter_rows(named=True)}
    assert got == {C1: "high", C2: "high", C3: "low", C4: "high", C5: "high"}
    con = load_contract("s000_city_marketization")
    from kspill_pipeline.reference.admin import prefectures

    outs = run_contract_checks(con, con.conform(m), context={"ref_prefecture": prefectures()})
    assert all(o.passed for o in outs), [o for o in outs if not o.passed]


def test_industry_maps():
    m = S.industry_map([P1, P4, P5, "0101", "9701", "9801"], "hs_section")
    assert dict(m.iter_rows()) == {P1: "XVI", P4: "XI", P5: "XX", "0101": "I", "9701": "XXI", "9801": "special"}
    assert dict(S.industry_map([P1, P4], "hs2_chapter").iter_rows()) == {P1: "84", P4: "61"}
    assert len(S.CHAPTER_TO_SECTION) == 97  # chapters 01-97 (77, reserved, lies in section XV)
    # firm main industry 2009: A exports 84 (100 + 200); B 84 (10 + 20) ties 85 (30) -> lowest code 84; C 61 (10) vs 84 5
    # and 85 5 -> 61; I has imports only (01)
    fm = dict(S.firm_main_industry(hand_trade(), 2009, cfg()).iter_rows())
    assert (fm["A"], fm["B"], fm["C"], fm["I"]) == ("84", "84", "61", "01")


# ------------------------------------------------------------------------------------------------
# the panel
# ------------------------------------------------------------------------------------------------


def test_panel_by_hand():
    p = S.panel_year_from_trade(hand_trade(), 2009, cfg())
    assert p.columns == S.PANEL_COLUMNS
    assert set(_as_dict(p, "export")) == set(DF09)
    for r in p.iter_rows(named=True):
        f, h = r["firm_id"], r["hs4"]
        assert r["export"] == int(h in EXPORTS09[f])
        assert r["interaction"] == pytest.approx(DF09[(f, h)] * DC09[CITY[f]][h], abs=1e-14)
        assert r["industry"] == h[:2] and r["macro_region"] == MACRO[CITY[f]]
        assert r["tradevalue"] == pytest.approx(math.log({"A": 370, "B": 100, "C": 100}[f]))
        assert r["newexport"] == pytest.approx({"A": math.log(2), "B": 0.0, "C": math.log(3)}[f])
        assert r["mkt_group"] == {C1: "mid", C2: "high"}[CITY[f]]
    # outcome: A p1 p2 = 1, B p2 p3 = 1, C p2 p3 = 1; the other 4 rows 0
    assert p["export"].sum() == 6
    assert S.panel_invariants(p, cfg()) == {"below_threshold": 0, "city_lt_firm": 0, "no_outcome_variation": 0}
    con = load_contract("s000_panel")
    from kspill_pipeline.reference.admin import prefectures

    outs = run_contract_checks(con, con.conform(p), context={"ref_prefecture": prefectures()})
    assert all(o.passed for o in outs), [o for o in outs if not o.passed]
    # drop_zero_rows removes B (no new product in 2009): 10 - 3 rows
    pz = S.panel_year_from_trade(hand_trade(), 2009, cfg(newexport_zero="drop_zero_rows"))
    assert pz.height == 7 and "B" not in pz["firm_id"].to_list()
    # base year under drop_2002: no rows
    assert S.panel_year_from_trade(hand_trade(), 2008, cfg()).height == 0
    # firm-level processing drop: A has processing rows in 2009 -> out of the panel entirely
    pf = S.panel_year_from_trade(hand_trade(), 2009, cfg(processing_drop_level="firm"))
    assert "A" not in pf["firm_id"].to_list()
    # the stored-density path gives the same panel
    cand = S.densities_for_year(hand_trade(), 2009, cfg())
    fid = cand.select(pl.lit(2009, dtype=pl.Int32).alias("year"), "firm_id", pl.col("hs4").alias("product"),
                      pl.col("density_firm").cast(pl.Float32))
    cid = pl.DataFrame([{"year": 2009, "city_code": c, "product": h, "density_city": v}
                        for c, d in DC09.items() for h, v in d.items()])
    fcity = pl.DataFrame({"year": [2009] * 3, "firm_id": ["A", "B", "C"], "city_code": [C1, C1, C2]})
    stored = S.candidates_from_stored(fid, cid, fcity, 2009, cfg())
    assert stored.select("firm_id", "hs4", "city_code").equals(cand.select("firm_id", "hs4", "city_code"))
    np.testing.assert_allclose(stored["density_firm"], cand["density_firm"], rtol=1e-7)
    with pytest.raises(ValueError, match="recomputed densities"):
        S.candidates_from_stored(fid, cid, fcity, 2009, cfg(phi_lag=1))


# ------------------------------------------------------------------------------------------------
# synthetic tiny universe: the planted mechanism
# ------------------------------------------------------------------------------------------------

YEARS = (2008, 2009, 2010)


@pytest.fixture(scope="module")
def tiny_trade(tiny_universe) -> pl.LazyFrame:
    from kspill_pipeline.compute.cleaning import clean_customs
    from kspill_pipeline.io.raw import discover_files, read_customs_file

    files = discover_files(tiny_universe)
    out = []
    for y in YEARS:
        frames = []
        for f in files[y]:
            rf = read_customs_file(f, tiny_universe)
            frames.append(rf.df.with_columns(pl.lit(rf.numeric_hs).alias("source_numeric_hs")))
        out.append(clean_customs(pl.concat(frames, how="vertical_relaxed"), y).clean)
    return pl.concat(out, how="vertical_relaxed").lazy()


@pytest.mark.parametrize("year", [2009, 2010])
def test_planted_mechanism_recovered_exactly(tiny_universe, tiny_trade, year):
    """phi_lag = 1: phi of t-1 from clean co-export, year-t clean import baskets, firm main city:
    candidates, outcome and both densities equal the generator's _truth/export_status.parquet."""
    c = S.preset("planted", base_year=YEARS[0])
    truth = pl.read_parquet(tiny_universe / "_truth" / "export_status.parquet").filter(
        (pl.col("year") == year) & pl.col("candidate"))
    assert truth.height > 50
    p = S.panel_year_from_trade(tiny_trade, year, c)
    j = p.join(truth, on=["firm_id", "hs4"], how="full", coalesce=True)
    assert j.filter(pl.col("export").is_null() | pl.col("exported").is_null()).height == 0
    assert (j["export"] == j["exported"]).all()
    assert (j["city_code"] == j["city_code_right"]).all()
    np.testing.assert_allclose(j["density_firm"], j["density_firm_right"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(j["density_city"], j["density_city_right"], rtol=0, atol=1e-12)
    assert 0 < p["export"].mean() < 1
    assert S.panel_invariants(p, c)["city_lt_firm"] == 0


def test_phi_and_density_match_relatedness_engine(tiny_trade):
    """phi_lag = 0 densities equal the relatedness assets' kernels (compute.relatedness_io)."""
    from kspill_pipeline.compute.relatedness_io import basket_density_long, phi_from_long, relatedness_long
    from kspill_pipeline.compute.samples import study_sample
    from kspill_pipeline.config import RelatednessConfig

    rc = RelatednessConfig()
    phi_a, prod_a = phi_from_long(relatedness_long(study_sample(tiny_trade, "s000"), 2009, rc))
    phi_b, prod_b = S.s000_phi(tiny_trade, 2009, S.S000Config())
    assert list(prod_a) == list(prod_b)
    np.testing.assert_array_equal(phi_a, phi_b)
    bk = S.import_baskets(tiny_trade, 2009, S.S000Config()).rename({"firm_id": "unit", "hs4": "product"})
    bk = bk.join(pl.DataFrame({"product": list(prod_a)}), on="product", how="semi")
    ref = basket_density_long(bk, bk["unit"].unique().sort(), phi_a, prod_a, include_self=True,
                              value_name="density_firm").filter(pl.col("density_firm") > 0.05)
    got = S.densities_for_year(tiny_trade, 2009, S.S000Config())
    assert dict(zip(zip(ref["unit"], ref["product"]), ref["density_firm"])) == pytest.approx(
        dict(zip(zip(got["firm_id"], got["hs4"]), got["density_firm"])), abs=1e-14)


@pytest.mark.parametrize("overrides", [
    {"import_dummy_lag": 1},
    {"import_dummy_lag": 1, "candidate_set": "importers_only"},
    {"industry_fe_level": "hs_section", "mkt_cutoffs": "p33_p67"},
    {"industry_fe_level": "firm_main_industry", "mkt_quantile_base": "observations"},
    {"phi_sample": "raw", "region_unit": "province", "mkt_share_period": "per_year"},
])
def test_panel_variants_satisfy_contract(tiny_trade, overrides):
    c = S.S000Config(base_year=YEARS[0], **overrides)
    p = S.panel_year_from_trade(tiny_trade, 2010, c)
    assert p.height > 0
    con = load_contract("s000_panel")
    from kspill_pipeline.reference.admin import prefectures

    outs = run_contract_checks(con, con.conform(p), context={"ref_prefecture": prefectures()})
    assert all(o.passed for o in outs), [o.name for o in outs if not o.passed]
    inv = S.panel_invariants(p, c)
    assert inv["below_threshold"] == 0 and inv["no_outcome_variation"] == 0 and inv["city_lt_firm"] in (0, -1)
