"""Relatedness assets end to end on the tiny universe (Dagster in-process), checked against an
independent plain-Python computation from trade_clean, plus the invariant checks failing on
corrupted inputs."""

from __future__ import annotations

from collections import defaultdict

import polars as pl
import pytest
from dagster import DagsterInstance, materialize

from kspill_pipeline import cli
from kspill_pipeline.config import KEYWORD_PRESETS
from kspill_pipeline.definitions import build_definitions
from kspill_pipeline.io import store

YEAR = 2009


@pytest.fixture(scope="module")
def run_store(tiny_universe, tmp_path_factory):
    st = tmp_path_factory.mktemp("rel_store")
    rc = cli.main(["run", "--data", str(tiny_universe), "--store", str(st), "--ephemeral", "--years", str(YEAR),
                   "--select", "group:trade or group:relatedness"])
    assert rc == 0
    return st


def _s000_rows(st):
    kws = set(KEYWORD_PRESETS["s000"])
    rows = store.scan(st, "trade_clean", [YEAR]).collect().to_dicts()
    return [r for r in rows if not (set(r["intermediary_keywords"]) & kws) and r["trade_mode_class"] != "processing"]


def test_phi_equals_plain_python_min_conditional_probability(run_store):
    rows = _s000_rows(run_store)
    firms_of = defaultdict(set)
    for r in rows:
        if r["flow"] == "export" and r["value_usd"] > 0:
            firms_of[r["hs4"]].add(r["firm_id"])
    got = store.scan(run_store, "product_relatedness", [YEAR]).collect()
    assert set(got["product_1"]) == set(firms_of)
    for r in got.iter_rows(named=True):
        a, b = firms_of[r["product_1"]], firms_of[r["product_2"]]
        c = len(a & b)
        assert r["c_12"] == c and r["u_1"] == len(a) and r["u_2"] == len(b)
        expected = 1.0 if r["product_1"] == r["product_2"] else c / max(len(a), len(b))
        assert r["phi"] == pytest.approx(expected, rel=1e-15, abs=0)
    # every pair with a positive co-occurrence is listed
    n_pos = sum(1 for p in firms_of for q in firms_of if len(firms_of[p] & firms_of[q]) > 0)
    assert got.height == n_pos


def test_firm_and_city_densities_equal_plain_python(run_store):
    rows = _s000_rows(run_store)
    phi_df = store.scan(run_store, "product_relatedness", [YEAR]).collect()
    space = sorted(set(phi_df["product_1"]))
    phi = {(r["product_1"], r["product_2"]): r["phi"] for r in phi_df.iter_rows(named=True)}
    colsum = {p: sum(phi.get((q, p), 0.0) for q in space) for p in space}
    basket = defaultdict(set)
    for r in rows:
        if r["flow"] == "import" and r["hs4"] in colsum:
            basket[r["firm_id"]].add(r["hs4"])
    fd = store.scan(run_store, "firm_import_density", [YEAR]).collect()
    expected = {}
    for f, b in basket.items():
        for p in space:
            d = sum(phi.get((q, p), 0.0) for q in b) / colsum[p]
            if d > 0.05:
                expected[(f, p)] = d
    got = {(r["firm_id"], r["product"]): r["density_firm"] for r in fd.iter_rows(named=True)}
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert got[k] == pytest.approx(v, rel=1e-6)  # stored as float32
    # city baskets = union of the baskets of the firms whose main city it is
    fc = dict(store.scan(run_store, "firm_city", [YEAR]).collect().select("firm_id", "city_code").iter_rows())
    city_b = defaultdict(set)
    for f, b in basket.items():
        city_b[fc[f]] |= b
    cd = store.scan(run_store, "city_import_density", [YEAR]).collect()
    for r in cd.iter_rows(named=True):
        b = city_b[r["city_code"]]
        d = sum(phi.get((q, r["product"]), 0.0) for q in b) / colsum[r["product"]]
        assert r["density_city"] == pytest.approx(d, rel=1e-12, abs=1e-15)
    assert set(cd["city_code"]) == {c for c, b in city_b.items() if b}


def test_corrupted_city_density_fails_the_invariant_and_blocks(tiny_universe, tmp_path, monkeypatch):
    """A bug that shrinks city baskets makes density_city < density_firm: the blocking check fails."""
    import kspill_pipeline.compute.relatedness_io as rio

    st = tmp_path / "s"
    assert cli.main(["run", "--data", str(tiny_universe), "--store", str(st), "--ephemeral", "--years", str(YEAR),
                     "--select", "trade_clean,trade_quarantine,trade_cleaning_report"]) == 0
    real = rio.basket_density_long

    def shrunk(baskets, units, phi, products, **kw):
        if kw.get("value_name") == "density_city":
            baskets = baskets.group_by("unit").head(1)  # keep one product per city
        return real(baskets, units, phi, products, **kw)

    monkeypatch.setattr(rio, "basket_density_long", shrunk)
    defs = build_definitions(tiny_universe, st)
    res = materialize(list(defs.assets), selection=["firm_city", "product_relatedness", "city_import_density",
                                                    "firm_import_density"],
                      partition_key=str(YEAR), instance=DagsterInstance.ephemeral(),
                      resources=dict(defs.resources), raise_on_error=False)
    assert not res.success
    failed = {(e.asset_key.to_user_string(), e.check_name) for e in res.get_asset_check_evaluations() if not e.passed}
    assert ("firm_import_density", "density_city_ge_firm") in failed


def test_phi_checks_catch_corrupted_phi():
    from kspill_pipeline.compute.invariants import phi_checks

    good = pl.DataFrame({
        "product_1": ["01", "01", "02", "02"], "product_2": ["01", "02", "01", "02"],
        "phi": [1.0, 0.5, 0.5, 1.0], "c_12": [2, 1, 1, 2], "u_1": [2, 2, 2, 2], "u_2": [2, 2, 2, 2],
    })
    assert all(o.passed for o in phi_checks(good, variant="min_conditional", diagonal="one"))
    bad = good.with_columns(pl.when((pl.col("product_1") == "01") & (pl.col("product_2") == "02"))
                            .then(0.6).otherwise(pl.col("phi")).alias("phi"))
    failed = {o.name for o in phi_checks(bad, variant="min_conditional", diagonal="one") if not o.passed}
    assert failed == {"phi_symmetric", "phi_bounds"}
    zero_diag = good.with_columns(pl.when(pl.col("product_1") == pl.col("product_2")).then(0.0)
                                  .otherwise(pl.col("phi")).alias("phi"))
    failed = {o.name for o in phi_checks(zero_diag, variant="min_conditional", diagonal="one") if not o.passed}
    assert failed == {"phi_diagonal"}
    assert all(o.passed for o in phi_checks(zero_diag, variant="min_conditional", diagonal="zero"))
