"""Polars-native data checks generated from a contract (pure: no Dagster, no great_expectations).

One :class:`CheckOutcome` per rule family, in a fixed order, so the Dagster layer can declare one
``AssetCheckSpec`` per entry of :func:`check_names` and map each outcome to one check result:

=================  =============================================================================
``schema``         column names, order and dtypes equal the contract's polars schema
``not_null``       no nulls in non-nullable columns                      (if any non-nullable)
``unique_grain``   the grain is a primary key (null-safe: null == null)  (if the grain is set)
``allowed_values`` non-null values of ``allowed`` columns are in the set (if any ``allowed``)
``ranges``         non-null numeric values respect ``range`` (and exclusivity)  (if any ``range``)
``patterns``       non-null strings match ``pattern`` (regex search)     (if any ``pattern``)
``foreign_keys``   non-null values exist in the referenced table column  (if any ``foreign_key``)
=================  =============================================================================

Privacy of samples: metadata carries at most 5 sample rows per failing rule, made of the grain
columns **minus** sensitive columns (``firm_id``, ``firm_name_hash`` and any column whose name
contains ``name``; see :func:`kspill_pipeline.contracts.loader.is_sensitive_column`), plus the
offending value itself when the checked column is not sensitive. Firm names and ids never appear.

Efficiency: every family is one lazy query; counts of ``not_null``/``allowed_values``/``ranges``/
``patterns`` are one aggregation each and samples are only queried for failing columns. Grain
uniqueness first groups a 64-bit hash of the grain (streaming engine); only rows whose hash
repeats are grouped again on the exact key columns, so hash collisions cannot produce false
failures and a clean 50M-row table costs one hash group-by.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from kspill_pipeline.contracts.loader import Column, Contract, is_sensitive_column

__all__ = [
    "CheckOutcome",
    "SAMPLE_SIZE",
    "check_names",
    "check_row_accounting",
    "run_contract_checks",
    "sample_columns",
]

SAMPLE_SIZE = 5
_ORDER = ("schema", "not_null", "unique_grain", "allowed_values", "ranges", "patterns", "foreign_keys")


@dataclass
class CheckOutcome:
    name: str
    passed: bool
    description: str
    metadata: dict[str, Any] = field(default_factory=dict)
    severity: str = "ERROR"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "passed": self.passed, "severity": self.severity,
            "description": self.description, "metadata": self.metadata,
        }


# --------------------------------------------------------------------------------------------------
# what a contract generates
# --------------------------------------------------------------------------------------------------
def _describe(contract: Contract) -> dict[str, str]:
    cols = contract.columns
    out: dict[str, str] = {
        "schema": f"{contract.name}: columns, order and dtypes match the contract ({len(cols)} columns)",
    }
    nn = [c.name for c in cols if not c.nullable]
    if nn:
        out["not_null"] = f"{contract.name}: no nulls in {len(nn)} non-nullable column(s): {', '.join(nn)}"
    if contract.grain:
        out["unique_grain"] = f"{contract.name}: one row per ({', '.join(contract.grain)})"
    al = [c.name for c in cols if c.allowed is not None]
    if al:
        out["allowed_values"] = f"{contract.name}: values in the allowed sets of {', '.join(al)}"
    rg = [f"{c.name}: {c.range.describe()}" for c in cols if c.range is not None]
    if rg:
        out["ranges"] = f"{contract.name}: ranges " + "; ".join(rg)
    pt = [f"{c.name} ~ {c.pattern}" for c in cols if c.pattern is not None]
    if pt:
        out["patterns"] = f"{contract.name}: patterns " + "; ".join(pt)
    fk = [f"{c.name} -> {c.foreign_key.table}.{c.foreign_key.column}" for c in cols if c.foreign_key]
    if fk:
        out["foreign_keys"] = f"{contract.name}: foreign keys " + "; ".join(fk)
    return {k: out[k] for k in _ORDER if k in out}


def check_names(contract: Contract) -> list[tuple[str, str]]:
    """(name, description) of every check :func:`run_contract_checks` returns, in that order."""
    return list(_describe(contract).items())


def sample_columns(contract: Contract) -> list[str]:
    """Grain columns allowed in samples (sensitive columns removed)."""
    return [g for g in contract.grain if not is_sensitive_column(g)]


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def _jsonable(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    return str(v)


def _samples(lf: pl.LazyFrame, cond: pl.Expr, cols: list[str]) -> list[dict[str, Any]]:
    if not cols:
        return []
    rows = lf.filter(cond).select(cols).head(SAMPLE_SIZE).collect().rows(named=True)
    return [{k: _jsonable(v) for k, v in r.items()} for r in rows]


def _present(contract: Contract, schema: pl.Schema, pred) -> tuple[list[Column], list[str]]:
    """Contract columns satisfying ``pred`` split into (present in frame, missing from frame)."""
    cols = [c for c in contract.columns if pred(c)]
    return [c for c in cols if c.name in schema], [c.name for c in cols if c.name not in schema]


def _sample_cols_for(contract: Contract, col: Column, schema: pl.Schema) -> list[str]:
    cols = [g for g in sample_columns(contract) if g in schema]
    if not col.is_sensitive and col.name not in cols:
        cols.append(col.name)
    return cols


def _range_violation(c: Column, dtype: pl.DataType) -> pl.Expr:
    x = pl.col(c.name)
    r = c.range
    bad = pl.lit(False)
    if dtype.is_float():
        bad = bad | x.is_nan()
    if r.min is not None:
        bad = bad | ((x <= r.min) if r.min_exclusive else (x < r.min))
    if r.max is not None:
        bad = bad | ((x >= r.max) if r.max_exclusive else (x > r.max))
    return x.is_not_null() & bad


def _rule_family(
    name: str,
    description: str,
    contract: Contract,
    lf: pl.LazyFrame,
    schema: pl.Schema,
    cols: list[Column],
    missing: list[str],
    violation,  # Callable[[Column, dtype], pl.Expr | str] -> expr, or a string error message
) -> CheckOutcome:
    exprs: dict[str, pl.Expr] = {}
    errors: dict[str, str] = {}
    for c in cols:
        v = violation(c, schema[c.name])
        if isinstance(v, str):
            errors[c.name] = v
        else:
            exprs[c.name] = v
    counts: dict[str, int] = {}
    if exprs:
        row = lf.select([e.sum().alias(k) for k, e in exprs.items()]).collect().row(0, named=True)
        counts = {k: int(v or 0) for k, v in row.items()}
    failing = {k: v for k, v in counts.items() if v}
    samples = {k: _samples(lf, exprs[k], _sample_cols_for(contract, contract.column(k), schema)) for k in failing}
    passed = not failing and not errors and not missing
    md: dict[str, Any] = {
        "failing_rows": int(sum(failing.values())),
        "failing_columns": sorted(set(failing) | set(errors) | set(missing)),
        "counts": counts,
        "checked_columns": [c.name for c in cols],
    }
    if missing:
        md["missing_columns"] = missing
    if errors:
        md["errors"] = errors
    if samples:
        md["samples"] = samples
    return CheckOutcome(name=name, passed=passed, description=description, metadata=md)


# --------------------------------------------------------------------------------------------------
# families
# --------------------------------------------------------------------------------------------------
def _check_schema(contract: Contract, schema: pl.Schema, desc: str) -> CheckOutcome:
    want = contract.polars_schema()
    missing = [c for c in want if c not in schema]
    extra = [c for c in schema if c not in want]
    dtype_mismatch = {
        c: {"expected": str(want[c]), "found": str(schema[c])}
        for c in want if c in schema and schema[c] != want[c]
    }
    common_frame = [c for c in schema if c in want]
    common_contract = [c for c in want if c in schema]
    order_ok = common_frame == common_contract
    passed = not missing and not extra and not dtype_mismatch and order_ok
    md: dict[str, Any] = {
        "missing_columns": missing,
        "extra_columns": extra,
        "dtype_mismatches": dtype_mismatch,
        "order_matches": order_ok,
        "n_columns": len(schema),
    }
    return CheckOutcome("schema", passed, desc, md)


def _check_not_null(contract: Contract, lf: pl.LazyFrame, schema: pl.Schema, desc: str) -> CheckOutcome:
    cols, missing = _present(contract, schema, lambda c: not c.nullable)
    return _rule_family(
        "not_null", desc, contract, lf, schema, cols, missing,
        lambda c, _dt: pl.col(c.name).is_null(),
    )


def _key_hash(cols: list[str]) -> pl.Expr:
    """64-bit hash of a compound key, null-safe (``pl.struct(...).hash()`` fails in the streaming
    engine on multi-chunk frames in polars 2.1: "nested objects are not allowed")."""
    h = pl.lit(0, dtype=pl.UInt64)
    for i, c in enumerate(cols):
        h = (h * pl.lit(0x100000001B3, dtype=pl.UInt64)) ^ pl.col(c).hash(seed=i + 1)
    return h


def _check_unique(contract: Contract, lf: pl.LazyFrame, schema: pl.Schema, desc: str) -> CheckOutcome:
    grain = list(contract.grain)
    missing = [g for g in grain if g not in schema]
    if missing:
        return CheckOutcome(
            "unique_grain", False, desc,
            {"missing_columns": missing, "duplicate_keys": None, "duplicate_rows": None},
        )
    h = "__kspill_grain_hash"
    hashed = lf.select(_key_hash(grain).alias(h))
    dup_hashes = (
        hashed.group_by(h).agg(pl.len().alias("n")).filter(pl.col("n") > 1).select(h)
        .collect(engine="streaming")
    )
    n_dup_keys = 0
    n_dup_rows = 0
    samples: list[dict[str, Any]] = []
    if dup_hashes.height:
        dups = (
            lf.select(grain)
            .with_columns(_key_hash(grain).alias(h))
            .join(dup_hashes.lazy(), on=h, how="semi")
            .group_by(grain)
            .agg(pl.len().alias("__n"))
            .filter(pl.col("__n") > 1)
            .collect(engine="streaming")
        )
        n_dup_keys = dups.height
        n_dup_rows = int(dups["__n"].sum()) if dups.height else 0
        scols = sample_columns(contract)
        if scols and dups.height:
            samples = [
                {**{k: _jsonable(v) for k, v in r.items() if k != "__n"}, "rows": int(r["__n"])}
                for r in dups.sort(scols, nulls_last=True).select([*scols, "__n"]).head(SAMPLE_SIZE).rows(named=True)
            ]
    md: dict[str, Any] = {
        "grain": grain,
        "duplicate_keys": n_dup_keys,
        "duplicate_rows": n_dup_rows,
        "sample_columns": sample_columns(contract),
    }
    if samples:
        md["samples"] = samples
    return CheckOutcome("unique_grain", n_dup_keys == 0, desc, md)


def _check_allowed(contract: Contract, lf: pl.LazyFrame, schema: pl.Schema, desc: str) -> CheckOutcome:
    cols, missing = _present(contract, schema, lambda c: c.allowed is not None)

    def viol(c: Column, dtype: pl.DataType):
        try:
            vals = pl.Series(list(c.allowed)).cast(dtype)
        except Exception as exc:  # noqa: BLE001
            return f"allowed values cannot be compared with dtype {dtype}: {exc}"
        return pl.col(c.name).is_not_null() & ~pl.col(c.name).is_in(vals.implode())

    out = _rule_family("allowed_values", desc, contract, lf, schema, cols, missing, viol)
    # distinct offending values of non-sensitive columns are useful to fix a mapping
    bad_vals: dict[str, list[Any]] = {}
    for name in out.metadata["counts"]:
        if out.metadata["counts"][name] and not is_sensitive_column(name):
            c = contract.column(name)
            vals = pl.Series(list(c.allowed)).cast(schema[name])
            got = (
                lf.filter(pl.col(name).is_not_null() & ~pl.col(name).is_in(vals.implode()))
                .select(pl.col(name).unique().sort().head(SAMPLE_SIZE))
                .collect()[name].to_list()
            )
            bad_vals[name] = [_jsonable(v) for v in got]
    if bad_vals:
        out.metadata["disallowed_values"] = bad_vals
    return out


def _check_ranges(contract: Contract, lf: pl.LazyFrame, schema: pl.Schema, desc: str) -> CheckOutcome:
    cols, missing = _present(contract, schema, lambda c: c.range is not None)

    def viol(c: Column, dtype: pl.DataType):
        if not dtype.is_numeric():
            return f"dtype {dtype} is not numeric"
        return _range_violation(c, dtype)

    return _rule_family("ranges", desc, contract, lf, schema, cols, missing, viol)


def _check_patterns(contract: Contract, lf: pl.LazyFrame, schema: pl.Schema, desc: str) -> CheckOutcome:
    cols, missing = _present(contract, schema, lambda c: c.pattern is not None)

    def viol(c: Column, dtype: pl.DataType):
        if dtype != pl.String:
            return f"dtype {dtype} is not a string"
        return pl.col(c.name).is_not_null() & ~pl.col(c.name).str.contains(c.pattern)

    return _rule_family("patterns", desc, contract, lf, schema, cols, missing, viol)


def _reference(context: dict | None, table: str):
    if not context:
        return None
    refs = context.get("references")
    if isinstance(refs, dict) and table in refs:
        return refs[table]
    return context.get(table)


def _check_fks(
    contract: Contract, lf: pl.LazyFrame, schema: pl.Schema, desc: str, context: dict | None
) -> CheckOutcome:
    cols, missing = _present(contract, schema, lambda c: c.foreign_key is not None)
    counts: dict[str, int] = {}
    distinct: dict[str, int] = {}
    samples: dict[str, list] = {}
    values: dict[str, list] = {}
    errors: dict[str, str] = {}
    for c in cols:
        fk = c.foreign_key
        ref = _reference(context, fk.table)
        if ref is None:
            errors[c.name] = f"reference table {fk.table!r} not given in context"
            continue
        ref_lf = ref.lazy() if isinstance(ref, pl.DataFrame) else ref
        if fk.column not in ref_lf.collect_schema():
            errors[c.name] = f"reference table {fk.table!r} has no column {fk.column!r}"
            continue
        keys = ref_lf.select(pl.col(fk.column).cast(schema[c.name]).alias(c.name)).unique()
        orphans = lf.filter(pl.col(c.name).is_not_null()).join(keys, on=c.name, how="anti")
        res = orphans.select(
            pl.len().alias("rows"), pl.col(c.name).n_unique().alias("distinct")
        ).collect(engine="streaming").row(0, named=True)
        counts[c.name] = int(res["rows"])
        if res["rows"]:
            distinct[c.name] = int(res["distinct"])
            scols = _sample_cols_for(contract, c, schema)
            samples[c.name] = [
                {k: _jsonable(v) for k, v in r.items()}
                for r in orphans.select(scols).head(SAMPLE_SIZE).collect().rows(named=True)
            ]
            if not c.is_sensitive:
                values[c.name] = [
                    _jsonable(v)
                    for v in orphans.select(pl.col(c.name).unique().sort().head(SAMPLE_SIZE)).collect()[c.name]
                ]
    failing = {k: v for k, v in counts.items() if v}
    md: dict[str, Any] = {
        "failing_rows": int(sum(failing.values())),
        "failing_columns": sorted(set(failing) | set(errors) | set(missing)),
        "counts": counts,
        "checked_columns": [c.name for c in cols],
    }
    if distinct:
        md["distinct_missing_keys"] = distinct
    if values:
        md["missing_keys"] = values
    if samples:
        md["samples"] = samples
    if errors:
        md["errors"] = errors
    if missing:
        md["missing_columns"] = missing
    return CheckOutcome("foreign_keys", not failing and not errors and not missing, desc, md)


# --------------------------------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------------------------------
def run_contract_checks(
    contract: Contract,
    df_or_lazy: pl.DataFrame | pl.LazyFrame,
    *,
    context: dict | None = None,
) -> list[CheckOutcome]:
    """Run every check the contract generates; outcomes follow :func:`check_names` order.

    ``context`` may hold reference frames for foreign keys, either as
    ``{"references": {"ref_prefecture": df}}`` or directly ``{"ref_prefecture": df}`` (DataFrame or
    LazyFrame). A missing reference fails ``foreign_keys`` with an ``errors`` entry.
    Checks of columns absent from the frame fail (and list them under ``missing_columns``).
    """
    lf = df_or_lazy.lazy() if isinstance(df_or_lazy, pl.DataFrame) else df_or_lazy
    schema = lf.collect_schema()
    out: list[CheckOutcome] = []
    for name, desc in check_names(contract):
        if name == "schema":
            out.append(_check_schema(contract, schema, desc))
        elif name == "not_null":
            out.append(_check_not_null(contract, lf, schema, desc))
        elif name == "unique_grain":
            out.append(_check_unique(contract, lf, schema, desc))
        elif name == "allowed_values":
            out.append(_check_allowed(contract, lf, schema, desc))
        elif name == "ranges":
            out.append(_check_ranges(contract, lf, schema, desc))
        elif name == "patterns":
            out.append(_check_patterns(contract, lf, schema, desc))
        elif name == "foreign_keys":
            out.append(_check_fks(contract, lf, schema, desc, context))
    return out


def check_row_accounting(
    rows_read: float,
    rows_kept: float,
    rows_quarantined: float,
    value_read: float,
    value_kept: float,
    value_quarantined: float,
    rel_tol: float = 1e-9,
) -> CheckOutcome:
    """Accounting identity: read = kept + quarantined, for rows and for (parseable) trade value.

    Rows may be fractional (HS split weights), so they are compared with an absolute tolerance of
    1e-6; values with ``math.isclose(rel_tol=rel_tol, abs_tol=1e-6)``.
    """
    row_diff = float(rows_read) - (float(rows_kept) + float(rows_quarantined))
    val_sum = float(value_kept) + float(value_quarantined)
    val_diff = float(value_read) - val_sum
    rows_ok = abs(row_diff) <= 1e-6
    value_ok = math.isclose(float(value_read), val_sum, rel_tol=rel_tol, abs_tol=1e-6)
    md = {
        "rows_read": float(rows_read),
        "rows_kept": float(rows_kept),
        "rows_quarantined": float(rows_quarantined),
        "rows_difference": row_diff,
        "value_read": float(value_read),
        "value_kept": float(value_kept),
        "value_quarantined": float(value_quarantined),
        "value_difference": val_diff,
        "rows_ok": rows_ok,
        "value_ok": value_ok,
    }
    return CheckOutcome(
        "row_accounting",
        rows_ok and value_ok,
        "rows and trade value read = kept + quarantined",
        md,
    )
