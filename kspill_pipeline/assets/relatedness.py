"""Relatedness assets (yearly): firm_city, product_relatedness, city_export_rca,
city_export_density, city_complexity, city_import_density, firm_import_density.

Thin wiring around ``compute.samples``, ``compute.relatedness``, ``compute.complexity``,
``compute.firm_density`` and ``compute.invariants``. Settings are one Dagster resource
(``relatedness``) so every asset of a run uses the same product level, basis and sample.
"""

import time

from typing import Literal

import numpy as np
import polars as pl
from dagster import (
    AssetExecutionContext,
    AssetIn,
    ConfigurableResource,
    MaterializeResult,
    MetadataValue,
    Output,
    asset,
)

from kspill_pipeline.assets.contract_checks import (
    contract_check_specs,
    evaluate_contract,
    outcome_to_result,
    record_gate,
)
from kspill_pipeline.config import RelatednessConfig
from kspill_pipeline.contracts.loader import load_contract
from kspill_pipeline.dask_resource import DaskResource
from kspill_pipeline.resources import KspillPaths

GROUP = "relatedness"


class RelatednessSettings(ConfigurableResource):
    """Run-wide relatedness switches (validated by ``config.RelatednessConfig``)."""

    sample: Literal["s000", "s001", "s004", "all"] = "s000"
    processing_drop_level: Literal["transaction", "firm"] = "transaction"
    product_level: Literal["hs2", "hs4", "hs6"] = "hs4"
    phi_basis: Literal["firm", "city"] = "firm"
    phi_variant: Literal["min_conditional", "asymmetric", "correlation"] = "min_conditional"
    phi_diagonal: Literal["one", "zero", "raw"] = "one"
    city_preset: Literal["stata", "py-ecomplexity", "r-economiccomplexity"] = "stata"
    rca_threshold: float = 1.0
    density_include_self: bool = True
    density_firm_threshold: float = 0.05
    n_buckets: int = 16

    def model(self) -> RelatednessConfig:
        return RelatednessConfig.model_validate(
            {k: getattr(self, k) for k in RelatednessConfig.model_fields}
        )


def _desc(name: str) -> str:
    return " ".join(load_contract(name).description.split())


def _cfg_meta(cfg: RelatednessConfig) -> MetadataValue:
    return MetadataValue.json(cfg.model_dump(mode="json"))


def _sample(trade_clean: pl.LazyFrame, cfg: RelatednessConfig) -> pl.LazyFrame:
    from kspill_pipeline.compute.samples import study_sample

    return study_sample(trade_clean, cfg.sample, processing_drop_level=cfg.processing_drop_level)


def _phi_from_store(product_relatedness: pl.LazyFrame):
    """Dense phi and product order back from the long product_relatedness table."""
    from kspill_pipeline.compute.relatedness_io import phi_from_long

    return phi_from_long(product_relatedness.collect())


def build_relatedness_assets(years_def) -> list:
    from kspill_pipeline.compute import invariants

    @asset(
        name="firm_city",
        group_name=GROUP,
        partitions_def=years_def,
        description=_desc("firm_city"),
        kinds={"polars", "parquet"},
        ins={"trade_clean": AssetIn()},
        check_specs=contract_check_specs("firm_city", ge=False),
    )
    def firm_city(context: AssetExecutionContext, trade_clean: pl.LazyFrame, relatedness: RelatednessSettings,
                  paths: KspillPaths):
        from kspill_pipeline.compute.samples import firm_main_city

        cfg = relatedness.model()
        df = load_contract("firm_city").conform(firm_main_city(_sample(trade_clean, cfg)).collect())
        yield Output(df, metadata={"firms": df.height, "multi_city_firms": int((df["n_cities"] > 1).sum()),
                                   "config": _cfg_meta(cfg)})
        yield from record_gate(paths.store, "firm_city", int(context.partition_key),
                               evaluate_contract("firm_city", df, ge=False))

    @asset(
        name="product_relatedness",
        group_name=GROUP,
        partitions_def=years_def,
        description=_desc("product_relatedness"),
        kinds={"polars", "parquet"},
        ins={"trade_clean": AssetIn()},
        check_specs=contract_check_specs("product_relatedness", extra=invariants.PHI_CHECKS, ge=False),
    )
    def product_relatedness(context: AssetExecutionContext, trade_clean: pl.LazyFrame,
                            relatedness: RelatednessSettings, paths: KspillPaths):
        from kspill_pipeline.compute.relatedness_io import relatedness_long

        cfg = relatedness.model()
        year = int(context.partition_key)
        t0 = time.perf_counter()
        df = relatedness_long(_sample(trade_clean, cfg), year, cfg)
        df = load_contract("product_relatedness").conform(df)
        n_products = df.filter(pl.col("product_1") == pl.col("product_2")).height
        yield Output(df, metadata={
            "products": n_products,
            "pairs": df.height,
            "units": int(df["n_units"][0]) if df.height else 0,
            "mean_phi_offdiag": float(df.filter(pl.col("product_1") != pl.col("product_2"))["phi"].mean() or 0.0),
            "seconds": round(time.perf_counter() - t0, 3),
            "config": _cfg_meta(cfg),
        })
        results = evaluate_contract("product_relatedness", df, ge=False)
        results += [outcome_to_result("product_relatedness", o)
                    for o in invariants.phi_checks(df, variant=cfg.phi_variant, diagonal=cfg.phi_diagonal)]
        yield from record_gate(paths.store, "product_relatedness", year, results)

    @asset(
        name="city_export_rca",
        group_name=GROUP,
        partitions_def=years_def,
        description=_desc("city_export_rca"),
        kinds={"polars", "parquet"},
        ins={"trade_clean": AssetIn()},
        check_specs=contract_check_specs("city_export_rca", ge=False),
    )
    def city_export_rca(context: AssetExecutionContext, trade_clean: pl.LazyFrame, relatedness: RelatednessSettings):
        from kspill_pipeline.compute.relatedness_io import city_rca_long
        cfg = relatedness.model()
        df = load_contract("city_export_rca").conform(city_rca_long(_sample(trade_clean, cfg), int(context.partition_key), cfg))
        yield Output(df, metadata={"cities": df["city_code"].n_unique(), "cells": df.height,
                                   "share_M": float(df["M"].mean() or 0.0), "config": _cfg_meta(cfg)})
        yield from evaluate_contract("city_export_rca", df, ge=False)

    @asset(
        name="city_export_density",
        group_name=GROUP,
        partitions_def=years_def,
        description=_desc("city_export_density"),
        kinds={"polars", "parquet"},
        ins={"city_export_rca": AssetIn(), "product_relatedness": AssetIn()},
        check_specs=contract_check_specs("city_export_density", ge=False),
    )
    def city_export_density(context: AssetExecutionContext, city_export_rca: pl.LazyFrame,
                            product_relatedness: pl.LazyFrame, relatedness: RelatednessSettings):
        from kspill_pipeline.compute.relatedness_io import basket_density_long
        cfg = relatedness.model()
        phi, products = _phi_from_store(product_relatedness)
        baskets = city_export_rca.filter(pl.col("M") == 1).select(pl.col("city_code").alias("unit"), "product").collect()
        units = city_export_rca.select(pl.col("city_code").unique().sort()).collect()["city_code"]
        df = basket_density_long(baskets, units, phi, products, include_self=cfg.density_include_self,
                                 value_name="density", keep_presence=True)
        df = df.rename({"unit": "city_code"}).with_columns(pl.lit(int(context.partition_key)).alias("year"))
        df = load_contract("city_export_density").conform(df)
        yield Output(df, metadata={"rows": df.height, "mean_density": float(df["density"].mean() or 0.0),
                                   "config": _cfg_meta(cfg)})
        yield from evaluate_contract("city_export_density", df, ge=False)

    @asset(
        name="city_complexity",
        group_name=GROUP,
        partitions_def=years_def,
        description=_desc("city_complexity"),
        kinds={"polars", "parquet"},
        ins={"city_export_rca": AssetIn()},
        check_specs=contract_check_specs("city_complexity", ge=False),
    )
    def city_complexity(context: AssetExecutionContext, city_export_rca: pl.LazyFrame, relatedness: RelatednessSettings):
        from kspill_pipeline.compute.relatedness_io import city_complexity_long
        cfg = relatedness.model()
        df = load_contract("city_complexity").conform(city_complexity_long(city_export_rca.collect(), cfg))
        eci = df.group_by("city_code").agg(pl.col("eci").first(), pl.col("diversity").first())
        corr = eci.select(pl.corr("eci", "diversity")).item() if eci.height > 2 else None
        yield Output(df, metadata={"cities": eci.height, "corr_eci_diversity": float(corr) if corr is not None else None,
                                   "preset": cfg.city_preset, "config": _cfg_meta(cfg)})
        yield from evaluate_contract("city_complexity", df, ge=False)

    @asset(
        name="city_import_density",
        group_name=GROUP,
        partitions_def=years_def,
        description=_desc("city_import_density"),
        kinds={"polars", "parquet"},
        ins={"trade_clean": AssetIn(), "firm_city": AssetIn(), "product_relatedness": AssetIn()},
        check_specs=contract_check_specs("city_import_density", ge=False),
    )
    def city_import_density(context: AssetExecutionContext, trade_clean: pl.LazyFrame, firm_city: pl.LazyFrame,
                            product_relatedness: pl.LazyFrame, relatedness: RelatednessSettings, paths: KspillPaths):
        from kspill_pipeline.compute.relatedness_io import basket_density_long, import_baskets
        cfg = relatedness.model()
        phi, products = _phi_from_store(product_relatedness)
        firm_b = import_baskets(_sample(trade_clean, cfg), cfg, products)
        city_b = (
            firm_b.join(firm_city.select("firm_id", "city_code").collect(), left_on="unit", right_on="firm_id")
            .select(pl.col("city_code").alias("unit"), "product").unique()
        )
        units = city_b["unit"].unique().sort()
        df = basket_density_long(city_b, units, phi, products, include_self=cfg.density_include_self,
                                 value_name="density_city")
        df = df.rename({"unit": "city_code"}).with_columns(pl.lit(int(context.partition_key)).alias("year"))
        df = load_contract("city_import_density").conform(df)
        yield Output(df, metadata={"cities": units.len(), "rows": df.height,
                                   "mean_density_city": float(df["density_city"].mean() or 0.0), "config": _cfg_meta(cfg)})
        yield from record_gate(paths.store, "city_import_density", int(context.partition_key),
                               evaluate_contract("city_import_density", df, ge=False))

    @asset(
        name="firm_import_density",
        group_name=GROUP,
        partitions_def=years_def,
        description=_desc("firm_import_density"),
        kinds={"dask", "parquet"},
        ins={"trade_clean": AssetIn(), "firm_city": AssetIn(), "product_relatedness": AssetIn(),
             "city_import_density": AssetIn()},
        check_specs=contract_check_specs("firm_import_density", extra=[invariants.CITY_GE_FIRM], ge=False),
        pool="kspill_heavy",
    )
    def firm_import_density(context: AssetExecutionContext, trade_clean: pl.LazyFrame, firm_city: pl.LazyFrame,
                            product_relatedness: pl.LazyFrame, city_import_density: pl.LazyFrame,
                            relatedness: RelatednessSettings, dask: DaskResource, paths: KspillPaths):
        from kspill_pipeline.compute.relatedness_io import firm_density_partition, import_baskets
        from kspill_pipeline.io import store

        cfg = relatedness.model()
        year = int(context.partition_key)
        phi, products = _phi_from_store(product_relatedness)
        baskets = import_baskets(_sample(trade_clean, cfg), cfg, products)
        t0 = time.perf_counter()
        stats = firm_density_partition(baskets, phi, products, year, paths.store, client=dask.client, cfg=cfg)
        seconds = time.perf_counter() - t0
        df = store.scan(paths.store, "firm_import_density", [year]).collect()
        df = df.select(load_contract("firm_import_density").column_names)
        results = evaluate_contract("firm_import_density", df, ge=False)
        inv = invariants.city_ge_firm(df, firm_city.collect(), city_import_density.collect())
        results.append(outcome_to_result("firm_import_density", inv))
        record_gate(paths.store, "firm_import_density", year, results)
        yield MaterializeResult(
            metadata={
                "dagster/row_count": df.height,
                "importing_firms": int(stats.get("units", 0)),
                "cells_computed": int(stats.get("cells", 0)),
                "share_kept": float(stats.get("share_kept", 0.0)),
                "threshold": cfg.density_firm_threshold,
                "seconds": round(seconds, 3),
                "parts": int(stats.get("parts", 0)),
                "dask": MetadataValue.text(dask.describe()),
                "config": _cfg_meta(cfg),
            },
            check_results=results,
        )

    return [firm_city, product_relatedness, city_export_rca, city_export_density, city_complexity,
            city_import_density, firm_import_density]
