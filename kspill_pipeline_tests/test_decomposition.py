"""Melitz-Polanec decomposition of city x HS4 quality (issue 5; spec S004 Eq. 23, Table 7).

Every expected number is derived by hand in the docstrings from the definitions
(s = value share, S/E/X = continuers/entrants/exiters, Q_G = share-weighted group mean,
qbar_S = unweighted continuer mean, cov_S = sum (s/s_S - 1/n_S)(q - qbar_S)).
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from kspill_pipeline.compute.decomposition import mp_decomposition, quality_decomposition
from kspill_pipeline.compute.quality import aggregate_quality

EXACT = 1e-12


def _cells(prev_rows, curr_rows):
    sch = {"city_code": pl.String, "hs4": pl.String, "hs6": pl.String, "v": pl.Float64, "q": pl.Float64}
    return pl.DataFrame(prev_rows, schema=sch, orient="row"), pl.DataFrame(curr_rows, schema=sch, orient="row")


PREV = [
    # cell 1: a, b continue; c exits
    ("110100", "8471", "a", 100.0, 0.2), ("110100", "8471", "b", 300.0, 0.6), ("110100", "8471", "c", 100.0, 0.9),
    # cell 2: a, b continue, nothing enters or exits
    ("120100", "8471", "a", 1.0, 0.1), ("120100", "8471", "b", 3.0, 0.5),
    # cell 3: complete turnover
    ("130100", "8471", "x", 1.0, 0.2),
    # cell 4: present only in t-1
    ("140100", "8471", "z", 1.0, 0.5),
]
CURR = [
    ("110100", "8471", "a", 200.0, 0.4), ("110100", "8471", "b", 200.0, 0.5), ("110100", "8471", "d", 400.0, 0.8),
    ("120100", "8471", "a", 1.0, 0.3), ("120100", "8471", "b", 1.0, 0.3),
    ("130100", "8471", "y", 1.0, 0.7),
    # cell 5: present only in t
    ("150100", "8471", "z", 1.0, 0.5),
]


def test_hand_cells():
    """Cell 1: t-1 shares a .2, b .6, c .2; t shares a .25, b .25, d .5.
    Q1 = .2x.2 + .6x.6 + .2x.9 = .58; Q2 = .25x.4 + .25x.5 + .5x.8 = .625; total = .045.
    S = {a, b}: s_S1 = .8, s_S2 = .5; Q_S1 = (.04 + .36)/.8 = .5; Q_S2 = (.1 + .125)/.5 = .45;
    qbar_S1 = .4, qbar_S2 = .45 -> within = .05;
    cov_S1 = (.25 - .5)(.2 - .4) + (.75 - .5)(.6 - .4) = .1; cov_S2 = (.5-.5)(..) + (.5-.5)(..) = 0
    -> between = -.1; entry = s_E2 (Q_E2 - Q_S2) = .5 (.8 - .45) = .175;
    exit = s_X1 (Q_S1 - Q_X1) = .2 (.5 - .9) = -.08; sum = .05 - .1 + .175 - .08 = .045 = total;
    gap = -.1 + .175 - .08 = -.005.
    Cell 2: Q1 = .25x.1 + .75x.5 = .4, Q2 = .3, total -.1; qbar .3 -> .3: within 0;
    cov_S1 = (.25-.5)(.1-.3) + (.75-.5)(.5-.3) = .1, cov_S2 = 0: between -.1; entry = exit = 0.
    Cell 3: no continuers: total = .7 - .2 = .5, components null. Cells 4 and 5: one period only."""
    prev, curr = _cells(PREV, CURR)
    out, s = mp_decomposition(prev, curr, cell_cols=["city_code", "hs4"], unit_cols=["hs6"],
                              quality_col="q", value_col="v")
    assert out["city_code"].to_list() == ["110100", "120100", "130100"]
    c1, c2, c3 = out.iter_rows(named=True)
    expect1 = {"q_prev": .58, "q_curr": .625, "total": .045, "within": .05, "between": -.1, "entry": .175,
               "exit": -.08, "gap": -.005, "share_entrants": .5, "share_exiters": .2}
    for k, v in expect1.items():
        assert c1[k] == pytest.approx(v, abs=EXACT), k
    assert (c1["n_continuers"], c1["n_entrants"], c1["n_exiters"], c1["status"]) == (2, 1, 1, "ok")
    expect2 = {"q_prev": .4, "q_curr": .3, "total": -.1, "within": 0.0, "between": -.1, "entry": 0.0,
               "exit": 0.0, "gap": -.1}
    for k, v in expect2.items():
        assert c2[k] == pytest.approx(v, abs=EXACT), k
    assert c3["status"] == "no_continuers" and c3["total"] == pytest.approx(.5, abs=EXACT)
    assert all(c3[k] is None for k in ("within", "between", "entry", "exit", "gap", "identity_error"))
    assert s["n_cells_prev_only"] == 1 and s["n_cells_curr_only"] == 1 and s["n_no_continuers"] == 1
    assert s["max_abs_identity_error"] <= EXACT


def test_entry_only_and_exit_only_cells():
    """Entry only: t-1 {a: v 1, q .4}; t {a: v 1, q .4; e: v 3, q .8}. Q1 = .4, Q2 = .25x.4 + .75x.8
    = .7; within 0, between 0 (one continuer: cov = 0), entry = .75 (.8 - .4) = .3, exit 0.
    Exit only: t-1 {a: v 1, q .4; x: v 1, q 0}; t {a: v 5, q .4}. Q1 = .2, Q2 = .4, total .2;
    exit = .5 (.4 - 0) = .2, entry 0, within 0, between 0."""
    prev, curr = _cells(
        [("1", "0101", "a", 1.0, .4), ("2", "0101", "a", 1.0, .4), ("2", "0101", "x", 1.0, 0.0)],
        [("1", "0101", "a", 1.0, .4), ("1", "0101", "e", 3.0, .8), ("2", "0101", "a", 5.0, .4)],
    )
    out, _ = mp_decomposition(prev, curr, cell_cols=["city_code", "hs4"], unit_cols=["hs6"],
                              quality_col="q", value_col="v")
    e, x = out.iter_rows(named=True)
    for k, v in {"total": .3, "within": 0.0, "between": 0.0, "entry": .3, "exit": 0.0, "gap": .3}.items():
        assert e[k] == pytest.approx(v, abs=EXACT), k
    for k, v in {"total": .2, "within": 0.0, "between": 0.0, "entry": 0.0, "exit": .2, "gap": .2}.items():
        assert x[k] == pytest.approx(v, abs=EXACT), k


def _flows(year, rows):
    return pl.DataFrame(
        [{"year": year, "firm_id": f, "city_code": c, "hs6": h, "partner_iso3": d, "value_usd": v, "rqua": q}
         for f, c, h, d, v, q in rows],
        schema={"year": pl.Int32, "firm_id": pl.String, "city_code": pl.String, "hs6": pl.String,
                "partner_iso3": pl.String, "value_usd": pl.Float64, "rqua": pl.Float64})


def test_flow_level_wrapper_hs6_and_flow_units():
    """Flows of cell 110100 x 8471 built so that the HS6 units are cell 1 of test_hand_cells:
    HS6 847110 (a) in t-1 = flows (F1, USA, v 50, q .1) + (F2, JPN, v 50, q .3) -> v 100, q .2;
    847120 (b) = (F1, USA, 300, .6); 847130 (c) = (F3, USA, 100, .9); plus an unrated flow
    (rqua null) that must be ignored. t: 847110 = (F1, USA, 200, .4); 847120 = (F2, USA, 200, .5);
    847140 (d) = (F3, DEU, 400, .8). Unit hs6 gives cell 1's numbers.
    Unit flow: t-1 flows (F1,847110,USA) s .1 q .1, (F2,847110,JPN) .1 .3, (F1,847120,USA) .6 .6,
    (F3,847130,USA) .2 .9; t flows (F1,847110,USA) .25 .4, (F2,847120,USA) .25 .5, (F3,847140,DEU) .5 .8.
    Continuers: only (F1,847110,USA): n_S = 1, within = .4 - .1 = .3, between = 0 (cov of one unit);
    entry = s_E2 (Q_E2 - Q_S2) = .75 ((.25x.5 + .5x.8)/.75 - .4) = .525 - .3 = .225;
    exit = s_X1 (Q_S1 - Q_X1) = .9 (.1 - (.03 + .36 + .18)/.9) = .09 - .57 = -.48;
    total = .625 - .58 = .045 = .3 + 0 + .225 - .48."""
    prev = _flows(2010, [("F1", "110100", "847110", "USA", 50.0, .1), ("F2", "110100", "847110", "JPN", 50.0, .3),
                         ("F1", "110100", "847120", "USA", 300.0, .6), ("F3", "110100", "847130", "USA", 100.0, .9),
                         ("F4", "110100", "847130", "FRA", 999.0, None)])
    curr = _flows(2011, [("F1", "110100", "847110", "USA", 200.0, .4), ("F2", "110100", "847120", "USA", 200.0, .5),
                         ("F3", "110100", "847140", "DEU", 400.0, .8)])
    h, sh = quality_decomposition(prev, curr, unit="hs6")
    r = h.row(0, named=True)
    assert (r["year"], r["year_prev"], r["decomp_unit"], r["hs4"]) == (2011, 2010, "hs6", "8471")
    for k, v in {"total": .045, "within": .05, "between": -.1, "entry": .175, "exit": -.08, "gap": -.005}.items():
        assert r[k] == pytest.approx(v, abs=EXACT), k
    assert sh["identity_ok"]
    f, _ = quality_decomposition(prev, curr, unit="flow")
    r = f.row(0, named=True)
    for k, v in {"total": .045, "within": .3, "between": 0.0, "entry": .225, "exit": -.48}.items():
        assert r[k] == pytest.approx(v, abs=EXACT), k
    assert (r["n_continuers"], r["n_entrants"], r["n_exiters"]) == (1, 2, 3)
    # Q_t equals hs4_qua of Eq. 21 (value-weighted over rated flows)
    a_prev, _ = aggregate_quality(prev, "city_hs4")
    a_curr, _ = aggregate_quality(curr, "city_hs4")
    assert r["q_prev"] == pytest.approx(a_prev["hs4_qua"][0], abs=EXACT)
    assert r["q_curr"] == pytest.approx(a_curr["hs4_qua"][0], abs=EXACT)


def test_identity_exact_on_random_cells():
    rng = np.random.default_rng(9)

    def draw(year, n):
        return _flows(year, [
            (f"F{rng.integers(0, 40)}", f"{rng.integers(11, 16)}0100", f"8471{rng.integers(10, 30)}",
             ["USA", "JPN", "DEU"][rng.integers(0, 3)], float(np.exp(rng.normal(8, 2))), float(rng.uniform()))
            for _ in range(n)]).unique(["firm_id", "hs6", "partner_iso3"], keep="first")

    prev, curr = draw(2014, 3000), draw(2015, 3000)
    for unit in ("hs6", "flow"):
        out, s = quality_decomposition(prev, curr, unit=unit)
        ok = out.filter(pl.col("status") == "ok")
        assert ok.height > 0 and s["identity_ok"]
        lhs = ok["total"].to_numpy()
        rhs = (ok["within"] + ok["between"] + ok["entry"] + ok["exit"]).to_numpy()
        assert np.abs(lhs - rhs).max() <= EXACT
        np.testing.assert_allclose(ok["gap"].to_numpy(), (ok["between"] + ok["entry"] + ok["exit"]).to_numpy(),
                                   atol=EXACT, rtol=0)


def test_bad_inputs():
    prev = _flows(2010, [("F1", "110100", "847110", "USA", 1.0, .1)])
    with pytest.raises(ValueError, match="not consecutive"):
        quality_decomposition(prev, _flows(2012, [("F1", "110100", "847110", "USA", 1.0, .1)]))
    dup = _cells([("1", "0101", "a", 1.0, .1), ("1", "0101", "a", 2.0, .2)], [("1", "0101", "a", 1.0, .1)])
    with pytest.raises(ValueError, match="duplicate"):
        mp_decomposition(*dup, cell_cols=["city_code", "hs4"], unit_cols=["hs6"], quality_col="q", value_col="v")


def test_decomposition_conforms_to_contract():
    from kspill_pipeline.contracts.checks import run_contract_checks
    from kspill_pipeline.contracts.loader import load_contract
    from kspill_pipeline.reference.admin import prefectures

    prev = _flows(2010, [("F1", "110100", "847110", "USA", 50.0, .1), ("F3", "110100", "847130", "USA", 100.0, .9),
                         ("F5", "310100", "610910", "USA", 10.0, .5)])
    curr = _flows(2011, [("F1", "110100", "847110", "USA", 200.0, .4), ("F6", "310100", "610920", "USA", 10.0, .2)])
    out, _ = quality_decomposition(prev, curr)
    c = load_contract("quality_decomposition")
    frame = c.conform(out)
    bad = [o.to_dict() for o in run_contract_checks(c, frame, context={"ref_prefecture": prefectures()}) if not o.passed]
    assert not bad


def test_shares_and_qualities_stay_in_unit_interval_under_rounding():
    """Cells whose units all exit (or all carry quality 1): the shares sum to 1 and Q to 1 in
    exact arithmetic, but float sums of shares land 1-2 ulps above 1 in some cells (the demo data
    failed the [0, 1] contract range with 1 + 2.2e-16). 3,000 random cells; without the clip in
    mp_decomposition some of them exceed 1 (checked when the test was written)."""
    import numpy as np

    from kspill_pipeline.compute.decomposition import mp_decomposition

    rng = np.random.default_rng(11)
    rows_p, rows_c = [], []
    for cell in range(3000):
        n = int(rng.integers(3, 30))
        v = rng.lognormal(0, 2, n)
        for i in range(n):
            rows_p.append((f"c{cell}", f"u{i}", float(v[i]), 1.0))
        rows_c.append((f"c{cell}", "new", 1.0, 1.0))  # every old unit exits, one entrant
    cols = ["cell", "unit", "value", "q"]
    prev = pl.DataFrame(rows_p, schema=cols, orient="row")
    curr = pl.DataFrame(rows_c, schema=cols, orient="row")
    out, _ = mp_decomposition(prev, curr, cell_cols=["cell"], unit_cols=["unit"], quality_col="q", value_col="value")
    assert out.height == 3000
    assert out["share_exiters"].max() <= 1.0 and out["q_prev"].max() <= 1.0 and out["q_curr"].max() <= 1.0
    assert out["share_exiters"].min() == pytest.approx(1.0, abs=1e-12)
