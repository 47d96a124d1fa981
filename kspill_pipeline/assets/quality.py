"""Export quality assets (issue 5; spec S004 Eqs. 18-21 and 23). Thin wiring around
``compute.quality`` and ``compute.decomposition``.

Graph (group ``quality``)::

    trade_clean[t] ─► quality_flow[t] + quality_flow_quarantine[t]  (flows, p, q, sigma)
    quality_flow[all years] ─► quality_estimates (unpartitioned: Eqs. 18-19 pooled over years,
                                                  one HS6 effect per product as in Eq. 18)
    quality_estimates ─► quality_bounds (unpartitioned: min/max of qua per HS6, Eq. 20)
    quality_flow[t] + quality_estimates + quality_bounds ─► quality_normalised[t] (rqua)
    quality_normalised[t] ─► quality_firm_hs6[t], quality_city_hs6[t], quality_city_hs4[t] (Eq. 21)
    quality_normalised[t-1, t] ─► quality_decomposition[t] (Melitz-Polanec, Eq. 23)

The estimation and the study-wide normalisation are explicit unpartitioned assets that read every
year, so a backfill (any order) computes them once after all ``quality_flow`` years and every
``quality_normalised`` year after them; re-running one year of ``quality_flow`` makes the estimates,
the bounds and every normalised year stale, as the maths says (Eq. 18 pools the years).

Switches: the Dagster resource ``quality`` (:class:`QualitySettings`), one field per switch of
``compute.quality.QualityConfig`` plus the elasticity table, the decomposition unit and the
coverage threshold of the sigma merge. Empty strings mean "from ``source.yaml`` (section
``quality:``), else the spec default".
"""


from typing import Any, Literal

import polars as pl
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetIn,
    AssetOut,
    ConfigurableResource,
    MetadataValue,
    Output,
    TimeWindowPartitionMapping,
    asset,
    multi_asset,
)

from kspill_pipeline.assets.contract_checks import (
    contract_check_specs,
    evaluate_contract,
    outcome_to_result,
    record_gate,
    require_gates,
)
from kspill_pipeline.contracts.checks import CheckOutcome
from kspill_pipeline.contracts.loader import load_contract
from kspill_pipeline.resources import KspillPaths

GROUP = "quality"


def _desc(name: str) -> str:
    return " ".join(load_contract(name).description.split())


class QualitySettings(ConfigurableResource):
    """Switches of the export quality index (README "Export quality"); defaults = spec S004."""

    variant: Literal["A_ksw_sigma_imposed", "B_2sls_loo_price_iv"] = "A_ksw_sigma_imposed"
    fixed_effects: Literal["hs6+dest_year", "hs6_year+dest_year"] = "hs6+dest_year"
    grouping: Literal["pooled", "by_hs2", "by_hs3", "by_hs6"] = "pooled"
    singletons: Literal["drop", "keep"] = "drop"
    gdp_control: Literal["if_supplied", "required", "off"] = "if_supplied"
    rqua_window: Literal["all_years", "per_year"] = "all_years"
    rqua_degenerate: Literal["null", "midpoint"] = "null"
    decomp_unit: Literal["hs6", "flow"] = "hs6"
    min_obs_per_hs6: int = 100
    trim_lower: float = 1.0
    trim_upper: float = 99.0
    trim: bool = True
    trim_scope: Literal["hs6_year", "hs6"] = "hs6_year"
    drop_intermediaries: bool = True
    intermediary_keywords_from_cleaning: bool = False
    exclude_hs2: list[str] = [f"{i:02d}" for i in range(1, 28)]
    trade_mode_classes: list[str] = ["ordinary", "processing", "other"]
    city_assignment: Literal["main_export_city", "firm_city_table"] = "main_export_city"
    study_vintage: str = "HS2007"
    sigma_file: str = ""  # "" = source.yaml quality.sigma_file, else companion/sigma_hs3.csv
    sigma_vintage: str = ""  # "" = source.yaml quality.sigma_vintage, else HS1992 (Broda-Weinstein)
    sigma_country: str = ""  # "" = source.yaml quality.sigma_country, else USA (used only if the table has countries)
    sigma_concordance_mode: Literal["single_target", "value_split"] = "single_target"
    min_sigma_coverage: float = 0.9  # share of export value with a usable sigma (check, WARN below)

    def source_section(self, paths: KspillPaths | None) -> dict[str, Any]:
        if paths is None:
            return {}
        return dict((paths.source().model_extra or {}).get("quality") or {})

    def effective(self, paths: KspillPaths | None = None) -> "QualitySettings":
        src = self.source_section(paths)
        # a source.yaml `quality:` section may set any switch the run leaves at its default (e.g.
        # min_obs_per_hs6 for the small synthetic universes); the run config always wins
        unknown = set(src) - set(type(self).model_fields)
        if unknown:
            raise ValueError(f"source.yaml quality: unknown key(s) {sorted(unknown)}; "
                             f"allowed: {', '.join(type(self).model_fields)}")
        me = self.model_copy(update={k: v for k, v in src.items()
                                     if getattr(self, k) == type(self).model_fields[k].default})
        return me

    def model(self, paths: KspillPaths | None = None):
        """QualityConfig (``paths``: read the ``quality:`` section of source.yaml for the sigma
        table defaults); errors name the key and the allowed values (pydantic)."""
        from kspill_pipeline.compute.quality import QualityConfig

        me = self.effective(paths)
        data: dict[str, Any] = {
            k: getattr(me, k) for k in (
                "variant", "fixed_effects", "grouping", "singletons", "gdp_control", "rqua_window",
                "rqua_degenerate", "min_obs_per_hs6", "trim_scope", "drop_intermediaries", "exclude_hs2",
                "trade_mode_classes", "city_assignment", "study_vintage", "sigma_concordance_mode")
        }
        data["trim_percentiles"] = (me.trim_lower, me.trim_upper) if me.trim else None
        if me.intermediary_keywords_from_cleaning:
            data["intermediary_keywords"] = None
        data["sigma_vintage"] = me.sigma_vintage or "HS1992"
        data["sigma_country"] = me.sigma_country or "USA"
        if me.decomp_unit not in ("hs6", "flow"):
            raise ValueError(f"quality switch 'decomp_unit' = {me.decomp_unit!r} is not allowed; "
                             "allowed values: 'hs6', 'flow'")
        return QualityConfig.model_validate(data)

    def sigma_path(self, paths: KspillPaths):
        from pathlib import Path

        f = self.sigma_file or self.source_section(paths).get("sigma_file") or "companion/sigma_hs3.csv"
        p = Path(f)
        return p if p.is_absolute() else paths.data / p


def read_sigma_table(path) -> pl.DataFrame:
    """The user's elasticity table (contract ``elasticity_sigma``): CSV or parquet, codes as strings."""
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"elasticity table {p} not found: set the quality resource's sigma_file (README 'Export quality')")
    if p.suffix == ".parquet":
        df = pl.read_parquet(p)
    else:
        df = pl.read_csv(p, infer_schema=False)
    amap = load_contract("elasticity_sigma").alias_map()
    ren = {c: amap[c.strip().lower()] for c in df.columns if c.strip().lower() in amap and amap[c.strip().lower()] != c}
    df = df.rename(ren)
    keep = [c for c in ("country_code", "hs3", "sigma") if c in df.columns]
    return df.select(keep)


def _num(v: Any) -> Any:
    return v if isinstance(v, (int, float, str, bool)) or v is None else MetadataValue.json(v)


def _extra_check(asset_key: str, name: str, passed: bool, description: str, meta: dict, *,
                 warn: bool = False) -> AssetCheckResult:
    return AssetCheckResult(
        asset_key=asset_key, check_name=name, passed=bool(passed),
        severity=AssetCheckSeverity.WARN if warn else AssetCheckSeverity.ERROR,
        description=description, metadata={k: _num(v) for k, v in meta.items() if v is not None},
    )


def _prov_gdp(paths: KspillPaths, cfg) -> pl.DataFrame | None:
    """ln provincial real GDP (Eq. 18 control) from the S004 input prov_gdp when the data supplies
    it (companion/s004/prov_gdp.csv|parquet); None otherwise or with gdp_control off."""
    if cfg.gdp_control == "off":
        return None
    from kspill_pipeline.io.s004_inputs import find_input_file, read_s004_input
    from kspill_pipeline.studies.s004_indices import prov_ln_gdp_real

    if find_input_file(paths.data, "prov_gdp") is None:
        if cfg.gdp_control == "required":
            raise ValueError("quality: gdp_control='required' but no companion/s004/prov_gdp table was found")
        return None
    return prov_ln_gdp_real(read_s004_input(paths.data, "prov_gdp"))


FLOW_CHECKS = [
    ("flow_accounting", "trade_clean export rows = rows in kept flows + quarantined rows; same for value"),
]


def build_quality_assets(years_def) -> list:
    lag_window = TimeWindowPartitionMapping(start_offset=-1, end_offset=0, allow_nonexistent_upstream_partitions=True)

    @multi_asset(
        name="quality_flows",
        outs={
            "quality_flow": AssetOut(description=_desc("quality_flow"), group_name=GROUP,
                                     kinds={"polars", "parquet"}, owners=["team:kspill"]),
            "quality_flow_quarantine": AssetOut(description=_desc("quality_flow_quarantine"), group_name=GROUP,
                                                kinds={"polars", "parquet"}, owners=["team:kspill"]),
        },
        ins={"trade_clean": AssetIn(), "firm_city": AssetIn()},
        partitions_def=years_def,
        check_specs=contract_check_specs("quality_flow", extra=FLOW_CHECKS, ge=False)
        + contract_check_specs("quality_flow_quarantine", ge=False)
        + [AssetCheckSpec(name="sigma_coverage", asset="quality_flow", blocking=False,
                          description="share of export value whose HS6 has a usable sigma >= min_sigma_coverage; "
                                      "unmatched HS3 listed")],
        pool="kspill_heavy",
    )
    def quality_flows(context: AssetExecutionContext, trade_clean: pl.LazyFrame, firm_city: pl.LazyFrame,
                      quality: QualitySettings, paths: KspillPaths):
        """Flows (firm x HS6 x destination x year) of the quality sample and their elasticities."""
        from kspill_pipeline.compute import quality as q

        cfg = quality.model(paths)
        eff = quality.effective(paths)
        year = int(context.partition_key)
        require_gates(paths.store, [("trade_clean", [year])])
        fc = firm_city.collect() if cfg.city_assignment == "firm_city_table" else None
        flows = q.quality_flows_chunked(trade_clean, cfg, firm_city=fc)
        sigma_tab = read_sigma_table(quality.sigma_path(paths))
        smap = q.map_sigma(sigma_tab, cfg.sigma_vintage, cfg.study_vintage,
                           hs6_codes=flows.kept["hs6"].unique(), country=cfg.sigma_country,
                           mode=cfg.sigma_concordance_mode)
        st = smap.table.select("hs6", "sigma", "hs3_source")
        qf = load_contract("quality_flow").conform(
            flows.kept.join(st, on="hs6", how="left", maintain_order="left")
            .select(load_contract("quality_flow").polars_schema().names()))
        qq = load_contract("quality_flow_quarantine").conform(flows.quarantine)
        acc = flows.accounting
        tot_v = float(qf["value_usd"].sum() or 0.0)
        cov = float(qf.filter(pl.col("sigma") > 1)["value_usd"].sum() or 0.0) / tot_v if tot_v else None
        yield Output(qf, output_name="quality_flow", metadata={
            "flows": qf.height, "rows_in": acc["rows_in"],
            "share_rows_quarantined": acc["rows_quarantined"] / acc["rows_in"] if acc["rows_in"] else 0.0,
            "sigma_coverage_value": cov,
            "sigma_unmatched_hs3": MetadataValue.json(smap.report.get("unmatched_hs3", [])[:50]),
            "config": MetadataValue.json(cfg.summary()),
        })
        yield Output(qq, output_name="quality_flow_quarantine", metadata={
            "rows": qq.height, "by_reason": MetadataValue.json(acc.get("by_reason", {})),
        })
        res = evaluate_contract("quality_flow", qf, ge=False)
        # accounting against an independent count of the year's export rows in trade_clean
        ex = trade_clean.filter(pl.col("flow") == "export").select(
            pl.len().alias("n"), pl.col("value_usd").sum().alias("v")).collect()
        n_ex, v_ex = int(ex["n"][0]), float(ex["v"][0] or 0.0)
        rows_kept = int(qf["n_rows"].sum() or 0)
        v_kept, v_quar = float(qf["value_usd"].sum() or 0.0), float(qq["value_usd"].sum() or 0.0)
        ok_rows = n_ex == rows_kept + qq.height
        ok_val = abs(v_ex - v_kept - v_quar) <= 1e-9 * max(1.0, v_ex)
        res.append(_extra_check("quality_flow", "flow_accounting", ok_rows and ok_val,
                                f"export rows {n_ex} = kept {rows_kept} + quarantined {qq.height}: {ok_rows}; "
                                f"value identity: {ok_val}",
                                {"rows_read": n_ex, "rows_kept": rows_kept, "rows_quarantined": qq.height,
                                 "value_read": v_ex, "value_kept": v_kept, "value_quarantined": v_quar}))
        res.append(_extra_check("quality_flow", "sigma_coverage",
                                qf.height == 0 or (cov is not None and cov >= eff.min_sigma_coverage),
                                f"export value with a usable sigma: {cov if cov is None else round(cov, 4)} "
                                f"(threshold {eff.min_sigma_coverage})",
                                {"coverage_value": cov, "unmatched_hs3": smap.report.get("unmatched_hs3", [])[:50]},
                                warn=True))
        qres = evaluate_contract("quality_flow_quarantine", qq, ge=False)
        record_gate(paths.store, "quality_flow", year, res)
        record_gate(paths.store, "quality_flow_quarantine", year, qres)
        yield from res
        yield from qres

    @asset(
        name="quality_estimates",
        group_name=GROUP,
        description=_desc("quality_estimates"),
        kinds={"polars", "parquet"},
        ins={"quality_flow": AssetIn()},
        check_specs=contract_check_specs("quality_estimates", extra=[
            ("sigma_valid", "every estimated flow (est_status ok) has sigma > 1 and a finite qua")], ge=False),
        pool="kspill_heavy",
    )
    def quality_estimates(context: AssetExecutionContext, quality_flow: pl.LazyFrame, quality: QualitySettings,
                          paths: KspillPaths):
        """Eqs. (18)-(19) on the flows of every year at once (one HS6 effect per product, as Eq. 18).
        grouping pooled: one regression; by_hs2 / by_hs3 / by_hs6: the groups one after another
        (each over all years), so memory holds one HS2 chapter's flows at a time."""
        from kspill_pipeline.compute import quality as q

        cfg = quality.model(paths)
        years = sorted(int(k) for k in context.asset_partition_keys_for_input("quality_flow"))
        require_gates(paths.store, [("quality_flow", years)])
        prov = _prov_gdp(paths, cfg)
        contract = load_contract("quality_estimates")
        cols = contract.polars_schema().names()
        if cfg.grouping == "pooled":
            chunks = [None]
        else:
            chunks = sorted(quality_flow.select(pl.col("hs6").str.slice(0, 2).unique()).collect()
                            .to_series().to_list())
        parts, reports = [], []
        for ch in chunks:
            lf = quality_flow if ch is None else quality_flow.filter(pl.col("hs6").str.slice(0, 2) == ch)
            flows = lf.collect()
            if flows.height == 0:
                continue
            st = flows.filter(pl.col("sigma").is_not_null()).select("hs6", "sigma", "hs3_source").unique("hs6")
            fit = q.estimate_quality(flows.drop("sigma", "hs3_source"), st, cfg, prov_gdp=prov)
            parts.append(fit.flows.select(cols))
            reports.append(fit.report)
            del flows, fit
        # sorted by year: every quality_normalised partition reads only its year's row groups
        df = contract.conform(pl.concat(parts).sort("year", "firm_id", "hs6", "partner_iso3") if parts
                              else pl.DataFrame(schema=contract.polars_schema()))
        rep = reports[0] if len(reports) == 1 else {"groups": len(reports)}
        status = df.group_by("est_status").len().sort("est_status")
        okr = df.filter(pl.col("est_status") == "ok")
        yield Output(df, metadata={
            "flows": df.height, "flows_estimated": okr.height, "years": MetadataValue.json(years),
            "status_counts": MetadataValue.json({r[0]: r[1] for r in status.rows()}),
            "gdp_control_used": prov is not None and cfg.gdp_control != "off",
            "qua_quantiles": MetadataValue.json(
                {str(p): float(okr["qua"].quantile(p, "linear")) for p in (0.01, 0.25, 0.5, 0.75, 0.99)}
                if okr.height else {}),
            "first_stage_F_median": rep.get("first_stage_F_median"),
            "config": MetadataValue.json(cfg.summary()),
        })
        res = evaluate_contract("quality_estimates", df, ge=False)
        bad = okr.filter(~(pl.col("sigma") > 1) | ~pl.col("qua").is_finite() | pl.col("qua").is_null())
        res.append(_extra_check("quality_estimates", "sigma_valid", bad.height == 0,
                                f"{bad.height} estimated flows with sigma <= 1 or non-finite qua",
                                {"flows_estimated": okr.height, "violations": bad.height}))
        record_gate(paths.store, "quality_estimates", None, res)
        yield from res

    @asset(
        name="quality_bounds",
        group_name=GROUP,
        description=_desc("quality_bounds"),
        kinds={"polars", "parquet"},
        ins={"quality_estimates": AssetIn()},
        check_specs=contract_check_specs("quality_bounds", ge=False),
    )
    def quality_bounds(context: AssetExecutionContext, quality_estimates: pl.LazyFrame, quality: QualitySettings,
                       paths: KspillPaths):
        """Min/max of qua per HS6 over every year (Eq. 20 window), from a lazy scan."""
        from kspill_pipeline.compute import quality as q

        cfg = quality.model(paths)
        require_gates(paths.store, [("quality_estimates", [None])])
        years = sorted(quality_estimates.select(pl.col("year").unique()).collect().to_series().to_list())
        b = q.rqua_bounds(quality_estimates.select("year", "hs6", "qua"), cfg.rqua_window)
        if "year" not in b.columns:
            b = b.with_columns(pl.lit(None, dtype=pl.Int32).alias("year"))
        b = b.with_columns(pl.lit(cfg.rqua_window).alias("rqua_window"))
        df = load_contract("quality_bounds").conform(b)
        yield Output(df, metadata={"hs6_windows": df.height, "years": MetadataValue.json(years),
                                   "degenerate_windows": int((df["qua_min"] == df["qua_max"]).sum())})
        yield from evaluate_contract("quality_bounds", df, ge=False)

    @asset(
        name="quality_normalised",
        group_name=GROUP,
        partitions_def=years_def,
        description=_desc("quality_normalised"),
        kinds={"polars", "parquet"},
        ins={"quality_flow": AssetIn(), "quality_estimates": AssetIn(), "quality_bounds": AssetIn()},
        check_specs=contract_check_specs("quality_normalised", ge=False),
    )
    def quality_normalised(context: AssetExecutionContext, quality_flow: pl.LazyFrame,
                           quality_estimates: pl.LazyFrame, quality_bounds: pl.LazyFrame,
                           quality: QualitySettings, paths: KspillPaths):
        """rqua = (qua - min) / (max - min) within the HS6 window (Eq. 20)."""
        from kspill_pipeline.compute import quality as q

        cfg = quality.model(paths)
        year = int(context.partition_key)
        b = quality_bounds.collect()
        if b.height and b["rqua_window"][0] != cfg.rqua_window:
            raise ValueError(f"quality_normalised {year}: quality_bounds was built with rqua_window="
                             f"{b['rqua_window'][0]!r} but the resource says {cfg.rqua_window!r}; "
                             "re-materialise quality_bounds")
        keys = ["hs6"] if cfg.rqua_window == "all_years" else ["hs6", "year"]
        b = b.select(*keys, "qua_min", "qua_max", "n_qua")
        contract = load_contract("quality_normalised")
        cols = [c.name for c in contract.columns]
        key = ["year", "firm_id", "hs6", "partner_iso3"]
        est = quality_estimates.filter(pl.col("year") == year).select(*key, "est_status", "qua", "variant")
        flows = quality_flow.join(est, on=key, how="left").select(
            [c for c in cols if c not in ("qua_min", "qua_max", "rqua", "rqua_window")])
        df = contract.conform(q.apply_rqua(flows.collect(), b, degenerate=cfg.rqua_degenerate).select(cols))
        yield Output(df, metadata={"flows": df.height, "rated": int(df["rqua"].is_not_null().sum()),
                                   "rqua_mean": float(df["rqua"].mean()) if df["rqua"].is_not_null().any() else None})
        res = evaluate_contract("quality_normalised", df, ge=False)
        record_gate(paths.store, "quality_normalised", year, res)
        yield from res

    def _aggregate(name: str, level: str):
        @asset(
            name=name,
            group_name=GROUP,
            partitions_def=years_def,
            description=_desc(name),
            kinds={"polars", "parquet"},
            ins={"quality_normalised": AssetIn()},
            check_specs=contract_check_specs(name, ge=False),
        )
        def _agg(context: AssetExecutionContext, quality_normalised: pl.LazyFrame, paths: KspillPaths):
            from kspill_pipeline.compute import quality as q

            year = int(context.partition_key)
            frame, check = q.aggregate_quality(quality_normalised.collect(), level)
            df = load_contract(name).conform(frame)
            yield Output(df, metadata={"cells": df.height, "weights": MetadataValue.json(check)})
            res = evaluate_contract(name, df, ge=False)
            record_gate(paths.store, name, year, res)
            yield from res

        return _agg

    @asset(
        name="quality_decomposition",
        group_name=GROUP,
        partitions_def=years_def,
        description=_desc("quality_decomposition"),
        kinds={"polars", "parquet"},
        ins={"quality_normalised": AssetIn(partition_mapping=lag_window,
                                           metadata={"allow_missing_partitions": True})},
        check_specs=contract_check_specs("quality_decomposition", extra=[
            ("decomposition_identity", "within + between + entry + exit = total in every cell (|error| <= 1e-12)")],
            ge=False),
    )
    def quality_decomposition(context: AssetExecutionContext, quality_normalised: pl.LazyFrame,
                              quality: QualitySettings, paths: KspillPaths):
        """Melitz-Polanec decomposition of the change of city x HS4 quality from t-1 to t (Eq. 23)."""
        from kspill_pipeline.compute.decomposition import quality_decomposition as decompose

        year = int(context.partition_key)
        contract = load_contract("quality_decomposition")
        prev = quality_normalised.filter(pl.col("year") == year - 1).collect()
        curr = quality_normalised.filter(pl.col("year") == year).collect()
        if prev.height == 0:
            df, summary = contract.conform(pl.DataFrame(schema=contract.polars_schema())), {
                "identity_ok": True, "note": f"no quality_normalised for {year - 1}: first year, no decomposition"}
        else:
            require_gates(paths.store, [("quality_normalised", [year - 1, year])])
            frame, summary = decompose(prev, curr, unit=quality.effective(paths).decomp_unit)
            df = contract.conform(frame)
        yield Output(df, metadata={"cells": df.height, "summary": MetadataValue.json(summary),
                                   "decomp_unit": quality.effective(paths).decomp_unit})
        res = evaluate_contract("quality_decomposition", df, ge=False)
        err = float(df["identity_error"].abs().max() or 0.0) if df.height else 0.0
        res.append(outcome_to_result("quality_decomposition", CheckOutcome(
            "decomposition_identity", bool(summary.get("identity_ok", False)) and err <= 1e-12,
            f"max |total - (within + between + entry + exit)| = {err:.3g}", {"max_abs_error": err})))
        record_gate(paths.store, "quality_decomposition", year, res)
        yield from res

    return [quality_flows, quality_estimates, quality_bounds, quality_normalised,
            _aggregate("quality_firm_hs6", "firm_hs6"), _aggregate("quality_city_hs6", "city_hs6"),
            _aggregate("quality_city_hs4", "city_hs4"), quality_decomposition]
