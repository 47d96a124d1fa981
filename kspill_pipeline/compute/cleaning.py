"""Cleaning of raw China Customs records (customs_raw -> trade_clean + trade_quarantine + report).

Specs: S000 2.3 (intermediary keywords, processing trade, HS2007), S001 2.5 (months -> years, Hong
Kong, intermediaries), S004 2.3 (HS2002 target). Study-specific exclusions are **flagged, never
dropped** (ARCHITECTURE "One cleaned dataset, many studies"); only rows invalid for every purpose go
to the quarantine.

Input: a polars frame of canonical raw fields, all strings (year, month, firm_id, firm_name, flow,
hs_code, partner, trade_mode, ownership, region_code, city, address, value_usd, quantity, unit; absent
columns are treated as all-null), plus ``source_file`` (str), ``source_row`` (Int64, 1-based) and
optionally a boolean ``source_numeric_hs`` (the HS code came from a numeric column).

Rules, applied in this order; the FIRST broken rule is the row's quarantine reason:

 1. ``encoding_garbage``  U+FFFD, "锟斤拷", C0/C1 control characters or two consecutive Latin-1
    letters (U+00C0-U+00FF, typical of GBK/UTF-8 bytes decoded as Latin-1) in any text field.
 2. ``bad_year``          year present but not an integer (``2005.0`` is accepted).
 3. ``year_mismatch``     row year != partition year.
 4. ``bad_month``         month present but not an integer 1-12 (``YYYYMM`` of the partition year is
    accepted).
 5. ``missing_firm_id``   firm_id null or blank.
 6. ``bad_flow``          not one of 出口/出/export/exp/e/x, 进口/进/import/imp/i/m (case-insensitive)
    or a key of ``cfg.flow_codes`` (0/1 by default, [EXT]).
 7. ``bad_hs_code``       after trimming, dropping one trailing ``.0`` of numeric columns and removing
    dots/spaces: 8 digits ok; 7 digits -> left-padded with 0 (counted in accounting, separately for
    text columns); 10 digits -> first 8 (the 2 statistical digits); anything else bad.
 8. ``hs_unmapped``       HS6 is not a source code of the concordance from the year's vintage
    (``cfg.hs_vintage_by_year``) to ``cfg.hs_target_vintage``.
 9. ``bad_value``         value not numeric (thousands separators "," removed; NaN/inf are not
    numeric).
10. ``nonpositive_value`` value <= 0.
11. ``bad_quantity``      quantity present and non-numeric or negative (missing is fine).
12. ``unknown_partner``   partner does not normalise to ISO3 (reference.countries).
13. ``unmapped_region``   no city from the region code (direct, then historic crosswalk), the city
    name, or (``cfg.address_fallback``) the address (cpca).

Then duplicates among the rows that passed 1-13, on the key (year, month, firm_id, flow, hs8,
partner ISO3, trade_mode, region_code, unit) with the parsed/normalised values (so 出口 and export
rows of the same key are duplicates). ``cfg.duplicate_policy``:

* ``quarantine_conflicts``: if every row of a key group has the same value and quantity, the first row
  (file order) is kept and later copies are ``duplicate_exact``; otherwise ALL rows of the group are
  ``duplicate_conflict``.
* ``sum``: duplicates are kept and summed by the annual aggregation.

Then the kept rows get: ``firm_name_hash`` (sha256 of the NFKC name without whitespace, first 16 hex;
names are never kept) of the firm-year's canonical name (its most frequent name; ties: lowest hash),
``intermediary_keywords`` (union list keywords contained in that name) and ``is_intermediary``
(active list ``cfg.intermediary_keywords``). Substring matching means 出口加工区 (export processing
zone) in a name flags 出口: this false positive is kept on purpose, as in the papers; spot-checking
is the researcher's job. ``trade_mode_class``; ``ownership_class`` (``largest_value``: the class with
the largest value in the firm-year among rows with a non-null ownership, ties by class name, "other"
when no row has one; ``per_row``: per output row, the class with the largest value within it);
partner ISO3 and ``partner_is_hk``; city, province, macro region; HS concordance (value and quantity
times the weight, ``source_rows`` = weight) and the annual aggregation at the trade_clean grain
(``n_months`` = distinct months, 1 for annual rows).

Two entry points with the same result: :func:`clean_customs` (one frame of the whole year, about
1.2 GB extra per million raw rows at the peak) and :func:`clean_customs_chunked` (an iterable of
frames, e.g. the batches of ``io.raw.iter_customs_file``; used by the ``clean_customs`` asset).
Rules 1-13 are row-local, so the chunked path applies them per chunk of ``CLEAN_CHUNK_ROWS`` rows
and keeps only the quarantine records and the compact parsed columns of the passing rows (codes as
categoricals, about 130 bytes a row); rule 14, the firm-year attributes, the concordance and the
aggregation then run once on those. Row order (``_rid``) is the position in the concatenation, so
"first copy" and the quarantine order are the same; sums may add in another order (last-bit float
differences).

Accounting identities (checked and returned in ``CleanResult.accounting``):
rows read = sum(source_rows kept) + rows quarantined; value read (parseable) = value kept + value
quarantined (parseable), to 1e-9 relative.
"""

from __future__ import annotations

import hashlib
import os
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from kspill_pipeline.config import KEYWORD_UNION, CleaningConfig
from kspill_pipeline.reference import admin, countries, hs, ownership, trade_modes

RAW_FIELDS: tuple[str, ...] = (
    "year", "month", "firm_id", "firm_name", "flow", "hs_code", "partner", "trade_mode", "ownership",
    "region_code", "city", "address", "value_usd", "quantity", "unit",
)

REASONS: tuple[str, ...] = (
    "encoding_garbage", "bad_year", "year_mismatch", "bad_month", "missing_firm_id", "bad_flow",
    "bad_hs_code", "hs_unmapped", "bad_value", "nonpositive_value", "bad_quantity", "unknown_partner",
    "unmapped_region", "duplicate_exact", "duplicate_conflict",
)

CLEAN_SCHEMA: dict[str, pl.DataType] = {
    "year": pl.Int32(),
    "firm_id": pl.String(),
    "firm_name_hash": pl.String(),
    "region_code": pl.String(),
    "city_code": pl.String(),
    "province_code": pl.String(),
    "macro_region": pl.String(),
    "city_source": pl.String(),
    "flow": pl.String(),
    "hs8_raw": pl.String(),
    "hs_vintage_raw": pl.String(),
    "hs6": pl.String(),
    "hs4": pl.String(),
    "hs2": pl.String(),
    "hs_split_weight": pl.Float64(),
    "partner_iso3": pl.String(),
    "partner_is_hk": pl.Boolean(),
    "trade_mode_raw": pl.String(),
    "trade_mode_class": pl.String(),
    "ownership_class": pl.String(),
    "intermediary_keywords": pl.List(pl.String()),
    "is_intermediary": pl.Boolean(),
    "value_usd": pl.Float64(),
    "quantity": pl.Float64(),
    "unit": pl.String(),
    "n_months": pl.Int16(),
    "source_rows": pl.Float64(),
}

QUARANTINE_SCHEMA: dict[str, pl.DataType] = {
    "year": pl.Int32(),
    "source_file": pl.String(),
    "source_row": pl.Int64(),
    "reason": pl.String(),
    "rule_detail": pl.String(),
    "firm_id": pl.String(),
    "flow_raw": pl.String(),
    "hs_code_raw": pl.String(),
    "partner_raw": pl.String(),
    "region_code_raw": pl.String(),
    "value_usd_raw": pl.String(),
    "value_usd": pl.Float64(),
}

REPORT_SCHEMA: dict[str, pl.DataType] = {
    "year": pl.Int32(),
    "rule": pl.String(),
    "action": pl.String(),
    "rows": pl.Float64(),
    "value_usd": pl.Float64(),
    "share_rows": pl.Float64(),
    "share_value": pl.Float64(),
}

GRAIN: tuple[str, ...] = (
    "year", "firm_id", "region_code", "flow", "hs8_raw", "hs6", "partner_iso3", "trade_mode_raw", "unit",
)

_EXPORT_WORDS = ("出口", "出", "export", "exports", "exp", "e", "x")
_IMPORT_WORDS = ("进口", "进", "import", "imports", "imp", "i", "m")

#: Mojibake: replacement char, 锟斤拷 (UTF-8 of U+FFFD read as GBK), control chars, two Latin-1 letters.
_GARBAGE_RE = r"\x{FFFD}|锟斤拷|[\x{0000}-\x{0008}\x{000E}-\x{001F}\x{007F}-\x{009F}]|[\x{00C0}-\x{00FF}]{2}"

REL_TOL = 1e-9


@dataclass
class CleanResult:
    """Outputs of :func:`clean_customs` for one year."""

    clean: pl.DataFrame
    quarantine: pl.DataFrame
    report: pl.DataFrame
    accounting: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------

def name_hash(name: str | None) -> str | None:
    """First 16 hex of sha256 of the NFKC-normalised name without whitespace; empty -> None."""
    if name is None:
        return None
    n = "".join(unicodedata.normalize("NFKC", name).split())
    if not n:
        return None
    return hashlib.sha256(n.encode("utf-8")).hexdigest()[:16]


def parse_number(col: str) -> pl.Expr:
    """Parse a numeric string (trimmed, thousands separators removed); NaN/inf -> null."""
    v = pl.col(col).str.replace_all(",", "", literal=True).str.strip_chars().cast(pl.Float64, strict=False)
    return pl.when(v.is_finite()).then(v)


def _map_unique(s: pl.Series, fn, dtype=pl.String) -> pl.Series:
    mapping = {u: fn(u) for u in s.unique().drop_nulls().to_list()}
    return s.replace_strict(mapping, default=None, return_dtype=dtype)


def _prepare(raw: pl.DataFrame, source_numeric_hs: bool | None, rid_offset: int = 0) -> pl.DataFrame:
    cols = []
    for c in RAW_FIELDS:
        if c in raw.columns:
            cols.append(pl.col(c).cast(pl.String).alias(c))
        else:
            cols.append(pl.lit(None, dtype=pl.String).alias(c))
    if "source_numeric_hs" in raw.columns:
        num_hs = pl.col("source_numeric_hs").cast(pl.Boolean).fill_null(bool(source_numeric_hs))
    else:
        num_hs = pl.lit(bool(source_numeric_hs))
    src_file = pl.col("source_file").cast(pl.String) if "source_file" in raw.columns else pl.lit(None, pl.String)
    src_row = (
        pl.col("source_row").cast(pl.Int64) if "source_row" in raw.columns
        else pl.int_range(rid_offset + 1, rid_offset + pl.len() + 1, dtype=pl.Int64)
    )
    return raw.select(
        pl.int_range(rid_offset, rid_offset + pl.len(), dtype=pl.Int64).alias("_rid"),
        src_file.alias("source_file"),
        src_row.alias("source_row"),
        num_hs.alias("_num_hs"),
        *cols,
    )


# --------------------------------------------------------------------------------------------------
# main entry point
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _YearSetup:
    year: int
    vintage: str
    target: str
    conc: pl.DataFrame
    valid_src: Any


def _year_setup(year: int, cfg: CleaningConfig) -> _YearSetup:
    year = int(year)
    vintage = cfg.hs_vintage_by_year.get(year)
    if vintage is None:
        raise ValueError(f"no HS vintage configured for year {year} (cfg.hs_vintage_by_year)")
    target = cfg.hs_target_vintage
    return _YearSetup(year, vintage, target, hs.concordance(vintage, target, cfg.hs_mode), hs.valid_codes(vintage))


def _row_rules(
    raw: pl.DataFrame, ys: _YearSetup, cfg: CleaningConfig, source_numeric_hs: bool | None, rid_offset: int = 0,
) -> tuple[pl.DataFrame, pl.Expr]:
    """Rules 1-13 (row-local): the prepared frame with ``_reason`` (first broken rule or null), the
    parsed columns, and the expression of the rule detail (evaluated on quarantined rows only)."""
    year, vintage, target, conc, valid_src = ys.year, ys.vintage, ys.target, ys.conc, ys.valid_src
    df = _prepare(raw, source_numeric_hs, rid_offset)
    text = list(RAW_FIELDS)
    # trim; blank -> null (raw text kept for quarantine detail columns)
    df = df.with_columns(
        [pl.col(c).str.strip_chars().replace("", None).alias(c) for c in text]
        + [pl.col(c).alias(f"_raw_{c}") for c in ("flow", "hs_code", "partner", "region_code", "value_usd")]
    )

    # ---- 1 encoding garbage ------------------------------------------------------------------
    garbage_any = pl.any_horizontal([pl.col(c).str.contains(_GARBAGE_RE).fill_null(False) for c in text])
    garbage_field = pl.concat_str(
        [pl.when(pl.col(c).str.contains(_GARBAGE_RE).fill_null(False)).then(pl.lit(c)) for c in text],
        separator=",", ignore_nulls=True,
    )

    # ---- parsed fields ---------------------------------------------------------------------------
    year_num = pl.col("year").cast(pl.Float64, strict=False)
    month_num = pl.col("month").cast(pl.Float64, strict=False)
    month_yyyymm = (
        pl.when(pl.col("month").str.contains(r"^\d{6}$") & (pl.col("month").str.slice(0, 4) == str(year)))
        .then(pl.col("month").str.slice(4, 2).cast(pl.Float64, strict=False))
        .otherwise(month_num)
    )
    flow_key = pl.col("flow").str.to_lowercase().str.replace(r"^(\d+)\.0+$", "${1}")
    flow_map = {w: "export" for w in _EXPORT_WORDS} | {w: "import" for w in _IMPORT_WORDS}
    flow_map |= {str(k).strip().lower(): v for k, v in cfg.flow_codes.items()}

    hs_clean = (
        pl.col("hs_code").str.replace(r"^(\d{7,10})\.0+$", "${1}").str.replace_all(r"[.\s]", "")
    )
    df = df.with_columns(
        garbage_any.alias("_garbage"),
        year_num.alias("_year_f"),
        month_yyyymm.alias("_month_f"),
        flow_key.replace_strict(flow_map, default=None, return_dtype=pl.String).alias("_flow"),
        hs_clean.alias("_hs_clean"),
        parse_number("value_usd").alias("_value"),
        parse_number("quantity").alias("_qty"),
    )
    hs_len = pl.col("_hs_clean").str.len_chars()
    hs_digits = pl.col("_hs_clean").str.contains(r"^\d+$").fill_null(False)
    df = df.with_columns(
        pl.when(hs_digits & (hs_len == 8)).then(pl.col("_hs_clean"))
        .when(hs_digits & (hs_len == 7)).then(pl.col("_hs_clean").str.zfill(8))
        .when(hs_digits & (hs_len == 10)).then(pl.col("_hs_clean").str.slice(0, 8))
        .alias("_hs8"),
        (hs_digits & (hs_len == 7)).alias("_hs_padded"),
        (hs_digits & (hs_len == 10)).alias("_hs_truncated"),
    ).with_columns(pl.col("_hs8").str.slice(0, 6).alias("_hs6_src"))

    conc_src = conc["source_hs6"].unique()
    df = df.with_columns(pl.col("_hs6_src").is_in(conc_src.implode()).fill_null(False).alias("_in_conc"))

    # partner, only over unique strings
    df = df.with_columns(countries.to_iso3(df["partner"]).alias("_iso3"))

    # ---- rule flags (before the location rule, which is expensive) ----------------------------
    yr_present = pl.col("year").is_not_null()
    yr_int = (pl.col("_year_f").is_not_null() & (pl.col("_year_f") == pl.col("_year_f").round(0))).fill_null(False)
    mo_present = pl.col("month").is_not_null()
    mo_ok = (
        pl.col("_month_f").is_not_null()
        & (pl.col("_month_f") == pl.col("_month_f").round(0))
        & (pl.col("_month_f") >= 1) & (pl.col("_month_f") <= 12)
    ).fill_null(False)
    rules: list[tuple[str, pl.Expr, pl.Expr]] = [
        ("encoding_garbage", pl.col("_garbage"),
         pl.lit("mojibake/replacement characters in field(s): ") + garbage_field),
        ("bad_year", yr_present & ~yr_int, pl.lit("year=") + pl.col("year")),
        ("year_mismatch", yr_present & yr_int & (pl.col("_year_f") != float(year)),
         pl.lit("year=") + pl.col("year") + pl.lit(f" but partition year={year}")),
        ("bad_month", mo_present & ~mo_ok, pl.lit("month=") + pl.col("month")),
        ("missing_firm_id", pl.col("firm_id").is_null(), pl.lit("firm_id missing")),
        ("bad_flow", pl.col("_flow").is_null(),
         pl.lit("flow=") + pl.col("flow").fill_null("<missing>")),
        ("bad_hs_code", pl.col("_hs8").is_null(),
         pl.lit("hs_code=") + pl.col("hs_code").fill_null("<missing>")),
        ("hs_unmapped", ~pl.col("_in_conc"),
         pl.lit("hs6=") + pl.col("_hs6_src")
         + pl.when(pl.col("_hs6_src").is_in(list(valid_src)))
         .then(pl.lit(f" is a {vintage} code without a {target} target"))
         .otherwise(pl.lit(f" is not a {vintage} HS6 code"))),
        ("bad_value", pl.col("_value").is_null(),
         pl.lit("value_usd=") + pl.col("value_usd").fill_null("<missing>")),
        ("nonpositive_value", pl.col("_value") <= 0, pl.lit("value_usd=") + pl.col("value_usd")),
        ("bad_quantity",
         pl.col("quantity").is_not_null() & (pl.col("_qty").is_null() | (pl.col("_qty") < 0)),
         pl.lit("quantity=") + pl.col("quantity")),
        ("unknown_partner", pl.col("_iso3").is_null(),
         pl.lit("partner=") + pl.col("partner").fill_null("<missing>")),
    ]
    reason = pl.lit(None, dtype=pl.String)
    for name, cond, _det in reversed(rules):
        reason = pl.when(cond.fill_null(False)).then(pl.lit(name)).otherwise(reason)
    df = df.with_columns(reason.alias("_reason"), pl.lit(None, dtype=pl.String).alias("_detail"))
    # details are built later on the quarantined rows only (strings for every row cost memory)
    detail = pl.lit(None, dtype=pl.String)
    for name, _cond, det in reversed(rules):
        detail = pl.when(pl.col("_reason") == name).then(det).otherwise(detail)
    detail = pl.when(pl.col("_reason") == "unmapped_region").then(
        pl.lit("region_code=") + pl.col("region_code").fill_null("<missing>")
        + pl.lit("; no city from region code, city name")
        + pl.lit(" or address" if cfg.address_fallback else "")
    ).otherwise(detail)

    # ---- 13 location: region code -> crosswalk -> city name -> address --------------------------
    df = _locate(df, cfg)
    unl = pl.col("_reason").is_null() & pl.col("_city_code").is_null()
    df = df.with_columns(pl.when(unl).then(pl.lit("unmapped_region")).otherwise("_reason").alias("_reason"))

    return df, detail


def _quarantine_rows(df: pl.DataFrame, detail: pl.Expr, year: int, *, keep_rid: bool = False) -> pl.DataFrame:
    """Quarantine records of the rows of ``df`` with a reason (``_detail`` set wins over ``detail``)."""
    return (
        df.filter(pl.col("_reason").is_not_null())
        .sort("_rid")
        .with_columns(pl.coalesce(pl.col("_detail"), detail).alias("_detail"))
        .select(
            *(["_rid"] if keep_rid else []),
            pl.lit(year, dtype=pl.Int32).alias("year"),
            pl.col("source_file").cast(pl.String),
            "source_row",
            pl.col("_reason").alias("reason"),
            pl.col("_detail").alias("rule_detail"),
            pl.col("firm_id").cast(pl.String),
            pl.col("_raw_flow").cast(pl.String).alias("flow_raw"),
            pl.col("_raw_hs_code").cast(pl.String).alias("hs_code_raw"),
            pl.col("_raw_partner").cast(pl.String).alias("partner_raw"),
            pl.col("_raw_region_code").cast(pl.String).alias("region_code_raw"),
            pl.col("_raw_value_usd").cast(pl.String).alias("value_usd_raw"),
            pl.col("_value").alias("value_usd"),
        )
        .cast(QUARANTINE_SCHEMA)
    )


#: columns of the rows that pass rules 1-13, as needed by duplicates, enrichment and aggregation
_KEPT_COLUMNS = (
    "firm_id", "firm_name", "region_code", "trade_mode", "ownership", "unit", "_month_f", "_flow", "_hs8",
    "_hs6_src", "_iso3", "_city_code", "_city_source", "_value", "_qty", "_hs_padded", "_hs_truncated", "_num_hs",
)


def _finish_year(
    kept: pl.DataFrame, quarantine: pl.DataFrame, ys: _YearSetup, rows_read: int, value_read: float,
    cfg: CleaningConfig,
) -> CleanResult:
    """Enrichment, annual aggregation, report and accounting from the kept rows (rules 1-14 passed)."""
    year = ys.year
    padded_kept = int(kept["_hs_padded"].sum() or 0)
    padded_text_kept = int((kept["_hs_padded"] & ~kept["_num_hs"]).sum() or 0)
    truncated_kept = int(kept["_hs_truncated"].sum() or 0)
    padded_value = float(kept.filter(pl.col("_hs_padded"))["_value"].sum()) if padded_kept else 0.0

    clean = _enrich_and_aggregate(kept, year, ys.vintage, ys.conc, cfg)
    del kept
    report, accounting = _report(clean, quarantine, year, rows_read, value_read, cfg)
    accounting.update(
        hs_vintage_raw=ys.vintage,
        hs_target_vintage=ys.target,
        hs_mode=cfg.hs_mode,
        hs7_padded_rows=padded_kept,
        hs7_padded_text_rows=padded_text_kept,
        hs10_truncated_rows=truncated_kept,
    )
    if padded_kept:
        extra = pl.DataFrame(
            {"year": [year], "rule": ["flag:hs7_padded"], "action": ["flagged"], "rows": [float(padded_kept)],
             "value_usd": [padded_value]},
        ).with_columns(
            (pl.col("rows") / rows_read).alias("share_rows") if rows_read else pl.lit(None, pl.Float64).alias("share_rows"),
            (pl.col("value_usd") / value_read).alias("share_value") if value_read else pl.lit(None, pl.Float64).alias("share_value"),
        ).cast(REPORT_SCHEMA)
        report = pl.concat([report, extra])
    return CleanResult(clean=clean, quarantine=quarantine, report=report, accounting=accounting)


def clean_customs(
    raw: pl.DataFrame,
    year: int,
    cfg: CleaningConfig | None = None,
    *,
    source_numeric_hs: bool | None = None,
) -> CleanResult:
    """Clean one year of raw customs rows (see the module docstring for the rules and their order).

    Single shot: the whole year is in memory as text (about 1.2 GB extra per million raw rows at the
    peak); :func:`clean_customs_chunked` gives the same result in bounded memory.
    """
    cfg = cfg or CleaningConfig()
    ys = _year_setup(year, cfg)
    year = ys.year
    df, detail = _row_rules(raw, ys, cfg, source_numeric_hs)

    # ---- duplicates -----------------------------------------------------------------------------
    df = _duplicates(df, cfg)

    # ---- split ----------------------------------------------------------------------------------
    quarantine = _quarantine_rows(df, detail, year)
    rows_read = df.height
    value_read = float(df["_value"].sum() or 0.0)
    kept = df.filter(pl.col("_reason").is_null()).select(*_KEPT_COLUMNS)
    del df
    return _finish_year(kept, quarantine, ys, rows_read, value_read, cfg)


#: rows per chunk of :func:`clean_customs_chunked` (peak about 1.2 GB extra per million rows)
CLEAN_CHUNK_ROWS = int(os.environ.get("KSPILL_CLEAN_CHUNK_ROWS", "1000000"))

_CAT = pl.Categorical()
#: compact dtypes of the kept rows held between the chunk pass and the year pass (codes as categoricals)
_COMPACT: dict[str, pl.DataType] = {
    "_rid": pl.Int64(), "source_file": _CAT, "source_row": pl.Int64(),
    "firm_id": _CAT, "firm_name": _CAT, "region_code": _CAT, "trade_mode": _CAT, "ownership": _CAT, "unit": _CAT,
    "_month_f": pl.Int8(), "_flow": _CAT, "_hs8": _CAT, "_hs6_src": _CAT, "_iso3": _CAT, "_city_code": _CAT,
    "_city_source": _CAT, "_value": pl.Float64(), "_qty": pl.Float64(), "_hs_padded": pl.Boolean(),
    "_hs_truncated": pl.Boolean(), "_num_hs": pl.Boolean(),
    # raw text of the fields the quarantine records, for rows that turn out to be duplicates
    "_raw_flow": _CAT, "_raw_hs_code": _CAT, "_raw_partner": _CAT, "_raw_region_code": _CAT,
    "_raw_value_usd": pl.String(),
}


def _split_rows(frames: Iterable[pl.DataFrame], chunk_rows: int) -> Iterator[pl.DataFrame]:
    for f in frames:
        if f.height <= chunk_rows:
            yield f
        else:
            for off in range(0, f.height, chunk_rows):
                yield f.slice(off, chunk_rows)


def clean_customs_chunked(
    frames: Iterable[pl.DataFrame],
    year: int,
    cfg: CleaningConfig | None = None,
    *,
    source_numeric_hs: bool | None = None,
    chunk_rows: int | None = None,
) -> CleanResult:
    """:func:`clean_customs` of the concatenation of ``frames`` (in order) in bounded memory.

    ``frames`` is any iterable of raw frames (e.g. the batches of :func:`io.raw.iter_customs_file`
    over a year's files); frames longer than ``chunk_rows`` (default ``CLEAN_CHUNK_ROWS``) are
    sliced. Rules 1-13 are row-local and run per chunk; only the compact parsed columns of the rows
    that pass (codes as categoricals) and the quarantine records are kept. Duplicates (rule 14), the
    firm-year attributes, the concordance and the annual aggregation then run once on the kept rows.
    Same rows, values (to float rounding of sums), quarantine reasons and report as the single shot.
    A frame without ``source_row`` is numbered by its position in the concatenation, as there.
    """
    cfg = cfg or CleaningConfig()
    ys = _year_setup(year, cfg)
    n_chunk = int(chunk_rows or CLEAN_CHUNK_ROWS)
    if n_chunk < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    kept_parts: list[pl.DataFrame] = []
    quar_parts: list[pl.DataFrame] = []
    rows_read = 0
    value_read = 0.0
    for raw in _split_rows(frames, n_chunk):
        df, detail = _row_rules(raw, ys, cfg, source_numeric_hs, rid_offset=rows_read)
        rows_read += df.height
        value_read += float(df["_value"].sum() or 0.0)
        quar_parts.append(_quarantine_rows(df, detail, ys.year, keep_rid=True))
        kept_parts.append(
            df.filter(pl.col("_reason").is_null()).select(
                [pl.col(c).cast(t) for c, t in _COMPACT.items()]
            )
        )
        del df, raw
    schema = dict(_COMPACT)
    kept = pl.concat(kept_parts, how="vertical", rechunk=True) if kept_parts else pl.DataFrame(schema=schema)
    kept_parts.clear()
    kept, dup_q = _duplicates_compact(kept, cfg, ys.year)
    quar_parts.append(dup_q)
    quarantine = pl.concat(quar_parts, how="vertical").sort("_rid").drop("_rid")
    quar_parts.clear()
    kept = kept.select(*_KEPT_COLUMNS)
    return _finish_year(kept, quarantine, ys, rows_read, value_read, cfg)


def _duplicates_compact(kept: pl.DataFrame, cfg: CleaningConfig, year: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Rule 14 on the kept rows of all chunks (in ``_rid`` order): (rows still kept, quarantine
    records with ``_rid`` of the duplicates). Same decisions and details as :func:`_duplicates`."""
    empty_q = pl.DataFrame(schema={"_rid": pl.Int64(), **QUARANTINE_SCHEMA})
    if cfg.duplicate_policy == "sum" or kept.height == 0:
        return kept, empty_q
    key = list(_DUP_KEY)
    g = kept.select(
        "_rid", "source_row", *key, "_value", "_qty", pl.len().over(key).alias("_n")
    ).filter(pl.col("_n") > 1)
    if g.height == 0:
        return kept, empty_q
    g = g.with_columns(
        (
            (pl.col("_value").n_unique().over(key) > 1)
            | (pl.col("_qty").n_unique().over(key) > 1)
        ).alias("_conflict"),
        (pl.col("_rid") == pl.col("_rid").min().over(key)).alias("_first"),
        pl.col("source_row").sort_by("_rid").first().over(key).alias("_first_row"),
    ).select(
        "_rid",
        pl.when(pl.col("_conflict")).then(pl.lit("duplicate_conflict"))
        .when(~pl.col("_first")).then(pl.lit("duplicate_exact"))
        .alias("_reason"),
        pl.when(pl.col("_conflict")).then(
            pl.lit("same key as ") + (pl.col("_n") - 1).cast(pl.String) + pl.lit(" other row(s) with different value/quantity")
        ).when(~pl.col("_first")).then(
            pl.lit("exact copy of an earlier row (source_row ") + pl.col("_first_row").cast(pl.String) + pl.lit(")")
        ).alias("_detail"),
    ).filter(pl.col("_reason").is_not_null())
    is_dup = pl.col("_rid").is_in(g["_rid"].implode())
    q = kept.filter(is_dup).join(g, on="_rid", how="left", maintain_order="left")
    q = _quarantine_rows(q, pl.lit(None, dtype=pl.String), year, keep_rid=True)
    return kept.filter(~is_dup), q


# --------------------------------------------------------------------------------------------------
# steps
# --------------------------------------------------------------------------------------------------

def _locate(df: pl.DataFrame, cfg: CleaningConfig) -> pl.DataFrame:
    """Add _city_code and _city_source: region code, crosswalk, city name, then address."""
    # column-wise lookups (replace_strict on small dicts) instead of joins: no copy of the wide frame
    reg = admin.resolve_region_codes(df["region_code"].drop_nulls())
    rc = dict(zip(reg["region_code"].to_list(), reg["city_code"].to_list()))
    rs = dict(zip(reg["region_code"].to_list(), reg["city_source"].to_list()))
    df = df.with_columns(
        pl.col("region_code").replace_strict(rc, default=None, return_dtype=pl.String).alias("_c_reg"),
        pl.col("region_code").replace_strict(rs, default=None, return_dtype=pl.String).alias("_s_reg"),
    )
    need = pl.col("_c_reg").is_null() & pl.col("_reason").is_null()
    # city name (unique names only, and only where still needed)
    names = df.filter(need & pl.col("city").is_not_null())["city"].unique()
    nm = dict(zip(names.to_list(), admin.city_name_to_code(names).to_list()))
    df = df.with_columns(
        pl.when(need).then(pl.col("city").replace_strict(nm, default=None, return_dtype=pl.String)).alias("_c_name")
    )
    addr_map: dict[str, str | None] = {}
    if cfg.address_fallback:
        addr = df.filter(need & pl.col("_c_name").is_null() & pl.col("address").is_not_null())["address"].unique()
        if addr.len():
            addr_map = dict(zip(addr.to_list(), admin.address_to_city(addr).to_list()))
    df = df.with_columns(
        pl.when(need & pl.col("_c_name").is_null())
        .then(pl.col("address").replace_strict(addr_map, default=None, return_dtype=pl.String))
        .alias("_c_addr")
    )
    return df.with_columns(
        pl.coalesce("_c_reg", "_c_name", "_c_addr").alias("_city_code"),
        pl.when(pl.col("_c_reg").is_not_null()).then("_s_reg")
        .when(pl.col("_c_name").is_not_null()).then(pl.lit("city_name"))
        .when(pl.col("_c_addr").is_not_null()).then(pl.lit("address"))
        .alias("_city_source"),
    ).drop("_c_reg", "_s_reg", "_c_name", "_c_addr")


_DUP_KEY = ("_month_f", "firm_id", "_flow", "_hs8", "_iso3", "trade_mode", "region_code", "unit")


def _duplicates(df: pl.DataFrame, cfg: CleaningConfig) -> pl.DataFrame:
    if cfg.duplicate_policy == "sum":
        return df
    ok = pl.col("_reason").is_null()
    cand = df.filter(ok).select("_rid", *_DUP_KEY, "_value", "_qty")
    g = cand.with_columns(
        pl.len().over(_DUP_KEY).alias("_n"),
    ).filter(pl.col("_n") > 1)
    if g.height == 0:
        return df
    g = g.with_columns(
        (
            (pl.col("_value").n_unique().over(_DUP_KEY) > 1)
            | (pl.col("_qty").n_unique().over(_DUP_KEY) > 1)
        ).alias("_conflict"),
        (pl.col("_rid") == pl.col("_rid").min().over(_DUP_KEY)).alias("_first"),
        pl.col("_rid").min().over(_DUP_KEY).alias("_first_rid"),
    )
    g = g.select(
        "_rid",
        pl.when(pl.col("_conflict")).then(pl.lit("duplicate_conflict"))
        .when(~pl.col("_first")).then(pl.lit("duplicate_exact"))
        .alias("_dup_reason"),
        pl.when(pl.col("_conflict")).then(
            pl.lit("same key as ") + (pl.col("_n") - 1).cast(pl.String) + pl.lit(" other row(s) with different value/quantity")
        ).when(~pl.col("_first")).then(pl.lit("exact copy of an earlier row"))
        .alias("_dup_detail"),
        "_first_rid",
    ).filter(pl.col("_dup_reason").is_not_null())
    # name the source row of the first copy in the detail (file + row are not firm data)
    src_rows = df["source_row"]
    g = g.with_columns(pl.col("_first_rid").map_batches(lambda r: src_rows.gather(r), return_dtype=pl.Int64)
                       .alias("_first_row")).with_columns(
        pl.when(pl.col("_dup_reason") == "duplicate_exact")
        .then(pl.col("_dup_detail") + pl.lit(" (source_row ") + pl.col("_first_row").cast(pl.String) + pl.lit(")"))
        .otherwise("_dup_detail").alias("_dup_detail")
    ).drop("_first_rid", "_first_row")
    # _rid is the row position (no join above reorders df): scatter the few duplicate reasons
    n = df.height
    dup_r = pl.Series("_dup_reason", [None] * n, dtype=pl.String).scatter(g["_rid"], g["_dup_reason"])
    dup_d = pl.Series("_dup_detail", [None] * n, dtype=pl.String).scatter(g["_rid"], g["_dup_detail"])
    return df.with_columns(
        pl.coalesce(pl.col("_reason"), pl.lit(dup_r)).alias("_reason"),
        pl.coalesce(pl.col("_detail"), pl.lit(dup_d)).alias("_detail"),
    )


def _firm_names(kept: pl.DataFrame, cfg: CleaningConfig) -> pl.DataFrame:
    """Per firm_id: canonical name hash, keyword list and is_intermediary (name never leaves here)."""
    names = kept.select("firm_id", "firm_name").filter(pl.col("firm_name").is_not_null())
    uniq = names["firm_name"].unique()
    nmap = pl.DataFrame({"firm_name": uniq, "_hash": _map_unique(uniq, name_hash)}).with_columns(
        pl.col("firm_name").cast(pl.String).str.normalize("NFKC").str.replace_all(r"\s", "").alias("_norm"),
    ).filter(pl.col("_hash").is_not_null())
    counts = (
        names.join(nmap, on="firm_name", how="inner")
        .group_by("firm_id", "_hash")
        .agg(pl.len().alias("_n"), pl.col("_norm").first())
        .sort(["firm_id", "_n", "_hash"], descending=[False, True, False])
        .group_by("firm_id", maintain_order=True)
        .first()
    )
    kw_exprs = [
        pl.when(pl.col("_norm").str.contains(kw, literal=True)).then(pl.lit(kw)) for kw in KEYWORD_UNION
    ]
    active = list(cfg.intermediary_keywords)
    return counts.select(
        "firm_id",
        pl.col("_hash").alias("firm_name_hash"),
        pl.concat_list(kw_exprs).list.drop_nulls().alias("intermediary_keywords"),
        pl.any_horizontal([pl.col("_norm").str.contains(kw, literal=True) for kw in active] or [pl.lit(False)])
        .alias("is_intermediary"),
    )


def _lookup(frame: pl.DataFrame, key: str, table: pl.DataFrame) -> pl.DataFrame:
    """The columns of ``table`` (unique on ``key``) for every row of ``frame`` (in order, null when
    absent): a left join of the key column only, so the wide frame is never copied."""
    return frame.select(key).join(table, on=key, how="left", maintain_order="left").drop(key)


def _enrich_and_aggregate(
    kept: pl.DataFrame, year: int, vintage: str, conc: pl.DataFrame, cfg: CleaningConfig
) -> pl.DataFrame:
    """Firm-year attributes, concordance and the annual aggregation of the kept rows.

    The kept columns may be String (single shot) or Categorical (chunked path); attributes that are
    constant within an output row (trade mode class, firm-year ownership and name, prefecture) are
    looked up after the aggregation, on the key column only (memory: no copy of the wide frame).
    """
    if kept.height == 0:
        return pl.DataFrame(schema=CLEAN_SCHEMA)
    firms = _firm_names(kept, cfg)
    # lookups over unique values; the kept columns may be String or Categorical (chunked path)
    tm = kept["trade_mode"].unique().cast(pl.String)
    tm_map = dict(zip(tm.to_list(), trade_modes.classify_trade_mode(tm).to_list()))
    ow = kept["ownership"].unique().cast(pl.String)
    ow_map = pl.DataFrame({"ownership": ow, "_own_row": ownership.classify_ownership(ow)}).with_columns(
        pl.when(pl.col("ownership").is_null()).then(None).otherwise("_own_row").alias("_own_row")
    )
    own_expr = pl.col("ownership").replace_strict(
        {k: v for k, v in zip(ow_map["ownership"].to_list(), ow_map["_own_row"].to_list()) if k is not None},
        default=None, return_dtype=pl.String)
    pref = admin.prefectures().select(
        pl.col("city_code").cast(kept.schema["_city_code"]), "province_code", "macro_region"
    )
    rc = kept["region_code"].unique().drop_nulls().cast(pl.String)
    rc5 = rc.filter(rc.str.contains(r"^\d{5}$")).cast(kept.schema["region_code"])

    own = None
    if cfg.ownership_rule == "largest_value":
        own = (
            kept.select("firm_id", own_expr.alias("_own_row"), pl.col("_value").alias("_v"))
            .filter(pl.col("_own_row").is_not_null())
            .group_by("firm_id", "_own_row").agg(pl.col("_v").sum())
            .sort(["firm_id", "_v", "_own_row"], descending=[False, True, False])
            .group_by("firm_id", maintain_order=True).first()
            .select("firm_id", pl.col("_own_row").alias("ownership_class"))
        )

    base = (
        kept.select(
            "firm_id", "region_code", "trade_mode", "unit",
            *([own_expr.alias("_own_row")] if cfg.ownership_rule != "largest_value" else []),
            pl.col("_month_f").cast(pl.Int16).alias("_month"),
            pl.col("_flow").alias("flow"),
            pl.col("_hs8").alias("hs8_raw"),
            pl.col("_hs6_src"),
            pl.col("_iso3").alias("partner_iso3"),
            pl.col("_city_code").alias("city_code"),
            pl.col("_city_source").alias("city_source"),
            pl.col("_value").alias("_v"),
            pl.col("_qty").alias("_q"),
        )
        .with_columns(
            # region_code as given when 5 digits, null when the city came from the address
            pl.when(pl.col("region_code").is_in(rc5.implode()) & (pl.col("city_source") != "address"))
            .then("region_code").alias("region_code"),
        )
    )
    del kept

    c = conc.select(
        pl.col("source_hs6").cast(base.schema["_hs6_src"]).alias("_hs6_src"),
        pl.col("target_hs6").cast(base.schema["_hs6_src"]).alias("hs6"),
        pl.col("weight").alias("hs_split_weight"),
    )
    if c["_hs6_src"].is_unique().all():
        # one target per source code (single_target): a lookup; every kept code has a target (rule 8)
        base = base.with_columns(_lookup(base, "_hs6_src", c).get_columns())
    else:
        base = base.join(c, on="_hs6_src", how="inner")
    base = base.with_columns(
        (pl.col("_v") * pl.col("hs_split_weight")).alias("_v"),
        (pl.col("_q") * pl.col("hs_split_weight")).alias("_q"),
    )
    keys = ["firm_id", "region_code", "city_code", "city_source", "flow", "hs8_raw", "hs6", "partner_iso3",
            "trade_mode", "unit"]
    aggs = [
        pl.col("hs_split_weight").first(),
        pl.col("_v").sum().alias("value_usd"),
        pl.when(pl.col("_q").count() > 0).then(pl.col("_q").sum()).alias("quantity"),
        pl.col("_month").drop_nulls().n_unique().clip(1, 12).cast(pl.Int16).alias("n_months"),
        pl.col("hs_split_weight").sum().alias("source_rows"),
    ]
    if cfg.ownership_rule != "largest_value":
        aggs.append(
            pl.col("_own_row").fill_null("other").sort_by(["_v", "_own_row"], descending=[True, False])
            .first().alias("ownership_class")
        )
    out = base.group_by(keys).agg(aggs)
    del base
    out = out.with_columns(
        pl.col("trade_mode").cast(pl.String).replace_strict(tm_map, default="other", return_dtype=pl.String)
        .alias("trade_mode_class"),
        *_lookup(out, "firm_id", firms).get_columns(),
        *_lookup(out, "city_code", pref).get_columns(),
    )
    if own is not None:
        out = out.with_columns(_lookup(out, "firm_id", own).get_columns()).with_columns(pl.col("ownership_class").fill_null("other"))
    out = out.with_columns(
        pl.lit(year, dtype=pl.Int32).alias("year"),
        pl.lit(vintage).alias("hs_vintage_raw"),
        pl.col("hs6").cast(pl.String).str.slice(0, 4).alias("hs4"),
        pl.col("hs6").cast(pl.String).str.slice(0, 2).alias("hs2"),
        countries.is_hk(pl.col("partner_iso3")).alias("partner_is_hk"),
        pl.col("trade_mode").alias("trade_mode_raw"),
        pl.col("intermediary_keywords").fill_null(pl.lit([], dtype=pl.List(pl.String))),
        pl.col("is_intermediary").fill_null(False),
    )
    # sort on the (maybe categorical) keys: categoricals sort by their strings, as the String output;
    # then gather and cast column by column, so that at most one column exists twice (memory)
    order = out.select(list(GRAIN)).with_row_index("_i").sort(list(GRAIN), nulls_last=True)["_i"]
    out = out.select(list(CLEAN_SCHEMA))
    cols = []
    for name, dtype in CLEAN_SCHEMA.items():
        col = out.get_column(name)
        out = out.drop(name)
        cols.append(col.gather(order).cast(dtype))
        del col
    return pl.DataFrame(cols)


def _report(
    clean: pl.DataFrame, quarantine: pl.DataFrame, year: int, rows_read: int, value_read: float,
    cfg: CleaningConfig,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    rows_kept = float(clean["source_rows"].sum() or 0.0)
    value_kept = float(clean["value_usd"].sum() or 0.0)
    rows_q = quarantine.height
    value_q = float(quarantine["value_usd"].sum() or 0.0)
    rows: list[tuple[str, str, float, float]] = [
        ("read", "total", float(rows_read), value_read),
        ("kept", "total", rows_kept, value_kept),
        ("quarantined", "quarantined", float(rows_q), value_q),
    ]
    by_reason = quarantine.group_by("reason").agg(pl.len().alias("n"), pl.col("value_usd").sum().alias("v"))
    d = {r: (float(n), float(v or 0.0)) for r, n, v in by_reason.iter_rows()}
    for r in REASONS:
        n, v = d.get(r, (0.0, 0.0))
        rows.append((f"quarantine:{r}", "quarantined", n, v))

    def flag(mask: pl.Expr) -> tuple[float, float]:
        r, v = clean.select(
            pl.col("source_rows").filter(mask).sum(), pl.col("value_usd").filter(mask).sum()
        ).row(0)
        return float(r or 0.0), float(v or 0.0)

    rows.append(("flag:intermediary", "flagged", *flag(pl.col("is_intermediary"))))
    rows.append(("flag:processing", "flagged", *flag(pl.col("trade_mode_class") == "processing")))
    rows.append(("flag:partner_hk", "flagged", *flag(pl.col("partner_is_hk"))))
    for kw in KEYWORD_UNION:
        rows.append((f"flag:keyword:{kw}", "flagged", *flag(pl.col("intermediary_keywords").list.contains(kw))))
    rep = pl.DataFrame(
        rows, schema={"rule": pl.String, "action": pl.String, "rows": pl.Float64, "value_usd": pl.Float64},
        orient="row",
    ).with_columns(
        pl.lit(year, dtype=pl.Int32).alias("year"),
        (pl.col("rows") / rows_read if rows_read else pl.lit(None, pl.Float64)).alias("share_rows"),
        (pl.col("value_usd") / value_read if value_read else pl.lit(None, pl.Float64)).alias("share_value"),
    ).select(list(REPORT_SCHEMA)).cast(REPORT_SCHEMA)

    def close(a: float, b: float) -> bool:
        return abs(a - b) <= REL_TOL * max(1.0, abs(a), abs(b))

    acc = {
        "year": year,
        "rows_read": rows_read,
        "rows_kept": rows_kept,
        "rows_quarantined": rows_q,
        "value_read": value_read,
        "value_kept": value_kept,
        "value_quarantined": value_q,
        "identity_rows_ok": close(float(rows_read), rows_kept + rows_q),
        "identity_value_ok": close(value_read, value_kept + value_q),
        "quarantine_by_reason": {r: int(d.get(r, (0, 0))[0]) for r in REASONS},
    }
    return rep, acc
