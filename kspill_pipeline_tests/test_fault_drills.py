"""Fault drills (issue 7, "Fault drills"): what a user sees when things break for real.

1. ``kill -9`` during a partition write, in a real subprocess: a large single-file partition written
   through the IO manager, killed in the middle of the parquet stream and right before the rename;
   a multi-part manifest partition (``firm_density_to_parquet``) killed between two staged parts,
   half-way through moving the parts into place, and right before the manifest commit. The previous
   version must stay byte-identical and be what readers get, the leftovers must be invisible, and a
   re-run must succeed and remove them. The subprocess is paused at the chosen point by a small
   hook (it blocks inside the real write path) so the kill lands exactly there, never after.
2. A Dask worker process dies (SIGKILL on its pid) while the chunked firm density runs on a real
   ``distributed.LocalCluster`` (2 worker processes, the project's ``DaskResource``): the run is
   retried and its output is identical to an undisturbed run; with retries switched off it fails
   with an error saying that a worker died, and the published partition is the old one, complete.
3. One year's raw customs file gets a record with an unquoted delimiter in a firm name (more
   fields than the header): ``kspill run --keep-going`` fails that year only, naming the file and
   the rule; the regression asset (``s000_table1``) then refuses to run, naming the failed
   partition; after the file is restored, re-running that year and then the regression succeeds
   and reproduces the table of the undisturbed build.

Expected values: previous versions are compared byte for byte (sha256) with what was on disk before
the kill; recomputed densities with ``firm_density_in_memory`` (one dense ``relatedness.density``
call, an independent path) and with an undisturbed run; the regression table with the table of
the build before the corruption.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml
from polars.testing import assert_frame_equal

from kspill_pipeline.compute import firm_density as fd
from kspill_pipeline.io import store

REPO = Path(__file__).resolve().parent.parent
YEAR = 2009


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _generation(root: Path, asset: str, year: int) -> str:
    return json.loads((store.partition_dir(root, asset, year) / store.MANIFEST_NAME).read_text())["generation"]


def _start(script: str, *args: str, tmp: Path) -> tuple[subprocess.Popen, "queue.Queue[str]"]:
    """Start ``python -c script args``; its stdout lines arrive in the returned queue."""
    err = open(tmp / "child.stderr", "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE, stderr=err,
                            cwd=str(REPO), text=True)
    lines: "queue.Queue[str]" = queue.Queue()

    def pump():
        for line in proc.stdout:
            lines.put(line.strip())
        lines.put("<EOF>")

    threading.Thread(target=pump, daemon=True).start()
    return proc, lines


def _wait_for(proc, lines, expected: str, tmp: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            proc.kill()
            pytest.fail(f"child never printed {expected!r}; stderr:\n{(tmp / 'child.stderr').read_text()[-3000:]}")
        if line == expected:
            return
        if line == "<EOF>":
            pytest.fail(f"child exited ({proc.wait()}) before {expected!r}; stderr:\n"
                        f"{(tmp / 'child.stderr').read_text()[-3000:]}")


def _kill9(proc) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL  # killed, it did not finish on its own


# ------------------------------------------------------------------------------------------------
# 1a. kill -9 while the IO manager writes a single-file partition
# ------------------------------------------------------------------------------------------------

# one year of product_relatedness-shaped rows (the contract's columns), deterministic in (n, seed)
RELATEDNESS_FRAME = '''
import numpy as np, polars as pl
def relatedness_frame(n, seed):
    rng = np.random.default_rng(seed)
    p1 = rng.integers(100000, 999999, n)
    p2 = rng.integers(100000, 999999, n)
    c = rng.integers(0, 500, n)
    return pl.DataFrame({
        "year": pl.Series([2009] * n, dtype=pl.Int32), "product_level": ["hs6"] * n, "basis": ["firm"] * n,
        "variant": ["min_conditional"] * n, "product_1": p1.astype(str), "product_2": p2.astype(str),
        "phi": rng.random(n), "c_12": c, "u_1": c + 1, "u_2": c + 2, "n_units": np.full(n, 10_000),
    })
'''

IOM_WRITE = RELATEDNESS_FRAME + '''
import os, sys, time
import pyarrow.parquet as pq
from dagster import build_output_context
from kspill_pipeline.config import YearRange
from kspill_pipeline.io.io_manager import ParquetStoreIOManager
from kspill_pipeline.partitions import years_partitions

root, mode, n = sys.argv[1], sys.argv[2], int(sys.argv[3])

def pause(why):
    print(why, flush=True)
    time.sleep(600)  # killed here

if mode == "mid_write":
    # the real parquet writer streams into the real temp file; once 1 MiB of it is on disk, stop
    real_write_table = pq.write_table

    class Paced:
        def __init__(self, fh):
            self.fh, self.n, self.closed = fh, 0, False
        def write(self, b):
            out = self.fh.write(b)
            self.n += len(b)
            if self.n >= 1 << 20:
                self.fh.flush()
                os.fsync(self.fh.fileno())
                pause("PAUSED")
            return out
        def flush(self):
            self.fh.flush()
        def tell(self):
            return self.fh.tell()
        def writable(self):
            return True
        def close(self):
            pass

    pq.write_table = lambda table, where, **kw: real_write_table(table, Paced(where), **kw)
elif mode == "before_rename":
    real_replace = os.replace

    def replace(src, dst):
        if os.path.basename(src).startswith(".tmp-"):
            pause("PAUSED")  # the temp file is complete and fsynced; the rename never happens
        return real_replace(src, dst)

    os.replace = replace

df = relatedness_frame(n, 2)
ctx = build_output_context(asset_key="product_relatedness", partition_key="2009",
                           asset_partitions_def=years_partitions(YearRange(start=2000, end=2016)))
print("WRITING", flush=True)
ParquetStoreIOManager(base_dir=root).handle_output(ctx, df)
print("DONE", flush=True)
'''


def _relatedness_frame(n: int, seed: int) -> pl.DataFrame:
    ns: dict = {}
    exec(RELATEDNESS_FRAME, ns)  # the same builder the child process uses
    return ns["relatedness_frame"](n, seed)


def _iom():
    from dagster import build_input_context, build_output_context

    from kspill_pipeline.config import YearRange
    from kspill_pipeline.io.io_manager import ParquetStoreIOManager
    from kspill_pipeline.partitions import years_partitions

    pdef = years_partitions(YearRange(start=2000, end=2016))

    def out():  # one output context per write (a context takes its output metadata once)
        return build_output_context(asset_key="product_relatedness", partition_key=str(YEAR), asset_partitions_def=pdef)

    inp = build_input_context(asset_key="product_relatedness", partition_key=str(YEAR), asset_partitions_def=pdef)
    return ParquetStoreIOManager, out, inp


@pytest.mark.parametrize("kill_at", ["mid_write", "before_rename"])
def test_kill9_during_single_file_write_keeps_previous_version(tmp_path, kill_at):
    from kspill_pipeline.contracts.loader import load_contract

    IOM, out_ctx, in_ctx = _iom()
    root = tmp_path / "store"
    iom = IOM(base_dir=str(root))
    v1 = _relatedness_frame(5_000, 1)
    iom.handle_output(out_ctx(), v1)
    folder = store.partition_dir(root, "product_relatedness", YEAR)
    part = folder / store.PART_NAME
    sha_v1 = _sha(part)

    proc, lines = _start(IOM_WRITE, str(root), kill_at, "400000", tmp=tmp_path)
    _wait_for(proc, lines, "WRITING", tmp_path)
    _wait_for(proc, lines, "PAUSED", tmp_path)
    _kill9(proc)

    # the killed write left its temp file behind (garbage) ...
    leftovers = sorted(p.name for p in folder.iterdir() if p.name != store.PART_NAME)
    assert len(leftovers) == 1 and leftovers[0].startswith(store.TMP_PREFIX), leftovers
    tmp_file = folder / leftovers[0]
    assert tmp_file.stat().st_size >= 1 << 20  # the kill landed inside v2's write
    if kill_at == "mid_write":  # a torn parquet stream: no footer
        assert tmp_file.read_bytes()[-4:] != b"PAR1"
    # ... but the previous version is byte-identical, and it is all that readers see
    assert _sha(part) == sha_v1
    assert store.existing_years(root, "product_relatedness") == [YEAR]
    assert store.partition_files(root, "product_relatedness", YEAR) == [part]
    expected_v1 = load_contract("product_relatedness").conform(v1)
    assert_frame_equal(store.scan(root, "product_relatedness", [YEAR]).collect(), expected_v1, check_exact=True)
    assert_frame_equal(iom.load_input(in_ctx).collect(), expected_v1, check_exact=True)

    # re-running the write succeeds and removes the leftover
    v2 = _relatedness_frame(400_000, 2)
    iom.handle_output(out_ctx(), v2)
    assert sorted(p.name for p in folder.iterdir()) == [store.PART_NAME]
    assert_frame_equal(store.scan(root, "product_relatedness", [YEAR]).collect(),
                       load_contract("product_relatedness").conform(v2), check_exact=True)


# ------------------------------------------------------------------------------------------------
# 1b. kill -9 during a multi-part (manifest) partition
# ------------------------------------------------------------------------------------------------

BASKETS = '''
import numpy as np, polars as pl
def baskets(seed, n_firms=2000, n_products=80):
    """(export edges, import edges, products) of random firm baskets, about 4 products per firm."""
    rng = np.random.default_rng(seed)
    products = np.array([f"{i:04d}" for i in range(1000, 1000 + n_products)])
    firms = np.repeat([f"F{i:05d}" for i in range(n_firms)], 4)
    ex = pl.DataFrame({"unit_id": firms, "product": products[rng.integers(0, n_products, firms.size)]})
    im = pl.DataFrame({"unit_id": firms, "product": products[rng.integers(0, n_products, firms.size)]})
    return ex, im, products
'''

MANIFEST_WRITE = BASKETS + '''
import os, sys, time
from pathlib import Path
from kspill_pipeline.compute import firm_density as fd
from kspill_pipeline.compute import relatedness as rel

out, mode = sys.argv[1], sys.argv[2]

def pause(why):
    print(why, flush=True)
    time.sleep(600)  # killed here

done = []
if mode == "between_parts":
    real_bucket = fd._density_bucket

    def bucket(*args):
        res = real_bucket(*args)  # part <bucket> is complete in the staging folder
        done.append(args[4])
        if len(done) == 2:
            pause("PAUSED")
        return res

    fd._density_bucket = bucket
elif mode in ("mid_commit", "before_manifest"):
    real_replace = os.replace

    def replace(src, dst):
        name = os.path.basename(dst)
        if mode == "before_manifest" and name == "_manifest.json":
            pause("PAUSED")  # every part moved, manifest temp written: the commit rename never happens
        res = real_replace(src, dst)
        if mode == "mid_commit" and name.startswith("part-") and name.endswith("-00001.parquet"):
            pause("PAUSED")  # two parts of the new generation moved into place, the rest still staged
        return res

    os.replace = replace

ex, im, products = baskets(7)
M = rel.to_matrix(ex.with_columns(v=pl.lit(1.0)), "unit_id", "product", "v", products=products)[0]
phi = rel.proximity(rel.cooccurrence(M))
print("WRITING", flush=True)
fd.firm_density_to_parquet(im, phi, products, out, n_buckets=6, threshold=0.05)
print("DONE", flush=True)
'''


def _baskets(seed: int):
    ns: dict = {}
    exec(BASKETS, ns)
    return ns["baskets"](seed)


def _phi(ex: pl.DataFrame, products) -> np.ndarray:
    from kspill_pipeline.compute import relatedness as rel

    M = rel.to_matrix(ex.with_columns(v=pl.lit(1.0)), "unit_id", "product", "v", products=products)[0]
    return rel.proximity(rel.cooccurrence(M))


def _sorted(df: pl.DataFrame) -> pl.DataFrame:
    return df.sort("unit_id", "product")


@pytest.mark.parametrize("kill_at", ["between_parts", "mid_commit", "before_manifest"])
def test_kill9_during_manifest_partition_keeps_previous_generation(tmp_path, kill_at):
    root = tmp_path / "store"
    out = store.partition_dir(root, "firm_import_density", YEAR)
    ex1, im1, products = _baskets(1)
    fd.firm_density_to_parquet(im1, _phi(ex1, products), products, out, n_buckets=3, threshold=0.05)
    manifest = out / store.MANIFEST_NAME
    v1_files = store.partition_files(root, "firm_import_density", YEAR)
    before = {p.name: _sha(p) for p in [manifest, *v1_files]}
    v1 = _sorted(store.scan(root, "firm_import_density", [YEAR]).collect())
    assert_frame_equal(v1, fd.firm_density_in_memory(im1, _phi(ex1, products), products, threshold=0.05),
                       check_exact=True)

    proc, lines = _start(MANIFEST_WRITE, str(out), kill_at, tmp=tmp_path)
    _wait_for(proc, lines, "WRITING", tmp_path)
    _wait_for(proc, lines, "PAUSED", tmp_path)
    _kill9(proc)

    # leftovers of the killed run, by where it died
    extra = sorted(p.name for p in out.iterdir() if p.name not in before)
    staging = [n for n in extra if n.startswith(store.STAGING_PREFIX)]
    orphans = [n for n in extra if n.startswith(store.PART_PREFIX)]
    tmp_files = [n for n in extra if n.startswith(store.TMP_PREFIX)]
    assert sorted(staging + orphans + tmp_files) == extra
    if kill_at == "between_parts":
        assert len(staging) == 1 and not orphans and not tmp_files
        assert len(list((out / staging[0]).glob("part-*.parquet"))) == 2
    elif kill_at == "mid_commit":
        assert len(staging) == 1 and len(orphans) == 2 and not tmp_files
        assert len(list((out / staging[0]).glob("part-*.parquet"))) == 4
    else:
        assert len(orphans) == 6 and len(tmp_files) == 1 and tmp_files[0].endswith(".json")
    # the previous generation: manifest and parts byte-identical, and all that readers see
    assert {n: _sha(out / n) for n in before} == before
    assert store.partition_files(root, "firm_import_density", YEAR) == v1_files
    assert_frame_equal(_sorted(store.scan(root, "firm_import_density", [YEAR]).collect()), v1, check_exact=True)
    assert_frame_equal(_sorted(fd.scan_parts(out).collect()), v1, check_exact=True)
    assert store.existing_years(root, "firm_import_density") == [YEAR]

    # the re-run (the same inputs the killed process had) publishes and removes every leftover
    ex2, im2, _ = _baskets(7)
    phi2 = _phi(ex2, products)
    res = fd.firm_density_to_parquet(im2, phi2, products, out, n_buckets=6, threshold=0.05)
    assert sorted(p.name for p in out.iterdir()) == sorted([store.MANIFEST_NAME, *(p.name for p in res.files)])
    assert len(res.files) == 6
    assert_frame_equal(_sorted(store.scan(root, "firm_import_density", [YEAR]).collect()),
                       fd.firm_density_in_memory(im2, phi2, products, threshold=0.05), check_exact=True)


# ------------------------------------------------------------------------------------------------
# 2. a Dask worker process dies during the chunked density
# ------------------------------------------------------------------------------------------------

# run on every worker: each bucket task announces itself (file "start-<bucket>-<pid>") and sleeps,
# so that the test can kill a worker process while tasks are running on it
SLOW_TASKS = '''
import os, time
from pathlib import Path
from kspill_pipeline.compute import firm_density as fd
real = getattr(fd, "_drill_real_bucket", None) or fd._density_bucket
fd._drill_real_bucket = real

def _slow_bucket(*args):
    Path(SIGNALS, f"start-{args[4]}-{os.getpid()}").touch()
    time.sleep(DELAY)
    return real(*args)

fd._density_bucket = _slow_bucket
'''


RESTORE_TASKS = '''
from kspill_pipeline.compute import firm_density as fd
fd._density_bucket = getattr(fd, "_drill_real_bucket", fd._density_bucket)
'''


@pytest.fixture(scope="module")
def process_cluster():
    from kspill_pipeline.dask_resource import DaskResource

    with DaskResource(n_workers=2, threads_per_worker=1, processes=True, memory_limit="1GB").get_client() as c:
        yield c


@pytest.fixture
def slow_workers(process_cluster):
    """Install the slow-task hook on every worker (returns the worker pids); removed afterwards."""
    client = process_cluster

    def install(signals: Path, delay: float) -> dict:
        client.wait_for_workers(2, timeout=60)
        client.run(exec, f"SIGNALS = {str(signals)!r}\nDELAY = {delay!r}\n" + SLOW_TASKS, {})
        return client.run(os.getpid)

    yield install
    client.run(exec, RESTORE_TASKS, {})


def _density_in_background(client, im, phi, products, out: Path, **kw) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def go():
        try:
            box["result"] = fd.firm_density_to_parquet(im, phi, products, out, n_buckets=4, threshold=0.05,
                                                       client=client, **kw)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["error"] = e

    th = threading.Thread(target=go, daemon=True)
    th.start()
    return th, box


def _kill_a_busy_worker(signals: Path, worker_pids: dict, th: threading.Thread, box: dict) -> int:
    """SIGKILL the worker process that announced the first running bucket task."""
    deadline = time.monotonic() + 60
    while not list(signals.glob("start-*")):
        assert th.is_alive(), f"the run ended before any bucket task started: {box}"
        assert time.monotonic() < deadline, "no bucket task started"
        time.sleep(0.01)
    pid = int(sorted(signals.glob("start-*"))[0].name.rsplit("-", 1)[1])
    assert pid in worker_pids.values() and pid != os.getpid()  # a real worker process, not this one
    os.kill(pid, signal.SIGKILL)
    return pid


def test_dask_worker_killed_mid_run_is_retried_and_output_is_identical(process_cluster, slow_workers, tmp_path):
    client = process_cluster
    ex1, im, products = _baskets(3)
    ex2, _, _ = _baskets(4)
    phi1, phi2 = _phi(ex1, products), _phi(ex2, products)
    out = tmp_path / "store" / "firm_import_density" / f"year={YEAR}"
    fd.firm_density_to_parquet(im, phi1, products, out, n_buckets=4, threshold=0.05, client=client)
    # the undisturbed run of the new inputs, on the same cluster
    undisturbed = tmp_path / "undisturbed"
    fd.firm_density_to_parquet(im, phi2, products, undisturbed, n_buckets=4, threshold=0.05, client=client)

    signals = tmp_path / "signals"
    signals.mkdir()
    pids = slow_workers(signals, delay=0.4)
    th, box = _density_in_background(client, im, phi2, products, out)
    killed = _kill_a_busy_worker(signals, pids, th, box)
    th.join(timeout=180)
    assert not th.is_alive()
    assert "error" not in box, box.get("error")
    res = box["result"]
    # the worker really died (the nanny started a new process), and the run was retried
    assert killed not in client.run(os.getpid).values()
    assert res.worker_loss_retries >= 1
    # published: exactly the new generation, complete, identical to the undisturbed run and to the
    # in-memory reference
    assert sorted(p.name for p in out.iterdir()) == sorted([store.MANIFEST_NAME, *(p.name for p in res.files)])
    new = fd.scan_parts(out).collect()
    assert_frame_equal(_sorted(new), _sorted(fd.scan_parts(undisturbed).collect()), check_exact=True)
    assert_frame_equal(_sorted(new), fd.firm_density_in_memory(im, phi2, products, threshold=0.05), check_exact=True)


def test_dask_worker_killed_without_retries_fails_clearly_and_publishes_nothing(process_cluster, slow_workers,
                                                                                 tmp_path):
    client = process_cluster
    ex1, im, products = _baskets(5)
    ex2, _, _ = _baskets(6)
    out = tmp_path / "store" / "firm_import_density" / f"year={YEAR}"
    r1 = fd.firm_density_to_parquet(im, _phi(ex1, products), products, out, n_buckets=4, threshold=0.05,
                                    client=client)
    before = {p.name: _sha(p) for p in out.iterdir()}
    v1 = fd.scan_parts(out).collect()

    signals = tmp_path / "signals"
    signals.mkdir()
    pids = slow_workers(signals, delay=0.4)
    th, box = _density_in_background(client, im, _phi(ex2, products), products, out, worker_loss_retries=0)
    _kill_a_busy_worker(signals, pids, th, box)
    th.join(timeout=180)
    assert not th.is_alive()
    err = box.get("error")
    assert isinstance(err, fd.FirmDensityError), box
    msg = str(err)
    assert "a Dask worker died during the computation" in msg and "nothing was published" in msg
    assert str(out) in msg
    # the old generation is untouched: same files, same bytes, no staging folder, manifest complete
    assert {p.name: _sha(p) for p in out.iterdir()} == before
    assert fd.read_manifest(out) == r1.files
    assert_frame_equal(fd.scan_parts(out).collect(), v1, check_exact=True)


# ------------------------------------------------------------------------------------------------
# 3. a corrupt raw file for one year
# ------------------------------------------------------------------------------------------------

DRILL_YEARS = (2007, 2010)
BAD_YEAR = 2009
THREADS = "resources:\n  dask:\n    config: {processes: false, n_workers: 1}\n"
# everything s000_table1 reads, plus the reference tables (multi-asset steps run whole)
BUILD = ('group:reference or group:trade or group:relatedness or key:"firm_export_history" or '
         'key:"s000_city_marketization" or key:"s000_firm_controls" or key:"s000_panel" or key:"s000_table1"')
YEARLY = "group:trade or group:relatedness"


@pytest.fixture(scope="module")
def four_year_universe(tiny_universe, tmp_path_factory) -> Path:
    """The tiny universe cut to 2007-2010 (source.yaml years and customs folders): every S000 asset
    needs all years of trade_clean, and four years keep the drill fast."""
    d = tmp_path_factory.mktemp("drill_universe") / "data"
    shutil.copytree(tiny_universe, d)
    src = yaml.safe_load((d / "source.yaml").read_text(encoding="utf-8"))
    src["years"] = {"start": DRILL_YEARS[0], "end": DRILL_YEARS[1]}
    (d / "source.yaml").write_text(yaml.safe_dump(src, sort_keys=False), encoding="utf-8")
    for folder in (d / src["customs_dir"]).iterdir():
        if not DRILL_YEARS[0] <= int(folder.name) <= DRILL_YEARS[1]:
            shutil.rmtree(folder)
    return d


def _run(capsys, *args) -> tuple[int, str, str]:
    from kspill_pipeline import cli

    capsys.readouterr()
    rc = cli.main(["run", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_corrupt_raw_year_fails_alone_and_regressions_refuse_until_fixed(four_year_universe, tmp_path, capsys):
    data, st = four_year_universe, tmp_path / "store"
    cfg = tmp_path / "threads.yaml"
    cfg.write_text(THREADS, encoding="utf-8")
    common = ["--data", str(data), "--store", str(st), "--ephemeral", "--config", str(cfg)]
    rc, out, err = _run(capsys, *common, "--select", BUILD)
    assert rc == 0, err
    table_before = store.scan(st, "s000_table1").collect()
    table_sha = [_sha(p) for p in store.partition_files(st, "s000_table1", None)]
    clean_sha = _sha(store.partition_file(st, "trade_clean", BAD_YEAR))
    density_gen = {y: _generation(st, "firm_import_density", y) for y in range(DRILL_YEARS[0], DRILL_YEARS[1] + 1)}

    # a revised release of one year arrives with a firm name holding an unquoted delimiter
    raw = data / "customs" / str(BAD_YEAR) / f"customs_{BAD_YEAR}.csv"
    good_bytes = raw.read_bytes()
    lines = good_bytes.split(b"\n")
    header = lines[0].decode("utf-8-sig").split(",")
    row = lines[150].decode("utf-8").split(",")
    row[header.index("firm_name")] += ",分公司"
    lines[150] = ",".join(row).encode("utf-8")
    raw.write_bytes(b"\n".join(lines))

    rc, out, err = _run(capsys, *common, "--keep-going", "--select", YEARLY)
    assert rc == 1
    failed = [ln for ln in err.splitlines() if ln.startswith("  - ")]
    assert failed and all(f"partition {BAD_YEAR}:" in ln for ln in failed), err
    assert f"customs/{BAD_YEAR}/customs_{BAD_YEAR}.csv" in failed[0]
    assert "a record has more fields than the header" in failed[0]
    for y in (2007, 2008, 2010):  # the other years ran again, to the end of the yearly group
        assert f"[{y}] done" in out
        assert _generation(st, "firm_import_density", y) != density_gen[y]
    assert f"[{BAD_YEAR}] FAILED" in out
    # the failed year keeps its previous, complete version on disk
    assert _sha(store.partition_file(st, "trade_clean", BAD_YEAR)) == clean_sha
    assert _generation(st, "firm_import_density", BAD_YEAR) == density_gen[BAD_YEAR]

    # the regressions refuse that data: its latest run failed
    rc, out, err = _run(capsys, *common, "--select", "s000_table1")
    assert rc == 1, f"s000_table1 ran on trade_clean {BAD_YEAR} although the latest run of that partition failed"
    assert f"asset trade_clean partition {BAD_YEAR}: its latest run failed" in err, err
    assert f"customs_{BAD_YEAR}.csv" in err and "more fields than the header" in err
    assert [_sha(p) for p in store.partition_files(st, "s000_table1", None)] == table_sha  # not rewritten

    # fixed file: re-run that year, then the regression, which reproduces the table of the first build
    raw.write_bytes(good_bytes)
    rc, out, err = _run(capsys, *common, "--years", str(BAD_YEAR), "--select", YEARLY)
    assert rc == 0, err
    assert store.gate_problems(st, "trade_clean", [BAD_YEAR]) == []
    rc, out, err = _run(capsys, *common, "--select", "s000_table1")
    assert rc == 0, err
    assert_frame_equal(store.scan(st, "s000_table1").collect(), table_before, check_exact=False, rel_tol=1e-9)
