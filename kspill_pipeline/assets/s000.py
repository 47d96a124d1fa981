"""Study S000 assets (Liu & Zhu 2021): export history, firm controls, city marketization and the
firm x HS4 x year analysis panel. Thin wiring around ``studies.s000``.

Switches: the Dagster resource ``s000`` (``S000Settings``), one field per switch of
``studies.s000.S000Config`` (spec S000 section 7) plus ``preset`` (``paper`` = spec defaults,
``planted`` = phi from t-1 as the synthetic generator plants).
"""

from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import polars as pl
from dagster import (
    AssetExecutionContext,
    AssetIn,
    AssetKey,
    ConfigurableResource,
    MetadataValue,
    Output,
    TimeWindowPartitionMapping,
    asset,
)

from kspill_pipeline.assets.contract_checks import contract_check_specs, evaluate_contract
from kspill_pipeline.contracts.checks import CheckOutcome
from kspill_pipeline.assets.contract_checks import outcome_to_result, record_gate, require_gates
from kspill_pipeline.resources import KspillPaths
from kspill_pipeline.assets.relatedness import RelatednessSettings
from kspill_pipeline.config import RelatednessConfig
from kspill_pipeline.contracts.loader import load_contract
from kspill_pipeline.studies.s000 import S000Config

GROUP = "s000"


def _settings_class() -> type:
    """A ConfigurableResource with one field per S000Config switch: string choices as ``Literal``
    (an enum in the launchpad, rejected before launch), numbers and integer choices plain-typed;
    ``model()`` validates through S000Config, whose errors name the key and the allowed values."""
    ann: dict[str, Any] = {"preset": str}
    ns: dict[str, Any] = {"preset": "paper"}
    for name, f in S000Config.model_fields.items():
        d = f.default
        a = f.annotation
        if get_origin(a) is Literal and all(isinstance(x, str) for x in get_args(a)):
            ann[name] = a  # Dagster shows and validates string Literals as enums in the launchpad
        else:
            ann[name] = type(d) if isinstance(d, (bool, int, float, str)) else str
        ns[name] = d

    def model(self) -> S000Config:
        from kspill_pipeline.studies.s000 import PRESETS

        if self.preset not in PRESETS:
            raise ValueError(f"s000 preset {self.preset!r} unknown; allowed: {', '.join(PRESETS)}")
        base = S000Config.model_validate(PRESETS[self.preset])
        # fields left at the paper default keep the preset's value; others override it
        data = base.model_dump()
        for k in S000Config.model_fields:
            v = getattr(self, k)
            if v != S000Config.model_fields[k].default:
                data[k] = v
        return S000Config.model_validate(data)

    ns["__annotations__"] = ann
    ns["model"] = model
    ns["__doc__"] = "Switches of study S000 (spec section 7); see README 'Study S000'."
    return type("S000Settings", (ConfigurableResource,), ns)


S000Settings = _settings_class()


def _relatedness_matches(rel: RelatednessConfig, cfg: S000Config) -> bool:
    """The stored yearly densities were built exactly as S000 needs them."""
    return (rel.sample == "s000" and rel.product_level == "hs4" and rel.phi_basis == "firm"
            and rel.phi_variant == "min_conditional" and rel.phi_diagonal == "one"
            and rel.density_include_self == cfg.density_include_self
            and rel.processing_drop_level == cfg.processing_drop_level
            and rel.density_firm_threshold <= cfg.density_firm_threshold and cfg.phi_sample == "cleaned")


def _desc(name: str) -> str:
    return " ".join(load_contract(name).description.split())


def _cfg_meta(cfg: S000Config) -> MetadataValue:
    return MetadataValue.json(cfg.model_dump(mode="json"))


def build_s000_assets(years_def) -> list:
    history_window = TimeWindowPartitionMapping(start_offset=-200, end_offset=0,
                                                allow_nonexistent_upstream_partitions=True)
    lag_window = TimeWindowPartitionMapping(start_offset=-1, end_offset=0, allow_nonexistent_upstream_partitions=True)

    @asset(
        name="firm_export_history",
        group_name=GROUP,
        partitions_def=years_def,
        description=_desc("firm_export_history"),
        kinds={"polars", "parquet"},
        ins={"trade_clean": AssetIn(partition_mapping=history_window, metadata={"allow_missing_partitions": True})},
        check_specs=contract_check_specs("firm_export_history", ge=False),
    )
    def firm_export_history(context: AssetExecutionContext, trade_clean: pl.LazyFrame, s000: S000Settings):
        """Reads the raw per-year export presence of every year <= t (never an earlier history
        partition), so any backfill order and any single-year re-run give the same result."""
        from kspill_pipeline.studies import s000 as st

        cfg = s000.model()
        year = int(context.partition_key)
        seen = sorted(trade_clean.select(pl.col("year").unique()).collect()["year"].to_list())
        need = [y for y in range(cfg.base_year, year + 1) if y >= years_def.start.year]
        missing = sorted(set(need) - set(seen))
        if missing:
            raise ValueError(f"firm_export_history {year}: trade_clean partition(s) {missing} have no rows; "
                             "materialise them first")
        df = st.firm_export_history(st.export_presence(trade_clean, cfg), year, cfg)
        df = load_contract("firm_export_history").conform(df)
        yield Output(df, metadata={"rows": df.height, "new_products": int(df["is_new"].sum() or 0),
                                   "years_read": MetadataValue.json(seen), "config": _cfg_meta(cfg)})
        yield from evaluate_contract("firm_export_history", df, ge=False)

    @asset(
        name="s000_firm_controls",
        group_name=GROUP,
        partitions_def=years_def,
        description=_desc("s000_firm_controls"),
        kinds={"polars", "parquet"},
        ins={"trade_clean": AssetIn(), "firm_export_history": AssetIn()},
        check_specs=contract_check_specs("s000_firm_controls", ge=False),
    )
    def s000_firm_controls(context: AssetExecutionContext, trade_clean: pl.LazyFrame,
                           firm_export_history: pl.LazyFrame, s000: S000Settings):
        from kspill_pipeline.studies import s000 as st

        cfg = s000.model()
        year = int(context.partition_key)
        df = st.firm_controls(trade_clean, firm_export_history.collect(), year, cfg)
        df = load_contract("s000_firm_controls").conform(df)
        yield Output(df, metadata={"firms": df.height, "config": _cfg_meta(cfg)})
        yield from evaluate_contract("s000_firm_controls", df, ge=False)

    @asset(
        name="s000_city_marketization",
        group_name=GROUP,
        description=_desc("s000_city_marketization"),
        kinds={"polars", "parquet"},
        ins={"trade_clean": AssetIn(),
             "firm_import_density": AssetIn(metadata={"allow_missing_partitions": True}),
             "firm_city": AssetIn(metadata={"allow_missing_partitions": True})},
        check_specs=contract_check_specs("s000_city_marketization", ge=False),
    )
    def s000_city_marketization(context: AssetExecutionContext, trade_clean: pl.LazyFrame,
                                firm_import_density: pl.LazyFrame, firm_city: pl.LazyFrame, s000: S000Settings):
        from kspill_pipeline.studies import s000 as st

        cfg = s000.model()
        weights = None
        if cfg.mkt_quantile_base == "observations":
            obs = (firm_import_density.filter(pl.col("density_firm") > cfg.density_firm_threshold)
                   .join(firm_city.select("year", "firm_id", "city_code"), on=["year", "firm_id"])
                   .select("year", "city_code").collect())
            weights = st.observation_weights(obs)
        df = st.city_marketization(trade_clean, cfg, obs_weights=weights)
        df = load_contract("s000_city_marketization").conform(df)
        counts = df.group_by("mkt_group").agg(pl.col("city_code").n_unique().alias("cities")).sort("mkt_group")
        yield Output(df, metadata={"rows": df.height, "cities_by_group": MetadataValue.json(
            {r["mkt_group"]: r["cities"] for r in counts.to_dicts()}), "config": _cfg_meta(cfg)})
        yield from evaluate_contract("s000_city_marketization", df, ge=False)

    @asset(
        name="s000_panel",
        group_name=GROUP,
        partitions_def=years_def,
        description=_desc("s000_panel"),
        kinds={"polars", "parquet"},
        ins={
            "trade_clean": AssetIn(partition_mapping=lag_window, metadata={"allow_missing_partitions": True}),
            "product_relatedness": AssetIn(partition_mapping=lag_window, metadata={"allow_missing_partitions": True}),
            "firm_import_density": AssetIn(),
            "city_import_density": AssetIn(),
            "firm_city": AssetIn(partition_mapping=lag_window, metadata={"allow_missing_partitions": True}),
            "s000_firm_controls": AssetIn(),
            "s000_city_marketization": AssetIn(),
        },
        check_specs=contract_check_specs("s000_panel", extra=[
            ("panel_invariants", "density_city >= density_firm where it must hold, densities above the threshold, "
                                 "outcome varies"),
        ], ge=True),
    )
    def s000_panel(context: AssetExecutionContext, trade_clean: pl.LazyFrame, product_relatedness: pl.LazyFrame,
                   firm_import_density: pl.LazyFrame, city_import_density: pl.LazyFrame, firm_city: pl.LazyFrame,
                   s000_firm_controls: pl.LazyFrame, s000_city_marketization: pl.LazyFrame, s000: S000Settings,
                   relatedness: RelatednessSettings, paths: KspillPaths):
        from kspill_pipeline.studies import s000 as st

        cfg = s000.model()
        year = int(context.partition_key)
        lag_years = [year] + ([year - 1] if (cfg.phi_lag or cfg.import_dummy_lag)
                              and year - 1 >= years_def.start.year else [])
        require_gates(paths.store, [("trade_clean", lag_years), ("firm_city", [year]),
                                    ("firm_import_density", [year]), ("city_import_density", [year])])
        controls = s000_firm_controls.collect()
        mkt = s000_city_marketization.collect()
        if st.stored_densities_usable(cfg) and _relatedness_matches(relatedness.model(), cfg):
            cand = st.candidates_from_stored(firm_import_density, city_import_density, firm_city, year, cfg)
            source = "stored firm_import_density / city_import_density (phi of year t)"
        else:
            phi_year = year - cfg.phi_lag
            pr = product_relatedness.filter(pl.col("year") == phi_year).collect()
            if pr.height == 0:
                cand = None
                source = f"no product_relatedness for {phi_year}: first year of the window, empty panel"
            else:
                # phi rebuilt from trade_clean with the S000 sample (the relatedness resource may be
                # configured for another study); product_relatedness only tells whether t-1 exists
                cand = st.densities_for_year(trade_clean, year, cfg)
                source = f"recomputed from the S000 phi of {phi_year} (phi_lag={cfg.phi_lag})"
        contract = load_contract("s000_panel")
        if cand is None:
            df = contract.conform(pl.DataFrame(schema=contract.polars_schema()))
        else:
            df = contract.conform(st.build_panel_year(year, cand, trade_clean.filter(pl.col("year") == year),
                                                       controls, mkt, cfg))
        yield Output(df, metadata={
            "rows": df.height, "firms": df["firm_id"].n_unique(),
            "export_rate": float(df["export"].mean() or 0.0) if df.height else None,
            "density_source": source, "config": _cfg_meta(cfg),
        })
        results = evaluate_contract("s000_panel", df, ge=True)
        inv = st.panel_invariants(df, cfg) if df.height else {}
        ok = (df.height == 0 and cand is None) or (
            inv.get("below_threshold", 0) == 0 and inv.get("city_lt_firm", 0) in (0, -1)
            and not inv.get("no_outcome_variation", False)
        )
        results.append(outcome_to_result("s000_panel", CheckOutcome(
            "panel_invariants", bool(ok), "; ".join(f"{k}={v}" for k, v in inv.items()) or source,
            {k: (int(v) if isinstance(v, (bool, int)) else v) for k, v in inv.items()},
        )))
        yield from record_gate(paths.store, "s000_panel", year, results)

    def _vcov(cfg: S000Config):
        return "iid" if cfg.se_type == "mle_default" else {"CRV1": "firm_id"}

    def _render(paths: KspillPaths, name: str, tidy: pl.DataFrame, which: list[str], cfg: S000Config) -> dict:
        """Markdown, LaTeX and HTML renderings written beside the asset; returns their paths."""
        from kspill_pipeline.studies.s000_models import render_s000

        out_dir = paths.store / name / "rendered"
        out_dir.mkdir(parents=True, exist_ok=True)
        written = {}
        for w in which:
            for fmt, ext in (("markdown", "md"), ("latex", "tex"), ("html", "html")):
                f = out_dir / f"{w}.{ext}"
                tmp = out_dir / f".tmp-{w}.{ext}"
                opts = {"ame_method": cfg.ame_method} if w == "table1" else {}
                tmp.write_text(render_s000(tidy, w, fmt, **opts), encoding="utf-8")
                tmp.replace(f)
                written[f"{w}.{ext}"] = str(f)
        return written

    def _panel_years(context) -> list[int]:
        return sorted(int(k) for k in context.asset_partition_keys_for_input("s000_panel"))

    @asset(
        name="s000_table1",
        group_name=GROUP,
        description=_desc("s000_table1"),
        kinds={"pyfixest", "parquet"},
        ins={"s000_panel": AssetIn()},
        check_specs=contract_check_specs("s000_table1", ge=False),
        pool="kspill_heavy",
    )
    def s000_table1(context: AssetExecutionContext, s000_panel: pl.LazyFrame, s000: S000Settings,
                    paths: KspillPaths):
        """Pooled Probit, year and industry FE: columns (1)-(4) stepwise, (5) standardised, (6) AMEs
        (paper-style and interaction-aware, Ai-Norton cross-partial), plus the LPM robustness column.
        Refuses to run when any s000_panel year failed (or never ran) its blocking checks."""
        from kspill_pipeline.studies import s000_models as m

        cfg = s000.model()
        years = _panel_years(context)
        require_gates(paths.store, [("s000_panel", years), ("trade_clean", years)])
        panel = s000_panel.collect()
        t1 = m.table1(panel, vcov=_vcov(cfg), standardize_interaction=cfg.standardize_interaction,
                      method=cfg.estimator, information=cfg.se_information)
        tidy = m.tidy_all(t1.tidy, m.lpm(panel))
        df = load_contract("s000_table1").conform(tidy)
        files = _render(paths, "s000_table1", df, ["table1", "ame", "lpm"], cfg)
        yield Output(df, metadata={
            "n_obs": int(df.filter(pl.col("model") == "(4)")["n_obs"].max() or 0),
            "years": MetadataValue.json(years),
            "table1": MetadataValue.md(Path(files["table1.md"]).read_text(encoding="utf-8")),
            "lpm": MetadataValue.md(Path(files["lpm.md"]).read_text(encoding="utf-8")),
            "rendered": MetadataValue.json(files),
            "seconds": MetadataValue.json(t1.timings),
            "config": _cfg_meta(cfg),
        })
        yield from evaluate_contract("s000_table1", df, ge=False)

    @asset(
        name="s000_table2",
        group_name=GROUP,
        description=_desc("s000_table2"),
        kinds={"pyfixest", "parquet"},
        ins={"s000_panel": AssetIn()},
        check_specs=contract_check_specs("s000_table2", ge=False),
        pool="kspill_heavy",
    )
    def s000_table2(context: AssetExecutionContext, s000_panel: pl.LazyFrame, s000: S000Settings,
                    paths: KspillPaths):
        """Regional heterogeneity: East, West, high/mid/low marketization subsamples (full model).
        Subsamples that cannot be estimated (no variation left) are skipped and listed."""
        from kspill_pipeline.studies import s000_models as m

        cfg = s000.model()
        years = _panel_years(context)
        require_gates(paths.store, [("s000_panel", years), ("trade_clean", years)])
        t2 = m.table2(s000_panel.collect(), vcov=_vcov(cfg), on_empty="skip", method=cfg.estimator,
                      information=cfg.se_information)
        df = load_contract("s000_table2").conform(m.tidy_all(t2.tidy))
        files = _render(paths, "s000_table2", df, ["table2"], cfg)
        yield Output(df, metadata={
            "years": MetadataValue.json(years),
            "skipped_subsamples": MetadataValue.json(t2.skipped),
            "table2": MetadataValue.md(Path(files["table2.md"]).read_text(encoding="utf-8")),
            "rendered": MetadataValue.json(files),
            "config": _cfg_meta(cfg),
        })
        yield from evaluate_contract("s000_table2", df, ge=False)

    @asset(
        name="s000_replication",
        group_name=GROUP,
        description=_desc("s000_replication"),
        kinds={"polars", "markdown"},
        ins={"s000_table1": AssetIn(), "s000_table2": AssetIn()},
        check_specs=contract_check_specs("s000_replication", ge=False),
    )
    def s000_replication(context: AssetExecutionContext, s000_table1: pl.LazyFrame, s000_table2: pl.LazyFrame,
                         s000: S000Settings, paths: KspillPaths):
        """Replication page: our Tables 1-2 beside the published ones, signs and scale-free relations
        (studies/s000_replication.py). Written to ``<store>/s000_replication/replication.md``."""
        from kspill_pipeline.studies import s000_replication as rep

        cfg = s000.model()
        tidy = pl.concat([s000_table1.collect(), s000_table2.collect()], how="vertical_relaxed")
        source = paths.source()
        synthetic = bool((source.model_extra or {}).get("generator"))
        years = sorted(int(d.name.split("=", 1)[1]) for d in (paths.store / "s000_panel").glob("year=*"))
        t2_meta = context.instance.get_latest_materialization_event(AssetKey("s000_table2"))
        skipped = {}
        if t2_meta is not None and t2_meta.asset_materialization is not None:
            sk = t2_meta.asset_materialization.metadata.get("skipped_subsamples")
            skipped = dict(sk.value) if sk is not None and isinstance(sk.value, dict) else {}
        page = rep.replication_page(tidy, synthetic=synthetic, data_label=f"{source.name} ({paths.data})",
                                    years=years, switches=cfg.model_dump(mode="json"), skipped=skipped)
        out_dir = paths.store / "s000_replication"
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / ".tmp-replication.md"
        tmp.write_text(page, encoding="utf-8")
        tmp.replace(out_dir / "replication.md")
        df = load_contract("s000_replication").conform(rep.comparison(tidy))
        yield Output(df, metadata={
            "published_cells": df.height, "signs_agree": int(df["sign_agrees"].sum() or 0),
            "synthetic_data": synthetic, "page": MetadataValue.md(page),
            "path": MetadataValue.path(str(out_dir / "replication.md")),
        })
        yield from evaluate_contract("s000_replication", df, ge=False)

    return [firm_export_history, s000_firm_controls, s000_city_marketization, s000_panel, s000_table1, s000_table2,
            s000_replication]
