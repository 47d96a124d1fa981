"""Study samples drawn from trade_clean (pure polars).

trade_clean flags study-specific exclusions instead of dropping them (ARCHITECTURE "One cleaned
dataset, many studies"); a study sample applies one preset:

* ``s000`` (spec S000 2.3): drop firms whose name contains one of the 8 S000 keywords, drop
  processing-trade transactions (``processing_drop_level = transaction``) or every firm with any
  processing trade (``firm``).
* ``s001`` (spec S001 2.5): drop firms with the 5 S001 keywords; processing kept; Hong Kong as
  destination dropped.
* ``s004`` (spec S004 2.3): drop firms with the 7 S004 keywords; processing kept (a subsample later).
* ``all``: no exclusion.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import polars as pl

from kspill_pipeline.config import KEYWORD_PRESETS

SamplePreset = Literal["s000", "s001", "s004", "all"]


@dataclass(frozen=True)
class SampleRules:
    keywords: tuple[str, ...]
    drop_processing: bool
    processing_drop_level: Literal["transaction", "firm"] = "transaction"
    drop_hk_exports: bool = False


PRESETS: dict[str, SampleRules] = {
    "s000": SampleRules(KEYWORD_PRESETS["s000"], drop_processing=True),
    "s001": SampleRules(KEYWORD_PRESETS["s001"], drop_processing=False, drop_hk_exports=True),
    "s004": SampleRules(KEYWORD_PRESETS["s004"], drop_processing=False),
    "all": SampleRules((), drop_processing=False),
}


def study_sample(
    trade: pl.LazyFrame, preset: SamplePreset | SampleRules = "s000", *, processing_drop_level: str | None = None
) -> pl.LazyFrame:
    """Apply a study's exclusions to trade_clean rows (lazy)."""
    rules = PRESETS[preset] if isinstance(preset, str) else preset
    if processing_drop_level is not None:
        rules = SampleRules(rules.keywords, rules.drop_processing, processing_drop_level, rules.drop_hk_exports)
    lf = trade
    if rules.keywords:
        kws = list(rules.keywords)
        lf = lf.filter(~pl.col("intermediary_keywords").list.eval(pl.element().is_in(kws)).list.any())
    if rules.drop_processing:
        if rules.processing_drop_level == "transaction":
            lf = lf.filter(pl.col("trade_mode_class") != "processing")
        else:
            proc_firms = (
                lf.filter(pl.col("trade_mode_class") == "processing").select("year", "firm_id").unique()
            )
            lf = lf.join(proc_firms, on=["year", "firm_id"], how="anti")
    if rules.drop_hk_exports:
        lf = lf.filter(~((pl.col("flow") == "export") & pl.col("partner_is_hk")))
    return lf


def product_column(level: str) -> str:
    if level not in ("hs2", "hs4", "hs6"):
        raise ValueError(f"product_level must be hs2, hs4 or hs6, got {level!r}")
    return level


def unit_product_values(
    sample: pl.LazyFrame, *, unit: str, level: str, flow: Literal["export", "import"]
) -> pl.LazyFrame:
    """Sum of value_usd by (year, unit, product) for one flow; product column named ``product``."""
    col = product_column(level)
    return (
        sample.filter(pl.col("flow") == flow)
        .group_by("year", unit, col)
        .agg(pl.col("value_usd").sum().alias("value"))
        .rename({col: "product"})
    )


def firm_main_city(sample: pl.LazyFrame) -> pl.LazyFrame:
    """One city per firm-year: largest trade value (imports + exports); ties -> lowest city code.

    Spec S000 2.2 / switch ``firm_city_assignment = customs_location_field``.
    """
    by_city = sample.group_by("year", "firm_id", "city_code").agg(pl.col("value_usd").sum().alias("v"))
    n = by_city.group_by("year", "firm_id").agg(pl.len().cast(pl.Int16).alias("n_cities"))
    main = (
        by_city.sort(["year", "firm_id", "v", "city_code"], descending=[False, False, True, False])
        .group_by("year", "firm_id", maintain_order=True)
        .first()
        .select("year", "firm_id", "city_code")
    )
    return main.join(n, on=["year", "firm_id"]).sort("year", "firm_id")
