"""Data contracts: load ``data_contracts/<dataset>.yaml`` into typed objects.

Pure module (no Dagster import). The YAML files are the single source of truth for every dataset;
this module turns them into a pyarrow schema (written with every parquet file), a polars schema, a
strict ``conform`` step, and the header alias map used by the raw readers.

Contract format (validated strictly; any problem raises ``ValueError`` naming the file and key)::

    name: <dataset>               # must equal the file stem
    kind: raw | asset | reference
    group: <str>                  # optional
    description: <str>
    partitioned_by: year | null   # must be a column when set
    grain: [col, ...]             # primary key; every entry must be a column
    columns:
      - name: <str>               # required
        type: int8|int16|int32|int64|float32|float64|string|bool|date|list[<type>]   # required
        nullable: true|false      # required
        unit: <str>               # optional
        description: <str>        # optional
        allowed: [v, ...]         # optional, scalar non-bool columns
        range: {min, max, min_exclusive, max_exclusive}   # optional, numeric columns
        pattern: <regex>          # optional, string columns (Python re and Rust regex must compile)
        foreign_key: {table, column}                      # optional
        aliases: [<header>, ...]  # optional; raw contracts map file headers to the column

Shared layouts: a contract may say ``extends: <other>`` instead of repeating ``columns`` (and
``grain``, ``partitioned_by``, ``kind``, ``group``): it takes them from ``<other>.yaml`` (a contract
of ``kind: template`` when no dataset of that name exists) and gives its own ``name`` and
``description``. Used for the regression tables of a study, which share one tidy layout.

Contract folder: ``$KSPILL_CONTRACTS_DIR``, else ``<repo>/data_contracts`` (development checkout),
else ``kspill_pipeline/_data_contracts`` (installed wheel; pyproject force-includes it).
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import yaml

__all__ = [
    "Column",
    "Contract",
    "ForeignKey",
    "Range",
    "all_contracts",
    "contracts_dir",
    "load_contract",
    "load_contract_file",
    "normalise_header",
    "parse_type",
]

_PKG_DIR = Path(__file__).resolve().parent.parent  # kspill_pipeline/

_SCALAR_POLARS: dict[str, pl.DataType] = {
    "int8": pl.Int8(),
    "int16": pl.Int16(),
    "int32": pl.Int32(),
    "int64": pl.Int64(),
    "float32": pl.Float32(),
    "float64": pl.Float64(),
    "string": pl.String(),
    "bool": pl.Boolean(),
    "date": pl.Date(),
}
_SCALAR_ARROW: dict[str, pa.DataType] = {
    "int8": pa.int8(),
    "int16": pa.int16(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "float32": pa.float32(),
    "float64": pa.float64(),
    "string": pa.string(),
    "bool": pa.bool_(),
    "date": pa.date32(),
}
_INT_TYPES = {"int8", "int16", "int32", "int64"}
_FLOAT_TYPES = {"float32", "float64"}
_LIST_RE = re.compile(r"^list\[(.+)\]$")

_TOP_KEYS = {"name", "kind", "group", "description", "partitioned_by", "grain", "columns", "extends"}
_TOP_REQUIRED = {"name", "kind", "description", "grain", "columns"}
_INHERITED = ("kind", "group", "partitioned_by", "grain", "columns")
_COL_KEYS = {
    "name", "type", "nullable", "unit", "description", "allowed", "range", "pattern", "foreign_key", "aliases",
}
_COL_REQUIRED = {"name", "type", "nullable"}
_RANGE_KEYS = {"min", "max", "min_exclusive", "max_exclusive"}
_FK_KEYS = {"table", "column"}
_KINDS = {"raw", "asset", "reference", "template"}
_PARTITION_KEYS = {"year"}


# --------------------------------------------------------------------------------------------------
# types
# --------------------------------------------------------------------------------------------------
def parse_type(type_str: str) -> tuple[pl.DataType, pa.DataType]:
    """Contract type string -> (polars dtype, pyarrow type). ``list[T]`` nests any known type."""
    if not isinstance(type_str, str):
        raise ValueError(f"type must be a string, got {type_str!r}")
    t = type_str.strip()
    if t in _SCALAR_POLARS:
        return _SCALAR_POLARS[t], _SCALAR_ARROW[t]
    m = _LIST_RE.match(t)
    if m:
        inner_pl, inner_pa = parse_type(m.group(1))
        return pl.List(inner_pl), pa.list_(inner_pa)
    raise ValueError(
        f"unknown type {type_str!r} (allowed: {sorted(_SCALAR_POLARS)} or list[<type>])"
    )


def normalise_header(header: str) -> str:
    """Normalise a file header for alias matching.

    Strip, remove BOMs/zero-width characters, NFKC (full-width ``（）`` -> ``()``, full-width
    letters and digits -> ASCII), lower-case ASCII letters only, collapse whitespace to one space.
    """
    s = str(header).replace("\ufeff", "").replace("\u200b", "")
    s = unicodedata.normalize("NFKC", s)
    s = "".join(ch.lower() if "A" <= ch <= "Z" else ch for ch in s)
    s = " ".join(s.split())
    return s


def _loose_header(h: str) -> str:
    """Second-chance key: spaces, hyphens and dots become underscores ("Firm ID" -> "firm_id")."""
    return re.sub(r"[ \-.]+", "_", h).strip("_")


# --------------------------------------------------------------------------------------------------
# dataclasses
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Range:
    min: float | None = None
    max: float | None = None
    min_exclusive: bool = False
    max_exclusive: bool = False

    def describe(self) -> str:
        lo = "" if self.min is None else f"{self.min} {'<' if self.min_exclusive else '<='} "
        hi = "" if self.max is None else f" {'<' if self.max_exclusive else '<='} {self.max}"
        return f"{lo}x{hi}"


@dataclass(frozen=True)
class ForeignKey:
    table: str
    column: str


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    nullable: bool
    unit: str | None = None
    description: str | None = None
    allowed: tuple[Any, ...] | None = None
    range: Range | None = None
    pattern: str | None = None
    foreign_key: ForeignKey | None = None
    aliases: tuple[str, ...] = ()

    @property
    def polars_dtype(self) -> pl.DataType:
        return parse_type(self.type)[0]

    @property
    def arrow_type(self) -> pa.DataType:
        return parse_type(self.type)[1]

    @property
    def is_list(self) -> bool:
        return self.type.startswith("list[")

    @property
    def is_numeric(self) -> bool:
        return self.type in _INT_TYPES or self.type in _FLOAT_TYPES

    @property
    def is_string(self) -> bool:
        return self.type == "string"

    @property
    def is_sensitive(self) -> bool:
        """Columns whose values never appear in check/GE samples (firm ids, names, name hashes)."""
        return is_sensitive_column(self.name)


def is_sensitive_column(name: str) -> bool:
    """firm_id, firm_name_hash and any column whose name contains ``name``."""
    n = name.lower()
    return n in {"firm_id", "firm_name_hash"} or "name" in n


@dataclass(frozen=True)
class Contract:
    name: str
    kind: str
    description: str
    grain: tuple[str, ...]
    columns: tuple[Column, ...]
    group: str | None = None
    partitioned_by: str | None = None
    path: Path | None = field(default=None, compare=False)

    # ---- lookup -----------------------------------------------------------------------------------
    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    def column(self, name: str) -> Column:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(f"{self.name}: no column {name!r}")

    def __contains__(self, name: object) -> bool:
        return any(c.name == name for c in self.columns)

    # ---- schemas ----------------------------------------------------------------------------------
    def polars_schema(self) -> pl.Schema:
        return pl.Schema([(c.name, c.polars_dtype) for c in self.columns])

    def arrow_schema(self) -> pa.Schema:
        fields = []
        for c in self.columns:
            md: dict[bytes, bytes] = {}
            if c.description:
                md[b"description"] = c.description.strip().encode("utf-8")
            if c.unit:
                md[b"unit"] = c.unit.encode("utf-8")
            fields.append(pa.field(c.name, c.arrow_type, nullable=c.nullable, metadata=md or None))
        meta = {
            b"kspill.contract": self.name.encode(),
            b"description": " ".join(self.description.split()).encode("utf-8"),
            b"kspill.grain": json.dumps(list(self.grain)).encode(),
            b"kspill.kind": self.kind.encode(),
        }
        return pa.schema(fields, metadata=meta)

    # ---- conform / arrow --------------------------------------------------------------------------
    def conform(self, df: pl.DataFrame) -> pl.DataFrame:
        """Select the contract columns in contract order and cast them to the contract dtypes.

        Strict: missing or extra columns raise ``ValueError`` (data columns are never dropped
        silently), and so does any cast that would turn a non-null value into null or change a
        value (float -> int with a fractional part, overflow, unparseable strings).
        """
        if isinstance(df, pl.LazyFrame):
            raise TypeError(f"{self.name}: conform() takes an eager DataFrame; collect() first")
        names = self.column_names
        missing = [c for c in names if c not in df.columns]
        extra = [c for c in df.columns if c not in names]
        if missing or extra:
            raise ValueError(
                f"{self.name}: frame does not match the contract columns; "
                f"missing={missing} extra={extra}"
            )
        failures: list[str] = []
        exprs = []
        for c in self.columns:
            target = c.polars_dtype
            src = df.schema[c.name]
            if src == target:
                exprs.append(pl.col(c.name))
                continue
            try:
                casted = df.get_column(c.name).cast(target, strict=False)
            except Exception as exc:  # noqa: BLE001 - polars raises several types
                failures.append(f"{c.name}: cannot cast {src} -> {target} ({exc})")
                continue
            orig = df.get_column(c.name)
            bad = int((orig.is_not_null() & casted.is_null()).sum())
            if src.is_float() and target.is_integer():
                bad += int((orig.is_not_null() & orig.is_not_nan() & (orig != orig.floor())).fill_null(False).sum())
            if bad:
                sample = orig.filter(orig.is_not_null() & casted.is_null()).head(3).to_list()
                shown = "" if c.is_sensitive else f" e.g. {sample}"
                failures.append(f"{c.name}: {bad} value(s) fail {src} -> {target}{shown}")
                continue
            exprs.append(pl.col(c.name).cast(target, strict=False))
        if failures:
            raise ValueError(f"{self.name}: cast to contract dtypes failed: " + "; ".join(failures))
        return df.select(exprs)

    def null_violations(self, df: pl.DataFrame) -> dict[str, int]:
        """Null counts of the non-nullable columns that contain nulls."""
        cols = [c.name for c in self.columns if not c.nullable and c.name in df.columns]
        if not cols:
            return {}
        counts = df.select(pl.col(cols).null_count()).row(0, named=True)
        return {k: int(v) for k, v in counts.items() if v}

    def to_arrow(self, df: pl.DataFrame) -> pa.Table:
        """Conform, enforce nullability, and return a pyarrow Table with :meth:`arrow_schema`."""
        out = self.conform(df)
        bad = self.null_violations(out)
        if bad:
            detail = ", ".join(f"{k} ({v} nulls)" for k, v in bad.items())
            raise ValueError(f"{self.name}: nulls in non-nullable column(s): {detail}")
        table = out.to_arrow()
        schema = self.arrow_schema()
        # polars 2 emits string_view / large_list; cast column by column to the contract types
        arrays = [table.column(f.name).cast(f.type) for f in schema]
        return pa.Table.from_arrays(arrays, schema=schema)

    # ---- raw headers ------------------------------------------------------------------------------
    def alias_map(self) -> dict[str, str]:
        """Normalised header -> canonical column name (column names count as their own alias)."""
        out: dict[str, str] = {}
        for c in self.columns:
            for a in (c.name, *c.aliases):
                out[normalise_header(a)] = c.name
        return out

    @cached_property
    def _alias_cache(self) -> dict[str, str]:
        return self.alias_map()

    def resolve_header(self, header: str) -> str | None:
        """Canonical column of a file header, or ``None`` when the header is unknown."""
        amap = self._alias_cache
        key = normalise_header(header)
        if key in amap:
            return amap[key]
        loose = _loose_header(key)
        for k, v in amap.items():
            if _loose_header(k) == loose:
                return v
        return None


# --------------------------------------------------------------------------------------------------
# loading and validation
# --------------------------------------------------------------------------------------------------
def contracts_dir() -> Path:
    """Folder of the contract YAML files (see module docstring for the search order)."""
    env = os.environ.get("KSPILL_CONTRACTS_DIR")
    if env:
        p = Path(env).expanduser().resolve()
        if not p.is_dir():
            raise FileNotFoundError(f"KSPILL_CONTRACTS_DIR={env} is not a directory")
        return p
    for p in (_PKG_DIR.parent / "data_contracts", _PKG_DIR / "_data_contracts"):
        if p.is_dir():
            return p
    raise FileNotFoundError(
        f"no data_contracts folder found (looked at {_PKG_DIR.parent / 'data_contracts'} and "
        f"{_PKG_DIR / '_data_contracts'}); set KSPILL_CONTRACTS_DIR"
    )


def _err(path: Path | str, key: str, msg: str) -> ValueError:
    return ValueError(f"{path}: {key}: {msg}")


def _check_keys(path: Path, where: str, d: Any, allowed: set[str], required: set[str]) -> None:
    if not isinstance(d, dict):
        raise _err(path, where, f"expected a mapping, got {type(d).__name__}")
    unknown = sorted(set(d) - allowed, key=str)
    if unknown:
        hint = ""
        if any(d[k] is None and isinstance(k, str) and " " in k for k in unknown):
            hint = (
                "; this looks like text cut at an unquoted ', ' inside a {flow: mapping} "
                "(quote the description)"
            )
        raise _err(path, where, f"unknown key(s) {unknown} (allowed: {sorted(allowed)}){hint}")
    missing = sorted(required - set(d))
    if missing:
        raise _err(path, where, f"missing required key(s) {missing}")


def _opt_str(path: Path, key: str, v: Any) -> str | None:
    if v is None:
        return None
    if not isinstance(v, str):
        raise _err(path, key, f"expected a string, got {v!r}")
    return v


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _parse_column(path: Path, i: int, raw: Any) -> Column:
    where = f"columns[{i}]"
    _check_keys(path, where, raw, _COL_KEYS, _COL_REQUIRED)
    name = raw["name"]
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise _err(path, f"{where}.name", f"invalid column name {name!r}")
    where = f"columns.{name}"
    ctype = raw["type"]
    try:
        parse_type(ctype)
    except ValueError as exc:
        raise _err(path, f"{where}.type", str(exc)) from None
    ctype = ctype.strip()
    nullable = raw["nullable"]
    if not isinstance(nullable, bool):
        raise _err(path, f"{where}.nullable", f"expected true/false, got {nullable!r}")
    is_list = ctype.startswith("list[")
    numeric = ctype in _INT_TYPES or ctype in _FLOAT_TYPES

    allowed = raw.get("allowed")
    if allowed is not None:
        if not isinstance(allowed, list) or not allowed:
            raise _err(path, f"{where}.allowed", "expected a non-empty list")
        if is_list or ctype in {"bool", "date"}:
            raise _err(path, f"{where}.allowed", f"not supported for type {ctype}")
        for v in allowed:
            ok = (
                isinstance(v, str) if ctype == "string"
                else (isinstance(v, int) and not isinstance(v, bool)) if ctype in _INT_TYPES
                else _is_number(v)
            )
            if not ok:
                raise _err(path, f"{where}.allowed", f"value {v!r} does not match type {ctype}")
        if len(set(allowed)) != len(allowed):
            raise _err(path, f"{where}.allowed", "duplicate values")
        allowed = tuple(allowed)

    rng = raw.get("range")
    if rng is not None:
        _check_keys(path, f"{where}.range", rng, _RANGE_KEYS, set())
        if not numeric:
            raise _err(path, f"{where}.range", f"only numeric columns take a range (type {ctype})")
        for k in ("min", "max"):
            if k in rng and rng[k] is not None and not _is_number(rng[k]):
                raise _err(path, f"{where}.range.{k}", f"expected a number, got {rng[k]!r}")
        for k in ("min_exclusive", "max_exclusive"):
            if k in rng and not isinstance(rng[k], bool):
                raise _err(path, f"{where}.range.{k}", f"expected true/false, got {rng[k]!r}")
        if rng.get("min") is None and rng.get("max") is None:
            raise _err(path, f"{where}.range", "needs min and/or max")
        if rng.get("min") is not None and rng.get("max") is not None and rng["min"] > rng["max"]:
            raise _err(path, f"{where}.range", "min > max")
        rng = Range(
            min=rng.get("min"), max=rng.get("max"),
            min_exclusive=bool(rng.get("min_exclusive", False)),
            max_exclusive=bool(rng.get("max_exclusive", False)),
        )

    pattern = raw.get("pattern")
    if pattern is not None:
        if not isinstance(pattern, str):
            raise _err(path, f"{where}.pattern", "expected a string")
        if ctype != "string":
            raise _err(path, f"{where}.pattern", f"only string columns take a pattern (type {ctype})")
        try:
            re.compile(pattern)
            pl.Series([""], dtype=pl.String).str.contains(pattern)
        except Exception as exc:  # noqa: BLE001
            raise _err(path, f"{where}.pattern", f"invalid regex {pattern!r}: {exc}") from None

    fk = raw.get("foreign_key")
    if fk is not None:
        _check_keys(path, f"{where}.foreign_key", fk, _FK_KEYS, _FK_KEYS)
        if not all(isinstance(fk[k], str) and fk[k] for k in _FK_KEYS):
            raise _err(path, f"{where}.foreign_key", "table and column must be non-empty strings")
        fk = ForeignKey(table=fk["table"], column=fk["column"])

    aliases = raw.get("aliases") or []
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a.strip() for a in aliases):
        raise _err(path, f"{where}.aliases", "expected a list of non-empty strings")

    return Column(
        name=name,
        type=ctype,
        nullable=nullable,
        unit=_opt_str(path, f"{where}.unit", raw.get("unit")),
        description=_opt_str(path, f"{where}.description", raw.get("description")),
        allowed=allowed,
        range=rng,
        pattern=pattern,
        foreign_key=fk,
        aliases=tuple(aliases),
    )


def parse_contract(raw: Any, path: Path | str = "<contract>") -> Contract:
    """Validate a parsed YAML mapping and build a :class:`Contract`."""
    path = Path(path)
    _check_keys(path, "<top>", raw, _TOP_KEYS, _TOP_REQUIRED)
    name = raw["name"]
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise _err(path, "name", f"invalid dataset name {name!r}")
    if path.suffix in {".yaml", ".yml"} and path.stem != name:
        raise _err(path, "name", f"{name!r} does not match the file name {path.stem!r}")
    kind = raw["kind"]
    if kind not in _KINDS:
        raise _err(path, "kind", f"{kind!r} not in {sorted(_KINDS)}")
    description = raw["description"]
    if not isinstance(description, str) or not description.strip():
        raise _err(path, "description", "expected a non-empty string")
    group = _opt_str(path, "group", raw.get("group"))
    cols_raw = raw["columns"]
    if not isinstance(cols_raw, list) or not cols_raw:
        raise _err(path, "columns", "expected a non-empty list")
    columns = tuple(_parse_column(path, i, c) for i, c in enumerate(cols_raw))

    seen: set[str] = set()
    for c in columns:
        if c.name in seen:
            raise _err(path, f"columns.{c.name}", "duplicate column name")
        seen.add(c.name)
    # aliases: a normalised header may point at one column only
    owner: dict[str, str] = {}
    for c in columns:
        owner[normalise_header(c.name)] = c.name
    for c in columns:
        local: set[str] = set()
        for a in c.aliases:
            key = normalise_header(a)
            if key in local:
                raise _err(path, f"columns.{c.name}.aliases", f"duplicate alias {a!r}")
            local.add(key)
            if owner.get(key, c.name) != c.name:
                raise _err(
                    path, f"columns.{c.name}.aliases",
                    f"alias {a!r} already names or aliases column {owner[key]!r}",
                )
            owner[key] = c.name

    grain = raw["grain"]
    if not isinstance(grain, list) or not all(isinstance(g, str) for g in grain):
        raise _err(path, "grain", "expected a list of column names")
    missing = [g for g in grain if g not in seen]
    if missing:
        raise _err(path, "grain", f"column(s) {missing} not in columns")
    if len(set(grain)) != len(grain):
        raise _err(path, "grain", "duplicate column")
    for g in grain:
        if next(c for c in columns if c.name == g).is_list:
            raise _err(path, "grain", f"list column {g!r} cannot be part of the grain")

    part = raw.get("partitioned_by")
    if part is not None:
        if part not in _PARTITION_KEYS:
            raise _err(path, "partitioned_by", f"{part!r} not in {sorted(_PARTITION_KEYS)} or null")
        if part not in seen:
            raise _err(path, "partitioned_by", f"column {part!r} not in columns")

    return Contract(
        name=name, kind=kind, description=description, grain=tuple(grain), columns=columns,
        group=group, partitioned_by=part, path=path,
    )


def load_contract_file(path: Path | str) -> Contract:
    """Load and validate one contract YAML file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: invalid YAML: {exc}") from None
    if isinstance(raw, dict) and "extends" in raw:
        base_name = raw["extends"]
        base_path = path.parent / f"{base_name}.yaml"
        if not isinstance(base_name, str) or not base_path.is_file():
            raise _err(path, "extends", f"no contract {base_name!r} to extend in {path.parent}")
        base = yaml.safe_load(base_path.read_text(encoding="utf-8")) or {}
        if "extends" in base:
            raise _err(path, "extends", f"{base_name!r} itself extends another contract (one level only)")
        raw = {**{k: base[k] for k in _INHERITED if k in base}, **{k: v for k, v in raw.items() if k != "extends"}}
        if raw.get("kind") == "template":
            raw["kind"] = "asset"
    return parse_contract(raw, path)


@lru_cache(maxsize=None)
def _load_cached(directory: str, name: str, mtime: float) -> Contract:
    return load_contract_file(Path(directory) / f"{name}.yaml")


def load_contract(name: str) -> Contract:
    """Contract of dataset ``name`` (``<contracts_dir>/<name>.yaml``), cached per file version."""
    d = contracts_dir()
    p = d / f"{name}.yaml"
    if not p.is_file():
        known = sorted(q.stem for q in d.glob("*.yaml"))
        raise KeyError(f"no contract {name!r} in {d} (known: {known})")
    return _load_cached(str(d), name, p.stat().st_mtime)


def all_contracts() -> dict[str, Contract]:
    """Every contract in the folder, by name (sorted)."""
    d = contracts_dir()
    return {p.stem: load_contract(p.stem) for p in sorted(d.glob("*.yaml"))}
