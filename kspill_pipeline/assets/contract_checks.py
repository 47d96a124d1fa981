"""Dagster asset checks generated from data contracts (thin layer over contracts.checks).

Every contract yields one blocking, ERROR-severity check per rule family (schema, not_null,
unique_grain, allowed_values, ranges, patterns, foreign_keys), attached inline to the asset, so
they are evaluated per partition. ``ge_suite`` runs the great_expectations suite generated from
the same contract (imported lazily). Extra invariants (row/value accounting) are declared by
the asset that can evaluate them.
"""

from __future__ import annotations

from typing import Any, Iterable

import polars as pl
from dagster import AssetCheckResult, AssetCheckSeverity, AssetCheckSpec, MetadataValue

from kspill_pipeline.contracts.checks import CheckOutcome, check_names, run_contract_checks
from kspill_pipeline.contracts.loader import load_contract

GE_CHECK = ("ge_suite", "great_expectations suite generated from the data contract")


def contract_check_specs(asset: str, extra: Iterable[tuple[str, str]] = (), ge: bool = True) -> list[AssetCheckSpec]:
    contract = load_contract(asset)
    names = list(check_names(contract)) + list(extra) + ([GE_CHECK] if ge else [])
    return [AssetCheckSpec(name=n, asset=asset, blocking=True, description=d) for n, d in names]


def _meta(md: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in md.items():
        if isinstance(v, (dict, list, tuple)):
            out[k] = MetadataValue.json(v if not isinstance(v, tuple) else list(v))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[k] = v if v is not None else MetadataValue.null()
        else:
            out[k] = str(v)
    return out


def outcome_to_result(asset: str, o: CheckOutcome) -> AssetCheckResult:
    return AssetCheckResult(
        asset_key=asset,
        check_name=o.name,
        passed=bool(o.passed),
        severity=AssetCheckSeverity.ERROR,
        description=o.description,
        metadata=_meta(o.metadata or {}),
    )


def _reference_frames(contract) -> dict:
    """Reference tables named by the contract's foreign keys, built from the reference layer."""
    from kspill_pipeline.reference.admin import prefectures

    builders = {"ref_prefecture": prefectures}
    out = {}
    for c in contract.columns:
        fk = getattr(c, "foreign_key", None)
        if fk is not None and fk.table in builders:
            out[fk.table] = builders[fk.table]()
    return out


def evaluate_contract(asset: str, df: pl.DataFrame, *, context: dict | None = None, ge: bool = True) -> list[AssetCheckResult]:
    contract = load_contract(asset)
    context = {**_reference_frames(contract), **(context or {})}
    results = [outcome_to_result(asset, o) for o in run_contract_checks(contract, df, context=context)]
    if ge:
        from kspill_pipeline.contracts.ge_suite import validate_with_ge

        r = validate_with_ge(contract, df)
        results.append(
            AssetCheckResult(
                asset_key=asset,
                check_name=GE_CHECK[0],
                passed=bool(r.success),
                severity=AssetCheckSeverity.ERROR,
                metadata=_meta({"statistics": r.statistics, "failures": r.failures}),
            )
        )
    return results


def record_gate(store_root, asset: str, year, results: list[AssetCheckResult]) -> list[AssetCheckResult]:
    """Write the partition's blocking-check outcomes beside its data (io.store gate file), so that
    gated assets in LATER runs can refuse partitions whose checks failed or never ran."""
    from kspill_pipeline.io import store

    store.write_gate(store_root, asset, year, {r.check_name: r.passed for r in results
                                               if r.asset_key.to_user_string() == asset})
    return results


def require_gates(store_root, inputs: list[tuple[str, list]]) -> None:
    """Raise a Failure naming every upstream partition with a failed or missing blocking check."""
    from dagster import Failure

    from kspill_pipeline.io import store

    problems: list[str] = []
    for asset, years in inputs:
        problems += store.gate_problems(store_root, asset, years)
    if problems:
        raise Failure(
            description="refusing to run on data that did not pass its blocking checks:\n- " + "\n- ".join(problems),
            metadata={"problems": MetadataValue.json(problems)},
        )
