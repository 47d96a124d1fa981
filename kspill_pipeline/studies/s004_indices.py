"""Study S004 city indices from the non-customs inputs: vagg and alternatives, controls, instruments,
market integration, congestion, specialisation / diversity / location quotient, agg, coa, d_coa.

Pure polars / numpy (never import Dagster here). Spec
``S004_virtual_agglomeration_export_quality.md`` (Zhao, Ban, Li & Liu 2022), sections 3.2-3.4 and 4.2;
issue 6. Inputs are the conformed frames of :mod:`kspill_pipeline.io.s004_inputs` (contracts
``data_contracts/s004_in_*.yaml``); every function returns a tidy frame sorted by its keys. Every
[AMBIG] choice of the spec is a keyword argument with the spec default; :class:`S004IndexSwitches`
collects them (section 8 names) for the study configuration.

Missing data never drop a row silently: a city-year whose inputs are incomplete keeps its row
with a null index (and, where useful, a count such as ``n_partners``); structurally wrong inputs
(no coefficient for a sector with a positive share, double-counted trade sectors, a required frame
not given) raise ``ValueError`` naming the offending keys.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "CPI_CATEGORIES",
    "DIGITAL_SECTORS",
    "PUBLISHED_VAGG_MOMENTS",
    "S004IndexSwitches",
    "agg",
    "bartik",
    "bartik_shares",
    "city_controls",
    "coa",
    "d_coa",
    "deflate",
    "div",
    "historical_iv",
    "lnitff",
    "location_dummies",
    "location_quotient",
    "market_integration",
    "price_relative_to_base",
    "prov_ln_gdp_real",
    "rescale_vagg",
    "spe",
    "vagg",
    "vagg_in",
    "vagg_txt",
    "virtual_intensity",
]

#: Digital sectors d of Virtual_st (spec 3.2): telecom, IT and information services, the internet
#: part of wholesale and retail (separately, or the ICIO 2018 aggregate G45T47).
DIGITAL_SECTORS: tuple[str, ...] = ("J61", "J62T63", "G46", "G47", "G45T47")
#: The 8 CPI categories of the relative-price method (spec 3.4).
CPI_CATEGORIES: tuple[str, ...] = (
    "food", "tobacco_liquor", "clothing", "household", "medical", "transport_communication",
    "recreation_education", "housing",
)
#: Published Table 1 mean and SD of vagg (city-HS4-year weighted; spec 2.4), target of
#: ``vagg_rescale = match_published_moments``.
PUBLISHED_VAGG_MOMENTS: tuple[float, float] = (0.574, 0.084)
#: Switch value -> country code / origin of s004_in_digital_coef.
COUNTRY_OF = {"china": "CHN", "world": "WLD"}
ORIGIN_OF = {"total_domestic_plus_imported": "total", "domestic_only": "domestic"}


class S004IndexSwitches(BaseModel):
    """[AMBIG] switches of spec section 8 that the index functions take (spec defaults)."""

    model_config = ConfigDict(extra="forbid")

    virtual_coef_country: Literal["china", "world"] = "china"
    virtual_coef_inputs: Literal["total_domestic_plus_imported", "domestic_only"] = "total_domestic_plus_imported"
    vagg_rescale: Literal["none", "minmax", "match_published_moments"] = "none"
    vagg_missing_coef: Literal["error", "zero"] = Field(
        "error", description="A sector with a positive base share but no coefficient in a year (not in the spec).")
    vagg_in_transform: Literal["log", "level"] = Field(
        "log", description="[AMBIG] vagg_in = ln(Bartik of digital input) or its level (form not given).")
    vagg_txt_log: Literal["ln1p", "ln"] = Field(
        "ln1p", description="[AMBIG] 'summed, then logged': ln(1 + sum) keeps zero counts; ln gives null for 0.")
    vagg_txt_scope: Literal["prefecture_and_above"] = "prefecture_and_above"
    iv_1984_scaling: Literal["per_capita", "raw_count"] = "per_capita"
    iv_national_lag: Literal["t_minus_1", "t"] = "t_minus_1"
    iv_national_series: Literal["internet_investment", "internet_users"] = "internet_investment"
    deflation_base_year: int = 2000
    deflator_kind: Literal["auto", "index", "chain"] = "auto"
    gdp_measure: Literal["per_capita", "total"] = "per_capita"
    edu_measure: Literal["share_of_population", "per_10k"] = "share_of_population"
    dlp_denominator: Literal["gdp"] = "gdp"
    mseg_demean: Literal["over_all_pairs_by_k_t", "over_partners_by_i_k_t", "over_k_by_pair_t"] = \
        "over_all_pairs_by_k_t"
    mseg_partner_set: Literal["contiguous_cities", "all_cities", "same_province"] = "contiguous_cities"
    mseg_index_kind: Literal["chained", "level"] = "chained"
    mseg_var_ddof: Literal[0, 1] = Field(1, description="[AMBIG] variance over k: 1 = sample (Stata), 0 = population.")
    mseg_min_categories: int = Field(8, ge=2, le=8)
    spe_formula: Literal["rzi_max_ratio", "printed_1_over_n_max"] = "rzi_max_ratio"
    div_formula: Literal["rdi_inverse_abs_diff", "printed_ratio"] = "rdi_inverse_abs_diff"
    spe_div_product_level: Literal["hs4", "hs6"] = "hs4"
    agg_lq_denominator: Literal["national_totals", "sample_totals"] = "national_totals"
    agg_measure: Literal["employment", "output"] = "employment"


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def _require(df: pl.DataFrame, cols: list[str], what: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(f"{what}: missing column(s) {missing}; got {df.columns}")


def _sample_keys(df: pl.DataFrame, cols: list[str], n: int = 5) -> list[dict]:
    return df.select(cols).unique().sort(cols).head(n).to_dicts()


def _safe_log(expr: pl.Expr) -> pl.Expr:
    """ln(x) for x > 0, null otherwise (never -inf / NaN)."""
    return pl.when(expr > 0).then(expr.log()).otherwise(None)


# --------------------------------------------------------------------------------------------------
# vagg: Bartik / shift-share (Eq. 22) and alternatives
# --------------------------------------------------------------------------------------------------
def virtual_intensity(
    digital_coef: pl.DataFrame,
    *,
    country: str = "CHN",
    origin: str = "total",
    measure: Literal["coef", "input_value"] = "coef",
    digital_sectors: tuple[str, ...] = DIGITAL_SECTORS,
) -> pl.DataFrame:
    """Shift of Eq. (22): ``Virtual_st = sum_{d in D} a_dst * split_d`` (spec 3.2, likely reading).

    ``a_dst`` = ``coef`` (direct input coefficient z_dst / x_st) or, with ``measure="input_value"``,
    the digital input ``z_dst`` itself (vagg_in's "quantity of digital-factor input"); ``split`` is
    the internet share (1 for telecom and IT services). Rows of ``country`` / ``origin`` only
    (switches virtual_coef_country / virtual_coef_inputs). Returns sector, year, virtual.
    Raises when no row matches, when G45T47 and G46/G47 are both given for a sector-year (double
    counting), or when ``input_value`` is missing for a used row.
    """
    _require(digital_coef, ["country", "origin", "year", "sector", "digital_sector", "coef", "split_coef"],
             "virtual_intensity")
    d = digital_coef.filter((pl.col("country") == country) & (pl.col("origin") == origin)
                            & pl.col("digital_sector").is_in(list(digital_sectors)))
    if d.height == 0:
        have = _sample_keys(digital_coef, ["country", "origin"], 20) if digital_coef.height else []
        raise ValueError(f"virtual_intensity: no rows for country={country!r} origin={origin!r} and digital "
                         f"sectors {list(digital_sectors)}; available: {have}")
    dbl = d.group_by("sector", "year").agg(
        ((pl.col("digital_sector") == "G45T47").any() & pl.col("digital_sector").is_in(["G46", "G47"]).any())
        .alias("dbl")).filter("dbl")
    if dbl.height:
        raise ValueError(f"virtual_intensity: G45T47 and G46/G47 both given (double counting) for "
                         f"{_sample_keys(dbl, ['sector', 'year'])}")
    if measure == "input_value":
        _require(d, ["input_value"], "virtual_intensity(measure='input_value')")
        miss = d.filter(pl.col("input_value").is_null())
        if miss.height:
            raise ValueError(f"virtual_intensity: input_value missing for {miss.height} row(s), e.g. "
                             f"{_sample_keys(miss, ['sector', 'year', 'digital_sector'])}")
        a = pl.col("input_value")
    elif measure == "coef":
        a = pl.col("coef")
    else:
        raise ValueError(f"virtual_intensity: unknown measure {measure!r}")
    return (d.group_by("sector", "year").agg((a * pl.col("split_coef")).sum().alias("virtual"))
            .with_columns(pl.col("year").cast(pl.Int32)).sort("sector", "year"))


def bartik_shares(base_output: pl.DataFrame) -> pl.DataFrame:
    """Share of Eq. (22): ``output_{s,c,base} / output_{c,base}`` per city (sums to 1 per city).

    Returns city_code, sector, share (rows with zero output keep share 0). A city with zero total
    output has no shares and raises.
    """
    _require(base_output, ["city_code", "sector", "output"], "bartik_shares")
    tot = pl.col("output").sum().over("city_code")
    zero = base_output.group_by("city_code").agg(pl.col("output").sum()).filter(pl.col("output") <= 0)
    if zero.height:
        raise ValueError(f"bartik_shares: cities with zero total base output: {zero['city_code'].sort().to_list()[:10]}")
    return (base_output.group_by("city_code", "sector").agg(pl.col("output").sum())
            .with_columns((pl.col("output") / tot).alias("share"))
            .select("city_code", "sector", "share").sort("city_code", "sector"))


def bartik(
    shares: pl.DataFrame,
    shift: pl.DataFrame,
    *,
    shift_col: str = "virtual",
    out_col: str = "vagg",
    missing: Literal["error", "zero"] = "error",
) -> pl.DataFrame:
    """``out_ct = sum_s share_cs * shift_st`` for every city of ``shares`` and year of ``shift``.

    ``missing="error"`` raises when a sector with a positive share has no shift in a year;
    ``"zero"`` counts it as 0. Returns city_code, year, ``out_col``.
    """
    _require(shares, ["city_code", "sector", "share"], "bartik shares")
    _require(shift, ["sector", "year", shift_col], "bartik shift")
    years = shift.select(pl.col("year").cast(pl.Int32)).unique()
    grid = shares.filter(pl.col("share") > 0).join(years, how="cross")
    j = grid.join(shift.select("sector", pl.col("year").cast(pl.Int32), pl.col(shift_col)),
                  on=["sector", "year"], how="left")
    miss = j.filter(pl.col(shift_col).is_null())
    if miss.height and missing == "error":
        raise ValueError(f"bartik: no {shift_col} for {miss.select('sector', 'year').unique().height} sector-year(s) "
                         f"with a positive base share, e.g. {_sample_keys(miss, ['sector', 'year'])}; supply "
                         "them or use missing='zero'")
    out = (j.group_by("city_code", "year")
           .agg((pl.col("share") * pl.col(shift_col).fill_null(0.0)).sum().alias(out_col)))
    # cities whose shares are all zero cannot occur (bartik_shares); keep every city x year
    allc = shares.select("city_code").unique().join(years, how="cross")
    return allc.join(out, on=["city_code", "year"], how="left").sort("city_code", "year")


def rescale_vagg(df: pl.DataFrame, method: Literal["none", "minmax", "match_published_moments"] = "none",
                 col: str = "vagg", target: tuple[float, float] = PUBLISHED_VAGG_MOMENTS) -> pl.DataFrame:
    """Switch vagg_rescale (spec 3.2 [AMBIG] level): ``none``; ``minmax`` = (v - min) / (max - min)
    over all city-years; ``match_published_moments`` = target_mean + target_sd * (v - mean) / sd
    (sample SD, ddof 1) over all city-years (the published moments are city-HS4-year weighted)."""
    v = pl.col(col)
    if method == "none":
        return df
    if method == "minmax":
        lo, hi = df[col].min(), df[col].max()
        if hi is None or hi == lo:
            raise ValueError("rescale_vagg(minmax): no variation")
        return df.with_columns(((v - lo) / (hi - lo)).alias(col))
    if method == "match_published_moments":
        m, s = df[col].mean(), df[col].std(ddof=1)
        if s is None or s == 0:
            raise ValueError("rescale_vagg(match_published_moments): no variation")
        return df.with_columns((target[0] + target[1] * (v - m) / s).alias(col))
    raise ValueError(f"rescale_vagg: unknown method {method!r}")


def vagg(
    base_output: pl.DataFrame,
    digital_coef: pl.DataFrame,
    *,
    country: str = "CHN",
    origin: str = "total",
    digital_sectors: tuple[str, ...] = DIGITAL_SECTORS,
    missing: Literal["error", "zero"] = "error",
    rescale: Literal["none", "minmax", "match_published_moments"] = "none",
) -> pl.DataFrame:
    """Virtual agglomeration, Eq. (22): ``vagg_ct = sum_s (output_{s,c,2004} / output_{c,2004}) Virtual_st``.

    Shares from :func:`bartik_shares`, shift from :func:`virtual_intensity` (coefficients times
    internet split), optional rescaling (:func:`rescale_vagg`). Returns city_code, year, vagg.
    """
    sh = bartik_shares(base_output)
    vi = virtual_intensity(digital_coef, country=country, origin=origin, digital_sectors=digital_sectors)
    return rescale_vagg(bartik(sh, vi, missing=missing), rescale)


def vagg_in(
    base_output: pl.DataFrame,
    digital_coef: pl.DataFrame,
    *,
    transform: Literal["log", "level"] = "log",
    country: str = "CHN",
    origin: str = "total",
    digital_sectors: tuple[str, ...] = DIGITAL_SECTORS,
    missing: Literal["error", "zero"] = "error",
) -> pl.DataFrame:
    """Alternative measure vagg_in (spec 3.2, Table 4 col. 1): Eq. (22) with the coefficient replaced
    by the quantity of digital-factor input ``Z_st = sum_d z_dst * split_d``.

    [AMBIG] levels or logs: ``transform="log"`` (default) gives ``ln(sum_s share_cs Z_st)`` (null when
    the sum is 0), ``"level"`` the sum itself. Returns city_code, year, vagg_in.
    """
    sh = bartik_shares(base_output)
    z = virtual_intensity(digital_coef, country=country, origin=origin, measure="input_value",
                          digital_sectors=digital_sectors)
    out = bartik(sh, z, out_col="vagg_in", missing=missing)
    if transform == "log":
        return out.with_columns(_safe_log(pl.col("vagg_in")).alias("vagg_in"))
    if transform != "level":
        raise ValueError(f"vagg_in: unknown transform {transform!r}")
    return out


def vagg_txt(keyword_counts: pl.DataFrame, *, log: Literal["ln1p", "ln"] = "ln1p") -> pl.DataFrame:
    """Text-based measure vagg_txt (spec 3.2, Table 4 col. 3): keyword frequencies of the
    government work report summed over the dictionary, then logged.

    [AMBIG] zeros: ``log="ln1p"`` (default) = ln(1 + sum); ``"ln"`` = ln(sum), null when the sum is 0.
    Returns city_code, year, n_count (the sum), vagg_txt.
    """
    _require(keyword_counts, ["city_code", "year", "count"], "vagg_txt")
    s = keyword_counts.group_by("city_code", "year").agg(pl.col("count").sum().cast(pl.Int64).alias("n_count"))
    if log == "ln1p":
        e = pl.col("n_count").cast(pl.Float64).log1p()
    elif log == "ln":
        e = _safe_log(pl.col("n_count").cast(pl.Float64))
    else:
        raise ValueError(f"vagg_txt: unknown log {log!r}")
    return s.with_columns(e.alias("vagg_txt")).sort("city_code", "year")


# --------------------------------------------------------------------------------------------------
# deflation and controls (spec 2.3 "deflated to base year 2000", 3.3)
# --------------------------------------------------------------------------------------------------
def price_relative_to_base(
    df: pl.DataFrame,
    *,
    base_year: int = 2000,
    by: str | list[str] = "city_code",
    index_col: str = "deflator_index",
    chain_col: str = "deflator_chain",
    kind: Literal["auto", "index", "chain"] = "auto",
    out_col: str = "p_rel",
) -> pl.DataFrame:
    """Add ``p_rel = P_t / P_base`` per group ``by`` (the factor that turns base-year prices into
    year-t prices; real = nominal / p_rel).

    ``kind="index"``: a price level with any base, ``p_rel = index_t / index_base`` (null for every
    row of a group without a base-year index). ``kind="chain"``: previous year = 100,
    ``p_rel = prod_{tau=base+1..t} chain_tau / 100`` for t > base and
    ``1 / prod_{tau=t+1..base} chain_tau / 100`` for t < base (1 at the base year); a missing link
    gives null (never a shortened chain). ``"auto"``: chain when ``chain_col`` has no null, else
    index when ``index_col`` has no null, else ``ValueError``.
    """
    keys = [by] if isinstance(by, str) else list(by)
    if kind == "auto":
        if chain_col in df.columns and df.height and df[chain_col].null_count() == 0:
            kind = "chain"
        elif index_col in df.columns and df.height and df[index_col].null_count() == 0:
            kind = "index"
        elif df.height == 0:
            kind = "index"
        else:
            raise ValueError(f"price_relative_to_base: neither {chain_col} nor {index_col} is complete; "
                             "choose kind='chain' or 'index' explicitly (incomplete rows get null)")
    if kind == "index":
        base = (df.filter(pl.col("year") == base_year).select(*keys, pl.col(index_col).alias("__base")))
        if base.select(keys).is_duplicated().any():
            raise ValueError("price_relative_to_base: duplicate base-year rows per group")
        return (df.join(base, on=keys, how="left", nulls_equal=True)
                .with_columns((pl.col(index_col) / pl.col("__base")).alias(out_col)).drop("__base"))
    if kind != "chain":
        raise ValueError(f"price_relative_to_base: unknown kind {kind!r}")
    d = df.with_row_index("__i")
    rel = np.full(d.height, np.nan)
    for _, g in d.group_by(keys, maintain_order=True):
        links = {int(y): (float(c) if c is not None else None)
                 for y, c in zip(g["year"].to_list(), g[chain_col].to_list())}
        for i, t in zip(g["__i"].to_list(), g["year"].to_list()):
            t = int(t)
            span = range(base_year + 1, t + 1) if t > base_year else range(t + 1, base_year + 1)
            prod = 1.0
            ok = True
            for tau in span:
                c = links.get(tau)
                if c is None or not math.isfinite(c) or c <= 0:
                    ok = False
                    break
                prod *= c / 100.0
            if ok:
                rel[i] = prod if t >= base_year else 1.0 / prod
    return d.with_columns(pl.Series(out_col, rel).fill_nan(None)).drop("__i")


def deflate(
    df: pl.DataFrame,
    value_cols: list[str],
    *,
    base_year: int = 2000,
    by: str | list[str] = "city_code",
    index_col: str = "deflator_index",
    chain_col: str = "deflator_chain",
    kind: Literal["auto", "index", "chain"] = "auto",
    suffix: str = "_real",
) -> pl.DataFrame:
    """Nominal -> base-year prices (spec 2.3: all nominal variables deflated to 2000):
    ``x_real = x / p_rel`` with p_rel from :func:`price_relative_to_base`. Adds ``<col><suffix>``
    and ``p_rel``."""
    out = price_relative_to_base(df, base_year=base_year, by=by, index_col=index_col, chain_col=chain_col,
                                 kind=kind)
    return out.with_columns([(pl.col(c) / pl.col("p_rel")).alias(f"{c}{suffix}") for c in value_cols])


def city_controls(
    controls: pl.DataFrame,
    *,
    base_year: int = 2000,
    deflator_kind: Literal["auto", "index", "chain"] = "auto",
    gdp_measure: Literal["per_capita", "total"] = "per_capita",
    edu_measure: Literal["share_of_population", "per_10k"] = "share_of_population",
) -> pl.DataFrame:
    """The paper's controls (spec 3.3) from s004_in_city_controls: fdi, open, fisc, dlp, sci, edu,
    fixinv as supplied (ratios; edu x 10000 with ``edu_measure="per_10k"``), ``wage = ln(real
    average wage)``, ``gdp = ln(real GDP per capita)`` (or total GDP with ``gdp_measure="total"``),
    real = nominal / p_rel at ``base_year`` prices. Returns city_code, year, the nine controls, p_rel.
    """
    d = deflate(controls, ["wage_nominal", "gdp_pc_nominal", "gdp_nominal"], base_year=base_year,
                kind=deflator_kind)
    gdp_col = {"per_capita": "gdp_pc_nominal_real", "total": "gdp_nominal_real"}[gdp_measure]
    edu = pl.col("edu") * (10000.0 if edu_measure == "per_10k" else 1.0)
    return d.select(
        "city_code", "year", "fdi", "open", "fisc", "dlp", "sci", edu.alias("edu"),
        _safe_log(pl.col("wage_nominal_real")).alias("wage"), _safe_log(pl.col(gdp_col)).alias("gdp"),
        "fixinv", "p_rel",
    ).sort("city_code", "year")


def prov_ln_gdp_real(prov_gdp: pl.DataFrame) -> pl.DataFrame:
    """ln provincial real GDP for the quality equation (18) (spec 3.1 added regressor): province_code,
    year, ln_gdp_real (the frame ``compute.quality.estimate_quality`` takes as ``prov_gdp``).
    Raises when the rows mix price base years."""
    _require(prov_gdp, ["province_code", "year", "gdp_real"], "prov_ln_gdp_real")
    if "price_base_year" in prov_gdp.columns and prov_gdp["price_base_year"].n_unique() > 1:
        raise ValueError(f"prov_ln_gdp_real: mixed price base years {prov_gdp['price_base_year'].unique().sort().to_list()}")
    return prov_gdp.select("province_code", pl.col("year").cast(pl.Int32),
                           _safe_log(pl.col("gdp_real")).alias("ln_gdp_real")).sort("province_code", "year")


# --------------------------------------------------------------------------------------------------
# historical instruments (spec 4.2, Table 3 cols. 5-6)
# --------------------------------------------------------------------------------------------------
def historical_iv(
    iv1984: pl.DataFrame,
    national: pl.DataFrame,
    *,
    years: list[int] | None = None,
    scaling: Literal["per_capita", "raw_count"] = "per_capita",
    lag: Literal["t_minus_1", "t"] = "t_minus_1",
    series: Literal["internet_investment", "internet_users"] = "internet_investment",
) -> pl.DataFrame:
    """Nunn-Qian style instruments: ``iv_tel_ct = tel_c,1984 x N_(t-1)`` and
    ``iv_post_ct = post_c,1984 x N_(t-1)`` (spec 4.2; [AMBIG] switches iv_1984_scaling and
    iv_national_lag: counts per 10k persons of 1984 population by default, N lagged one year).

    ``years``: output years (default: every year whose N_(t-lag) exists). Null when the national
    value or (per capita) the 1984 population is missing. Returns city_code, year, iv_tel, iv_post.
    """
    _require(iv1984, ["city_code", "telephones_1984", "post_offices_1984"], "historical_iv")
    _require(national, ["year", series], "historical_iv national")
    k = {"t_minus_1": 1, "t": 0}[lag]
    nat = national.select((pl.col("year").cast(pl.Int32) + k).alias("year"), pl.col(series).alias("__n"))
    if years is None:
        yrs = nat.select("year")
    else:
        yrs = pl.DataFrame({"year": [int(y) for y in years]}, schema={"year": pl.Int32})
    if scaling == "per_capita":
        _require(iv1984, ["population_1984"], "historical_iv(per_capita)")
        pop = pl.col("population_1984")
        tel = pl.when(pop > 0).then(pl.col("telephones_1984") / pop)
        post = pl.when(pop > 0).then(pl.col("post_offices_1984") / pop)
    elif scaling == "raw_count":
        tel, post = pl.col("telephones_1984"), pl.col("post_offices_1984")
    else:
        raise ValueError(f"historical_iv: unknown scaling {scaling!r}")
    x = iv1984.select("city_code", tel.alias("__tel"), post.alias("__post"))
    return (x.join(yrs, how="cross").join(nat, on="year", how="left")
            .select("city_code", "year", (pl.col("__tel") * pl.col("__n")).alias("iv_tel"),
                    (pl.col("__post") * pl.col("__n")).alias("iv_post"))
            .sort("city_code", "year"))


# --------------------------------------------------------------------------------------------------
# market integration: relative-price method (Eq. 24; Gui et al. 2006)
# --------------------------------------------------------------------------------------------------
def _partner_pairs(cities: pl.Series, partners: str, adjacency: pl.DataFrame | None) -> pl.DataFrame:
    c = pl.DataFrame({"city_code": cities.unique().sort()})
    if partners == "contiguous_cities":
        if adjacency is None:
            raise ValueError("market_integration: partners='contiguous_cities' needs the adjacency table "
                             "(s004_in_city_adjacency); or use 'all_cities' / 'same_province'")
        a = adjacency.select("city_code", pl.col("neighbour_code").alias("partner"))
        pairs = pl.concat([a, a.select(pl.col("partner").alias("city_code"), pl.col("city_code").alias("partner"))])
        pairs = pairs.unique().filter(pl.col("city_code") != pl.col("partner"))
    elif partners in {"all_cities", "same_province"}:
        pairs = c.join(c.rename({"city_code": "partner"}), how="cross").filter(pl.col("city_code") != pl.col("partner"))
        if partners == "same_province":
            pairs = pairs.filter(pl.col("city_code").str.slice(0, 2) == pl.col("partner").str.slice(0, 2))
    else:
        raise ValueError(f"market_integration: unknown partners {partners!r}")
    return pairs


def market_integration(
    cpi: pl.DataFrame,
    *,
    partners: Literal["contiguous_cities", "all_cities", "same_province"] = "contiguous_cities",
    adjacency: pl.DataFrame | None = None,
    demean: Literal["over_all_pairs_by_k_t", "over_partners_by_i_k_t", "over_k_by_pair_t"] = "over_all_pairs_by_k_t",
    index_kind: Literal["chained", "level"] = "chained",
    var_ddof: int = 1,
    min_categories: int = 8,
) -> pl.DataFrame:
    """Market segmentation and integration of each city-year (spec 3.4, Eq. 24 as corrected):

    1. ``|dQ_ijt^k| = |ln(p_it^k / p_i,t-1^k) - ln(p_jt^k / p_j,t-1^k)|`` for city i, partner j and
       CPI category k; with ``index_kind="chained"`` (previous year = 100, column cpi_chain) the
       log change is ``ln(cpi_chain / 100)``, with ``"level"`` (cpi_index) it needs year t-1.
    2. De-mean ([AMBIG] switch mseg_demean): ``q = |dQ| - mean(|dQ|)``, the mean over all pairs for
       each (k, t) (default, Gui et al. 2006), over i's partners for each (i, k, t) (the printed
       symbol), or over k for each pair-year (a no-op for step 3).
    3. ``var_k(q_ijt^k)`` across categories (``var_ddof``; pairs with fewer than
       ``min_categories`` categories are not used).
    4. ``mseg_it = sum_{j != i} var_k(q_ijt^k) / n`` (n = partners with a variance) and
       ``minteg_it = sqrt(1 / mseg_it)`` (null when mseg is missing or 0, i.e. below 1e-12 times the
       mean squared |dQ| of the data: rounding noise of an exact zero).

    Partners ([AMBIG] switch mseg_partner_set): ``contiguous_cities`` (pairs of ``adjacency``, made
    symmetric; default), ``all_cities`` or ``same_province`` (same first two adcode digits). The
    pairs are ordered (i, j); with symmetric partner sets the mean over ordered pairs equals the mean
    over unordered ones. Every city-year with CPI data is returned: city_code, year, n_partners,
    mseg, minteg.
    """
    _require(cpi, ["city_code", "year", "category"], "market_integration")
    if index_kind == "chained":
        _require(cpi, ["cpi_chain"], "market_integration(chained)")
        d = cpi.select("city_code", pl.col("year").cast(pl.Int32), "category",
                       _safe_log(pl.col("cpi_chain") / 100.0).alias("dlnp"))
    elif index_kind == "level":
        _require(cpi, ["cpi_index"], "market_integration(level)")
        cur = cpi.select("city_code", pl.col("year").cast(pl.Int32), "category", pl.col("cpi_index").alias("__p"))
        prev = cur.select("city_code", (pl.col("year") + 1).alias("year"), "category", pl.col("__p").alias("__p0"))
        d = cur.join(prev, on=["city_code", "year", "category"], how="left").select(
            "city_code", "year", "category", _safe_log(pl.col("__p") / pl.col("__p0")).alias("dlnp"))
    else:
        raise ValueError(f"market_integration: unknown index_kind {index_kind!r}")
    city_years = d.select("city_code", "year").unique()
    d = d.filter(pl.col("dlnp").is_not_null())
    pairs = _partner_pairs(d["city_code"], partners, adjacency)
    dj = d.rename({"city_code": "partner", "dlnp": "dlnp_j"})
    q = (d.join(pairs, on="city_code", how="inner")
         .join(dj, on=["partner", "year", "category"], how="inner")
         .with_columns((pl.col("dlnp") - pl.col("dlnp_j")).abs().alias("absdq")))
    grp = {"over_all_pairs_by_k_t": ["year", "category"],
           "over_partners_by_i_k_t": ["city_code", "year", "category"],
           "over_k_by_pair_t": ["city_code", "partner", "year"]}
    if demean not in grp:
        raise ValueError(f"market_integration: unknown demean {demean!r}")
    q = q.with_columns((pl.col("absdq") - pl.col("absdq").mean().over(grp[demean])).alias("q"))
    v = (q.group_by("city_code", "partner", "year")
         .agg(pl.col("q").var(ddof=var_ddof).alias("var_q"), pl.len().alias("n_k"))
         .filter((pl.col("n_k") >= max(min_categories, var_ddof + 1)) & pl.col("var_q").is_not_null()))
    m = v.group_by("city_code", "year").agg(pl.len().cast(pl.Int32).alias("n_partners"),
                                             pl.col("var_q").mean().alias("mseg"))
    # a variance below 1e-12 x the mean squared |dQ| is rounding noise of an exact zero
    scale = q.select((pl.col("absdq") ** 2).mean()).item() if q.height else None
    eps = 1e-12 * scale if scale else 0.0
    out = city_years.join(m, on=["city_code", "year"], how="left").with_columns(
        pl.col("n_partners").fill_null(0),
        pl.when(pl.col("mseg") > eps).then((1.0 / pl.col("mseg")).sqrt()).otherwise(None).alias("minteg"),
    )
    return out.select("city_code", "year", "n_partners", "mseg", "minteg").sort("city_code", "year")


# --------------------------------------------------------------------------------------------------
# congestion, specialisation, diversity, location quotient, agg
# --------------------------------------------------------------------------------------------------
def lnitff(roads: pl.DataFrame) -> pl.DataFrame:
    """Congestion / traffic-cost proxy (spec 3.4): ``lnitff = ln(road area / resident population)``.
    Returns city_code, year, lnitff."""
    _require(roads, ["city_code", "year", "road_area_pc"], "lnitff")
    return roads.select("city_code", "year", _safe_log(pl.col("road_area_pc")).alias("lnitff")).sort("city_code", "year")


def _shares(df: pl.DataFrame, loc: str, product: str, value: str, time: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(location x product shares s_cjt with national shares s_jt joined, national product counts)."""
    _require(df, [loc, product, value, time], "specialisation/diversity")
    x = df.group_by(loc, product, time).agg(pl.col(value).sum())
    nat = (x.group_by(product, time).agg(pl.col(value).sum().alias("__xj"))
           .filter(pl.col("__xj") > 0)
           .with_columns((pl.col("__xj") / pl.col("__xj").sum().over(time)).alias("s_j")))
    n = nat.group_by(time).agg(pl.len().alias("n_products"))
    c = (x.filter(pl.col(value).sum().over(loc, time) > 0)  # a location without exports has no shares
         .with_columns((pl.col(value) / pl.col(value).sum().over(loc, time)).alias("s_c"))
         .join(nat.select(product, time, "s_j"), on=[product, time], how="inner"))
    return c, n


def spe(
    exports: pl.DataFrame,
    *,
    loc: str = "city_code",
    product: str = "hs4",
    value: str = "value_usd",
    time: str = "year",
    formula: Literal["rzi_max_ratio", "printed_1_over_n_max"] = "rzi_max_ratio",
) -> pl.DataFrame:
    """Export specialisation, Eq. (25) (spec 3.4 [AMBIG] switch spe_formula):
    ``rzi_max_ratio`` (default, Duranton-Puga RZI) ``spe_ct = max_j s_cjt / s_jt``;
    ``printed_1_over_n_max`` ``spe_ct = (1 / n_t) max_j s_cjt / s_jt`` with n_t the number of products
    with national exports in t. s_cjt = product j's share of city c's exports, s_jt = j's national
    share (both from ``exports``). Returns loc, time, spe, lnspe (null for cities without exports)."""
    c, n = _shares(exports, loc, product, value, time)
    out = (c.group_by(loc, time).agg((pl.col("s_c") / pl.col("s_j")).max().alias("spe"))
           .join(n, on=time, how="left"))
    if formula == "printed_1_over_n_max":
        out = out.with_columns((pl.col("spe") / pl.col("n_products")).alias("spe"))
    elif formula != "rzi_max_ratio":
        raise ValueError(f"spe: unknown formula {formula!r}")
    return (_all_locs(exports, loc, time).join(out, on=[loc, time], how="left")
            .select(loc, time, "spe", _safe_log(pl.col("spe")).alias("lnspe")).sort(loc, time))


def div(
    exports: pl.DataFrame,
    *,
    loc: str = "city_code",
    product: str = "hs4",
    value: str = "value_usd",
    time: str = "year",
    formula: Literal["rdi_inverse_abs_diff", "printed_ratio"] = "rdi_inverse_abs_diff",
) -> pl.DataFrame:
    """Export diversity, Eq. (26) (spec 3.4 [AMBIG] switch div_formula):
    ``rdi_inverse_abs_diff`` (default, Duranton-Puga RDI) ``div_ct = 1 / sum_j |s_cjt - s_jt|`` over
    every product j with national exports (a product the city does not export contributes s_jt);
    ``printed_ratio`` ``div_ct = 1 / sum_j s_cjt / s_jt``. Returns loc, time, div, lndiv (null when
    the sum is 0, i.e. the city mirrors the nation exactly, or the city has no exports)."""
    c, _ = _shares(exports, loc, product, value, time)
    if formula == "rdi_inverse_abs_diff":
        # sum over all national j = sum over the city's j of (|s_c - s_j| - s_j) + sum_j s_j (= 1)
        s = c.group_by(loc, time).agg(((pl.col("s_c") - pl.col("s_j")).abs() - pl.col("s_j")).sum().alias("__s"))
        s = s.with_columns((pl.col("__s") + 1.0).alias("__s"))
    elif formula == "printed_ratio":
        s = c.group_by(loc, time).agg((pl.col("s_c") / pl.col("s_j")).sum().alias("__s"))
    else:
        raise ValueError(f"div: unknown formula {formula!r}")
    s = s.with_columns(pl.when(pl.col("__s") > 1e-12).then(1.0 / pl.col("__s")).otherwise(None).alias("div"))
    return (_all_locs(exports, loc, time).join(s, on=[loc, time], how="left")
            .select(loc, time, "div", _safe_log(pl.col("div")).alias("lndiv")).sort(loc, time))


def _all_locs(df: pl.DataFrame, loc: str, time: str) -> pl.DataFrame:
    return df.select(loc, time).unique()


def location_quotient(
    df: pl.DataFrame,
    *,
    loc: str = "city_code",
    cat: str = "industry",
    value: str = "employment",
    time: str = "year",
    national: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """Location quotient ``LQ_lct = (x_lct / x_lt) / (X_ct / X_t)`` (standard form [EXT]).

    Denominator from ``national`` (columns cat, time, value: national totals) when given, else the
    sums over the locations of ``df`` (sample totals). A location-time with any null value gets null
    LQs (its total is unknown). Returns loc, cat, time, lq.
    """
    _require(df, [loc, cat, value, time], "location_quotient")
    x = df.group_by(loc, cat, time).agg(pl.col(value).sum(), pl.col(value).null_count().alias("__nn"))
    x = x.with_columns(pl.when(pl.col("__nn") > 0).then(None).otherwise(pl.col(value)).alias(value))
    tot_l = pl.col(value).sum().over(loc, time)
    incomplete = pl.col(value).is_null().any().over(loc, time)
    x = x.with_columns(pl.when(incomplete).then(None).otherwise(pl.col(value) / tot_l).alias("__sl"))
    if national is None:
        nat = x.filter(~pl.col(value).is_null().any().over(loc, time)).group_by(cat, time).agg(pl.col(value).sum())
    else:
        _require(national, [cat, time, value], "location_quotient national")
        nat = national.group_by(cat, time).agg(pl.col(value).sum())
    nat = nat.with_columns((pl.col(value) / pl.col(value).sum().over(time)).alias("__sn")).select(cat, time, "__sn")
    out = x.join(nat, on=[cat, time], how="left").with_columns(
        pl.when(pl.col("__sn") > 0).then(pl.col("__sl") / pl.col("__sn")).otherwise(None).alias("lq"))
    return out.select(loc, cat, time, "lq").sort(loc, cat, time)


def agg(
    city_industry: pl.DataFrame,
    *,
    measure: Literal["employment", "output"] = "employment",
    denominator: Literal["national_totals", "sample_totals"] = "national_totals",
    national: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """Geographic agglomeration (spec 3.4): location quotient of secondary-industry employment,
    ``agg_ct = (E^II_ct / E_ct) / (E^II_t / E_t)`` with E_ct the city's total over all its
    industries and the national ratio from ``national`` (s004_in_national_industry; switch
    agg_lq_denominator = national_totals, default) or the sums over the file's cities
    (``sample_totals``). ``measure="output"`` uses output instead of employment. A city-year with a
    null value in any industry gets null. Returns city_code, year, agg.
    """
    _require(city_industry, ["city_code", "year", "sector", measure], "agg")
    x = city_industry.select("city_code", "year", "sector", pl.col(measure).alias("__v"))
    if denominator == "national_totals":
        if national is None:
            raise ValueError("agg: denominator='national_totals' needs the national table "
                             "(s004_in_national_industry); or use denominator='sample_totals'")
        _require(national, ["year", "sector", measure], "agg national")
        nat = national.select("year", "sector", pl.col(measure).alias("__v"))
    elif denominator == "sample_totals":
        nat = None
    else:
        raise ValueError(f"agg: unknown denominator {denominator!r}")
    is2 = pl.col("sector") == "secondary"
    cy = x.group_by("city_code", "year").agg(
        pl.col("__v").filter(is2).sum().alias("__e2"), pl.col("__v").sum().alias("__e"),
        pl.col("__v").null_count().alias("__nn"))
    if nat is None:
        nat = x.join(cy.filter(pl.col("__nn") == 0).select("city_code", "year"), on=["city_code", "year"])
    nt = nat.group_by("year").agg(
        pl.col("__v").filter(is2).sum().alias("__n2"), pl.col("__v").sum().alias("__n"),
        pl.col("__v").null_count().alias("__nnn"))
    out = cy.join(nt, on="year", how="left")
    ok = ((pl.col("__nn") == 0) & (pl.col("__e") > 0) & (pl.col("__nnn") == 0) & (pl.col("__n") > 0)
          & (pl.col("__n2") > 0))
    out = out.with_columns(
        pl.when(ok).then((pl.col("__e2") / pl.col("__e")) / (pl.col("__n2") / pl.col("__n"))).otherwise(None)
        .alias("agg"))
    return out.select("city_code", "year", "agg").sort("city_code", "year")


# --------------------------------------------------------------------------------------------------
# co-agglomeration and co-evolution (Eqs. 27-28)
# --------------------------------------------------------------------------------------------------
def _join_agg_vagg(agg_df: pl.DataFrame, vagg_df: pl.DataFrame, agg_col: str, vagg_col: str) -> pl.DataFrame:
    _require(agg_df, ["city_code", "year", agg_col], "coa agg")
    _require(vagg_df, ["city_code", "year", vagg_col], "coa vagg")
    a = agg_df.select("city_code", pl.col("year").cast(pl.Int32), pl.col(agg_col).alias("__a"))
    v = vagg_df.select("city_code", pl.col("year").cast(pl.Int32), pl.col(vagg_col).alias("__v"))
    return a.join(v, on=["city_code", "year"], how="full", coalesce=True)


def coa(agg_df: pl.DataFrame, vagg_df: pl.DataFrame, *, agg_col: str = "agg", vagg_col: str = "vagg") -> pl.DataFrame:
    """Co-agglomeration, Eq. (27): ``coa_ct = 1 - |agg_ct - vagg_ct| / (agg_ct + vagg_ct)``
    (null when either is missing or the sum is 0). Unit dependent: agg is an LQ (about 1) and
    vagg a coefficient sum. Returns city_code, year, coa for every city-year of either input."""
    j = _join_agg_vagg(agg_df, vagg_df, agg_col, vagg_col)
    s = pl.col("__a") + pl.col("__v")
    return j.select("city_code", "year", pl.when(s != 0).then(1.0 - (pl.col("__a") - pl.col("__v")).abs() / s)
                    .otherwise(None).alias("coa")).sort("city_code", "year")


def d_coa(agg_df: pl.DataFrame, vagg_df: pl.DataFrame, *, agg_col: str = "agg", vagg_col: str = "vagg") -> pl.DataFrame:
    """Co-evolution degree, Eq. (28) (after Tao et al. 2007):
    ``d_coa_ct = lambda * sqrt(|agg_ct - agg_c,t-1| * |vagg_ct - vagg_c,t-1|)`` with
    ``lambda = 1`` if ``(agg_ct - agg_c,t-1)(vagg_ct - vagg_c,t-1) > 0`` and ``-1`` if <= 0.
    Null without both values at t and at exactly t-1. Returns city_code, year, d_coa."""
    j = _join_agg_vagg(agg_df, vagg_df, agg_col, vagg_col)
    lag = j.select("city_code", (pl.col("year") + 1).alias("year"), pl.col("__a").alias("__a0"),
                   pl.col("__v").alias("__v0"))
    j = j.join(lag, on=["city_code", "year"], how="left")
    da = pl.col("__a") - pl.col("__a0")
    dv = pl.col("__v") - pl.col("__v0")
    lam = pl.when(da * dv > 0).then(1.0).otherwise(-1.0)
    return j.select("city_code", "year", (lam * (da.abs() * dv.abs()).sqrt()).alias("d_coa")).sort("city_code", "year")


# --------------------------------------------------------------------------------------------------
# heterogeneity dummies (Table 6)
# --------------------------------------------------------------------------------------------------
def location_dummies(cities: pl.Series | list[str], centre_cities: pl.DataFrame, region3: pl.DataFrame) -> pl.DataFrame:
    """Table 6 dummies per city: centre (listed in s004_in_centre_cities), peri = 1 - centre, and
    east / mid / west from the province's belt (s004_in_region3; province = first two adcode
    digits). Raises when a city's province is not in ``region3``. Returns city_code, centre, peri,
    east, mid, west (Int8)."""
    c = pl.DataFrame({"city_code": pl.Series(list(cities), dtype=pl.String)}).unique().sort("city_code")
    c = c.with_columns(pl.col("city_code").str.slice(0, 2).alias("province_code"))
    j = c.join(region3.select("province_code", "region3"), on="province_code", how="left")
    miss = j.filter(pl.col("region3").is_null())
    if miss.height:
        raise ValueError(f"location_dummies: provinces without a belt in region3: "
                         f"{miss['province_code'].unique().sort().to_list()}")
    centre = pl.col("city_code").is_in(centre_cities["city_code"].implode())
    return j.select(
        "city_code", centre.cast(pl.Int8).alias("centre"), (~centre).cast(pl.Int8).alias("peri"),
        (pl.col("region3") == "east").cast(pl.Int8).alias("east"),
        (pl.col("region3") == "central").cast(pl.Int8).alias("mid"),
        (pl.col("region3") == "west").cast(pl.Int8).alias("west"),
    )
