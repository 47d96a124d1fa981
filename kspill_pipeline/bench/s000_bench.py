"""Benchmark: study S000 at synthetic ``full`` scale (issue 4 "Scale").

Universe: ``generate(.kspill/data/full-s000, "full", 1, years=(2011, 2016))`` (generated once,
about 5 minutes; six years so that export history, lags and the pooled marketization are real).
Store: ``.kspill/bench-store/full-s000``.

1. **prep** (cached, not part of the comparison): ``kspill run`` of the trade and relatedness
   groups plus the S000 inputs (export history, firm controls, marketization) for every year.
2. **panel**: ``kspill run --select s000_panel`` for every year in one process; wall time and the
   peak RSS of the whole process tree (CLI + Dask workers), sampled every 20 ms. The panel is built
   year by year, so the peak should track one year, not the stack.
3. **Table 1**: columns (1)-(6) on the stacked panel, each estimator in its own fresh process (its
   peak RSS is its own, ``ru_maxrss``): ``pyfixest`` (feglm, FEs absorbed: the reference) and
   ``dummies`` (kspill's chunked Newton ML fit, explicit FE parameters, never a dense design).
   Reported: seconds, peak RSS, ratios dummies / pyfixest, and the largest coefficient
   difference between the two (they must agree; a benchmark that drifts is a bug, not a speed-up).

Run: ``python -m kspill_pipeline.bench s000_full`` (not in the default ``make bench`` list: the
first run generates the universe and the prep store, about 20 minutes on 2 cores).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kspill_pipeline.config import REPO_ROOT

DATA = REPO_ROOT / ".kspill" / "data" / "full-s000"
STORE = REPO_ROOT / ".kspill" / "bench-store" / "full-s000"
YEARS = (2011, 2016)
PREP_SELECT = ("group:trade or group:relatedness or key:firm_export_history or key:s000_firm_controls "
               "or key:s000_city_marketization")


def _cli_timed(select: str) -> dict:
    from kspill_pipeline.bench.firm_density_bench import TreeRSS

    cmd = [sys.executable, "-m", "kspill_pipeline.cli", "run", "--data", str(DATA), "--store", str(STORE),
           "--ephemeral", "--select", select]
    t0 = time.perf_counter()
    with TreeRSS() as rss:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    secs = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"kspill run --select {select!r} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return {"seconds": round(secs, 1), "peak_tree_rss_mb": round(rss.peak / 2**20)}


def _table1_child(method: str, store: str, out: str) -> None:
    import polars as pl

    from kspill_pipeline.io import store as st
    from kspill_pipeline.studies import s000_models as m

    t0 = time.perf_counter()
    panel = st.scan(Path(store), "s000_panel").collect()
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = m.table1(panel, method=method)
    secs = time.perf_counter() - t0
    coefs = res.tidy.filter(pl.col("kind") == "coef").select("model", "term", "estimate").rows()
    Path(out).write_text(json.dumps({
        "method": method, "panel_rows": panel.height, "panel_mb": round(panel.estimated_size() / 2**20),
        "n_obs": int(res.tidy["n_obs"].max()), "load_seconds": round(t_load, 1), "seconds": round(secs, 1),
        "timings": {k: round(v, 2) for k, v in res.timings.items()},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "coefs": [[a, b, c] for a, b, c in coefs],
    }))


def _table1(method: str) -> dict:
    out = Path(tempfile.mkdtemp(prefix="kspill-s000-bench-")) / f"{method}.json"
    code = ("import sys; from kspill_pipeline.bench.s000_bench import _table1_child as c; "
            "c(sys.argv[1], sys.argv[2], sys.argv[3])")
    subprocess.run([sys.executable, "-c", code, method, str(STORE), str(out)], check=True)
    return json.loads(out.read_text())


def run(args=None) -> dict:
    from kspill_pipeline.synthetic import generate

    if not (DATA / "source.yaml").is_file():
        generate(DATA, "full", 1, years=YEARS)
    STORE.mkdir(parents=True, exist_ok=True)
    prep = None
    if not (STORE / "s000_city_marketization").is_dir():
        prep = _cli_timed(PREP_SELECT)
    panel = _cli_timed("s000_panel")
    pyf = _table1("pyfixest")
    dum = _table1("dummies")
    a = {(m, t): v for m, t, v in pyf.pop("coefs")}
    b = {(m, t): v for m, t, v in dum.pop("coefs")}
    diff = max(abs(a[k] - b[k]) for k in a)
    return {
        "benchmark": "s000_full",
        "scale": "full",
        "years": list(YEARS),
        "prep": prep or "cached",
        "panel_build": panel,
        "table1_pyfixest": pyf,
        "table1_dummies": dum,
        "ratio_seconds_dummies_over_pyfixest": round(dum["seconds"] / pyf["seconds"], 2),
        "ratio_peak_rss_dummies_over_pyfixest": round(dum["peak_rss_mb"] / pyf["peak_rss_mb"], 2),
        "max_abs_coef_difference": diff,
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
