"""Readers of raw China Customs files (CSV/TXT/TSV, Stata .dta, parquet) -> all-text polars frames.

Pure module (no Dagster import). Every reader returns a :class:`RawFrame` whose ``df`` has exactly
the canonical columns of ``data_contracts/customs_raw.yaml`` in contract order, all ``Utf8``
(absent optional columns are all-null), plus ``source_file`` (Utf8, path relative to the data
directory with ``/`` separators) and ``source_row`` (Int64, 1-based data record, header excluded).
Headers are matched through the contract aliases after :func:`normalise_header` (BOM, NFKC so
``（）`` -> ``()``, ASCII lower case, collapsed spaces; a second try maps spaces/hyphens/dots to
``_``). For .dta files whose variable names do not match, the variable *label* is tried too.

Decisions (documented here and in the README):

- Two headers mapping to the same canonical column -> ``ValueError`` (ambiguous; rename one).
- A missing non-nullable column (firm_id, flow, hs_code, partner, value_usd) -> ``ValueError``
  naming the file, the missing field(s) and the headers found. A missing ``year`` column is filled
  with the file-name year; other nullable columns become all-null.
- Unknown headers are dropped from ``df`` but listed in ``RawFrame.ignored_columns``.
- CSV blank records (an empty line, or only delimiters) carry no information and are dropped;
  ``source_row`` keeps the record numbering of the file, ``RawFrame.n_blank_rows`` counts them and
  :func:`count_rows` does not count them either.
- CSV encoding: BOM -> utf-8-sig / utf-16; strict UTF-8 -> ``utf-8``; mostly valid UTF-8 with a
  few bad bytes (valid multi-byte characters >= 20x the errors) -> ``utf-8`` read lossily
  (bad bytes -> U+FFFD); strict GB18030 (superset of GBK/GB2312) -> ``gb18030``; otherwise the
  encoding guessed by charset-normalizer on a sample (among utf-8, gb18030, big5), decoded with
  ``errors="replace"`` so undecodable bytes become U+FFFD in their own row (the cleaning rule
  ``encoding_garbage`` quarantines them) -- never a crash. Non-UTF-8 files are transcoded to a
  temporary UTF-8 file in 4 MiB streaming chunks before polars reads them (bounded memory).
- CSV delimiter sniffed among ``,`` ``\\t`` ``|`` ``;`` (the one giving the most fields with a
  consistent count over the first 50 records); quote character ``"``; every column read as text
  (``infer_schema=False``) so leading zeros survive; empty fields are null. Ragged rows (more
  fields than the header) raise ``ValueError`` naming the file (never silently shifted).
- Stata/parquet numbers become text: integers as integers, integer-valued floats without ``.0``,
  other floats in shortest round-trip form, NaN/missing and empty strings -> null (as in CSV),
  categoricals -> their labels.
  ``numeric_hs`` is True when the HS column was stored as a number (leading zeros lost; the
  cleaner pads 7-digit codes). Stata files are read in chunks of ``STATA_CHUNK_ROWS`` rows.
  Old Stata formats (< 118) store bytes: text that is not plain ASCII is re-decoded as GB18030
  (strict; left as read when that fails), ``encoding`` reports it.
"""

from __future__ import annotations

import codecs
import csv
import io
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import polars as pl

from kspill_pipeline.contracts.loader import Contract, load_contract, normalise_header

__all__ = [
    "CUSTOMS_EXTENSIONS",
    "RawFrame",
    "count_rows",
    "customs_root",
    "detect_encoding",
    "discover_files",
    "iter_customs_file",
    "read_customs_file",
    "read_year",
    "sniff_delimiter",
    "year_of_path",
]

CUSTOMS_EXTENSIONS = {".csv", ".txt", ".tsv", ".dta", ".parquet"}
REQUIRED_FIELDS = ("firm_id", "flow", "hs_code", "partner", "value_usd")
DELIMITERS = (",", "\t", "|", ";")
CHUNK_BYTES = 4 << 20
STATA_CHUNK_ROWS = 250_000
#: default rows per batch of :func:`iter_customs_file` (override with ``KSPILL_RAW_BATCH_ROWS``)
RAW_BATCH_ROWS = int(os.environ.get("KSPILL_RAW_BATCH_ROWS", "1000000"))
_YEAR_RE = re.compile(r"(?<![0-9])(19[9][0-9]|20[0-9]{2})(?![0-9])")
_YM_RE = re.compile(r"(?<![0-9])(19[9][0-9]|20[0-9]{2})(0[1-9]|1[0-2])(?:[0-3][0-9])?(?![0-9])")
_IGNORED_DIRS = {"_truth"}


@dataclass
class RawFrame:
    df: pl.DataFrame
    source_file: str
    encoding: str | None
    format: str
    numeric_hs: bool = False
    ignored_columns: list[str] = field(default_factory=list)
    header_map: dict[str, str] = field(default_factory=dict)  # original header -> canonical
    year_from_name: int | None = None
    delimiter: str | None = None
    n_blank_rows: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def n_rows(self) -> int:
        return self.df.height


# --------------------------------------------------------------------------------------------------
# discovery
# --------------------------------------------------------------------------------------------------
def customs_root(data_dir: Path | str) -> Path:
    """Root of the customs files: ``source.yaml``'s ``customs_dir`` (relative) or ``data_dir``."""
    d = Path(data_dir)
    f = d / "source.yaml"
    if f.is_file():
        from kspill_pipeline.config import load_source_config  # noqa: PLC0415

        return (d / load_source_config(d).customs_dir).resolve()
    return d.resolve()


def _years_in(text: str) -> set[int]:
    years = {int(m) for m in _YEAR_RE.findall(text)}
    if not years:
        years = {int(m[0]) for m in _YM_RE.findall(text)}
    return years


def year_of_path(path: Path | str, root: Path | str | None = None) -> int:
    """Year of a customs file: the 4-digit token 1990-2099 in the file name (else a YYYYMM[DD]
    token), else in the nearest parent folder below ``root``. No year, or two different years in
    the deciding name -> ``ValueError`` naming the file."""
    p = Path(path)
    years = _years_in(p.stem)
    if len(years) > 1:
        raise ValueError(f"{p}: file name holds several years {sorted(years)}; rename the file")
    if years:
        return years.pop()
    parents = p.parent.parts
    if root is not None:
        try:
            parents = p.parent.resolve().relative_to(Path(root).resolve()).parts
        except ValueError:
            parents = p.parent.parts
    for part in reversed(parents):
        ys = _years_in(part)
        if len(ys) > 1:
            raise ValueError(f"{p}: folder {part!r} holds several years {sorted(ys)}")
        if ys:
            return ys.pop()
    raise ValueError(f"{p}: no year (1990-2099) in the file name or its folders")


def discover_files(data_dir: Path | str) -> dict[int, list[Path]]:
    """Per-year customs files under a data directory, sorted by relative path.

    Root: ``source.yaml``'s ``customs_dir`` when present, else ``data_dir`` itself (then a
    ``companion`` folder is skipped too). Recursive; extensions .csv .txt .tsv .dta .parquet
    (any case); hidden files/folders and anything under ``_truth`` are ignored.
    """
    d = Path(data_dir)
    root = customs_root(d)
    if not root.is_dir():
        raise FileNotFoundError(f"customs folder {root} does not exist")
    skip = set(_IGNORED_DIRS)
    if not (d / "source.yaml").is_file():
        skip.add("companion")
    out: dict[int, list[Path]] = {}
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or any(part in skip for part in rel.parts[:-1]):
            continue
        if not p.is_file() or p.suffix.lower() not in CUSTOMS_EXTENSIONS:
            continue
        out.setdefault(year_of_path(p, root), []).append(p)
    return {y: sorted(v, key=lambda q: q.relative_to(root).as_posix()) for y, v in sorted(out.items())}


def read_year(data_dir: Path | str, year: int, contract: Contract | None = None) -> list[RawFrame]:
    """Every customs file of ``year`` read with :func:`read_customs_file` (empty list if none)."""
    return [read_customs_file(p, data_dir, contract=contract) for p in discover_files(data_dir).get(int(year), [])]


# --------------------------------------------------------------------------------------------------
# encoding and delimiter
# --------------------------------------------------------------------------------------------------
def _lead_bytes(b: bytes) -> int:
    """Number of UTF-8 lead bytes of multi-byte sequences (>= 0xC2) in ``b``."""
    return len(b) - len(b.translate(None, delete=bytes(range(0xC2, 0x100))))


def detect_encoding(path: Path | str) -> tuple[str, bool]:
    """(encoding, lossy) of a text file; see the module docstring for the order of attempts.

    ``lossy`` is True when undecodable bytes must be replaced by U+FFFD.
    """
    p = Path(path)
    with open(p, "rb") as f:
        head = f.read(4)
        if head.startswith(codecs.BOM_UTF8):
            enc = "utf-8-sig"
        elif head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            return "utf-16", False
        else:
            enc = "utf-8"
        f.seek(0)
        # 1) UTF-8: count replacement events vs valid multi-byte characters, stop early on junk
        dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        errors = 0
        valid = 0
        while True:
            chunk = f.read(CHUNK_BYTES)
            final = not chunk
            text = dec.decode(chunk, final=final)
            if chunk and chunk.isascii():
                if final:
                    break
                continue
            n_err = text.count("\ufffd")
            errors += n_err
            valid += max(_lead_bytes(chunk) - n_err, 0)
            if final:
                break
            if errors > 200 and valid < 20 * errors:
                break
    if errors == 0:
        return enc, False
    if valid >= 20 * errors:
        return enc, True
    # 2) GB18030 (superset of GBK/GB2312): strict, or lossy when only a few sequences are invalid
    dec = codecs.getincrementaldecoder("gb18030")(errors="replace")
    errors = 0
    valid = 0
    with open(p, "rb") as f:
        while True:
            chunk = f.read(CHUNK_BYTES)
            text = dec.decode(chunk, final=not chunk)
            n_err = text.count("\ufffd")
            errors += n_err
            valid += max(len(text) - len(text.encode("ascii", "ignore")) - n_err, 0) if n_err or not chunk.isascii() else 0
            if not chunk or (errors > 200 and valid < 20 * errors):
                break
    if errors == 0:
        return "gb18030", False
    if valid >= 20 * errors:
        return "gb18030", True
    # 3) charset-normalizer on a sample, decode lossily
    from charset_normalizer import from_bytes  # noqa: PLC0415

    with open(p, "rb") as f:
        sample = f.read(1 << 20)
    best = from_bytes(sample, cp_isolation=["utf_8", "gb18030", "big5"]).best()
    guess = (best.encoding if best is not None else "gb18030").replace("_", "-")
    return codecs.lookup(guess).name, True


def sniff_delimiter(sample_text: str) -> str:
    """Delimiter among , TAB | ; giving the most fields with a consistent count (first 50 records)."""
    best, best_score = ",", (-1, -1)
    lines = sample_text.splitlines(keepends=True)
    if len(lines) > 1 and not sample_text.endswith(("\n", "\r")):
        lines = lines[:-1]  # drop a possibly truncated last line
    text = "".join(lines[:200])
    for d in DELIMITERS:
        try:
            recs = [r for r in csv.reader(io.StringIO(text, newline=""), delimiter=d) if r]
        except csv.Error:
            continue
        recs = recs[:50]
        if not recs:
            continue
        n = len(recs[0])
        consistent = all(len(r) == n for r in recs)
        score = (int(consistent and n > 1), n)
        if score > best_score:
            best, best_score = d, score
    return best


def _transcode(src: Path, encoding: str, lossy: bool) -> Path:
    """Decode ``src`` in streaming chunks and write UTF-8 to a temporary file (caller deletes)."""
    fd, tmp = tempfile.mkstemp(prefix="kspill_raw_", suffix=".csv", dir=os.environ.get("KSPILL_TMP_DIR"))
    dec = codecs.getincrementaldecoder(encoding)(errors="replace" if lossy else "strict")
    try:
        with open(src, "rb") as fin, os.fdopen(fd, "wb") as fout:
            first = True
            while True:
                chunk = fin.read(CHUNK_BYTES)
                text = dec.decode(chunk, final=not chunk)
                if first and text.startswith("\ufeff"):
                    text = text[1:]
                first = first and not text
                fout.write(text.encode("utf-8"))
                if not chunk:
                    break
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def _text_sample(path: Path, encoding: str, n_bytes: int = 1 << 16) -> str:
    with open(path, "rb") as f:
        raw = f.read(n_bytes)
    return raw.decode(encoding, errors="replace").lstrip("\ufeff")


# --------------------------------------------------------------------------------------------------
# header mapping and output shaping
# --------------------------------------------------------------------------------------------------
def _customs_contract(contract: Contract | None) -> Contract:
    return contract if contract is not None else load_contract("customs_raw")


def _map_headers(
    headers: list[str], contract: Contract, path: Path, labels: dict[str, str] | None = None
) -> tuple[dict[str, str], list[str]]:
    """Map raw headers to canonical names -> ({raw: canonical}, ignored raw headers)."""
    mapping: dict[str, str] = {}
    ignored: list[str] = []
    by_canon: dict[str, list[str]] = {}
    for h in headers:
        canon = contract.resolve_header(h)
        if canon is None and labels and labels.get(h):
            canon = contract.resolve_header(labels[h])
        if canon is None:
            ignored.append(h)
            continue
        mapping[h] = canon
        by_canon.setdefault(canon, []).append(h)
    dup = {k: v for k, v in by_canon.items() if len(v) > 1}
    if dup:
        detail = "; ".join(f"{k} <- {v}" for k, v in dup.items())
        raise ValueError(f"{path}: several headers map to the same field ({detail}); rename or drop one")
    return mapping, ignored


def _check_required(mapping: dict[str, str], headers: list[str], contract: Contract, path: Path) -> None:
    have = set(mapping.values())
    required = [c.name for c in contract.columns if not c.nullable]
    missing = [c for c in required if c not in have]
    if missing:
        raise ValueError(
            f"{path}: missing required field(s) {missing}; headers found: {headers}. "
            "Add the header spelling to the aliases in data_contracts/customs_raw.yaml if it is a "
            "known synonym."
        )


def _finish(
    df: pl.DataFrame, mapping: dict[str, str], contract: Contract, source_file: str,
    year_from_name: int | None, path: Path,
) -> pl.DataFrame:
    """Rename mapped columns, add absent canonical ones, source_file/source_row, contract order.

    ``df`` must already hold a ``source_row`` Int64 column and only text columns.
    """
    ren = {raw: canon for raw, canon in mapping.items() if raw != canon}
    df = df.rename(ren) if ren else df
    exprs: list[pl.Expr] = []
    for c in contract.columns:
        if c.name in df.columns:
            exprs.append(pl.col(c.name).cast(pl.String))
        elif c.name == "year":
            if year_from_name is None:
                raise ValueError(f"{path}: no year column and no year in the file name")
            exprs.append(pl.lit(str(year_from_name), dtype=pl.String).alias("year"))
        else:
            exprs.append(pl.lit(None, dtype=pl.String).alias(c.name))
    exprs.append(pl.lit(source_file, dtype=pl.String).alias("source_file"))
    exprs.append(pl.col("source_row").cast(pl.Int64))
    return df.select(exprs)


def _rel(path: Path, data_dir: Path | str) -> str:
    try:
        return path.resolve().relative_to(Path(data_dir).resolve()).as_posix()
    except ValueError:
        return Path(os.path.relpath(path.resolve(), Path(data_dir).resolve())).as_posix()


def _safe_year(path: Path, data_dir: Path | str) -> int | None:
    try:
        return year_of_path(path, customs_root(data_dir))
    except ValueError:
        return None


# --------------------------------------------------------------------------------------------------
# number -> text
# --------------------------------------------------------------------------------------------------
def _to_text_expr(name: str, dtype: pl.DataType) -> pl.Expr:
    x = pl.col(name)
    if dtype == pl.String:
        return pl.when(x == "").then(pl.lit(None, pl.String)).otherwise(x)  # as CSV: empty -> null
    if dtype.is_integer():
        return x.cast(pl.String)
    if dtype.is_float():
        as_int = (
            x.is_finite() & (x == x.round(0)) & (x.abs() < 9.0e15)
        )
        return (
            pl.when(x.is_nan() | x.is_null()).then(pl.lit(None, pl.String))
            .when(as_int).then(x.cast(pl.Int64, strict=False).cast(pl.String))
            .otherwise(x.cast(pl.String))
        )
    if dtype == pl.Boolean:
        return x.cast(pl.String)
    if isinstance(dtype, (pl.Categorical, pl.Enum)):
        return x.cast(pl.String)
    if isinstance(dtype, (pl.Date, pl.Datetime, pl.Time, pl.Duration)):
        return x.cast(pl.String)
    if dtype == pl.Null:
        return x.cast(pl.String)
    if dtype == pl.Binary:
        return x.cast(pl.String, strict=False)
    return x.cast(pl.String, strict=False)


def _stringify(df: pl.DataFrame) -> pl.DataFrame:
    return df.select([_to_text_expr(c, dt).alias(c) for c, dt in df.schema.items()])


def _is_numeric_dtype(dt: pl.DataType) -> bool:
    return dt.is_numeric()


# --------------------------------------------------------------------------------------------------
# readers
# --------------------------------------------------------------------------------------------------
def _iter_csv_python(
    src: Path, delim: str, encoding: str, n_cols: int, path: Path, batch_rows: int = 200_000, skip: int = 0,
) -> Iterator[pl.DataFrame]:
    """CSV parse with the ``csv`` module in column batches of ``batch_rows`` records; the first
    ``skip`` records are parsed (and checked) but not returned. At least one (maybe empty) frame."""
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))
    names = [f"c{i}" for i in range(n_cols)]
    cols: list[list[str | None]] = [[] for _ in range(n_cols)]
    emitted = False

    def frame() -> pl.DataFrame:
        out = pl.DataFrame({n: pl.Series(v, dtype=pl.String) for n, v in zip(names, cols)})
        for v in cols:
            v.clear()
        return out

    with open(src, encoding=encoding, errors="replace", newline="") as f:
        reader = csv.reader(f, delimiter=delim)
        next(reader, None)
        for i, rec in enumerate(reader, start=1):
            if len(rec) > n_cols:
                raise ValueError(
                    f"{path}: record {i} has {len(rec)} fields but the header has {n_cols} "
                    f"(delimiter {delim!r}); quote fields that contain the delimiter"
                )
            if i <= skip:
                continue
            for j in range(n_cols):
                v = rec[j] if j < len(rec) else ""
                cols[j].append(v if v != "" else None)
            if len(cols[0]) >= batch_rows:
                emitted = True
                yield frame()
    if cols[0] or not emitted:
        yield frame()


def _read_csv_python(src: Path, delim: str, encoding: str, n_cols: int, path: Path) -> pl.DataFrame:
    """Fallback CSV parse with the ``csv`` module (streaming, 200k-record column batches)."""
    batches = list(_iter_csv_python(src, delim, encoding, n_cols, path))
    return pl.concat(batches, how="vertical") if len(batches) > 1 else batches[0]


def _dedupe_headers(headers: list[str], contract: Contract, path: Path) -> list[str]:
    """Empty headers -> ``__unnamed_<i>``; repeated unknown headers get ``.1``, ``.2`` suffixes;
    a repeated header that maps to a contract field is ambiguous -> ``ValueError``."""
    out: list[str] = []
    seen: dict[str, int] = {}
    for i, h in enumerate(headers):
        name = h if h.strip() else f"__unnamed_{i}"
        if name in seen:
            if contract.resolve_header(name) is not None:
                raise ValueError(f"{path}: header {name!r} appears more than once")
            seen[name] += 1
            name = f"{name}.{seen[name]}"
        seen.setdefault(name, 0)
        out.append(name)
    return out


def _polars_source(path: Path, enc: str, lossy: bool) -> tuple[Path, str, Path | None]:
    """What polars reads for a CSV of encoding ``enc``: the file itself (UTF-8, lossy if needed) or
    a UTF-8 transcoded temporary copy (GBK/GB18030...). Returns (source, polars encoding, temp)."""
    if enc in ("utf-8", "utf-8-sig"):
        return path, ("utf8-lossy" if lossy else "utf8"), None
    tmp = _transcode(path, enc, lossy)
    return tmp, "utf8", tmp


def _read_csv(path: Path, data_dir, contract: Contract) -> RawFrame:
    enc, lossy = detect_encoding(path)
    sample = _text_sample(path, enc)
    delim = sniff_delimiter(sample)
    first = next(csv.reader(io.StringIO(sample, newline=""), delimiter=delim), [])
    headers = _dedupe_headers(list(first), contract, path)
    mapping, ignored = _map_headers(headers, contract, path)
    _check_required(mapping, headers, contract, path)

    src, polars_enc, tmp = _polars_source(path, enc, lossy)
    warnings: list[str] = []
    try:
        try:
            df = pl.read_csv(
                src, has_header=True, separator=delim, quote_char='"', infer_schema=False,
                encoding=polars_enc, raise_if_empty=False,
            )
        except pl.exceptions.PolarsError as exc:
            if "more fields" in str(exc):
                raise ValueError(
                    f"{path}: a record has more fields than the header (delimiter {delim!r}); "
                    f"quote fields that contain the delimiter: {exc}"
                ) from None
            # polars rejects a lone '"' inside an unquoted field (odd quote count in a chunk);
            # the csv module treats it as a literal character (as count_rows does)
            df = _read_csv_python(src, delim, "utf-8", len(headers), path)
            warnings.append(f"parsed with the csv module after polars failed: {str(exc)[:200]}")
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    # polars names columns after the header; BOM already stripped by polars/transcoding
    if len(df.columns) != len(headers):
        raise ValueError(f"{path}: parsed {len(df.columns)} columns but the header has {len(headers)}")
    df.columns = headers
    df = df.with_row_index("source_row", offset=1)
    blank = pl.all_horizontal([pl.col(h).is_null() for h in headers]) if headers else pl.lit(False)
    n_before = df.height
    df = df.filter(~blank)
    n_blank = n_before - df.height
    year = _safe_year(path, data_dir)
    out = _finish(df.select(["source_row", *mapping.keys()]), mapping, contract, _rel(path, data_dir), year, path)
    encoding = enc + (" (lossy)" if lossy else "")
    return RawFrame(
        df=out, source_file=_rel(path, data_dir), encoding=encoding, format="csv", numeric_hs=False,
        ignored_columns=ignored, header_map=mapping, year_from_name=year, delimiter=delim,
        n_blank_rows=n_blank, warnings=warnings,
    )


def _redecode_legacy(df: pl.DataFrame) -> tuple[pl.DataFrame, bool]:
    """Stata < 118 text is read as latin-1 by pandas: re-decode non-ASCII text as GB18030."""
    changed = False
    cols = []
    for c, dt in df.schema.items():
        if dt != pl.String:
            cols.append(pl.col(c))
            continue
        s = df.get_column(c)
        if s.str.contains(r"[^\x00-\x7f]").any():
            def fix(v: str) -> str:
                try:
                    return v.encode("latin-1").decode("gb18030")
                except (UnicodeEncodeError, UnicodeDecodeError):
                    return v

            cols.append(pl.col(c).map_elements(fix, return_dtype=pl.String))
            changed = True
        else:
            cols.append(pl.col(c))
    return (df.select(cols) if changed else df), changed


def _read_dta(path: Path, data_dir, contract: Contract) -> RawFrame:
    import pandas as pd  # noqa: PLC0415

    warnings: list[str] = []
    with pd.read_stata(
        path, convert_categoricals=True, preserve_dtypes=True, convert_dates=True,
        chunksize=STATA_CHUNK_ROWS, order_categoricals=False,
    ) as reader:
        labels = reader.variable_labels()
        fmt_version = getattr(reader, "_format_version", 118)
        frames: list[pl.DataFrame] = []
        headers: list[str] | None = None
        mapping: dict[str, str] = {}
        ignored: list[str] = []
        numeric_hs = False
        offset = 1
        legacy_fixed = False
        for chunk in reader:
            if headers is None:
                headers = [str(c) for c in chunk.columns]
                mapping, ignored = _map_headers(headers, contract, path, labels=labels)
                _check_required(mapping, headers, contract, path)
            sub = chunk[list(mapping.keys())]
            pdf = pl.from_pandas(sub, include_index=False)
            hs_raw = next(k for k, v in mapping.items() if v == "hs_code")
            if _is_numeric_dtype(pdf.schema[hs_raw]):
                numeric_hs = True
                if pdf.schema[hs_raw] == pl.Float32:
                    warnings.append("hs_code stored as float32: codes above 16,777,216 may be rounded")
            pdf = _stringify(pdf)
            if fmt_version < 118:
                pdf, fixed = _redecode_legacy(pdf)
                legacy_fixed = legacy_fixed or fixed
            pdf = pdf.with_columns(pl.int_range(offset, offset + pdf.height, dtype=pl.Int64).alias("source_row"))
            offset += pdf.height
            frames.append(pdf)
        if headers is None:  # no rows: pandas yields no chunk
            empty = reader.read()
            headers = [str(c) for c in empty.columns]
            mapping, ignored = _map_headers(headers, contract, path, labels=labels)
            _check_required(mapping, headers, contract, path)
            frames.append(
                pl.DataFrame({k: pl.Series([], dtype=pl.String) for k in mapping})
                .with_columns(pl.lit(None, pl.Int64).alias("source_row")).head(0)
            )
    df = pl.concat(frames, how="vertical") if len(frames) > 1 else frames[0]
    year = _safe_year(path, data_dir)
    out = _finish(df, mapping, contract, _rel(path, data_dir), year, path)
    enc = f"stata-{fmt_version}" + (" (latin-1 re-decoded as gb18030)" if legacy_fixed else "")
    return RawFrame(
        df=out, source_file=_rel(path, data_dir), encoding=enc, format="dta", numeric_hs=numeric_hs,
        ignored_columns=ignored, header_map=mapping, year_from_name=year,
        warnings=sorted(set(warnings)),
    )


def _read_parquet(path: Path, data_dir, contract: Contract) -> RawFrame:
    schema = pl.read_parquet_schema(path)
    headers = list(schema.keys())
    mapping, ignored = _map_headers(headers, contract, path)
    _check_required(mapping, headers, contract, path)
    df = pl.read_parquet(path, columns=list(mapping.keys()))
    hs_raw = next(k for k, v in mapping.items() if v == "hs_code")
    numeric_hs = _is_numeric_dtype(df.schema[hs_raw])
    warnings = []
    if df.schema[hs_raw] == pl.Float32:
        warnings.append("hs_code stored as float32: codes above 16,777,216 may be rounded")
    df = _stringify(df).with_row_index("source_row", offset=1)
    df = df.with_columns(pl.col("source_row").cast(pl.Int64))
    year = _safe_year(path, data_dir)
    out = _finish(df, mapping, contract, _rel(path, data_dir), year, path)
    return RawFrame(
        df=out, source_file=_rel(path, data_dir), encoding=None, format="parquet", numeric_hs=numeric_hs,
        ignored_columns=ignored, header_map=mapping, year_from_name=year, warnings=warnings,
    )


# --------------------------------------------------------------------------------------------------
# batched readers (bounded memory): concatenating the batches gives read_customs_file's frame
# --------------------------------------------------------------------------------------------------
def _iter_csv(path: Path, data_dir, contract: Contract, batch_rows: int) -> Iterator[RawFrame]:
    enc, lossy = detect_encoding(path)
    sample = _text_sample(path, enc)
    delim = sniff_delimiter(sample)
    first = next(csv.reader(io.StringIO(sample, newline=""), delimiter=delim), [])
    headers = _dedupe_headers(list(first), contract, path)
    mapping, ignored = _map_headers(headers, contract, path)
    _check_required(mapping, headers, contract, path)
    year = _safe_year(path, data_dir)
    rel = _rel(path, data_dir)
    proto = RawFrame(
        df=pl.DataFrame(), source_file=rel, encoding=enc + (" (lossy)" if lossy else ""), format="csv",
        numeric_hs=False, ignored_columns=ignored, header_map=mapping, year_from_name=year, delimiter=delim,
    )
    blank = pl.all_horizontal([pl.col(h).is_null() for h in headers]) if headers else pl.lit(False)

    def shape(b: pl.DataFrame, offset: int, warnings: list[str]) -> RawFrame:
        if len(b.columns) != len(headers):
            raise ValueError(f"{path}: parsed {len(b.columns)} columns but the header has {len(headers)}")
        b.columns = headers
        b = b.with_columns(pl.int_range(offset, offset + b.height, dtype=pl.Int64).alias("source_row"))
        n_before = b.height
        b = b.filter(~blank)
        out = _finish(b.select(["source_row", *mapping.keys()]), mapping, contract, rel, year, path)
        return replace(proto, df=out, n_blank_rows=n_before - b.height, warnings=list(warnings))

    src, polars_enc, tmp = _polars_source(path, enc, lossy)
    done = 0  # records handed out so far (blank ones included)
    try:
        try:
            lf = pl.scan_csv(
                src, has_header=True, separator=delim, quote_char='"', infer_schema=False,
                encoding=polars_enc, raise_if_empty=False,
            )
            for b in lf.collect_batches(chunk_size=batch_rows):
                if b.height == 0:
                    continue
                rf = shape(b, done + 1, [])
                done += b.height
                yield rf
            if done == 0:
                yield shape(pl.DataFrame({h: pl.Series([], dtype=pl.String) for h in headers}), 1, [])
        except pl.exceptions.PolarsError as exc:
            if "more fields" in str(exc):
                raise ValueError(
                    f"{path}: a record has more fields than the header (delimiter {delim!r}); "
                    f"quote fields that contain the delimiter: {exc}"
                ) from None
            # as read_customs_file: the csv module takes over (from the first record not handed out)
            warn = [f"parsed with the csv module after polars failed: {str(exc)[:200]}"]
            first_batch = done == 0
            for b in _iter_csv_python(src, delim, "utf-8", len(headers), path, batch_rows=batch_rows, skip=done):
                if b.height == 0 and not first_batch:
                    continue
                rf = shape(b, done + 1, warn)
                done += b.height
                first_batch = False
                yield rf
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def _iter_dta(path: Path, data_dir, contract: Contract, batch_rows: int) -> Iterator[RawFrame]:
    import pandas as pd  # noqa: PLC0415

    year = _safe_year(path, data_dir)
    rel = _rel(path, data_dir)
    with pd.read_stata(
        path, convert_categoricals=True, preserve_dtypes=True, convert_dates=True,
        chunksize=batch_rows, order_categoricals=False,
    ) as reader:
        labels = reader.variable_labels()
        fmt_version = getattr(reader, "_format_version", 118)
        headers: list[str] | None = None
        mapping: dict[str, str] = {}
        ignored: list[str] = []
        offset = 1
        for chunk in reader:
            if headers is None:
                headers = [str(c) for c in chunk.columns]
                mapping, ignored = _map_headers(headers, contract, path, labels=labels)
                _check_required(mapping, headers, contract, path)
            warnings: list[str] = []
            pdf = pl.from_pandas(chunk[list(mapping.keys())], include_index=False)
            hs_raw = next(k for k, v in mapping.items() if v == "hs_code")
            numeric_hs = _is_numeric_dtype(pdf.schema[hs_raw])
            if numeric_hs and pdf.schema[hs_raw] == pl.Float32:
                warnings.append("hs_code stored as float32: codes above 16,777,216 may be rounded")
            pdf = _stringify(pdf)
            fixed = False
            if fmt_version < 118:
                pdf, fixed = _redecode_legacy(pdf)
            pdf = pdf.with_columns(pl.int_range(offset, offset + pdf.height, dtype=pl.Int64).alias("source_row"))
            offset += pdf.height
            enc = f"stata-{fmt_version}" + (" (latin-1 re-decoded as gb18030)" if fixed else "")
            yield RawFrame(
                df=_finish(pdf, mapping, contract, rel, year, path), source_file=rel, encoding=enc, format="dta",
                numeric_hs=numeric_hs, ignored_columns=ignored, header_map=mapping, year_from_name=year,
                warnings=warnings,
            )
    if headers is None:  # no rows: the one-shot reader handles the header-only case
        yield read_customs_file(path, data_dir, contract=contract)


def _iter_parquet(path: Path, data_dir, contract: Contract, batch_rows: int) -> Iterator[RawFrame]:
    import pyarrow.parquet as pq  # noqa: PLC0415

    schema = pl.read_parquet_schema(path)
    headers = list(schema.keys())
    mapping, ignored = _map_headers(headers, contract, path)
    _check_required(mapping, headers, contract, path)
    hs_raw = next(k for k, v in mapping.items() if v == "hs_code")
    year = _safe_year(path, data_dir)
    rel = _rel(path, data_dir)
    n = int(pq.ParquetFile(path).metadata.num_rows)
    for off in range(0, max(n, 1), batch_rows):
        df = pl.scan_parquet(path).select(list(mapping.keys())).slice(off, batch_rows).collect()
        numeric_hs = _is_numeric_dtype(df.schema[hs_raw])
        warnings = ["hs_code stored as float32: codes above 16,777,216 may be rounded"] if df.schema[hs_raw] == pl.Float32 else []
        df = _stringify(df).with_columns(pl.int_range(off + 1, off + 1 + pl.len(), dtype=pl.Int64).alias("source_row"))
        yield RawFrame(
            df=_finish(df, mapping, contract, rel, year, path), source_file=rel, encoding=None, format="parquet",
            numeric_hs=numeric_hs, ignored_columns=ignored, header_map=mapping, year_from_name=year,
            warnings=warnings,
        )


def iter_customs_file(
    path: Path | str, data_dir: Path | str, *, batch_rows: int | None = None, contract: Contract | None = None,
) -> Iterator[RawFrame]:
    """Read one customs file in batches of at most about ``batch_rows`` rows (default
    ``RAW_BATCH_ROWS``), each a :class:`RawFrame` with the file's metadata.

    Concatenating the batches' ``df`` gives exactly :func:`read_customs_file`'s frame (same rows,
    values and ``source_row`` numbering; blank CSV records dropped, ``n_blank_rows`` per batch). At
    least one batch (maybe empty) is yielded per file. Memory: one batch of text columns (plus, for
    non-UTF-8 CSV, the temporary UTF-8 copy on disk). Errors are raised as by
    :func:`read_customs_file`, a malformed record possibly only after the batches before it.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(p)
    n = int(batch_rows or RAW_BATCH_ROWS)
    if n < 1:
        raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
    c = _customs_contract(contract)
    ext = p.suffix.lower()
    if ext in {".csv", ".txt", ".tsv"}:
        yield from _iter_csv(p, data_dir, c, n)
    elif ext == ".dta":
        yield from _iter_dta(p, data_dir, c, n)
    elif ext == ".parquet":
        yield from _iter_parquet(p, data_dir, c, n)
    else:
        raise ValueError(f"{p}: unsupported extension {p.suffix!r} (expected one of {sorted(CUSTOMS_EXTENSIONS)})")


def read_customs_file(path: Path | str, data_dir: Path | str, *, contract: Contract | None = None) -> RawFrame:
    """Read one customs file into a :class:`RawFrame` (see the module docstring)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(p)
    c = _customs_contract(contract)
    ext = p.suffix.lower()
    if ext in {".csv", ".txt", ".tsv"}:
        return _read_csv(p, data_dir, c)
    if ext == ".dta":
        return _read_dta(p, data_dir, c)
    if ext == ".parquet":
        return _read_parquet(p, data_dir, c)
    raise ValueError(f"{p}: unsupported extension {p.suffix!r} (expected one of {sorted(CUSTOMS_EXTENSIONS)})")


# --------------------------------------------------------------------------------------------------
# independent row count
# --------------------------------------------------------------------------------------------------
def count_rows(path: Path | str) -> int:
    """Data records of a customs file, counted without the full parse (for the accounting check).

    parquet: footer metadata; .dta: the header's observation count; CSV: a ``csv``-module pass
    (quoted newlines respected) over the bytes read as latin-1 (newline, quote and delimiter bytes
    are ASCII and never occur inside GB18030/UTF-8 multi-byte characters), header and blank
    records excluded. UTF-16 files are decoded properly.
    """
    p = Path(path)
    ext = p.suffix.lower()
    if ext == ".parquet":
        import pyarrow.parquet as pq  # noqa: PLC0415

        return int(pq.ParquetFile(p).metadata.num_rows)
    if ext == ".dta":
        import pandas as pd  # noqa: PLC0415

        with pd.read_stata(p, iterator=True) as reader:
            reader._ensure_open()  # noqa: SLF001 - pandas exposes nobs only privately
            n = getattr(reader, "_nobs", None)
            if n is not None:
                return int(n)
            return sum(len(ch) for ch in pd.read_stata(p, chunksize=STATA_CHUNK_ROWS))
    if ext not in {".csv", ".txt", ".tsv"}:
        raise ValueError(f"{p}: unsupported extension {p.suffix!r}")
    with open(p, "rb") as f:
        head = f.read(4)
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        enc = "utf-16"
    else:
        enc = "latin-1"
    sample = _text_sample(p, "utf-8" if enc == "latin-1" else enc)
    delim = sniff_delimiter(sample)
    n = 0
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))
    with open(p, encoding=enc, newline="") as f:
        reader = csv.reader(f, delimiter=delim)
        header = next(reader, None)
        if header is None:
            return 0
        for rec in reader:
            if any(rec):
                n += 1
    return n
