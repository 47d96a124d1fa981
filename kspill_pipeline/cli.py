"""``kspill`` command line.

* ``kspill synth``  write the synthetic customs universe (no Dagster import).
* ``kspill run``    materialise assets headless against a data directory, with a progress line
  per asset and partition; exits non-zero naming the failed asset, partition and check.
* ``kspill backfill`` like ``run`` over a range of years, resumable: skips partitions that are
  materialised, passed their blocking checks and whose inputs are unchanged (lineage records).
* ``kspill demo``   synth (if absent) + run everything + print where outputs and logs are.
* ``kspill report`` the replication report (HTML + Markdown) from the materialised store.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import time
import warnings
from pathlib import Path

from kspill_pipeline.config import REPO_ROOT, default_data_dir, default_store_dir


def parse_years(spec: str | None, available: list[int]) -> list[int]:
    """``2002-2016``, ``2005``, ``2002,2004`` (or None = all available years)."""
    if not spec:
        return list(available)
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            a, b = part.split("-", 1)
            out.update(range(int(a), int(b) + 1))
        else:
            out.add(int(part))
    bad = sorted(y for y in out if y not in available)
    if bad:
        raise SystemExit(
            f"kspill: --years {spec}: year(s) {bad} not in the data source range "
            f"{available[0]}-{available[-1]}"
        )
    return sorted(out)


def to_selection_string(select: str) -> str:
    """Names, globs (``s000*``) and ``+`` lineage marks, comma-separated, or full Dagster syntax."""
    if ":" in select or " or " in select or " and " in select:
        return select
    parts = []
    for tok in [t.strip() for t in select.split(",") if t.strip()]:
        pre = "+" if tok.startswith("+") else ""
        post = "+" if tok.endswith("+") else ""
        name = tok.strip("+")
        parts.append(f'{pre}key:"{name}"{post}')
    return " or ".join(parts)


def resolve_selection(defs, select: str | None):
    from dagster import AssetSelection

    graph = defs.resolve_asset_graph()
    all_keys = {k for k in graph.get_all_asset_keys() if graph.get(k).is_materializable}
    if not select:
        return all_keys
    s = to_selection_string(select)
    try:
        from dagster._core.definitions.antlr_asset_selection.antlr_asset_selection import (
            AntlrAssetSelectionParser,
        )

        sel = AntlrAssetSelectionParser(s).asset_selection
    except Exception as antlr_error:  # older syntax
        try:
            sel = AssetSelection.from_string(select)
        except Exception:
            raise SystemExit(
                f"kspill: invalid --select {select!r}: {' '.join(str(antlr_error).split())}\n"
                "  use asset names or globs separated by commas (s000*,firm_export_history), or Dagster "
                "syntax such as 'group:trade or key:firm_city'") from None
    keys = sel.resolve(graph) & all_keys
    if not keys:
        raise SystemExit(f"kspill: --select {select!r} matches no materialisable asset")
    # a multi-asset that cannot run a subset of its outputs (clean_customs, quality_flows) runs
    # whole: selecting trade_clean (e.g. as an ancestor with "+") brings its sibling outputs along
    for k in list(keys):
        ad = defs.resolve_assets_def(k)
        if not ad.can_subset:
            keys |= set(ad.keys) & all_keys
    return keys


def _stages(defs, keys) -> list[tuple[set, set]]:
    """Order the selected keys into stages of (unpartitioned keys, yearly keys).

    A key's stage is the number of partitioned <-> unpartitioned switches on its longest upstream
    path, so yearly assets that need an all-years asset (e.g. a study-wide normalisation) run in a
    later stage than the years it reads. Within a stage, unpartitioned keys run once and yearly
    keys once per year.
    """
    graph = defs.resolve_asset_graph()
    memo: dict = {}

    def part(k) -> bool:
        return graph.has(k) and graph.get(k).partitions_def is not None

    def stage(k) -> int:
        if k in memo:
            return memo[k]
        best = 0
        for p in graph.get(k).parent_keys:
            if not graph.has(p) or not graph.get(p).is_materializable:
                continue
            best = max(best, stage(p) + (1 if part(p) != part(k) else 0))
        memo[k] = best
        return best

    n = max((stage(k) for k in keys), default=0)
    out = []
    for i in range(n + 1):
        ks = {k for k in keys if stage(k) == i}
        out.append(({k for k in ks if not part(k)}, {k for k in ks if part(k)}))
    return [st for st in out if st[0] or st[1]]


def _needs_dask(defs, keys) -> bool:
    graph = defs.resolve_asset_graph()
    for k in keys:
        assets_def = defs.resolve_assets_def(k)
        if "dask" in assets_def.required_resource_keys:
            return True
    return False


def _report(result, label: str, t0: float) -> list[str]:
    """Print progress lines for one materialize() result; return failure messages."""
    failures: list[str] = []
    for ev in result.get_asset_materialization_events():
        mat = ev.event_specific_data.materialization
        md = mat.metadata
        rows = md.get("dagster/row_count") or md.get("rows")
        rows_s = f"{int(rows.value):>10,} rows" if rows is not None else ""
        print(f"  [{label}] {mat.asset_key.to_user_string():<28} ok {rows_s}", flush=True)
    for ev in result.get_asset_check_evaluations():
        if not ev.passed and getattr(getattr(ev, "severity", None), "value", "ERROR") == "WARN":
            print(f"  [{label}] warning: {ev.asset_key.to_user_string()} check {ev.check_name}: "
                  f"{getattr(ev, 'description', '') or 'not passed'}", flush=True)
            continue
        if not ev.passed:
            failures.append(
                f"asset {ev.asset_key.to_user_string()} partition {label}: check {ev.check_name} FAILED"
                + (f" ({ev.description})" if getattr(ev, "description", None) else "")
            )
    for ev in result.all_events:
        if ev.event_type_value == "STEP_FAILURE":
            err = ev.event_specific_data.error
            while err is not None and getattr(err, "cause", None) is not None:
                err = err.cause  # the user-facing error is at the bottom of the chain
            msg = " ".join(err.message.strip().split()) if err and err.message else "step failed"
            failures.append(f"step {ev.step_key} partition {label}: {msg}")
    dt = time.perf_counter() - t0
    print(f"  [{label}] {'FAILED' if failures else 'done'} in {dt:.1f}s", flush=True)
    return failures


def _record_failed_steps(result, defs, sel, store_root: Path, year: int | None) -> None:
    """Mark the partition of every selected asset whose step failed (``io.store.record_failure``):
    its previous version stays on disk and readable, but gated consumers (``require_gates``: the
    regressions) refuse it until a run of that partition succeeds."""
    from kspill_pipeline.io import store

    errors: dict[str, str] = {}
    for ev in result.all_events:
        if ev.event_type_value == "STEP_FAILURE":
            err = ev.event_specific_data.error
            while err is not None and getattr(err, "cause", None) is not None:
                err = err.cause  # the user-facing error is at the bottom of the chain
            errors[ev.step_key] = " ".join(err.message.strip().split()) if err and err.message else "step failed"
    for k in sel if errors else ():
        msg = errors.get(defs.resolve_assets_def(k).op.name)
        if msg is not None:
            store.record_failure(store_root, k.path[-1], year, msg)


def validate_config(defs, run_config: dict, data: Path | None = None) -> list[str]:
    """Every problem of a run configuration, found before any asset runs (empty list = valid).

    1. Dagster's own schema check against the job of all assets: unknown keys (with the keys
       that are allowed) and wrong types, each with its path.
    2. The study/cleaning settings behind the config: each configurable resource with a
       ``model()`` (relatedness, s000) and each op config with a ``cleaning()`` (clean_customs,
       ref_hs_concordance) is built with the given values, so a value outside a switch's allowed
       set is reported with the key and the allowed values.
    """
    import inspect

    from dagster import DagsterInvalidConfigError, validate_run_config
    from pydantic import ValidationError

    from kspill_pipeline.io.freshness import format_validation_error

    problems: list[str] = []
    job = defs.resolve_implicit_global_asset_job_def()
    op_names = sorted(ad.op.name for ad in defs.resolve_asset_graph().assets_defs if ad.is_executable)
    unknown_ops = sorted(set(run_config.get("ops") or {}) - set(op_names))
    if unknown_ops:
        problems.append(f"ops: unknown op(s) {unknown_ops}; allowed: {', '.join(op_names)}")
    try:
        validate_run_config(job, run_config)
    except DagsterInvalidConfigError as e:
        problems += [_explain_config_error(job, err) for err in e.errors] or [str(e)]
    if problems:
        return problems  # the semantic checks below assume a well-formed config

    def explain(prefix: str, e: Exception) -> str:
        if isinstance(e, ValidationError):
            return format_validation_error(e, prefix=prefix)
        return f"{prefix}: {' '.join(str(e).split())}"

    for rk, base in (defs.resources or {}).items():
        if not callable(getattr(base, "model", None)):
            continue
        given = ((run_config.get("resources") or {}).get(rk) or {}).get("config") or {}
        fields = getattr(type(base), "model_fields", {}) or {}
        try:
            type(base)(**{**{f: getattr(base, f) for f in fields}, **given}).model()
        except (ValidationError, ValueError) as e:
            problems.append(explain(f"resources.{rk}.config", e))
    source_cleaning = None
    if data is not None:
        from kspill_pipeline.config import load_source_config

        source_cleaning = (load_source_config(data).model_extra or {}).get("cleaning")
    ops_cfg = run_config.get("ops") or {}
    for ad in defs.resolve_asset_graph().assets_defs:
        if not ad.is_executable or ad.op.name not in ops_cfg:
            continue
        fn = getattr(ad.op.compute_fn, "decorated_fn", None)
        ann = inspect.signature(fn).parameters.get("config") if fn is not None else None
        cls = getattr(ann, "annotation", None)
        if cls is None or not callable(getattr(cls, "cleaning", None)):
            continue
        try:
            cls(**((ops_cfg[ad.op.name] or {}).get("config") or {})).cleaning(source_cleaning)
        except (ValidationError, ValueError) as e:
            problems.append(explain(f"ops.{ad.op.name}.config", e))
    return problems


def _explain_config_error(job, err) -> str:
    """Dagster's config error as ``path.key: problem``; an unknown key lists the allowed keys."""
    path = [e.field_name for e in getattr(err.stack, "entries", []) if hasattr(e, "field_name")]
    field = getattr(err.error_data, "field_name", None)
    if field is not None and str(getattr(err.reason, "name", "")) == "FIELD_NOT_DEFINED":
        ct = job.run_config_schema.config_type
        try:
            for name in path:
                ct = ct.fields[name].config_type
                ct = getattr(ct, "inner_type", ct)  # Noneable wrapper
            allowed = ", ".join(sorted(ct.fields))
        except (AttributeError, KeyError):
            allowed = "?"
        where = ".".join(path) or "the top level"
        return f"{'.'.join(path + [field])}: unknown key; allowed keys under {where}: {allowed}"
    msg = " ".join(str(err.message).split())
    m = re.search(r"not in enum type Literal\[(.*)\] got (.*)$", msg)
    if m:  # a string switch typed as Literal: same wording as the pydantic checks
        opts = [o.strip() for o in m.group(1).split(",")]
        allowed = ", ".join(opts[:-1]) + " or " + opts[-1] if len(opts) > 1 else opts[0]
        return f"{'.'.join(path)}: Input should be {allowed} (got {m.group(2).strip()!r})"
    return f"{'.'.join(path) or '<config>'}: {msg}"


def _ops_for(run_config: dict, defs, sel) -> dict:
    """``run_config`` with ``ops:`` limited to the ops of the selected assets: a materialize call
    rejects config for ops outside its selection, and a stage runs a subset of the assets."""
    ops = run_config.get("ops")
    if not ops:
        return run_config
    names = {defs.resolve_assets_def(k).op.name for k in sel}
    return {**run_config, "ops": {k: v for k, v in ops.items() if k in names}}


class _Session:
    """What ``kspill run`` and ``kspill backfill`` share: data and store, Definitions, years,
    selected assets in stages, the validated run config, a Dask cluster started on first need and
    shared by every year, the Dagster instance, and the lineage records written after each run."""

    def __init__(self, args, command: str):
        warnings.filterwarnings("ignore")
        self.command = command
        self.data = Path(args.data).resolve() if args.data else default_data_dir()
        self.store = Path(args.store).resolve() if args.store else default_store_dir()
        if not self.data.is_dir():
            raise SystemExit(f"kspill: data directory {self.data} does not exist (run `kspill synth` or pass --data)")
        os.environ["KSPILL_DATA_DIR"] = str(self.data)
        os.environ["KSPILL_STORE_DIR"] = str(self.store)
        import yaml

        from kspill_pipeline.automation import Lineage
        from kspill_pipeline.config import load_source_config
        from kspill_pipeline.definitions import build_definitions

        self.defs = build_definitions(self.data, self.store)
        source = load_source_config(self.data)
        self.years = parse_years(args.years, source.years.years())
        self.keys = resolve_selection(self.defs, args.select)
        self.stages = _stages(self.defs, self.keys)
        run_config = {}
        if args.config:
            cfg_path = Path(args.config)
            if not cfg_path.is_file():
                raise SystemExit(f"kspill: --config {cfg_path}: file not found")
            run_config = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {}
            if not isinstance(run_config, dict):
                raise SystemExit(f"kspill: --config {cfg_path}: expected a mapping (ops:/resources:), "
                                 f"got {type(run_config).__name__}")
        run_config = dict(run_config)
        problems = validate_config(self.defs, run_config, self.data)
        if problems:
            raise SystemExit(f"kspill {command}: invalid configuration"
                             + (f" in {args.config}" if args.config else "") + " (nothing was run):\n  - "
                             + "\n  - ".join(problems))
        run_config.setdefault("loggers", {"console": {"config": {"log_level": args.log_level}}})
        self.run_config = run_config
        self.assets = list(self.defs.assets or [])
        self.resources = dict(self.defs.resources or {})
        self.lineage = Lineage(self.defs, self.store, self.data, run_config)
        self._args = args
        self._stack = contextlib.ExitStack()
        self._instance = None
        self._dask_started = False

    def header(self) -> None:
        y = self.years
        print(f"kspill {self.command}: data={self.data}\n{' ' * (len(self.command) + 8)}store={self.store}\n"
              f"{' ' * (len(self.command) + 8)}years={y[0]}-{y[-1]} ({len(y)}), assets={len(self.keys)}", flush=True)

    def __enter__(self):
        from kspill_pipeline.instance import cli_instance

        self._stack.__enter__()
        self._instance = self._stack.enter_context(cli_instance(ephemeral=self._args.ephemeral))
        return self

    def __exit__(self, *exc):
        self.lineage.save_cache()
        return self._stack.__exit__(*exc)

    def _ensure_dask(self, sel) -> None:
        """One LocalCluster for the whole CLI run (all years), instead of one per yearly run."""
        if self._dask_started or not _needs_dask(self.defs, sel):
            return
        self._dask_started = True
        rc = self.run_config
        dask_cfg = ((rc.get("resources") or {}).get("dask") or {}).get("config") or {}
        if dask_cfg.get("scheduler_address"):
            return
        from kspill_pipeline.dask_resource import DaskResource

        base = DaskResource(**{k: v for k, v in dask_cfg.items() if k != "scheduler_address"})
        client = self._stack.enter_context(base.get_client())
        self.resources["dask"] = DaskResource(scheduler_address=client.scheduler.address)
        print(f"{' ' * (len(self.command) + 8)}dask: {base.describe()} (shared by all years)", flush=True)
        self.run_config = {k: v for k, v in rc.items() if k != "resources"} | {
            "resources": {k: v for k, v in (rc.get("resources") or {}).items() if k != "dask"}
        }

    def go(self, sel, label: str, partition_key: str | None = None) -> list[str]:
        """Materialise ``sel`` (one partition or the unpartitioned assets), print progress, record
        the lineage of every partition written; return failure messages."""
        from dagster import materialize

        self._ensure_dask(sel)
        year = None if partition_key is None else int(partition_key)
        if year is not None:
            self.lineage.raw_fingerprint(year)  # fingerprint the raw files as they are read now
        t0 = time.perf_counter()
        res = materialize(
            self.assets, selection=list(sel), partition_key=partition_key, instance=self._instance,
            resources=self.resources, run_config=_ops_for(self.run_config, self.defs, sel), raise_on_error=False,
            tags={"kspill/cli": self.command},
        )
        failures = _report(res, label, t0)
        self.lineage.record_result(res, year)
        _record_failed_steps(res, self.defs, sel, self.store, year)
        return failures


def _finish(command: str, failures: list[str], sess: _Session, ephemeral: bool) -> int:
    if failures:
        print(f"\nkspill {command} FAILED:", file=sys.stderr)
        for f in failures:
            print("  - " + f, file=sys.stderr)
        return 1
    print(f"\nOutputs: {sess.store}  (hive layout <store>/<asset>/year=YYYY/part-0.parquet)")
    if not ephemeral:
        home = os.environ.get("DAGSTER_HOME") or str(REPO_ROOT / ".dagster")
        print(f"Run history and logs: {home}  (open them with `make ui`)")
    return 0


def cmd_run(args) -> int:
    sess = _Session(args, "run")
    sess.header()
    failures: list[str] = []
    with sess:
        for unpart, yearly in sess.stages:
            if unpart and not failures:
                failures += sess.go(unpart, "all")
            if yearly and (not failures or args.keep_going):
                for y in sess.years:
                    failures += sess.go(yearly, str(y), partition_key=str(y))
                    if failures and not args.keep_going:
                        break
            if failures and not args.keep_going:
                break
    return _finish("run", failures, sess, args.ephemeral)


def cmd_backfill(args) -> int:
    """Resumable: per stage and year, run only the partitions that are not current (see
    ``io.freshness``: materialised, checks passed, inputs unchanged since they were built) plus
    everything downstream of them in the same run; skip the rest."""
    sess = _Session(args, "backfill")
    sess.header()
    failures: list[str] = []
    n_run = n_skip = 0

    def step(keys, label: str, year: int | None) -> list[str]:
        nonlocal n_run, n_skip
        todo = sess.lineage.stale(keys, year, force=args.force)
        n_skip += len(keys) - len(todo)
        if not todo:
            print(f"  [{label}] current: {len(keys)} asset(s) skipped", flush=True)
            return []
        n_run += len(todo)
        why = "; ".join(f"{k.to_user_string()}: {r}" for k, r in list(todo.items())[:3])
        more = f"; +{len(todo) - 3} more" if len(todo) > 3 else ""
        print(f"  [{label}] run {len(todo)} of {len(keys)} ({why}{more})", flush=True)
        if args.dry_run:
            return []
        return sess.go(set(todo), label, partition_key=None if year is None else str(year))

    with sess:
        for unpart, yearly in sess.stages:
            if unpart and not failures:
                failures += step(unpart, "all", None)
            if yearly and (not failures or args.keep_going):
                for y in sess.years:
                    failures += step(yearly, str(y), y)
                    if failures and not args.keep_going:
                        break
            if failures and not args.keep_going:
                break
    verb = "would run" if args.dry_run else "ran"
    print(f"\nkspill backfill: {verb} {n_run} partition(s), skipped {n_skip} current partition(s)", flush=True)
    if args.dry_run:
        return 0
    return _finish("backfill", failures, sess, args.ephemeral)


def cmd_synth(args) -> int:
    from kspill_pipeline.synthetic import generate

    t0 = time.perf_counter()
    out = generate(Path(args.out), scale=args.scale, seed=args.seed)
    print(f"kspill synth: scale={args.scale} seed={args.seed} -> {out} ({time.perf_counter() - t0:.1f}s)")
    return 0


def cmd_demo(args) -> int:
    from kspill_pipeline.config import load_source_config
    from kspill_pipeline.synthetic import GENERATOR_VERSION, generate

    data = default_data_dir()
    exists = (data / "source.yaml").is_file()
    gen = ((load_source_config(data).model_extra or {}).get("generator") or {}) if exists else {}
    # regenerate only our own synthetic universe, and only when the generator changed
    if not exists or (gen and gen.get("version") != GENERATOR_VERSION):
        why = "generating" if not exists else f"regenerating (generator {gen.get('version')} -> {GENERATOR_VERSION})"
        print(f"kspill demo: {why} the synthetic demo universe in {data}", flush=True)
        generate(data, scale="demo", seed=1)
    ns = argparse.Namespace(
        data=str(data), store=None, select=None, years=None, config=None, ephemeral=False, keep_going=False,
        log_level="WARNING",
    )
    return cmd_run(ns)


def cmd_report(args) -> int:
    """Build ``report.html`` + ``report.md`` from the materialised store (``kspill_pipeline.report``).

    The configuration shown is resolved as ``kspill run`` resolves it: resource and op defaults,
    ``source.yaml`` and the optional ``--config`` (validated the same way; invalid -> exit 2)."""
    import yaml

    warnings.filterwarnings("ignore")
    data = Path(args.data).resolve() if args.data else default_data_dir()
    store = Path(args.store).resolve() if args.store else default_store_dir()
    out = Path(args.out).resolve() if args.out else store / "_report"
    if not store.is_dir():
        raise SystemExit(f"kspill report: store {store} does not exist (run `kspill run` first, or pass --store)")
    run_config: dict = {}
    if args.config:
        cfg_path = Path(args.config)
        if not cfg_path.is_file():
            raise SystemExit(f"kspill report: --config {cfg_path}: file not found")
        run_config = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {}
        if not isinstance(run_config, dict):
            raise SystemExit(f"kspill report: --config {cfg_path}: expected a mapping (ops:/resources:), "
                             f"got {type(run_config).__name__}")
    from kspill_pipeline.report import build_report

    resolved: dict = {}
    if (data / "source.yaml").is_file():
        os.environ["KSPILL_DATA_DIR"] = str(data)  # the definitions module builds its default Definitions on import
        os.environ["KSPILL_STORE_DIR"] = str(store)
        from kspill_pipeline.assets.report import config_in_force
        from kspill_pipeline.definitions import build_definitions

        defs = build_definitions(data, store)
        problems = validate_config(defs, run_config, data)
        if problems:
            raise SystemExit(f"kspill report: invalid configuration in {args.config} (no report written):\n  - "
                             + "\n  - ".join(problems))
        resolved = config_in_force(defs, store, data, run_config)
    else:
        print(f"kspill report: {data}/source.yaml not found: configuration and data fingerprint are not resolved",
              file=sys.stderr)
    t0 = time.perf_counter()
    res = build_report(store, data, out, run_config=run_config or None, config_file=args.config, **resolved)
    s = res["summary"]
    print(f"kspill report: {res['html']}\n               {res['md']}  ({time.perf_counter() - t0:.1f}s)")
    print(f"  assets materialised {s['assets_materialised']}/{s['assets_listed']}, figures {s['figures']}, "
          f"checks recorded {s['checks_recorded']}, FAILED {s['failed_checks']}"
          + (f", stale partitions {s['stale_partitions']}" if s["stale_partitions"] else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kspill", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("synth", help="write the synthetic customs universe")
    s.add_argument("--scale", choices=["tiny", "demo", "full"], default="demo")
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_synth)

    r = sub.add_parser("run", help="materialise assets headless")
    r.add_argument("--data", help="data directory (default: the embedded synthetic demo data)")
    r.add_argument("--store", help="output store directory (default: .kspill/store)")
    r.add_argument("--select", help="Dagster asset selection: names, globs (s000*), +lineage, or key:/group: syntax")
    r.add_argument("--years", help="e.g. 2002-2016, 2005 or 2002,2004 (default: all years of the source)")
    r.add_argument("--config", help="YAML run config (Dagster run_config form)")
    r.add_argument("--ephemeral", action="store_true", help="do not record runs in the .dagster instance")
    r.add_argument("--keep-going", action="store_true", help="continue with later years after a failure")
    r.add_argument("--log-level", default="WARNING", help="Dagster console log level (default WARNING)")
    r.set_defaults(func=cmd_run)

    b = sub.add_parser(
        "backfill",
        help="resumable: materialise what is missing or stale over a range of years, skip what is current",
        description="Like `kspill run`, but a partition that is already materialised, passed its blocking checks "
                    "and whose inputs (upstream partitions, raw files, configuration) are unchanged since it was "
                    "built is skipped. Re-run the same command after an interruption to complete what is missing.",
    )
    b.add_argument("--data", help="data directory (default: the embedded synthetic demo data)")
    b.add_argument("--store", help="output store directory (default: .kspill/store)")
    b.add_argument("--select", help="Dagster asset selection: names, globs (s000*), +lineage, or key:/group: syntax")
    b.add_argument("--years", help="e.g. 2002-2016, 2005 or 2002,2004 (default: all years of the source)")
    b.add_argument("--config", help="YAML run config (Dagster run_config form)")
    b.add_argument("--ephemeral", action="store_true", help="do not record runs in the .dagster instance")
    b.add_argument("--keep-going", action="store_true", help="continue with later years after a failure")
    b.add_argument("--force", action="store_true", help="re-run every selected partition (e.g. after a code change)")
    b.add_argument("--dry-run", action="store_true", help="print what would run and why, run nothing")
    b.add_argument("--log-level", default="WARNING", help="Dagster console log level (default WARNING)")
    b.set_defaults(func=cmd_backfill)

    d = sub.add_parser("demo", help="synth (if absent) + run every asset on the demo data")
    d.set_defaults(func=cmd_demo)

    rp = sub.add_parser(
        "report", help="build the replication report (HTML + Markdown) from the materialised store",
        description="A self-contained HTML page (opens offline) and a Markdown twin: failed checks first, data "
                    "coverage, cleaning accounting, check results, study tables beside the published numbers, "
                    "figures, configuration in force, package versions and the raw data fingerprint.",
    )
    rp.add_argument("--data", help="data directory (default: the embedded synthetic demo data)")
    rp.add_argument("--store", help="output store directory (default: .kspill/store)")
    rp.add_argument("--out", help="report folder (default: <store>/_report)")
    rp.add_argument("--config", help="YAML run config (Dagster run_config form) whose switches the report shows")
    rp.set_defaults(func=cmd_report)

    from kspill_pipeline import standalone

    standalone.add_parser(sub).set_defaults(func=standalone.run)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SystemExit as e:
        if isinstance(e.code, str):  # a usage error found before anything ran (years, selection, config)
            print(e.code, file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
