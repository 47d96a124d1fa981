"""Benchmark runner (``make bench``).

Every benchmark measures kspill and a reference in the same process and run, and reports the
ratio (never an absolute timed assertion). Results are printed and written to
``bench_results/<name>.json``.

Registered benchmarks:
* ``ingest``: read + clean one year of the synthetic universe (``KSPILL_BENCH_SCALE``, default
  demo) against the reference "bare read": polars reading the same files as strings and a
  group-by to the annual grain, i.e. the least any ingestion must do.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import polars as pl

from kspill_pipeline.config import REPO_ROOT, CleaningConfig

OUT = REPO_ROOT / "bench_results"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_ingest(scale: str, year: int) -> dict:
    from kspill_pipeline.compute.cleaning import clean_customs
    from kspill_pipeline.io.raw import discover_files, read_customs_file
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
    t_kspill = time.perf_counter() - t0

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
        "reference_seconds": round(t_ref, 3),
        "ratio_kspill_over_reference": round(t_kspill / t_ref, 2) if t_ref > 0 else None,
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "reference_rows": ref.height,
    }


def _ecomplexity(a):
    from kspill_pipeline.bench import ecomplexity_bench

    return ecomplexity_bench.run(a)


def _firm_density(a):
    from kspill_pipeline.bench import firm_density_bench

    return firm_density_bench.run(a)


BENCHMARKS = {
    "ingest": lambda a: bench_ingest(a.scale, a.year),
    "ecomplexity": _ecomplexity,
    "firm_density": _firm_density,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kspill-bench")
    p.add_argument("names", nargs="*", default=list(BENCHMARKS))
    p.add_argument("--scale", default=os.environ.get("KSPILL_BENCH_SCALE", "demo"))
    p.add_argument("--year", type=int, default=2004)
    a = p.parse_args(argv)
    OUT.mkdir(exist_ok=True)
    for n in a.names:
        r = BENCHMARKS[n](a)
        (OUT / f"{n}.json").write_text(json.dumps(r, indent=2))
        print(json.dumps(r))
    return 0
