"""The replication report as a Dagster asset: ``kspill_report`` (group ``report``, unpartitioned).

Thin wiring around :func:`kspill_pipeline.report.build_report` (pure). The asset declares
non-loading ``deps`` on the study outputs (so the UI draws it at the end of the graph and
automation refreshes it after them), reads whatever the store holds, and writes
``<store>/_report/report.html`` and ``report.md`` (the same place as ``kspill report``). Its
materialisation metadata links to the page (``path``, ``url``) and summarises it (failed checks
first). It is deliberately **not** gated by checks: it reports failed checks at the top of the page
instead of refusing to run, and its automation condition leaves out the blocking-check condition
that gates the study assets.

:func:`config_in_force` resolves the switches a run with a given run configuration uses (defaults
of the configurable resources and op configs, ``source.yaml``, the run configuration) and the
configuration digest ``kspill run`` records per asset in ``_lineage.json``; ``kspill report``
uses it too.
"""

import inspect
from pathlib import Path
from typing import Any

from dagster import AssetExecutionContext, AutomationCondition, MaterializeResult, MetadataValue, asset

from kspill_pipeline.resources import KspillPaths

from kspill_pipeline.report import DEFAULT_OUT, REPORT_ASSET

GROUP = "report"
#: Study outputs the report is drawn after (all exist in definitions.py's graph; test_report checks it).
REPORT_DEPS: tuple[str, ...] = (
    "s000_table1", "s000_table2", "s000_replication",
    "s000_figure1", "s000_figure2", "s000_figure3", "s000_figure4", "s000_figure5",
    "quality_city_hs4", "quality_decomposition",
    *(f"s004_table{t}" for t in range(2, 9)), "s004_placebo", "s004_replication",
)


def _jsonable(v: Any) -> Any:
    if hasattr(v, "model_dump"):
        return v.model_dump(mode="json")
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return v


def config_in_force(defs, store_dir: Path | str, data_dir: Path | str, run_config: dict | None) -> dict[str, Any]:
    """Keyword arguments of :func:`build_report` describing the configuration of a run with
    ``run_config`` (Dagster run-config form, as ``kspill run --config`` takes it):

    * ``switches``: one section per configurable resource (its effective study model when it has a
      ``model()``: ``S000Config`` after the preset, ``RelatednessConfig``, ``QualityConfig`` with the
      ``quality:`` section of source.yaml) and per op with config (the cleaning op: the effective
      ``CleaningConfig`` with the ``cleaning:`` section of source.yaml);
    * ``config_digests``: asset -> the configuration digest ``kspill run`` records in ``_lineage.json``;
    * ``assets``: every materialisable asset -> partitioned?
    """
    from kspill_pipeline.automation import NEUTRAL_RESOURCES, Lineage
    from kspill_pipeline.config import load_source_config

    run_config = dict(run_config or {})
    lineage = Lineage(defs, store_dir, data_dir, run_config)
    graph = defs.resolve_asset_graph()
    resources = dict(defs.resources or {})
    paths = resources.get("paths")
    switches: dict[str, dict[str, Any]] = {}
    for rk in sorted(resources):
        base = resources[rk]
        if rk in NEUTRAL_RESOURCES or not (getattr(type(base), "model_fields", None) or {}):
            continue
        vals = lineage._resource_config(rk)  # defaults + run config, exactly as the lineage digest sees them
        model = getattr(base, "model", None)
        if callable(model):
            try:
                obj = type(base)(**vals)
                params = inspect.signature(obj.model).parameters
                eff = obj.model(paths) if "paths" in params else obj.model()
                switches[f"resource {rk} (effective {type(eff).__name__})"] = {
                    **({"preset": vals["preset"]} if "preset" in vals else {}), **_jsonable(eff)}
                continue
            except Exception as e:  # noqa: BLE001 - shown in the report, never fatal
                vals = {**vals, "<error>": " ".join(str(e).split())}
        switches[f"resource {rk}"] = _jsonable(vals)
    source_cleaning = None
    try:
        source_cleaning = (load_source_config(data_dir).model_extra or {}).get("cleaning")
    except Exception:  # noqa: BLE001 - no source.yaml: defaults
        pass
    seen: set[str] = set()
    for ad in sorted(graph.assets_defs, key=lambda d: d.op.name if d.is_executable else ""):
        if not ad.is_executable or ad.op.name in seen:
            continue
        seen.add(ad.op.name)
        cfg = lineage._op_config(ad)
        if not cfg:
            continue
        fn = getattr(ad.op.compute_fn, "decorated_fn", None)
        ann = inspect.signature(fn).parameters.get("config") if fn is not None else None
        cls = getattr(ann, "annotation", None)
        if cls is not None and callable(getattr(cls, "cleaning", None)):
            given = ((run_config.get("ops") or {}).get(ad.op.name) or {}).get("config") or {}
            try:
                switches[f"op {ad.op.name} (effective CleaningConfig)"] = _jsonable(
                    cls(**given).cleaning(source_cleaning))
                continue
            except Exception as e:  # noqa: BLE001
                cfg = {**cfg, "<error>": " ".join(str(e).split())}
        switches[f"op {ad.op.name}"] = _jsonable(cfg)
    keys = [k for k in graph.get_all_asset_keys() if graph.get(k).is_materializable]
    return {
        "switches": switches,
        "config_digests": {k.to_user_string(): lineage.config_fingerprint(k) for k in keys},
        "assets": {k.to_user_string(): graph.get(k).partitions_def is not None for k in keys},
    }


def build_report_assets() -> list:
    @asset(
        name=REPORT_ASSET,
        group_name=GROUP,
        deps=list(REPORT_DEPS),
        kinds={"html", "markdown"},
        description=(
            "Replication report: one self-contained HTML page (plus Markdown) at <store>/_report/report.html built "
            "from the materialised store: failed checks first, data coverage by year, cleaning accounting, every "
            "check result, study tables beside the published numbers, export quality summary, all figures, the "
            "configuration in force, package versions and the raw data fingerprint. Aggregates only. Not gated by "
            "checks: it reports them."
        ),
        automation_condition=AutomationCondition.eager()
        .without(AutomationCondition.in_latest_time_window())
        .with_label("kspill: refresh the report after the study outputs changed (reports failed checks)"),
    )
    def kspill_report(context: AssetExecutionContext, paths: KspillPaths) -> MaterializeResult:
        from kspill_pipeline.definitions import build_definitions
        from kspill_pipeline.report import build_report

        run_config = dict(getattr(context.run, "run_config", None) or {})
        given = {k: v for k, v in run_config.items() if k in ("ops", "resources") and v}
        cfg = config_in_force(build_definitions(paths.data, paths.store), paths.store, paths.data, run_config)
        res = build_report(paths.store, paths.data, paths.store / DEFAULT_OUT, run_config=given or None, **cfg)
        s = res["summary"]
        if s["failed_checks"]:
            context.log.warning(f"replication report: {s['failed_checks']} failed check(s), listed at the top of "
                                f"{res['html']}")
        return MaterializeResult(metadata={
            "path": MetadataValue.path(str(res["html"])),
            "url": MetadataValue.url(Path(res["html"]).resolve().as_uri()),
            "markdown_path": MetadataValue.path(str(res["md"])),
            "summary": MetadataValue.md(res["summary_md"]),
            "failed_checks": int(s["failed_checks"]),
            "stale_partitions": int(s["stale_partitions"]),
            "assets_materialised": int(s["assets_materialised"]),
            "figures": int(s["figures"]),
            "source_fingerprint": str(s["source_fingerprint"] or "n/a"),
        })

    return [kspill_report]
