"""great_expectations 1.24 suite generated from a contract (pure: no Dagster).

great_expectations is imported lazily inside the functions (the import costs 5-10 s), with
``GX_ANALYTICS_ENABLED=false`` set first and progress bars off. One ephemeral context per process;
suite, batch definition and validation definition are built once per (contract, with-uniqueness)
and cached.

Generated expectations, in order:

- ``ExpectTableColumnsToMatchOrderedList``: the contract's non-list columns in contract order;
- ``ExpectColumnValuesToNotBeNull`` for every non-nullable column;
- ``ExpectColumnValuesToBeInSet`` for ``allowed``;
- ``ExpectColumnValuesToBeBetween`` for ``range`` (``min_exclusive``/``max_exclusive`` ->
  ``strict_min``/``strict_max``);
- ``ExpectColumnValuesToMatchRegex`` for ``pattern`` (string columns only);
- ``ExpectCompoundColumnsToBeUnique`` on the grain, only when the frame has at most
  ``max_rows_for_unique`` rows (default :data:`DEFAULT_MAX_ROWS_FOR_UNIQUE`). Above that threshold
  the uniqueness is covered by the polars ``unique_grain`` check of
  :mod:`kspill_pipeline.contracts.checks` (hash group-by, streaming), which scales to 50M rows.

List-typed columns (for example ``trade_clean.intermediary_keywords``) are skipped: they are not
converted to pandas (costly object arrays) and get no expectation, not even in the ordered column
list; the polars ``schema`` and ``not_null`` checks cover them.

Samples in :class:`GEResult` (at most 5 values per expectation) are never taken from sensitive
columns (``firm_id``, ``firm_name_hash``, any ``*name*`` column) nor from compound-uniqueness
results (which would contain firm ids).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from kspill_pipeline.contracts.loader import Contract, is_sensitive_column

__all__ = ["DEFAULT_MAX_ROWS_FOR_UNIQUE", "GEResult", "build_suite", "validate_with_ge"]

DEFAULT_MAX_ROWS_FOR_UNIQUE = 2_000_000
SAMPLE_SIZE = 5

_STATE: dict[str, Any] = {}


def _gx():
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    os.environ["GX_ANALYTICS_ENABLED"] = "false"
    import great_expectations as gx  # noqa: PLC0415 - lazy on purpose

    return gx


def _context():
    ctx = _STATE.get("context")
    if ctx is None:
        gx = _gx()
        from great_expectations.data_context.types.base import ProgressBarsConfig  # noqa: PLC0415

        ctx = gx.get_context(mode="ephemeral")
        ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
        _STATE["context"] = ctx
        _STATE["datasource"] = ctx.data_sources.add_pandas("kspill_pandas")
        _STATE["validations"] = {}
    return ctx


def _ge_columns(contract: Contract) -> list[str]:
    return [c.name for c in contract.columns if not c.is_list]


def build_suite(contract: Contract, *, include_unique: bool = True, suite_name: str | None = None):
    """``gx.ExpectationSuite`` generated from the contract (not registered in any context)."""
    gx = _gx()
    E = gx.expectations
    exps: list[Any] = [E.ExpectTableColumnsToMatchOrderedList(column_list=_ge_columns(contract))]
    for c in contract.columns:
        if c.is_list:
            continue
        if not c.nullable:
            exps.append(E.ExpectColumnValuesToNotBeNull(column=c.name))
    for c in contract.columns:
        if c.is_list or c.allowed is None:
            continue
        exps.append(E.ExpectColumnValuesToBeInSet(column=c.name, value_set=list(c.allowed)))
    for c in contract.columns:
        if c.is_list or c.range is None:
            continue
        r = c.range
        exps.append(
            E.ExpectColumnValuesToBeBetween(
                column=c.name, min_value=r.min, max_value=r.max,
                strict_min=r.min_exclusive, strict_max=r.max_exclusive,
            )
        )
    for c in contract.columns:
        if c.pattern is None or not c.is_string:
            continue
        exps.append(E.ExpectColumnValuesToMatchRegex(column=c.name, regex=c.pattern))
    if include_unique and contract.grain:
        exps.append(E.ExpectCompoundColumnsToBeUnique(column_list=list(contract.grain)))
    name = suite_name or f"{contract.name}{'' if include_unique else '__no_unique'}"
    return gx.ExpectationSuite(name=name, expectations=exps)


def _validation_definition(contract: Contract, include_unique: bool):
    ctx = _context()
    key = (contract.name, include_unique, tuple(contract.columns), contract.grain)
    cache: dict = _STATE["validations"]
    vd = cache.get(key)
    if vd is None:
        gx = _gx()
        n = f"{contract.name}__u{int(include_unique)}__{len(cache)}"
        bd = _STATE["datasource"].add_dataframe_asset(n).add_batch_definition_whole_dataframe(n)
        suite = ctx.suites.add(build_suite(contract, include_unique=include_unique, suite_name=n))
        vd = ctx.validation_definitions.add(gx.ValidationDefinition(name=n, data=bd, suite=suite))
        cache[key] = vd
    return vd


@dataclass
class GEResult:
    success: bool
    statistics: dict[str, Any]
    expectations: list[dict[str, Any]] = field(default_factory=list)
    unique_checked: bool = False
    n_rows: int = 0
    seconds: float = 0.0

    @property
    def failed(self) -> list[dict[str, Any]]:
        """Entries of :attr:`expectations` that failed."""
        return [e for e in self.expectations if not e["success"]]

    @property
    def failures(self) -> list[dict[str, Any]]:
        """Alias of :attr:`failed` (JSON-ready, samples already filtered)."""
        return self.failed

    def unexpected_counts(self) -> dict[str, int | None]:
        """``"<expectation_type>:<column(s)>" -> unexpected_count`` (None when not applicable)."""
        return {e["key"]: e["unexpected_count"] for e in self.expectations}

    def to_dict(self) -> dict[str, Any]:
        return {
            "success": self.success, "statistics": self.statistics, "expectations": self.expectations,
            "unique_checked": self.unique_checked, "n_rows": self.n_rows, "seconds": self.seconds,
        }


def _jsonable(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, float):
        return v if v == v and v not in (float("inf"), float("-inf")) else str(v)
    try:
        import numpy as np  # noqa: PLC0415

        if isinstance(v, np.generic):
            return _jsonable(v.item())
    except ImportError:  # pragma: no cover
        pass
    return str(v)


def validate_with_ge(
    contract: Contract,
    df: pl.DataFrame | pl.LazyFrame,
    max_rows_for_unique: int = DEFAULT_MAX_ROWS_FOR_UNIQUE,
) -> GEResult:
    """Validate a polars frame with the contract's GE suite (ephemeral context, cached per process).

    The frame is converted with ``df.select(cols).to_pandas()`` where ``cols`` are its non-list
    columns in the frame's own order (contract columns and any extra ones, so the ordered-list
    expectation sees extras and order problems). Compound uniqueness runs only when
    ``df.height <= max_rows_for_unique``.
    """
    t0 = time.perf_counter()
    if isinstance(df, pl.LazyFrame):
        df = df.collect()
    include_unique = bool(contract.grain) and df.height <= max_rows_for_unique
    vd = _validation_definition(contract, include_unique)
    cols = [c for c, dt in df.schema.items() if not isinstance(dt, (pl.List, pl.Array, pl.Struct))]
    pdf = df.select(cols).to_pandas()
    res = vd.run(batch_parameters={"dataframe": pdf}, result_format="SUMMARY")
    exps: list[dict[str, Any]] = []
    for r in res.results:
        cfg = r.expectation_config
        kw = dict(cfg.kwargs)
        col = kw.get("column")
        cols_kw = kw.get("column_list")
        etype = cfg.type
        target = col if col else ("table" if etype == "expect_table_columns_to_match_ordered_list" else ",".join(cols_kw or []))
        result = r.result or {}
        entry: dict[str, Any] = {
            "key": f"{etype}:{target}",
            "expectation_type": etype,
            "column": col,
            "success": bool(r.success),
            "unexpected_count": result.get("unexpected_count"),
            "unexpected_percent": result.get("unexpected_percent"),
        }
        exc = getattr(r, "exception_info", None) or {}
        infos = [exc] if isinstance(exc, dict) and "raised_exception" in exc else (
            list(exc.values()) if isinstance(exc, dict) else []
        )
        msgs = [
            str(i.get("exception_message"))[:300]
            for i in infos if isinstance(i, dict) and i.get("raised_exception")
        ]
        if msgs:
            entry["exception"] = msgs[0]
        if not r.success:
            if etype == "expect_table_columns_to_match_ordered_list":
                details = result.get("details") or {}
                entry["mismatched"] = _jsonable(details.get("mismatched"))
                entry["observed_value"] = [str(x) for x in (result.get("observed_value") or [])]
            elif col and not is_sensitive_column(col):
                sample = result.get("partial_unexpected_list") or []
                entry["sample"] = [_jsonable(v) for v in sample[:SAMPLE_SIZE]]
        exps.append(entry)
    stats = {k: _jsonable(v) for k, v in dict(res.statistics).items()}
    return GEResult(
        success=bool(res.success), statistics=stats, expectations=exps,
        unique_checked=include_unique, n_rows=df.height, seconds=time.perf_counter() - t0,
    )
