"""``kspill`` command line.

* ``kspill synth``  write the synthetic customs universe (no Dagster import).
* ``kspill run``    materialise assets headless against a data directory, with a progress line
  per asset and partition; exits non-zero naming the failed asset, partition and check.
* ``kspill demo``   synth (if absent) + run everything + print where outputs and logs are.
"""

from __future__ import annotations

import argparse
import contextlib
import os
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
    except Exception:  # older syntax
        sel = AssetSelection.from_string(select)
    keys = sel.resolve(graph) & all_keys
    if not keys:
        raise SystemExit(f"kspill: --select {select!r} matches no materialisable asset")
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


def cmd_run(args) -> int:
    warnings.filterwarnings("ignore")
    data = Path(args.data).resolve() if args.data else default_data_dir()
    store = Path(args.store).resolve() if args.store else default_store_dir()
    if not data.is_dir():
        print(f"kspill: data directory {data} does not exist (run `kspill synth` or pass --data)", file=sys.stderr)
        return 2
    os.environ["KSPILL_DATA_DIR"] = str(data)
    os.environ["KSPILL_STORE_DIR"] = str(store)
    import yaml
    from dagster import materialize

    from kspill_pipeline.config import load_source_config
    from kspill_pipeline.definitions import build_definitions
    from kspill_pipeline.instance import cli_instance

    defs = build_definitions(data, store)
    source = load_source_config(data)
    years = parse_years(args.years, source.years.years())
    keys = resolve_selection(defs, args.select)
    stages = _stages(defs, keys)
    run_config = yaml.safe_load(Path(args.config).read_text(encoding="utf-8")) if args.config else {}
    run_config = dict(run_config or {})
    run_config.setdefault("loggers", {"console": {"config": {"log_level": args.log_level}}})
    assets = list(defs.assets or [])
    resources = dict(defs.resources or {})
    print(f"kspill run: data={data}\n            store={store}\n            years={years[0]}-{years[-1]} "
          f"({len(years)}), assets={len(keys)}", flush=True)
    failures: list[str] = []
    stack = contextlib.ExitStack()
    dask_cfg = ((run_config.get("resources") or {}).get("dask") or {}).get("config") or {}
    if _needs_dask(defs, keys) and not dask_cfg.get("scheduler_address"):
        # one LocalCluster for the whole CLI run (all years), instead of one per yearly run
        from kspill_pipeline.dask_resource import DaskResource

        base = DaskResource(**{k: v for k, v in dask_cfg.items() if k != "scheduler_address"})
        client = stack.enter_context(base.get_client())
        resources["dask"] = DaskResource(scheduler_address=client.scheduler.address)
        print(f"            dask: {base.describe()} (shared by all years)", flush=True)
        run_config = {k: v for k, v in run_config.items() if k != "resources"} | {
            "resources": {k: v for k, v in (run_config.get("resources") or {}).items() if k != "dask"}
        }
    with stack, cli_instance(ephemeral=args.ephemeral) as instance:
        def _go(sel, label, partition_key=None):
            t0 = time.perf_counter()
            res = materialize(
                assets, selection=list(sel), partition_key=partition_key, instance=instance,
                resources=resources, run_config=run_config, raise_on_error=False,
                tags={"kspill/cli": "run"},
            )
            return _report(res, label, t0)

        for unpart, yearly in stages:
            if unpart and not failures:
                failures += _go(unpart, "all")
            if yearly and (not failures or args.keep_going):
                for y in years:
                    failures += _go(yearly, str(y), partition_key=str(y))
                    if failures and not args.keep_going:
                        break
            if failures and not args.keep_going:
                break
    if failures:
        print("\nkspill run FAILED:", file=sys.stderr)
        for f in failures:
            print("  - " + f, file=sys.stderr)
        return 1
    print(f"\nOutputs: {store}  (hive layout <store>/<asset>/year=YYYY/part-0.parquet)")
    if not args.ephemeral:
        print(f"Run history and logs: {REPO_ROOT / '.dagster'}  (open them with `make ui`)")
    return 0


def cmd_synth(args) -> int:
    from kspill_pipeline.synthetic import generate

    t0 = time.perf_counter()
    out = generate(Path(args.out), scale=args.scale, seed=args.seed)
    print(f"kspill synth: scale={args.scale} seed={args.seed} -> {out} ({time.perf_counter() - t0:.1f}s)")
    return 0


def cmd_demo(args) -> int:
    data = default_data_dir()
    if not (data / "source.yaml").is_file():
        print(f"kspill demo: generating the synthetic demo universe in {data}", flush=True)
        from kspill_pipeline.synthetic import generate

        generate(data, scale="demo", seed=1)
    ns = argparse.Namespace(
        data=str(data), store=None, select=None, years=None, config=None, ephemeral=False, keep_going=False,
        log_level="WARNING",
    )
    return cmd_run(ns)


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

    d = sub.add_parser("demo", help="synth (if absent) + run every asset on the demo data")
    d.set_defaults(func=cmd_demo)

    from kspill_pipeline import standalone

    standalone.add_parser(sub).set_defaults(func=standalone.run)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
