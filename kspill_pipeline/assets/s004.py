"""Study S004 assets (Zhao, Ban, Li & Liu 2022; issue 6). Thin wiring around ``studies.s004``,
``studies.s004_models`` and ``studies.s004_placebo``.

Graph (group ``s004``)::

    s004_companion (raw: companion/s004/*.csv|parquet, contracts s004_in_*)
        + quality_flow[all years] ─► s004_city_year (vagg, controls, instruments, mechanisms)
    quality_city_hs4[all] + s004_city_year ─► s004_table2, _table3, _table6, _table8, s004_placebo
    + quality_city_hs6[all] ─► s004_table4;  + quality_decomposition[all] ─► s004_table7
    + quality_normalised[all] + quality_flow[all] (trade mode) ─► s004_table5
    s004_table2 ... s004_table8 ─► s004_replication

Every regression asset refuses to run when a year of its quality input or ``s004_city_year`` has a
failed or missing blocking check (``require_gates``, as in study S000). Switches: the resource
``s004`` (:class:`S004Settings`): every model switch of ``S004Config`` and index switch of
``S004IndexSwitches`` (spec section 8), string choices as enums in the launchpad.
"""

import base64
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import polars as pl
from dagster import (
    AssetExecutionContext,
    AssetIn,
    AssetSpec,
    ConfigurableResource,
    MetadataValue,
    Output,
    asset,
)

from kspill_pipeline.assets.contract_checks import contract_check_specs, evaluate_contract, record_gate, require_gates
from kspill_pipeline.contracts.loader import load_contract
from kspill_pipeline.io.store import write_file_atomic
from kspill_pipeline.resources import KspillPaths
from kspill_pipeline.studies.s004_indices import S004IndexSwitches
from kspill_pipeline.studies.s004_models import S004Config

GROUP = "s004"


def _settings_class() -> type:
    ann: dict[str, Any] = {}
    ns: dict[str, Any] = {}
    for model in (S004Config, S004IndexSwitches):
        for name, f in model.model_fields.items():
            d, a = f.default, f.annotation
            if get_origin(a) is Literal and all(isinstance(x, str) for x in get_args(a)):
                ann[name] = a
            elif isinstance(d, (bool, int, float, str)):
                ann[name] = type(d)
            elif isinstance(d, tuple) and all(isinstance(x, str) for x in d):
                ann[name] = list[str]
                d = list(d)
            else:
                continue
            ns[name] = d

    def models(self) -> tuple[S004Config, S004IndexSwitches]:
        from kspill_pipeline.studies.s004_models import make_config

        mk = {k: getattr(self, k) for k in S004Config.model_fields if k in type(self).model_fields}
        for k in ("controls", "firm_controls"):
            if k in mk:
                mk[k] = tuple(mk[k])
        ix = {k: getattr(self, k) for k in S004IndexSwitches.model_fields if k in type(self).model_fields}
        return make_config(**mk), S004IndexSwitches.model_validate(ix)

    def model(self) -> S004Config:  # validated by `kspill run --config` before any asset runs
        return self.models()[0]

    ns["__annotations__"] = ann
    ns["models"] = models
    ns["model"] = model
    ns["__doc__"] = "Switches of study S004 (spec section 8); see README 'Study S004'."
    return type("S004Settings", (ConfigurableResource,), ns)


S004Settings = _settings_class()


def _desc(name: str) -> str:
    return " ".join(load_contract(name).description.split())


def _years(context, name: str) -> list[int]:
    return sorted(int(k) for k in context.asset_partition_keys_for_input(name))



def _render(paths: KspillPaths, name: str, which: str, tidy: pl.DataFrame) -> dict[str, str]:
    from kspill_pipeline.studies.s004_models import render_s004

    out = {}
    for fmt, ext in (("markdown", "md"), ("latex", "tex"), ("html", "html")):
        f = paths.store / name / "rendered" / f"{which}.{ext}"
        write_file_atomic(f, render_s004(tidy, which, fmt).encode("utf-8"))
        out[f"{which}.{ext}"] = str(f)
    return out


def build_s004_assets() -> list:
    companion = AssetSpec(
        "s004_companion", group_name=GROUP, kinds={"csv", "parquet"},
        description="Researcher-supplied S004 inputs beyond customs, one file per table in "
                    "<data>/companion/s004/ (contracts data_contracts/s004_in_*.yaml; README 'Study S004').",
    )

    @asset(
        name="s004_city_year",
        group_name=GROUP,
        description=_desc("s004_city_year"),
        kinds={"polars", "parquet"},
        deps=[companion],
        ins={"quality_flow": AssetIn()},
        check_specs=contract_check_specs("s004_city_year", ge=False),
    )
    def s004_city_year(context: AssetExecutionContext, quality_flow: pl.LazyFrame, s004: S004Settings,
                       paths: KspillPaths):
        """vagg (Eq. 22) and alternatives, deflated controls, historical instruments, market
        integration, congestion, spe/div, agg, coa, d_coa and location dummies per city-year."""
        from kspill_pipeline.io.s004_inputs import read_s004_inputs
        from kspill_pipeline.studies import s004 as st

        _, sw = s004.models()
        years = _years(context, "quality_flow")
        require_gates(paths.store, [("quality_flow", years)])
        inputs = read_s004_inputs(paths.data)
        exports = st.export_values_city_hs(quality_flow.select("year", "city_code", "hs6", "value_usd"))
        cy, rep = st.city_year_frame(inputs, exports, sw)
        df = load_contract("s004_city_year").conform(cy)
        yield Output(df, metadata={"rows": df.height, "cities": rep["cities"],
                                   "nonnull": MetadataValue.json(rep["nonnull"]),
                                   "null_measures": MetadataValue.json(rep["null_measures"]),
                                   "dropped_without_vagg": MetadataValue.json(rep["dropped_without_vagg"]),
                                   "switches": MetadataValue.json(rep["switches"])})
        res = evaluate_contract("s004_city_year", df, ge=False)
        record_gate(paths.store, "s004_city_year", None, res)
        yield from res

    def _panel(context, paths: KspillPaths, quality: pl.LazyFrame, input_name: str, city_year: pl.LazyFrame,
               product: str = "hs4") -> tuple[pl.DataFrame, dict]:
        from kspill_pipeline.studies.s004_models import build_analysis_panel

        years = _years(context, input_name)
        require_gates(paths.store, [(input_name, years), ("s004_city_year", [None])])
        return build_analysis_panel(quality.collect(), city_year.collect(), product=product)

    def _table_asset(which: str, extra_ins: dict[str, AssetIn], run):
        name = f"s004_{which}"

        @asset(
            name=name,
            group_name=GROUP,
            description=_desc(name),
            kinds={"pyfixest", "parquet"},
            ins={"s004_city_year": AssetIn(), **extra_ins},
            check_specs=contract_check_specs(name, ge=False),
            pool="kspill_heavy",
        )
        def _table(context: AssetExecutionContext, s004: S004Settings, paths: KspillPaths, **ins):
            cfg, _ = s004.models()
            res, coverage = run(context, paths, cfg, ins)
            df = load_contract(name).conform(res.tidy.select(load_contract(name).polars_schema().names()))
            files = _render(paths, name, which, df)
            meta = {"rows": df.height, "columns": MetadataValue.json(sorted(set(df["model"].to_list()))),
                    "skipped": MetadataValue.json(getattr(res, "skipped", {}) or {}),
                    which: MetadataValue.md(Path(files[f"{which}.md"]).read_text(encoding="utf-8")),
                    "rendered": MetadataValue.json(files), "coverage": MetadataValue.json(coverage)}
            if "weak_iv" in df.columns and df["weak_iv"].any():
                meta["weak_instruments"] = MetadataValue.json(
                    df.filter(pl.col("weak_iv").fill_null(False)).select("model").unique().to_series().to_list())
            yield Output(df, metadata=meta)
            yield from evaluate_contract(name, df, ge=False)

        return _table

    hs4_in = {"quality_city_hs4": AssetIn()}

    def run_t2(context, paths, cfg, ins):
        from kspill_pipeline.studies import s004_models as m

        p, cov = _panel(context, paths, ins["quality_city_hs4"], "quality_city_hs4", ins["s004_city_year"])
        return m.table2(p, cfg), cov

    def run_t3(context, paths, cfg, ins):
        from kspill_pipeline.studies import s004_models as m

        p, cov = _panel(context, paths, ins["quality_city_hs4"], "quality_city_hs4", ins["s004_city_year"])
        return m.table3(p, cfg), cov

    def run_t4(context, paths, cfg, ins):
        from kspill_pipeline.studies import s004_models as m

        p, cov = _panel(context, paths, ins["quality_city_hs4"], "quality_city_hs4", ins["s004_city_year"])
        p6, cov6 = _panel(context, paths, ins["quality_city_hs6"], "quality_city_hs6", ins["s004_city_year"],
                          product="hs6")
        return m.table4(p, cfg, hs6_panel=p6), {"hs4": cov, "hs6": cov6}

    def run_t5(context, paths, cfg, ins):
        from kspill_pipeline.io.s004_inputs import read_s004_input
        from kspill_pipeline.studies import s004_models as m

        years = _years(context, "quality_normalised")
        require_gates(paths.store, [("quality_normalised", years), ("quality_flow", years),
                                    ("s004_city_year", [None])])
        flows = ins["quality_normalised"].select("year", "firm_id", "city_code", "hs4", "hs6", "partner_iso3",
                                                 "value_usd", "rqua").join(
            ins["quality_flow"].select("year", "firm_id", "hs6", "partner_iso3", "processing_share"),
            on=["year", "firm_id", "hs6", "partner_iso3"], how="left").collect()
        bec = read_s004_input(paths.data, "bec_map")
        subs, rep = m.subsample_quality(flows, bec_map=bec, trade_mode_rule=cfg.trade_mode_rule)
        cy = ins["s004_city_year"].collect()
        panels = {}
        for k, q in subs.items():
            panels[k] = m.build_analysis_panel(q, cy)[0] if q is not None and q.height else None
        return m.table5(panels, cfg), rep

    def run_t6(context, paths, cfg, ins):
        from kspill_pipeline.studies import s004_models as m

        p, cov = _panel(context, paths, ins["quality_city_hs4"], "quality_city_hs4", ins["s004_city_year"])
        return m.table6(p, cfg), cov

    def run_t7(context, paths, cfg, ins):
        from kspill_pipeline.studies import s004_models as m

        d = ins["quality_decomposition"].filter(pl.col("status") == "ok")
        p, cov = _panel(context, paths, d, "quality_decomposition", ins["s004_city_year"])
        return m.table7(p, cfg), cov

    def run_t8(context, paths, cfg, ins):
        from kspill_pipeline.studies import s004_models as m

        p, cov = _panel(context, paths, ins["quality_city_hs4"], "quality_city_hs4", ins["s004_city_year"])
        return m.table8(p, ins["s004_city_year"].collect(), cfg), cov

    tables = [
        _table_asset("table2", hs4_in, run_t2),
        _table_asset("table3", hs4_in, run_t3),
        _table_asset("table4", {**hs4_in, "quality_city_hs6": AssetIn()}, run_t4),
        _table_asset("table5", {"quality_normalised": AssetIn(), "quality_flow": AssetIn()}, run_t5),
        _table_asset("table6", hs4_in, run_t6),
        _table_asset("table7", {"quality_decomposition": AssetIn()}, run_t7),
        _table_asset("table8", hs4_in, run_t8),
    ]

    @asset(
        name="s004_placebo",
        group_name=GROUP,
        description=_desc("s004_placebo"),
        kinds={"pyfixest", "matplotlib"},
        ins={"s004_city_year": AssetIn(), "quality_city_hs4": AssetIn()},
        check_specs=contract_check_specs("s004_placebo", ge=False),
        pool="kspill_heavy",
    )
    def s004_placebo(context: AssetExecutionContext, s004_city_year: pl.LazyFrame, quality_city_hs4: pl.LazyFrame,
                     s004: S004Settings, paths: KspillPaths):
        """Permutation placebo of Table 2 (4): ``placebo_replications`` reshuffles of vagg (scheme
        ``placebo_permutation``), FE demeaning of y and controls reused; histogram PNG with the real
        estimate, share of placebo |t| at or above the real one."""
        from kspill_pipeline.studies.s004_placebo import permutation_placebo

        cfg, _ = s004.models()
        p, cov = _panel(context, paths, quality_city_hs4, "quality_city_hs4", s004_city_year)
        res = permutation_placebo(p, cfg, n_workers=1)
        df = load_contract("s004_placebo").conform(res.draws)
        png = paths.store / "s004_placebo" / "figure.png"
        write_file_atomic(png, res.png)
        b64 = base64.b64encode(res.png).decode("ascii")
        s = res.summary
        yield Output(df, metadata={
            "figure": MetadataValue.md(
                f"**Permutation placebo** ({s['n_replications']} draws, {s['scheme']}): real estimate "
                f"{s['real_estimate']:.4g} (t = {s['real_t']:.2f}); share of placebo |t| >= |t_real|: "
                f"{s['share_abs_t_ge_real']:.3f}\n\n![placebo](data:image/png;base64,{b64})"),
            "figure_path": MetadataValue.path(str(png)),
            "summary": MetadataValue.json(s), "timings": MetadataValue.json(res.timings),
        })
        yield from evaluate_contract("s004_placebo", df, ge=False)

    table_ins = {f"s004_table{t}": AssetIn() for t in range(2, 9)}

    @asset(
        name="s004_replication",
        group_name=GROUP,
        description=_desc("s004_replication"),
        kinds={"polars", "markdown"},
        ins={**table_ins, "s004_placebo": AssetIn()},
        check_specs=contract_check_specs("s004_replication", ge=False),
    )
    def s004_replication(context: AssetExecutionContext, s004: S004Settings, paths: KspillPaths, **ins):
        """Replication page: our Tables 2-8 beside the published ones, placebo summary
        (studies/s004_replication.py). Written to ``<store>/s004_replication/replication.md``."""
        import numpy as np
        from dagster import AssetKey

        from kspill_pipeline.studies import s004_replication as rep

        cfg, sw = s004.models()
        tidy = pl.concat([ins[k].collect() for k in table_ins], how="vertical_relaxed")
        draws = ins["s004_placebo"].collect()
        real = tidy.filter((pl.col("table") == "table2") & (pl.col("model") == "(4)") & (pl.col("term") == "vagg")
                           & (pl.col("kind") == "coef"))
        placebo = None
        if draws.height and real.height:
            t_real = float(real["estimate"][0] / real["std_error"][0])
            pub = __import__("kspill_pipeline.studies.s004_models", fromlist=["load_published"]).load_published()
            placebo = {"n_replications": draws.height, "scheme": cfg.placebo_permutation,
                       "mean_estimate": float(draws["estimate"].mean()), "mean_t": float(draws["t_stat"].mean()),
                       "real_estimate": float(real["estimate"][0]), "real_t": t_real,
                       "share_abs_t_ge_real": float(np.mean(np.abs(draws["t_stat"].to_numpy()) >= abs(t_real))),
                       "published_mean_estimate": (pub.get("placebo") or {}).get("mean_coefficient"),
                       "published_mean_t": (pub.get("placebo") or {}).get("mean_t")}
        skipped = {}
        for k in table_ins:
            ev = context.instance.get_latest_materialization_event(AssetKey(k))
            if ev is not None and ev.asset_materialization is not None:
                sk = ev.asset_materialization.metadata.get("skipped")
                if sk is not None and isinstance(sk.value, dict) and sk.value:
                    skipped[k.replace("s004_", "")] = dict(sk.value)
        source = paths.source()
        synthetic = bool((source.model_extra or {}).get("generator"))
        page = rep.replication_page(tidy, synthetic=synthetic, data_label=f"{source.name} ({paths.data})",
                                    switches={**cfg.model_dump(mode="json"), **sw.model_dump(mode="json")},
                                    placebo=placebo, skipped=skipped)
        f = paths.store / "s004_replication" / "replication.md"
        write_file_atomic(f, page.encode("utf-8"))
        df = load_contract("s004_replication").conform(rep.comparison(tidy))
        yield Output(df, metadata={"published_cells": df.height, "signs_agree": int(df["sign_agrees"].sum() or 0),
                                   "synthetic_data": synthetic, "page": MetadataValue.md(page),
                                   "path": MetadataValue.path(str(f))})
        yield from evaluate_contract("s004_replication", df, ge=False)

    return [companion, s004_city_year, *tables, s004_placebo, s004_replication]
