"""Study S004 estimation: Tables 2-8 of Zhao, Ban, Li & Liu (2022), pure pyfixest / polars / numpy.

Spec ``S004_virtual_agglomeration_export_quality.md`` sections 4-5 and 8-10; issue 6. Never import
Dagster here (the assets in ``kspill_pipeline/assets/`` wire these functions). The permutation
placebo lives in :mod:`kspill_pipeline.studies.s004_placebo`.

Baseline (spec eq. 17)::

    Quality_cjt = alpha + beta vagg_ct + gamma Controls_ct + mu_c + nu_j + delta_t + xi_cjt

OLS with absorbed fixed effects (pyfixest ``feols``), standard errors clustered by city x HS4
(spec 4.1, "下同": every table unless noted). Controls (spec 3.3): fdi, open, fisc, dlp, sci, edu,
wage, gdp, fixinv (:data:`CONTROLS`).

Analysis panel (:func:`build_analysis_panel`)
--------------------------------------------
City x HS4 x year quality (``quality_city_hs4``; or city x HS6, or the decomposition frame) joined
with a city-year frame (:func:`assemble_city_year`: vagg and alternatives, controls, instruments,
mechanism outcomes, ``L_vagg`` = vagg of the same city in exactly t-1, province code, location
dummies). A quality city-year without a row in the city-year frame is an error that names the
city-years (``missing="raise"``, default) or is kept with null regressors (``"keep"``); the
coverage report counts rows, city-years and non-null values per column. Rows never disappear in the
merge: the regressions' complete-case samples report their own drops.

Estimation samples (:func:`prepare_sample`)
-------------------------------------------
Each column uses its own complete-case sample (the published Ns differ between columns with and
without controls: 624,577 vs 616,591). Rows with a null or non-finite model variable are dropped
and counted; then, with ``singleton_handling="drop_singletons"`` (spec 8 default, Stata reghdfe's
rule), singletons of every FE dimension are removed iteratively (counted). The sample is checked
in Python *before* pyfixest is called (empty sample, constant outcome or regressor -> ``ValueError``
naming the model), because pyfixest 0.60 aborts the process on an empty sample after its own
singleton removal (STACK_NOTES section 4). pyfixest then runs with ``fixef_rm="none"`` on the
prepared sample, so its N equals ours. FE interactions (province x year) are built as explicit
code columns.

Instrumental variables (Table 3) and the first-stage F
------------------------------------------------------
2SLS with pyfixest (``y ~ controls | FE | vagg ~ z``), just identified. The first-stage statistic
reported in ``first_stage_f`` is the **cluster-robust Wald F of the excluded instrument in the
first-stage regression** (``vagg ~ z + controls | FE``, CRV1 by the model's cluster, pyfixest's
default small-sample correction): ``F = (R pi)' (R V_pi R')^-1 (R pi) / q`` with q instruments, i.e.
``(pi / se_pi)^2`` for one instrument. This is what pyfixest 0.60 stores as
``Feiv._f_stat_1st_stage`` (``IV_weakness_test``: ``wald_test`` on the first-stage fit, which
uses the model's vcov); we fit the first stage explicitly on the same sample to also report its
coefficient, SE and partial R2, and record pyfixest's own value in the fit metadata. With one
instrument it equals the Olea-Pflueger effective F (``Feiv._eff_F``, ``IV_Diag()``:
``pi' Q pi / tr(Sigma Q)`` reduces to ``pi^2 / Sigma``) and, up to the small-sample scaling, the
Kleibergen-Paap rk Wald F that Stata's ivreghdfe prints for one endogenous regressor. pyfixest 0.60
has no Kleibergen-Paap LM (under-identification) statistic; the paper's "LM" column is therefore
not reproduced (published values are kept for comparison). ``weak_iv = first_stage_f <
weak_iv_threshold`` (default 10, the Staiger-Stock rule of thumb) flags weak instruments in the
tidy output; they are reported, never hidden. pyfixest does not compute R2 for IV fits; we report
``r2 = 1 - SSR/TSS`` and ``r2_within = 1 - SSR/TSS_within`` from the structural residuals
``y - X b`` (the published IV "R2" of 0.0015 / -0.77 is a within-type R2: compare ``r2_within``).

Tables (spec 4.2-4.6)
---------------------
* :func:`table2`: (1) city+year FE; (2) + controls; (3) + HS4 FE; (4) + controls (preferred).
* :func:`table3`: (1) + province FE (collinear with city FE: equals Table 2 (4)); (2) province x
  year FE (+ city and HS4 FE); (3) L.vagg OLS; (4) 2SLS, vagg instrumented by L.vagg; (5) by the
  1984 telephone instrument ``iv_tel``; (6) by the post-office instrument ``iv_post``
  (``studies.s004_indices.historical_iv``: 1984 count per capita x national internet investment
  of t-1, switches iv_1984_scaling / iv_national_lag there).
* :func:`table4`: (1) vagg_in; (2) hs6_qua on the city x HS6 panel (FE city, year and the
  "industry" FE -- HS4 by default, switch ``hs6_industry_fe``; cluster switch
  ``hs6_robust_cluster``); (3) vagg_txt, no HS4 FE; (4)-(5) firm-level quality c_qua with firm,
  city and year FE, clustered by firm, (5) with firm controls -- skipped with a reason when the
  optional firm panel is not supplied; (6)-(7) baseline clustered by province / city.
* :func:`table5`: the baseline on subsample panels (processing, ordinary, intermediate, final);
  :func:`subsample_quality` re-aggregates city x HS4 quality within each subsample from flows.
* :func:`table6`: vagg and ``vagg x D`` for D in centre, peri, east, mid, west (main effect of D
  absorbed by the city FE).
* :func:`table7`: decomposition components within, between, entry, exit, total, gap on vagg.
* :func:`table8`: (1) minteg on L.vagg, (2) lnitff, (3) lndiv, (4) lnspe on vagg with city and
  year FE, at city-year level and on the paper's duplicated city x HS4 panel (both, labelled;
  ``table8_city_outcomes_level`` says which carries the plain column labels (1)-(4) that are
  compared with the published values); (5)-(6) hs4_qua on coa / d_coa with city, year and HS4 FE.

Output: a tidy frame per table (:data:`TIDY_COLUMNS`), published values joined from
``published/s004.yaml`` (:func:`published_frame`), rendered by :func:`render_s004` with
``studies.tables.render`` (Markdown, LaTeX, HTML).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = [
    "CONTROLS",
    "FE_BASE",
    "PUBLISHED_PATH",
    "S004Config",
    "ModelSpec",
    "Fit",
    "TableResult",
    "PreparedSample",
    "assemble_city_year",
    "build_analysis_panel",
    "fit_model",
    "load_published",
    "make_config",
    "prepare_sample",
    "published_frame",
    "render_s004",
    "subsample_quality",
    "table2",
    "table3",
    "table4",
    "table5",
    "table6",
    "table7",
    "table8",
    "tidy_all",
]

#: City-year controls of every "controls: yes" column (spec 3.3).
CONTROLS: tuple[str, ...] = ("fdi", "open", "fisc", "dlp", "sci", "edu", "wage", "gdp", "fixinv")
#: Baseline fixed effects (spec eq. 17): city, year, HS4.
FE_BASE: tuple[str, ...] = ("city_code", "year", "hs4")
#: Decomposition components of Table 7 (spec 4.5), in the paper's column order.
DECOMP_COMPONENTS: tuple[str, ...] = ("within", "between", "entry", "exit", "total", "gap")
#: Location dummies of Table 6 (spec 4.4), in the paper's column order.
LOCATION_DUMMIES: tuple[str, ...] = ("centre", "peri", "east", "mid", "west")
#: City-level outcomes of Table 8 (1)-(4): (outcome, regressor).
TABLE8_CITY_OUTCOMES: tuple[tuple[str, str], ...] = (
    ("minteg", "L_vagg"), ("lnitff", "vagg"), ("lndiv", "vagg"), ("lnspe", "vagg"))

PUBLISHED_PATH = Path(__file__).resolve().parent / "published" / "s004.yaml"

VcovSpec = str | Mapping[str, str]


# ==================================================================================================
# configuration
# ==================================================================================================
class S004Config(BaseModel):
    """Every model-side [AMBIG] switch of spec S004 section 8 (spec defaults), plus the numerical
    settings of the estimation. Index-side switches (vagg construction, instruments, market
    integration, spe/div, agg) are in :class:`kspill_pipeline.studies.s004_indices.S004IndexSwitches`.
    Build with :func:`make_config` for error messages naming the key and its allowed values."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    singleton_handling: Literal["drop_singletons", "keep"] = Field(
        "drop_singletons", description="[AMBIG] spec 8: iterative singleton removal (Stata reghdfe) or keep them.")
    hs6_robust_cluster: Literal["city_hs6", "city_hs4"] = Field(
        "city_hs6", description="[AMBIG] spec 8: cluster of Table 4 (2) on the city x HS6 panel.")
    hs6_industry_fe: Literal["hs4", "hs6"] = Field(
        "hs4", description="[AMBIG] Table 4 (2) 'industry' FE: the paper calls HS4 the industry (spec 2.2).")
    table8_city_outcomes_level: Literal["duplicated_city_hs4_panel", "city_year"] = Field(
        "duplicated_city_hs4_panel",
        description="[AMBIG] spec 8: level of Table 8 (1)-(4) compared with the published values; both are run.")
    table8_city_year_cluster: Literal["city", "none"] = Field(
        "city", description="Cluster of the city-year version of Table 8 (1)-(4) (the paper has only the duplicated one).")
    coa_include_vagg: bool = Field(False, description="[AMBIG] spec 8: add vagg to Table 8 (5)-(6).")
    placebo_permutation: Literal["row_level", "city_year_level", "within_year_city_level"] = Field(
        "row_level",
        description="[AMBIG] spec 8: permute vagg across observations (随机匹配到每个观测, default), across city-years, "
                    "or across cities within each year.")
    placebo_replications: int = Field(1000, ge=1, description="Spec 4.3: 1,000 replications.")
    placebo_seed: int = Field(20220702, description="Seed of the permutations (replication r uses [seed, r]).")
    centre_definition: Literal["capitals_municipalities_subprovincial", "as_supplied"] = Field(
        "capitals_municipalities_subprovincial",
        description="[AMBIG] recorded: the centre list itself is the input s004_in_centre_cities.")
    region_3belt: Literal["nbs_east_mid_west"] = Field(
        "nbs_east_mid_west", description="[AMBIG] recorded: the belts are the input s004_in_region3.")
    trade_mode_rule: Literal["value_split", "majority", "pure_only"] = Field(
        "value_split",
        description="Table 5 with flow-level processing_share (not in the paper, whose customs rows have one mode): "
                    "split each flow's value by the share, assign it by majority, or keep pure flows only.")
    weak_iv_threshold: float = Field(10.0, gt=0, description="weak_iv = first-stage F below this (Staiger-Stock).")
    controls: tuple[str, ...] = Field(CONTROLS, description="Controls of the 'controls: yes' columns (spec 3.3).")
    firm_controls: tuple[str, ...] = Field(
        ("firm_age", "firm_size", "firm_capital_per_worker"),
        description="Table 4 (5) firm controls (age, size, per-worker assets).")
    fixef_tol: float = Field(
        1e-10, gt=0, lt=1,
        description="MAP demeaning tolerance (pyfixest default 1e-6; tight so that the placebo's FWL shortcut "
                    "and full fits agree to ~1e-12).")
    fixef_maxiter: int = Field(100_000, ge=1)
    on_unestimable: Literal["skip", "raise"] = Field(
        "skip", description="A column whose sample cannot be estimated (empty, constant outcome or regressor, e.g. "
                            "no 'mid' city in a small sample): skip it and record the reason in the table's "
                            "'skipped' list (default), or fail the whole table.")


def make_config(**overrides: Any) -> S004Config:
    """:class:`S004Config` with ``overrides``; a bad key or value raises ``ValueError`` naming the key
    and (for a choice) the allowed values."""
    fields = S004Config.model_fields
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"S004Config: unknown key(s) {unknown}; known keys: {sorted(fields)}")
    try:
        return S004Config(**overrides)
    except ValidationError as exc:
        msgs = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            ctx = err.get("ctx") or {}
            allowed = ctx.get("expected")
            msgs.append(f"{key}={err.get('input')!r}: {err['msg']}" + (f" (allowed: {allowed})" if allowed else ""))
        raise ValueError("S004Config: " + "; ".join(msgs)) from None


# ==================================================================================================
# analysis panel
# ==================================================================================================
def _req(df: pl.DataFrame, cols: Sequence[str], what: str) -> None:
    miss = [c for c in cols if c not in df.columns]
    if miss:
        raise ValueError(f"{what}: missing column(s) {miss}; got {df.columns}")


def assemble_city_year(
    vagg: pl.DataFrame,
    *others: pl.DataFrame | None,
    location: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """One city-year frame for the models: ``vagg`` (city_code, year, vagg) full-joined with every
    other city-year frame (controls from ``s004_indices.city_controls``, ``vagg_in``, ``vagg_txt``,
    ``historical_iv``, ``market_integration``, ``lnitff``, ``spe``/``div``, ``agg``, ``coa``,
    ``d_coa``...; their non-key columns, first frame wins on a name clash), plus

    * ``L_vagg``: vagg of the same city in exactly t-1 (null when t-1 is absent);
    * ``province_code``: first two digits of the city code;
    * the location dummies (``s004_indices.location_dummies``: centre, peri, east, mid, west) joined
      by city when ``location`` is given.

    Duplicate (city_code, year) keys in any input raise. Sorted by city_code, year.
    """
    frames = [vagg, *[o for o in others if o is not None]]
    out: pl.DataFrame | None = None
    for i, f in enumerate(frames):
        _req(f, ["city_code", "year"], f"assemble_city_year input {i}")
        f = f.with_columns(pl.col("year").cast(pl.Int32), pl.col("city_code").cast(pl.String))
        dup = f.filter(pl.struct("city_code", "year").is_duplicated())
        if dup.height:
            raise ValueError(f"assemble_city_year input {i}: duplicate city-years, e.g. "
                             f"{dup.select('city_code', 'year').unique().sort('city_code', 'year').head(5).rows()}")
        if out is None:
            _req(f, ["vagg"], "assemble_city_year (first frame = vagg)")
            out = f
            continue
        new = [c for c in f.columns if c not in out.columns]
        if not new:
            continue
        out = out.join(f.select("city_code", "year", *new), on=["city_code", "year"], how="full", coalesce=True)
    assert out is not None
    lag = out.select("city_code", (pl.col("year") + 1).cast(pl.Int32).alias("year"), pl.col("vagg").alias("L_vagg"))
    out = out.drop([c for c in ("L_vagg",) if c in out.columns]).join(lag, on=["city_code", "year"], how="left")
    if "province_code" not in out.columns:
        out = out.with_columns(pl.col("city_code").str.slice(0, 2).alias("province_code"))
    if location is not None:
        _req(location, ["city_code"], "assemble_city_year location")
        loc_cols = [c for c in location.columns if c != "city_code" and c not in out.columns]
        out = out.join(location.select("city_code", *loc_cols), on="city_code", how="left")
    return out.sort("city_code", "year")


def build_analysis_panel(
    quality: pl.DataFrame | pl.LazyFrame,
    city_year: pl.DataFrame,
    *,
    product: str = "hs4",
    missing: Literal["raise", "keep"] = "raise",
    max_listed: int = 20,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Join the cell panel (``quality``: year, city_code, ``product`` and outcome columns, e.g.
    quality_city_hs4, quality_city_hs6 with product="hs6", or quality_decomposition) with the
    city-year frame of :func:`assemble_city_year`.

    Adds ``hs4`` (from hs6 when absent), ``city_hs4`` / ``city_hs6`` (cluster keys),
    ``province_code`` and ``prov_year``. ``missing="raise"``: a quality city-year without a row in
    ``city_year`` raises ``ValueError`` naming (up to ``max_listed``) city-years and the number of
    rows they hold; ``"keep"``: such rows stay with null city-year columns (and drop out of the
    regressions, where they are counted). Returns (panel, coverage report).
    """
    q = quality.collect() if isinstance(quality, pl.LazyFrame) else quality
    _req(q, ["year", "city_code", product], "build_analysis_panel quality")
    _req(city_year, ["city_code", "year", "vagg"], "build_analysis_panel city_year")
    q = q.with_columns(pl.col("year").cast(pl.Int32), pl.col("city_code").cast(pl.String))
    if "hs4" not in q.columns and "hs6" in q.columns:
        q = q.with_columns(pl.col("hs6").str.slice(0, 4).alias("hs4"))
    cy = city_year.with_columns(pl.col("year").cast(pl.Int32), pl.col("city_code").cast(pl.String))
    clash = [c for c in cy.columns if c in q.columns and c not in ("city_code", "year")]
    if clash:
        cy = cy.drop(clash)
    cyk = cy.select("city_code", "year").unique()
    qk = q.group_by("city_code", "year").agg(pl.len().alias("n_rows"))
    miss = qk.join(cyk, on=["city_code", "year"], how="anti").sort("city_code", "year")
    if miss.height and missing == "raise":
        shown = ", ".join(f"{c}/{y} ({n} rows)" for c, y, n in miss.head(max_listed).rows())
        more = f" and {miss.height - max_listed} more" if miss.height > max_listed else ""
        raise ValueError(
            f"build_analysis_panel: {int(miss['n_rows'].sum())} quality rows in {miss.height} city-year(s) have no "
            f"row in the city-year frame (vagg, controls): {shown}{more}; supply them or pass missing='keep'")
    if missing not in ("raise", "keep"):
        raise ValueError(f"build_analysis_panel: missing must be 'raise' or 'keep', not {missing!r}")
    panel = q.join(cy, on=["city_code", "year"], how="left", maintain_order="left")
    if panel.height != q.height:  # pragma: no cover - guarded by the unique check in assemble_city_year
        raise ValueError("build_analysis_panel: the city-year frame has duplicate city-years")
    adds = []
    if "hs4" in panel.columns:
        adds.append((pl.col("city_code") + "_" + pl.col("hs4")).alias("city_hs4"))
    if "hs6" in panel.columns:
        adds.append((pl.col("city_code") + "_" + pl.col("hs6")).alias("city_hs6"))
    if "province_code" not in panel.columns:
        adds.append(pl.col("city_code").str.slice(0, 2).alias("province_code"))
    panel = panel.with_columns(adds).with_columns(
        (pl.col("province_code") + "_" + pl.col("year").cast(pl.String)).alias("prov_year"))
    nonnull = {c: int(panel.height - panel[c].null_count()) for c in cy.columns if c not in ("city_code", "year")}
    report = {
        "n_rows": q.height,
        "n_city_years_quality": qk.height,
        "n_city_years_supplied": cyk.height,
        "n_city_years_matched": qk.height - miss.height,
        "n_rows_unmatched": int(miss["n_rows"].sum()) if miss.height else 0,
        "share_rows_matched": (1.0 - (int(miss["n_rows"].sum()) if miss.height else 0) / q.height) if q.height else None,
        "unmatched_city_years": [f"{c}/{y}" for c, y, _ in miss.head(max_listed).rows()],
        "nonnull_rows": nonnull,
        "missing_policy": missing,
    }
    return panel.sort("city_code", product, "year"), report


# ==================================================================================================
# samples and fits
# ==================================================================================================
@dataclass
class PreparedSample:
    """Complete-case sample of one model with FE and cluster columns as dense integer codes."""

    frame: pl.DataFrame
    name: str
    n_input: int
    n_dropped_null: int
    n_dropped_singleton: int

    @property
    def n_obs(self) -> int:
        return self.frame.height


def _codes(s: pl.Series) -> pl.Series:
    return (s.rank("dense") - 1).cast(pl.UInt32)


def prepare_sample(
    panel: pl.DataFrame | pl.LazyFrame,
    variables: Sequence[str],
    fe: Sequence[str],
    *,
    cluster: str | None = None,
    singleton_handling: Literal["drop_singletons", "keep"] = "drop_singletons",
    name: str = "model",
    keep: Sequence[str] = (),
) -> PreparedSample:
    """Select ``variables`` (outcome first), FE, cluster and ``keep`` columns; drop rows with a null or
    non-finite model variable or a null FE / cluster; encode FE and cluster as dense UInt32 codes (the
    original values of ``city_code`` and ``year`` are kept as ``_city`` / ``_year`` for permutation
    schemes); with ``drop_singletons`` remove singletons of every FE iteratively
    (``compute.quality.drop_singletons``). Raises ``ValueError`` naming ``name`` when nothing is left,
    the outcome is constant, or a regressor is constant -- before pyfixest could abort.
    """
    from kspill_pipeline.compute.quality import drop_singletons

    df = panel.collect() if isinstance(panel, pl.LazyFrame) else panel
    need = list(dict.fromkeys([*variables, *fe, *([cluster] if cluster else []), *keep]))
    _req(df, need, f"sample '{name}'")
    extra = [c for c in ("city_code", "year") if c in df.columns and c not in need]
    d = df.select(need + extra)
    if "city_code" in d.columns:
        d = d.with_columns(pl.col("city_code").alias("_city"))
    if "year" in d.columns:
        d = d.with_columns(pl.col("year").alias("_year"))
    d = d.drop(extra)
    n_input = d.height
    d = d.drop_nulls(subset=[*variables, *fe, *([cluster] if cluster else [])])
    for c in variables:
        if d.schema[c].is_numeric():
            d = d.with_columns(pl.col(c).cast(pl.Float64))
            d = d.filter(pl.col(c).is_finite())
        else:
            raise ValueError(f"sample '{name}': variable {c!r} is not numeric ({d.schema[c]})")
    n_nonnull = d.height
    code_cols = list(dict.fromkeys([*fe, *([cluster] if cluster else [])]))
    d = d.with_columns([_codes(d[c]).alias(c) for c in code_cols])
    n_single = 0
    if fe and singleton_handling == "drop_singletons" and d.height:
        keep_mask = drop_singletons([d[c].to_numpy().astype(np.int64) for c in fe])
        n_single = int((~keep_mask).sum())
        if n_single:
            d = d.filter(pl.Series(keep_mask))
            d = d.with_columns([_codes(d[c]).alias(c) for c in code_cols])
    elif singleton_handling not in ("drop_singletons", "keep"):
        raise ValueError(f"singleton_handling must be 'drop_singletons' or 'keep', not {singleton_handling!r}")
    if d.height == 0:
        raise ValueError(f"sample '{name}': no observation left ({n_input - n_nonnull} rows with a null or non-finite "
                         f"value in {list(variables)} or the FE/cluster columns, {n_single} singletons of {list(fe)})")
    if d[variables[0]].n_unique() < 2:
        raise ValueError(f"sample '{name}': outcome {variables[0]!r} is constant on the {d.height} rows")
    for c in variables[1:]:
        if d[c].n_unique() < 2:
            raise ValueError(f"sample '{name}': variable {c!r} is constant on the {d.height} rows")
    return PreparedSample(frame=d, name=name, n_input=n_input, n_dropped_null=n_input - n_nonnull,
                          n_dropped_singleton=n_single)


@dataclass(frozen=True)
class ModelSpec:
    """One table column. ``regressors`` are exogenous (key regressor first for OLS); for 2SLS
    ``endog`` is instrumented by ``instrument`` and ``regressors`` are the exogenous controls."""

    table: str
    model: str
    depvar: str
    regressors: tuple[str, ...]
    fe: tuple[str, ...]
    cluster: str | None
    endog: str | None = None
    instrument: str | None = None
    sample: str = "full"
    note: str = ""

    @property
    def is_iv(self) -> bool:
        return self.endog is not None

    @property
    def variables(self) -> tuple[str, ...]:
        v = [self.depvar, *([self.endog] if self.endog else []), *self.regressors,
             *([self.instrument] if self.instrument else [])]
        return tuple(dict.fromkeys(v))


@dataclass
class Fit:
    """Result of :func:`fit_model`: tidy rows plus the metadata of the fit."""

    spec: ModelSpec
    rows: list[dict[str, Any]]
    n_obs: int
    n_dropped_null: int
    n_dropped_singleton: int
    n_clusters: int | None
    r2: float | None
    r2_within: float | None
    first_stage: dict[str, Any] | None = None
    coef: dict[str, float] = field(default_factory=dict)
    se: dict[str, float] = field(default_factory=dict)


def _vcov(cluster: str | None) -> VcovSpec:
    return {"CRV1": cluster} if cluster else "iid"


def _vcov_label(cluster: str | None) -> str:
    return f"CRV1({cluster})" if cluster else "iid"


def _formula(spec: ModelSpec) -> str:
    fe = f" | {' + '.join(spec.fe)}" if spec.fe else ""
    if spec.is_iv:
        rhs = " + ".join(spec.regressors) if spec.regressors else "1"
        return f"{spec.depvar} ~ {rhs}{fe} | {spec.endog} ~ {spec.instrument}"
    return f"{spec.depvar} ~ {' + '.join(spec.regressors)}{fe}"


def _feols(fml: str, data: pl.DataFrame, cluster: str | None, cfg: S004Config):
    import pyfixest as pf
    from pyfixest.demeaners import MapDemeaner

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pf.feols(fml, data=data, vcov=_vcov(cluster), fixef_rm="none",
                        demeaner=MapDemeaner(fixef_tol=cfg.fixef_tol, fixef_maxiter=cfg.fixef_maxiter))


def _n_clusters(fit, cluster: str | None) -> int | None:
    if not cluster:
        return None
    g = getattr(fit, "_G", None)
    if g is None:
        return None
    return int(np.min(np.atleast_1d(g)))


def fit_model(panel: pl.DataFrame | PreparedSample, spec: ModelSpec, cfg: S004Config | None = None) -> Fit:
    """Estimate one column (OLS or 2SLS) on its complete-case sample; see the module docstring."""
    cfg = cfg or S004Config()
    prep = panel if isinstance(panel, PreparedSample) else prepare_sample(
        panel, spec.variables, spec.fe, cluster=spec.cluster, singleton_handling=cfg.singleton_handling,
        name=f"{spec.table} {spec.model}")
    d = prep.frame
    cols = list(dict.fromkeys([*spec.variables, *spec.fe, *([spec.cluster] if spec.cluster else [])]))
    data = d.select(cols)
    fit = _feols(_formula(spec), data, spec.cluster, cfg)
    n = int(fit._N)
    if n != d.height:
        raise RuntimeError(f"{spec.table} {spec.model}: pyfixest used {n} rows, the prepared sample has {d.height}")
    td = fit.tidy()
    coef = {str(k): float(v) for k, v in td["Estimate"].items()}
    se = {str(k): float(v) for k, v in td["Std. Error"].items()}
    first = None
    if spec.is_iv:
        y = d[spec.depvar].to_numpy()
        u = np.asarray(fit._u_hat).reshape(-1)  # structural residuals on demeaned data = M(y - X b)
        ssr = float(u @ u)
        tss = float(((y - y.mean()) ** 2).sum())
        yd = np.asarray(fit._Y).reshape(-1)  # demeaned outcome
        tssw = float(yd @ yd)
        r2 = 1.0 - ssr / tss if tss > 0 else None
        r2w = 1.0 - ssr / tssw if tssw > 0 else None
        first = _first_stage(data, spec, cfg)
        first["pyfixest_f_stat_1st_stage"] = float(np.squeeze(fit._f_stat_1st_stage))
    else:
        r2 = float(fit._r2)
        r2w = float(fit._r2_within) if spec.fe else r2
    n_cl = _n_clusters(fit, spec.cluster)
    meta = dict(
        table=spec.table, model=spec.model, depvar=spec.depvar, n_obs=n, n_dropped_null=prep.n_dropped_null,
        n_dropped_singleton=prep.n_dropped_singleton, n_clusters=n_cl, r2=r2, r2_within=r2w,
        fixed_effects="+".join(spec.fe), cluster=spec.cluster, vcov=_vcov_label(spec.cluster), sample=spec.sample,
        estimator="2sls" if spec.is_iv else "ols", instrument=spec.instrument,
        first_stage_f=first["f"] if first else None, first_stage_stat=first["stat"] if first else None,
        weak_iv=bool(first["f"] < cfg.weak_iv_threshold) if first else None, note=spec.note or None,
    )
    rows = []
    for term, r in td.iterrows():
        rows.append({**meta, "term": str(term), "kind": "coef", "estimate": float(r["Estimate"]),
                     "std_error": float(r["Std. Error"]), "statistic": float(r["t value"]),
                     "p_value": float(r["Pr(>|t|)"])})
    if first:
        rows.append({**meta, "term": f"first_stage:{spec.instrument}", "kind": "first_stage",
                     "estimate": first["coef"], "std_error": first["se"], "statistic": first["t"],
                     "p_value": first["p"]})
    return Fit(spec=spec, rows=rows, n_obs=n, n_dropped_null=prep.n_dropped_null,
               n_dropped_singleton=prep.n_dropped_singleton, n_clusters=n_cl, r2=r2, r2_within=r2w,
               first_stage=first, coef=coef, se=se)


def _first_stage(data: pl.DataFrame, spec: ModelSpec, cfg: S004Config) -> dict[str, Any]:
    """Explicit first stage ``endog ~ instrument + controls | FE`` on the 2SLS sample with the model's
    vcov; F = Wald statistic of the excluded instrument / 1 (pyfixest's ``_f_stat_1st_stage``)."""
    rhs = " + ".join([spec.instrument, *spec.regressors])
    fe = f" | {' + '.join(spec.fe)}" if spec.fe else ""
    fs = _feols(f"{spec.endog} ~ {rhs}{fe}", data, spec.cluster, cfg)
    td = fs.tidy()
    r = td.loc[spec.instrument]
    k = len(fs._coefnames)
    R = np.zeros((1, k))
    R[0, list(fs._coefnames).index(spec.instrument)] = 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fs.wald_test(R=R)
    f = float(np.squeeze(fs._f_statistic))
    return {
        "coef": float(r["Estimate"]), "se": float(r["Std. Error"]), "t": float(r["t value"]),
        "p": float(r["Pr(>|t|)"]), "f": f, "r2_within": float(fs._r2_within) if spec.fe else float(fs._r2),
        "stat": f"first-stage Wald F of the excluded instrument, {_vcov_label(spec.cluster)} "
                "(pyfixest _f_stat_1st_stage; = effective F with one instrument)",
    }


# ==================================================================================================
# tidy output
# ==================================================================================================
TIDY_SCHEMA: dict[str, pl.DataType] = {
    "table": pl.String(), "model": pl.String(), "term": pl.String(), "kind": pl.String(),
    "depvar": pl.String(), "estimate": pl.Float64(), "std_error": pl.Float64(), "statistic": pl.Float64(),
    "p_value": pl.Float64(), "n_obs": pl.Int64(), "n_dropped_null": pl.Int64(),
    "n_dropped_singleton": pl.Int64(), "n_clusters": pl.Int64(), "r2": pl.Float64(), "r2_within": pl.Float64(),
    "fixed_effects": pl.String(), "cluster": pl.String(), "vcov": pl.String(), "sample": pl.String(),
    "estimator": pl.String(), "instrument": pl.String(), "first_stage_f": pl.Float64(),
    "first_stage_stat": pl.String(), "weak_iv": pl.Boolean(), "note": pl.String(),
    "published": pl.Float64(), "published_std_error": pl.Float64(), "published_stars": pl.String(),
    "published_n_obs": pl.Int64(), "published_r2": pl.Float64(),
}
TIDY_COLUMNS: tuple[str, ...] = tuple(TIDY_SCHEMA)
_PUB_COLS = ("published", "published_std_error", "published_stars", "published_n_obs", "published_r2")


@dataclass
class TableResult:
    """Tidy frame of one table, the fits, and the columns skipped (with the reason)."""

    tidy: pl.DataFrame
    fits: dict[str, Fit] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)


def _finish(rows: list[dict], published: bool = True) -> pl.DataFrame:
    base = {k: v for k, v in TIDY_SCHEMA.items() if k not in _PUB_COLS}
    df = pl.DataFrame(rows, schema=base, strict=False) if rows else pl.DataFrame(schema=base)
    if published and df.height:
        pub = published_frame()
        df = df.join(pub, on=["table", "model", "term"], how="left", maintain_order="left")
        df = df.with_columns([pl.when(pl.col("kind") == "coef").then(pl.col(c)).otherwise(None).alias(c)
                              for c in _PUB_COLS])
    else:
        df = df.with_columns([pl.lit(None, TIDY_SCHEMA[c]).alias(c) for c in _PUB_COLS])
    return df.select(TIDY_COLUMNS).cast(TIDY_SCHEMA)


def tidy_all(*parts: pl.DataFrame | TableResult) -> pl.DataFrame:
    """Stack tidy tables into one frame."""
    frames = [p.tidy if isinstance(p, TableResult) else p for p in parts]
    return pl.concat([f.select(TIDY_COLUMNS).cast(TIDY_SCHEMA) for f in frames], how="vertical")


def _run(specs: Sequence[ModelSpec], panels: Mapping[str, pl.DataFrame | None] | pl.DataFrame,
         cfg: S004Config, skipped: dict[str, str] | None = None, on_error: Literal["raise", "skip"] | None = None,
         published: bool = True) -> TableResult:
    on_error = on_error or cfg.on_unestimable
    fits: dict[str, Fit] = {}
    rows: list[dict] = []
    skipped = dict(skipped or {})
    for s in specs:
        p = panels if isinstance(panels, pl.DataFrame) else panels.get(s.sample)
        if p is None:
            skipped.setdefault(s.model, f"no panel for sample {s.sample!r}")
            continue
        missing = [c for c in s.variables if c not in p.columns]
        if missing:
            skipped[s.model] = f"column(s) {missing} not in the {s.sample!r} panel"
            continue
        try:
            fits[s.model] = fit_model(p, s, cfg)
        except ValueError as exc:
            if on_error == "skip":
                skipped[s.model] = str(exc)
                continue
            raise
        rows += fits[s.model].rows
    return TableResult(tidy=_finish(rows, published=published), fits=fits, skipped=skipped,
                       config=cfg.model_dump(mode="json"))


# ==================================================================================================
# Tables 2-8
# ==================================================================================================
def _ctl(cfg: S004Config, on: bool = True) -> tuple[str, ...]:
    return tuple(cfg.controls) if on else ()


def table2_specs(cfg: S004Config) -> list[ModelSpec]:
    """Table 2 (spec 4.2): (1)-(2) city + year FE, (3)-(4) + HS4 FE; (2), (4) with controls."""
    c, cl = _ctl(cfg), "city_hs4"
    return [
        ModelSpec("table2", "(1)", "hs4_qua", ("vagg",), ("city_code", "year"), cl),
        ModelSpec("table2", "(2)", "hs4_qua", ("vagg", *c), ("city_code", "year"), cl),
        ModelSpec("table2", "(3)", "hs4_qua", ("vagg",), FE_BASE, cl),
        ModelSpec("table2", "(4)", "hs4_qua", ("vagg", *c), FE_BASE, cl, note="preferred"),
    ]


def table2(panel: pl.DataFrame, cfg: S004Config | None = None) -> TableResult:
    """Table 2: baseline OLS of hs4_qua on vagg, SE clustered by city x HS4."""
    cfg = cfg or S004Config()
    return _run(table2_specs(cfg), panel, cfg)


def table3_specs(cfg: S004Config) -> list[ModelSpec]:
    """Table 3 (spec 4.2): province FE, province x year FE, L.vagg OLS and 2SLS, historical IVs."""
    c, cl = _ctl(cfg), "city_hs4"
    return [
        ModelSpec("table3", "(1)", "hs4_qua", ("vagg", *c), (*FE_BASE, "province_code"), cl,
                  note="province FE collinear with city FE"),
        ModelSpec("table3", "(2)", "hs4_qua", ("vagg", *c), ("city_code", "hs4", "prov_year"), cl,
                  note="province x year FE (absorbs year)"),
        ModelSpec("table3", "(3)", "hs4_qua", ("L_vagg", *c), FE_BASE, cl),
        ModelSpec("table3", "(4)", "hs4_qua", c, FE_BASE, cl, endog="vagg", instrument="L_vagg"),
        ModelSpec("table3", "(5)", "hs4_qua", c, FE_BASE, cl, endog="vagg", instrument="iv_tel",
                  note="1984 telephones x national internet investment"),
        ModelSpec("table3", "(6)", "hs4_qua", c, FE_BASE, cl, endog="vagg", instrument="iv_post",
                  note="1984 post offices x national internet investment"),
    ]


def table3(panel: pl.DataFrame, cfg: S004Config | None = None) -> TableResult:
    """Table 3: endogeneity (first-stage F and ``weak_iv`` on the 2SLS columns)."""
    cfg = cfg or S004Config()
    return _run(table3_specs(cfg), panel, cfg)


def table4(
    panel: pl.DataFrame,
    cfg: S004Config | None = None,
    *,
    hs6_panel: pl.DataFrame | None = None,
    firm_panel: pl.DataFrame | None = None,
    firm_quality_col: str = "c_qua",
) -> TableResult:
    """Table 4: (1) vagg_in, (2) hs6_qua (``hs6_panel`` from :func:`build_analysis_panel` with
    product="hs6"), (3) vagg_txt without HS4 FE, (4)-(5) firm-level quality (``firm_panel``: year,
    firm_id, city_code, ``firm_quality_col``, vagg, the controls and ``cfg.firm_controls``; FE firm,
    city, year; cluster firm) -- each optional input absent -> column skipped with the reason,
    (6)-(7) the baseline clustered by province / city."""
    cfg = cfg or S004Config()
    c = _ctl(cfg)
    ind = cfg.hs6_industry_fe
    specs = [
        ModelSpec("table4", "(1)", "hs4_qua", ("vagg_in", *c), FE_BASE, "city_hs4"),
        ModelSpec("table4", "(2)", "hs6_qua", ("vagg", *c), ("city_code", "year", ind), cfg.hs6_robust_cluster,
                  sample="hs6", note=f"city x HS6 panel; industry FE = {ind}"),
        ModelSpec("table4", "(3)", "hs4_qua", ("vagg_txt", *c), ("city_code", "year"), "city_hs4",
                  note="no HS4 FE"),
        ModelSpec("table4", "(4)", firm_quality_col, ("vagg",), ("firm_id", "city_code", "year"), "firm_id",
                  sample="firm", note="firm-level quality, no controls"),
        ModelSpec("table4", "(5)", firm_quality_col, ("vagg", *c, *cfg.firm_controls),
                  ("firm_id", "city_code", "year"), "firm_id", sample="firm",
                  note="firm-level quality, regional and firm controls"),
        ModelSpec("table4", "(6)", "hs4_qua", ("vagg", *c), FE_BASE, "province_code", note="cluster province"),
        ModelSpec("table4", "(7)", "hs4_qua", ("vagg", *c), FE_BASE, "city_code", note="cluster city"),
    ]
    skipped: dict[str, str] = {}
    if hs6_panel is None:
        skipped["(2)"] = "no city x HS6 quality panel supplied (hs6_panel)"
    if firm_panel is None:
        for m in ("(4)", "(5)"):
            skipped[m] = "optional firm-level quality panel (firm_panel) not supplied"
    elif firm_quality_col not in firm_panel.columns:
        for m in ("(4)", "(5)"):
            skipped[m] = f"firm panel lacks the quality column {firm_quality_col!r}"
    panels = {"full": panel, "hs6": hs6_panel, "firm": firm_panel}
    specs = [s for s in specs if s.model not in skipped]
    return _run(specs, panels, cfg, skipped=skipped)


TABLE5_SAMPLES: tuple[str, ...] = ("processing", "ordinary", "intermediate", "final")


def table5(subpanels: Mapping[str, pl.DataFrame | None], cfg: S004Config | None = None) -> TableResult:
    """Table 5: the preferred model (Table 2 (4)) on each subsample panel -- analysis panels from
    :func:`build_analysis_panel` on the subsample quality of :func:`subsample_quality`. Keys
    ``processing``, ``ordinary``, ``intermediate``, ``final`` -> columns (1)-(4); an absent or
    empty subsample is skipped with the reason."""
    cfg = cfg or S004Config()
    c = _ctl(cfg)
    specs = [ModelSpec("table5", f"({i})", "hs4_qua", ("vagg", *c), FE_BASE, "city_hs4", sample=s)
             for i, s in enumerate(TABLE5_SAMPLES, start=1)]
    unknown = sorted(set(subpanels) - set(TABLE5_SAMPLES))
    if unknown:
        raise ValueError(f"table5: unknown subsample(s) {unknown}; expected {list(TABLE5_SAMPLES)}")
    return _run(specs, dict(subpanels), cfg, on_error="skip")


def subsample_quality(
    flows: pl.DataFrame | pl.LazyFrame,
    *,
    bec_map: pl.DataFrame | None = None,
    hs_vintage: str | None = None,
    trade_mode_rule: Literal["value_split", "majority", "pure_only"] = "value_split",
    quality_col: str = "rqua",
) -> tuple[dict[str, pl.DataFrame], dict[str, Any]]:
    """Re-aggregate city x HS4 quality (Eq. 21, ``compute.quality.aggregate_quality``) within each
    Table 5 subsample from a flow-level normalised quality frame (quality_normalised columns year,
    city_code, hs4, hs6, value_usd, ``quality_col``, firm_id (optional), and ``trade_mode_class``
    (ordinary | processing | other) or ``processing_share`` (processing share of the flow value, as
    quality_flow carries it)).

    Trade mode: with ``trade_mode_class`` a flow belongs to the subsample of its class (``other``
    to neither); with ``processing_share`` (flows summed over trade modes) ``trade_mode_rule``
    decides: ``value_split`` (default) puts ``value x share`` into processing and ``value x (1 -
    share)`` into ordinary (same rqua, the weights of Eq. 21 are values), ``majority`` assigns the
    whole flow by share >= 0.5, ``pure_only`` keeps flows with share 0 or 1 only. Goods type: HS6
    joined to ``bec_map`` (hs6 -> goods_type intermediate | final | other; ``hs_vintage`` selects
    the rows when the map holds several vintages). Flows of class ``other``, mixed flows left out by
    ``pure_only`` and HS6 codes absent from the map are counted in the report, never silently lost.

    Returns ({"processing", "ordinary", "intermediate", "final"} -> city x HS4 quality frame, report).
    """
    from kspill_pipeline.compute.quality import aggregate_quality

    f = flows.collect() if isinstance(flows, pl.LazyFrame) else flows
    _req(f, ["year", "city_code", "hs6", "value_usd", quality_col], "subsample_quality flows")
    if "hs4" not in f.columns:
        f = f.with_columns(pl.col("hs6").str.slice(0, 4).alias("hs4"))
    has_firm = "firm_id" in f.columns
    if not has_firm:
        f = f.with_columns(pl.lit("_").alias("firm_id"))
    report: dict[str, Any] = {"n_flows": f.height, "value_usd": float(f["value_usd"].sum())}
    out: dict[str, pl.DataFrame] = {}

    def agg(sub: pl.DataFrame, name: str) -> None:
        sub = sub.filter(pl.col("value_usd") > 0)
        a, chk = aggregate_quality(sub, "city_hs4", quality_col=quality_col)
        if not has_firm:
            a = a.drop("n_firms")
        out[name] = a
        report[name] = {"n_flows": sub.height, "value_usd": float(sub["value_usd"].sum()) if sub.height else 0.0,
                        "n_cells": a.height, "weights_ok": chk["passed"]}

    if "trade_mode_class" in f.columns:
        bad = f.filter(~pl.col("trade_mode_class").is_in(["ordinary", "processing", "other"]))
        if bad.height:
            raise ValueError(f"subsample_quality: trade_mode_class values {bad['trade_mode_class'].unique().to_list()} "
                             "not in ordinary | processing | other")
        agg(f.filter(pl.col("trade_mode_class") == "processing"), "processing")
        agg(f.filter(pl.col("trade_mode_class") == "ordinary"), "ordinary")
        report["trade_mode_source"] = "trade_mode_class"
        report["n_flows_other_mode"] = int((f["trade_mode_class"] == "other").sum())
    elif "processing_share" in f.columns:
        s = pl.col("processing_share")
        bad = f.filter(s.is_null() | (s < 0) | (s > 1))
        if bad.height:
            raise ValueError(f"subsample_quality: {bad.height} flow(s) with processing_share null or outside [0, 1]")
        if trade_mode_rule == "value_split":
            agg(f.with_columns(pl.col("value_usd") * s), "processing")
            agg(f.with_columns(pl.col("value_usd") * (1.0 - s)), "ordinary")
        elif trade_mode_rule == "majority":
            agg(f.filter(s >= 0.5), "processing")
            agg(f.filter(s < 0.5), "ordinary")
        elif trade_mode_rule == "pure_only":
            agg(f.filter(s == 1.0), "processing")
            agg(f.filter(s == 0.0), "ordinary")
            report["n_flows_mixed_left_out"] = int(((f["processing_share"] > 0) & (f["processing_share"] < 1)).sum())
        else:
            raise ValueError(f"subsample_quality: trade_mode_rule must be value_split | majority | pure_only, "
                             f"not {trade_mode_rule!r}")
        report["trade_mode_source"] = f"processing_share ({trade_mode_rule})"
    else:
        report["trade_mode_source"] = "none: flows have neither trade_mode_class nor processing_share"
    if bec_map is not None:
        _req(bec_map, ["hs6", "goods_type"], "subsample_quality bec_map")
        bm = bec_map
        if "hs_vintage" in bm.columns:
            vint = bm["hs_vintage"].unique().to_list()
            if hs_vintage is not None:
                bm = bm.filter(pl.col("hs_vintage") == hs_vintage)
                if bm.height == 0:
                    raise ValueError(f"subsample_quality: bec_map has no rows of vintage {hs_vintage!r} (has {vint})")
            elif len(vint) > 1:
                raise ValueError(f"subsample_quality: bec_map holds several HS vintages {sorted(vint)}; pass hs_vintage")
        dup = bm.filter(pl.col("hs6").is_duplicated())
        if dup.height:
            raise ValueError(f"subsample_quality: bec_map has duplicate hs6 codes, e.g. {dup['hs6'].head(5).to_list()}")
        g = f.join(bm.select("hs6", "goods_type"), on="hs6", how="left")
        unm = g.filter(pl.col("goods_type").is_null())
        report["n_flows_hs6_not_in_bec_map"] = unm.height
        report["value_share_hs6_not_in_bec_map"] = (float(unm["value_usd"].sum()) / report["value_usd"]
                                                    if report["value_usd"] > 0 else None)
        report["n_flows_goods_other"] = int((g["goods_type"] == "other").sum())
        agg(g.filter(pl.col("goods_type") == "intermediate").drop("goods_type"), "intermediate")
        agg(g.filter(pl.col("goods_type") == "final").drop("goods_type"), "final")
    return out, report


def table6(panel: pl.DataFrame, cfg: S004Config | None = None) -> TableResult:
    """Table 6: ``hs4_qua ~ vagg + vagg_x_D + controls | city + year + HS4`` for D in centre, peri,
    east, mid, west (one column each; D's main effect is absorbed by the city FE). Columns
    ``vagg_x_<D>`` are built here from the dummies of the panel."""
    cfg = cfg or S004Config()
    c = _ctl(cfg)
    p = panel
    specs, skipped = [], {}
    for i, dname in enumerate(LOCATION_DUMMIES, start=1):
        m = f"({i})"
        if dname not in p.columns:
            skipped[m] = f"location dummy {dname!r} not in the panel (assemble_city_year(location=...))"
            continue
        p = p.with_columns((pl.col("vagg") * pl.col(dname).cast(pl.Float64)).alias(f"vagg_x_{dname}"))
        specs.append(ModelSpec("table6", m, "hs4_qua", ("vagg", f"vagg_x_{dname}", *c), FE_BASE, "city_hs4",
                               note=f"interaction with {dname}"))
    return _run(specs, p, cfg, skipped=skipped)


def table7(decomp_panel: pl.DataFrame, cfg: S004Config | None = None) -> TableResult:
    """Table 7: each decomposition component (within, between, entry, exit, total, gap; from
    quality_decomposition joined by :func:`build_analysis_panel`) on vagg with controls, city, year
    and HS4 FE, clustered by city x HS4. Each column has its own sample (null components of cells
    without continuers drop out, as the published Ns differ)."""
    cfg = cfg or S004Config()
    c = _ctl(cfg)
    specs = [ModelSpec("table7", f"({i})", comp, ("vagg", *c), FE_BASE, "city_hs4", note=comp)
             for i, comp in enumerate(DECOMP_COMPONENTS, start=1)]
    return _run(specs, decomp_panel, cfg)


def table8(
    panel: pl.DataFrame,
    city_year: pl.DataFrame | None = None,
    cfg: S004Config | None = None,
) -> TableResult:
    """Table 8. (1)-(4): minteg on L_vagg, lnitff, lndiv, lnspe on vagg, controls, city and year FE,
    at two levels: on the city x HS4 x year ``panel`` with the city-year outcome duplicated across
    HS4 cells (the paper's N ~ 616k; cluster city x HS4) and on ``city_year`` (one row per
    city-year; cluster ``table8_city_year_cluster``). The level named by
    ``table8_city_outcomes_level`` gets the labels (1)-(4) (compared with the published values),
    the other "(k) city-year" or "(k) duplicated". (5)-(6): hs4_qua on coa / d_coa (+ vagg when
    ``coa_include_vagg``), controls, city, year, HS4 FE."""
    cfg = cfg or S004Config()
    c = _ctl(cfg)
    dup_main = cfg.table8_city_outcomes_level == "duplicated_city_hs4_panel"
    specs: list[ModelSpec] = []
    cyc = None if cfg.table8_city_year_cluster == "none" else "city_code"
    for i, (y, x) in enumerate(TABLE8_CITY_OUTCOMES, start=1):
        specs.append(ModelSpec("table8", f"({i})" if dup_main else f"({i}) duplicated", y, (x, *c),
                               ("city_code", "year"), "city_hs4", sample="full",
                               note="city-year outcome duplicated across the city's HS4 cells"))
        specs.append(ModelSpec("table8", f"({i}) city-year" if dup_main else f"({i})", y, (x, *c),
                               ("city_code", "year"), cyc, sample="city_year", note="city-year level"))
    va = ("vagg",) if cfg.coa_include_vagg else ()
    specs.append(ModelSpec("table8", "(5)", "hs4_qua", ("coa", *va, *c), FE_BASE, "city_hs4"))
    specs.append(ModelSpec("table8", "(6)", "hs4_qua", ("d_coa", *va, *c), FE_BASE, "city_hs4"))
    skipped = {}
    if city_year is None:
        for s in specs:
            if s.sample == "city_year":
                skipped[s.model] = "no city-year frame supplied"
    specs = [s for s in specs if s.model not in skipped]
    return _run(specs, {"full": panel, "city_year": city_year}, cfg, skipped=skipped)


# ==================================================================================================
# published values
# ==================================================================================================
def load_published(path: str | Path | None = None) -> dict[str, Any]:
    """The parsed ``published/s004.yaml`` (spec S004 section 5)."""
    import yaml

    with open(path or PUBLISHED_PATH, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def published_frame(path: str | Path | None = None) -> pl.DataFrame:
    """Published coefficients as rows: table, model, term, published, published_std_error,
    published_stars, published_n_obs, published_r2."""
    doc = load_published(path)
    rows = []
    for table in ("table2", "table3", "table4", "table5", "table6", "table7", "table8"):
        for model, spec in doc[table]["models"].items():
            for term, v in spec["terms"].items():
                rows.append(dict(table=table, model=str(model), term=term, published=float(v["estimate"]),
                                 published_std_error=float(v["std_error"]),
                                 published_stars=str(v.get("stars", "")),
                                 published_n_obs=int(spec["n_obs"]) if spec.get("n_obs") is not None else None,
                                 published_r2=float(spec["r2"]) if spec.get("r2") is not None else None))
    return pl.DataFrame(rows, schema={"table": pl.String, "model": pl.String, "term": pl.String,
                                      "published": pl.Float64, "published_std_error": pl.Float64,
                                      "published_stars": pl.String, "published_n_obs": pl.Int64,
                                      "published_r2": pl.Float64})


# ==================================================================================================
# rendering
# ==================================================================================================
TERM_LABELS: dict[str, str] = {
    "vagg": "vagg", "L_vagg": "L.vagg", "vagg_in": "vagg_in", "vagg_txt": "vagg_txt", "coa": "coa",
    "d_coa": "d_coa", **{f"vagg_x_{d}": f"vagg × {d}" for d in LOCATION_DUMMIES},
}
FE_LABELS: dict[str, str] = {
    "city_code": "City FE", "year": "Year FE", "hs4": "HS4 FE", "hs6": "HS6 FE", "province_code": "Province FE",
    "prov_year": "Province × year FE", "firm_id": "Firm FE",
}
TITLES: dict[str, str] = {
    "table2": "Table 2: virtual agglomeration and city export quality (baseline OLS)",
    "table3": "Table 3: endogeneity (province FE, lagged vagg, 2SLS with historical instruments)",
    "table4": "Table 4: robustness (alternative measures, HS6 outcome, firm level, clustering)",
    "table5": "Table 5: trade mode and goods type subsamples",
    "table6": "Table 6: centre / periphery and east / central / west",
    "table7": "Table 7: mechanism (Melitz-Polanec decomposition components on vagg)",
    "table8": "Table 8: market integration, congestion, diversity, specialisation, co-agglomeration",
}


def render_s004(
    tidy: pl.DataFrame | TableResult,
    which: Literal["table2", "table3", "table4", "table5", "table6", "table7", "table8"],
    fmt: Literal["markdown", "latex", "html"] = "markdown",
    *,
    show_published: bool = True,
    show_controls: bool | None = None,
    **options: Any,
) -> str:
    """Render one S004 table (fixest-etable layout of ``studies.tables.render``) with the published
    estimates in side columns; N, R2 (within R2 for the 2SLS columns, as the published IV R2),
    first-stage F with a weak-IV mark, and the published N / R2 in a note. Controls are shown for
    Table 2 (as the paper prints them) unless ``show_controls`` says otherwise."""
    from kspill_pipeline.studies import tables

    df = tidy.tidy if isinstance(tidy, TableResult) else tidy
    df = df.filter((pl.col("table") == which) & (pl.col("kind") == "coef"))
    if df.height == 0:
        raise ValueError(f"render_s004: no rows for {which!r}")
    show_controls = (which == "table2") if show_controls is None else show_controls
    key_terms = ["vagg", "L_vagg", "vagg_in", "vagg_txt", *[f"vagg_x_{d}" for d in LOCATION_DUMMIES], "coa", "d_coa"]
    terms = key_terms + (list(CONTROLS) if show_controls else [])
    df = df.with_columns(
        pl.when(pl.col("estimator") == "2sls").then(pl.col("r2_within")).otherwise(pl.col("r2")).alias("r2_shown"))
    models = list(dict.fromkeys(df["model"].to_list()))
    labels = {}
    for m in models:
        r = df.filter(pl.col("model") == m).row(0, named=True)
        labels[m] = f"{m} {r['depvar']}" if which in ("table4", "table7", "table8") else m
        if which == "table5":
            labels[m] = f"{m} {r['sample']}"
    notes = []
    pub = (df.group_by("model", maintain_order=True)
           .agg(pl.col("published_n_obs").drop_nulls().first(), pl.col("published_r2").drop_nulls().first(),
                pl.col("n_clusters").drop_nulls().first()))
    pub_txt = [f"{m} N={n:,}" + (f", R2={r:g}" if r is not None else "")
               for m, n, r, _ in pub.rows() if n is not None]
    cl_txt = [f"{m} {g:,}" for m, _, _, g in pub.rows() if g is not None]
    if cl_txt:
        notes.append("Clusters: " + "; ".join(cl_txt) + ".")
    if show_published and pub_txt:
        notes.append("Published N / R2: " + "; ".join(pub_txt) + ".")
    fs = df.filter(pl.col("first_stage_f").is_not_null()).unique(subset="model", maintain_order=True)
    if fs.height:
        weak = fs.filter(pl.col("weak_iv"))["model"].to_list()
        notes.append("First-stage F: " + fs["first_stage_stat"][0] + ". Weak instrument (F below the threshold): "
                     + (", ".join(weak) if weak else "none") + ".")
        notes.append("R2 of the 2SLS columns is the within R2 from the structural residuals.")
    opts: dict[str, Any] = dict(
        terms=terms, term_labels=TERM_LABELS, fe_labels=FE_LABELS, column_labels=labels,
        title=TITLES[which], show_published=show_published, notes=notes, digits=4,
        stats=(("n_obs", "Observations"), ("r2_shown", "R2")),
    )
    if fs.height:
        opts["stats"] = (*opts["stats"], ("first_stage_f", "First-stage F"))
    opts.update(options)
    return tables.render(df, fmt, **opts)

