"""Export quality assets (issue 5) through Dagster on the tiny universe: accounting, normalisation
window, aggregation and decomposition recomputed independently from the stored inputs, and the
study-wide normalisation refusing a year whose blocking checks are missing."""

from __future__ import annotations

import shutil

import numpy as np
import polars as pl
import pytest

from kspill_pipeline import cli
from kspill_pipeline.io import store


def _all(st, name):
    return store.scan(st, name).collect()


def test_flow_accounting_against_trade_clean(full_tiny_store):
    tc = store.scan(full_tiny_store, "trade_clean").filter(pl.col("flow") == "export")
    by_year = tc.group_by("year").agg(pl.len().alias("n"), pl.col("value_usd").sum().alias("v")).collect()
    qf = _all(full_tiny_store, "quality_flow").group_by("year").agg(
        pl.col("n_rows").sum().alias("kept"), pl.col("value_usd").sum().alias("vk"))
    qq = _all(full_tiny_store, "quality_flow_quarantine").group_by("year").agg(
        pl.len().alias("quar"), pl.col("value_usd").sum().alias("vq"))
    m = by_year.join(qf, on="year", how="left").join(qq, on="year", how="left").fill_null(0)
    assert m.height == 17
    assert (m["n"] == m["kept"] + m["quar"]).all()
    assert np.allclose(m["v"], m["vk"] + m["vq"], rtol=1e-12)
    est = _all(full_tiny_store, "quality_estimates")
    # one estimate row per flow of every year (pooled estimation), most of them estimated
    assert est.height == _all(full_tiny_store, "quality_flow").height
    assert est.filter(pl.col("est_status") == "ok").height > 1000


def test_rqua_window_is_all_years_min_max(full_tiny_store):
    qf = _all(full_tiny_store, "quality_estimates").filter(pl.col("qua").is_not_null())
    bounds = qf.group_by("hs6").agg(pl.col("qua").min().alias("lo"), pl.col("qua").max().alias("hi"))
    qn = _all(full_tiny_store, "quality_normalised").join(bounds, on="hs6", how="left")
    rated = qn.filter(pl.col("rqua").is_not_null())
    expect = (rated["qua"] - rated["lo"]) / (rated["hi"] - rated["lo"])
    assert np.allclose(rated["rqua"], expect, rtol=0, atol=1e-12)
    assert rated["rqua"].min() == 0.0 and rated["rqua"].max() == 1.0
    # degenerate windows (one flow) stay null; every HS6 with two distinct values is rated
    deg = qn.filter(pl.col("qua").is_not_null() & (pl.col("hi") == pl.col("lo")))
    assert deg["rqua"].null_count() == deg.height


def test_city_hs4_is_value_weighted_mean_of_rqua(full_tiny_store):
    qn = _all(full_tiny_store, "quality_normalised").filter(pl.col("rqua").is_not_null())
    rows = {}
    for r in qn.iter_rows(named=True):
        k = (r["year"], r["city_code"], r["hs4"])
        a, b = rows.get(k, (0.0, 0.0))
        rows[k] = (a + r["value_usd"] * r["rqua"], b + r["value_usd"])
    agg = _all(full_tiny_store, "quality_city_hs4")
    assert agg.height == len(rows)
    for r in agg.iter_rows(named=True):
        a, b = rows[(r["year"], r["city_code"], r["hs4"])]
        assert r["hs4_qua"] == pytest.approx(a / b, abs=1e-12)


def test_decomposition_identity_and_totals(full_tiny_store):
    d = _all(full_tiny_store, "quality_decomposition")
    ok = d.filter(pl.col("status") == "ok")
    assert ok.height > 0
    comp = ok["within"] + ok["between"] + ok["entry"] + ok["exit"]
    assert np.allclose(comp, ok["total"], rtol=0, atol=1e-12)
    # total = hs4_qua(t) - hs4_qua(t-1) of the aggregate asset (independent path)
    agg = _all(full_tiny_store, "quality_city_hs4").select("year", "city_code", "hs4", "hs4_qua")
    j = ok.join(agg, on=["year", "city_code", "hs4"]).join(
        agg.with_columns((pl.col("year") + 1).alias("year")).rename({"hs4_qua": "prev"}),
        on=["year", "city_code", "hs4"])
    assert j.height == ok.height
    assert np.allclose(j["total"], j["hs4_qua"] - j["prev"], atol=1e-12)
    assert np.allclose(ok["gap"], ok["between"] + ok["entry"] + ok["exit"], atol=1e-15)


def test_estimates_refuse_a_year_without_passed_checks(full_tiny_store, tiny_universe, tmp_path, capsys):
    st = tmp_path / "store"
    shutil.copytree(full_tiny_store, st)
    (st / "quality_flow" / "year=2009" / "_checks.json").unlink()
    rc = cli.main(["run", "--data", str(tiny_universe), "--store", str(st), "--ephemeral",
                   "--select", "quality_estimates"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "quality_flow partition 2009" in err
