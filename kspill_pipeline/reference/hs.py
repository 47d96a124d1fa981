"""HS vintages HS1992..HS2017 <-> Harvard Growth Lab H0..H5 and the HS6 concordance to a target vintage.

Source: trade-weighted conversion weights shipped in the PyPI package ``atlas-common-data`` 1.1.1
(Apache-2.0), files ``atlas_common_data/data/conversion_weights/conversion_weights_H{a}_to_H{b}.csv``
for adjacent revisions in both directions. The files are located with
``importlib.util.find_spec`` **without importing** ``atlas_common_data`` (its ``__init__`` pulls
network libraries).

Method (documented in ref_hs_concordance.yaml):

* Codes are zero-padded to 6 characters (the files drop leading zeros in 292-439 rows each).
* A source vintage reaches the target by chaining adjacent revisions in the direction of the target
  (HS1996 -> HS2002 -> HS2007; HS2017 -> HS2012 -> HS2007; HS2007 -> HS2002 uses the H3_to_H2 file).
  Chained weights multiply along the path and add over paths: w(s,t) = sum_m w1(s,m) w2(m,t).
* ``value_split``: every positive chained weight is kept and renormalised to sum to exactly 1 per
  source code (renormalisation only matters where a chain hits an intermediate code that has no
  row in the next file, and for floating error).
* ``single_target``: each source code goes to its largest chained weight (ties: lowest target code)
  with weight 1.
* The identity vintage (source == target) maps every valid code to itself with weight 1.
* A source code whose every chained weight is zero (chain broken) is absent from the concordance and
  so is quarantined as ``hs_unmapped`` by the cleaning (none occur in 1.1.1; checked in the tests).
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Literal

import polars as pl

VINTAGES: tuple[str, ...] = ("HS1992", "HS1996", "HS2002", "HS2007", "HS2012", "HS2017")
#: HS vintage -> Growth Lab revision label.
VINTAGE_TO_H: dict[str, str] = {v: f"H{i}" for i, v in enumerate(VINTAGES)}
H_TO_VINTAGE: dict[str, str] = {h: v for v, h in VINTAGE_TO_H.items()}

Mode = Literal["single_target", "value_split"]

CONCORDANCE_SCHEMA: dict[str, pl.DataType] = {
    "source_vintage": pl.String(),
    "source_hs6": pl.String(),
    "target_vintage": pl.String(),
    "target_hs6": pl.String(),
    "weight": pl.Float64(),
}


def weights_dir() -> Path:
    """Folder of the Growth Lab conversion weights inside the installed atlas-common-data package."""
    spec = importlib.util.find_spec("atlas_common_data")  # does not execute the package __init__
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "atlas-common-data (1.1.1) is not installed; it ships the HS conversion weights"
        )
    d = Path(next(iter(spec.submodule_search_locations))) / "data" / "conversion_weights"
    if not d.is_dir():
        raise FileNotFoundError(f"conversion weights folder missing: {d}")
    return d


def _check_vintage(v: str) -> int:
    if v not in VINTAGES:
        raise ValueError(f"unknown HS vintage {v!r}; expected one of {VINTAGES}")
    return VINTAGES.index(v)


@lru_cache(maxsize=None)
def adjacent_weights(source_vintage: str, target_vintage: str) -> pl.DataFrame:
    """Raw weights of one adjacent step (codes padded to 6), columns source, target, weight."""
    a, b = _check_vintage(source_vintage), _check_vintage(target_vintage)
    if abs(a - b) != 1:
        raise ValueError(f"{source_vintage}->{target_vintage} is not an adjacent revision")
    ha, hb = f"H{a}", f"H{b}"
    f = weights_dir() / f"conversion_weights_{ha}_to_{hb}.csv"
    df = pl.read_csv(f, schema_overrides={ha: pl.String, hb: pl.String, "weight": pl.Float64})
    return df.select(
        pl.col(ha).str.strip_chars().str.zfill(6).alias("source"),
        pl.col(hb).str.strip_chars().str.zfill(6).alias("target"),
        pl.col("weight").cast(pl.Float64),
    )


@lru_cache(maxsize=None)
def valid_codes(vintage: str) -> frozenset[str]:
    """Valid HS6 codes of a vintage: every source code of the weight files leaving that vintage."""
    i = _check_vintage(vintage)
    codes: set[str] = set()
    for j in (i - 1, i + 1):
        if 0 <= j < len(VINTAGES):
            codes.update(adjacent_weights(vintage, VINTAGES[j])["source"].to_list())
    return frozenset(codes)


@lru_cache(maxsize=None)
def _chained(source_vintage: str, target_vintage: str) -> pl.DataFrame:
    """Chained positive weights source -> target (not renormalised). Columns source, target, weight."""
    a, b = _check_vintage(source_vintage), _check_vintage(target_vintage)
    if a == b:
        codes = sorted(valid_codes(source_vintage))
        return pl.DataFrame({"source": codes, "target": codes, "weight": [1.0] * len(codes)})
    step = 1 if b > a else -1
    cur = adjacent_weights(VINTAGES[a], VINTAGES[a + step]).filter(pl.col("weight") > 0)
    for i in range(a + step, b, step):
        nxt = adjacent_weights(VINTAGES[i], VINTAGES[i + step]).filter(pl.col("weight") > 0)
        cur = (
            cur.join(nxt.rename({"source": "mid", "target": "t2", "weight": "w2"}),
                     left_on="target", right_on="mid", how="inner")
            .group_by("source", "t2")
            .agg((pl.col("weight") * pl.col("w2")).sum().alias("weight"))
            .rename({"t2": "target"})
        )
    return cur.filter(pl.col("weight") > 0).sort("source", "target")


@lru_cache(maxsize=None)
def concordance(source_vintage: str, target_vintage: str, mode: Mode = "single_target") -> pl.DataFrame:
    """HS6 concordance from ``source_vintage`` to ``target_vintage`` (columns of ref_hs_concordance.yaml).

    ``value_split``: all positive chained weights, renormalised to sum to 1 per source code.
    ``single_target``: the largest chained weight per source code (ties: lowest target code), weight 1.
    """
    if mode not in ("single_target", "value_split"):
        raise ValueError(f"unknown concordance mode {mode!r}")
    ch = _chained(source_vintage, target_vintage)
    if mode == "value_split":
        out = ch.with_columns(pl.col("weight") / pl.col("weight").sum().over("source"))
    else:
        out = (
            ch.sort(["source", "weight", "target"], descending=[False, True, False])
            .group_by("source", maintain_order=True)
            .first()
            .with_columns(pl.lit(1.0).alias("weight"))
        )
    return (
        out.select(
            pl.lit(source_vintage).alias("source_vintage"),
            pl.col("source").alias("source_hs6"),
            pl.lit(target_vintage).alias("target_vintage"),
            pl.col("target").alias("target_hs6"),
            pl.col("weight").cast(pl.Float64),
        )
        .sort("source_hs6", "target_hs6")
        .cast(CONCORDANCE_SCHEMA)
    )


@lru_cache(maxsize=None)
def concordance_table(target_vintage: str, mode: Mode = "single_target") -> pl.DataFrame:
    """All source vintages stacked (HS1992..HS2017, including the identity of the target)."""
    _check_vintage(target_vintage)
    return pl.concat([concordance(v, target_vintage, mode) for v in VINTAGES], how="vertical")
