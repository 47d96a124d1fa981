"""Readers of the researcher-supplied (non-customs) inputs of study S004 -> contract-conformed frames.

Pure module (no Dagster import). Spec ``S004_virtual_agglomeration_export_quality.md`` sections 2-3;
issue 6. Every table has a contract ``data_contracts/s004_in_<table>.yaml`` and lives in
``<data_dir>/<companion_dir>/s004/<table>.csv`` or ``.parquet`` (``companion_dir`` from the data
directory's ``source.yaml``, default ``companion``). :data:`TABLES` lists them with whether the study
needs them (``required``) or can run without them.

Reading steps (:func:`read_s004_file`), each failure an :class:`S004InputError` that names the file,
the 1-based data row(s) (header excluded; CSV line = row + 1) and the rule:

1. CSV: encoding detected as for the customs files (UTF-8 with or without BOM, GB18030/GBK, ...),
   delimiter sniffed among ``,`` TAB ``|`` ``;``, every field read as text; blank records dropped
   (counted in ``n_blank_rows``). Parquet: columns converted to text (integral floats without
   ``.0``) so both formats take the same parsing path.
2. Headers matched to contract columns through the contract aliases (English and the Chinese names
   researchers see, e.g. 城市代码, 年份, 固定资产投资; :meth:`Contract.resolve_header`). Two headers
   for one column -> error; a missing non-nullable column -> error listing the headers found;
   missing nullable columns are all-null; unknown headers are ignored and listed in
   ``ignored_columns`` (columns, never rows, are left out).
3. Values: NFKC, trimmed; empty, ``NA``, ``N/A``, ``nan``, ``null``, ``.``, ``-``, ``--``, ``—`` are
   missing. Codes: ``110100.0`` -> ``110100``; 12-digit adcodes ``xxxxxx000000`` -> 6 digits;
   province ``110000`` -> ``11``; 5-digit numeric HS6 padded with a leading zero. Chinese category
   labels are mapped to the contract's values (:data:`VALUE_ALIASES`), and the case of allowed-value
   columns follows the contract (``East`` -> ``east``, ``hs2007`` -> ``HS2007``). Numbers may carry thousands
   separators (``1,234.5``). A value that does not parse -> rule ``type``.
4. Contract rules, row by row: ``not_null``, ``allowed_values``, ``ranges``, ``patterns``,
   ``unique_grain`` (all rows of a duplicated key are named) and ``foreign_keys`` (city and province
   codes must exist in ``ref_prefecture``; historic codes must be crosswalked first).
5. Table rules across columns or rows (:data:`TABLE_RULES`), e.g. one base year per base-output
   file, a deflator in every controls row, no wage given in logs.
6. ``Contract.conform``: contract column order and dtypes.
"""

from __future__ import annotations

import io
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from kspill_pipeline.contracts.loader import Column, Contract, load_contract

__all__ = [
    "S004InputError",
    "S004Frame",
    "TableSpec",
    "TABLES",
    "VALUE_ALIASES",
    "companion_s004_dir",
    "find_input_file",
    "read_s004_file",
    "read_s004_input",
    "read_s004_inputs",
]

#: Tokens read as missing values (after NFKC and trimming; compared case-insensitively).
MISSING_TOKENS = frozenset({"", "na", "n/a", "nan", "null", "none", ".", "-", "--", "—", "——", "…"})
#: Rows listed in an error message at most.
MAX_ROWS_SHOWN = 5
_EXTENSIONS = (".csv", ".parquet")


# --------------------------------------------------------------------------------------------------
# table registry
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TableSpec:
    """One S004 input table: file stem, contract and whether the study needs it."""

    table: str
    contract: str
    required: bool
    feeds: str


TABLES: dict[str, TableSpec] = {t.table: t for t in (
    TableSpec("digital_coef", "s004_in_digital_coef", True, "vagg (Eq. 22), vagg_in"),
    TableSpec("base_output", "s004_in_base_output", True, "Bartik shares of vagg and vagg_in (Eq. 22)"),
    TableSpec("keyword_counts", "s004_in_keyword_counts", False, "vagg_txt (Table 4 col. 3)"),
    TableSpec("city_controls", "s004_in_city_controls", True, "controls of Tables 2-8"),
    TableSpec("prov_gdp", "s004_in_prov_gdp", True, "ln provincial real GDP in the quality equation (18)"),
    TableSpec("iv1984", "s004_in_iv1984", True, "historical instruments (Table 3 cols. 5-6)"),
    TableSpec("internet_investment", "s004_in_internet_investment", True, "historical instruments (Table 3)"),
    TableSpec("city_cpi", "s004_in_city_cpi", True, "market integration minteg (Eq. 24; Table 8 col. 1)"),
    TableSpec("city_roads", "s004_in_city_roads", True, "congestion lnitff (Table 8 col. 2)"),
    TableSpec("city_industry", "s004_in_city_industry", True, "agg, coa, d_coa (Table 8 cols. 5-6)"),
    TableSpec("national_industry", "s004_in_national_industry", False, "agg with national totals"),
    TableSpec("centre_cities", "s004_in_centre_cities", True, "centre / peri dummies (Table 6)"),
    TableSpec("region3", "s004_in_region3", True, "east / mid / west dummies (Table 6)"),
    TableSpec("bec_map", "s004_in_bec_map", True, "intermediate vs final subsamples (Table 5)"),
    TableSpec("city_adjacency", "s004_in_city_adjacency", False, "partner cities of minteg (contiguous)"),
)}

_CPI_CATEGORY = {
    "食品": "food", "食品类": "food",
    "烟酒": "tobacco_liquor", "烟酒及用品": "tobacco_liquor", "烟酒类": "tobacco_liquor",
    "衣着": "clothing", "衣着类": "clothing",
    "家庭设备用品及维修服务": "household", "家庭设备用品及服务": "household", "家庭设备及用品": "household",
    "家庭设备用品": "household", "家庭设备": "household",
    "医疗保健和个人用品": "medical", "医疗保健及个人用品": "medical", "医疗保健": "medical",
    "交通和通信": "transport_communication", "交通通信": "transport_communication",
    "交通和通讯": "transport_communication", "交通通讯": "transport_communication",
    "娱乐教育文化用品及服务": "recreation_education", "娱乐教育文化": "recreation_education",
    "教育文化娱乐": "recreation_education", "文教娱乐": "recreation_education",
    "居住": "housing", "居住类": "housing",
}
_SECTOR3 = {"第一产业": "primary", "第二产业": "secondary", "第三产业": "tertiary",
            "一产": "primary", "二产": "secondary", "三产": "tertiary"}

#: Value aliases per (contract, column): normalised label -> contract value (applied after NFKC;
#: ASCII letters compared case-insensitively).
VALUE_ALIASES: dict[tuple[str, str], dict[str, str]] = {
    ("s004_in_digital_coef", "digital_sector"): {
        "d61": "J61", "61": "J61", "j61": "J61", "电信": "J61", "电信业": "J61", "电信和其他信息传输服务业": "J61",
        "d62t63": "J62T63", "j62t63": "J62T63", "j62_63": "J62T63", "信息技术服务": "J62T63",
        "软件和信息技术服务业": "J62T63", "计算机服务和软件业": "J62T63",
        "d46": "G46", "g46": "G46", "批发": "G46", "批发业": "G46",
        "d47": "G47", "g47": "G47", "零售": "G47", "零售业": "G47",
        "d45t47": "G45T47", "g45t47": "G45T47", "批发和零售业": "G45T47", "批发零售": "G45T47",
    },
    ("s004_in_digital_coef", "origin"): {
        "total": "total", "total_domestic_plus_imported": "total", "合计": "total", "全部": "total",
        "domestic": "domestic", "domestic_only": "domestic", "国内": "domestic",
    },
    ("s004_in_city_cpi", "category"): _CPI_CATEGORY,
    ("s004_in_city_industry", "sector"): _SECTOR3,
    ("s004_in_national_industry", "sector"): _SECTOR3,
    ("s004_in_centre_cities", "centre_type"): {
        "直辖市": "municipality", "省会": "provincial_capital", "省会城市": "provincial_capital",
        "首府": "provincial_capital", "自治区首府": "provincial_capital", "capital": "provincial_capital",
        "副省级": "subprovincial", "副省级城市": "subprovincial", "计划单列市": "subprovincial",
        "sub_provincial": "subprovincial", "其他": "other",
    },
    ("s004_in_region3", "region3"): {
        "东部": "east", "东部地区": "east", "中部": "central", "中部地区": "central", "mid": "central",
        "middle": "central", "西部": "west", "西部地区": "west",
    },
    ("s004_in_bec_map", "goods_type"): {
        "中间品": "intermediate", "中间产品": "intermediate", "中间投入品": "intermediate",
        "最终品": "final", "最终产品": "final", "资本品": "final", "消费品": "final",
        "capital": "final", "consumption": "final", "其他": "other",
    },
}

#: Code columns and their normalisation kind.
_CODE_KIND = {"city_code": "city", "neighbour_code": "city", "province_code": "province", "hs6": "hs6"}


class S004InputError(ValueError):
    """Bad S004 input: ``file``, ``rule`` and the 1-based data ``rows`` (may be empty)."""

    def __init__(self, file: str, rule: str, detail: str, rows: list[int] | None = None):
        self.file = file
        self.rule = rule
        self.rows = list(rows or [])
        where = ""
        if self.rows:
            shown = ", ".join(str(r) for r in self.rows[:MAX_ROWS_SHOWN])
            more = f" (+{len(self.rows) - MAX_ROWS_SHOWN} more)" if len(self.rows) > MAX_ROWS_SHOWN else ""
            where = f"row{'s' if len(self.rows) > 1 else ''} {shown}{more}: "
        super().__init__(f"{file}: {where}[rule {rule}] {detail}")


@dataclass
class S004Frame:
    """A read and validated S004 input table with its provenance."""

    table: str
    df: pl.DataFrame
    path: Path
    format: str
    encoding: str | None = None
    delimiter: str | None = None
    header_map: dict[str, str] = field(default_factory=dict)
    ignored_columns: list[str] = field(default_factory=list)
    n_blank_rows: int = 0


# --------------------------------------------------------------------------------------------------
# locating files
# --------------------------------------------------------------------------------------------------
def companion_s004_dir(data_dir: Path | str) -> Path:
    """``<data_dir>/<companion_dir>/s004`` (``companion_dir`` from source.yaml, default ``companion``)."""
    d = Path(data_dir)
    comp = "companion"
    if (d / "source.yaml").is_file():
        from kspill_pipeline.config import load_source_config  # noqa: PLC0415

        comp = load_source_config(d).companion_dir
    return d / comp / "s004"


def _spec(table: str) -> TableSpec:
    if table not in TABLES:
        raise KeyError(f"unknown S004 input table {table!r} (known: {sorted(TABLES)})")
    return TABLES[table]


def find_input_file(data_dir: Path | str, table: str) -> Path | None:
    """Path of ``<table>.csv`` or ``<table>.parquet`` in the S004 companion folder, or ``None``.

    Both present -> :class:`S004InputError` (ambiguous). Extensions match case-insensitively.
    """
    _spec(table)
    folder = companion_s004_dir(data_dir)
    if not folder.is_dir():
        return None
    hits = sorted(p for p in folder.iterdir()
                  if p.is_file() and p.stem == table and p.suffix.lower() in _EXTENSIONS)
    if len(hits) > 1:
        raise S004InputError(str(folder / table), "one_file_per_table",
                             f"several files for table {table!r}: {[p.name for p in hits]}; keep one")
    return hits[0] if hits else None


# --------------------------------------------------------------------------------------------------
# raw text frames
# --------------------------------------------------------------------------------------------------
def _read_csv_text(path: Path, rel: str) -> tuple[pl.DataFrame, str, str]:
    from kspill_pipeline.io.raw import detect_encoding, sniff_delimiter  # noqa: PLC0415

    enc, lossy = detect_encoding(path)
    text = path.read_bytes().decode(enc, errors="replace" if lossy else "strict").lstrip("\ufeff")
    delim = sniff_delimiter(text[: 1 << 16])
    try:
        df = pl.read_csv(io.BytesIO(text.encode("utf-8")), separator=delim, quote_char='"',
                         infer_schema=False, has_header=True, raise_if_empty=False,
                         truncate_ragged_lines=False)
    except pl.exceptions.PolarsError as exc:
        raise S004InputError(rel, "csv_format", f"cannot parse the file (delimiter {delim!r}): {exc}") from None
    return df, enc + (" (lossy)" if lossy else ""), delim


def _to_text(df: pl.DataFrame) -> pl.DataFrame:
    """Every column as text; integral floats without ``.0`` (so codes stored as floats survive)."""
    out = []
    for name, dt in df.schema.items():
        c = pl.col(name)
        if dt.is_float():
            integral = c.is_finite() & (c == c.round(0)) & (c.abs() < 1e15)
            out.append(pl.when(integral).then(c.cast(pl.Int64, strict=False).cast(pl.String))
                       .otherwise(c.cast(pl.String)).alias(name))
        elif dt == pl.String:
            out.append(c)
        else:
            out.append(c.cast(pl.String).alias(name))
    return df.select(out) if out else df


def _header_map(headers: list[str], contract: Contract, path: str) -> tuple[dict[str, str], list[str]]:
    mapping: dict[str, str] = {}
    ignored: list[str] = []
    by_canon: dict[str, list[str]] = {}
    for h in headers:
        canon = contract.resolve_header(h)
        if canon is None:
            ignored.append(h)
            continue
        mapping[h] = canon
        by_canon.setdefault(canon, []).append(h)
    dup = {k: v for k, v in by_canon.items() if len(v) > 1}
    if dup:
        detail = "; ".join(f"{k} <- {v}" for k, v in dup.items())
        raise S004InputError(path, "header_unique", f"several headers map to the same column ({detail})")
    missing = [c.name for c in contract.columns if not c.nullable and c.name not in by_canon]
    if missing:
        raise S004InputError(
            path, "required_columns",
            f"missing required column(s) {missing}; headers found: {headers}. Accepted spellings are the "
            f"column name and the aliases in data_contracts/{contract.name}.yaml",
        )
    return mapping, ignored


# --------------------------------------------------------------------------------------------------
# value parsing
# --------------------------------------------------------------------------------------------------
def _norm_text(expr: pl.Expr) -> pl.Expr:
    """NFKC, trimmed; missing tokens -> null."""
    t = expr.str.normalize("NFKC").str.strip_chars()
    return pl.when(t.str.to_lowercase().is_in(list(MISSING_TOKENS))).then(None).otherwise(t)


def _norm_code(expr: pl.Expr, kind: str) -> pl.Expr:
    t = expr.str.replace(r"^([0-9]+)\.0+$", "${1}")
    if kind == "city":
        return pl.when(t.str.contains(r"^[0-9]{6}0{6}$")).then(t.str.slice(0, 6)).otherwise(t)
    if kind == "province":
        return (pl.when(t.str.contains(r"^[0-9]{2}0{4}$")).then(t.str.slice(0, 2))
                .when(t.str.contains(r"^[0-9]{2}0{10}$")).then(t.str.slice(0, 2)).otherwise(t))
    if kind == "hs6":
        return pl.when(t.str.contains(r"^[0-9]{5}$")).then(pl.lit("0") + t).otherwise(t)
    return t


def _value_alias(expr: pl.Expr, amap: dict[str, str]) -> pl.Expr:
    keys = {unicodedata.normalize("NFKC", k).lower(): v for k, v in amap.items()}
    low = expr.str.to_lowercase()
    return pl.when(low.is_in(list(keys))).then(low.replace_strict(keys, default=None)).otherwise(expr)


def _parse_columns(text: pl.DataFrame, contract: Contract, rel: str) -> pl.DataFrame:
    """Text columns (canonical names, plus ``__row``) -> typed columns; unparseable -> rule ``type``."""
    exprs = [pl.col("__row")]
    for c in contract.columns:
        e = _norm_text(pl.col(c.name))
        if c.is_string:
            if c.name in _CODE_KIND:
                e = _norm_code(e, _CODE_KIND[c.name])
            amap = VALUE_ALIASES.get((contract.name, c.name))
            if amap:
                e = _value_alias(e, amap)
            if c.allowed is not None and all(a == a.lower() for a in c.allowed):
                e = e.str.to_lowercase()  # "East" -> "east"
            elif c.allowed is not None and all(a == a.upper() for a in c.allowed):
                e = e.str.to_uppercase()  # "hs2007" -> "HS2007"
            exprs.append(e.alias(c.name))
        elif c.is_numeric:
            num = e.str.replace_all(",", "").str.replace_all(" ", "")
            exprs.append(num.alias(c.name))
        elif c.type == "bool":
            exprs.append(e.str.to_lowercase().alias(c.name))
        else:
            exprs.append(e.alias(c.name))
    df = text.select(exprs)
    out = [pl.col("__row")]
    for c in contract.columns:
        if c.is_numeric:
            parsed = pl.col(c.name).cast(pl.Float64, strict=False)
            bad = pl.col(c.name).is_not_null() & (parsed.is_null() | parsed.is_nan())
            if c.type.startswith("int"):
                bad = bad | (parsed.is_not_null() & (parsed != parsed.round(0)))
            _raise_rows(df, bad, rel, "type", lambda r, c=c: (
                f"column {c.name}: {_fmt(r[c.name])} is not a{'n integer' if c.type.startswith('int') else ' number'}"
            ))
            out.append(parsed.cast(c.polars_dtype) if c.type.startswith("int") else parsed.alias(c.name))
        elif c.type == "bool":
            m = {"true": True, "1": True, "yes": True, "是": True, "false": False, "0": False, "no": False, "否": False}
            bad = pl.col(c.name).is_not_null() & ~pl.col(c.name).is_in(list(m))
            _raise_rows(df, bad, rel, "type", lambda r, c=c: f"column {c.name}: {_fmt(r[c.name])} is not true/false")
            out.append(pl.col(c.name).replace_strict(m, default=None, return_dtype=pl.Boolean))
        elif c.type == "date":
            parsed = pl.col(c.name).str.to_date(strict=False)
            bad = pl.col(c.name).is_not_null() & parsed.is_null()
            _raise_rows(df, bad, rel, "type", lambda r, c=c: f"column {c.name}: {_fmt(r[c.name])} is not a date")
            out.append(parsed.alias(c.name))
        else:
            out.append(pl.col(c.name))
    return df.select(out)


def _fmt(v) -> str:
    return repr(v)


def _raise_rows(df: pl.DataFrame, bad: pl.Expr, rel: str, rule: str, describe: Callable[[dict], str]) -> None:
    hit = df.filter(bad)
    if hit.height:
        first = hit.row(0, named=True)
        raise S004InputError(rel, rule, describe(first) + (f" ({hit.height} rows in total)" if hit.height > 1 else ""),
                             rows=hit["__row"].to_list())


# --------------------------------------------------------------------------------------------------
# contract rules, row by row
# --------------------------------------------------------------------------------------------------
def _ref_codes(kind: str) -> set[str]:
    from kspill_pipeline.reference.admin import prefectures  # noqa: PLC0415

    p = prefectures()
    return set(p["city_code"].to_list()) if kind == "city_code" else set(p["province_code"].to_list())


def _check_rules(df: pl.DataFrame, contract: Contract, rel: str, check_foreign_keys: bool) -> None:
    for c in contract.columns:
        if not c.nullable:
            _raise_rows(df, pl.col(c.name).is_null(), rel, "not_null",
                        lambda r, c=c: f"column {c.name} is empty (non-nullable)")
    for c in contract.columns:
        if c.allowed is not None:
            bad = pl.col(c.name).is_not_null() & ~pl.col(c.name).is_in(list(c.allowed))
            _raise_rows(df, bad, rel, "allowed_values",
                        lambda r, c=c: f"column {c.name}: {_fmt(r[c.name])} not in {list(c.allowed)}")
    for c in contract.columns:
        if c.range is not None:
            x = pl.col(c.name)
            bad = x.is_nan() if c.type.startswith("float") else pl.lit(False)
            if c.range.min is not None:
                bad = bad | ((x <= c.range.min) if c.range.min_exclusive else (x < c.range.min))
            if c.range.max is not None:
                bad = bad | ((x >= c.range.max) if c.range.max_exclusive else (x > c.range.max))
            _raise_rows(df, x.is_not_null() & bad, rel, "ranges",
                        lambda r, c=c: f"column {c.name}: {_fmt(r[c.name])} violates {c.range.describe()}"
                        + _range_hint(c))
    for c in contract.columns:
        if c.pattern is not None:
            bad = pl.col(c.name).is_not_null() & ~pl.col(c.name).str.contains(c.pattern)
            _raise_rows(df, bad, rel, "patterns",
                        lambda r, c=c: f"column {c.name}: {_fmt(r[c.name])} does not match {c.pattern}")
    grain = list(contract.grain)
    if grain:
        dup = df.filter(pl.len().over(grain) > 1).sort("__row")
        if dup.height:
            key = {g: dup.row(0, named=True)[g] for g in grain}
            rows = dup.filter(pl.all_horizontal([pl.col(g).eq_missing(pl.lit(v)) for g, v in key.items()]))["__row"]
            raise S004InputError(
                rel, "unique_grain",
                f"duplicate key {key} ({dup.height} rows share a key with another row; one row per {tuple(grain)})",
                rows=rows.to_list(),
            )
    if check_foreign_keys:
        for c in contract.columns:
            fk = c.foreign_key
            if fk is None or fk.table != "ref_prefecture":
                continue
            known = _ref_codes(fk.column)
            bad = pl.col(c.name).is_not_null() & ~pl.col(c.name).is_in(sorted(known))
            hit = df.filter(bad)
            if hit.height:
                vals = sorted(set(hit[c.name].to_list()))[:MAX_ROWS_SHOWN]
                raise S004InputError(
                    rel, "foreign_keys",
                    f"column {c.name}: {len(set(hit[c.name].to_list()))} code(s) not in ref_prefecture.{fk.column}, "
                    f"e.g. {vals}; use 2020-vintage codes (crosswalk historic codes with "
                    "kspill_pipeline/reference/data/region_crosswalk.csv)",
                    rows=hit["__row"].to_list(),
                )


def _range_hint(c: Column) -> str:
    if c.range is not None and c.range.max is not None and c.range.max <= 50 and c.unit is None:
        return " (a ratio is expected; a level or a percentage must be converted)"
    return ""


# --------------------------------------------------------------------------------------------------
# table rules (across columns / rows)
# --------------------------------------------------------------------------------------------------
def _rule_single_value(col: str) -> Callable[[pl.DataFrame, str], None]:
    def rule(df: pl.DataFrame, rel: str) -> None:
        vals = df[col].drop_nulls().unique().sort().to_list()
        if len(vals) > 1:
            first = vals[0]
            _raise_rows(df, pl.col(col) != first, rel, f"single_{col}",
                        lambda r: f"column {col} must be the same in every row; found {vals}")
    return rule


def _rule_one_of(cols: tuple[str, str]) -> Callable[[pl.DataFrame, str], None]:
    def rule(df: pl.DataFrame, rel: str) -> None:
        _raise_rows(df, pl.col(cols[0]).is_null() & pl.col(cols[1]).is_null(), rel, f"{cols[0]}_or_{cols[1]}",
                    lambda r: f"every row needs {cols[0]} or {cols[1]}; both are empty")
    return rule


def _rule_level_not_log(col: str, floor: float) -> Callable[[pl.DataFrame, str], None]:
    def rule(df: pl.DataFrame, rel: str) -> None:
        s = df[col].drop_nulls()
        if s.len() and float(s.median()) < floor:
            _raise_rows(df, pl.col(col) < floor, rel, f"{col}_level",
                        lambda r: f"column {col} has median {float(s.median()):.4g} < {floor}: it looks logged; "
                                  "supply the nominal level in yuan")
    return rule


def _rule_city_output_positive(df: pl.DataFrame, rel: str) -> None:
    zero = df.group_by("city_code").agg(pl.col("output").sum().alias("tot")).filter(pl.col("tot") <= 0)
    if zero.height:
        codes = zero["city_code"].sort().to_list()
        _raise_rows(df, pl.col("city_code").is_in(codes), rel, "city_output_positive",
                    lambda r: f"cities with zero total base-year output (no Bartik shares): {codes[:MAX_ROWS_SHOWN]}")


def _rule_no_trade_double_count(df: pl.DataFrame, rel: str) -> None:
    key = ["country", "origin", "year", "sector"]
    flags = df.group_by(key).agg(
        (pl.col("digital_sector") == "G45T47").any().alias("agg"),
        pl.col("digital_sector").is_in(["G46", "G47"]).any().alias("split"),
    ).filter(pl.col("agg") & pl.col("split")).select(key)
    if flags.height:
        bad = df.join(flags.with_columns(pl.lit(True).alias("__dbl")), on=key, how="left")
        _raise_rows(bad, pl.col("__dbl").fill_null(False) & pl.col("digital_sector").is_in(["G45T47", "G46", "G47"]),
                    rel, "no_trade_double_count",
                    lambda r: f"sector {r['sector']} year {r['year']} lists G45T47 and G46/G47 (double counting)")


def _rule_no_self_pair(df: pl.DataFrame, rel: str) -> None:
    _raise_rows(df, pl.col("city_code") == pl.col("neighbour_code"), rel, "no_self_pair",
                lambda r: f"city {r['city_code']} is listed as its own neighbour")


#: Cross-column / cross-row rules per table (after the contract rules).
TABLE_RULES: dict[str, list[Callable[[pl.DataFrame, str], None]]] = {
    "digital_coef": [_rule_no_trade_double_count],
    "base_output": [_rule_single_value("base_year"), _rule_city_output_positive],
    "city_controls": [_rule_one_of(("deflator_index", "deflator_chain")),
                      _rule_level_not_log("wage_nominal", 100.0), _rule_level_not_log("gdp_pc_nominal", 100.0)],
    "prov_gdp": [_rule_single_value("price_base_year")],
    "city_cpi": [_rule_one_of(("cpi_chain", "cpi_index"))],
    "city_adjacency": [_rule_no_self_pair],
}


# --------------------------------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------------------------------
def _rel_name(path: Path, data_dir: Path | str | None) -> str:
    if data_dir is not None:
        try:
            return path.resolve().relative_to(Path(data_dir).resolve()).as_posix()
        except ValueError:
            pass
    return str(path)


def read_s004_file(path: Path | str, table: str, *, data_dir: Path | str | None = None,
                   check_foreign_keys: bool = True) -> S004Frame:
    """Read, validate and conform one S004 input file (see the module docstring).

    ``table`` is a key of :data:`TABLES`. ``data_dir`` only shortens the file name in messages.
    ``check_foreign_keys`` checks city / province codes against ``ref_prefecture`` (default on).
    """
    spec = _spec(table)
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(p)
    rel = _rel_name(p, data_dir)
    contract = load_contract(spec.contract)
    ext = p.suffix.lower()
    enc = delim = None
    if ext == ".csv":
        raw, enc, delim = _read_csv_text(p, rel)
    elif ext == ".parquet":
        try:
            raw = _to_text(pl.read_parquet(p))
        except Exception as exc:  # noqa: BLE001 - pyarrow/polars raise several types
            raise S004InputError(rel, "parquet_format", f"cannot read the parquet file: {exc}") from None
    else:
        raise S004InputError(rel, "file_format", f"unsupported extension {p.suffix!r} (expected .csv or .parquet)")
    headers = list(raw.columns)
    mapping, ignored = _header_map(headers, contract, rel)
    raw = raw.with_row_index("__row", offset=1).with_columns(pl.col("__row").cast(pl.Int64))
    text = raw.select(["__row", *[pl.col(h).alias(canon) for h, canon in mapping.items()]])
    for c in contract.columns:
        if c.name not in text.columns:
            text = text.with_columns(pl.lit(None, dtype=pl.String).alias(c.name))
    cols = [c.name for c in contract.columns]
    blank = pl.all_horizontal([_norm_text(pl.col(h)).is_null() for h in headers]) if headers else pl.lit(True)
    keep = ~raw.select(blank.alias("b"))["b"]
    n_blank = int((~keep).sum())
    text = text.filter(keep)
    typed = _parse_columns(text.select(["__row", *cols]), contract, rel)
    _check_rules(typed, contract, rel, check_foreign_keys)
    for rule in TABLE_RULES.get(table, []):
        rule(typed, rel)
    df = contract.conform(typed.drop("__row"))
    return S004Frame(table=table, df=df, path=p, format=ext.lstrip("."), encoding=enc, delimiter=delim,
                     header_map=mapping, ignored_columns=ignored, n_blank_rows=n_blank)


def read_s004_input(data_dir: Path | str, table: str, *, required: bool | None = None,
                    check_foreign_keys: bool = True) -> pl.DataFrame | None:
    """The conformed frame of ``table`` from the data directory's S004 companion folder.

    A missing file raises ``FileNotFoundError`` when the table is required (``required=None``
    takes :data:`TABLES`' default) and returns ``None`` otherwise.
    """
    spec = _spec(table)
    req = spec.required if required is None else required
    p = find_input_file(data_dir, table)
    if p is None:
        if req:
            raise FileNotFoundError(
                f"S004 input {table!r} not found: expected {companion_s004_dir(data_dir)}/{table}.csv or .parquet "
                f"(contract data_contracts/{spec.contract}.yaml; feeds {spec.feeds})"
            )
        return None
    return read_s004_file(p, table, data_dir=data_dir, check_foreign_keys=check_foreign_keys).df


def read_s004_inputs(data_dir: Path | str, *, check_foreign_keys: bool = True) -> dict[str, pl.DataFrame | None]:
    """Every table of :data:`TABLES` (optional absent tables as ``None``); errors as above."""
    return {t: read_s004_input(data_dir, t, check_foreign_keys=check_foreign_keys) for t in TABLES}
