"""Hand-computed tests of kspill_pipeline.studies.s004_indices (spec S004 sections 3.2-3.4, 4.2).

Every expected number is derived by hand in the comments from the tiny inputs written in the test.
"""

from __future__ import annotations

import math

import polars as pl
import pytest

from kspill_pipeline.studies import s004_indices as ix

A, B, C = "110100", "120100", "130100"


def _val(df: pl.DataFrame, col: str, **keys):
    f = df
    for k, v in keys.items():
        f = f.filter(pl.col(k) == v)
    assert f.height == 1, (keys, f)
    return f[col][0]


# --------------------------------------------------------------------------------------------------
# vagg (Eq. 22), vagg_in, rescaling, vagg_txt
# --------------------------------------------------------------------------------------------------
def _base_output() -> pl.DataFrame:
    # city A: S1 30, S2 10 -> shares 0.75, 0.25; city B: S1 0, S2 50 -> shares 0, 1
    return pl.DataFrame({"city_code": [A, A, B, B], "sector": ["D10T12", "D26", "D10T12", "D26"],
                         "base_year": [2004] * 4, "output": [30.0, 10.0, 0.0, 50.0]})


def _coef(drop_s2_2006: bool = False, extra: list | None = None) -> pl.DataFrame:
    rows = [
        # country, origin, year, sector, digital_sector, coef, input_value, split
        ("CHN", "total", 2005, "D10T12", "J61", 0.02, 2.0, 1.0),
        ("CHN", "total", 2005, "D10T12", "G46", 0.10, 10.0, 0.1),
        ("CHN", "total", 2005, "D26", "J62T63", 0.04, 4.0, 1.0),
        ("CHN", "total", 2006, "D10T12", "J61", 0.03, 3.0, 1.0),
        ("CHN", "total", 2006, "D10T12", "G46", 0.10, 10.0, 0.2),
        ("CHN", "total", 2006, "D26", "J62T63", 0.06, 6.0, 1.0),
        # other origin and country: ignored by the defaults
        ("CHN", "domestic", 2005, "D10T12", "J61", 0.01, 1.0, 1.0),
        ("CHN", "domestic", 2005, "D26", "J62T63", 0.02, 2.0, 1.0),
        ("WLD", "total", 2005, "D10T12", "J61", 0.90, 9.0, 1.0),
        ("WLD", "total", 2005, "D26", "J62T63", 0.90, 9.0, 1.0),
    ]
    if drop_s2_2006:
        rows = [r for r in rows if not (r[2] == 2006 and r[3] == "D26")]
    rows += extra or []
    return pl.DataFrame(rows, schema=["country", "origin", "year", "sector", "digital_sector", "coef",
                                      "input_value", "split_coef"], orient="row")


def test_bartik_shares_sum_to_one_and_zero_city_rejected():
    sh = ix.bartik_shares(_base_output())
    assert _val(sh, "share", city_code=A, sector="D10T12") == pytest.approx(0.75)  # 30 / 40
    assert _val(sh, "share", city_code=A, sector="D26") == pytest.approx(0.25)     # 10 / 40
    assert _val(sh, "share", city_code=B, sector="D26") == pytest.approx(1.0)      # 50 / 50
    bad = pl.DataFrame({"city_code": [C], "sector": ["D26"], "base_year": [2004], "output": [0.0]})
    with pytest.raises(ValueError, match=C):
        ix.bartik_shares(pl.concat([_base_output(), bad]))


def test_virtual_intensity_and_vagg_by_hand():
    vi = ix.virtual_intensity(_coef())
    # Virtual_{S1,2005} = 0.02 * 1 + 0.10 * 0.1 = 0.03; Virtual_{S1,2006} = 0.03 + 0.10 * 0.2 = 0.05
    assert _val(vi, "virtual", sector="D10T12", year=2005) == pytest.approx(0.03)
    assert _val(vi, "virtual", sector="D10T12", year=2006) == pytest.approx(0.05)
    assert _val(vi, "virtual", sector="D26", year=2006) == pytest.approx(0.06)
    v = ix.vagg(_base_output(), _coef())
    assert v.columns == ["city_code", "year", "vagg"] and v.height == 4
    # A 2005 = 0.75 * 0.03 + 0.25 * 0.04 = 0.0325;  A 2006 = 0.75 * 0.05 + 0.25 * 0.06 = 0.0525
    assert _val(v, "vagg", city_code=A, year=2005) == pytest.approx(0.0325)
    assert _val(v, "vagg", city_code=A, year=2006) == pytest.approx(0.0525)
    # B has all its output in S2: 0.04 and 0.06
    assert _val(v, "vagg", city_code=B, year=2005) == pytest.approx(0.04)
    assert _val(v, "vagg", city_code=B, year=2006) == pytest.approx(0.06)
    # domestic-only reading (switch virtual_coef_inputs): A 2005 = 0.75 * 0.01 + 0.25 * 0.02 = 0.0125
    vd = ix.vagg(_base_output(), _coef(), origin="domestic")
    assert _val(vd, "vagg", city_code=A, year=2005) == pytest.approx(0.0125)
    assert vd["year"].unique().to_list() == [2005]


def test_vagg_missing_coefficient_and_double_counting():
    with pytest.raises(ValueError, match="D26"):
        ix.vagg(_base_output(), _coef(drop_s2_2006=True))
    v = ix.vagg(_base_output(), _coef(drop_s2_2006=True), missing="zero")
    # A 2006 = 0.75 * 0.05 + 0.25 * 0 = 0.0375; B 2006 = 0
    assert _val(v, "vagg", city_code=A, year=2006) == pytest.approx(0.0375)
    assert _val(v, "vagg", city_code=B, year=2006) == pytest.approx(0.0)
    dbl = [("CHN", "total", 2005, "D10T12", "G45T47", 0.05, 5.0, 0.1)]
    with pytest.raises(ValueError, match="double counting"):
        ix.vagg(_base_output(), _coef(extra=dbl))
    with pytest.raises(ValueError, match="no rows"):
        ix.vagg(_base_output(), _coef(), country="USA")


def test_rescale_vagg_minmax_and_published_moments():
    v = ix.vagg(_base_output(), _coef())  # values 0.0325, 0.0525, 0.04, 0.06
    mm = ix.rescale_vagg(v, "minmax")
    # (x - 0.0325) / (0.06 - 0.0325): A2005 0, A2006 0.02 / 0.0275, B2005 0.0075 / 0.0275, B2006 1
    assert _val(mm, "vagg", city_code=A, year=2005) == pytest.approx(0.0)
    assert _val(mm, "vagg", city_code=A, year=2006) == pytest.approx(0.02 / 0.0275)
    assert _val(mm, "vagg", city_code=B, year=2005) == pytest.approx(0.0075 / 0.0275)
    assert _val(mm, "vagg", city_code=B, year=2006) == pytest.approx(1.0)
    pm = ix.rescale_vagg(v, "match_published_moments")
    # mean = 0.185 / 4 = 0.04625; deviations -0.01375, 0.00625, -0.00625, 0.01375
    # sample var = (2 * 0.01375^2 + 2 * 0.00625^2) / 3 = 0.00045625 / 3
    sd = math.sqrt(0.00045625 / 3)
    assert _val(pm, "vagg", city_code=A, year=2005) == pytest.approx(0.574 + 0.084 * (-0.01375) / sd)
    assert _val(pm, "vagg", city_code=B, year=2006) == pytest.approx(0.574 + 0.084 * 0.01375 / sd)
    assert pm["vagg"].mean() == pytest.approx(0.574) and pm["vagg"].std() == pytest.approx(0.084)


def test_vagg_in_log_and_level():
    # Z_{S1,2005} = 2 * 1 + 10 * 0.1 = 3; Z_{S2,2005} = 4; A 2005 = 0.75 * 3 + 0.25 * 4 = 3.25
    # Z_{S1,2006} = 3 + 10 * 0.2 = 5; Z_{S2,2006} = 6; A 2006 = 0.75 * 5 + 0.25 * 6 = 5.25
    lev = ix.vagg_in(_base_output(), _coef(), transform="level")
    assert _val(lev, "vagg_in", city_code=A, year=2005) == pytest.approx(3.25)
    assert _val(lev, "vagg_in", city_code=A, year=2006) == pytest.approx(5.25)
    lg = ix.vagg_in(_base_output(), _coef())
    assert _val(lg, "vagg_in", city_code=A, year=2006) == pytest.approx(math.log(5.25))
    assert _val(lg, "vagg_in", city_code=B, year=2005) == pytest.approx(math.log(4.0))
    no_z = _coef().with_columns(pl.lit(None, dtype=pl.Float64).alias("input_value"))
    with pytest.raises(ValueError, match="input_value"):
        ix.vagg_in(_base_output(), no_z)


def test_vagg_txt_ln1p_and_ln():
    kc = pl.DataFrame({"city_code": [A, A, A, A], "year": [2005, 2005, 2006, 2006],
                       "keyword": ["互联网", "大数据", "互联网", "大数据"], "count": [3, 0, 0, 0]})
    t = ix.vagg_txt(kc)
    # A 2005: 3 + 0 = 3 -> ln(1 + 3) = ln 4; A 2006: 0 -> ln 1 = 0
    assert _val(t, "vagg_txt", year=2005) == pytest.approx(math.log(4.0))
    assert _val(t, "vagg_txt", year=2006) == pytest.approx(0.0)
    t2 = ix.vagg_txt(kc, log="ln")
    assert _val(t2, "vagg_txt", year=2005) == pytest.approx(math.log(3.0))
    assert _val(t2, "vagg_txt", year=2006) is None  # ln 0 undefined -> null, row kept
    assert _val(t2, "n_count", year=2006) == 0


# --------------------------------------------------------------------------------------------------
# deflation and controls
# --------------------------------------------------------------------------------------------------
def _controls() -> pl.DataFrame:
    # A: chain (prev year = 100) 1999: 105, 2000: 102, 2001: 110, 2002: 95 ; B: 2000, 2002 (2001 missing)
    return pl.DataFrame({
        "city_code": [A, A, A, A, B, B],
        "year": [1999, 2000, 2001, 2002, 2000, 2002],
        "fdi": [0.01, 0.02, 0.03, 0.04, 0.05, 0.06], "open": [0.4] * 6, "fisc": [0.1] * 6, "dlp": [0.4] * 6,
        "sci": [0.002] * 6, "edu": [0.02] * 6, "fixinv": [0.5] * 6,
        "wage_nominal": [9000.0, 10000.0, 11000.0, 10450.0, 8000.0, 9000.0],
        "gdp_pc_nominal": [1.0, 2.0, 22000.0, 4.0, 5.0, 6.0],
        "gdp_nominal": [1.0, 2.0, 44000.0, 4.0, 5.0, 6.0],
        "deflator_index": [None] * 6,
        "deflator_chain": [105.0, 102.0, 110.0, 95.0, 100.0, 103.0],
    }, schema_overrides={"deflator_index": pl.Float64})


def test_price_relative_chained_including_before_base_and_broken_chain():
    p = ix.price_relative_to_base(_controls(), base_year=2000)
    # A: 2000 -> 1; 2001 -> 1.10; 2002 -> 1.10 * 0.95 = 1.045; 1999 -> 1 / 1.02 (the 2000 link)
    assert _val(p, "p_rel", city_code=A, year=2000) == pytest.approx(1.0)
    assert _val(p, "p_rel", city_code=A, year=2001) == pytest.approx(1.10)
    assert _val(p, "p_rel", city_code=A, year=2002) == pytest.approx(1.045)
    assert _val(p, "p_rel", city_code=A, year=1999) == pytest.approx(1 / 1.02)
    # B: 2002 needs the 2001 link, which is missing -> null (row kept, never a shortened chain)
    assert _val(p, "p_rel", city_code=B, year=2002) is None
    assert _val(p, "p_rel", city_code=B, year=2000) == pytest.approx(1.0)
    assert p.height == 6


def test_price_relative_level_index_and_auto():
    df = pl.DataFrame({"city_code": [A, A, C], "year": [2000, 2001, 2001],
                       "deflator_index": [200.0, 220.0, 150.0], "deflator_chain": [None, None, None]},
                      schema_overrides={"deflator_chain": pl.Float64})
    p = ix.price_relative_to_base(df)  # auto: chain is empty, index complete -> index
    assert _val(p, "p_rel", city_code=A, year=2001) == pytest.approx(1.1)  # 220 / 200
    assert _val(p, "p_rel", city_code=C, year=2001) is None               # no 2000 index for C
    mixed = df.with_columns(pl.Series("deflator_index", [200.0, None, 150.0]),
                            pl.Series("deflator_chain", [None, 110.0, None]))
    with pytest.raises(ValueError, match="choose kind"):
        ix.price_relative_to_base(mixed)


def test_deflate_and_city_controls():
    d = ix.deflate(_controls(), ["wage_nominal"])
    # A 2001: 11000 / 1.10 = 10000; A 2002: 10450 / 1.045 = 10000
    assert _val(d, "wage_nominal_real", city_code=A, year=2001) == pytest.approx(10000.0)
    assert _val(d, "wage_nominal_real", city_code=A, year=2002) == pytest.approx(10000.0)
    cc = ix.city_controls(_controls())
    assert cc.columns == ["city_code", "year", "fdi", "open", "fisc", "dlp", "sci", "edu", "wage", "gdp",
                          "fixinv", "p_rel"]
    # wage = ln(11000 / 1.1) = ln 10000; gdp (per capita) = ln(22000 / 1.1) = ln 20000
    assert _val(cc, "wage", city_code=A, year=2001) == pytest.approx(math.log(10000.0))
    assert _val(cc, "gdp", city_code=A, year=2001) == pytest.approx(math.log(20000.0))
    assert _val(cc, "fdi", city_code=A, year=2001) == pytest.approx(0.03)  # ratio passed through
    assert _val(cc, "wage", city_code=B, year=2002) is None               # broken deflator chain
    tot = ix.city_controls(_controls(), gdp_measure="total", edu_measure="per_10k")
    # total GDP 44000 / 1.1 = 40000 -> ln 40000; edu 0.02 share -> 200 per 10k
    assert _val(tot, "gdp", city_code=A, year=2001) == pytest.approx(math.log(40000.0))
    assert _val(tot, "edu", city_code=A, year=2001) == pytest.approx(200.0)


def test_prov_ln_gdp_real():
    g = pl.DataFrame({"province_code": ["11", "11"], "year": [2000, 2001], "gdp_real": [100.0, 200.0],
                      "price_base_year": [2000, 2000]})
    out = ix.prov_ln_gdp_real(g)
    assert out.columns == ["province_code", "year", "ln_gdp_real"]
    assert _val(out, "ln_gdp_real", year=2001) == pytest.approx(math.log(200.0))
    with pytest.raises(ValueError, match="base years"):
        ix.prov_ln_gdp_real(g.with_columns(pl.Series("price_base_year", [2000, 2005])))


# --------------------------------------------------------------------------------------------------
# historical instruments
# --------------------------------------------------------------------------------------------------
def test_historical_iv():
    iv = pl.DataFrame({"city_code": [A, B, C], "telephones_1984": [200.0, 50.0, 10.0],
                       "post_offices_1984": [4.0, 10.0, 1.0], "population_1984": [100.0, 50.0, None]})
    nat = pl.DataFrame({"year": [2004, 2005, 2006], "internet_investment": [10.0, 20.0, 40.0],
                        "internet_users": [1.0, 2.0, 3.0]})
    out = ix.historical_iv(iv, nat)
    # per capita: A tel 200 / 100 = 2, post 0.04; B tel 1, post 0.2; lag t-1 -> years 2005-2007
    assert sorted(out["year"].unique().to_list()) == [2005, 2006, 2007]
    assert _val(out, "iv_tel", city_code=A, year=2005) == pytest.approx(20.0)   # 2 * N_2004 = 2 * 10
    assert _val(out, "iv_post", city_code=A, year=2005) == pytest.approx(0.4)   # 0.04 * 10
    assert _val(out, "iv_tel", city_code=A, year=2007) == pytest.approx(80.0)   # 2 * N_2006
    assert _val(out, "iv_post", city_code=B, year=2006) == pytest.approx(4.0)   # 0.2 * N_2005 = 0.2 * 20
    assert _val(out, "iv_tel", city_code=C, year=2005) is None                  # no 1984 population
    raw = ix.historical_iv(iv, nat, lag="t", scaling="raw_count", years=[2003, 2005])
    assert _val(raw, "iv_tel", city_code=A, year=2005) == pytest.approx(4000.0)  # 200 * N_2005
    assert _val(raw, "iv_post", city_code=C, year=2005) == pytest.approx(20.0)   # 1 * 20
    assert _val(raw, "iv_tel", city_code=A, year=2003) is None                   # no N_2003
    users = ix.historical_iv(iv, nat, series="internet_users")
    assert _val(users, "iv_tel", city_code=A, year=2006) == pytest.approx(4.0)   # 2 * users_2005


# --------------------------------------------------------------------------------------------------
# market integration (Eq. 24)
# --------------------------------------------------------------------------------------------------
P, Q, R = "130100", "130200", "140100"  # P and Q share province 13
LA = math.log(1.1)  # a


def _cpi() -> pl.DataFrame:
    # 2001, chained: P food 110 clothing 100 -> (a, 0); Q (0, 0); R food 121 clothing 110 -> (2a, a)
    return pl.DataFrame({
        "city_code": [P, P, Q, Q, R, R], "year": [2001] * 6,
        "category": ["food", "clothing"] * 3,
        "cpi_chain": [110.0, 100.0, 100.0, 100.0, 121.0, 110.0],
    })


def test_market_integration_all_pairs_demeaned_by_k_t():
    # |dQ| food: PQ a, PR a, QR 2a; clothing: PQ 0, PR a, QR a (ordered pairs repeat each twice)
    # means over the 6 ordered pairs: food 8a/6 = 4a/3, clothing 4a/6 = 2a/3
    # q_food - q_clothing per pair: PQ a - 2a/3 = a/3; PR 0 - 2a/3 = -2a/3; QR a - 2a/3 = a/3
    # var over 2 categories (ddof 1) = diff^2 / 2: PQ a^2/18, PR 2a^2/9, QR a^2/18
    # mseg_P = (a^2/18 + 2a^2/9) / 2 = 5a^2/36; mseg_Q = a^2/18; mseg_R = 5a^2/36
    m = ix.market_integration(_cpi(), partners="all_cities", min_categories=2)
    a2 = LA ** 2
    assert _val(m, "mseg", city_code=P) == pytest.approx(5 * a2 / 36)
    assert _val(m, "mseg", city_code=Q) == pytest.approx(a2 / 18)
    assert _val(m, "mseg", city_code=R) == pytest.approx(5 * a2 / 36)
    assert _val(m, "minteg", city_code=P) == pytest.approx(6 / (LA * math.sqrt(5)))  # sqrt(36 / (5 a^2))
    assert _val(m, "n_partners", city_code=Q) == 2


def test_market_integration_partner_demeaning_gives_null_when_zero():
    # mean over i's partners, per (i, k):
    # P: food (a + a)/2 = a, clothing (0 + a)/2 = a/2 -> q diffs: PQ a - a/2 = a/2, PR 0 - a/2 = -a/2
    #    -> var a^2/8 each -> mseg_P = a^2/8
    # Q: food (a + 2a)/2, clothing a/2 -> mean diff a; QP a - a = 0, QR a - a = 0 -> mseg_Q = 0 -> minteg null
    m = ix.market_integration(_cpi(), partners="all_cities", demean="over_partners_by_i_k_t", min_categories=2)
    assert _val(m, "mseg", city_code=P) == pytest.approx(LA ** 2 / 8)
    assert _val(m, "mseg", city_code=R) == pytest.approx(LA ** 2 / 8)
    assert _val(m, "mseg", city_code=Q) == pytest.approx(0.0)
    assert _val(m, "minteg", city_code=Q) is None


def test_market_integration_over_k_is_no_demeaning():
    # no-op reading: var of (|dQ_food|, |dQ_clothing|): PQ (a,0) -> a^2/2, PR (a,a) -> 0, QR (2a,a) -> a^2/2
    # mseg_P = (a^2/2 + 0)/2 = a^2/4; mseg_Q = (a^2/2 + a^2/2)/2 = a^2/2; mseg_R = a^2/4
    m = ix.market_integration(_cpi(), partners="all_cities", demean="over_k_by_pair_t", min_categories=2)
    assert _val(m, "mseg", city_code=P) == pytest.approx(LA ** 2 / 4)
    assert _val(m, "mseg", city_code=Q) == pytest.approx(LA ** 2 / 2)
    # population variance (ddof 0) halves a 2-value variance: diff^2 / 4
    m0 = ix.market_integration(_cpi(), partners="all_cities", demean="over_k_by_pair_t", min_categories=2,
                               var_ddof=0)
    assert _val(m0, "mseg", city_code=Q) == pytest.approx(LA ** 2 / 4)


def test_market_integration_partner_sets():
    # same_province: only P-Q (province 13); R has no partner -> n_partners 0, mseg null (row kept)
    sp = ix.market_integration(_cpi(), partners="same_province", demean="over_k_by_pair_t", min_categories=2)
    assert _val(sp, "mseg", city_code=P) == pytest.approx(LA ** 2 / 2)  # var(a, 0) = a^2/2
    assert _val(sp, "n_partners", city_code=R) == 0 and _val(sp, "mseg", city_code=R) is None
    # contiguous: pairs P-Q and Q-R listed once each, made symmetric
    adj = pl.DataFrame({"city_code": [P, Q], "neighbour_code": [Q, R]})
    ct = ix.market_integration(_cpi(), adjacency=adj, demean="over_k_by_pair_t", min_categories=2)
    assert [_val(ct, "n_partners", city_code=c) for c in (P, Q, R)] == [1, 2, 1]
    assert _val(ct, "mseg", city_code=R) == pytest.approx(LA ** 2 / 2)  # QR: var(2a, a) = a^2/2
    assert _val(ct, "mseg", city_code=Q) == pytest.approx(LA ** 2 / 2)  # (a^2/2 + a^2/2) / 2
    with pytest.raises(ValueError, match="adjacency"):
        ix.market_integration(_cpi())


def test_market_integration_min_categories_and_level_index():
    # default min_categories = 8: pairs with 2 categories are not used -> n_partners 0, null, rows kept
    m = ix.market_integration(_cpi(), partners="all_cities")
    assert m.height == 3 and m["n_partners"].to_list() == [0, 0, 0] and m["mseg"].null_count() == 3
    # level index: 2000 = 100 everywhere, 2001 = the chained values -> same log changes as chained
    lvl = pl.concat([
        _cpi().with_columns(pl.lit(2000, dtype=pl.Int64).alias("year"), pl.lit(100.0).alias("cpi_chain")),
        _cpi(),
    ]).rename({"cpi_chain": "cpi_index"})
    ml = ix.market_integration(lvl, partners="all_cities", index_kind="level", min_categories=2)
    assert _val(ml, "mseg", city_code=P, year=2001) == pytest.approx(5 * LA ** 2 / 36)
    assert _val(ml, "mseg", city_code=P, year=2000) is None  # no 1999 level -> no change, row kept


# --------------------------------------------------------------------------------------------------
# congestion, specialisation, diversity, LQ, agg
# --------------------------------------------------------------------------------------------------
def test_lnitff():
    r = pl.DataFrame({"city_code": [A], "year": [2005], "road_area_pc": [math.e ** 2]})
    assert _val(ix.lnitff(r), "lnitff", city_code=A) == pytest.approx(2.0)


def _exports() -> pl.DataFrame:
    # A: p1 30, p2 50 + 20 = 70 (total 100); B: p2 50, p3 150 (total 200); C: p1 0 (no exports)
    return pl.DataFrame({"city_code": [A, A, A, B, B, C], "year": [2005] * 6,
                         "hs4": ["p1", "p2", "p2", "p2", "p3", "p1"],
                         "value_usd": [30.0, 50.0, 20.0, 50.0, 150.0, 0.0]})


def test_spe_formulas():
    # national: p1 30, p2 120, p3 150 of 300 -> s_j 0.1, 0.4, 0.5
    # A: s_c 0.3, 0.7 -> ratios 3, 1.75 -> RZI 3; B: s_c 0.25, 0.75 -> ratios 0.625, 1.5 -> 1.5
    s = ix.spe(_exports())
    assert _val(s, "spe", city_code=A) == pytest.approx(3.0)
    assert _val(s, "spe", city_code=B) == pytest.approx(1.5)
    assert _val(s, "lnspe", city_code=A) == pytest.approx(math.log(3.0))
    assert _val(s, "spe", city_code=C) is None  # no exports: no shares, row kept
    p = ix.spe(_exports(), formula="printed_1_over_n_max")  # n = 3 products
    assert _val(p, "spe", city_code=A) == pytest.approx(1.0)
    assert _val(p, "spe", city_code=B) == pytest.approx(0.5)


def test_div_formulas():
    # RDI: A: |0.3-0.1| + |0.7-0.4| + |0-0.5| = 0.2 + 0.3 + 0.5 = 1 -> div 1
    #      B: |0-0.1| + |0.25-0.4| + |0.75-0.5| = 0.1 + 0.15 + 0.25 = 0.5 -> div 2
    d = ix.div(_exports())
    assert _val(d, "div", city_code=A) == pytest.approx(1.0)
    assert _val(d, "div", city_code=B) == pytest.approx(2.0)
    assert _val(d, "lndiv", city_code=B) == pytest.approx(math.log(2.0))
    assert _val(d, "div", city_code=C) is None
    # printed ratio: A: 3 + 1.75 = 4.75 -> 1/4.75; B: 0.625 + 1.5 = 2.125 -> 1/2.125
    pr = ix.div(_exports(), formula="printed_ratio")
    assert _val(pr, "div", city_code=A) == pytest.approx(1 / 4.75)
    assert _val(pr, "div", city_code=B) == pytest.approx(1 / 2.125)


def test_location_quotient_sample_national_and_null():
    df = pl.DataFrame({"city_code": [A, A, B, B], "industry": ["X", "Y", "X", "Y"], "year": [2005] * 4,
                       "employment": [10.0, 30.0, 30.0, 30.0]})
    lq = ix.location_quotient(df)
    # sample: X 40 of 100 -> 0.4, Y 0.6; A: X 10/40 = 0.25 -> 0.625, Y 0.75 / 0.6 = 1.25
    # B: X 0.5 / 0.4 = 1.25, Y 0.5 / 0.6 = 5/6
    assert _val(lq, "lq", city_code=A, industry="X") == pytest.approx(0.625)
    assert _val(lq, "lq", city_code=A, industry="Y") == pytest.approx(1.25)
    assert _val(lq, "lq", city_code=B, industry="Y") == pytest.approx(5 / 6)
    nat = pl.DataFrame({"industry": ["X", "Y"], "year": [2005, 2005], "employment": [100.0, 400.0]})
    ln = ix.location_quotient(df, national=nat)
    # national X 0.2, Y 0.8: A X 0.25 / 0.2 = 1.25, Y 0.75 / 0.8 = 0.9375
    assert _val(ln, "lq", city_code=A, industry="X") == pytest.approx(1.25)
    assert _val(ln, "lq", city_code=A, industry="Y") == pytest.approx(0.9375)
    withnull = df.with_columns(pl.Series("employment", [10.0, 30.0, 30.0, None]))
    lz = ix.location_quotient(withnull)
    # B's total is unknown -> its LQs null; sample totals from A only -> A's LQs are 1
    assert _val(lz, "lq", city_code=B, industry="X") is None
    assert _val(lz, "lq", city_code=A, industry="X") == pytest.approx(1.0)


def _industry() -> pl.DataFrame:
    # A: secondary C 20 + E 10 = 30 of 100; B: secondary 10 of 40; D (city "D"): only tertiary 50
    D = "140100"
    return pl.DataFrame({
        "city_code": [A, A, A, A, B, B, D], "year": [2005] * 7,
        "industry": ["C", "E", "H", "A", "C", "H", "H"],
        "sector": ["secondary", "secondary", "tertiary", "primary", "secondary", "tertiary", "tertiary"],
        "employment": [20.0, 10.0, 60.0, 10.0, 10.0, 30.0, 50.0],
        "output": [1.0, 1.0, 1.0, 1.0, 3.0, 1.0, 1.0],
    })


def test_agg_location_quotient_of_secondary_employment():
    nat = pl.DataFrame({"year": [2005] * 3, "industry": ["A", "C", "H"],
                        "sector": ["primary", "secondary", "tertiary"],
                        "employment": [500.0, 500.0, 1000.0], "output": [1.0, 1.0, 2.0]})
    g = ix.agg(_industry(), national=nat)
    # national secondary share 500 / 2000 = 0.25: A 0.3 / 0.25 = 1.2; B 0.25 / 0.25 = 1; D 0 / 0.25 = 0
    assert _val(g, "agg", city_code=A) == pytest.approx(1.2)
    assert _val(g, "agg", city_code=B) == pytest.approx(1.0)
    assert _val(g, "agg", city_code="140100") == pytest.approx(0.0)
    s = ix.agg(_industry(), denominator="sample_totals")
    # sample: secondary 40 of 190 (100 + 40 + 50): A 0.3 / (40/190) = 1.425; B 0.25 / (40/190) = 1.1875
    assert _val(s, "agg", city_code=A) == pytest.approx(0.3 * 190 / 40)
    assert _val(s, "agg", city_code=B) == pytest.approx(0.25 * 190 / 40)
    o = ix.agg(_industry(), national=nat, measure="output")
    # output: B secondary 3 of 4 = 0.75; national 1 of 4 = 0.25 -> 3
    assert _val(o, "agg", city_code=B) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="national"):
        ix.agg(_industry())
    nul = _industry().with_columns(pl.Series("employment", [20.0, 10.0, 60.0, 10.0, None, 30.0, 50.0]))
    sn = ix.agg(nul, denominator="sample_totals")
    # B incomplete -> null; sample from A and D: secondary 30 of 150 = 0.2 -> A 0.3 / 0.2 = 1.5
    assert _val(sn, "agg", city_code=B) is None
    assert _val(sn, "agg", city_code=A) == pytest.approx(1.5)


# --------------------------------------------------------------------------------------------------
# coa, d_coa (Eqs. 27-28)
# --------------------------------------------------------------------------------------------------
def test_coa_and_d_coa():
    ag = pl.DataFrame({"city_code": [A, A, A, B, B, C, C], "year": [2005, 2006, 2007, 2005, 2007, 2005, 2006],
                       "agg": [1.2, 1.0, 1.5, 0.0, 1.0, 1.0, 1.0]})
    vg = pl.DataFrame({"city_code": [A, A, A, B, B, C, C], "year": [2005, 2006, 2007, 2005, 2007, 2005, 2006],
                       "vagg": [0.04, 0.05, 0.07, 0.0, 0.02, 0.03, 0.05]})
    c = ix.coa(ag, vg)
    # 2005: 1 - |1.2 - 0.04| / 1.24 = 0.08 / 1.24; 2006: 1 - 0.95 / 1.05 = 0.1 / 1.05; 2007: 0.14 / 1.57
    assert _val(c, "coa", city_code=A, year=2005) == pytest.approx(0.08 / 1.24)
    assert _val(c, "coa", city_code=A, year=2006) == pytest.approx(0.1 / 1.05)
    assert _val(c, "coa", city_code=A, year=2007) == pytest.approx(0.14 / 1.57)
    assert _val(c, "coa", city_code=B, year=2005) is None  # agg + vagg = 0
    d = ix.d_coa(ag, vg)
    # 2006: d_agg = -0.2, d_vagg = 0.01, product < 0 -> lambda = -1 -> -sqrt(0.2 * 0.01) = -sqrt(0.002)
    assert _val(d, "d_coa", city_code=A, year=2006) == pytest.approx(-math.sqrt(0.002))
    # 2007: d_agg = 0.5, d_vagg = 0.02 -> +sqrt(0.01) = 0.1
    assert _val(d, "d_coa", city_code=A, year=2007) == pytest.approx(0.1)
    assert _val(d, "d_coa", city_code=A, year=2005) is None  # no t-1
    assert _val(d, "d_coa", city_code=B, year=2007) is None  # 2006 missing: not a 2-year difference
    # C: d_agg = 0 -> product 0 -> lambda = -1, sqrt(0) = 0
    assert _val(d, "d_coa", city_code=C, year=2006) == pytest.approx(0.0)


# --------------------------------------------------------------------------------------------------
# Table 6 dummies and switch defaults
# --------------------------------------------------------------------------------------------------
def test_location_dummies():
    centre = pl.DataFrame({"city_code": ["110100", "420100"], "centre_type": ["municipality", "provincial_capital"]})
    reg = pl.DataFrame({"province_code": ["11", "42", "51"], "region3": ["east", "central", "west"]})
    d = ix.location_dummies(["110100", "420100", "420500", "510300"], centre, reg)
    got = {r["city_code"]: (r["centre"], r["peri"], r["east"], r["mid"], r["west"]) for r in d.to_dicts()}
    assert got == {"110100": (1, 0, 1, 0, 0), "420100": (1, 0, 0, 1, 0), "420500": (0, 1, 0, 1, 0),
                   "510300": (0, 1, 0, 0, 1)}
    with pytest.raises(ValueError, match="44"):
        ix.location_dummies(["440300"], centre, reg)


def test_switch_defaults_follow_spec_section_8():
    s = ix.S004IndexSwitches()
    assert (s.virtual_coef_country, s.virtual_coef_inputs, s.vagg_rescale) == (
        "china", "total_domestic_plus_imported", "none")
    assert (s.iv_1984_scaling, s.iv_national_lag, s.gdp_measure, s.edu_measure) == (
        "per_capita", "t_minus_1", "per_capita", "share_of_population")
    assert (s.mseg_demean, s.mseg_partner_set, s.spe_formula, s.div_formula, s.agg_lq_denominator) == (
        "over_all_pairs_by_k_t", "contiguous_cities", "rzi_max_ratio", "rdi_inverse_abs_diff", "national_totals")
    assert s.deflation_base_year == 2000
