"""Firm-scale co-occurrence and relatedness density, chunked by firm bucket and run on Dask.

Pure numpy / scipy / polars / pyarrow / dask (never import Dagster here). Issue 3, "Firm scale
with Dask"; spec S000 sections 3.1-3.2 (phi from firm co-export, density of firm IMPORT baskets)
and 8.2 (``D = X Phi / 1^T Phi`` for ~10^5 importers x 1,220 HS4 per year: chunk by firm, filter
``density > 0.05`` immediately, write partitioned parquet, never materialise the dense matrix).

Work is split into ``n_buckets`` firm buckets by a HASH of the unit id, never by row ranges, so a
firm's whole basket is always in one bucket. Each bucket is one ``dask.delayed`` task:

* :func:`cooccurrence_chunked`: per bucket ``C_b = M_b^T M_b`` (kept scipy.sparse while sparse, so
  partials are small to send and add), then a pairwise tree sum. Every entry is an integer count
  (< 2**53 in float64), so the sum is exact and equal, bit for bit, to
  ``relatedness.cooccurrence(M)`` on the whole matrix.
* :func:`firm_density_to_parquet`: per bucket, ``relatedness.density_above`` returns the cells of
  ``relatedness.density_kernel`` (the exact kernel of ``relatedness.density``) with
  ``density > threshold`` (on the float64 value), bit-identical to computing every cell and
  filtering, but summing only the candidate cells that can pass (a basket of ~3 HS4 products keeps
  ~0.4 % of the cells); the values are cast to ``dtype`` and the kept cells of the bucket are
  written as ``part-<k>.parquet`` into a fresh staging folder.
  :func:`firm_density_in_memory` is the one-call reference the tests compare against.

``client=None`` runs the tasks with Dask's synchronous scheduler (tests, debugging); with a
``distributed.Client`` (see ``kspill_pipeline.dask_resource.DaskResource``) phi, its column sums,
the products and the threshold index are scattered to every worker once as one object, each
bucket's compact arrays (own buffers, never slices of the full edge list) are scattered once, then
``client.compute``.

Publishing protocol (manifest; :func:`commit_parts` / :func:`read_manifest`):

1. All parts of a run are written to a fresh staging folder ``<final>/.staging-<uuid>/``.
   Nothing in there is visible to readers.
2. Only after EVERY task succeeded, the parts are renamed (``os.replace``, same filesystem) to
   ``<final>/part-<generation>-<k>.parquet``; files of a new generation are invisible until ...
3. ... ``<final>/_manifest.json`` is replaced atomically (temp file + fsync + ``os.replace``) with
   one listing exactly the new generation's files. This single rename is the commit point.
4. Then every ``part-*.parquet`` not in the new manifest (old generation, orphans of a crashed
   commit) and stale staging folders are deleted.

Readers must go through :func:`read_manifest` / :func:`scan_parts`, never a ``part-*`` glob. A
failed task (an exception or a dead worker) aborts before step 2, removes the staging folder and
leaves the previous manifest and generation untouched and readable; a process killed anywhere
leaves either the old or the new manifest, each pointing at complete files.

A dead Dask worker (process killed, out of memory) takes the bucket inputs scattered to it with it,
so Dask cannot re-run the lost tasks by itself (``FutureCancelledError``: scattered data lost), and a
task whose workers keep dying ends in ``KilledWorker``. Both are treated as transient: the whole
computation is retried (``worker_loss_retries`` times, default 2) in a fresh staging folder, with the
inputs scattered again from this process; task exceptions (``BucketTaskError``) are never retried.
Every bucket is a pure function of its inputs, so a retried run writes the same rows as an
undisturbed one. When the retries are used up, :class:`FirmDensityError` says that a worker died.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import resource
import secrets
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import scipy.sparse as sp

from kspill_pipeline.io.store import (  # noqa: F401  (manifest protocol lives with the store)
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    PART_PREFIX,
    STAGING_PREFIX,
    _fsync_dir,
    _fsync_file,
    _load_manifest,
    commit_parts,
    read_manifest,
    scan_parts,
)

__all__ = [
    "BucketedBaskets",
    "DensityResult",
    "FirmDensityError",
    "basket_edges",
    "bucket_baskets",
    "cooccurrence_chunked",
    "firm_density_to_parquet",
    "firm_density_in_memory",
    "commit_parts",
    "read_manifest",
    "scan_parts",
    "MANIFEST_NAME",
]

# fixed seed: the firm -> bucket assignment is deterministic for a given polars version (the
# numbers never depend on it: every firm's row is computed independently of its bucket)
HASH_SEED = 0x6B5350
# rows of the dense (rows x products) float64 block the kernel produces at once inside a task:
# 256 x 1,220 HS4 x 8 bytes = 2.5 MB, whatever the bucket size. Small blocks stay in cache for the
# normalisation and filter passes and are recycled by malloc (measured best of 128-8192 on the
# full synthetic year: 256)
DEFAULT_BLOCK_ROWS = 256
#: whole-run retries after a Dask worker died (see the module docstring)
WORKER_LOSS_RETRIES = 2
log = logging.getLogger(__name__)
PARQUET_COMPRESSION = "zstd"
PARQUET_COMPRESSION_LEVEL = 1


class FirmDensityError(RuntimeError):
    """A firm-density run failed; nothing new was published (the previous generation is intact)."""


class BucketTaskError(RuntimeError):
    """Raised inside a bucket task; names the bucket (picklable: a single message argument)."""


def _worker_lost(e: BaseException) -> bool:
    """True for the errors ``distributed`` raises when a worker process died during the run:
    ``KilledWorker`` (a task's workers kept dying) and ``FutureCancelledError`` (a
    ``concurrent.futures.CancelledError``: the inputs scattered to the dead worker are lost)."""
    if isinstance(e, BucketTaskError):
        return False
    try:
        from distributed.scheduler import KilledWorker
    except ImportError:  # pragma: no cover - distributed is a dependency
        return False
    return isinstance(e, (KilledWorker, concurrent.futures.CancelledError))


def _rel():
    from kspill_pipeline.compute import relatedness

    return relatedness


# ------------------------------------------------------------------------------------------------
# bucketing: (unit_id, product) edges -> per-bucket compact CSR pieces
# ------------------------------------------------------------------------------------------------


@dataclass
class BucketedBaskets:
    """``(unit_id, product)`` edges split into firm buckets (one piece per bucket).

    ``pieces[b] = (units, cols)``: for every edge of bucket ``b`` its unit id (pyarrow array) and the
    column index of its product in ``products`` (int32). Edges may repeat; a firm is never split
    across buckets. The CSR matrix of a bucket is built inside its task (:func:`bucket_matrix`), so
    that work runs in parallel on the workers.
    """

    products: np.ndarray
    pieces: list[tuple[pa.Array, np.ndarray]]
    n_edges: int
    seconds: float

    @property
    def n_buckets(self) -> int:
        return len(self.pieces)


def _products_series(products: Sequence | np.ndarray) -> pl.Series:
    s = pl.Series("product", list(products) if not isinstance(products, np.ndarray) else products)
    if s.null_count():
        raise ValueError("`products` contains nulls")
    if s.n_unique() != len(s):
        raise ValueError("`products` contains duplicate labels")
    return s


def bucket_baskets(
    edges: pl.LazyFrame | pl.DataFrame,
    products: Sequence | np.ndarray,
    n_buckets: int,
    *,
    unit: str = "unit_id",
    product: str = "product",
    on_unknown: str = "raise",
) -> BucketedBaskets:
    """Split ``(unit, product)`` edges into ``n_buckets`` firm buckets.

    A unit goes to bucket ``hash(unit_id) % n_buckets`` (polars hash, fixed seed), so a firm is never
    split. Products must be in ``products`` (the column order, e.g. phi's); an edge with another
    product raises (``on_unknown="raise"``, default) or is dropped (``"drop"``: how an import basket is
    aligned with the product universe of phi, like ``relatedness.to_matrix(products=...)``).
    Null units or products are dropped (as ``relatedness.to_matrix`` does). The edges are collected
    in this process (one year of edges: 10^5-10^7 rows); deduplication and the per-bucket sort
    happen in the tasks.
    """
    if n_buckets < 1:
        raise ValueError("n_buckets must be >= 1")
    if on_unknown not in ("raise", "drop"):
        raise ValueError("on_unknown must be 'raise' or 'drop'")
    t0 = time.perf_counter()
    prod = _products_series(products)
    lf = edges.lazy() if isinstance(edges, pl.DataFrame) else edges
    schema = lf.collect_schema()
    for c in (unit, product):
        if c not in schema:
            raise ValueError(f"edges have no column {c!r} (columns: {list(schema.names())})")
    p_idx = pl.DataFrame({"_prod": prod}).with_row_index("_p").with_columns(pl.col("_p").cast(pl.Int32))
    df = (
        lf.select(pl.col(unit).alias("_u"), pl.col(product).cast(prod.dtype).alias("_prod"))
        .drop_nulls()
        .join(p_idx.lazy(), on="_prod", how="left")
        .select("_u", "_p", (pl.col("_u").hash(seed=HASH_SEED) % n_buckets).cast(pl.Int32).alias("_b"))
        .collect()
    )
    if df.get_column("_p").null_count():
        if on_unknown == "raise":
            bad = (
                lf.select(pl.col(product).cast(prod.dtype)).drop_nulls().unique()
                .join(p_idx.lazy().select("_prod"), left_on=pl.col(product), right_on="_prod", how="anti")
                .head(5).collect()
            )
            raise ValueError(
                f"edges contain products not in `products`, e.g. {bad.to_series().to_list()}; "
                "pass on_unknown='drop' to align a basket with phi's product universe"
            )
        df = df.drop_nulls("_p")
    # group the edges by bucket with a stable radix argsort of the small bucket numbers, and give
    # every piece its OWN compact buffers (pc.take): a slice of one big arrow array would pickle,
    # hence travel to its worker, with the whole parent buffer (16 buckets: 16 x the full edge list)
    b = df.get_column("_b").to_numpy()
    order = np.argsort(b.astype(np.int16) if n_buckets <= 2**15 else b, kind="stable")
    cols = df.get_column("_p").to_numpy()[order].astype(np.int32, copy=False)
    units_all = df.get_column("_u").to_arrow()
    if isinstance(units_all, pa.ChunkedArray):
        units_all = units_all.combine_chunks()
    bounds = np.searchsorted(b[order], np.arange(n_buckets + 1), side="left")
    pieces = []
    for k in range(n_buckets):
        r0, r1 = int(bounds[k]), int(bounds[k + 1])
        pieces.append((pc.take(units_all, pa.array(order[r0:r1])), np.ascontiguousarray(cols[r0:r1])))
    return BucketedBaskets(products=prod.to_numpy(), pieces=pieces, n_edges=df.height, seconds=time.perf_counter() - t0)


def bucket_matrix(piece, n_products: int) -> tuple[sp.csr_array, pa.Array]:
    """Binary CSR matrix of one bucket and its units (sorted ascending), in canonical form
    (duplicates merged, column indices sorted): the same rows ``relatedness.to_matrix`` builds."""
    units, cols = piece
    if isinstance(units, pa.ChunkedArray):
        units = units.combine_chunks()
    if len(units) == 0:
        return sp.csr_array((0, n_products), dtype=np.float64), units.slice(0, 0)
    enc = pc.dictionary_encode(units)
    codes = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    dic = enc.dictionary
    order = pc.sort_indices(dic).to_numpy()
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order), dtype=order.dtype)
    M = sp.coo_array(
        (np.ones(len(cols), dtype=np.float64), (rank[codes], cols.astype(np.int64, copy=False))),
        shape=(len(dic), n_products),
    ).tocsr()
    M.sum_duplicates()
    M.sort_indices()
    M.data[:] = 1.0  # binary presence (repeated edges were summed)
    return M, dic.take(pa.array(order))


def basket_edges(
    trade_clean: pl.LazyFrame | pl.DataFrame,
    flow: str,
    *,
    product_col: str = "hs4",
    exclude_intermediaries: bool = True,
    exclude_processing: bool = True,
) -> pl.LazyFrame:
    """Binary firm baskets ``(unit_id, product)`` of one flow from ``trade_clean`` rows.

    S000 sections 2 and 3.1-3.2: presence = value > 0 at firm x HS4 on the clean sample, i.e.
    without firms flagged ``is_intermediary`` (the active keyword list) and without processing
    trade rows (both switchable). A convenience for tests and benchmarks; the study assets may
    build their own baskets."""
    lf = trade_clean.lazy() if isinstance(trade_clean, pl.DataFrame) else trade_clean
    lf = lf.filter((pl.col("flow") == flow) & (pl.col("value_usd") > 0))
    if exclude_intermediaries:
        lf = lf.filter(~pl.col("is_intermediary"))
    if exclude_processing:
        lf = lf.filter(pl.col("trade_mode_class") != "processing")
    return lf.select(pl.col("firm_id").alias("unit_id"), pl.col(product_col).alias("product")).unique()


# ------------------------------------------------------------------------------------------------
# dask plumbing
# ------------------------------------------------------------------------------------------------


def _peak_rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _share(client, value, broadcast: bool = True):
    """Scatter ``value`` to the cluster once (a Future) or, without a client, wrap it as ONE
    delayed key so the synchronous graph does not tokenize or copy it per task."""
    import dask

    if client is None:
        return dask.delayed(value, name=f"data-{uuid.uuid4().hex}")
    return client.scatter(value, broadcast=broadcast, hash=False)


def _run(client, tasks: list):
    """Compute a list of delayed objects; synchronous scheduler without a client."""
    import dask

    if client is None:
        return list(dask.compute(*tasks, scheduler="synchronous"))
    futures = client.compute(tasks)
    try:
        return client.gather(futures)
    except BaseException:
        # stop queued tasks; tasks already running may still write (the caller moves the staging
        # folder away before deleting it, so they cannot recreate it)
        try:
            client.cancel(futures)
        except Exception:
            pass
        raise


def _tree_sum(parts: list):
    import dask

    add = dask.delayed(_add, pure=False)
    level = list(parts)
    while len(level) > 1:
        nxt = [add(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def _add(a, b):
    """Sum of two co-occurrence partials (dense arrays or scipy.sparse; integer counts, exact)."""
    if sp.issparse(a) and sp.issparse(b):
        return a + b
    if sp.issparse(a):
        a, b = b, a
    if sp.issparse(b):
        out = np.array(a, dtype=np.float64, copy=True)
        bc = b.tocoo()
        out[bc.row, bc.col] += bc.data  # canonical: no repeated (row, col)
        return out
    return a + b


# ------------------------------------------------------------------------------------------------
# co-occurrence
# ------------------------------------------------------------------------------------------------


def _cooc_matrix(piece, n_products: int) -> sp.csr_array:
    """Binary CSR of one bucket with rows in ANY order (first appearance): C = M^T M does not
    depend on the row order, so the unit labels are only dictionary-encoded, never sorted."""
    units, cols = piece
    if isinstance(units, pa.ChunkedArray):
        units = units.combine_chunks()
    if len(units) == 0:
        return sp.csr_array((0, n_products), dtype=np.float64)
    enc = pc.dictionary_encode(units)
    codes = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    M = sp.coo_array(
        (np.ones(len(cols), dtype=np.float64), (codes, cols.astype(np.int64, copy=False))),
        shape=(len(enc.dictionary), n_products),
    ).tocsr()
    M.sum_duplicates()
    M.data[:] = 1.0  # binary presence (repeated edges were summed)
    return M


def _cooc_bucket(piece, n_products: int, bucket: int):
    """``M_b^T M_b`` of one bucket: scipy.sparse while it is sparse (a fraction of the 8 P^2 bytes
    of a dense partial to allocate, send and add), dense otherwise. Integer counts: exact."""
    try:
        M = _cooc_matrix(piece, n_products)
        if M.nnz and M.nnz / (M.shape[0] * M.shape[1]) > _rel().DENSE_SHARE:
            return _rel().cooccurrence(M)
        C = (M.T @ M).tocsr()
        if C.nnz > n_products * n_products // 3:
            return C.toarray()
        return C
    except Exception as e:  # name the bucket, keep the cause
        raise BucketTaskError(f"co-occurrence bucket {bucket} failed: {type(e).__name__}: {e}") from e


def cooccurrence_chunked(
    edges: pl.LazyFrame | pl.DataFrame,
    products: Sequence | np.ndarray,
    n_buckets: int = 16,
    client=None,
    *,
    unit: str = "unit_id",
    product: str = "product",
    on_unknown: str = "raise",
) -> np.ndarray:
    """``C = M^T M`` (products x products, float64) of the binary ``(unit_id, product)`` edges.

    Columns follow ``products``. Computed as ``sum_b relatedness.cooccurrence(M_b)`` over firm
    buckets (hash of the unit id), tree-summed on Dask: exact, identical to
    ``relatedness.cooccurrence`` on the whole matrix (integer counts in float64).
    ``client=None`` uses the synchronous scheduler; otherwise ``client.compute``.
    """
    import dask

    bb = bucket_baskets(edges, products, n_buckets, unit=unit, product=product, on_unknown=on_unknown)
    P = len(bb.products)
    task = dask.delayed(_cooc_bucket, pure=False)
    if client is not None:
        pieces = client.scatter(bb.pieces, hash=False)
    else:
        pieces = bb.pieces
    parts = [task(pieces[k], P, k) for k in range(bb.n_buckets)]
    total = _tree_sum(parts)
    (C,) = _run(client, [total])
    if sp.issparse(C):
        C = C.toarray()
    return np.ascontiguousarray(C, dtype=np.float64)


# ------------------------------------------------------------------------------------------------
# density
# ------------------------------------------------------------------------------------------------


@dataclass
class DensityResult:
    """What :func:`firm_density_to_parquet` wrote, with run statistics.

    ``files`` are the published files (``committed=True``) or the staged ones (``commit=False``;
    publish them with ``commit_parts(staging_dir, final_dir)``). ``cells_computed`` = units x
    products, ``share_kept`` = rows_written / cells_computed. ``peak_rss_bytes`` is the largest
    ``ru_maxrss`` reported by the processes that ran tasks and by this process (a process-wide high
    water mark: with a threaded cluster it is this process); the benchmark measures the whole
    process tree instead.
    """

    final_dir: Path
    staging_dir: Path | None
    files: list[Path]
    committed: bool
    generation: str | None
    rows_written: int
    cells_computed: int
    share_kept: float
    n_units: int
    n_products: int
    n_buckets: int
    threshold: float
    seconds_total: float
    seconds_prepare: float
    seconds_compute: float
    seconds_commit: float
    peak_rss_bytes: int
    bucket_stats: list[dict] = field(default_factory=list)
    #: whole-run retries used because a Dask worker died (0 = undisturbed)
    worker_loss_retries: int = 0

    def summary(self) -> dict:
        d = asdict(self)
        d["final_dir"] = str(self.final_dir)
        d["staging_dir"] = str(self.staging_dir) if self.staging_dir else None
        d["files"] = [str(p) for p in self.files]
        return d


def _out_schema(units_type: pa.DataType, products_type: pa.DataType, dtype, extra: dict,
                names: tuple[str, str, str] = ("unit_id", "product", "density")) -> pa.Schema:
    fields = [
        pa.field(names[0], units_type, nullable=False),
        pa.field(names[1], products_type, nullable=False),
        pa.field(names[2], pa.from_numpy_dtype(np.dtype(dtype)), nullable=False),
    ]
    for name, arr in extra.items():
        fields.append(pa.field(name, arr.type, nullable=False))
    return pa.schema(fields)


def _extra_arrays(extra_columns: dict | None) -> dict[str, pa.Array]:
    """Constant columns: a scalar (type inferred by pyarrow: int -> int64, str -> string), a
    length-1 polars Series / pyarrow array (type kept, e.g. ``pl.Series([2016], dtype=pl.Int32)``)."""
    out: dict[str, pa.Array] = {}
    for name, v in (extra_columns or {}).items():
        if name in ("unit_id", "product", "density"):
            raise ValueError(f"extra column {name!r} clashes with an output column")
        if isinstance(v, pl.Series):
            arr = v.to_arrow()
        elif isinstance(v, (pa.Array, pa.ChunkedArray)):
            arr = v
        else:
            arr = pa.array([v])
        if isinstance(arr, pa.ChunkedArray):
            arr = arr.combine_chunks()
        if len(arr) != 1 or arr.null_count:
            raise ValueError(f"extra column {name!r} must be one non-null value")
        out[name] = arr
    return out


def _discard_staging(staging: Path) -> None:
    """Remove a staging folder even while aborted tasks may still be writing: rename it first
    (tasks open ``<staging>/part-k`` by path, so they cannot recreate files in it), then delete.
    A leftover (e.g. the process died here) is invisible to readers and removed by the next commit."""
    trash = staging.with_name(staging.name + ".aborted")
    try:
        os.replace(staging, trash)
    except OSError:
        trash = staging
    shutil.rmtree(trash, ignore_errors=True)


def _density_bucket(
    piece,
    phi: np.ndarray,
    phi_colsum: np.ndarray,
    products: pa.Array,
    bucket: int,
    staging_dir: str,
    threshold: float,
    include_self: bool,
    dtype: str,
    extra: dict,
    block_rows: int,
    out_names: tuple[str, str, str] = ("unit_id", "product", "density"),
    index=None,
) -> dict:
    """One firm bucket: cells above the threshold (``relatedness.density_above``, bit-identical to
    the kernel on every cell + filter) -> cast -> one parquet part (staging)."""
    t0 = time.perf_counter()
    rel = _rel()
    phi = _aligned(phi)
    P = phi.shape[0]
    M, units = bucket_matrix(piece, P)
    n = M.shape[0]
    tk = time.perf_counter()
    # only the cells above the threshold, bit-identical to density_kernel + filter on every cell
    rows, cols, vals64 = rel.density_above(M, phi, phi_colsum, threshold, include_self=include_self, index=index,
                                           block_rows=block_rows)
    t_kernel = time.perf_counter() - tk
    rows = rows.astype(np.int32)
    cols = cols.astype(np.int32)
    vals = vals64.astype(dtype)
    k = len(rows)
    schema = _out_schema(units.type, products.type, dtype, extra, tuple(out_names))
    arrays = [pc.take(units, pa.array(rows)), pc.take(products, pa.array(cols)), pa.array(vals)]
    for name, a in extra.items():
        arrays.append(pc.take(a, pa.array(np.zeros(k, dtype=np.int32))))
    table = pa.Table.from_arrays(arrays, schema=schema)
    path = Path(staging_dir) / f"{PART_PREFIX}{bucket:05d}.parquet"
    tw = time.perf_counter()
    extra_names = list(extra)
    with open(path, "wb") as fh:
        # encoding choices only (the values and the arrow schema are the same): the unit ids come
        # sorted and compress well as plain zstd, while dictionary-encoding them and the float
        # densities (the writer's default) and min/max statistics over every string cost about as
        # much as the whole density kernel; statistics are kept for density and the constant columns
        pq.write_table(
            table, fh, compression=PARQUET_COMPRESSION, compression_level=PARQUET_COMPRESSION_LEVEL,
            row_group_size=1_000_000,
            use_dictionary=[out_names[1], *extra_names],
            write_statistics=[out_names[2], *extra_names],
        )
        fh.flush()
        os.fsync(fh.fileno())
    t_write = time.perf_counter() - tw
    return {
        "bucket": bucket, "units": n, "cells": n * P, "rows": k, "file": str(path),
        "seconds": time.perf_counter() - t0, "seconds_kernel": t_kernel, "seconds_write": t_write,
        "pid": os.getpid(), "peak_rss_bytes": _peak_rss_bytes(),
    }


# (array as received, aligned C-ordered copy) of the last phi seen by this process: arrays arriving
# through distributed are views into the message buffer, often not 8-byte aligned, and scipy's
# CSR x dense product then works on a copy per call; tasks of one run on a worker share one copy
_ALIGNED_PHI: list = [None, None]


def _aligned(phi: np.ndarray) -> np.ndarray:
    if phi.flags.c_contiguous and phi.flags.aligned and phi.dtype == np.float64:
        return phi
    if _ALIGNED_PHI[0] is not phi:
        _ALIGNED_PHI[:] = [phi, np.require(phi, np.float64, ["C", "A"])]
    return _ALIGNED_PHI[1]


def _density_task(piece, shared: tuple, bucket: int, *rest) -> dict:
    """Task wrapper: unpacks the per-run ``shared`` data (phi, its column sums, the products, the
    threshold index: ONE scattered object, one round trip), looks ``_density_bucket`` up at run time
    (tests inject failures there) and names the failing bucket in the error."""
    phi, phi_colsum, products, index = shared
    try:
        return _density_bucket(piece, phi, phi_colsum, products, bucket, *rest, index)
    except Exception as e:
        raise BucketTaskError(f"firm-density bucket {bucket} failed: {type(e).__name__}: {e}") from e


def _check_phi(phi: np.ndarray, products) -> np.ndarray:
    phi = np.ascontiguousarray(phi, dtype=np.float64)
    if phi.ndim != 2 or phi.shape[0] != phi.shape[1] or phi.shape[0] != len(products):
        raise ValueError(f"phi must be products x products ({len(products)}), got shape {phi.shape}")
    return phi


def firm_density_to_parquet(
    basket_edges: pl.LazyFrame | pl.DataFrame,
    phi: np.ndarray,
    products: Sequence | np.ndarray,
    out_dir: Path | str,
    *,
    threshold: float = 0.05,
    include_self: bool = True,
    n_buckets: int = 16,
    client=None,
    dtype=np.float32,
    extra_columns: dict | None = None,
    commit: bool = True,
    unit: str = "unit_id",
    product: str = "product",
    block_rows: int = DEFAULT_BLOCK_ROWS,
    manifest_metadata: dict | None = None,
    out_names: tuple[str, str, str] = ("unit_id", "product", "density"),
    worker_loss_retries: int = WORKER_LOSS_RETRIES,
) -> DensityResult:
    """density_firm of every unit in ``basket_edges`` x every product, kept where ``> threshold``.

    ``basket_edges``: binary baskets as ``(unit_id, product)`` rows (S000: firm IMPORT baskets of
    year t, HS4; duplicates collapse, products outside ``products`` are dropped as in
    ``relatedness.to_matrix(products=...)``). ``phi``: products x products proximity in the order of
    ``products`` (e.g. from the firm co-export of t). Formula: ``relatedness.density_kernel``
    (column sums of phi; ``include_self`` as there).

    Output: ``out_dir`` (the final partition folder, e.g. ``<store>/firm_import_density/year=2016``)
    gets one parquet part per bucket, columns ``unit_id, product, density`` (``dtype``: float32 by
    default) plus the constant ``extra_columns`` (e.g. ``{"year": pl.Series([2016], dtype=pl.Int32)}``),
    rows sorted by unit then product column order within a part. Parts are staged in a fresh
    ``out_dir/.staging-<uuid>/`` and, with ``commit=True``, published atomically by
    :func:`commit_parts` (see the module docstring); with ``commit=False`` the staged files are
    returned for the caller to commit. On any task failure nothing is published, the staging
    folder is removed and :class:`FirmDensityError` is raised (the previous generation stays).
    A Dask worker that dies mid-run makes the whole computation run again, up to
    ``worker_loss_retries`` times (module docstring).
    """
    import dask

    if not (block_rows >= 1):
        raise ValueError("block_rows must be >= 1")
    t_all = time.perf_counter()
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError("dtype must be float32 or float64")
    out_dir = Path(out_dir)
    prod = _products_series(products)
    phi = _check_phi(phi, prod)
    phi_colsum = phi.sum(axis=0)
    # candidate lists of the threshold shortcut (relatedness.density_above), built once per phi
    index = _rel().density_filter_index(phi, phi_colsum, float(threshold), include_self=bool(include_self))
    extra = _extra_arrays(extra_columns)

    bb = bucket_baskets(basket_edges, prod.to_numpy(), n_buckets, unit=unit, product=product, on_unknown="drop")
    P = len(prod)
    prod_arrow = prod.to_arrow()
    if isinstance(prod_arrow, pa.ChunkedArray):
        prod_arrow = prod_arrow.combine_chunks()

    out_dir.mkdir(parents=True, exist_ok=True)
    t_prep = time.perf_counter() - t_all
    t_c = time.perf_counter()
    retries = 0
    while True:
        # a fresh staging folder per attempt: tasks of an aborted attempt that are still running
        # can only write into the discarded one
        staging = out_dir / f"{STAGING_PREFIX}{uuid.uuid4().hex}"
        staging.mkdir()
        try:
            shared = _share(client, (phi, phi_colsum, prod_arrow, index))
            pieces = client.scatter(bb.pieces, hash=False) if client is not None else bb.pieces
            task = dask.delayed(_density_task, pure=False)
            tasks = [
                task(pieces[k], shared, k, str(staging), float(threshold), bool(include_self),
                     dtype.str, extra, int(block_rows), tuple(out_names))
                for k in range(bb.n_buckets)
            ]
            stats = _run(client, tasks)
            missing = [s["file"] for s in stats if not Path(s["file"]).is_file()]
            if missing:
                raise FirmDensityError(f"tasks reported parts that do not exist: {missing[:3]}")
            _fsync_dir(staging)
            break
        except BaseException as e:
            _discard_staging(staging)
            if isinstance(e, FirmDensityError):
                raise
            if not isinstance(e, Exception):
                raise
            lost = client is not None and _worker_lost(e)
            if lost and retries < worker_loss_retries:
                retries += 1
                log.warning("firm density for %s: a Dask worker died (%s: %s); retrying the computation (%d of %d)",
                            out_dir, type(e).__name__, e, retries, worker_loss_retries)
                continue
            what = (f"a Dask worker died during the computation (retried {retries} time(s), "
                    f"worker_loss_retries={worker_loss_retries}); " if lost else "")
            raise FirmDensityError(
                f"firm density for {out_dir} failed: {what}nothing was published (the previous generation, if any, "
                f"is intact): {type(e).__name__}: {e}"
            ) from e
    t_compute = time.perf_counter() - t_c

    stats = sorted(stats, key=lambda s: s["bucket"])
    rows = int(sum(s["rows"] for s in stats))
    cells = int(sum(s["cells"] for s in stats))
    n_units = int(sum(s["units"] for s in stats))
    files = [Path(s["file"]) for s in stats]
    generation = None
    t_k = time.perf_counter()
    if commit:
        meta = {
            "rows": rows, "cells_computed": cells, "threshold": float(threshold), "include_self": bool(include_self),
            "dtype": dtype.name, "n_units": n_units, "n_products": P, "n_buckets": bb.n_buckets,
            **(manifest_metadata or {}),
        }
        files = commit_parts(staging, out_dir, metadata=meta)
        generation = _load_manifest(out_dir)["generation"]
    t_commit = time.perf_counter() - t_k
    peak = max([_peak_rss_bytes()] + [int(s["peak_rss_bytes"]) for s in stats])
    return DensityResult(
        final_dir=out_dir, staging_dir=None if commit else staging, files=files, committed=commit,
        generation=generation, rows_written=rows, cells_computed=cells,
        share_kept=(rows / cells) if cells else 0.0, n_units=n_units, n_products=P, n_buckets=bb.n_buckets,
        threshold=float(threshold), seconds_total=time.perf_counter() - t_all, seconds_prepare=t_prep,
        seconds_compute=t_compute, seconds_commit=t_commit, peak_rss_bytes=peak, bucket_stats=stats,
        worker_loss_retries=retries,
    )


def firm_density_in_memory(
    basket_edges: pl.LazyFrame | pl.DataFrame,
    phi: np.ndarray,
    products: Sequence | np.ndarray,
    *,
    threshold: float = 0.05,
    include_self: bool = True,
    dtype=np.float32,
    extra_columns: dict | None = None,
    unit: str = "unit_id",
    product: str = "product",
) -> pl.DataFrame:
    """Reference path: the whole basket matrix through ONE ``relatedness.density`` call, then the
    same filter (``> threshold`` on float64) and cast. Dense units x products in memory: tests and
    small data only. Returns ``unit_id, product, density[, extra...]`` sorted by unit_id, product."""
    rel = _rel()
    dtype = np.dtype(dtype)
    prod = _products_series(products)
    phi = _check_phi(phi, prod)
    lf = basket_edges.lazy() if isinstance(basket_edges, pl.DataFrame) else basket_edges
    edges = lf.select(pl.col(unit).alias("unit_id"), pl.col(product).cast(prod.dtype).alias("product"),
                      pl.lit(1.0).alias("_one"))
    X, units, prods = rel.to_matrix(edges, "unit_id", "product", "_one", products=prod.to_numpy())
    M = X.copy()
    M.data = np.ones_like(M.data)  # binary presence (duplicates summed by to_matrix)
    D = rel.density(M, phi, include_self=include_self)
    r, c = np.nonzero(D > threshold)
    df = pl.DataFrame({
        "unit_id": pl.Series(units)[r] if len(r) else pl.Series(units[:0]),
        "product": pl.Series(prods)[c] if len(c) else pl.Series(prods[:0]),
        "density": D[r, c].astype(dtype),
    })
    for name, a in _extra_arrays(extra_columns).items():
        df = df.with_columns(pl.Series(name, a).gather(np.zeros(df.height, dtype=np.int64)))
    return df.sort("unit_id", "product")


