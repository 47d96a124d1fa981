"""Study S000 (Liu & Zhu 2021): panel building, pure polars/numpy (never imports Dagster).

Spec: ``shared/specs/S000_import_spillovers_export_evolution.md``. This module builds the
firm x HS4 x year analysis panel of eq. (4) (spec 8.1 item 14) and its inputs:

* :class:`S000Config`: every switch of spec section 7 with the spec default, plus ``phi_lag`` and
  ``base_year``; presets ``paper`` and ``planted``.
* firm x HS4 export / import presence (value > 0) of the S000 study sample (spec 2.3, 3.1);
* the first-export history and ``newexport`` (spec 3.5, footnote 2), backfill-safe;
* firm-year controls ``tradevalue`` and ``newexport`` (spec 3.5);
* city marketization: non-SOE trade share and low/mid/high groups (spec 3.9, footnote 4);
* HS4 -> industry map for the industry fixed effect (spec 4.1, 8.1 item 7);
* phi (eq. 1) and both densities (eqs. 2-3) recomputed from a given phi, for the variants the stored
  ``firm_import_density`` / ``city_import_density`` (same-year phi) cannot serve (``phi_lag = 1``,
  ``import_dummy_lag = 1``, ``city_density_leave_one_out``, ``region_unit = province``,
  ``phi_sample = raw``);
* :func:`build_panel_year`: candidates (density_firm > threshold, spec 3.3-3.4), outcome
  ``export`` (spec 3.3), densities, interaction, controls, FE keys, macro-region, marketization.

Switches that belong to other layers are carried in the config so that one object describes a
variant, but they act elsewhere: ``standardize_interaction``, ``ame_method`` and ``se_type`` in the
estimation module (``studies/s000_models.py``); ``hs_split_rule`` is the cleaning switch ``hs_mode``
of ``trade_clean`` (``single_target`` = ``single_target``, ``proportional`` = ``value_split``), which
the asset layer must check against the stored trade_clean; ``firm_city_assignment`` only has the
``customs_location_field`` implementation (``compute.samples.firm_main_city``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal, get_args, get_origin

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, Field, model_validator

from kspill_pipeline.compute import relatedness as rel
from kspill_pipeline.compute.samples import SampleRules, firm_main_city, study_sample

__all__ = [
    "S000Config",
    "PRESETS",
    "preset",
    "HS_SECTIONS",
    "CHAPTER_TO_SECTION",
    "MKT_CUTOFFS",
    "s000_sample",
    "hs4_presence",
    "export_presence",
    "import_presence",
    "first_exports",
    "firm_export_history",
    "firm_controls",
    "city_nonsoe_share",
    "weighted_linear_quantile",
    "city_marketization",
    "observation_weights",
    "industry_map",
    "firm_main_industry",
    "city_macro_region",
    "s000_phi",
    "phi_from_relatedness",
    "import_baskets",
    "densities_from_phi",
    "densities_for_year",
    "stored_densities_usable",
    "candidates_from_stored",
    "panel_base_year",
    "attach_marketization",
    "build_panel_year",
    "panel_year_from_trade",
    "panel_invariants",
]

# ------------------------------------------------------------------------------------------------
# configuration (spec section 7)
# ------------------------------------------------------------------------------------------------


class S000Config(BaseModel):
    """Every switch of spec S000 section 7 (defaults = the spec's most likely reading), plus:

    * ``phi_lag``: 0 = the paper (phi_t from year t co-export, the same exports the panel then
      explains: a mechanical circularity, issue 4 "Validation"); 1 = phi_{t-1} from year t-1
      co-export with year-t import baskets, the variant the synthetic generator plants.
    * ``base_year``: first year of the cumulative new-export window (spec 3.5 footnote 2: 2002).
    * ``se_information``: the information matrix behind the ML standard errors. ``expected``
      (pyfixest, fixest, statsmodels GLM) or ``observed`` (the Hessian: Stata ``probit``'s default
      OIM, the likeliest software of the paper; spec 4 "SEs tiny, default MLE"). Both are
      consistent; on the demo panel they differ in the third significant digit.
    * ``estimator``: ``pyfixest`` (feglm, FEs absorbed) or ``dummies`` (kspill's chunked Newton ML
      fit with explicit FE parameters, bounded memory; same estimates to ~1e-8, see
      ``s000_models``).

    ``newexport_base_year`` keeps the spec's option names (``drop_2002`` / ``set_zero_2002``); they
    act on ``base_year`` whatever its value.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    import_dummy_lag: Literal[0, 1] = 0
    density_include_self: bool = True
    city_density_leave_one_out: bool = False
    region_unit: Literal["prefecture_city", "province"] = "prefecture_city"
    firm_city_assignment: Literal["customs_location_field", "address_geocode"] = "customs_location_field"
    processing_drop_level: Literal["transaction", "firm"] = "transaction"
    phi_sample: Literal["cleaned", "raw"] = "cleaned"
    hs_split_rule: Literal["single_target", "proportional"] = "single_target"
    candidate_set: Literal["all_firmyear_x_all_hs4_filtered", "importers_only"] = "all_firmyear_x_all_hs4_filtered"
    density_firm_threshold: float = Field(0.05, ge=0.0, lt=1.0)
    industry_fe_level: Literal["hs2_chapter", "hs_section", "firm_main_industry"] = "hs2_chapter"
    newexport_zero: Literal["ln1p", "drop_zero_rows"] = "ln1p"
    newexport_base_year: Literal["drop_2002", "set_zero_2002"] = "drop_2002"
    tradevalue_timing: Literal["after_processing_drop", "before"] = "after_processing_drop"
    standardize_interaction: Literal["z_of_product", "product_of_z"] = "z_of_product"
    ame_method: Literal["naive_per_column", "interaction_aware"] = "naive_per_column"
    se_type: Literal["mle_default", "cluster_firm"] = "mle_default"
    se_information: Literal["expected", "observed"] = "expected"
    estimator: Literal["pyfixest", "dummies"] = "pyfixest"
    mkt_quantile_base: Literal["cities", "observations"] = "cities"
    mkt_share_period: Literal["pooled", "per_year"] = "pooled"
    mkt_trade_definition: Literal["imports_plus_exports", "exports_only"] = "imports_plus_exports"
    mkt_cutoffs: Literal["p25_p50", "p33_p67", "p25_p75"] = "p25_p50"
    phi_lag: Literal[0, 1] = 0
    base_year: int = Field(2002, ge=1990, le=2100)

    @model_validator(mode="before")
    @classmethod
    def _explain(cls, data: Any) -> Any:
        """Name the key and its allowed values in every error (unknown key, value off a Literal)."""
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        for k, v in data.items():
            if k not in fields:
                raise ValueError(f"unknown S000 switch {k!r}; known switches: {', '.join(fields)}")
            ann = fields[k].annotation
            if get_origin(ann) is Literal:
                allowed = get_args(ann)
                ok = any(v == a and type(v) is type(a) for a in allowed)
                if not ok:
                    raise ValueError(
                        f"S000 switch {k!r} = {v!r} is not allowed; allowed values: "
                        + ", ".join(repr(a) for a in allowed)
                    )
        return data

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> S000Config:
        """Named preset (``paper`` = spec defaults; ``planted`` = ``phi_lag = 1`` as the generator)."""
        return preset(name, **overrides)

    @property
    def mkt_quantiles(self) -> tuple[float, float]:
        return MKT_CUTOFFS[self.mkt_cutoffs]


PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "planted": {"phi_lag": 1},
}


def preset(name: str, **overrides: Any) -> S000Config:
    """``paper``: every spec default (section 7). ``planted``: phi from t-1 co-export with year-t
    import baskets, the estimand the synthetic generator plants (synthetic/__init__.py)."""
    if name not in PRESETS:
        raise ValueError(f"unknown S000 preset {name!r}; allowed: {', '.join(PRESETS)}")
    return S000Config(**{**PRESETS[name], **overrides})


#: mkt_cutoffs -> (lower, upper) quantile probabilities (spec 3.9).
MKT_CUTOFFS: dict[str, tuple[float, float]] = {"p25_p50": (0.25, 0.50), "p33_p67": (1 / 3, 2 / 3),
                                                 "p25_p75": (0.25, 0.75)}

# ------------------------------------------------------------------------------------------------
# samples and presence (spec 2.3, 3.1, 3.3)
# ------------------------------------------------------------------------------------------------


def s000_sample(trade: pl.LazyFrame, cfg: S000Config, *, keep_processing: bool = False) -> pl.LazyFrame:
    """The S000 study sample of trade_clean rows (spec 2.3): firms with one of the 8 S000 name
    keywords dropped; processing trade dropped at ``cfg.processing_drop_level`` (transaction or
    firm). ``keep_processing=True`` keeps processing trade (``tradevalue_timing = before``)."""
    if cfg.firm_city_assignment != "customs_location_field":
        raise NotImplementedError(
            "firm_city_assignment = 'address_geocode' is not implemented: trade_clean already locates "
            "every row (region code, crosswalk, city name, then address via cpca); use 'customs_location_field'"
        )
    if keep_processing:
        from kspill_pipeline.compute.samples import PRESETS as SAMPLE_PRESETS

        rules = SAMPLE_PRESETS["s000"]
        return study_sample(trade, SampleRules(rules.keywords, drop_processing=False))
    return study_sample(trade, "s000", processing_drop_level=cfg.processing_drop_level)


def _phi_source(trade: pl.LazyFrame, cfg: S000Config) -> pl.LazyFrame:
    """Rows phi is built from (switch ``phi_sample``): the S000 sample or all trade_clean rows."""
    return s000_sample(trade, cfg) if cfg.phi_sample == "cleaned" else study_sample(trade, "all")


def hs4_presence(sample: pl.LazyFrame, flow: Literal["export", "import"], years: Iterable[int] | None = None
                 ) -> pl.LazyFrame:
    """Binary firm x HS4 presence of one flow (spec 0 and 3.1: value > 0, no RCA): unique rows
    ``(year, firm_id, hs4)`` whose summed value_usd over the sample rows is > 0."""
    lf = sample.filter(pl.col("flow") == flow)
    if years is not None:
        lf = lf.filter(pl.col("year").is_in([int(y) for y in years]))
    return (
        lf.group_by("year", "firm_id", "hs4")
        .agg(pl.col("value_usd").sum().alias("_v"))
        .filter(pl.col("_v") > 0)
        .select(pl.col("year").cast(pl.Int32), "firm_id", "hs4")
    )


def export_presence(trade: pl.LazyFrame, cfg: S000Config, years: Iterable[int] | None = None) -> pl.LazyFrame:
    """Firm x HS4 exports (value > 0) of the S000 study sample, per year: ``(year, firm_id, hs4)``.
    One year's rows depend on that year's trade_clean partition only (the raw input of the
    first-export history)."""
    return hs4_presence(s000_sample(trade, cfg), "export", years)


def import_presence(trade: pl.LazyFrame, cfg: S000Config, years: Iterable[int] | None = None) -> pl.LazyFrame:
    """Firm x HS4 imports (value > 0) of the S000 study sample: ``x_fj`` of eq. (2)."""
    return hs4_presence(s000_sample(trade, cfg), "import", years)


# ------------------------------------------------------------------------------------------------
# first-export history (spec 3.5 footnote 2)
# ------------------------------------------------------------------------------------------------

_HISTORY_SCHEMA = {"year": pl.Int32, "firm_id": pl.String, "hs4": pl.String, "first_export_year": pl.Int32,
                   "is_new": pl.Boolean}


def _history_lf(history: pl.LazyFrame | pl.DataFrame) -> pl.LazyFrame:
    lf = history.lazy() if isinstance(history, pl.DataFrame) else history
    return lf.select(pl.col("year").cast(pl.Int32), "firm_id", "hs4")


def first_exports(history: pl.LazyFrame | pl.DataFrame, year: int, cfg: S000Config) -> pl.DataFrame:
    """Products new for the firm in ``year`` (spec 3.5 footnote 2): exported in t and never exported
    in any year ``base_year .. t-1`` (cumulative window from the base year, not a fixed lookback).

    ``history`` holds the per-year export presence ``(year, firm_id, hs4)`` (:func:`export_presence`)
    of at least the years ``base_year .. t``, in any order; rows of other years (before the base year
    or after t) are ignored. At ``t = base_year`` the window is empty, so every export is "new" by the
    literal definition; the control treats the base year by ``newexport_base_year``.
    Returns ``(firm_id, hs4)`` sorted.
    """
    t = int(year)
    lf = _history_lf(history)
    now = lf.filter(pl.col("year") == t).select("firm_id", "hs4").unique()
    past = lf.filter((pl.col("year") >= cfg.base_year) & (pl.col("year") < t)).select("firm_id", "hs4").unique()
    return now.join(past, on=["firm_id", "hs4"], how="anti").sort("firm_id", "hs4").collect()


def firm_export_history(history: pl.LazyFrame | pl.DataFrame, year: int, cfg: S000Config) -> pl.DataFrame:
    """One partition of ``firm_export_history`` (contract firm_export_history.yaml): every firm x HS4
    exported in ``year`` with ``first_export_year`` = the first year in ``base_year .. t`` in which the
    firm exported it, and ``is_new = (first_export_year == t)`` (= :func:`first_exports`).

    Backfill safety: the value for year t is a function of the RAW per-year export presence of the
    years ``base_year .. t`` only (never of an earlier history partition), and rows of later years in
    ``history`` are ignored. So partitions can be computed in any order, and re-running one year
    gives the same rows as a full run. Years before ``base_year`` are outside the window: an empty
    frame is returned.
    """
    t = int(year)
    if t < cfg.base_year:
        return pl.DataFrame(schema=_HISTORY_SCHEMA)
    lf = _history_lf(history).filter(pl.col("year").is_between(cfg.base_year, t))
    now = lf.filter(pl.col("year") == t).select("firm_id", "hs4").unique()
    first = lf.group_by("firm_id", "hs4").agg(pl.col("year").min().alias("first_export_year"))
    return (
        now.join(first, on=["firm_id", "hs4"], how="left")
        .select(
            pl.lit(t, dtype=pl.Int32).alias("year"), "firm_id", "hs4",
            pl.col("first_export_year").cast(pl.Int32),
            (pl.col("first_export_year") == t).alias("is_new"),
        )
        .sort("firm_id", "hs4")
        .collect()
    )


# ------------------------------------------------------------------------------------------------
# firm-year controls (spec 3.5)
# ------------------------------------------------------------------------------------------------


def firm_controls(trade: pl.LazyFrame, history_year: pl.DataFrame | pl.LazyFrame, year: int, cfg: S000Config
                  ) -> pl.DataFrame:
    """Firm-year controls of eq. (4) (spec 3.5; contract s000_firm_controls.yaml), one row per firm
    of the year-t S000 study sample:

    * ``tradevalue = ln(imports + exports)`` in US dollars; switch ``tradevalue_timing``:
      ``after_processing_drop`` sums the study sample, ``before`` keeps the processing rows (the
      intermediary drop always applies).
    * ``n_new`` = number of HS4 with ``is_new`` in ``history_year`` (the firm_export_history
      partition of t). ``newexport``: switch ``newexport_zero``: ``ln1p`` -> ln(1 + n_new);
      ``drop_zero_rows`` -> ln(n_new), null when n_new = 0 (the panel drops null rows). In the base
      year (switch ``newexport_base_year``): ``drop_2002`` -> null (rows dropped), ``set_zero_2002``
      -> 0. Before the base year newexport is null.
    """
    t = int(year)
    tv_sample = s000_sample(trade, cfg, keep_processing=cfg.tradevalue_timing == "before")
    firms = s000_sample(trade, cfg).filter(pl.col("year") == t).select("firm_id").unique()
    tv = (
        tv_sample.filter(pl.col("year") == t)
        .group_by("firm_id")
        .agg(
            pl.col("value_usd").filter(pl.col("flow") == "import").sum().alias("imports_usd"),
            pl.col("value_usd").filter(pl.col("flow") == "export").sum().alias("exports_usd"),
        )
    )
    hist = history_year.lazy() if isinstance(history_year, pl.DataFrame) else history_year
    n_new = (
        hist.filter((pl.col("year") == t) & pl.col("is_new"))
        .group_by("firm_id")
        .agg(pl.len().cast(pl.Int32).alias("n_new"))
    )
    df = (
        firms.join(tv, on="firm_id", how="left")
        .join(n_new, on="firm_id", how="left")
        .with_columns(
            pl.col("imports_usd").fill_null(0.0), pl.col("exports_usd").fill_null(0.0),
            pl.col("n_new").fill_null(0).cast(pl.Int32),
        )
        .with_columns((pl.col("imports_usd") + pl.col("exports_usd")).log().alias("tradevalue"))
    )
    n = pl.col("n_new").cast(pl.Float64)
    if t < cfg.base_year:
        ne = pl.lit(None, dtype=pl.Float64)
    elif t == cfg.base_year:
        ne = pl.lit(None, dtype=pl.Float64) if cfg.newexport_base_year == "drop_2002" else pl.lit(0.0)
    elif cfg.newexport_zero == "ln1p":
        ne = n.log1p()
    else:
        ne = pl.when(pl.col("n_new") > 0).then(n.log()).otherwise(None)
    return (
        df.with_columns(ne.cast(pl.Float64).alias("newexport"), pl.lit(t, dtype=pl.Int32).alias("year"))
        .select("year", "firm_id", "imports_usd", "exports_usd", "tradevalue", "n_new", "newexport")
        .sort("firm_id")
        .collect()
    )


# ------------------------------------------------------------------------------------------------
# marketization (spec 3.9, footnote 4)
# ------------------------------------------------------------------------------------------------


def city_nonsoe_share(trade: pl.LazyFrame, cfg: S000Config, years: Iterable[int] | None = None) -> pl.DataFrame:
    """Per city-year trade value and non-SOE share (spec 3.9): ``nonsoe_usd / trade_usd`` where
    non-SOE = every ``ownership_class`` of trade_clean except ``soe`` (collective, private, foreign,
    other). Value from the S000 study sample, located by the row's ``city_code`` (where the trade
    was declared, not the firm's main city). Switch ``mkt_trade_definition``: imports + exports or
    exports only. Returns ``(year, city_code, trade_usd, nonsoe_usd)``."""
    lf = s000_sample(trade, cfg)
    if cfg.mkt_trade_definition == "exports_only":
        lf = lf.filter(pl.col("flow") == "export")
    if years is not None:
        lf = lf.filter(pl.col("year").is_in([int(y) for y in years]))
    return (
        lf.group_by("year", "city_code")
        .agg(
            pl.col("value_usd").sum().alias("trade_usd"),
            pl.col("value_usd").filter(pl.col("ownership_class") != "soe").sum().alias("nonsoe_usd"),
        )
        .filter(pl.col("trade_usd") > 0)
        .select(pl.col("year").cast(pl.Int32), "city_code", "trade_usd", "nonsoe_usd")
        .sort("year", "city_code")
        .collect()
    )


def weighted_linear_quantile(values: Sequence[float] | np.ndarray, q: float,
                             weights: Sequence[int] | np.ndarray | None = None) -> float:
    """Quantile with linear interpolation between order statistics: numpy's default
    (``np.quantile(..., method="linear")``, = polars ``interpolation="linear"``, = R type 7), on the
    sample in which value i is repeated ``weights[i]`` times (non-negative integers; None = 1).

    With N = sum of weights and x_(0) <= ... <= x_(N-1) the expanded sorted sample, h = (N - 1) q,
    the quantile is x_(floor h) + (h - floor h) (x_(floor h + 1) - x_(floor h)). Computed from the
    cumulative weights without expanding the sample (observation counts reach 10^8).
    """
    v = np.asarray(values, dtype=np.float64)
    w = np.ones(v.size, dtype=np.int64) if weights is None else np.asarray(weights, dtype=np.int64)
    if v.size != w.size:
        raise ValueError("values and weights differ in length")
    if np.any(w < 0):
        raise ValueError("weights must be non-negative integers")
    keep = w > 0
    v, w = v[keep], w[keep]
    if v.size == 0:
        raise ValueError("quantile of an empty sample")
    order = np.argsort(v, kind="stable")
    v, w = v[order], w[order]
    cw = np.cumsum(w)
    n = int(cw[-1])
    h = (n - 1) * float(q)
    lo = int(np.floor(h))
    hi = min(lo + 1, n - 1)
    x_lo = v[np.searchsorted(cw, lo, side="right")]
    x_hi = v[np.searchsorted(cw, hi, side="right")]
    return float(x_lo + (h - lo) * (x_hi - x_lo))


def observation_weights(panel_like: pl.DataFrame | pl.LazyFrame) -> pl.DataFrame:
    """Rows per (year, city_code) of a panel (or of its candidate set before the marketization
    join): the weights of ``mkt_quantile_base = observations``."""
    lf = panel_like.lazy() if isinstance(panel_like, pl.DataFrame) else panel_like
    return (
        lf.group_by("year", "city_code").agg(pl.len().cast(pl.Int64).alias("n_obs"))
        .select(pl.col("year").cast(pl.Int32), "city_code", "n_obs").sort("year", "city_code").collect()
    )


def _group_expr(share: str, q_low: str, q_high: str) -> pl.Expr:
    # spec 3.9: low < p25 <= mid < p50 <= high
    return (
        pl.when(pl.col(share) < pl.col(q_low)).then(pl.lit("low"))
        .when(pl.col(share) < pl.col(q_high)).then(pl.lit("mid"))
        .otherwise(pl.lit("high"))
    )


def city_marketization(trade: pl.LazyFrame, cfg: S000Config, *, years: Iterable[int] | None = None,
                       obs_weights: pl.DataFrame | None = None) -> pl.DataFrame:
    """City marketization table (spec 3.9; contract s000_city_marketization.yaml), one row per
    (year, city_code) with trade in that year.

    * share: :func:`city_nonsoe_share`; switch ``mkt_share_period``: ``per_year`` -> the city-year
      share; ``pooled`` -> one share per city from the value summed over all ``years`` given (the
      same value on each of the city's year rows).
    * cut-offs (switch ``mkt_cutoffs``, default p25/p50) by :func:`weighted_linear_quantile` (numpy
      linear interpolation); switch ``mkt_quantile_base``: ``cities`` -> each city counts once
      (per year, or once overall when pooled); ``observations`` -> each city weighted by its panel
      rows ``obs_weights`` (``(year, city_code, n_obs)``, :func:`observation_weights`; summed over
      years when pooled). Per year when ``per_year``, one pair of cut-offs when ``pooled``.
    * groups, as printed in footnote 4: ``low`` if share < q_low, ``mid`` if q_low <= share < q_high,
      ``high`` if share >= q_high (so with p25/p50 "high" is the top half).
    """
    base = city_nonsoe_share(trade, cfg, years)
    if base.height == 0:
        raise ValueError("city_marketization: no trade in the S000 sample for the requested years")
    qa, qb = cfg.mkt_quantiles
    if cfg.mkt_quantile_base == "observations":
        if obs_weights is None:
            raise ValueError("mkt_quantile_base = 'observations' needs obs_weights (year, city_code, n_obs)")
        w = obs_weights.select(pl.col("year").cast(pl.Int32), "city_code", pl.col("n_obs").cast(pl.Int64))
    else:
        w = None
    if cfg.mkt_share_period == "pooled":
        pooled = (
            base.group_by("city_code")
            .agg(pl.col("trade_usd").sum(), pl.col("nonsoe_usd").sum())
            .with_columns((pl.col("nonsoe_usd") / pl.col("trade_usd")).alias("nonsoe_share"))
            .sort("city_code")
        )
        if w is None:
            wts = None
        else:
            wc = w.group_by("city_code").agg(pl.col("n_obs").sum())
            wts = pooled.join(wc, on="city_code", how="left")["n_obs"].fill_null(0).to_numpy()
        vals = pooled["nonsoe_share"].to_numpy()
        cuts = pl.DataFrame({"q_low": [weighted_linear_quantile(vals, qa, wts)],
                             "q_high": [weighted_linear_quantile(vals, qb, wts)]})
        out = (
            base.select("year", "city_code")
            .join(pooled, on="city_code", how="left")
            .join(cuts, how="cross")
        )
    else:
        parts = []
        for (yr,), g in base.with_columns((pl.col("nonsoe_usd") / pl.col("trade_usd")).alias("nonsoe_share")
                                          ).group_by(["year"], maintain_order=True):
            g = g.sort("city_code")
            if w is None:
                wts = None
            else:
                wts = g.join(w, on=["year", "city_code"], how="left")["n_obs"].fill_null(0).to_numpy()
            vals = g["nonsoe_share"].to_numpy()
            parts.append(g.with_columns(
                pl.lit(weighted_linear_quantile(vals, qa, wts)).alias("q_low"),
                pl.lit(weighted_linear_quantile(vals, qb, wts)).alias("q_high"),
            ))
        out = pl.concat(parts)
    return (
        out.with_columns(
            _group_expr("nonsoe_share", "q_low", "q_high").alias("mkt_group"),
            pl.lit(cfg.mkt_share_period).alias("share_period"),
            pl.lit(cfg.mkt_quantile_base).alias("quantile_base"),
            pl.lit(cfg.mkt_cutoffs).alias("cutoffs"),
            pl.lit(cfg.mkt_trade_definition).alias("trade_definition"),
        )
        .select("year", "city_code", "trade_usd", "nonsoe_usd", "nonsoe_share", "q_low", "q_high", "mkt_group",
                "share_period", "quantile_base", "cutoffs", "trade_definition")
        .sort("year", "city_code")
    )


# ------------------------------------------------------------------------------------------------
# industry (FE) and macro-region
# ------------------------------------------------------------------------------------------------

#: The 21 sections of the Harmonized System (WCO nomenclature, HS2007): section -> (first, last)
#: chapter. Chapter 77 is reserved for future use (within section XV); chapters 98-99 are national
#: (China: special transactions) and belong to no section: they map to "special".
HS_SECTIONS: dict[str, tuple[int, int, str]] = {
    "I": (1, 5, "Live animals; animal products"),
    "II": (6, 14, "Vegetable products"),
    "III": (15, 15, "Animal or vegetable fats and oils"),
    "IV": (16, 24, "Prepared foodstuffs; beverages, spirits, vinegar; tobacco"),
    "V": (25, 27, "Mineral products"),
    "VI": (28, 38, "Products of the chemical or allied industries"),
    "VII": (39, 40, "Plastics and rubber and articles thereof"),
    "VIII": (41, 43, "Raw hides, leather, furskins and articles thereof"),
    "IX": (44, 46, "Wood, cork, plaiting materials and articles thereof"),
    "X": (47, 49, "Pulp, paper and paperboard and articles thereof"),
    "XI": (50, 63, "Textiles and textile articles"),
    "XII": (64, 67, "Footwear, headgear, umbrellas, artificial flowers"),
    "XIII": (68, 70, "Articles of stone, plaster, cement; ceramics; glass"),
    "XIV": (71, 71, "Pearls, precious stones and metals; jewellery; coin"),
    "XV": (72, 83, "Base metals and articles of base metal"),
    "XVI": (84, 85, "Machinery and mechanical appliances; electrical equipment"),
    "XVII": (86, 89, "Vehicles, aircraft, vessels and transport equipment"),
    "XVIII": (90, 92, "Optical, measuring, medical instruments; clocks; musical instruments"),
    "XIX": (93, 93, "Arms and ammunition"),
    "XX": (94, 96, "Miscellaneous manufactured articles"),
    "XXI": (97, 97, "Works of art, collectors' pieces and antiques"),
}
CHAPTER_TO_SECTION: dict[str, str] = {
    f"{c:02d}": sec for sec, (a, b, _) in HS_SECTIONS.items() for c in range(a, b + 1)
}


def industry_map(hs4: Iterable[str], level: Literal["hs2_chapter", "hs_section"] = "hs2_chapter") -> pl.DataFrame:
    """HS4 -> industry key of the industry fixed effect theta_k (spec 4.1; 8.1 item 7): the HS2
    chapter (default) or the HS section (:data:`HS_SECTIONS`; chapters 98/99 -> ``special``).
    ``firm_main_industry`` is firm-level: see :func:`firm_main_industry`."""
    codes = pl.Series("hs4", list(hs4), dtype=pl.String).unique().sort()
    df = pl.DataFrame({"hs4": codes}).with_columns(pl.col("hs4").str.slice(0, 2).alias("hs2"))
    if level == "hs2_chapter":
        return df.select("hs4", pl.col("hs2").alias("industry"))
    if level == "hs_section":
        return df.select("hs4", pl.col("hs2").replace_strict(CHAPTER_TO_SECTION, default="special",
                                                             return_dtype=pl.String).alias("industry"))
    raise ValueError(f"industry_map: level {level!r} is product-level only for hs2_chapter / hs_section; "
                     "use firm_main_industry for 'firm_main_industry'")


def firm_main_industry(trade: pl.LazyFrame, year: int, cfg: S000Config) -> pl.DataFrame:
    """``industry_fe_level = firm_main_industry``: the firm's main HS2 chapter in year t = the chapter
    with the largest export value in the S000 sample (firms without exports: largest import value);
    ties -> lowest chapter code. Returns ``(firm_id, industry)``."""
    lf = s000_sample(trade, cfg).filter(pl.col("year") == int(year))
    by = (
        lf.group_by("firm_id", pl.col("hs4").str.slice(0, 2).alias("industry"))
        .agg(
            pl.col("value_usd").filter(pl.col("flow") == "export").sum().alias("x"),
            pl.col("value_usd").filter(pl.col("flow") == "import").sum().alias("m"),
        )
    )
    return (
        by.sort(["firm_id", "x", "m", "industry"], descending=[False, True, True, False])
        .group_by("firm_id", maintain_order=True).first()
        .select("firm_id", "industry").sort("firm_id").collect()
    )


def city_macro_region(trade: pl.LazyFrame) -> pl.DataFrame:
    """``(city_code, macro_region)`` from trade_clean (NBS four regions of the city's province,
    spec 2.5); one row per city."""
    return (
        trade.select("city_code", "macro_region").unique()
        .sort("city_code", "macro_region").group_by("city_code", maintain_order=True).first()
        .collect()
    )


# ------------------------------------------------------------------------------------------------
# phi and densities (eqs. 1-3)
# ------------------------------------------------------------------------------------------------


def s000_phi(trade: pl.LazyFrame, year: int, cfg: S000Config) -> tuple[np.ndarray, np.ndarray]:
    """phi of eq. (1) from the firm x HS4 co-export of ``year`` (value > 0) in the phi sample (switch
    ``phi_sample``): ``phi_ij = N_ij / max(N_i, N_j)``, diagonal 1, over the products with at least
    one exporter (the year's product space). Returns ``(phi, products)`` (products sorted), the same
    numbers as the ``product_relatedness`` asset (compute.relatedness_io.relatedness_long)."""
    ex = hs4_presence(_phi_source(trade, cfg), "export", [year]).with_columns(pl.lit(1.0).alias("v")).collect()
    if ex.height == 0:
        raise ValueError(f"S000 phi: no exports in year {year} of the phi sample ({cfg.phi_sample})")
    P = rel.presence(ex, "firm_id", "hs4", "v", how="value", threshold=0.0, strict=True)
    C = rel.cooccurrence(P.M)
    phi = rel.proximity(C, variant="min_conditional", diagonal="one")
    return phi, np.asarray(P.products, dtype=object)


def phi_from_relatedness(product_relatedness: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Dense phi and its product order from one ``product_relatedness`` partition (e.g. of t - 1 for
    ``phi_lag = 1``); delegates to compute.relatedness_io.phi_from_long."""
    from kspill_pipeline.compute.relatedness_io import phi_from_long

    return phi_from_long(product_relatedness)


def import_baskets(trade: pl.LazyFrame, year: int, cfg: S000Config) -> pl.DataFrame:
    """``(firm_id, hs4)`` import basket x_fj of ``year`` in the S000 sample (value > 0)."""
    return import_presence(trade, cfg, [year]).select("firm_id", "hs4").unique().sort("firm_id", "hs4").collect()


def _region_key(cfg: S000Config) -> pl.Expr:
    if cfg.region_unit == "prefecture_city":
        return pl.col("city_code")
    return pl.col("city_code").str.slice(0, 2)  # province = first two adcode digits


def densities_from_phi(
    phi: np.ndarray,
    products: Sequence[str] | np.ndarray,
    baskets: pl.DataFrame,
    firm_city: pl.DataFrame,
    cfg: S000Config,
    *,
    firms: Iterable[str] | None = None,
    chunk_rows: int = 10_000,
) -> pl.DataFrame:
    """Candidate rows with both densities from a GIVEN phi (eqs. 2-3), filtered to
    ``density_firm > cfg.density_firm_threshold`` (spec 3.4). Returns
    ``(firm_id, city_code, hs4, density_firm, density_city)`` sorted by firm_id, hs4.

    * ``phi``/``products``: e.g. :func:`s000_phi` of t - phi_lag, or a stored product_relatedness
      partition via :func:`phi_from_relatedness`. Products outside phi's space have no phi and are
      neither candidates nor part of any basket (their phi row is 0).
    * ``baskets``: ``(firm_id, hs4)`` import presence of the basket year; ``firm_city``:
      ``(firm_id, city_code)`` one city per firm (compute.samples.firm_main_city).
    * density_firm = rel.density(X_f, phi) (column sums of phi; ``density_include_self``).
    * density_city: x_c = union of the baskets of the firms whose city (or province, switch
      ``region_unit``) is c; with ``city_density_leave_one_out`` the firm's own imports are removed:
      x_cj^(-f) = 1 if another firm of c imports j.
    * ``firms``: restrict the candidate firms (``candidate_set``); every basket still counts in the
      city baskets.

    Firm rows are processed in chunks of ``chunk_rows`` and filtered at once (memory: chunk x
    products). Densities are clipped to [0, 1] (last-bit rounding of sum/sum can exceed 1).
    """
    products = np.asarray(list(products), dtype=object)
    thr = float(cfg.density_firm_threshold)
    phi = np.asarray(phi, dtype=np.float64)
    colsum = phi.sum(axis=0)
    b = baskets.select("firm_id", "hs4").unique().join(
        pl.DataFrame({"hs4": pl.Series(list(products), dtype=pl.String)}), on="hs4", how="semi"
    )
    fc = firm_city.select("firm_id", "city_code").unique(subset="firm_id", keep="first")
    b = b.join(fc, on="firm_id", how="inner").with_columns(_region_key(cfg).alias("_region"))
    firm_list = b.select("firm_id").unique().sort("firm_id")
    if firms is not None:
        firm_list = firm_list.join(pl.DataFrame({"firm_id": pl.Series(list(firms), dtype=pl.String)}),
                                   on="firm_id", how="semi")
    units = firm_list["firm_id"].to_numpy()
    empty = pl.DataFrame(schema={"firm_id": pl.String, "city_code": pl.String, "hs4": pl.String,
                                 "density_firm": pl.Float64, "density_city": pl.Float64})
    if units.size == 0:
        return empty
    X, _, _ = rel.to_matrix(b.with_columns(pl.lit(1.0).alias("x")), "firm_id", "hs4", "x",
                            products=list(products), units=list(units))
    X.data[:] = 1.0
    # region baskets: counts of importing firms per (region, product)
    regions = b.select("_region").unique().sort("_region")["_region"].to_numpy()
    reg_rows = b.select("_region", "firm_id", "hs4").unique()
    Cnt, _, _ = rel.to_matrix(reg_rows.with_columns(pl.lit(1.0).alias("x")), "_region", "hs4", "x",
                              products=list(products), units=list(regions))
    Cnt = Cnt.toarray()
    reg_index = {r: i for i, r in enumerate(regions)}
    fc_units = pl.DataFrame({"firm_id": units}).join(
        b.select("firm_id", "city_code", "_region").unique(subset="firm_id"), on="firm_id", how="left")
    f_city = fc_units["city_code"].to_numpy()
    f_reg = np.array([reg_index[r] for r in fc_units["_region"].to_list()], dtype=np.int64)
    D_city_reg = None
    if not cfg.city_density_leave_one_out:
        D_city_reg = rel.density_kernel((Cnt > 0).astype(np.float64), phi, colsum,
                                        include_self=cfg.density_include_self)
    out = []
    for s in range(0, units.size, chunk_rows):
        e = min(units.size, s + chunk_rows)
        Xc = X[s:e]
        D = rel.density_kernel(Xc, phi, colsum, include_self=cfg.density_include_self)
        r, c = np.nonzero(D > thr)
        if r.size == 0:
            continue
        if D_city_reg is not None:
            dc = D_city_reg[f_reg[s + r], c]
        else:
            Xd = Xc.toarray()
            loo = ((Cnt[f_reg[s:e]] - Xd) > 0).astype(np.float64)
            Dl = rel.density_kernel(loo, phi, colsum, include_self=cfg.density_include_self)
            dc = Dl[r, c]
        out.append(pl.DataFrame({
            "firm_id": pl.Series(units[s + r], dtype=pl.String),
            "city_code": pl.Series(f_city[s + r], dtype=pl.String),
            "hs4": pl.Series(products[c], dtype=pl.String),
            "density_firm": np.minimum(D[r, c], 1.0),
            "density_city": np.minimum(dc, 1.0),
        }))
    if not out:
        return empty
    return pl.concat(out).sort("firm_id", "hs4")


def densities_for_year(trade: pl.LazyFrame, year: int, cfg: S000Config, *, phi: np.ndarray | None = None,
                       products: Sequence[str] | None = None) -> pl.DataFrame:
    """Candidates with densities for panel year t recomputed from trade_clean (every variant):
    phi of year ``t - phi_lag`` (:func:`s000_phi`, unless ``phi``/``products`` are given, e.g. the
    stored product_relatedness partition of t - 1), import baskets and firm cities of year
    ``t - import_dummy_lag``. ``candidate_set``: ``all_firmyear_x_all_hs4_filtered`` keeps firms of
    the year-t S000 sample (every firm-year of the cleaned data x every HS4, then the filter);
    ``importers_only`` keeps every importer of the basket year. The two agree when
    ``import_dummy_lag = 0`` (a firm with density_firm > threshold >= 0 imports). With
    ``import_dummy_lag = 1`` the row's city_code is the firm's city of the basket year."""
    t = int(year)
    if phi is None:
        phi, products = s000_phi(trade, t - cfg.phi_lag, cfg)
    elif products is None:
        raise ValueError("densities_for_year: pass products with phi")
    by = t - cfg.import_dummy_lag
    baskets = import_baskets(trade, by, cfg)
    fc = firm_main_city(s000_sample(trade, cfg).filter(pl.col("year") == by)).collect()
    firms = None
    if cfg.candidate_set == "all_firmyear_x_all_hs4_filtered":
        firms = s000_sample(trade, cfg).filter(pl.col("year") == t).select("firm_id").unique().collect()["firm_id"]
    return densities_from_phi(phi, products, baskets, fc, cfg, firms=firms)


def stored_densities_usable(cfg: S000Config) -> bool:
    """Whether the stored same-year firm_import_density / city_import_density serve this variant
    (phi_t, x_t, prefecture cities, no leave-one-out, cleaned phi sample). The asset layer must
    also check that the relatedness configuration used the same ``density_include_self`` and a
    threshold <= ``density_firm_threshold``."""
    return (cfg.phi_lag == 0 and cfg.import_dummy_lag == 0 and not cfg.city_density_leave_one_out
            and cfg.region_unit == "prefecture_city" and cfg.phi_sample == "cleaned")


def candidates_from_stored(firm_import_density: pl.LazyFrame | pl.DataFrame,
                           city_import_density: pl.LazyFrame | pl.DataFrame,
                           firm_city: pl.LazyFrame | pl.DataFrame, year: int, cfg: S000Config) -> pl.DataFrame:
    """Candidates from the stored yearly density assets (default variant; see
    :func:`stored_densities_usable`): firm_import_density rows of year t with density_firm >
    threshold, the firm's city from firm_city, density_city of that city. Same columns as
    :func:`densities_from_phi`. density_firm is widened from the stored float32."""
    if not stored_densities_usable(cfg):
        raise ValueError("candidates_from_stored: this S000 configuration needs recomputed densities "
                         "(phi_lag, import_dummy_lag, city_density_leave_one_out, region_unit or phi_sample "
                         "differ from the stored assets); use densities_from_phi / densities_for_year")
    t = int(year)
    lz = lambda x: x.lazy() if isinstance(x, pl.DataFrame) else x  # noqa: E731
    fd = lz(firm_import_density).filter((pl.col("year") == t) & (pl.col("density_firm") > cfg.density_firm_threshold))
    fc = lz(firm_city).filter(pl.col("year") == t).select("firm_id", "city_code")
    cd = lz(city_import_density).filter(pl.col("year") == t).select("city_code", pl.col("product").alias("hs4"),
                                                                      "density_city")
    return (
        fd.select("firm_id", pl.col("product").alias("hs4"), pl.col("density_firm").cast(pl.Float64))
        .join(fc, on="firm_id", how="inner")
        .join(cd, on=["city_code", "hs4"], how="left")
        .select("firm_id", "city_code", "hs4", "density_firm", "density_city")
        .sort("firm_id", "hs4").collect()
    )


# ------------------------------------------------------------------------------------------------
# the panel (spec 3.3, 4.1, 8.1 item 14)
# ------------------------------------------------------------------------------------------------

PANEL_COLUMNS = ["year", "firm_id", "hs4", "export", "density_firm", "density_city", "interaction",
                 "tradevalue", "newexport", "industry", "city_code", "macro_region", "nonsoe_share", "mkt_group"]


def panel_base_year(
    year: int,
    candidates: pl.DataFrame,
    trade: pl.LazyFrame,
    controls: pl.DataFrame,
    cfg: S000Config,
) -> pl.DataFrame:
    """Panel rows of year t before the marketization join.

    * ``candidates``: :func:`densities_from_phi` / :func:`candidates_from_stored` output.
    * ``export`` = 1 if the firm exports the HS4 in t in the S000 sample (spec 3.3; status, not
      entry), else 0.
    * ``interaction = density_firm * density_city`` (eq. 4).
    * controls joined on firm_id (inner: a candidate firm without a year-t control row, possible only
      with ``import_dummy_lag = 1``, is dropped); rows with null ``newexport`` are dropped
      (``newexport_zero = drop_zero_rows``, base year under ``drop_2002``).
    * ``industry`` by ``industry_fe_level``; ``macro_region`` of the firm's city.
    """
    t = int(year)
    ex = export_presence(trade, cfg, [t]).select("firm_id", "hs4", pl.lit(1, dtype=pl.Int8).alias("export")).collect()
    ctl = controls.filter(pl.col("year") == t).select("firm_id", "tradevalue", "newexport")
    df = (
        candidates.join(ex, on=["firm_id", "hs4"], how="left")
        .with_columns(pl.col("export").fill_null(0).cast(pl.Int8))
        .join(ctl, on="firm_id", how="inner")
        .filter(pl.col("newexport").is_not_null())
    )
    if cfg.industry_fe_level == "firm_main_industry":
        ind = firm_main_industry(trade, t, cfg)
        df = df.join(ind, on="firm_id", how="left")
    else:
        df = df.join(industry_map(df["hs4"].unique(), cfg.industry_fe_level), on="hs4", how="left")
    macro = city_macro_region(trade.filter(pl.col("year") == t))
    df = df.join(macro, on="city_code", how="left")
    if df["macro_region"].null_count():
        macro_all = city_macro_region(trade)
        df = df.drop("macro_region").join(macro_all, on="city_code", how="left")
    return (
        df.with_columns(
            pl.lit(t, dtype=pl.Int32).alias("year"),
            (pl.col("density_firm") * pl.col("density_city")).alias("interaction"),
        )
        .select([c for c in PANEL_COLUMNS if c not in ("nonsoe_share", "mkt_group")])
        .sort("firm_id", "hs4")
    )


def attach_marketization(panel: pl.DataFrame, marketization: pl.DataFrame) -> pl.DataFrame:
    """Join ``nonsoe_share`` and ``mkt_group`` of the row's (year, city_code). A missing city-year
    raises (the city has imports, so it has trade)."""
    m = marketization.select(pl.col("year").cast(pl.Int32), "city_code", "nonsoe_share", "mkt_group")
    out = panel.join(m, on=["year", "city_code"], how="left")
    miss = out.filter(pl.col("mkt_group").is_null())
    if miss.height:
        raise ValueError(f"attach_marketization: {miss.height} panel rows have no marketization row; "
                         f"cities e.g. {miss['city_code'].unique().head(5).to_list()}")
    return out.select(PANEL_COLUMNS).sort("firm_id", "hs4")


def build_panel_year(
    year: int,
    candidates: pl.DataFrame,
    trade: pl.LazyFrame,
    controls: pl.DataFrame,
    marketization: pl.DataFrame,
    cfg: S000Config,
) -> pl.DataFrame:
    """One yearly partition of ``s000_panel`` (contract s000_panel.yaml): firm x HS4 rows of year t
    with density_firm > threshold (spec 3.3-3.4), outcome ``export``, ``density_firm``,
    ``density_city``, ``interaction``, ``tradevalue``, ``newexport``, FE keys ``year`` and
    ``industry``, ``city_code``, ``macro_region``, ``nonsoe_share`` and ``mkt_group``.
    = :func:`panel_base_year` + :func:`attach_marketization`. ``trade`` must hold the year-t
    trade_clean rows (other years are ignored except for the macro-region fallback)."""
    return attach_marketization(panel_base_year(year, candidates, trade, controls, cfg), marketization)


def panel_year_from_trade(trade: pl.LazyFrame, year: int, cfg: S000Config, *,
                          marketization: pl.DataFrame | None = None, phi: np.ndarray | None = None,
                          products: Sequence[str] | None = None) -> pl.DataFrame:
    """The whole year-t panel from trade_clean rows of the years ``base_year .. t`` (standalone and
    tests): export history, controls, densities recomputed (:func:`densities_for_year`), and
    marketization over all years in ``trade`` when not given (with ``observations`` as quantile
    base, weighted by this year's candidate rows)."""
    t = int(year)
    hist = firm_export_history(export_presence(trade, cfg), t, cfg)
    ctl = firm_controls(trade, hist, t, cfg)
    cand = densities_for_year(trade, t, cfg, phi=phi, products=products)
    base = panel_base_year(t, cand, trade, ctl, cfg)
    if marketization is None:
        w = observation_weights(base) if cfg.mkt_quantile_base == "observations" else None
        marketization = city_marketization(trade, cfg, obs_weights=w)
    return attach_marketization(base, marketization)


def panel_invariants(panel: pl.DataFrame, cfg: S000Config, *, tol: float = 1e-6) -> dict[str, int]:
    """Checks the contract language cannot express (spec 9), as violation counts:
    ``below_threshold`` (density_firm <= threshold), ``city_lt_firm`` (density_city < density_firm -
    tol; only meaningful when the city basket contains the firm's: no leave-one-out, no lag, the
    firm's own region; reported as -1 otherwise), ``no_outcome_variation`` (1 when export is
    constant or the panel is empty)."""
    below = int(panel.filter(pl.col("density_firm") <= cfg.density_firm_threshold).height)
    must = (not cfg.city_density_leave_one_out) and cfg.import_dummy_lag == 0
    city = (int(panel.filter(pl.col("density_city") < pl.col("density_firm") - tol).height) if must else -1)
    var = int(panel.height == 0 or panel["export"].n_unique() < 2)
    return {"below_threshold": below, "city_lt_firm": city, "no_outcome_variation": var}
