"""Benchmark runner (``make bench``).

Every benchmark measures kspill and a reference in the same process and run, and reports the
ratio (never an absolute timed assertion). Results are printed and written to
``bench_results/<name>.json``.

Registered benchmarks:
* ``ingest``: read + clean one year of the synthetic universe (``KSPILL_BENCH_SCALE``, default
  demo; ``kspill_seconds``: the chunked path of the asset, ``single_shot_seconds``: the old one) against the reference "bare read": polars reading the same files as strings and a
  group-by to the annual grain, i.e. the least any ingestion must do.
* ``quality``: export quality variant A on one ``full`` synthetic year against a dense
  dummy-variable least-squares solve on a subsample where dense is feasible
  (``bench/quality_bench.py``).
* ``s000_full``: study S000 panel and Table 1 at ``full`` scale, pyfixest vs the chunked Newton
  path (``bench/s000_bench.py``; named only, about 20 minutes the first time).
* ``ingest_full``: one year of the synthetic ``full`` scale (cached in ``.kspill/data/full-bench``,
  generated once otherwise; ``--year``, default 2015), each path in its own process so that its peak
  RSS is its own: the single-shot path (read all files, concatenate, ``clean_customs``), the chunked
  path of the ``clean_customs`` asset (``iter_customs_file`` + ``clean_customs_chunked``) and the bare
  read reference; then the chunked path on the year stacked ``--stack`` times (default 4, about 10M
  raw rows) with shifted firm ids, to show that a 10M-row year stays in bounded memory. Not in the
  default list (several minutes): ``python -m kspill_pipeline.bench ingest_full``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl

from kspill_pipeline.config import REPO_ROOT, CleaningConfig

OUT = REPO_ROOT / "bench_results"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_ingest(scale: str, year: int) -> dict:
    from kspill_pipeline.compute.cleaning import clean_customs, clean_customs_chunked
    from kspill_pipeline.io.raw import discover_files, iter_customs_file, read_customs_file
    from kspill_pipeline.synthetic import generate

    data = REPO_ROOT / ".kspill" / "data" / scale
    if not (data / "source.yaml").is_file():
        if scale == "demo":
            generate(data, scale=scale, seed=1)
        else:
            data = Path(tempfile.mkdtemp(prefix=f"kspill-bench-{scale}-"))
            generate(data, scale=scale, seed=1)
    files = discover_files(data)[year]

    t0 = time.perf_counter()
    frames = [read_customs_file(f, data) for f in files]
    raw = pl.concat([rf.df.with_columns(pl.lit(rf.numeric_hs).alias("source_numeric_hs")) for rf in frames],
                    how="vertical_relaxed")
    res = clean_customs(raw, year, CleaningConfig())
    t_single = time.perf_counter() - t0

    # the path of the clean_customs asset: batched read + chunked cleaning (bounded memory)
    def batches():
        for f in files:
            for rf in iter_customs_file(f, data):
                yield rf.df.with_columns(pl.lit(rf.numeric_hs).alias("source_numeric_hs"))

    t0 = time.perf_counter()
    res_chunked = clean_customs_chunked(batches(), year, CleaningConfig())
    t_kspill = time.perf_counter() - t0
    assert res_chunked.clean.height == res.clean.height

    # reference: bare polars read of the same rows (already decoded frames re-read from parquet
    # copies so that decoding cost is not counted twice) + annual group-by on the raw key
    tmp = Path(tempfile.mkdtemp(prefix="kspill-bench-ref-"))
    for i, rf in enumerate(frames):
        rf.df.write_parquet(tmp / f"{i}.parquet")
    t0 = time.perf_counter()
    ref = (
        pl.scan_parquet(str(tmp / "*.parquet"))
        .with_columns(pl.col("value_usd").cast(pl.Float64, strict=False))
        .group_by(["firm_id", "flow", "hs_code", "partner", "trade_mode", "region_code", "unit"])
        .agg(pl.col("value_usd").sum())
        .collect()
    )
    t_ref = time.perf_counter() - t0
    return {
        "benchmark": "ingest",
        "scale": scale,
        "year": year,
        "raw_rows": raw.height,
        "clean_rows": res.clean.height,
        "kspill_seconds": round(t_kspill, 3),
        "single_shot_seconds": round(t_single, 3),
        "reference_seconds": round(t_ref, 3),
        "ratio_kspill_over_reference": round(t_kspill / t_ref, 2) if t_ref > 0 else None,
        "ratio_single_shot_over_reference": round(t_single / t_ref, 2) if t_ref > 0 else None,
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "reference_rows": ref.height,
    }


# --------------------------------------------------------------------------------------------------
# ingest_full: old (single shot) vs new (chunked) path, each in its own process
# --------------------------------------------------------------------------------------------------
def _ingest_child(mode: str, data: str, year: int, out: str) -> None:
    """Run one ingestion path in this (fresh) process; write seconds, rows and peak RSS to ``out``."""
    from kspill_pipeline.compute.cleaning import clean_customs, clean_customs_chunked
    from kspill_pipeline.io.raw import discover_files, iter_customs_file, read_customs_file

    files = discover_files(data)[year]
    t0 = time.perf_counter()
    res: dict = {"mode": mode}
    if mode == "prep":  # decoded copies for the bare-read reference (not timed)
        for i, f in enumerate(files):
            read_customs_file(f, data).df.write_parquet(Path(out).with_suffix(f".{i}.parquet"))
        return
    if mode == "single_shot":
        frames = [read_customs_file(f, data) for f in files]
        raw = pl.concat([rf.df.with_columns(pl.lit(rf.numeric_hs).alias("source_numeric_hs")) for rf in frames],
                        how="vertical_relaxed")
        del frames
        r = clean_customs(raw, year, CleaningConfig())
        res["raw_rows"] = raw.height
    elif mode == "chunked":
        def batches():
            for f in files:
                for rf in iter_customs_file(f, data):
                    yield rf.df.with_columns(pl.lit(rf.numeric_hs).alias("source_numeric_hs"))

        r = clean_customs_chunked(batches(), year, CleaningConfig())
        res["raw_rows"] = r.accounting["rows_read"]
    elif mode == "bare":
        copies = sorted(Path(out).parent.glob(Path(out).stem.replace("bare", "prep") + ".*.parquet"))
        ref = (
            pl.scan_parquet([str(c) for c in copies])
            .with_columns(pl.col("value_usd").cast(pl.Float64, strict=False))
            .group_by(["firm_id", "flow", "hs_code", "partner", "trade_mode", "region_code", "unit"])
            .agg(pl.col("value_usd").sum())
            .collect()
        )
        res["raw_rows"] = sum(pl.scan_parquet(str(c)).select(pl.len()).collect().item() for c in copies)
        res["out_rows"] = ref.height
    else:
        raise ValueError(mode)
    if mode != "bare":
        res["out_rows"] = r.clean.height
        res["quarantine_rows"] = r.quarantine.height
    res["seconds"] = round(time.perf_counter() - t0, 2)
    res["peak_rss_mb"] = round(_peak_rss_mb(), 0)
    Path(out).write_text(json.dumps(res))


def _run_child(mode: str, data: Path, year: int, work: Path, tag: str) -> dict:
    out = work / f"{tag}-{mode}.json"
    code = "import sys; from kspill_pipeline.bench.run import _ingest_child as c; c(*sys.argv[1:3], int(sys.argv[3]), sys.argv[4])"
    subprocess.run([sys.executable, "-c", code, mode, str(data), str(year), str(out)], check=True)
    return json.loads(out.read_text()) if mode != "prep" else {}


def _stack_year(data: Path, year: int, times: int, dest: Path) -> Path:
    """``times`` copies of the year's raw files as parquet, firm ids prefixed by the copy number
    (distinct firms, no cross-copy duplicates): a synthetic year ``times`` as large."""
    from kspill_pipeline.io.raw import discover_files, read_customs_file

    (dest / "customs" / str(year)).mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(discover_files(data)[year]):
        df = read_customs_file(f, data).df.drop("source_file", "source_row")
        for k in range(times):
            df.with_columns((pl.lit(str(k + 1)) + pl.col("firm_id")).alias("firm_id")).write_parquet(
                dest / "customs" / str(year) / f"customs_{year}_f{i}_copy{k}.parquet", row_group_size=500_000
            )
    return dest


def bench_ingest_full(year: int, stack: int = 4) -> dict:
    from kspill_pipeline.io.raw import discover_files
    from kspill_pipeline.synthetic import generate

    data = REPO_ROOT / ".kspill" / "data" / "full-bench"
    if not (data / "source.yaml").is_file():
        generate(data, "full", 1, years=(2015, 2016))
    if year not in discover_files(data):
        year = 2015
    work = Path(tempfile.mkdtemp(prefix="kspill-bench-full-"))
    _run_child("prep", data, year, work, "y")
    bare = _run_child("bare", data, year, work, "y")
    old = _run_child("single_shot", data, year, work, "y")
    new = _run_child("chunked", data, year, work, "y")
    out = {
        "benchmark": "ingest_full",
        "scale": "full",
        "year": year,
        "raw_rows": old["raw_rows"],
        "reference": bare,
        "single_shot": old,
        "chunked": new,
        "same_output_rows": old["out_rows"] == new["out_rows"] and old["quarantine_rows"] == new["quarantine_rows"],
        "ratio_seconds_single_shot_over_reference": round(old["seconds"] / bare["seconds"], 2),
        "ratio_seconds_chunked_over_reference": round(new["seconds"] / bare["seconds"], 2),
        "ratio_peak_rss_single_shot_over_reference": round(old["peak_rss_mb"] / bare["peak_rss_mb"], 2),
        "ratio_peak_rss_chunked_over_reference": round(new["peak_rss_mb"] / bare["peak_rss_mb"], 2),
    }
    if stack > 1:
        big = _stack_year(data, year, stack, work / "stacked")
        (big / "source.yaml").write_text((data / "source.yaml").read_text(encoding="utf-8"), encoding="utf-8")
        out["stacked"] = {"times": stack, **_run_child("chunked", big, year, work, "stacked")}
    return out


def _ecomplexity(a):
    from kspill_pipeline.bench import ecomplexity_bench

    return ecomplexity_bench.run(a)


def _firm_density(a):
    from kspill_pipeline.bench import firm_density_bench

    return firm_density_bench.run(a)


def _quality(a):
    from kspill_pipeline.bench import quality_bench

    return quality_bench.run(a)


def _s000_full(a):
    from kspill_pipeline.bench import s000_bench

    return s000_bench.run(a)


BENCHMARKS = {
    "ingest": lambda a: bench_ingest(a.scale, a.year),
    "ingest_full": lambda a: bench_ingest_full(a.year if a.year != 2004 else 2015, a.stack),
    "ecomplexity": _ecomplexity,
    "firm_density": _firm_density,
    "quality": _quality,
    "s000_full": _s000_full,
}
# named only (several minutes to tens of minutes each): python -m kspill_pipeline.bench <name>
HEAVY = {"ingest_full", "s000_full"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kspill-bench")
    # ingest_full (several minutes, about 4 GB of RAM) runs only when named
    p.add_argument("names", nargs="*", default=[n for n in BENCHMARKS if n not in HEAVY])
    p.add_argument("--scale", default=os.environ.get("KSPILL_BENCH_SCALE", "demo"))
    p.add_argument("--year", type=int, default=2004)
    p.add_argument("--stack", type=int, default=4, help="ingest_full: copies of the year for the 10M-row run")
    a = p.parse_args(argv)
    OUT.mkdir(exist_ok=True)
    for n in a.names:
        r = BENCHMARKS[n](a)
        (OUT / f"{n}.json").write_text(json.dumps(r, indent=2))
        print(json.dumps(r))
    return 0
