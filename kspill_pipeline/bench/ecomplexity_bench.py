"""Benchmark: ``kspill relatedness`` vs py-ecomplexity, whole process against whole process.

Issue 3, "Benchmarks": same outputs (complexity long frame with rca, M, density, eci, pci,
diversity, ubiquity, coi, cog, and the long proximity frame), each side run as a fresh
subprocess so that start-up (imports) counts:

* (a) ``world5``: the world trade data (``../shared/data/world_trade_sitc2_1998_2000/exports.csv``,
  226 countries x 785 SITC products) stacked over five years with a small deterministic
  perturbation of the values (``value * (1 + 0.01 k sin(row))`` in year k); target >= 10x.
* (b) ``synth5000``: one synthetic year, 300 locations x 5,000 products, generated
  deterministically here (numpy seed 20260101); target >= 100x.

The reference is a Python script calling ``ecomplexity.ecomplexity`` (``verbose=False``,
``check_logsupermodularity=False``: the log-supermodularity diagnostic is not part of the
outputs) and ``ecomplexity.proximity`` and writing both results to parquet. kspill runs
``python -m kspill_pipeline.standalone ... --preset py-ecomplexity`` (the same code path as
``kspill relatedness``). Each side is run once as a warm-up (so both have byte-compiled
modules, as in a normal installation; ``PYTHONDONTWRITEBYTECODE`` is removed from the child
environment), then timed ``repeats`` times; the median is reported. The reference side of (b)
takes minutes and is timed once unless ``--repeats`` asks for more.

Entry point for ``bench/run.py``: :func:`run` (``args`` may be None or carry ``cases``,
``repeats`` and ``keep``); also runnable as ``python -m kspill_pipeline.bench.ecomplexity_bench``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("KSPILL_SHARED_DATA", REPO_ROOT.parent / "shared" / "data")).resolve()
WORLD = SHARED / "world_trade_sitc2_1998_2000" / "exports.csv"

TARGETS = {"world5": 10.0, "synth5000": 100.0}

REFERENCE_SCRIPT = r'''
import sys, warnings
warnings.filterwarnings("ignore")
import pandas as pd
import ecomplexity as ec
inp, out, has_time = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
df = pd.read_csv(inp, dtype={"location": str, "product": str})
if not has_time:
    df["time"] = 0
cols = {"time": "time", "loc": "location", "prod": "product", "val": "value"}
c = ec.ecomplexity(df, cols, verbose=False, check_logsupermodularity=False)
import contextlib, io
with contextlib.redirect_stdout(io.StringIO()):
    p = ec.proximity(df, cols)
c.to_parquet(out + "/complexity.parquet")
p.to_parquet(out + "/proximity.parquet")
'''


def make_world5(path: Path) -> dict:
    """Five perturbed copies of the world trade data, with a ``time`` column (case a)."""
    import numpy as np
    import polars as pl

    df = pl.read_csv(WORLD, schema_overrides={"country": pl.Utf8, "product": pl.Utf8})
    wave = np.sin(np.arange(df.height, dtype=np.float64))
    frames = [
        df.select(
            pl.lit(1998 + k, dtype=pl.Int64).alias("time"),
            pl.col("country").alias("location"),
            pl.col("product"),
            (pl.col("value") * pl.Series(1.0 + 0.01 * k * wave)).alias("value"),
        )
        for k in range(5)
    ]
    out = pl.concat(frames)
    out.write_csv(path)
    return {"rows": out.height, "locations": df["country"].n_unique(), "products": df["product"].n_unique(),
            "periods": 5}


def make_synth(path: Path, n_loc: int = 300, n_prod: int = 5000, seed: int = 20260101) -> dict:
    """One synthetic year of ``n_loc`` locations x ``n_prod`` 6-digit products (case b).

    Location and product sizes are log-normal; a cell is present with probability rising with
    both sizes (about 40 % of cells), and its value is size x size x log-normal noise. Product
    codes are zero-padded 6-digit strings.
    """
    import numpy as np
    import polars as pl

    rng = np.random.default_rng(seed)
    s_loc = rng.lognormal(0.0, 1.2, n_loc)
    s_prod = rng.lognormal(0.0, 1.0, n_prod)
    logit = 0.9 * np.log(s_loc)[:, None] + 0.7 * np.log(s_prod)[None, :] - 0.4
    p = 1.0 / (1.0 + np.exp(-logit))
    present = rng.random((n_loc, n_prod)) < p
    vals = s_loc[:, None] * s_prod[None, :] * rng.lognormal(0.0, 1.5, (n_loc, n_prod)) * 1e6
    iu, ip = np.nonzero(present)
    codes = np.array([f"{10000 + 37 * j:06d}" for j in range(n_prod)])
    locs = np.array([f"L{i:03d}" for i in range(n_loc)])
    out = pl.DataFrame({"location": locs[iu], "product": codes[ip], "value": np.round(vals[iu, ip], 2)})
    out.write_csv(path)
    return {"rows": out.height, "locations": n_loc, "products": n_prod, "periods": 1}


def _env() -> dict:
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _time(cmd: list[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"command failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return dt


def bench_case(name: str, work: Path, repeats: int = 3, ref_repeats: int | None = None) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    inp = work / f"{name}.csv"
    info = make_world5(inp) if name == "world5" else make_synth(inp)
    has_time = "1" if name == "world5" else "0"
    script = work / "reference_py_ecomplexity.py"
    script.write_text(REFERENCE_SCRIPT)
    out_k = work / "out_kspill"
    out_r = work / "out_reference"
    out_r.mkdir(exist_ok=True)
    k_cmd = [sys.executable, "-m", "kspill_pipeline.standalone", "--input", str(inp), "--location", "location",
             "--product", "product", "--value", "value", "--preset", "py-ecomplexity", "--out", str(out_k),
             "--quiet"]
    if name == "world5":
        k_cmd[k_cmd.index("--preset"):k_cmd.index("--preset")] = ["--time", "time"]
    r_cmd = [sys.executable, str(script), str(inp), str(out_r), has_time]
    if ref_repeats is None:
        ref_repeats = repeats if name == "world5" else 1
    # warm-up (byte-compilation of both import trees, file cache)
    _time(k_cmd, REPO_ROOT)
    if name == "world5":
        _time(r_cmd, REPO_ROOT)
    k_times = [_time(k_cmd, REPO_ROOT) for _ in range(repeats)]
    r_times = [_time(r_cmd, REPO_ROOT) for _ in range(ref_repeats)]
    k_med = statistics.median(k_times)
    r_med = statistics.median(r_times)
    ratio = r_med / k_med
    return {
        "benchmark": f"ecomplexity_{name}",
        **info,
        "kspill_seconds": [round(x, 3) for x in k_times],
        "reference_seconds": [round(x, 3) for x in r_times],
        "kspill_median_s": round(k_med, 3),
        "reference_median_s": round(r_med, 3),
        "speedup_reference_over_kspill": round(ratio, 1),
        "target": TARGETS[name],
        "meets_target": ratio >= TARGETS[name],
        "check": _agree(out_k, out_r),
    }


def _agree(out_k: Path, out_r: Path) -> dict:
    """Max abs differences between the two outputs (sanity: the benchmark compares like with like)."""
    import numpy as np
    import polars as pl

    k = pl.read_parquet(out_k / "complexity.parquet")
    r = pl.read_parquet(out_r / "complexity.parquet")
    if "time" in r.columns:
        r = r.with_columns(pl.col("time").cast(k.schema["time"], strict=False))
    keys = ["location", "product"] + (["time"] if k["time"].null_count() == 0 else [])
    if "time" not in keys:
        k = k.drop("time")
        r = r.drop("time")
    j = k.join(r.drop_nulls("eci"), on=keys, suffix="_ref")
    out = {"rows_compared": j.height}
    for a, b in [("rca", "rca_ref"), ("M", "mcp"), ("density", "density_ref"), ("eci", "eci_ref"),
                 ("pci", "pci_ref"), ("coi", "coi_ref"), ("cog", "cog_ref")]:
        x = j[a].cast(pl.Float64).to_numpy()
        y = j[b].cast(pl.Float64).to_numpy()
        out[f"max_abs_diff_{a}"] = float(np.nanmax(np.abs(x - y))) if len(x) else None
    return out


def run(args=None) -> dict:
    """Run the benchmark cases; returns ``{"cases": [...]}`` and prints the ratios."""
    cases = list(getattr(args, "cases", None) or ["world5", "synth5000"])
    repeats = int(getattr(args, "repeats", None) or 3)
    keep = bool(getattr(args, "keep", False))
    if "world5" in cases and not WORLD.is_file():
        print(f"ecomplexity bench: {WORLD} not found; skipping case world5")
        cases.remove("world5")
    root = Path(tempfile.mkdtemp(prefix="kspill-ecx-bench-"))
    results = []
    try:
        for name in cases:
            res = bench_case(name, root / name, repeats=repeats)
            results.append(res)
            print(
                f"ecomplexity[{name}] kspill {res['kspill_median_s']:.2f} s vs py-ecomplexity "
                f"{res['reference_median_s']:.2f} s: {res['speedup_reference_over_kspill']:.1f}x "
                f"(target >= {res['target']:.0f}x, {'met' if res['meets_target'] else 'NOT met'})"
            )
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    return {"benchmark": "ecomplexity", "cases": results}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="*", choices=sorted(TARGETS), default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--keep", action="store_true")
    p.add_argument("--json", type=Path, default=None)
    res = run(p.parse_args(argv))
    if p.parse_args(argv).json:
        p.parse_args(argv).json.write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
