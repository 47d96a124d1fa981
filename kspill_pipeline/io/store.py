"""Hive-layout parquet store with atomic partition writes (pure: no Dagster import).

Layout: ``<root>/<asset>/year=YYYY/part-0.parquet`` for yearly assets and
``<root>/<asset>/part-0.parquet`` for unpartitioned ones. A write goes to a hidden temporary
file in the target folder, is flushed and fsynced, then ``os.replace``-d over the previous file,
so a process killed mid-write leaves the previous version intact and readable (readers only see
``part-*.parquet``). The arrow schema comes from the dataset's data contract.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Iterable

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

PART_NAME = "part-0.parquet"
TMP_PREFIX = ".tmp-"


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
        dfd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
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
    return write_table_atomic(table, partition_file(root, asset, year))


def existing_years(root: Path | str, asset: str) -> list[int]:
    base = Path(root) / asset
    out = []
    if base.is_dir():
        for d in base.glob("year=*"):
            if (d / PART_NAME).is_file():
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
    paths = [partition_file(root, asset, y) for y in ys]
    missing = [p for p in paths if not p.is_file()]
    if missing and not missing_ok:
        raise FileNotFoundError(
            f"asset {asset!r}: partition file(s) missing in store {root}: "
            + ", ".join(str(p) for p in missing[:5])
        )
    paths = [p for p in paths if p.is_file()]
    if not paths:
        raise FileNotFoundError(f"asset {asset!r}: no partitions found under {base}")
    return pl.scan_parquet([str(p) for p in paths], hive_partitioning=False)
