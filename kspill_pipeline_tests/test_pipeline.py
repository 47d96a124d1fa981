"""End-to-end: raw synthetic files -> trade_clean / trade_quarantine through Dagster and the CLI.

Truths come from the generator's sidecar (planted dirt positions) and from an independent pandas
count of the raw files, never from the pipeline's own output.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import polars as pl
import pytest
from dagster import AssetIn, DagsterInstance, asset, materialize

from kspill_pipeline import cli
from kspill_pipeline.definitions import build_definitions

YEARS = (2001, 2004, 2009, 2014)  # .dta, monthly GBK CSV, UTF-8 CSV, parquet


def _independent_row_count(path: Path) -> int:
    suf = path.suffix.lower()
    if suf == ".dta":
        return len(pd.read_stata(path, convert_categoricals=False))
    if suf == ".parquet":
        return len(pd.read_parquet(path))
    raw = path.read_bytes()
    for enc in ("utf-8-sig", "gb18030"):
        try:
            text = raw.decode(enc)
            break
        except UnicodeDecodeError:
            continue
    else:
        text = raw.decode("gb18030", errors="replace")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return len(lines) - 1


@pytest.fixture(scope="module")
def tiny_run(tiny_universe, tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    rc = cli.main(["run", "--data", str(tiny_universe), "--store", str(store), "--ephemeral",
                   "--years", ",".join(map(str, YEARS)), "--select", "group:trade or group:reference"])
    assert rc == 0
    return tiny_universe, store


def test_cli_materialises_every_requested_year(tiny_run):
    _, store = tiny_run
    for asset in ("trade_clean", "trade_quarantine", "trade_cleaning_report"):
        for y in YEARS:
            assert (store / asset / f"year={y}" / "part-0.parquet").is_file(), (asset, y)


def test_quarantine_equals_planted_dirt(tiny_run):
    data, store = tiny_run
    q = pl.scan_parquet(str(store / "trade_quarantine" / "year=*" / "part-0.parquet")).collect()
    dirt = pl.read_parquet(data / "_truth" / "dirt.parquet").filter(pl.col("year").is_in(YEARS))
    assert dirt.height > 0 and q.height == dirt.height
    m = q.join(dirt, on=["source_file", "source_row"], how="inner")
    assert m.height == dirt.height
    assert (m["reason"] == m["expected_reason"]).all()
    # several rule families are exercised in these four years
    assert len(set(q["reason"])) >= 6, set(q["reason"])


def test_rows_and_value_accounting_against_independent_count(tiny_run):
    data, store = tiny_run
    for y in YEARS:
        files = sorted((data / "customs").rglob(f"*{y}*"))
        files = [f for f in files if f.is_file()]
        n_raw = sum(_independent_row_count(f) for f in files)
        clean = pl.read_parquet(store / "trade_clean" / f"year={y}" / "part-0.parquet")
        quar = pl.read_parquet(store / "trade_quarantine" / f"year={y}" / "part-0.parquet")
        assert clean["source_rows"].sum() + quar.height == pytest.approx(n_raw, abs=1e-6), y
        # no planted dirt survives into trade_clean: every kept value is positive and every city known
        assert (clean["value_usd"] > 0).all()
        assert clean["city_code"].null_count() == 0


def test_clean_presence_matches_planted_truth(tiny_run):
    """Firm x HS4 ordinary exports of non-intermediaries equal the generator's clean export status."""
    data, store = tiny_run
    y = 2009
    clean = pl.read_parquet(store / "trade_clean" / f"year={y}" / "part-0.parquet")
    from kspill_pipeline.config import KEYWORD_PRESETS

    s000 = list(KEYWORD_PRESETS["s000"])
    got = (
        clean.filter(
            (pl.col("flow") == "export")
            & (pl.col("trade_mode_class") == "ordinary")
            & ~pl.col("intermediary_keywords").list.eval(pl.element().is_in(s000)).list.any()
        )
        .select("firm_id", "hs4").unique()
    )
    truth = (
        pl.read_parquet(data / "_truth" / "export_status.parquet")
        .filter((pl.col("year") == y) & (pl.col("exported") == 1))
        .select("firm_id", "hs4").unique()
    )
    assert got.sort(["firm_id", "hs4"]).equals(truth.sort(["firm_id", "hs4"]))


def _defs_assets(data, store):
    defs = build_definitions(data, store)
    return list(defs.assets), dict(defs.resources)


def test_blocking_check_failure_skips_downstream_in_same_run(tiny_universe, tmp_path, monkeypatch):
    """A cleaning bug that duplicates rows is caught by unique_grain and stops downstream steps."""
    import kspill_pipeline.compute.cleaning as cleaning

    real = cleaning.clean_customs_chunked

    def buggy(frames, year, cfg=None, **kw):
        res = real(frames, year, cfg, **kw)
        res.clean = pl.concat([res.clean, res.clean.head(3)])
        return res

    monkeypatch.setattr(cleaning, "clean_customs_chunked", buggy)
    seen = []

    @asset(partitions_def=build_definitions(tiny_universe, tmp_path).resolve_asset_graph()
           .get(__import__("dagster").AssetKey("trade_clean")).partitions_def,
           ins={"trade_clean": AssetIn()})
    def downstream_probe(trade_clean):
        seen.append(1)
        return None

    assets, resources = _defs_assets(tiny_universe, tmp_path)
    res = materialize(assets + [downstream_probe], selection=["trade_clean", "trade_quarantine",
                      "trade_cleaning_report", "downstream_probe"], partition_key="2004",
                      instance=DagsterInstance.ephemeral(), resources=resources, raise_on_error=False)
    assert not res.success
    failed = {e.check_name for e in res.get_asset_check_evaluations() if not e.passed}
    assert "unique_grain" in failed
    # the accounting check also sees the 3 phantom rows
    assert "row_value_accounting" in failed
    assert "ge_suite" in failed  # GE compound uniqueness sees the same duplicates
    assert seen == []
    probe_events = {e.event_type_value for e in res.all_events if "downstream_probe" in (e.step_key or "")}
    assert "STEP_START" not in probe_events and "STEP_SUCCESS" not in probe_events, probe_events
    mats = {e.asset_key.to_user_string() for e in res.get_asset_materialization_events()}
    assert "downstream_probe" not in mats and "trade_clean" in mats


def test_silent_row_loss_fails_accounting_and_cli_names_it(tiny_universe, tmp_path, monkeypatch, capsys):
    import kspill_pipeline.compute.cleaning as cleaning

    real = cleaning.clean_customs_chunked

    def lossy(frames, year, cfg=None, **kw):
        res = real(frames, year, cfg, **kw)
        res.clean = res.clean.slice(1)  # silently lose one clean row
        return res

    monkeypatch.setattr(cleaning, "clean_customs_chunked", lossy)
    rc = cli.main(["run", "--data", str(tiny_universe), "--store", str(tmp_path / "s"), "--ephemeral",
                   "--years", "2009", "--select", "group:trade"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "asset trade_clean partition 2009: check row_value_accounting FAILED" in err


def test_unreadable_year_fails_naming_file_and_field_other_years_complete(tiny_universe, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_universe, data, ignore=shutil.ignore_patterns("_truth"))
    target = sorted((data / "customs" / "2014").glob("*.parquet"))[0]
    df = pl.read_parquet(target)
    df.drop(df.columns[[i for i, c in enumerate(df.columns) if c in ("税号", "商品编码", "hs_code")][0]]) \
      .write_parquet(target)
    rc = cli.main(["run", "--data", str(data), "--store", str(tmp_path / "s"), "--ephemeral",
                   "--years", "2013-2015", "--keep-going", "--select", "group:trade or group:relatedness"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "partition 2014" in err and target.name in err and "hs_code" in err
    assert (tmp_path / "s" / "trade_clean" / "year=2013" / "part-0.parquet").is_file()
    assert (tmp_path / "s" / "trade_clean" / "year=2015" / "part-0.parquet").is_file()
    # no data for the failed year, only the failure marker that gated consumers refuse
    y14 = tmp_path / "s" / "trade_clean" / "year=2014"
    assert not list(y14.glob("*.parquet"))
    assert "hs_code" in (y14 / "_failed.json").read_text(encoding="utf-8")


def test_dagster_cli_materialises_a_partition_in_a_subprocess(tiny_universe, tmp_path):
    """The same path the UI uses: a run in its own process from the code location file."""
    env = dict(os.environ, KSPILL_DATA_DIR=str(tiny_universe), KSPILL_STORE_DIR=str(tmp_path / "s"),
               DAGSTER_HOME=str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "dagster"), "asset", "materialize", "-f",
         str(repo / "kspill_pipeline" / "definitions.py"), "--select",
         "trade_clean,trade_quarantine,trade_cleaning_report", "--partition", "2005"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "s" / "trade_clean" / "year=2005" / "part-0.parquet").is_file()
    assert "RUN_SUCCESS" in proc.stderr


def test_invalid_selection_is_a_clear_error_and_multi_asset_siblings_come_along():
    from kspill_pipeline.cli import resolve_selection
    from kspill_pipeline.definitions import build_definitions

    defs = build_definitions()
    with pytest.raises(SystemExit, match="invalid --select 'group:trade or firm_city'"):
        resolve_selection(defs, "group:trade or firm_city")
    # "+s000_table1" pulls trade_clean in as an ancestor; clean_customs cannot run a subset, so its
    # other outputs must come along (Dagster refuses the subset otherwise)
    names = {k.to_user_string() for k in resolve_selection(defs, "+s000_table1")}
    assert {"trade_clean", "trade_quarantine", "trade_cleaning_report"} <= names
