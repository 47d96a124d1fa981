"""Study S004 (Zhao, Ban, Li & Liu 2022): the city-year frame of every regressor, control,
instrument and mechanism variable, built from the researcher-supplied inputs
(``io.s004_inputs``) with the index functions of ``studies.s004_indices``. Pure polars, no Dagster.

Spec ``S004_virtual_agglomeration_export_quality.md`` sections 3.2-3.4 and 4; issue 6.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from kspill_pipeline.studies import s004_indices as ix
from kspill_pipeline.studies.s004_models import assemble_city_year

__all__ = ["CITY_YEAR_COLUMNS", "city_year_frame", "export_values_city_hs"]

#: Columns of the ``s004_city_year`` asset (contract ``data_contracts/s004_city_year.yaml``).
CITY_YEAR_COLUMNS: tuple[str, ...] = (
    "city_code", "year", "province_code", "vagg", "L_vagg", "vagg_in", "vagg_txt",
    "fdi", "open", "fisc", "dlp", "sci", "edu", "wage", "gdp", "fixinv", "p_rel",
    "iv_tel", "iv_post", "mseg", "minteg", "lnitff", "spe", "lnspe", "div", "lndiv", "agg", "coa", "d_coa",
    "centre", "peri", "east", "mid", "west",
)


def export_values_city_hs(flows: pl.LazyFrame | pl.DataFrame, product: str = "hs4") -> pl.DataFrame:
    """Export value by city x product x year (input of spe / div, Eqs. 25-26) from the study's
    export flows (``quality_flow``: the S004 sample after its cleaning rules)."""
    lf = flows.lazy() if isinstance(flows, pl.DataFrame) else flows
    if product == "hs4" and "hs4" not in lf.collect_schema().names():
        lf = lf.with_columns(pl.col("hs6").str.slice(0, 4).alias("hs4"))
    return (lf.group_by("city_code", "year", product).agg(pl.col("value_usd").sum())
            .sort("city_code", "year", product).collect())


def city_year_frame(
    inputs: dict[str, pl.DataFrame | None],
    exports: pl.DataFrame,
    sw: ix.S004IndexSwitches | None = None,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Every city-year variable of the S004 models (spec 3.2-3.4) -> (frame, report).

    ``inputs``: :func:`io.s004_inputs.read_s004_inputs` (optional tables may be None: vagg_txt is
    then null, agg uses sample totals only if the switch says so, minteg partners need the adjacency
    table under the default ``contiguous_cities``). ``exports``: :func:`export_values_city_hs`.
    Columns: :data:`CITY_YEAR_COLUMNS`. The report names the optional measures left null and why.
    """
    sw = sw or ix.S004IndexSwitches()
    rep: dict[str, Any] = {"switches": sw.model_dump(mode="json"), "null_measures": {}}
    country = ix.COUNTRY_OF[sw.virtual_coef_country]
    origin = ix.ORIGIN_OF[sw.virtual_coef_inputs]
    v = ix.vagg(inputs["base_output"], inputs["digital_coef"], country=country, origin=origin,
                missing=sw.vagg_missing_coef, rescale=sw.vagg_rescale)
    v_in = ix.vagg_in(inputs["base_output"], inputs["digital_coef"], transform=sw.vagg_in_transform,
                      country=country, origin=origin, missing=sw.vagg_missing_coef)
    if inputs.get("keyword_counts") is not None:
        v_txt = ix.vagg_txt(inputs["keyword_counts"], log=sw.vagg_txt_log).select("city_code", "year", "vagg_txt")
    else:
        v_txt = None
        rep["null_measures"]["vagg_txt"] = "no keyword_counts table (optional input)"
    ctl = ix.city_controls(inputs["city_controls"], base_year=sw.deflation_base_year, deflator_kind=sw.deflator_kind,
                           gdp_measure=sw.gdp_measure, edu_measure=sw.edu_measure)
    iv = ix.historical_iv(inputs["iv1984"], inputs["internet_investment"], scaling=sw.iv_1984_scaling,
                          lag=sw.iv_national_lag, series=sw.iv_national_series)
    adj = inputs.get("city_adjacency")
    if sw.mseg_partner_set == "contiguous_cities" and adj is None:
        raise ValueError("s004 city-year: mseg_partner_set='contiguous_cities' needs the city_adjacency table "
                         "(companion/s004/city_adjacency.csv); supply it or choose all_cities / same_province")
    mi = ix.market_integration(inputs["city_cpi"], partners=sw.mseg_partner_set, adjacency=adj,
                               demean=sw.mseg_demean, index_kind=sw.mseg_index_kind, var_ddof=sw.mseg_var_ddof,
                               min_categories=sw.mseg_min_categories).select("city_code", "year", "mseg", "minteg")
    roads = ix.lnitff(inputs["city_roads"])
    ex = exports
    if sw.spe_div_product_level != "hs4":
        raise ValueError("s004 city-year: export flows are aggregated at HS4 here; spe_div_product_level='hs6' "
                         "needs export_values_city_hs(..., product='hs6')")
    s = ix.spe(ex, formula=sw.spe_formula)
    d = ix.div(ex, formula=sw.div_formula)
    nat = inputs.get("national_industry")
    if sw.agg_lq_denominator == "national_totals" and nat is None:
        raise ValueError("s004 city-year: agg_lq_denominator='national_totals' needs the national_industry table; "
                         "supply it or choose sample_totals")
    a = ix.agg(inputs["city_industry"], measure=sw.agg_measure, denominator=sw.agg_lq_denominator, national=nat)
    co = ix.coa(a, v)
    dco = ix.d_coa(a, v)
    cities = sorted(set(v["city_code"].to_list()))
    loc = ix.location_dummies(cities, inputs["centre_cities"], inputs["region3"])
    cy = assemble_city_year(v, v_in, v_txt, ctl, iv, mi, roads, s, d, a, co, dco, location=loc)
    for c in CITY_YEAR_COLUMNS:
        if c not in cy.columns:
            cy = cy.with_columns(pl.lit(None, dtype=pl.Float64).alias(c))
    cy = cy.select(CITY_YEAR_COLUMNS)
    # city-years that only another input covers (e.g. instruments for a year without digital
    # coefficients) carry no vagg: they cannot enter any model and are reported, not kept
    no_v = cy.filter(pl.col("vagg").is_null())
    rep["dropped_without_vagg"] = {"rows": no_v.height,
                                   "years": sorted(set(no_v["year"].to_list())),
                                   "cities": no_v["city_code"].n_unique()}
    cy = cy.filter(pl.col("vagg").is_not_null())
    rep["rows"] = cy.height
    rep["cities"] = cy["city_code"].n_unique()
    rep["nonnull"] = {c: int(cy.height - cy[c].null_count()) for c in CITY_YEAR_COLUMNS[3:]}
    return cy, rep
