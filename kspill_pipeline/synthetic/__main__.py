"""``python -m kspill_pipeline.synthetic OUT [--scale demo] [--seed 1] [--years 2000 2016] [--n-firms N]``

Generates the synthetic universe and prints wall time and peak RSS.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

from kspill_pipeline.synthetic import SCALES, generate


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kspill_pipeline.synthetic", description=__doc__)
    ap.add_argument("out")
    ap.add_argument("--scale", default="demo", choices=sorted(SCALES))
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--years", type=int, nargs=2, metavar=("START", "END"), default=None)
    ap.add_argument("--n-firms", type=int, default=None)
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    out = generate(a.out, scale=a.scale, seed=a.seed, years=tuple(a.years) if a.years else None, n_firms=a.n_firms)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"wrote {out} ({a.scale}, seed {a.seed}) in {time.perf_counter() - t0:.1f} s, peak RSS {rss:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
