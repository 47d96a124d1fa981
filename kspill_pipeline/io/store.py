"""Hive-layout parquet store with atomic partition writes (pure: no Dagster import).

Layout: ``<root>/<asset>/year=YYYY/part-0.parquet`` for yearly assets and
``<root>/<asset>/part-0.parquet`` for unpartitioned ones. Chunked outputs (firm_import_density)
instead publish several ``part-<generation>-<k>.parquet`` files listed in ``_manifest.json``
(see :func:`commit_parts`); readers resolve a partition through :func:`partition_files`, which
prefers the manifest. A write goes to a hidden temporary
file in the target folder, is flushed and fsynced, then ``os.replace``-d over the previous file,
so a process killed mid-write leaves the previous version intact and readable (readers only see
``part-*.parquet``). The arrow schema comes from the dataset's data contract.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
import uuid
from pathlib import Path
from typing import Iterable

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

PART_NAME = "part-0.parquet"
TMP_PREFIX = ".tmp-"
MANIFEST_NAME = "_manifest.json"
MANIFEST_FORMAT = "kspill-parts-manifest/1"
STAGING_PREFIX = ".staging-"
PART_PREFIX = "part-"



def write_file_atomic(target: Path | str, data: bytes | str) -> Path:
    """Write a side file (figure, rendered table, report) atomically: hidden temp file in the same
    folder, fsync, ``os.replace``. Readers see the old file or the new one, never a torn one."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{uuid.uuid4().hex}-{target.name}"
    payload = data.encode("utf-8") if isinstance(data, str) else data
    try:
        with open(tmp, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target

def partition_dir(root: Path | str, asset: str, year: int | str | None) -> Path:
    base = Path(root) / asset
    return base if year is None else base / f"year={int(year)}"


def partition_file(root: Path | str, asset: str, year: int | str | None) -> Path:
    return partition_dir(root, asset, year) / PART_NAME


def _cleanup_stale_tmp(folder: Path) -> None:
    for p in folder.glob(f"{TMP_PREFIX}*"):
        try:
            p.unlink()
        except OSError:
            pass


def write_table_atomic(table: pa.Table, target: Path, *, row_group_size: int = 1_000_000) -> Path:
    """Write ``table`` to ``target`` atomically (temp file in the same folder + os.replace)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    _cleanup_stale_tmp(target.parent)
    tmp = target.parent / f"{TMP_PREFIX}{uuid.uuid4().hex}-{target.name}"
    try:
        with open(tmp, "wb") as fh:
            pq.write_table(table, fh, compression="zstd", row_group_size=row_group_size)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def write_frame(
    df: pl.DataFrame,
    root: Path | str,
    asset: str,
    year: int | str | None,
    schema: pa.Schema | None = None,
) -> Path:
    """Write one partition of ``asset`` (``year=None`` for unpartitioned) atomically."""
    table = df.to_arrow()
    if schema is not None:
        table = table.select(schema.names).cast(schema)
        table = table.replace_schema_metadata(schema.metadata)
    path = write_table_atomic(table, partition_file(root, asset, year))
    clear_failure(root, asset, year)
    return path


def partition_files(root: Path | str, asset: str, year: int | str | None) -> list[Path]:
    """Files of one published partition: the manifest's generation, else ``part-0.parquet``.

    Raises FileNotFoundError when the partition has not been published."""
    d = partition_dir(root, asset, year)
    if (d / MANIFEST_NAME).is_file():
        return read_manifest(d)
    f = d / PART_NAME
    if f.is_file():
        return [f]
    raise FileNotFoundError(f"asset {asset!r}: partition {year} not found in store {root} ({d})")


def is_published(root: Path | str, asset: str, year: int | str | None) -> bool:
    d = partition_dir(root, asset, year)
    return (d / MANIFEST_NAME).is_file() or (d / PART_NAME).is_file()


def existing_years(root: Path | str, asset: str) -> list[int]:
    base = Path(root) / asset
    out = []
    if base.is_dir():
        for d in base.glob("year=*"):
            if (d / PART_NAME).is_file() or (d / MANIFEST_NAME).is_file():
                out.append(int(d.name.split("=", 1)[1]))
    return sorted(out)


def scan(
    root: Path | str,
    asset: str,
    years: Iterable[int | str] | None = None,
    *,
    missing_ok: bool = False,
) -> pl.LazyFrame:
    """One lazy frame over the requested partitions (all existing ones when ``years`` is None)."""
    base = Path(root) / asset
    if years is None:
        if (base / PART_NAME).is_file():
            return pl.scan_parquet(base / PART_NAME)
        ys = existing_years(root, asset)
    else:
        ys = sorted({int(y) for y in years})
    paths: list[Path] = []
    missing = []
    for y in ys:
        try:
            paths += partition_files(root, asset, y)
        except FileNotFoundError:
            missing.append(partition_dir(root, asset, y))
    if missing and not missing_ok:
        raise FileNotFoundError(
            f"asset {asset!r}: partition(s) missing in store {root}: "
            + ", ".join(str(p) for p in missing[:5])
        )
    if not paths:
        raise FileNotFoundError(f"asset {asset!r}: no partitions found under {base}")
    return pl.scan_parquet([str(p) for p in paths], hive_partitioning=False)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------------
# manifest protocol
# ------------------------------------------------------------------------------------------------


def _new_generation() -> str:
    # sortable (microseconds since the epoch) + random suffix (unique across processes)
    return f"{time.time_ns() // 1000:016d}{secrets.token_hex(3)}"


def _load_manifest(final_dir: Path) -> dict:
    path = Path(final_dir) / MANIFEST_NAME
    with open(path, encoding="utf-8") as fh:
        m = json.load(fh)
    if m.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path}: not a {MANIFEST_FORMAT} manifest")
    return m


def commit_parts(tmp_dir: Path | str, final_dir: Path | str, *, metadata: dict | None = None) -> list[Path]:
    """Publish every ``*.parquet`` of ``tmp_dir`` as the new generation of ``final_dir``, atomically.

    1. each file is moved (``os.replace``; a copy + fsync + rename when ``tmp_dir`` is on another
       filesystem) to ``final_dir/part-<generation>-<k>.parquet`` (k = 0, 1, ... in the sorted order of
       the staged names); nothing references these files yet;
    2. ``final_dir/_manifest.json`` (format, generation, previous generation, files, rows per file,
       total rows, created time, ``metadata``) is written to a temp file, fsynced and ``os.replace``-d
       over the old manifest: the commit point;
    3. ``part-*.parquet`` files not listed in the new manifest and stale ``.staging-*`` folders in
       ``final_dir`` are deleted, then ``tmp_dir``.

    Returns the published paths. A crash before step 2 leaves the previous manifest in force (the
    new files are orphans removed by the next commit); after step 2 the new one. One writer per
    ``final_dir`` at a time (Dagster runs one step per partition).
    """
    tmp_dir = Path(tmp_dir)
    final_dir = Path(final_dir)
    final_dir.mkdir(parents=True, exist_ok=True)
    staged = sorted(p for p in tmp_dir.glob("*.parquet") if p.is_file())
    prev = None
    if (final_dir / MANIFEST_NAME).is_file():
        try:
            prev = _load_manifest(final_dir).get("generation")
        except (ValueError, json.JSONDecodeError, OSError):
            prev = None
    gen = _new_generation()
    names, rows = [], []
    for k, src in enumerate(staged):
        n_rows = pq.ParquetFile(src).metadata.num_rows
        dst = final_dir / f"{PART_PREFIX}{gen}-{k:05d}.parquet"
        try:
            os.replace(src, dst)
        except OSError:  # cross-device: copy to a hidden temp name, fsync, then rename
            tmp = final_dir / f".tmp-{uuid.uuid4().hex}-{dst.name}"
            shutil.copyfile(src, tmp)
            _fsync_file(tmp)
            os.replace(tmp, dst)
        names.append(dst.name)
        rows.append(int(n_rows))
    _fsync_dir(final_dir)
    manifest = {
        "format": MANIFEST_FORMAT,
        "generation": gen,
        "previous_generation": prev,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": names,
        "rows": rows,
        "total_rows": int(sum(rows)),
        "metadata": metadata or {},
    }
    tmp_m = final_dir / f".tmp-manifest-{uuid.uuid4().hex}.json"
    try:
        with open(tmp_m, "w", encoding="utf-8") as fh:
            json.dump(manifest, fh, indent=1, sort_keys=True, default=str)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_m, final_dir / MANIFEST_NAME)  # commit point
    finally:
        if tmp_m.exists():
            tmp_m.unlink()
    _fsync_dir(final_dir)
    keep = set(names)
    for p in final_dir.glob(f"{PART_PREFIX}*.parquet"):
        if p.name not in keep:
            try:
                p.unlink()
            except OSError:
                pass
    for d in final_dir.glob(f"{STAGING_PREFIX}*"):
        if d.is_dir() and d.resolve() != tmp_dir.resolve():
            shutil.rmtree(d, ignore_errors=True)
    shutil.rmtree(tmp_dir, ignore_errors=True)
    # temp files of a killed writer (e.g. the manifest temp of a commit killed before its rename,
    # a cross-device copy): invisible to readers, removed here (one writer per folder)
    _cleanup_stale_tmp(final_dir)
    (final_dir / FAILED_NAME).unlink(missing_ok=True)
    return [final_dir / n for n in names]


def read_manifest(final_dir: Path | str) -> list[Path]:
    """The files of the current generation of ``final_dir`` (from ``_manifest.json``).

    Raises ``FileNotFoundError`` when there is no manifest (nothing published yet) or when a listed
    file is missing (the folder was tampered with)."""
    final_dir = Path(final_dir)
    if not (final_dir / MANIFEST_NAME).is_file():
        raise FileNotFoundError(f"no {MANIFEST_NAME} in {final_dir}: nothing has been published there")
    m = _load_manifest(final_dir)
    files = [final_dir / n for n in m["files"]]
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{final_dir}: manifest generation {m['generation']} lists missing files {missing[:3]}")
    return files


def scan_parts(final_dir: Path | str) -> pl.LazyFrame:
    """One LazyFrame over the current generation of ``final_dir``."""
    files = read_manifest(final_dir)
    if not files:
        raise FileNotFoundError(f"{final_dir}: the current generation has no files")
    return pl.scan_parquet([str(p) for p in files], hive_partitioning=False)


# ------------------------------------------------------------------------------------------------
# check gates: the outcome of a partition's blocking checks, stored beside its data
# ------------------------------------------------------------------------------------------------

GATE_NAME = "_checks.json"
#: marker of a failed run of the partition (written by ``kspill run``/``backfill`` for the assets of
#: a failed step; removed when the partition is published or its checks are recorded again)
FAILED_NAME = "_failed.json"


def data_fingerprint(root: Path | str, asset: str, year: int | str | None) -> str:
    """Names, sizes and mtimes of the partition's published files (changes whenever data is rewritten)."""
    parts = []
    for p in partition_files(root, asset, year):
        st = p.stat()
        parts.append(f"{p.name}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


def write_gate(root: Path | str, asset: str, year: int | str | None, checks: dict[str, bool]) -> Path:
    """Record the blocking-check outcomes of a published partition (atomic; temp file + replace)."""
    d = partition_dir(root, asset, year)
    d.mkdir(parents=True, exist_ok=True)
    body = {"asset": asset, "year": year, "checks": {k: bool(v) for k, v in sorted(checks.items())},
            "data_fingerprint": data_fingerprint(root, asset, year),
            "written_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    tmp = d / f"{TMP_PREFIX}{uuid.uuid4().hex}-{GATE_NAME}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(body, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, d / GATE_NAME)
    clear_failure(root, asset, year)
    return d / GATE_NAME


def record_failure(root: Path | str, asset: str, year: int | str | None, error: str) -> Path:
    """Record that the latest run of a partition failed (atomic; temp file + replace).

    The partition's files are left as they are (the previous version stays readable), but
    :func:`gate_problems` reports the failure until a later run publishes the partition
    (:func:`write_frame`, :func:`commit_parts`) or records its checks (:func:`write_gate`): gated
    consumers (regressions) must not silently use data that the latest input could not reproduce,
    e.g. a revised raw file that fails to parse."""
    d = partition_dir(root, asset, year)
    d.mkdir(parents=True, exist_ok=True)
    body = {"asset": asset, "year": year, "error": " ".join(str(error).split())[:2000],
            "failed_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    tmp = d / f"{TMP_PREFIX}{uuid.uuid4().hex}-{FAILED_NAME}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(body, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, d / FAILED_NAME)
    return d / FAILED_NAME


def clear_failure(root: Path | str, asset: str, year: int | str | None) -> None:
    (partition_dir(root, asset, year) / FAILED_NAME).unlink(missing_ok=True)


def failure(root: Path | str, asset: str, year: int | str | None) -> dict | None:
    """The recorded failure of the partition's latest run (None when there is none)."""
    f = partition_dir(root, asset, year) / FAILED_NAME
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {"error": f"unreadable {FAILED_NAME}"}


def gate_problems(root: Path | str, asset: str, years: Iterable[int | str | None]) -> list[str]:
    """Why partitions of ``asset`` may not be used: its latest run failed (:func:`record_failure`),
    not published, no recorded checks, a failed blocking check, or data rewritten after its checks
    ran. Empty list = all clear."""
    out: list[str] = []
    for y in years:
        label = f"asset {asset} partition {y if y is not None else 'all'}"
        failed_run = failure(root, asset, y)
        if failed_run is not None:
            out.append(f"{label}: its latest run failed ({failed_run.get('error', '?')}); the stored data, if any, "
                       "are from an earlier run and stay unused until a run of this partition succeeds")
            continue
        if not is_published(root, asset, y):
            out.append(f"{label}: not materialised")
            continue
        g = partition_dir(root, asset, y) / GATE_NAME
        if not g.is_file():
            out.append(f"{label}: no blocking-check evaluation recorded")
            continue
        body = json.loads(g.read_text(encoding="utf-8"))
        failed = [k for k, v in body.get("checks", {}).items() if not v]
        if failed:
            out.append(f"{label}: failed check(s) {', '.join(failed)}")
        elif body.get("data_fingerprint") != data_fingerprint(root, asset, y):
            out.append(f"{label}: data changed after its checks ran (stale evaluation)")
    return out
