"""``kspill backfill``: resumable after SIGKILL, skips what is current, re-runs what is stale, and
refuses an invalid configuration before any asset runs.

The reference for "equal outputs" is an uninterrupted ``kspill run`` of the same selection into
another store; staleness rules are exercised on hand-made store partitions.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from kspill_pipeline import cli
from kspill_pipeline.io import freshness, store

REPO = Path(__file__).resolve().parent.parent
SELECT = "group:trade or group:relatedness"
YEARS = "2008-2010"
YEAR_LIST = (2008, 2009, 2010)
ASSETS = ("trade_clean", "trade_quarantine", "trade_cleaning_report", "firm_city", "product_relatedness",
          "city_export_rca", "city_export_density", "city_complexity", "city_import_density", "firm_import_density")
# threads instead of worker processes: same results, no cluster start-up cost in tests
THREADS = "resources:\n  dask:\n    config: {processes: false, n_workers: 1}\n"


def _args(cmd, data, st, cfg, *extra):
    return [cmd, "--data", str(data), "--store", str(st), "--ephemeral", "--years", YEARS,
            "--select", SELECT, "--config", str(cfg), *extra]


def _files(st: Path, years=YEAR_LIST) -> dict[tuple[str, int], list[Path]]:
    return {(a, y): store.partition_files(st, a, y) for a in ASSETS for y in years if store.is_published(st, a, y)}


def _stamp(paths) -> list[tuple[str, int, int]]:
    return [(p.name, p.stat().st_ino, p.stat().st_mtime_ns) for p in paths]


def _sorted_frame(paths) -> pl.DataFrame:
    df = pl.concat([pl.read_parquet(p) for p in paths], how="vertical")
    return df.sort(df.columns, nulls_last=True)


@pytest.fixture(scope="module")
def killed_and_resumed(tiny_universe, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("backfill")
    cfg = tmp / "threads.yaml"
    cfg.write_text(THREADS, encoding="utf-8")
    st = tmp / "store"
    # 1. a real `kspill backfill` process, SIGKILLed once 2008 is done and 2009 is being written
    proc = subprocess.Popen([sys.executable, "-m", "kspill_pipeline.cli", *_args("backfill", tiny_universe, st, cfg)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    mark = store.partition_file(st, "trade_clean", 2009)
    deadline = time.monotonic() + 240
    while not mark.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    out = proc.stdout.read().decode(errors="replace")
    assert proc.returncode == -signal.SIGKILL, out  # it was killed, it did not finish
    at_kill = _files(st)
    stamps_2008 = {k: _stamp(v) for k, v in at_kill.items() if k[1] == 2008}
    # 2. resume: the same command again, in this process
    t0 = time.time()
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(_args("backfill", tiny_universe, st, cfg))
    resumed_out = buf.getvalue()
    assert rc == 0, resumed_out
    # 3. reference: one uninterrupted run
    ref = tmp / "ref"
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(_args("run", tiny_universe, ref, cfg)) == 0
    return dict(store=st, ref=ref, cfg=cfg, data=tiny_universe, at_kill=at_kill, stamps_2008=stamps_2008,
                resumed_out=resumed_out, killed_out=out, t_resume=t0)


def test_kill_happened_mid_way(killed_and_resumed):
    at_kill = killed_and_resumed["at_kill"]
    assert all((a, 2008) in at_kill for a in ASSETS), sorted(at_kill)  # the first year had landed
    assert ("trade_clean", 2009) in at_kill
    assert not any(y == 2010 for _, y in at_kill)  # the last year had not started


def test_resume_skips_landed_partitions_and_completes_the_rest(killed_and_resumed):
    r = killed_and_resumed
    out = r["resumed_out"]
    assert "[2008] current: 10 asset(s) skipped" in out
    assert "[2009] run 10 of 10" in out  # the interrupted year has no lineage record: redone whole
    assert "[2010] run 10 of 10" in out
    assert "ran 20 partition(s), skipped 10 current partition(s)" in out
    # 2008's files were not rewritten (same inode and mtime)
    now = _files(r["store"], [2008])
    assert {k: _stamp(v) for k, v in now.items()} == r["stamps_2008"]
    # every partition is now published with a lineage record whose checks passed
    for a in ASSETS:
        for y in YEAR_LIST:
            rec = freshness.read_lineage(r["store"], a, y)
            assert rec is not None and all(rec["checks"].values()), (a, y)


def test_outputs_equal_an_uninterrupted_run(killed_and_resumed):
    r = killed_and_resumed
    got, ref = _files(r["store"]), _files(r["ref"])
    assert set(got) == set(ref) == {(a, y) for a in ASSETS for y in YEAR_LIST}
    for k in sorted(ref):
        a, b = _sorted_frame(got[k]), _sorted_frame(ref[k])
        assert a.schema == b.schema, k
        assert_frame_equal(a, b, check_exact=False, rel_tol=1e-9, abs_tol=1e-12), k


def test_backfill_again_runs_nothing(killed_and_resumed, capsys):
    r = killed_and_resumed
    before = {k: _stamp(v) for k, v in _files(r["store"]).items()}
    assert cli.main(_args("backfill", r["data"], r["store"], r["cfg"])) == 0
    out = capsys.readouterr().out
    assert "ran 0 partition(s), skipped 30 current partition(s)" in out
    assert {k: _stamp(v) for k, v in _files(r["store"]).items()} == before


def test_changed_raw_file_and_changed_switch_make_exactly_the_affected_partitions_stale(killed_and_resumed, tmp_path,
                                                                                       capsys):
    r = killed_and_resumed
    data = tmp_path / "data"
    shutil.copytree(r["data"], data, ignore=shutil.ignore_patterns("_truth"))
    # same bytes, new mtime: nothing is stale (content fingerprints)
    f = data / "customs" / "2009" / "customs_2009.csv"
    os.utime(f, (time.time() + 10, time.time() + 10))
    assert cli.main(_args("backfill", data, r["store"], r["cfg"], "--dry-run")) == 0
    assert "would run 0 partition(s)" in capsys.readouterr().out
    # one more record in 2009's raw file: 2009 (all ten assets) and nothing else
    lines = f.read_bytes().splitlines(keepends=True)
    f.write_bytes(b"".join(lines) + lines[-1])
    assert cli.main(_args("backfill", data, r["store"], r["cfg"], "--dry-run")) == 0
    out = capsys.readouterr().out
    assert "[2008] current" in out and "[2010] current" in out
    assert "[2009] run 10 of 10 (trade_clean: inputs changed since it was built: customs_raw/2009" in out
    # a relatedness switch: the 7 relatedness assets of every year, none of the 3 trade assets
    cfg = tmp_path / "rca.yaml"
    cfg.write_text(THREADS + "  relatedness:\n    config: {rca_threshold: 1.5}\n", encoding="utf-8")
    assert cli.main(_args("backfill", r["data"], r["store"], cfg, "--dry-run")) == 0
    out = capsys.readouterr().out
    for y in YEAR_LIST:
        assert f"[{y}] run 7 of 10" in out
    assert "would run 21 partition(s), skipped 9 current partition(s)" in out


@pytest.mark.parametrize("cmd", ["backfill", "run"])
@pytest.mark.parametrize("body, expected", [
    ("resources:\n  relatedness:\n    config: {product_level: hs5}\n",
     "resources.relatedness.config.product_level: Input should be 'hs2', 'hs4' or 'hs6' (got 'hs5')"),
    ("resources:\n  s000:\n    config: {phi_lag: 2}\n", "phi_lag' = 2 is not allowed; allowed values: 0, 1"),
    ("ops:\n  clean_customs:\n    config: {hs_mode: fancy}\n",
     "ops.clean_customs.config.hs_mode: Input should be 'single_target' or 'value_split' (got 'fancy')"),
    ("resources:\n  relatedness:\n    config: {prodct_level: hs4}\n",
     "resources.relatedness.config.prodct_level: unknown key; allowed keys under resources.relatedness.config: "
     "city_preset, density_firm_threshold"),
    ("ops:\n  clean_custom: {config: {}}\n", "ops: unknown op(s) ['clean_custom']; allowed: "),
])
def test_invalid_configuration_fails_before_any_asset_runs(tiny_universe, tmp_path, capsys, cmd, body, expected):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(body, encoding="utf-8")
    st = tmp_path / "store"
    rc = cli.main([cmd, "--data", str(tiny_universe), "--store", str(st), "--ephemeral", "--years", "2008",
                   "--config", str(cfg)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "invalid configuration" in err and "nothing was run" in err
    assert expected in err, err
    if "unknown op" in expected:
        assert "clean_customs," in err.split("allowed: ", 1)[1]  # the allowed op names are listed
    assert not st.exists() or not any(st.iterdir())  # no asset ran, nothing was written


# ------------------------------------------------------------------------------------------------
# staleness rules on hand-made partitions (no Dagster)
# ------------------------------------------------------------------------------------------------


def test_partition_status_rules(tmp_path):
    st = tmp_path / "s"
    store.write_frame(pl.DataFrame({"a": [1, 2]}), st, "up", 2001)
    store.write_frame(pl.DataFrame({"b": [3]}), st, "down", 2001)
    inputs = {"config": "c1", "up/2001": freshness.stored_fingerprint(st, "up", 2001)}
    assert freshness.partition_status(st, "down", 2001, inputs).reason.startswith("no lineage record")
    freshness.write_lineage(st, "down", 2001, inputs=inputs, checks={"schema": True, "ge": True},
                            blocking=["schema", "ge"])
    s = freshness.partition_status(st, "down", 2001, inputs)
    assert s.current and s.reason == "current"
    assert not freshness.partition_status(st, "down", 2002, inputs).current  # not materialised

    # upstream rewritten (same content, new file): stale, naming the input
    time.sleep(0.01)
    store.write_frame(pl.DataFrame({"a": [1, 2]}), st, "up", 2001)
    now = {"config": "c1", "up/2001": freshness.stored_fingerprint(st, "up", 2001)}
    s = freshness.partition_status(st, "down", 2001, now)
    assert not s.current and s.reason == "inputs changed since it was built: up/2001"
    # another configuration
    s = freshness.partition_status(st, "down", 2001, inputs | {"config": "c2"})
    assert not s.current and "config" in s.reason

    # a failed or missing blocking check
    freshness.write_lineage(st, "down", 2001, inputs=inputs, checks={"schema": True, "ge": False},
                            blocking=["schema", "ge"])
    assert freshness.partition_status(st, "down", 2001, inputs).reason == "blocking check(s) failed: ge"
    freshness.write_lineage(st, "down", 2001, inputs=inputs, checks={"schema": True}, blocking=["schema", "ge"])
    assert freshness.partition_status(st, "down", 2001, inputs).reason == "blocking check(s) failed: ge"

    # the data rewritten behind the lineage's back (e.g. by a UI run)
    freshness.write_lineage(st, "down", 2001, inputs=inputs, checks={"schema": True}, blocking=["schema"])
    time.sleep(0.01)
    store.write_frame(pl.DataFrame({"b": [4]}), st, "down", 2001)
    s = freshness.partition_status(st, "down", 2001, inputs)
    assert s.reason == "data rewritten after its lineage was recorded"

    # a check gate (_checks.json) that records a failure wins too
    freshness.write_lineage(st, "down", 2001, inputs=inputs, checks={"schema": True}, blocking=["schema"])
    store.write_gate(st, "down", 2001, {"schema": False})
    assert "failed check(s) schema" in freshness.partition_status(st, "down", 2001, inputs).reason
