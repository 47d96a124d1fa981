"""Replication page of study S000 (studies/s000_replication.py) on hand-built tidy tables."""

import polars as pl
import pytest

from kspill_pipeline.studies import s000_replication as rep

TERMS = ("density_firm", "density_city", "interaction", "tradevalue", "newexport")


def _row(table, model, term, est, pub, kind="coef", se=0.1):
    return {"table": table, "model": model, "term": term, "kind": kind, "estimate": est, "std_error": se,
            "n_obs": 1000, "published": pub, "published_std_error": None if pub is None else 0.01}


@pytest.fixture()
def tidy():
    rows = []
    # model (5): ours ordered |.|: density_city 0.9 > density_firm 0.5 > newexport 0.3 > interaction -0.2 > tradevalue -0.1
    # published (spec 5.1): 0.344, 0.412, -0.191, -0.054, 0.333 -> city > firm > newexport > interaction > tradevalue
    ours5 = {"density_firm": 0.5, "density_city": 0.9, "interaction": -0.2, "tradevalue": -0.1, "newexport": 0.3}
    pub5 = {"density_firm": 0.344, "density_city": 0.412, "interaction": -0.191, "tradevalue": -0.054, "newexport": 0.333}
    for t in TERMS:
        rows.append(_row("table1", "(5)", t, ours5[t], pub5[t]))
        # AMEs: ours = 0.05 * beta for every regressor (naive), published ~0.07 * beta
        rows.append(_row("table1", "(6)", t, 0.05 * ours5[t], round(0.07 * pub5[t], 3), kind="ame_naive"))
        rows.append(_row("table1", "(6)", t, 0.0, None, kind="ame_interaction_aware"))
    # one sign disagreement in model (4)
    rows.append(_row("table1", "(4)", "density_firm", -1.0, 5.0))
    rows.append(_row("table1", "(4)", "density_city", 2.0, 2.1))
    # Table 2: West > East for density_firm (holds); density_city East 1.0 < West 1.2 (does not hold)
    rows += [_row("table2", "East", "density_firm", 3.0, 5.0), _row("table2", "West", "density_firm", 4.0, 6.9),
             _row("table2", "East", "density_city", 1.0, 0.9), _row("table2", "West", "density_city", 1.2, 0.7)]
    # marketization: density_firm 6 -> 5 -> 4 falls (holds); Mid mkt density_city missing -> n/a
    rows += [_row("table2", "Low mkt", "density_firm", 6.0, 5.295), _row("table2", "Mid mkt", "density_firm", 5.0, 5.238),
             _row("table2", "High mkt", "density_firm", 4.0, 4.844),
             _row("table2", "Low mkt", "density_city", 0.5, 0.806), _row("table2", "High mkt", "density_city", 0.9, 0.891)]
    return pl.DataFrame(rows)


def test_comparison_counts_and_signs(tidy):
    comp = rep.comparison(tidy)
    # published cells: 5 (model 5) + 5 (AME naive) + 2 (model 4) + 4 + 5 (table 2) = 21; ame_interaction_aware excluded
    assert comp.height == 21
    assert set(comp["kind"]) == {"coef", "ame_naive"}
    bad = comp.filter(~pl.col("sign_agrees"))
    assert bad.select("model", "term").rows() == [("(4)", "density_firm")]
    r = comp.filter((pl.col("model") == "(4)") & (pl.col("term") == "density_city"))
    assert r["ratio_to_published"][0] == pytest.approx(2.0 / 2.1)


def test_patterns_by_hand(tidy):
    p = {x["name"]: x for x in rep.patterns(tidy)}
    order = p["Model (5): regressors ordered by |standardised coefficient|"]
    assert order["ours"] == "density_city > density_firm > newexport > interaction > tradevalue"
    assert order["holds"] is True
    ame = next(v for k, v in p.items() if k.startswith("AME/beta"))
    assert ame["holds"] is True and "0.0500" in ame["ours"]
    assert p["Table 2, density_firm: West > East"]["holds"] is True
    assert p["Table 2, density_city: East > West"]["holds"] is False
    assert p["Table 2, density_firm falls from low to high marketization"]["holds"] is True
    assert p["Table 2, density_city rises from low to high marketization"]["holds"] is None


def test_page_states_synthetic_disclaimer(tidy):
    page = rep.replication_page(tidy, synthetic=True, data_label="demo", years=[2003, 2016],
                                switches={"phi_lag": 0}, skipped={"Mid mkt": "no variation"})
    assert "cannot reproduce the published magnitudes" in page
    assert "Signs agree in 20 of 21 published cells" in page
    assert "Panel years: 2003-2016" in page and "`phi_lag` | `0`" in page
    assert "subsample **Mid mkt** not estimated: no variation" in page
    real = rep.replication_page(tidy, synthetic=False, data_label="own", years=[2002], switches={})
    assert "cannot reproduce" not in real
