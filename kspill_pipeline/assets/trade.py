"""Customs ingestion assets: customs_raw (source) -> trade_clean, trade_quarantine,
trade_cleaning_report (yearly), plus the reference tables they use.

Thin wiring: reading is ``io.raw``, cleaning is ``compute.cleaning``, references are
``reference.*``, checks come from the data contracts.
"""


import time

import polars as pl
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetExecutionContext,
    AssetOut,
    AssetSpec,
    Config,
    Failure,
    MetadataValue,
    Output,
    asset,
    multi_asset,
)
from pydantic import Field

from kspill_pipeline.assets.contract_checks import contract_check_specs, evaluate_contract, record_gate
from kspill_pipeline.config import KEYWORD_UNION, CleaningConfig
from kspill_pipeline.contracts.checks import check_row_accounting
from kspill_pipeline.contracts.loader import load_contract
from kspill_pipeline.resources import KspillPaths
from kspill_pipeline.util import frame_to_markdown

ACCOUNTING_CHECK = (
    "row_value_accounting",
    "rows read (counted independently from the raw files) = rows kept + rows quarantined, "
    "and parseable trade value read = value kept + value quarantined",
)


class TradeCleanConfig(Config):
    """Run configuration of the cleaning rules (defaults = kspill defaults; see README)."""

    intermediary_keywords: list[str] = Field(default_factory=lambda: list(KEYWORD_UNION))
    hs_target_vintage: str = "HS2007"
    hs_mode: str = "single_target"
    duplicate_policy: str = "quarantine_conflicts"
    address_fallback: bool = True
    ownership_rule: str = "largest_value"

    def cleaning(self, source_overrides: dict | None = None) -> CleaningConfig:
        data = dict(source_overrides or {})
        data.update(self.model_dump())
        return CleaningConfig.model_validate(data)


def _contract_description(name: str) -> str:
    return " ".join(load_contract(name).description.split())


def build_trade_assets(years_def) -> list:
    customs_raw = AssetSpec(
        "customs_raw",
        description=_contract_description("customs_raw"),
        group_name="raw",
        partitions_def=years_def,
        kinds={"csv", "parquet"},
        metadata={"contract": "data_contracts/customs_raw.yaml"},
    )

    @asset(
        name="ref_prefecture",
        group_name="reference",
        description=_contract_description("ref_prefecture"),
        kinds={"polars", "parquet"},
        check_specs=contract_check_specs("ref_prefecture", ge=False),
    )
    def ref_prefecture(context: AssetExecutionContext):
        from kspill_pipeline.reference.admin import prefectures

        df = load_contract("ref_prefecture").conform(prefectures())
        yield Output(df, metadata={"cities": df.height, "vintage": "cpca 0.5.5 adcodes (about 2020)"})
        yield from evaluate_contract("ref_prefecture", df, ge=False)

    @asset(
        name="ref_hs_concordance",
        group_name="reference",
        description=_contract_description("ref_hs_concordance"),
        kinds={"polars", "parquet"},
        check_specs=contract_check_specs("ref_hs_concordance", ge=False),
    )
    def ref_hs_concordance(context: AssetExecutionContext, config: TradeCleanConfig, paths: KspillPaths):
        from kspill_pipeline.reference.hs import concordance_table

        cfg = config.cleaning(paths.source().model_extra.get("cleaning") if paths.source().model_extra else None)
        df = load_contract("ref_hs_concordance").conform(concordance_table(cfg.hs_target_vintage, cfg.hs_mode))
        yield Output(
            df,
            metadata={
                "target_vintage": cfg.hs_target_vintage,
                "mode": cfg.hs_mode,
                "rows": df.height,
                "by_source_vintage": MetadataValue.json(
                    {r["source_vintage"]: r["len"] for r in df.group_by("source_vintage").len().to_dicts()}
                ),
            },
        )
        yield from evaluate_contract("ref_hs_concordance", df, ge=False)

    @multi_asset(
        name="clean_customs",
        outs={
            "trade_clean": AssetOut(
                description=_contract_description("trade_clean"), group_name="trade", kinds={"polars", "parquet"},
                owners=["team:kspill"],
            ),
            "trade_quarantine": AssetOut(
                description=_contract_description("trade_quarantine"), group_name="trade", kinds={"polars", "parquet"},
                owners=["team:kspill"],
            ),
            "trade_cleaning_report": AssetOut(
                description=_contract_description("trade_cleaning_report"), group_name="trade",
                kinds={"polars", "parquet"}, owners=["team:kspill"],
            ),
        },
        deps=["customs_raw"],
        partitions_def=years_def,
        check_specs=contract_check_specs("trade_clean", extra=[ACCOUNTING_CHECK])
        + contract_check_specs("trade_quarantine", ge=False),
        pool="kspill_heavy",
    )
    def clean_customs(context: AssetExecutionContext, config: TradeCleanConfig, paths: KspillPaths):
        from kspill_pipeline.compute.cleaning import clean_customs_chunked, parse_number
        from kspill_pipeline.io.raw import count_rows, discover_files, iter_customs_file

        year = int(context.partition_key)
        src = paths.source()
        cfg = config.cleaning((src.model_extra or {}).get("cleaning"))
        files = discover_files(paths.data).get(year, [])
        if not files:
            raise Failure(
                description=f"customs_raw partition {year}: no raw customs file for {year} under {paths.data} "
                "(file names must contain the year; see README 'Your own customs files')"
            )
        t0 = time.perf_counter()
        tally = {"rows_counted": 0, "value_read": 0.0, "seconds_read": 0.0}

        def batches():
            # one file after the other, in batches: only one batch of raw text is held at a time
            for f in files:
                t = time.perf_counter()
                tally["rows_counted"] += count_rows(f)  # independent pass, for the accounting check
                n, rf = 0, None
                for rf in iter_customs_file(f, paths.data):
                    n += rf.df.height
                    tally["value_read"] += float(rf.df.select(parse_number("value_usd").sum()).item() or 0.0)
                    tally["seconds_read"] += time.perf_counter() - t
                    yield rf.df.with_columns(pl.lit(rf.numeric_hs).alias("source_numeric_hs"))
                    t = time.perf_counter()
                tally["seconds_read"] += time.perf_counter() - t
                context.log.info(
                    f"read {rf.source_file}: {n} rows, format={rf.format}, encoding={rf.encoding}"
                    + (f", ignored columns {rf.ignored_columns}" if rf.ignored_columns else "")
                )

        res = clean_customs_chunked(batches(), year, cfg)
        rows_counted, value_read = tally["rows_counted"], tally["value_read"]
        t_read = tally["seconds_read"]
        t_clean = time.perf_counter() - t0 - t_read

        clean_df = load_contract("trade_clean").conform(res.clean)
        quar_df = load_contract("trade_quarantine").conform(res.quarantine)
        rep_df = load_contract("trade_cleaning_report").conform(res.report)

        value_kept = float(clean_df["value_usd"].sum() or 0.0)
        value_quar = float(quar_df["value_usd"].sum() or 0.0)
        rows_kept = float(clean_df["source_rows"].sum() or 0.0)
        share_q = quar_df.height / rows_counted if rows_counted else 0.0
        yield Output(
            clean_df,
            output_name="trade_clean",
            metadata={
                "rows": clean_df.height,
                "raw_rows_kept": rows_kept,
                "value_usd_total": value_kept,
                "firms": clean_df["firm_id"].n_unique(),
                "cities": clean_df["city_code"].n_unique(),
                "hs6_products": clean_df["hs6"].n_unique(),
                "exports_usd": float(clean_df.filter(pl.col("flow") == "export")["value_usd"].sum() or 0.0),
                "imports_usd": float(clean_df.filter(pl.col("flow") == "import")["value_usd"].sum() or 0.0),
                "share_rows_quarantined": share_q,
                "raw_files": MetadataValue.json([str(f.relative_to(paths.data)) for f in files]),
                "seconds_read": round(t_read, 3),
                "seconds_clean": round(t_clean, 3),
                "config": MetadataValue.json(cfg.model_dump(mode="json", exclude={"hs_vintage_by_year"})),
            },
        )
        reasons = (
            quar_df.group_by("reason").agg(pl.len().alias("rows"), pl.col("value_usd").sum().alias("value_usd"))
            .sort("reason")
        )
        yield Output(
            quar_df,
            output_name="trade_quarantine",
            metadata={
                "rows": quar_df.height,
                "value_usd_parseable": value_quar,
                "share_rows_quarantined": share_q,
                "by_reason": MetadataValue.md(frame_to_markdown(reasons)),
            },
        )
        yield Output(
            rep_df,
            output_name="trade_cleaning_report",
            metadata={"preview": MetadataValue.md(frame_to_markdown(rep_df))},
        )

        clean_results = evaluate_contract("trade_clean", clean_df)
        quar_results = evaluate_contract("trade_quarantine", quar_df, ge=False)
        acc = check_row_accounting(
            rows_read=rows_counted,
            rows_kept=rows_kept,
            rows_quarantined=quar_df.height,
            value_read=value_read,
            value_kept=value_kept,
            value_quarantined=value_quar,
        )
        clean_results.append(AssetCheckResult(
            asset_key="trade_clean",
            check_name=ACCOUNTING_CHECK[0],
            passed=bool(acc.passed),
            severity=AssetCheckSeverity.ERROR,
            description=acc.description,
            metadata={k: (v if isinstance(v, (int, float, str, bool)) else MetadataValue.json(v)) for k, v in acc.metadata.items()},
        ))
        record_gate(paths.store, "trade_clean", year, clean_results)
        record_gate(paths.store, "trade_quarantine", year, quar_results)
        yield from clean_results
        yield from quar_results

    return [customs_raw, ref_prefecture, ref_hs_concordance, clean_customs]
