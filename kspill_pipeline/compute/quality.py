"""Export product quality: KSW demand residuals, normalisation and value-weighted aggregation.

Pure polars / numpy / scipy (never import Dagster here). Issue 5; spec S004 section 3.1,
Eqs. (18)-(21), the [AMBIG] items there and the switches of section 8.

Pipeline of pure functions (each one unit-tested in ``kspill_pipeline_tests/test_quality.py``):

1. :func:`quality_flows` - trade_clean export rows of one year -> firm x HS6 x destination x year
   flows with unit value ``p = value / quantity`` (Eq. 18's unit of observation ``hgft``), after the
   study exclusions, the one-unit-per-HS6 rule and unit-value trimming. Every dropped trade_clean
   row is in the quarantine with a reason code; rows in = rows kept + rows quarantined (and value).
2. :func:`map_sigma` - a user-supplied HS3 elasticity table (contract ``elasticity_sigma``) of one HS
   vintage mapped to the study's HS6 through the concordance layer (study HS6 -> HS6 of the sigma
   vintage -> its first 3 digits), with a report of unmatched products; sigma <= 1 is flagged.
3. :func:`estimate_quality` - Eq. (18)/(19), variant A (KSW, sigma imposed; default) or B (2SLS with
   the firm's leave-one-destination-out mean log price as instrument), fixed effects
   ``alpha_h + delta_(dest,year)`` [+ ln provincial real GDP], residual / (sigma_h - 1).
4. :func:`normalise_rqua` - Eq. (20), min-max within HS6 (window: all years or per year).
5. :func:`aggregate_quality` - Eq. (21), export-value weights, to firm x HS6, city x HS6 and
   city x HS4 per year, with the weight-sum check.

The Melitz-Polanec decomposition (Eq. 23) is in :mod:`kspill_pipeline.compute.decomposition`.

Fixed effects are absorbed exactly (no iteration): for two FE dimensions A and B (B the one with
fewer levels) the normal equations are reduced to the Schur complement in B,
``(diag(n_B) - C' diag(1/n_A) C) beta = s_B - C' (s_A / n_A)`` with ``C`` the A x B cross-tab of
counts, one B level pinned to 0 in every connected component of the A-B bipartite graph (the rank
deficiency of two-way dummies equals the number of components), and solved by a dense Cholesky
(<= ``dense_max`` levels) or a sparse LU factorisation; one refinement step follows. Residuals are
unique whatever normalisation is pinned. Estimation by HS2/HS3/HS6 group interacts the B dimension
with the group (A = HS6 is nested in every group), which is exactly the set of separate
group-wise regressions, solved at once (the Schur complement is block diagonal by group); slopes
(GDP control, 2SLS price coefficient) are group-specific, computed from group sums.

Rows keep their identity throughout: the estimation works on arrays aligned with the input rows,
rows outside the estimation sample (no sigma, no instrument, singleton FE cell, ...) get a null
quality and a reason code in ``est_status`` - never a shifted residual.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "QualityConfig",
    "QualityFlows",
    "SigmaMap",
    "QualityFit",
    "FLOW_REASONS",
    "EST_STATUSES",
    "S004_INTERMEDIARY_KEYWORDS",
    "quality_flows",
    "quality_flows_chunked",
    "main_export_city",
    "map_sigma",
    "estimate_quality",
    "rqua_bounds",
    "apply_rqua",
    "normalise_rqua",
    "aggregate_quality",
    "TwoWayFE",
    "drop_singletons",
]

HsVintage = Literal["HS1992", "HS1996", "HS2002", "HS2007", "HS2012", "HS2017"]

#: S004 intermediary keyword list (config.KEYWORD_PRESETS["s004"]; repeated so this module stays light).
S004_INTERMEDIARY_KEYWORDS: tuple[str, ...] = ("贸易", "进出口", "外贸", "经贸", "工贸", "科贸", "外经")

#: Reason codes of the quality-flow quarantine, in the order the rules are applied (first hit wins).
FLOW_REASONS: tuple[str, ...] = (
    "intermediary",        # firm name has a keyword of the active list (drop_intermediaries)
    "ag_resource_hs",      # HS2 chapter in exclude_hs2 (agricultural / resource products)
    "trade_mode_excluded", # trade_mode_class not in trade_mode_classes
    "no_quantity",         # quantity missing or <= 0: no unit value
    "mixed_unit",          # unit differs from the HS6's unit (modal by value) or is missing
    "min_obs_hs6",         # flow-level: HS6 has fewer than min_obs_per_hs6 flows
    "unit_value_trim",     # flow-level: unit value outside the trimming bounds within HS6
)

#: Values of ``est_status`` in the estimated flows (``ok`` = in the estimation sample, quality set).
EST_STATUSES: tuple[str, ...] = (
    "ok", "no_sigma", "sigma_le_1", "no_control", "no_loo_iv", "singleton", "not_identified",
)

_FLOW_KEY = ["year", "firm_id", "hs6", "partner_iso3"]


# ==================================================================================================
# configuration
# ==================================================================================================
class QualityConfig(BaseModel):
    """Every switch of the export-quality computation (spec S004 sections 3.1, 3.5, 8, 10).

    Defaults follow the spec; [EXT] marks a default the paper does not state.
    """

    model_config = ConfigDict(extra="forbid")

    # ---- flow sample (S004 2.3 cleaning rules, section 10) ---------------------------------------
    drop_intermediaries: bool = Field(
        True, description="Drop rows of trade intermediaries (S004 2.3 rule 1).")
    intermediary_keywords: list[str] | None = Field(
        default_factory=lambda: list(S004_INTERMEDIARY_KEYWORDS),
        description="Keyword list applied to trade_clean.intermediary_keywords (S004 preset [EXT]); "
                    "None = use trade_clean.is_intermediary (the cleaning's active list).")
    exclude_hs2: list[str] = Field(
        default_factory=lambda: [f"{i:02d}" for i in range(1, 28)],
        description="HS2 chapters dropped as agricultural/resource products (S004 2.3 rule 2; "
                    "ag_resource_hs = hs01_27 [EXT]).")
    trade_mode_classes: list[Literal["ordinary", "processing", "other"]] = Field(
        default_factory=lambda: ["ordinary", "processing", "other"],
        description="trade_mode_class values kept (S004 keeps processing; Table 5 subsamples).")
    min_obs_per_hs6: int = Field(
        100, ge=0, description="HS6 products with fewer flows in the frame (one year) are dropped "
                               "(S004 2.3 rule 3, min_obs_per_hs6 = 100).")
    trim_percentiles: tuple[float, float] | None = Field(
        (1.0, 99.0), description="Unit-value trimming within HS6 (lower, upper percentile), None = off "
                                 "(S004 section 10: 1%/99% [EXT]).")
    trim_scope: Literal["hs6_year", "hs6"] = Field(
        "hs6_year", description="Group of the trimming percentiles (hs6 = over all years in the frame).")
    city_assignment: Literal["main_export_city", "firm_city_table"] = Field(
        "main_export_city",
        description="Flow city: the firm's largest-export-value city of the year (ties: lowest code), "
                    "or the firm_city table passed to quality_flows (firm_city_assignment [AMBIG]).")

    # ---- elasticities ------------------------------------------------------------------------------
    study_vintage: HsVintage = Field("HS2007", description="HS vintage of trade_clean.hs6.")
    sigma_vintage: HsVintage = Field("HS1992", description="HS vintage of the sigma table's HS3 codes "
                                                           "(Broda-Weinstein: HS0 = HS1992).")
    sigma_country: str | None = Field(
        "USA", description="country_code selected from a multi-country sigma table (KSW 2013 use US "
                           "Broda-Weinstein elasticities [EXT]; the paper does not say).")
    sigma_concordance_mode: Literal["single_target", "value_split"] = Field(
        "single_target", description="single_target: HS3 of the largest-weight source HS6; value_split: "
                                     "weight-averaged sigma over the matched source HS3s.")

    # ---- estimation (Eqs. 18-19) --------------------------------------------------------------------
    variant: Literal["A_ksw_sigma_imposed", "B_2sls_loo_price_iv"] = Field(
        "A_ksw_sigma_imposed", description="quality_estimator: A default, B paper-faithful (spec 3.1).")
    fixed_effects: Literal["hs6+dest_year", "hs6_year+dest_year"] = Field(
        "hs6+dest_year", description="alpha_h + delta_(dest,year) as in Eq. (18); hs6_year lets the "
                                     "product effect vary by year when several years are pooled.")
    grouping: Literal["pooled", "by_hs2", "by_hs3", "by_hs6"] = Field(
        "pooled", description="quality_estimation_grouping: one regression, or one per HS2/HS3/HS6 "
                              "group (destination-year effects and slopes group-specific).")
    singletons: Literal["drop", "keep"] = Field(
        "drop", description="singleton_handling: drop observations alone in an FE cell (iterated, "
                            "reghdfe convention; quality null, est_status 'singleton') or keep them "
                            "(their residual is exactly 0).")
    gdp_control: Literal["if_supplied", "required", "off"] = Field(
        "if_supplied", description="ln provincial real GDP regressor of Eq. (18): used when a table "
                                   "is passed, required, or never.")
    solver: Literal["auto", "dense", "sparse_lu"] = Field(
        "auto", description="Schur-complement solve: dense Cholesky if the reduced system has <= "
                            "dense_max levels (auto), else sparse LU.")
    dense_max: int = Field(4000, ge=1)

    # ---- normalisation and aggregation (Eqs. 20-21) ----------------------------------------------
    rqua_window: Literal["all_years", "per_year"] = Field(
        "all_years", description="rqua_minmax_scope: hs6_all_firms_dest_years (default) or hs6_year.")
    rqua_degenerate: Literal["null", "midpoint"] = Field(
        "null", description="rqua when max == min in the window (one flow, or all equal): null "
                            "(no relative information; excluded from aggregation) or 0.5.")

    @field_validator("exclude_hs2")
    @classmethod
    def _hs2_codes(cls, v: list[str]) -> list[str]:
        bad = [c for c in v if not (len(c) == 2 and c.isdigit())]
        if bad:
            raise ValueError(f"exclude_hs2: not 2-digit chapters: {bad}")
        return v

    @model_validator(mode="after")
    def _check(self) -> "QualityConfig":
        if self.trim_percentiles is not None:
            lo, hi = self.trim_percentiles
            if not (0 <= lo < 50 < hi <= 100):
                raise ValueError(f"trim_percentiles must satisfy 0 <= lower < 50 < upper <= 100, got {(lo, hi)}")
        if not self.trade_mode_classes:
            raise ValueError("trade_mode_classes: empty")
        return self

    def summary(self) -> dict[str, Any]:
        """JSON-able record of the active configuration (for output metadata)."""
        return self.model_dump(mode="json")


# ==================================================================================================
# 1. flows
# ==================================================================================================
class QualityFlows(NamedTuple):
    """Output of :func:`quality_flows`: ``kept`` flows, row-level ``quarantine``, ``accounting``."""

    kept: pl.DataFrame
    quarantine: pl.DataFrame
    accounting: dict[str, Any]


_FLOW_NEEDED = [
    "year", "firm_id", "city_code", "flow", "hs6", "partner_iso3", "trade_mode_class", "value_usd",
    "quantity", "unit", "source_rows", "intermediary_keywords", "is_intermediary",
]

#: trade_clean grain columns carried into the quarantine when present (null otherwise)
_FLOW_CARRY = ["region_code", "hs8_raw", "trade_mode_raw"]

QUARANTINE_SCHEMA: dict[str, pl.DataType] = {
    "year": pl.Int32(), "firm_id": pl.String(), "region_code": pl.String(), "city_code": pl.String(),
    "hs8_raw": pl.String(), "hs6": pl.String(), "trade_mode_raw": pl.String(),
    "partner_iso3": pl.String(), "trade_mode_class": pl.String(), "unit": pl.String(),
    "value_usd": pl.Float64(), "quantity": pl.Float64(), "source_rows": pl.Float64(),
    "reason": pl.String(), "rule_detail": pl.String(),
}


def _trim_bounds(p: np.ndarray, grp: np.ndarray, lo: float, hi: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-row trimming bounds within groups (order statistics, tie-safe).

    A group of n flows sorted ``x_(0) <= ... <= x_(n-1)``: ``k_lo = floor(n lo / 100)``,
    ``k_hi = floor(n (100 - hi) / 100)``, bounds ``L = x_(k_lo)`` and ``U = x_(n-1-k_hi)``; a flow is
    trimmed iff ``p < L`` or ``p > U``. So exactly ``k_lo`` (``k_hi``) flows go at each tail when
    values are distinct, fewer with ties at the bound, none when ``n < 100 / lo``.
    Returns (L, U, n) aligned with the rows.
    """
    order = np.lexsort((p, grp))
    gs = grp[order]
    ps = p[order]
    start = np.r_[True, gs[1:] != gs[:-1]]
    first = np.flatnonzero(start)
    n_g = np.diff(np.r_[first, len(gs)])
    k_lo = np.floor(n_g * lo / 100.0 + 1e-9).astype(np.int64)
    k_hi = np.floor(n_g * (100.0 - hi) / 100.0 + 1e-9).astype(np.int64)
    lo_v = ps[first + k_lo]
    hi_v = ps[first + n_g - 1 - k_hi]
    gid = np.cumsum(start) - 1
    L = np.empty(len(p))
    U = np.empty(len(p))
    N = np.empty(len(p), dtype=np.int64)
    L[order] = lo_v[gid]
    U[order] = hi_v[gid]
    N[order] = n_g[gid]
    return L, U, N


def quality_flows(
    trade_clean_year: pl.DataFrame | pl.LazyFrame,
    cfg: QualityConfig | None = None,
    *,
    firm_city: pl.DataFrame | None = None,
    hs6_units: pl.DataFrame | None = None,
    _city_table: pl.DataFrame | None = None,
) -> QualityFlows:
    """Firm x HS6 x destination x year export flows with unit values (spec S004 Eq. 18 unit ``hgft``).

    Input: trade_clean rows (contract ``trade_clean``; any number of years, normally one partition).
    Only ``flow == "export"`` rows enter (imports are not part of the accounting). Row rules, in
    order, first hit wins (reason codes :data:`FLOW_REASONS`):

    1. ``intermediary``: ``drop_intermediaries`` and the row's ``intermediary_keywords`` hit
       ``cfg.intermediary_keywords`` (or ``is_intermediary`` when that list is None);
    2. ``ag_resource_hs``: ``hs6[:2]`` in ``cfg.exclude_hs2``;
    3. ``trade_mode_excluded``: ``trade_mode_class`` not in ``cfg.trade_mode_classes``;
    4. ``no_quantity``: quantity null, non-finite or <= 0;
    5. ``mixed_unit``: the unit is not the HS6's unit (``hs6_units`` if given, else the unit with
       the largest export value among the rows still in at step 5 of the same HS6 and year, ties:
       lowest unit string) or is missing. One unit per HS6, nothing converted.

    The remaining rows are summed to flows ``(year, firm_id, hs6, partner_iso3)`` (trade modes,
    HS8 lines, plants and months added up; ``p = sum value / sum quantity``). Flow rules, applied
    to all trade_clean rows of the flow:

    6. ``min_obs_hs6``: the HS6 has fewer than ``cfg.min_obs_per_hs6`` flows (per year);
    7. ``unit_value_trim``: ``p`` outside the order-statistic bounds of :func:`_trim_bounds`
       within HS6 x year (``trim_scope``), with ``cfg.trim_percentiles``.

    The flow's city is the firm's largest-export-value city of the year over all its export rows
    (ties: lowest code) or, with ``city_assignment = "firm_city_table"``, ``firm_city`` (columns
    year, firm_id, city_code; firms absent from it fall back to the computed city and are counted).

    Columns of ``kept`` (contract ``quality_flow`` without the estimation columns): year, firm_id,
    city_code, province_code, hs6, hs4, hs2, partner_iso3, unit, value_usd, quantity, unit_value,
    ln_p, ln_q, processing_share, n_rows, source_rows, n_dest (destinations of the firm x HS6 x
    year) and ln_p_loo (mean ln p of the same firm, HS6 and year over its OTHER destinations; null
    when n_dest = 1) - the instrument of variant B.
    """
    cfg = cfg or QualityConfig()
    lf = trade_clean_year.lazy() if isinstance(trade_clean_year, pl.DataFrame) else trade_clean_year
    names = lf.collect_schema().names()
    missing = [c for c in _FLOW_NEEDED if c not in names]
    if missing:
        raise ValueError(f"quality_flows: trade_clean input lacks column(s) {missing}")
    if cfg.intermediary_keywords is None:
        inter = pl.col("is_intermediary").fill_null(False)
    else:
        kw = list(cfg.intermediary_keywords)
        inter = pl.col("intermediary_keywords").list.eval(pl.element().is_in(kw)).list.any().fill_null(False)
    carry = [c for c in _FLOW_CARRY if c in names]
    base_cols = [c for c in _FLOW_NEEDED if c not in ("flow", "intermediary_keywords", "is_intermediary")]
    df = (
        lf.filter(pl.col("flow") == "export")
        .select(*base_cols, *carry, inter.alias("_inter"))
        .with_columns(*[pl.lit(None, dtype=pl.String).alias(c) for c in _FLOW_CARRY if c not in names])
        .with_columns(pl.col("year").cast(pl.Int32), pl.col("quantity").cast(pl.Float64),
                      pl.col("value_usd").cast(pl.Float64), pl.col("source_rows").cast(pl.Float64))
        .collect()
        .with_row_index("_rid")
    )
    if df.height and bool((~(df["value_usd"] > 0)).fill_null(True).any()):
        raise ValueError("quality_flows: value_usd <= 0 or null in trade_clean export rows (contract "
                         "trade_clean: value_usd > 0)")
    rows_in = df.height
    value_in = float(df["value_usd"].sum() or 0.0)

    # ---- city of the firm-year (before any exclusion: a property of the firm) ---------------------
    if _city_table is not None:
        main_city = _city_table.select("year", "firm_id", pl.col("city_code").alias("_city"))
    else:
        main_city = main_export_city(df).rename({"city_code": "_city"})
    n_firm_city_fallback = 0
    if cfg.city_assignment == "firm_city_table" and _city_table is None:
        if firm_city is None:
            raise ValueError("quality_flows: city_assignment='firm_city_table' needs the firm_city table")
        fc = firm_city.select(pl.col("year").cast(pl.Int32), "firm_id", pl.col("city_code").alias("_fc"))
        if fc.select(pl.struct("year", "firm_id").is_duplicated().any()).item():
            raise ValueError("quality_flows: firm_city has duplicate (year, firm_id) keys")
        main_city = main_city.join(fc, on=["year", "firm_id"], how="left")
        n_firm_city_fallback = int(main_city["_fc"].null_count())
        main_city = main_city.select("year", "firm_id", pl.coalesce("_fc", "_city").alias("_city"))

    # ---- row rules 1-4 ------------------------------------------------------------------------------
    hs2 = pl.col("hs6").str.slice(0, 2)
    q = pl.col("quantity")
    reason = (
        pl.when(pl.lit(cfg.drop_intermediaries) & pl.col("_inter")).then(pl.lit("intermediary"))
        .when(hs2.is_in(list(cfg.exclude_hs2))).then(pl.lit("ag_resource_hs"))
        .when(~pl.col("trade_mode_class").is_in(list(cfg.trade_mode_classes))).then(pl.lit("trade_mode_excluded"))
        .when(q.is_null() | ~q.is_finite() | (q <= 0)).then(pl.lit("no_quantity"))
        .otherwise(pl.lit(None, dtype=pl.String))
    )
    df = df.with_columns(reason.alias("_reason"))

    # ---- rule 5: one unit per HS6 ----------------------------------------------------------------------
    if hs6_units is not None:
        units = hs6_units.select("hs6", pl.col("unit").alias("_hs6_unit"))
        if units["hs6"].is_duplicated().any():
            raise ValueError("quality_flows: hs6_units has more than one unit for an HS6")
        df = df.join(units, on="hs6", how="left", maintain_order="left")
    else:
        units = (
            df.filter(pl.col("_reason").is_null() & pl.col("unit").is_not_null())
            .group_by("year", "hs6", "unit").agg(pl.col("value_usd").sum().alias("_v"))
            .group_by("year", "hs6")
            .agg(pl.col("unit").sort_by(["_v", "unit"], descending=[True, False]).first().alias("_hs6_unit"))
        )
        df = df.join(units, on=["year", "hs6"], how="left", maintain_order="left")
    bad_unit = pl.col("_reason").is_null() & (
        pl.col("unit").is_null() | pl.col("_hs6_unit").is_null() | (pl.col("unit") != pl.col("_hs6_unit"))
    )
    df = df.with_columns(pl.when(bad_unit).then(pl.lit("mixed_unit")).otherwise(pl.col("_reason")).alias("_reason"))
    detail = (
        pl.when(pl.col("reason") == "ag_resource_hs").then(pl.lit("HS chapter ") + hs2)
        .when(pl.col("reason") == "trade_mode_excluded").then(pl.lit("trade_mode_class ") + pl.col("trade_mode_class"))
        .when(pl.col("reason") == "no_quantity").then(pl.lit("quantity ") + q.cast(pl.String).fill_null("null"))
        .when(pl.col("reason") == "mixed_unit").then(
            pl.lit("unit ") + pl.col("unit").fill_null("null") + pl.lit(" != HS6 unit ")
            + pl.col("_hs6_unit").fill_null("null"))
        .otherwise(pl.lit(None, dtype=pl.String))
    )
    bad_rows = df.filter(pl.col("_reason").is_not_null()).rename({"_reason": "reason"}).with_columns(
        detail.alias("rule_detail"))

    # ---- aggregate the surviving rows to flows (sorted by the flow key: flows are contiguous runs) --------
    ok = df.filter(pl.col("_reason").is_null()).drop("_reason", "_hs6_unit", "_inter").sort(_FLOW_KEY)
    del df
    if ok.height:
        new = pl.any_horizontal([pl.col(c) != pl.col(c).shift(1) for c in _FLOW_KEY]).fill_null(True)
        fid = ok.select((new.cast(pl.Int64).cum_sum() - 1).alias("_fid")).to_series().to_numpy()
    else:
        fid = np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, fid[1:] != fid[:-1]]) if len(fid) else np.zeros(0, dtype=np.int64)
    n_flows = len(starts)

    def _sum(col: str | np.ndarray) -> np.ndarray:
        a = ok[col].to_numpy() if isinstance(col, str) else col
        return np.add.reduceat(a, starts) if n_flows else np.zeros(0)

    proc = np.where(ok["trade_mode_class"].to_numpy() == "processing", ok["value_usd"].to_numpy(), 0.0) \
        if ok.height else np.zeros(0)
    flows = ok[starts].select(*_FLOW_KEY, "unit").with_columns(
        pl.Series("value_usd", _sum("value_usd")),
        pl.Series("quantity", _sum("quantity")),
        pl.Series("_v_proc", _sum(proc)),
        pl.Series("n_rows", np.diff(np.r_[starts, ok.height]).astype(np.int64)),
        pl.Series("source_rows", _sum("source_rows")),
    ).with_columns((pl.col("value_usd") / pl.col("quantity")).alias("unit_value"))

    # rule 6: minimum number of flows per HS6 (per year); rule 7: trimming among the survivors
    n_hs6 = flows.select(pl.len().over("year", "hs6")).to_series().to_numpy() if n_flows else np.zeros(0, int)
    few = n_hs6 < cfg.min_obs_per_hs6
    trim = np.zeros(n_flows, dtype=bool)
    L = np.full(n_flows, np.nan)
    U = np.full(n_flows, np.nan)
    N = np.zeros(n_flows, dtype=np.int64)
    if cfg.trim_percentiles is not None and (~few).any():
        lo, hi = cfg.trim_percentiles
        keys = ["year", "hs6"] if cfg.trim_scope == "hs6_year" else ["hs6"]
        grp_all = flows.select(pl.struct(keys).rank("dense")).to_series().to_numpy().astype(np.int64)
        idx = np.flatnonzero(~few)
        p = flows["unit_value"].to_numpy()[idx]
        L[idx], U[idx], N[idx] = _trim_bounds(p, grp_all[idx], lo, hi)
        trim[idx] = (p < L[idx]) | (p > U[idx])
    lo_s, hi_s = (f"{x:g}" for x in (cfg.trim_percentiles or (0, 100)))
    flows = flows.with_columns(
        pl.Series("_few", few), pl.Series("_trim", trim), pl.Series("_L", L), pl.Series("_U", U),
        pl.Series("_N", N), pl.Series("_nh", n_hs6.astype(np.int64)),
    )
    flow_reason = (
        pl.when(pl.col("_few")).then(pl.lit("min_obs_hs6"))
        .when(pl.col("_trim")).then(pl.lit("unit_value_trim"))
        .otherwise(pl.lit(None, dtype=pl.String))
    )
    flow_detail = (
        pl.when(pl.col("_few")).then(pl.format("HS6 has {} flows < {}", pl.col("_nh"), pl.lit(cfg.min_obs_per_hs6)))
        .when(pl.col("_trim") & (pl.col("unit_value") < pl.col("_L"))).then(
            pl.format("unit value {} < P{} bound {} (HS6 group of {} flows)", pl.col("unit_value"), pl.lit(lo_s),
                      pl.col("_L"), pl.col("_N")))
        .when(pl.col("_trim")).then(
            pl.format("unit value {} > P{} bound {} (HS6 group of {} flows)", pl.col("unit_value"), pl.lit(hi_s),
                      pl.col("_U"), pl.col("_N")))
        .otherwise(pl.lit(None, dtype=pl.String))
    )
    flows = flows.with_columns(flow_reason.alias("_freason"), flow_detail.alias("_fdetail"))

    # flow-level reasons back to their trade_clean rows (by the run index, no join)
    dropped = (few | trim)
    if dropped.any():
        rows_drop = dropped[fid]
        fl_rows = ok.filter(pl.Series(rows_drop)).with_columns(
            flows["_freason"].gather(fid[rows_drop]).alias("reason"),
            flows["_fdetail"].gather(fid[rows_drop]).alias("rule_detail"),
        )
    else:
        fl_rows = ok.clear().with_columns(pl.lit(None, dtype=pl.String).alias("reason"),
                                          pl.lit(None, dtype=pl.String).alias("rule_detail"))
    quarantine = (
        pl.concat([bad_rows.select("_rid", *QUARANTINE_SCHEMA), fl_rows.select("_rid", *QUARANTINE_SCHEMA)],
                  how="vertical_relaxed")
        .sort("_rid").drop("_rid").cast(QUARANTINE_SCHEMA)
    )

    kept = flows.filter(~pl.Series(dropped)).drop("_freason", "_fdetail", "_few", "_trim", "_L", "_U", "_N", "_nh")
    kept = kept.join(main_city, on=["year", "firm_id"], how="left", maintain_order="left").rename({"_city": "city_code"})
    kept = kept.with_columns(
        pl.col("city_code").str.slice(0, 2).alias("province_code"),
        pl.col("hs6").str.slice(0, 4).alias("hs4"),
        pl.col("hs6").str.slice(0, 2).alias("hs2"),
        pl.col("unit_value").log().alias("ln_p"),
        pl.col("quantity").log().alias("ln_q"),
        (pl.col("_v_proc") / pl.col("value_usd")).alias("processing_share"),
    )
    fh = ["year", "firm_id", "hs6"]
    kept = kept.with_columns(
        pl.len().over(fh).cast(pl.Int32).alias("n_dest"),
        pl.col("ln_p").sum().over(fh).alias("_s"),
    ).with_columns(
        pl.when(pl.col("n_dest") > 1)
        .then((pl.col("_s") - pl.col("ln_p")) / (pl.col("n_dest") - 1).cast(pl.Float64))
        .otherwise(None).alias("ln_p_loo")
    ).select(
        "year", "firm_id", "city_code", "province_code", "hs6", "hs4", "hs2", "partner_iso3", "unit",
        "value_usd", "quantity", "unit_value", "ln_p", "ln_q", "processing_share", "n_rows",
        "source_rows", "n_dest", "ln_p_loo",
    )

    rows_kept = int(kept["n_rows"].sum() or 0)
    value_kept = float(kept["value_usd"].sum() or 0.0)
    value_q = float(quarantine["value_usd"].sum() or 0.0)
    by_reason = {r: 0 for r in FLOW_REASONS}
    by_reason_value = {r: 0.0 for r in FLOW_REASONS}
    for r, n, v in quarantine.group_by("reason").agg(pl.len(), pl.col("value_usd").sum()).iter_rows():
        by_reason[r] = int(n)
        by_reason_value[r] = float(v)
    acc = {
        "rows_in": rows_in,
        "value_in": value_in,
        "rows_kept": rows_kept,
        "value_kept": value_kept,
        "rows_quarantined": quarantine.height,
        "value_quarantined": value_q,
        "flows_kept": kept.height,
        "flows_dropped": int(dropped.sum()),
        "by_reason": by_reason,
        "by_reason_value": by_reason_value,
        "n_firm_city_fallback": n_firm_city_fallback,
        "identity_rows_ok": rows_in == rows_kept + quarantine.height,
        "identity_value_ok": math.isclose(value_in, value_kept + value_q, rel_tol=1e-9, abs_tol=1e-6),
    }
    if not acc["identity_rows_ok"]:  # a bug, never data: fail loudly
        raise AssertionError(f"quality_flows lost rows: {acc}")
    return QualityFlows(kept, quarantine, acc)


def main_export_city(trade_clean: pl.DataFrame | pl.LazyFrame) -> pl.DataFrame:
    """(year, firm_id, city_code): the firm's largest-export-value city of the year (ties: lowest code).

    Computed over ALL export rows of the firm (before the quality exclusions). Lazy input is
    aggregated without materialising the rows.
    """
    lf = trade_clean.lazy() if isinstance(trade_clean, pl.DataFrame) else trade_clean
    if "flow" in lf.collect_schema().names():
        lf = lf.filter(pl.col("flow") == "export")
    return (
        lf.group_by(pl.col("year").cast(pl.Int32), "firm_id", "city_code")
        .agg(pl.col("value_usd").sum().alias("_v"))
        .group_by("year", "firm_id")
        .agg(pl.col("city_code").sort_by(["_v", "city_code"], descending=[True, False]).first())
        .collect()
    )


def quality_flows_chunked(
    trade_clean_year: pl.DataFrame | pl.LazyFrame,
    cfg: QualityConfig | None = None,
    *,
    n_chunks: int = 8,
    firm_city: pl.DataFrame | None = None,
    hs6_units: pl.DataFrame | None = None,
) -> QualityFlows:
    """:func:`quality_flows` in bounded memory: the same result, computed by HS2-chapter chunks.

    Every rule after the firm's city is local to an HS6 (unit rule, minimum count, trimming) or to
    a firm x HS6 (the leave-one-destination-out instrument), so the rows of disjoint sets of HS2
    chapters can be processed one set at a time once the firm-year city is known. The city is
    computed first in one lazy aggregation over the whole year. Peak memory is about one chunk of
    rows instead of the whole year. ``kept`` is sorted by the flow key like :func:`quality_flows`;
    the quarantine is in chunk order, input order within a chunk; the accounting is summed.
    """
    cfg = cfg or QualityConfig()
    lf = trade_clean_year.lazy() if isinstance(trade_clean_year, pl.DataFrame) else trade_clean_year
    lf = lf.filter(pl.col("flow") == "export")
    city = main_export_city(lf)
    n_fallback = 0
    if cfg.city_assignment == "firm_city_table":
        if firm_city is None:
            raise ValueError("quality_flows: city_assignment='firm_city_table' needs the firm_city table")
        fc = firm_city.select(pl.col("year").cast(pl.Int32), "firm_id", pl.col("city_code").alias("_fc"))
        if fc.select(pl.struct("year", "firm_id").is_duplicated().any()).item():
            raise ValueError("quality_flows: firm_city has duplicate (year, firm_id) keys")
        city = city.join(fc, on=["year", "firm_id"], how="left")
        n_fallback = int(city["_fc"].null_count())
        city = city.select("year", "firm_id", pl.coalesce("_fc", "city_code").alias("city_code"))
    chapters = sorted(lf.select(pl.col("hs6").str.slice(0, 2).unique()).collect().to_series().drop_nulls().to_list())
    groups = [chapters[i::max(1, n_chunks)] for i in range(max(1, n_chunks))]
    kept, quar, accs = [], [], []
    for g in groups:
        if not g:
            continue
        part = lf.filter(pl.col("hs6").str.slice(0, 2).is_in(g))
        r = quality_flows(part, cfg, hs6_units=hs6_units, _city_table=city)
        kept.append(r.kept)
        quar.append(r.quarantine)
        accs.append(r.accounting)
    if not kept:
        return quality_flows(lf, cfg, firm_city=firm_city, hs6_units=hs6_units)
    acc: dict[str, Any] = {}
    for k in ("rows_in", "value_in", "rows_kept", "value_kept", "rows_quarantined", "value_quarantined",
              "flows_kept", "flows_dropped"):
        acc[k] = sum(a[k] for a in accs)
    acc["n_firm_city_fallback"] = n_fallback
    acc["by_reason"] = {r: sum(a["by_reason"][r] for a in accs) for r in FLOW_REASONS}
    acc["by_reason_value"] = {r: sum(a["by_reason_value"][r] for a in accs) for r in FLOW_REASONS}
    acc["identity_rows_ok"] = acc["rows_in"] == acc["rows_kept"] + acc["rows_quarantined"]
    acc["identity_value_ok"] = math.isclose(acc["value_in"], acc["value_kept"] + acc["value_quarantined"],
                                            rel_tol=1e-9, abs_tol=1e-6)
    acc["n_chunks"] = len(accs)
    return QualityFlows(pl.concat(kept).sort(_FLOW_KEY), pl.concat(quar), acc)


# ==================================================================================================
# 2. elasticities
# ==================================================================================================
@dataclass
class SigmaMap:
    """Sigma by study HS6 (:func:`map_sigma`) and the merge report."""

    table: pl.DataFrame
    report: dict[str, Any] = field(default_factory=dict)


def _validate_sigma_table(sigma_table: pl.DataFrame, country: str | None) -> pl.DataFrame:
    for c in ("hs3", "sigma"):
        if c not in sigma_table.columns:
            raise ValueError(f"sigma table: missing column {c!r} (contract elasticity_sigma)")
    st = sigma_table.with_row_index("_row", offset=1)
    if "country_code" in st.columns:
        n_c = st["country_code"].n_unique()
        if country is not None:
            st = st.filter(pl.col("country_code") == country)
            if st.height == 0:
                raise ValueError(f"sigma table: no rows for sigma_country {country!r}")
        elif n_c > 1:
            raise ValueError(f"sigma table has {n_c} countries; set sigma_country")
    st = st.with_columns(pl.col("hs3").cast(pl.String).str.strip_chars(), pl.col("sigma").cast(pl.Float64))
    bad = st.filter(~pl.col("hs3").str.contains(r"^[0-9]{3}$"))
    if bad.height:
        r = bad.row(0, named=True)
        raise ValueError(f"sigma table row {r['_row']}: hs3 {r['hs3']!r} is not a 3-digit code")
    bad = st.filter(pl.col("sigma").is_null() | ~pl.col("sigma").is_finite())
    if bad.height:
        r = bad.row(0, named=True)
        raise ValueError(f"sigma table row {r['_row']}: sigma {r['sigma']!r} is not a finite number (hs3 {r['hs3']})")
    dup = st.filter(pl.col("hs3").is_duplicated())
    if dup.height:
        raise ValueError(f"sigma table: hs3 {dup['hs3'][0]!r} occurs more than once (rows "
                         f"{dup.filter(pl.col('hs3') == dup['hs3'][0])['_row'].to_list()})")
    return st.select("hs3", "sigma")


def map_sigma(
    sigma_table: pl.DataFrame,
    source_vintage: str,
    target_vintage: str,
    *,
    hs6_codes: list[str] | pl.Series | None = None,
    country: str | None = None,
    mode: Literal["single_target", "value_split"] = "single_target",
) -> SigmaMap:
    """Map HS3 elasticities of ``source_vintage`` to the study's HS6 codes of ``target_vintage``.

    Each study HS6 is taken to ``source_vintage`` with the concordance layer
    (``reference.hs.concordance(target_vintage, source_vintage, mode)``); the HS3 is the first three
    digits of the source HS6. ``single_target``: the largest-weight source code decides the HS3.
    ``value_split``: sigma is the weight average over the source codes whose HS3 has a sigma
    (weights renormalised over the matched ones); ``hs3_source`` is the largest-weight matched HS3.

    Output ``table`` columns: hs6, hs3_source, sigma, sigma_status in {ok, sigma_le_1, unmatched}
    (``unmatched``: the HS6 has no concordance row or its HS3 is not in the table). ``report``:
    counts, match rate, the unmatched codes (sorted) and their HS3s, the sigma <= 1 codes.
    ``hs6_codes`` defaults to every valid code of ``target_vintage``.
    """
    from kspill_pipeline.reference import hs as hsref

    st = _validate_sigma_table(sigma_table, country)
    if hs6_codes is None:
        codes = sorted(hsref.valid_codes(target_vintage))
    else:
        codes = sorted(set(pl.Series(hs6_codes, dtype=pl.String).to_list()))
    bad = [c for c in codes if not (isinstance(c, str) and len(c) == 6 and c.isdigit())]
    if bad:
        raise ValueError(f"map_sigma: hs6 codes not 6 digits: {bad[:5]}")
    conc = hsref.concordance(target_vintage, source_vintage, mode).select(
        pl.col("source_hs6").alias("hs6"), pl.col("target_hs6").alias("src_hs6"), "weight"
    )
    base = pl.DataFrame({"hs6": codes}, schema={"hs6": pl.String})
    m = (
        base.join(conc, on="hs6", how="left")
        .with_columns(pl.col("src_hs6").str.slice(0, 3).alias("hs3_source"))
        .join(st, left_on="hs3_source", right_on="hs3", how="left")
    )
    if mode == "single_target":
        out = m.select("hs6", "hs3_source", "sigma")
    else:
        mm = m.filter(pl.col("sigma").is_not_null())
        agg = (
            mm.group_by("hs6", "hs3_source").agg(pl.col("weight").sum(), pl.col("sigma").first())
            .with_columns((pl.col("weight") / pl.col("weight").sum().over("hs6")).alias("w"))
            .sort(["hs6", "w", "hs3_source"], descending=[False, True, False])
            .group_by("hs6", maintain_order=True)
            .agg(pl.col("hs3_source").first(), (pl.col("w") * pl.col("sigma")).sum().alias("sigma"))
        )
        first_hs3 = (
            m.sort(["hs6", "weight", "hs3_source"], descending=[False, True, False], nulls_last=True)
            .group_by("hs6", maintain_order=True).agg(pl.col("hs3_source").first().alias("_h"))
        )
        out = (
            base.join(agg, on="hs6", how="left").join(first_hs3, on="hs6", how="left")
            .select("hs6", pl.coalesce("hs3_source", "_h").alias("hs3_source"), "sigma")
        )
    out = out.with_columns(
        pl.when(pl.col("sigma").is_null()).then(pl.lit("unmatched"))
        .when(pl.col("sigma") <= 1).then(pl.lit("sigma_le_1"))
        .otherwise(pl.lit("ok")).alias("sigma_status")
    ).sort("hs6")
    unmatched = out.filter(pl.col("sigma_status") == "unmatched")
    le1 = out.filter(pl.col("sigma_status") == "sigma_le_1")
    report = {
        "source_vintage": source_vintage,
        "target_vintage": target_vintage,
        "mode": mode,
        "country": country,
        "n_products": out.height,
        "n_matched": int(out.height - unmatched.height),
        "n_unmatched": unmatched.height,
        "match_rate": (out.height - unmatched.height) / out.height if out.height else float("nan"),
        "n_sigma_le_1": le1.height,
        "unmatched_hs6": unmatched["hs6"].to_list(),
        "unmatched_hs3": sorted({h for h in unmatched["hs3_source"].to_list() if h is not None}),
        "no_concordance_hs6": unmatched.filter(pl.col("hs3_source").is_null())["hs6"].to_list(),
        "sigma_le_1_hs6": le1["hs6"].to_list(),
    }
    return SigmaMap(out, report)


# ==================================================================================================
# fixed effects: exact two-way absorption
# ==================================================================================================
def _dense_codes(df: pl.DataFrame, cols: list[str]) -> np.ndarray:
    """Dense 0-based integer codes of the combined key ``cols`` (order of first sort)."""
    if len(cols) == 1:
        s = df.get_column(cols[0])
        return (s.rank("dense").cast(pl.Int64) - 1).to_numpy()
    return (df.select(pl.struct(cols).rank("dense")).to_series().cast(pl.Int64) - 1).to_numpy()


def _recode(c: np.ndarray) -> tuple[np.ndarray, int]:
    u, inv = np.unique(c, return_inverse=True)
    return inv.astype(np.int64), len(u)


def drop_singletons(codes: list[np.ndarray], mask: np.ndarray | None = None) -> np.ndarray:
    """Mask of observations kept after iteratively removing singletons of every FE dimension.

    An observation is a singleton when its level of some FE dimension has no other observation in
    the current sample; removing one can create another, so this repeats until none is left
    (Correia's reghdfe rule, what pyfixest ``fixef_rm="singleton"`` does).
    """
    n = len(codes[0])
    keep = np.ones(n, dtype=bool) if mask is None else mask.copy()
    while True:
        changed = False
        for c in codes:
            cnt = np.bincount(c[keep], minlength=int(c.max()) + 1 if n else 0)
            bad = keep & (cnt[c] < 2)
            if bad.any():
                keep &= ~bad
                changed = True
        if not changed:
            return keep


class TwoWayFE:
    """Exact projection off two sets of fixed effects (dummies of ``a`` and ``b``).

    ``residualise(Y)`` returns ``M Y`` with ``M = I - D (D'D)^+ D'``, ``D = [D_a, D_b]``, for every
    column of ``Y`` (see the module docstring for the Schur-complement solve). ``rank`` is the
    rank of ``D`` (``n_a + n_b - n_components``), ``components`` the component of each observation.
    """

    def __init__(self, a: np.ndarray, b: np.ndarray, *, solver: str = "auto", dense_max: int = 4000):
        import scipy.sparse as sp
        from scipy.sparse.csgraph import connected_components

        a, na = _recode(np.asarray(a))
        b, nb = _recode(np.asarray(b))
        if nb > na:  # eliminate the larger dimension, solve in the smaller one
            a, b, na, nb = b, a, nb, na
        self.n = len(a)
        self.a, self.b, self.na, self.nb = a, b, na, nb
        ones = np.ones(self.n)
        self.Da = sp.csr_matrix((ones, (np.arange(self.n), a)), shape=(self.n, na))
        self.Db = sp.csr_matrix((ones, (np.arange(self.n), b)), shape=(self.n, nb))
        C = (self.Da.T @ self.Db).tocsr()  # na x nb counts
        self.C = C
        self.cnt_a = np.bincount(a, minlength=na).astype(float)
        self.cnt_b = np.bincount(b, minlength=nb).astype(float)
        graph = sp.bmat([[None, C], [C.T, None]], format="csr")
        n_comp, labels = connected_components(graph, directed=False)
        self.n_components = int(n_comp)
        self.comp_of_b = labels[na:]
        self.components = labels[a]
        self.rank = na + nb - self.n_components
        # pin the first B level of every component
        _, first_b = np.unique(self.comp_of_b, return_index=True)
        free = np.ones(nb, dtype=bool)
        free[first_b] = False
        self.free = np.flatnonzero(free)
        S = sp.diags(self.cnt_b) - (C.T @ sp.diags(1.0 / self.cnt_a) @ C)
        S = S.tocsr()[self.free][:, self.free]
        self.m = len(self.free)
        use_dense = solver == "dense" or (solver == "auto" and self.m <= dense_max)
        self.method = "dense_cholesky" if use_dense else "sparse_lu"
        if self.m == 0:
            self._solve = lambda r: np.zeros((0, r.shape[1]))
        elif use_dense:
            from scipy.linalg import cho_factor, cho_solve

            fac = cho_factor(S.toarray(), lower=False, check_finite=False)
            self._solve = lambda r: cho_solve(fac, r, check_finite=False)
        else:
            from scipy.sparse.linalg import splu

            lu = splu(S.tocsc())
            self._solve = lambda r: lu.solve(np.ascontiguousarray(r))

    def _fit(self, Y: np.ndarray) -> np.ndarray:
        sA = self.Da.T @ Y
        sB = self.Db.T @ Y
        rhs = sB - self.C.T @ (sA / self.cnt_a[:, None])
        beta = np.zeros((self.nb, Y.shape[1]))
        if self.m:
            beta[self.free] = self._solve(rhs[self.free])
        alpha = (sA - self.C @ beta) / self.cnt_a[:, None]
        return alpha[self.a] + beta[self.b]

    def residualise(self, Y: np.ndarray) -> np.ndarray:
        Y = np.asarray(Y, dtype=float)
        one = Y.ndim == 1
        Y2 = Y[:, None] if one else Y
        R = Y2 - self._fit(Y2)
        R = R - self._fit(R)  # one refinement step (R is already ~orthogonal; removes rounding)
        return R[:, 0] if one else R


# ==================================================================================================
# 3. estimation (Eqs. 18-19)
# ==================================================================================================
@dataclass
class QualityFit:
    """Output of :func:`estimate_quality`: the flows with quality columns, and the fit report."""

    flows: pl.DataFrame
    report: dict[str, Any] = field(default_factory=dict)


def _group_sums(g: np.ndarray, ng: int, *cols: np.ndarray) -> np.ndarray:
    return np.stack([np.bincount(g, weights=c, minlength=ng) for c in cols], axis=-1)


def estimate_quality(
    flows: pl.DataFrame,
    sigma: SigmaMap | pl.DataFrame,
    cfg: QualityConfig | None = None,
    *,
    prov_gdp: pl.DataFrame | None = None,
) -> QualityFit:
    """Quality ``qua = residual / (sigma_h - 1)`` from Eq. (18) (spec S004 Eqs. 18-19).

    ``flows``: output of :func:`quality_flows` (one or several years). ``sigma``: :func:`map_sigma`
    output (or its table: hs6, sigma[, hs3_source]). ``prov_gdp``: columns province_code, year,
    ln_gdp_real (ln provincial real GDP), used per ``cfg.gdp_control``.

    Variant A (``A_ksw_sigma_imposed``): ``y = ln q + sigma_h ln p`` on the fixed effects
    [+ ln GDP]; ``resid`` is the OLS residual. Variant B (``B_2sls_loo_price_iv``): ``ln q`` on
    ``ln p`` instrumented by ``ln_p_loo`` with the same fixed effects and control (just identified,
    ``b = (Z'X)^-1 Z'y`` after absorbing the FE, group-specific with ``grouping``); ``resid`` is the
    structural residual ``ln q - b ln p - FE [- g ln GDP]``; the first-stage F of the excluded
    instrument (iid, partialled on FE and control) is reported per group. Both: ``qua = resid /
    (sigma_h - 1)`` with the table's sigma.

    Sample rules (``est_status``, first hit): ``no_sigma`` (no sigma for the HS6), ``sigma_le_1``,
    ``no_control`` (GDP used and missing for the province-year), ``no_loo_iv`` (variant B, the firm
    exports the HS6 to one destination only), ``singleton`` (``singletons = "drop"``, iterated),
    ``not_identified`` (variant B group without first-stage variation); ``ok`` rows get
    ``resid`` and ``qua``, the others nulls. Row order and all input columns are preserved.

    Added columns: sigma, hs3_source, ln_gdp_real (null when the control is not used), est_group,
    y, est_status, resid, qua, variant (contract ``quality_flow``).
    """
    cfg = cfg or QualityConfig()
    need = ["year", "hs6", "partner_iso3", "ln_p", "ln_q", "province_code"]
    if cfg.variant == "B_2sls_loo_price_iv":
        need.append("ln_p_loo")
    miss = [c for c in need if c not in flows.columns]
    if miss:
        raise ValueError(f"estimate_quality: flows lack column(s) {miss}")
    stab = sigma.table if isinstance(sigma, SigmaMap) else sigma
    if "hs3_source" not in stab.columns:
        stab = stab.with_columns(pl.lit(None, dtype=pl.String).alias("hs3_source"))
    stab = stab.select("hs6", pl.col("sigma").cast(pl.Float64), "hs3_source")
    if stab["hs6"].is_duplicated().any():
        raise ValueError("estimate_quality: sigma table has duplicate hs6 rows")
    for c in ("sigma", "hs3_source", "ln_gdp_real", "variant", "est_group", "y", "resid", "qua", "est_status"):
        if c in flows.columns:
            raise ValueError(f"estimate_quality: flows already have a {c!r} column (estimated twice?)")

    use_gdp = cfg.gdp_control != "off" and prov_gdp is not None
    if cfg.gdp_control == "required" and prov_gdp is None:
        raise ValueError("estimate_quality: gdp_control='required' but no prov_gdp table was passed")
    df = flows.with_row_index("_i").join(stab, on="hs6", how="left", maintain_order="left")
    if use_gdp:
        g = prov_gdp.select(pl.col("province_code").cast(pl.String), pl.col("year").cast(pl.Int32),
                            pl.col("ln_gdp_real").cast(pl.Float64))
        if g.select(pl.struct("province_code", "year").is_duplicated().any()).item():
            raise ValueError("estimate_quality: prov_gdp has duplicate (province_code, year) rows")
        df = df.with_columns(pl.col("year").cast(pl.Int32)).join(
            g, on=["province_code", "year"], how="left", maintain_order="left")
    else:
        df = df.with_columns(pl.lit(0.0).alias("ln_gdp_real"))
    df = df.sort("_i")
    variant_b = cfg.variant == "B_2sls_loo_price_iv"
    gkey = {"pooled": None, "by_hs2": 2, "by_hs3": 3, "by_hs6": 6}[cfg.grouping]
    df = df.with_columns(
        (pl.lit("all") if gkey is None else pl.col("hs6").str.slice(0, gkey)).alias("est_group"),
        (pl.col("ln_q") if variant_b else pl.col("ln_q") + pl.col("sigma") * pl.col("ln_p")).alias("y"),
    )
    status = (
        pl.when(pl.col("sigma").is_null()).then(pl.lit("no_sigma"))
        .when(pl.col("sigma") <= 1).then(pl.lit("sigma_le_1"))
        .when(pl.lit(use_gdp) & (pl.col("ln_gdp_real").is_null() | ~pl.col("ln_gdp_real").is_finite()))
        .then(pl.lit("no_control"))
        .when(pl.lit(variant_b) & (pl.col("ln_p_loo").is_null() if variant_b else pl.lit(False)))
        .then(pl.lit("no_loo_iv"))
        .otherwise(pl.lit("ok"))
    )
    df = df.with_columns(status.alias("est_status"))
    for c in ("ln_p", "ln_q"):
        bad = df.filter((pl.col("est_status") == "ok") & ~pl.col(c).is_finite())
        if bad.height:
            raise ValueError(f"estimate_quality: non-finite {c} in {bad.height} flow(s), e.g. "
                             f"hs6 {bad['hs6'][0]} year {bad['year'][0]}")

    n = df.height
    st = df["est_status"].to_numpy().astype(object)
    a_cols = ["hs6"] if cfg.fixed_effects == "hs6+dest_year" else ["hs6", "year"]
    a = _dense_codes(df, a_cols)
    b = _dense_codes(df, ["est_group", "partner_iso3", "year"])
    grp = _dense_codes(df, ["est_group"])
    mask = st == "ok"
    n_singletons = 0
    if cfg.singletons == "drop" and mask.any():
        keep = drop_singletons([a, b], mask)
        n_singletons = int((mask & ~keep).sum())
        st[mask & ~keep] = "singleton"
        mask = keep
    resid = np.full(n, np.nan)
    report: dict[str, Any] = {
        "variant": cfg.variant, "fixed_effects": cfg.fixed_effects, "grouping": cfg.grouping,
        "singletons": cfg.singletons, "gdp_control_used": use_gdp, "n_flows": n,
        "n_singletons": n_singletons,
    }
    if mask.any():
        idx = np.flatnonzero(mask)
        fe = TwoWayFE(a[idx], b[idx], solver=cfg.solver, dense_max=cfg.dense_max)
        gi, ng = _recode(grp[idx])
        yv = df["y"].to_numpy()[idx]
        cols = [yv]
        if use_gdp:
            cols.append(df["ln_gdp_real"].to_numpy()[idx])
        if variant_b:
            cols += [df["ln_p"].to_numpy()[idx], df["ln_p_loo"].to_numpy()[idx]]
        R = fe.residualise(np.column_stack(cols))
        yt = R[:, 0]
        # FE rank and residual degrees of freedom per group (components never cross groups)
        _, first_obs = np.unique(fe.components, return_index=True)
        n_comp_g = np.bincount(gi[first_obs], minlength=ng)
        na_g = np.bincount(gi[np.unique(fe.a, return_index=True)[1]], minlength=ng)
        nb_g = np.bincount(gi[np.unique(fe.b, return_index=True)[1]], minlength=ng)
        comp_rank = na_g + nb_g - n_comp_g
        nobs_g = np.bincount(gi, minlength=ng)
        report.update(n_obs=int(len(idx)), n_groups=int(ng), fe_rank=int(fe.rank),
                      fe_levels_eliminated=int(fe.na), fe_levels_solved=int(fe.nb),
                      n_components=int(fe.n_components), solver=fe.method)
        ok_g = np.ones(ng, dtype=bool)
        if not variant_b:
            if use_gdp:
                gt = R[:, 1]
                S = _group_sums(gi, ng, gt * gt, gt * yt)
                scale = _group_sums(gi, ng, cols[1] ** 2)[:, 0]
                collinear = S[:, 0] <= 1e-10 * np.maximum(scale, 1.0)
                coef = np.where(collinear, 0.0, S[:, 1] / np.where(collinear, 1.0, S[:, 0]))
                r = yt - coef[gi] * gt
                report["gdp_coef"] = coef.tolist() if ng <= 50 else None
                report["gdp_collinear_groups"] = int(collinear.sum())
            else:
                r = yt
        else:
            xt, zt = (R[:, 2], R[:, 3]) if use_gdp else (R[:, 1], R[:, 2])
            if use_gdp:
                gt = R[:, 1]
                Zc, Xc = [zt, gt], [xt, gt]
            else:
                Zc, Xc = [zt], [xt]
            k = len(Zc)
            ZX = np.stack([_group_sums(gi, ng, *[Zc[i] * Xc[j] for j in range(k)]) for i in range(k)], axis=1)
            ZZ = np.stack([_group_sums(gi, ng, *[Zc[i] * Zc[j] for j in range(k)]) for i in range(k)], axis=1)
            Zy = np.stack([_group_sums(gi, ng, Zc[i] * yt)[:, 0] for i in range(k)], axis=1)
            Zx = np.stack([_group_sums(gi, ng, Zc[i] * xt)[:, 0] for i in range(k)], axis=1)
            xx = _group_sums(gi, ng, xt * xt)[:, 0]
            zz = ZZ[:, 0, 0]
            scale_z = _group_sums(gi, ng, cols[-1] ** 2)[:, 0]
            df_g = nobs_g - comp_rank - k
            with np.errstate(divide="ignore", invalid="ignore"):
                det_ok = np.abs(np.linalg.det(ZX)) > 1e-12 * np.maximum(
                    np.abs(ZX).reshape(ng, -1).max(axis=1) ** k, 1e-300)
                ok_g = det_ok & (zz > 1e-10 * np.maximum(scale_z, 1.0)) & (df_g > 0)
                coef = np.full((ng, k), np.nan)
                if ok_g.any():
                    coef[ok_g] = np.linalg.solve(ZX[ok_g], Zy[ok_g][..., None])[..., 0]
                # first stage x~ = pi z~ [+ c g~]: F = pi_z^2 / Var(pi_z), iid
                F = np.full(ng, np.nan)
                if ok_g.any():
                    pi = np.linalg.solve(ZZ[ok_g], Zx[ok_g][..., None])[..., 0]
                    rss = xx[ok_g] - np.einsum("gi,gi->g", pi, Zx[ok_g])
                    s2 = rss / df_g[ok_g]
                    inv00 = np.linalg.inv(ZZ[ok_g])[:, 0, 0]
                    F[ok_g] = pi[:, 0] ** 2 / (s2 * inv00)
            r = yt - coef[gi, 0] * xt - (coef[gi, 1] * gt if use_gdp else 0.0)
            report["price_coef"] = coef[:, 0].tolist() if ng <= 50 else None
            report["price_coef_median"] = float(np.nanmedian(coef[:, 0])) if np.isfinite(coef[:, 0]).any() else None
            report["first_stage_F"] = F.tolist() if ng <= 50 else None
            Ff = F[np.isfinite(F)]
            report["first_stage_F_min"] = float(Ff.min()) if Ff.size else None
            report["first_stage_F_median"] = float(np.median(Ff)) if Ff.size else None
            report["share_groups_F_below_10"] = float((Ff < 10).mean()) if Ff.size else None
            if use_gdp:
                report["gdp_coef"] = coef[:, 1].tolist() if ng <= 50 else None
        bad_obs = ~ok_g[gi]
        r = np.where(bad_obs, np.nan, r)
        resid[idx] = r
        st[idx[bad_obs]] = "not_identified"
        report["n_not_identified"] = int(bad_obs.sum())
        y_dev = yv - np.bincount(gi, weights=yv, minlength=ng)[gi] / nobs_g[gi]
        ok_r = np.isfinite(r)
        has_slope = use_gdp or variant_b
        report["r2_within"] = (float(1 - np.sum(r[ok_r] ** 2) / np.sum(yt[ok_r] ** 2))
                               if has_slope and ok_r.any() and np.sum(yt[ok_r] ** 2) > 0 else None)
        report["r2"] = (float(1 - np.sum(r[ok_r] ** 2) / np.sum(y_dev[ok_r] ** 2))
                        if ok_r.any() and np.sum(y_dev[ok_r] ** 2) > 0 else None)
    else:
        report.update(n_obs=0)
    sig = df["sigma"].to_numpy()
    okf = (st == "ok") & np.isfinite(resid)
    qua = np.where(okf, resid / np.where(okf, sig - 1.0, 1.0), np.nan)
    out = df.with_columns(
        pl.Series("resid", resid).fill_nan(None),
        pl.Series("qua", qua).fill_nan(None),
        pl.Series("est_status", st.tolist(), dtype=pl.String),
        pl.lit(cfg.variant).alias("variant"),
    ).drop("_i")
    if not use_gdp:
        out = out.with_columns(pl.lit(None, dtype=pl.Float64).alias("ln_gdp_real"))
    counts = {s: 0 for s in EST_STATUSES}
    for s_, c_ in out.group_by("est_status").len().iter_rows():
        counts[s_] = int(c_)
    report["status_counts"] = counts
    tot_v = float(out["value_usd"].sum() or 0.0) if "value_usd" in out.columns else float("nan")
    if "value_usd" in out.columns and tot_v > 0:
        report["sigma_coverage_value"] = float(out.filter(pl.col("sigma") > 1)["value_usd"].sum()) / tot_v
        report["quality_coverage_value"] = float(out.filter(pl.col("qua").is_not_null())["value_usd"].sum()) / tot_v
    report["sigma_coverage_flows"] = float((out["sigma"] > 1).sum()) / n if n else float("nan")
    qv = out["qua"].drop_nulls()
    if qv.len():
        report["qua_quantiles"] = {str(p): float(qv.quantile(p, "linear")) for p in (0.01, 0.25, 0.5, 0.75, 0.99)}
        report["qua_mean"] = float(qv.mean())
        report["qua_sd"] = float(qv.std())
    return QualityFit(out, report)


# ==================================================================================================
# 4. normalisation (Eq. 20)
# ==================================================================================================
def rqua_bounds(q: pl.DataFrame | pl.LazyFrame, window: Literal["all_years", "per_year"] = "all_years") -> pl.DataFrame:
    """min / max / count of ``qua`` within HS6 (``all_years``) or HS6 x year (``per_year``).

    Works on a LazyFrame scanning every year's ``quality_flow``, so the study-wide pass holds only
    this small table (one row per HS6) in memory.
    """
    keys = ["hs6"] if window == "all_years" else ["hs6", "year"]
    lf = q.lazy() if isinstance(q, pl.DataFrame) else q
    return (
        lf.filter(pl.col("qua").is_not_null())
        .group_by(keys).agg(pl.col("qua").min().alias("qua_min"), pl.col("qua").max().alias("qua_max"),
                            pl.len().cast(pl.Int64).alias("n_qua"))
        .sort(keys).collect()
    )


def apply_rqua(
    q: pl.DataFrame,
    bounds: pl.DataFrame,
    *,
    degenerate: Literal["null", "midpoint"] = "null",
) -> pl.DataFrame:
    """``rqua = (qua - min) / (max - min)`` with ``bounds`` from :func:`rqua_bounds` (Eq. 20).

    Adds qua_min, qua_max, rqua and rqua_window (``per_year`` when ``bounds`` is keyed by year,
    else ``all_years``). ``max == min`` (an HS6 window with one quality value, or all
    equal): ``degenerate = "null"`` gives null (default: the flow carries no information about
    relative quality, and a made-up 0.5 would pull every city average toward the middle; the
    flow then drops out of the value weights of Eq. 21, which are renormalised over the flows with
    an rqua) or ``"midpoint"`` gives 0.5. Null ``qua`` gives null ``rqua``. The result is clipped
    to [0, 1] only against floating error (it is in [0, 1] by construction).
    """
    keys = [c for c in ("hs6", "year") if c in bounds.columns]
    for c in ("qua_min", "qua_max", "rqua", "rqua_window"):
        if c in q.columns:
            raise ValueError(f"apply_rqua: input already has {c!r}")
    out = q.join(bounds.select(*keys, "qua_min", "qua_max"), on=keys, how="left", maintain_order="left")
    rng = pl.col("qua_max") - pl.col("qua_min")
    deg = pl.lit(None, dtype=pl.Float64) if degenerate == "null" else pl.lit(0.5)
    return out.with_columns(
        pl.when(pl.col("qua").is_null()).then(pl.lit(None, dtype=pl.Float64))
        .when(rng > 0).then(((pl.col("qua") - pl.col("qua_min")) / rng).clip(0.0, 1.0))
        .otherwise(deg).alias("rqua"),
        pl.lit("per_year" if "year" in keys else "all_years").alias("rqua_window"),
    )


def normalise_rqua(
    q: pl.DataFrame,
    window: Literal["all_years", "per_year"] = "all_years",
    *,
    degenerate: Literal["null", "midpoint"] = "null",
) -> pl.DataFrame:
    """Eq. (20) on one in-memory frame: :func:`rqua_bounds` then :func:`apply_rqua`."""
    return apply_rqua(q, rqua_bounds(q, window), degenerate=degenerate)


# ==================================================================================================
# 5. aggregation (Eq. 21)
# ==================================================================================================
AGG_LEVELS: dict[str, tuple[list[str], str]] = {
    "firm_hs6": (["year", "firm_id", "hs6"], "firm_hs6_qua"),
    "city_hs6": (["year", "city_code", "hs6"], "hs6_qua"),
    "city_hs4": (["year", "city_code", "hs4"], "hs4_qua"),
}


def aggregate_quality(
    flows: pl.DataFrame,
    level: Literal["firm_hs6", "city_hs6", "city_hs4"],
    *,
    quality_col: str = "rqua",
    tol: float = 1e-9,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Export-value-weighted quality per cell (spec S004 Eq. 21, intended reading).

    ``Q_cell = sum_i w_i rqua_i``, ``w_i = value_i / sum_{i' in cell, rqua not null} value_i'``
    over the flows i (firm x HS6 x destination) of the cell with a non-null ``rqua``. Levels:
    ``firm_hs6`` (year, firm_id, hs6 -> firm_hs6_qua; city_code of the firm kept), ``city_hs6``
    (year, city_code, hs6 -> hs6_qua), ``city_hs4`` (year, city_code, hs4 -> hs4_qua). Cells
    without any rated flow are absent.

    Returns (frame, check). Frame columns: keys [, city_code for firm_hs6], quality column,
    value_usd (rated flows), value_usd_all (all flows of the cell), n_flows, n_firms, weight_sum
    (``sum_i w_i`` computed from the weights themselves), variant when present. ``check``:
    max |weight_sum - 1|, number of cells over ``tol``, ``passed``.
    """
    if level not in AGG_LEVELS:
        raise ValueError(f"aggregate_quality: unknown level {level!r}; expected {sorted(AGG_LEVELS)}")
    keys, qname = AGG_LEVELS[level]
    src = flows
    if "hs4" not in src.columns:
        src = src.with_columns(pl.col("hs6").str.slice(0, 4).alias("hs4"))
    allv = src.group_by(keys).agg(pl.col("value_usd").sum().alias("value_usd_all"))
    rated = src.filter(pl.col(quality_col).is_not_null())
    w = pl.col("value_usd") / pl.col("value_usd").sum().over(keys)
    rated = rated.with_columns(w.alias("_w"))
    extra = [pl.col("city_code").first()] if level == "firm_hs6" else []
    if "variant" in rated.columns:
        extra.append(pl.col("variant").first())
    agg = (
        rated.group_by(keys).agg(
            # a weighted mean lies within the cell's min and max; the clip removes only the rounding
            # of a weight sum 1-2 ulps above 1 (e.g. every rqua = 1 giving 1 + 2e-16)
            (pl.col("_w") * pl.col(quality_col)).sum()
            .clip(pl.col(quality_col).min(), pl.col(quality_col).max()).alias(qname),
            pl.col("value_usd").sum(),
            pl.len().cast(pl.Int64).alias("n_flows"),
            pl.col("firm_id").n_unique().cast(pl.Int64).alias("n_firms"),
            pl.col("_w").sum().alias("weight_sum"),
            *extra,
        )
        .join(allv, on=keys, how="left")
        .sort(keys)
    )
    first = keys + (["city_code"] if level == "firm_hs6" else [])
    order = first + [qname, "value_usd", "value_usd_all", "n_flows", "n_firms", "weight_sum"]
    if "variant" in agg.columns:
        order.append("variant")
    agg = agg.select(order)
    dev = (agg["weight_sum"] - 1.0).abs()
    check = {
        "level": level,
        "n_cells": agg.height,
        "max_abs_weight_sum_minus_1": float(dev.max()) if agg.height else 0.0,
        "n_cells_over_tol": int((dev > tol).sum()),
        "tol": tol,
        "passed": bool(agg.height == 0 or float(dev.max()) <= tol),
        "value_coverage": (float(agg["value_usd"].sum()) / float(agg["value_usd_all"].sum())
                           if agg.height and float(agg["value_usd_all"].sum()) > 0 else None),
    }
    return agg, check
