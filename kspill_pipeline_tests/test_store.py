"""Parquet store: hive layout, atomic writes (killed writer leaves the previous version), lazy loads."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import polars as pl
import pytest

from kspill_pipeline.io import store


def test_layout_and_multi_year_scan(tmp_path):
    for y in (2001, 2002, 2003):
        store.write_frame(pl.DataFrame({"year": [y, y], "v": [1.0, 2.0]}), tmp_path, "a", y)
    assert (tmp_path / "a" / "year=2002" / "part-0.parquet").is_file()
    assert store.existing_years(tmp_path, "a") == [2001, 2002, 2003]
    lf = store.scan(tmp_path, "a", [2001, 2003])
    assert isinstance(lf, pl.LazyFrame)
    df = lf.collect().sort("year")
    assert df["year"].to_list() == [2001, 2001, 2003, 2003]
    # one partition still comes back as one lazy frame (no dict-vs-frame trap)
    assert isinstance(store.scan(tmp_path, "a", [2002]), pl.LazyFrame)


def test_missing_partition_is_a_clear_error(tmp_path):
    store.write_frame(pl.DataFrame({"year": [2001]}), tmp_path, "a", 2001)
    with pytest.raises(FileNotFoundError, match=r"asset 'a'.*year=2005"):
        store.scan(tmp_path, "a", [2001, 2005])
    assert store.scan(tmp_path, "a", [2001, 2005], missing_ok=True).collect().height == 1


WRITER = textwrap.dedent(
    """
    import sys, numpy as np, polars as pl
    from kspill_pipeline.io import store
    root = sys.argv[1]
    store.write_frame(pl.DataFrame({"x": np.arange(1000)}), root, "big", 2001)
    print("v1", flush=True)
    rng = np.random.default_rng(0)
    big = pl.DataFrame({"x": np.arange(40_000_000), "y": rng.random(40_000_000)})
    print("v2-start", flush=True)
    store.write_frame(big, root, "big", 2001)
    print("v2-done", flush=True)
    """
)


def test_killed_writer_leaves_previous_version(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "v1"
    assert proc.stdout.readline().strip() == "v2-start"
    folder = tmp_path / "big" / "year=2001"
    deadline = time.time() + 60
    # wait until the temporary file of version 2 exists and has bytes, then kill -9
    while time.time() < deadline:
        tmps = list(folder.glob(".tmp-*"))
        if tmps and tmps[0].stat().st_size > 0:
            break
        time.sleep(0.005)
    else:
        proc.kill()
        pytest.fail("writer never started the temporary file")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    df = pl.read_parquet(folder / "part-0.parquet")
    assert df.height == 1000 and df["x"].to_list() == list(range(1000))
    assert store.scan(tmp_path, "big").collect_schema().names() == ["x"]
    # the next write cleans the stale temporary file and succeeds
    store.write_frame(pl.DataFrame({"x": [1, 2]}), tmp_path, "big", 2001)
    assert not list(folder.glob(".tmp-*"))
    assert pl.read_parquet(folder / "part-0.parquet")["x"].to_list() == [1, 2]
