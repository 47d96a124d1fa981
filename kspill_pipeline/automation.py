"""Schedules, the raw-data sensor, declarative automation and the lineage planner of ``kspill backfill``
(Dagster wiring; the pure parts -- hashing raw files, schedule windows, lineage records -- are in
:mod:`kspill_pipeline.io.freshness`).

How the pieces fit (README "Daily use"):

* ``yearly_refresh`` (job): the self-contained yearly assets, groups ``trade`` and
  ``relatedness`` (every input is the same year's data), one run per year.
* ``new_year_schedule`` (cron ``automation.new_year_cron``, default ``0 3 15 1 *``, UTC): one run
  of ``yearly_refresh`` for the year that just closed, when that year is one of the partitions
  (``years`` of ``source.yaml``); otherwise the tick is skipped with a reason. Written by hand
  because ``build_schedule_from_partitioned_job`` only allows the partitions' own cron for yearly
  partitions (1 January 00:00) and, once the calendar passes the last partition, keeps requesting
  that last year.
* ``revision_schedule`` (cron ``automation.revision_cron``, default ``0 3 15 7 *``): one run of
  ``yearly_refresh`` for each of the newest ``automation.revision_years`` (default 3) closed years
  (revised customs releases).
* ``raw_customs_sensor``: content-hash cursor per year (see ``freshness.raw_sensor_tick``); one run
  of ``yearly_refresh`` for exactly the years whose raw files were added or changed.
* Declarative automation: the reference tables (``ref_*``: unpartitioned, no upstream) get
  ``AutomationCondition.on_missing()``; every asset downstream of ``yearly_refresh`` that is not in it (the S000
  study assets, regression tables and figures, and whatever is added later) gets
  :func:`update_after_upstream`: Dagster's ``eager()`` without its latest-time-window restriction
  (so revised past years propagate too), and only when all upstream blocking checks passed. The
  ``kspill_automation`` sensor evaluates it and emits the requests of one tick as one asset
  backfill (dependency-ordered). The yearly study assets run for the affected years only (through
  their partition mappings: a revised 2015 re-runs first-export history 2015 and every later year,
  panels 2015 and 2016); an all-years asset (``s000_city_marketization``, ``s000_table1/2``,
  figures) is requested ONCE, and only when none of the yearly partitions it reads is missing,
  queued or running -- so three queued yearly runs of the revision schedule give one
  marketization run after the third, and the tables follow once, in the tick after the yearly
  panels were rebuilt (tests: ``test_automation.py``).

Every schedule and sensor is defined with Dagster's default status, STOPPED: nothing runs until it
is switched on in the UI (Automation tab) or with ``dagster schedule start`` / ``dagster sensor
start``; the daemon (``make ui`` runs one) must be up.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from dagster import (
    AssetKey,
    AssetSelection,
    AutomationCondition,
    AutomationConditionSensorDefinition,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    Definitions,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    define_asset_job,
    map_asset_specs,
    schedule,
    sensor,
)

from kspill_pipeline.io import freshness
from kspill_pipeline.io.freshness import AutomationSettings

REFRESH_JOB = "yearly_refresh"
YEARLY_GROUPS = ("trade", "relatedness")
AUTOMATION_SENSOR = "kspill_automation"
RAW_SENSOR = "raw_customs_sensor"
NEW_YEAR_SCHEDULE = "new_year_schedule"
REVISION_SCHEDULE = "revision_schedule"
#: resources that never change an output's content (where data lives, how work is spread)
NEUTRAL_RESOURCES = frozenset({"io_manager", "paths", "dask"})


# ------------------------------------------------------------------------------------------------
# declarative automation
# ------------------------------------------------------------------------------------------------


def update_after_upstream() -> AutomationCondition:
    """``eager()`` minus ``in_latest_time_window()``, plus ``all_deps_blocking_checks_passed()``.

    True for a partition (or an unpartitioned asset) when an upstream partition it reads was
    updated or will be requested this tick (or it became missing), since it was last requested or
    updated; and no upstream partition it reads is missing; and neither it nor an upstream
    partition is in progress (run or backfill); and every blocking check of the upstream
    partitions passed. Like ``eager()`` it does not fire on its first evaluation (switching the
    sensor on does not rebuild history; use ``kspill backfill`` or a UI backfill for that).
    """
    return (
        AutomationCondition.eager().without(AutomationCondition.in_latest_time_window())
        & AutomationCondition.all_deps_blocking_checks_passed()
    ).with_label("kspill: upstream years changed and passed their blocking checks")


def automated_keys(defs: Definitions, yearly_groups: Iterable[str] = YEARLY_GROUPS) -> set[AssetKey]:
    """Materialisable assets downstream of the yearly job's assets, outside the job."""
    graph = defs.resolve_asset_graph()
    yearly = AssetSelection.groups(*yearly_groups).resolve(graph)
    down = AssetSelection.groups(*yearly_groups).downstream().resolve(graph)
    return {k for k in down - yearly if graph.get(k).is_materializable}


def reference_keys(defs: Definitions, yearly_groups: Iterable[str] = YEARLY_GROUPS) -> set[AssetKey]:
    """Unpartitioned materialisable assets without materialisable parents outside the yearly job
    (the reference tables ``ref_prefecture``, ``ref_hs_concordance``): built once when missing."""
    graph = defs.resolve_asset_graph()
    yearly = AssetSelection.groups(*yearly_groups).resolve(graph)
    out = set()
    for k in graph.get_all_asset_keys():
        node = graph.get(k)
        if (k in yearly or not node.is_materializable or node.partitions_def is not None
                or any(graph.has(p) and graph.get(p).is_materializable for p in node.parent_keys)):
            continue
        out.add(k)
    return out


def with_automation_conditions(defs: Definitions) -> Definitions:
    """Attach :func:`update_after_upstream` to :func:`automated_keys` and ``on_missing()`` to
    :func:`reference_keys` (an asset that already has its own automation condition keeps it)."""
    conds = {k: AutomationCondition.on_missing() for k in reference_keys(defs)}
    cond = update_after_upstream()
    conds.update({k: cond for k in automated_keys(defs)})
    if not conds:
        return defs

    def attach(spec):
        if spec.key in conds and spec.automation_condition is None:
            return spec.replace_attributes(automation_condition=conds[spec.key])
        return spec

    # dagster.map_asset_specs (stable API) on the assets; Definitions.map_*_asset_specs are previews
    mapped = map_asset_specs(attach, list(defs.assets or []))
    return Definitions(**{f: getattr(defs, f) for f in defs._fields if f != "component_tree"} | {"assets": mapped})


# ------------------------------------------------------------------------------------------------
# schedules
# ------------------------------------------------------------------------------------------------


def _years_at(years_def, when) -> list[int]:
    return [int(k) for k in years_def.get_partition_keys(current_time=when)]


def build_new_year_schedule(job, years_def, settings: AutomationSettings):
    @schedule(
        name=NEW_YEAR_SCHEDULE,
        cron_schedule=settings.new_year_cron,
        job=job,
        execution_timezone="UTC",
        default_status=DefaultScheduleStatus.STOPPED,
        description=(
            f"Materialise the year that just closed ({REFRESH_JOB}: trade + relatedness), when it is one "
            "of the yearly partitions (source.yaml `years`); the S000 study assets follow through "
            f"declarative automation ({AUTOMATION_SENSOR}). Off until enabled."
        ),
        tags={"kspill/trigger": "new_year_schedule"},
    )
    def new_year_schedule(context):
        t = context.scheduled_execution_time
        available = _years_at(years_def, t)
        y = freshness.newly_closed_year(t.year, available)
        if y is None:
            span = f"{available[0]}-{available[-1]}" if available else "none"
            return SkipReason(
                f"year {t.year - 1} is not a partition (partitions {span}); extend `years` in source.yaml "
                "once its customs files are in the data directory"
            )
        return RunRequest(partition_key=str(y), run_key=f"new_year:{y}",
                          tags={"kspill/trigger": "new_year_schedule"})

    return new_year_schedule


def build_revision_schedule(job, years_def, settings: AutomationSettings):
    n = settings.revision_years

    @schedule(
        name=REVISION_SCHEDULE,
        cron_schedule=settings.revision_cron,
        job=job,
        execution_timezone="UTC",
        default_status=DefaultScheduleStatus.STOPPED,
        description=(
            f"Re-run the newest {n} closed years ({REFRESH_JOB}) for revised customs releases "
            "(automation.revision_years in source.yaml); the S000 study assets follow through "
            f"declarative automation. Off until enabled."
        ),
        tags={"kspill/trigger": "revision_schedule"},
    )
    def revision_schedule(context):
        t = context.scheduled_execution_time
        years = freshness.revision_years(t.year, _years_at(years_def, t), n)
        if not years:
            return SkipReason(f"no closed year before {t.year} among the partitions")
        stamp = t.strftime("%Y-%m-%d")
        return [RunRequest(partition_key=str(y), run_key=f"revision:{stamp}:{y}",
                           tags={"kspill/trigger": "revision_schedule"}) for y in years]

    return revision_schedule


# ------------------------------------------------------------------------------------------------
# raw-data sensor
# ------------------------------------------------------------------------------------------------


def build_raw_data_sensor(job, years_def, data_dir: Path | str, store_dir: Path | str | None,
                          settings: AutomationSettings):
    data_dir = Path(data_dir)

    @sensor(
        name=RAW_SENSOR,
        job=job,
        minimum_interval_seconds=settings.sensor_interval_seconds,
        default_status=DefaultSensorStatus.STOPPED,
        description=(
            f"Watches {data_dir} (customs files per year) and runs {REFRESH_JOB} for exactly the years whose "
            "files were added or changed (sha256 of names, sizes and contents per year, kept in the cursor). "
            "Off until enabled."
        ),
    )
    def raw_customs_sensor(context: SensorEvaluationContext):
        try:
            cursor = json.loads(context.cursor) if context.cursor else None
        except json.JSONDecodeError:
            cursor = None
        try:
            tick = freshness.raw_sensor_tick(
                data_dir, store_dir, _years_at(years_def, None), cursor,
                min_file_age_seconds=settings.min_file_age_seconds,
            )
        except (ValueError, FileNotFoundError) as e:  # ambiguous file name, missing folder
            return SkipReason(f"raw data folder not usable: {e}")
        for n in tick.notes:
            context.log.info(n)
        runs = [
            RunRequest(partition_key=str(y), run_key=f"raw:{y}:{fp[:16]}",
                       tags={"kspill/trigger": RAW_SENSOR, "kspill/raw_fingerprint": fp[:16]})
            for y, fp in tick.requests.items()
        ]
        cur = json.dumps(tick.cursor, sort_keys=True)
        if runs:
            return SensorResult(run_requests=runs, cursor=cur)
        return SensorResult(skip_reason=SkipReason("; ".join(tick.notes) or "no raw file added or changed"),
                            cursor=cur)

    return raw_customs_sensor


# ------------------------------------------------------------------------------------------------
# assembly
# ------------------------------------------------------------------------------------------------


def add_automation(
    defs: Definitions,
    *,
    years_def,
    data_dir: Path | str,
    store_dir: Path | str | None,
    settings: AutomationSettings | None = None,
) -> Definitions:
    """``defs`` plus the ``yearly_refresh`` job, the two schedules, the raw-data sensor, the
    automation-condition sensor and the conditions on the downstream assets."""
    settings = settings or freshness.load_automation_settings(data_dir)
    job = define_asset_job(
        REFRESH_JOB,
        selection=AssetSelection.groups(*YEARLY_GROUPS),
        partitions_def=years_def,
        description="One year of trade + relatedness assets (targeted by the schedules and the raw-data sensor); "
                    "the study assets downstream follow by declarative automation.",
    )
    auto_sensor = AutomationConditionSensorDefinition(
        AUTOMATION_SENSOR,
        target=AssetSelection.all(),
        default_status=DefaultSensorStatus.STOPPED,
        minimum_interval_seconds=60,
        emit_backfills=True,  # one ordered asset backfill per tick (unpartitioned after partitioned)
        description="Evaluates the automation conditions (study assets update after their upstream years changed "
                    "and passed their blocking checks; all-years assets run once). Off until enabled.",
    )
    extra = Definitions(
        jobs=[job],
        schedules=[build_new_year_schedule(job, years_def, settings),
                   build_revision_schedule(job, years_def, settings)],
        sensors=[build_raw_data_sensor(job, years_def, data_dir, store_dir, settings), auto_sensor],
    )
    return Definitions.merge(with_automation_conditions(defs), extra)


# ------------------------------------------------------------------------------------------------
# lineage of stored partitions (kspill run / kspill backfill)
# ------------------------------------------------------------------------------------------------


class Lineage:
    """What each stored partition is computed from, read off the asset graph.

    ``inputs(key, year)`` lists the upstream partitions it reads (through the assets' partition
    mappings: same year, t-1 windows, all years for the study-wide assets) with their store
    fingerprints, the raw customs files of the year for assets fed by ``customs_raw`` (content
    fingerprints), and the run configuration that applies to the asset (its op config and the
    configurable resources it uses, defaults filled in; ``dask``, ``paths`` and the IO manager do
    not change results and are left out).
    """

    def __init__(self, defs: Definitions, store_dir: Path | str, data_dir: Path | str, run_config: dict | None):
        self.defs = defs
        self.graph = defs.resolve_asset_graph()
        self.store = Path(store_dir)
        self.data = Path(data_dir)
        self.run_config = dict(run_config or {})
        self.cache = freshness.load_hash_cache(self.store)
        self._raw: dict[int, str] = {}
        self._raw_files: dict | None = None
        self._config: dict[AssetKey, str] = {}

    # -- inputs
    def raw_fingerprint(self, year: int) -> str:
        if year not in self._raw:
            if self._raw_files is None:
                self._raw_files = freshness.year_files(self.data)
            files = self._raw_files.get(int(year), [])
            self._raw[year] = freshness.fingerprint_files(files, self.data, self.cache) if files else freshness.MISSING
        return self._raw[year]

    def save_cache(self) -> None:
        if self.cache.entries():
            freshness.save_hash_cache(self.store, self.cache)

    def _op_config(self, assets_def) -> dict:
        op = assets_def.op
        defaults: dict[str, Any] = {}
        try:
            for name, field in (op.config_schema.config_type.fields or {}).items():
                if field.default_provided:
                    defaults[name] = field.default_value
        except AttributeError:
            pass
        given = ((self.run_config.get("ops") or {}).get(op.name) or {}).get("config") or {}
        return {**defaults, **given}

    def _resource_config(self, rk: str) -> dict:
        base = (self.defs.resources or {}).get(rk)
        vals: dict[str, Any] = {}
        fields = getattr(type(base), "model_fields", None) or {}
        for f in fields:
            vals[f] = getattr(base, f, None)
        given = ((self.run_config.get("resources") or {}).get(rk) or {}).get("config") or {}
        return {**vals, **given}

    def config_fingerprint(self, key: AssetKey) -> str:
        if key not in self._config:
            ad = self.defs.resolve_assets_def(key)
            cfg = {"op": self._op_config(ad)}
            for rk in sorted(set(ad.required_resource_keys) - NEUTRAL_RESOURCES):
                cfg[f"resource:{rk}"] = self._resource_config(rk)
            self._config[key] = freshness.config_digest(cfg)
        return self._config[key]

    def inputs(self, key: AssetKey, year: int | None) -> dict[str, str]:
        node = self.graph.get(key)
        pk = None if year is None else str(year)
        out = {"config": self.config_fingerprint(key)}
        for parent in sorted(node.parent_keys):
            name = parent.to_user_string()
            pnode = self.graph.get(parent) if self.graph.has(parent) else None
            if pnode is None:
                out[name] = "external"
                continue
            if pnode.partitions_def is None:
                keys: list[str | None] = [None]
            else:
                res = self.graph.get_parent_partition_keys_for_child(pk, parent, key)
                keys = sorted(res.partitions_subset.get_partition_keys())
            for k in keys:
                label = name if k is None else f"{name}/{k}"
                if not pnode.is_materializable:
                    out[label] = self.raw_fingerprint(int(k)) if (name == freshness.RAW_INPUT and k) else "external"
                else:
                    out[label] = freshness.stored_fingerprint(self.store, name, k)
        return out

    # -- status / record
    def blocking_checks(self, key: AssetKey) -> list[str]:
        ad = self.defs.resolve_assets_def(key)
        return sorted(s.name for s in ad.check_specs if s.asset_key == key and s.blocking)

    def status(self, key: AssetKey, year: int | None) -> freshness.PartitionStatus:
        return freshness.partition_status(self.store, key.to_user_string(), year, self.inputs(key, year))

    def record(self, key: AssetKey, year: int | None, checks: dict[str, bool], run_id: str | None = None) -> None:
        freshness.write_lineage(self.store, key.to_user_string(), year, inputs=self.inputs(key, year),
                                checks=checks, blocking=self.blocking_checks(key), run_id=run_id)

    def record_result(self, result, year: int | None) -> list[AssetKey]:
        """Write a lineage record for every asset the ``materialize`` result wrote."""
        checks: dict[AssetKey, dict[str, bool]] = {}
        for ev in result.get_asset_check_evaluations():
            # a WARN-severity failure does not block (Dagster's rule): it counts as passed here
            warn = getattr(getattr(ev, "severity", None), "value", "ERROR") == "WARN"
            checks.setdefault(ev.asset_key, {})[ev.check_name] = bool(ev.passed) or warn
        written = []
        for ev in result.get_asset_materialization_events():
            key = ev.event_specific_data.materialization.asset_key
            self.record(key, year, checks.get(key, {}), run_id=getattr(result, "run_id", None))
            written.append(key)
        return written

    # -- planning
    def stale(self, keys: set[AssetKey], year: int | None, force: bool = False) -> dict[AssetKey, str]:
        """Keys of one (stage, year) run that must run, with the reason. A key runs when it is not
        current, or when an upstream key of the same run runs (its inputs are about to change), or
        when another output of the same non-subsettable multi-asset runs."""
        order = self.graph.toposorted_asset_keys
        out: dict[AssetKey, str] = {}
        for k in [k for k in order if k in keys]:
            if force:
                out[k] = "forced"
                continue
            ups = [p for p in self.graph.get(k).parent_keys if p in out]
            if ups:
                out[k] = f"upstream {ups[0].to_user_string()} re-runs"
                continue
            st = self.status(k, year)
            if not st.current:
                out[k] = st.reason
        # non-subsettable multi-assets run whole
        for k in list(out):
            ad = self.defs.resolve_assets_def(k)
            if not ad.can_subset:
                for other in ad.keys:
                    if other in keys and other not in out:
                        out[other] = f"same step as {k.to_user_string()}"
        # ... and their downstream within the run
        changed = True
        while changed:
            changed = False
            for k in [k for k in order if k in keys and k not in out]:
                ups = [p for p in self.graph.get(k).parent_keys if p in out]
                if ups:
                    out[k] = f"upstream {ups[0].to_user_string()} re-runs"
                    changed = True
        return out
