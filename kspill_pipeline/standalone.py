"""``kspill relatedness``: country/city-level complexity and proximity from a long trade file.

A drop-in alternative to py-ecomplexity / Stata ``ecomplexity`` for anyone with long data
(issue 3, "Standalone use")::

    kspill relatedness --input FILE --location COL --product COL --value COL [--time COL]
                       [--preset stata] [--rca-threshold 1] --out DIR

writes ``DIR/complexity.parquet`` (time, location, product, value, rca, M, density, eci, pci,
diversity, ubiquity, coi, cog) and ``DIR/proximity.parquet`` (time, product_1, product_2,
proximity). Input is CSV (any delimiter polars sniffs as comma; every column read as text so
codes keep their leading zeros, the value column then cast to float) or parquet.

Start-up matters (the benchmark compares whole processes): this module and everything it imports
never import Dagster or great_expectations; ``kspill_pipeline_tests/test_standalone.py`` checks
that in a fresh interpreter. The lead wires :func:`add_parser` and :func:`run` into ``cli.py``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

PRESET_NAMES = ("stata", "py-ecomplexity", "r-economiccomplexity")
PARQUET_COMPRESSION = "lz4"


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``relatedness`` sub-command on an argparse ``subparsers`` object."""
    p = subparsers.add_parser(
        "relatedness",
        help="RCA, proximity, density, ECI/PCI, COI/COG from a long CSV/parquet file (no Dagster)",
        description=__doc__.split("\n\n")[0],
    )
    configure_parser(p)
    return p


def configure_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--input", required=True, type=Path, help="long-format CSV or parquet file")
    p.add_argument("--location", required=True, help="unit column (country, city, ...)")
    p.add_argument("--product", required=True, help="product column (read as text)")
    p.add_argument("--value", required=True, help="value column (exports)")
    p.add_argument("--time", default=None, help="period column (optional; one period if absent)")
    p.add_argument("--preset", default="stata", choices=PRESET_NAMES,
                   help="conventions of which tool to reproduce (default: stata)")
    p.add_argument("--rca-threshold", type=float, default=None,
                   help="presence threshold on RCA (default 1; the preset decides > or >=)")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--quiet", action="store_true", help="no summary line")
    return p


def _read(path: Path, cols: list[str], value: str, time_col: str | None):
    import polars as pl

    suffix = "".join(path.suffixes).lower()
    if suffix.endswith(".parquet") or suffix.endswith(".pq"):
        df = pl.read_parquet(path, columns=cols)
    else:
        # fast path: parse with the schema the text path ends up with (labels as text, value
        # Float64, time Int64); any field that does not parse sends the file down the text path
        # below, whose casts turn such values into nulls (value) or keep the column as text (time)
        schema = {c: pl.Utf8 for c in cols}
        schema[value] = pl.Float64
        if time_col is not None:
            schema[time_col] = pl.Int64
        try:
            df = pl.read_csv(path, columns=cols, infer_schema=False, schema_overrides=schema)
        except pl.exceptions.PolarsError:
            df = None
        if df is not None:
            return df
        df = pl.read_csv(path, columns=cols, infer_schema=False)
        if time_col is not None:
            t = df.get_column(time_col)
            as_int = t.cast(pl.Int64, strict=False)
            if as_int.null_count() == t.null_count():
                df = df.with_columns(as_int)
    return df.with_columns(pl.col(value).cast(pl.Float64, strict=False))


def run(args: argparse.Namespace) -> int:
    """Execute the command; returns a process exit code."""
    t0 = time.perf_counter()
    from kspill_pipeline.compute.complexity import ecomplexity

    path = Path(args.input)
    if not path.is_file():
        print(f"kspill relatedness: input file not found: {path}", file=sys.stderr)
        return 2
    cols = [c for c in (args.time, args.location, args.product, args.value) if c is not None]
    try:
        df = _read(path, cols, args.value, args.time)
    except Exception as exc:  # missing column, unreadable file
        print(f"kspill relatedness: cannot read {path}: {exc}", file=sys.stderr)
        return 2
    overrides = {}
    if args.rca_threshold is not None:
        overrides["rca_threshold"] = float(args.rca_threshold)
    comp, prox = ecomplexity(df, args.time, args.location, args.product, args.value,
                             preset=args.preset, **overrides)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # lz4 without column statistics: the same columns, types and values, written for about 30 % less
    # CPU than zstd level 1 with min/max statistics (the 25M-row proximity frame at 5,000 products
    # dominates the run), at up to twice zstd's file size
    comp.write_parquet(out / "complexity.parquet", compression=PARQUET_COMPRESSION, statistics=False)
    prox.write_parquet(out / "proximity.parquet", compression=PARQUET_COMPRESSION, statistics=False)
    if not getattr(args, "quiet", False):
        n_t = comp.get_column("time").n_unique()
        print(
            f"kspill relatedness: {comp.height} rows ({n_t} period(s)) -> {out / 'complexity.parquet'}, "
            f"{prox.height} pairs -> {out / 'proximity.parquet'} [{args.preset}] "
            f"in {time.perf_counter() - t0:.2f} s"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command without the kspill CLI (``python -m kspill_pipeline.standalone ...``)."""
    p = configure_parser(argparse.ArgumentParser(prog="kspill relatedness"))
    return run(p.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
