"""Synthetic counterparts of the S004 non-customs inputs, with planted structure.

``generate_s004_inputs(universe_dir, seed)`` reads a generated universe's cities (``_truth/
cities.parquet``), years (``source.yaml``) and products (``_truth/products.parquet``) and writes
every table of :data:`kspill_pipeline.io.s004_inputs.TABLES` to ``<universe>/<companion_dir>/s004/``
(contracts ``data_contracts/s004_in_*.yaml``) plus ``_truth/s004_planted.json``. Pure numpy /
polars (no Dagster). Spec S004 sections 2-4; issue 6.

Randomness: a stream independent of the customs generator, ``np.random.default_rng([seed, 4004,
...])``: sector-level draws from ``[seed, 4004, 0]``, city-level draws from ``[seed, 4004, 1,
int(city_code)]`` (so a city's base output and hence its planted vagg do not depend on which other
cities the scale includes), table draws from ``[seed, 4004, 2, k]``. Same (universe, seed) ->
byte-identical files.

Planted structure (every number is also in ``_truth/s004_planted.json``):

* **vagg** (Eq. 22, exactly what ``studies.s004_indices.vagg`` computes from the files with the spec
  defaults: country CHN, origin total, all digital sectors, no rescaling): 20 ICIO industrial
  sectors; telecom (J61) and IT (J62T63) coefficients ``base_ds * exp(g_s (t - 2005))`` times
  lognormal noise (sd 0.03), with sector growth ``g_s`` ~ U(0, 0.12) (digital deepening differs by
  sector, so vagg varies within city over time beyond year effects); wholesale (G46) and retail
  (G47) coefficients nearly flat with internet split coefficients rising logistically (wholesale
  0.01 -> ~0.2, retail 0.02 -> ~0.3 over 2000-2016). Base-year (2004) output shares: Dirichlet
  (concentration 0.6) per city with a sector absent (output 0) with probability 0.15.
  :func:`planted_vagg` / :func:`planted_vagg_frame` return it; :data:`BETA_VAGG` is the planted
  effect on ``ln_lambda`` (quality) that the customs generator adds as
  :func:`planted_ln_lambda_shift` (``BETA_VAGG`` times vagg two-way demeaned by city and year over
  2000-2016; ``synthetic._simulate.vagg_shift``).
* **Instruments**: the national internet investment series grows at 16 % a year; the city's
  "digital exposure" z_c is the standardised slope of its planted vagg on N_(t-1) over 2000-2016 (a
  function of its 2004 shares only). ln(telephones per 10k persons in 1984) = ln 150 + 0.45 (0.8 z_c +
  0.6 e), ln(post offices per 10k) = ln 0.7 + 0.35 (0.55 z_c + 0.835 e'), so both first stages are
  strong but not perfect (telephones stronger); realised correlations and two-way-FE first-stage
  F statistics are written to the JSON.
* **CPI**: chained 8-category city CPI = national category inflation + city noise with sd
  ``0.012 exp(-0.35 z(vagg_c,t-1))`` (z across cities within the year): more virtual agglomeration
  last year -> less relative-price dispersion -> higher minteg.
* **Roads**: ln road area per resident = city effect + 0.04 (t - 2000) + ``GAMMA_ROADS * (vagg_ct -
  vagg_c,first year)`` + noise.
* **Employment**: 19 GB/T 4754-2002 sections; city secondary share logistic in a city effect plus
  noise; national totals = city sums x (primary 8, secondary 2.5, tertiary 3), so national and
  sample LQ denominators differ.
* **Keywords**: 7 terms, Poisson counts with ln mean = a_k + 0.12 (t - 2000) + 0.5 z(vagg_ct).
* **Controls**: Table 1-like magnitudes, independent of vagg; about 2 % of control cells empty;
  deflator chained (previous year = 100), national inflation ~ N(2 %, 1.5 %) plus city noise.
* **Maps**: centre cities = the universe's xx0100 cities (municipalities, capitals) plus the
  sub-provincial non-capitals 210200 330200 350200 370200 440300; region3 = NBS three belts (all 31
  provinces); BEC map of the universe's HS2007 products by chapter; adjacency = each city's 3
  nearest universe cities by coordinates (a stand-in for contiguity).
* **File formats**: city_controls with Chinese headers (UTF-8 with BOM), city_cpi with Chinese
  headers and category labels (GB18030), base_output as parquet, the rest English UTF-8 CSV.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import yaml

__all__ = [
    "BETA_VAGG",
    "GAMMA_ROADS",
    "GENERATOR_VERSION",
    "SECTORS",
    "generate_s004_inputs",
    "planted_ln_lambda_shift",
    "planted_vagg",
    "planted_vagg_frame",
]

GENERATOR_VERSION = "1.0.0"
STREAM = 4004
#: Planted effect of vagg on ln quality (ln_lambda) per unit of vagg (raw Bartik scale: vagg about
#: 0.01-0.10, within-city-and-year SD about 0.003, so the within shift has SD about 0.1 against an
#: ln_lambda SD of about 0.57). The customs generator adds :func:`planted_ln_lambda_shift` (BETA_VAGG
#: times vagg two-way demeaned by city and year: identical slope under city and year fixed effects,
#: without a national quality trend or a moved cross-city quality distribution).
BETA_VAGG = 40.0
#: Planted effect of vagg on ln road area per resident (congestion relief).
GAMMA_ROADS = 3.0
#: ICIO 2018 industrial sectors (mining, manufacturing, utilities) of the Bartik shares.
SECTORS: tuple[str, ...] = (
    "D05T06", "D07T08", "D09", "D10T12", "D13T15", "D16", "D17T18", "D19", "D20T21", "D22", "D23", "D24",
    "D25", "D26", "D27", "D28", "D29", "D30", "D31T33", "D35T39",
)
CALENDAR = (1995, 2020)  # sector paths are drawn on this fixed calendar, then sliced
BASE_YEAR = 2004
EXPOSURE_YEARS = (2000, 2016)
KEYWORDS: tuple[str, ...] = ("互联网", "数字经济", "电子商务", "大数据", "云计算", "平台经济", "信息化")
CPI_LABELS_ZH = {
    "food": "食品", "tobacco_liquor": "烟酒及用品", "clothing": "衣着", "household": "家庭设备用品及维修服务",
    "medical": "医疗保健和个人用品", "transport_communication": "交通和通信",
    "recreation_education": "娱乐教育文化用品及服务", "housing": "居住",
}
CPI_MEAN_INFLATION = {
    "food": 0.045, "tobacco_liquor": 0.02, "clothing": 0.0, "household": 0.002, "medical": 0.01,
    "transport_communication": -0.01, "recreation_education": 0.005, "housing": 0.03,
}
SECTIONS: tuple[tuple[str, str], ...] = (
    ("A", "primary"), ("B", "secondary"), ("C", "secondary"), ("D", "secondary"), ("E", "secondary"),
    ("F", "tertiary"), ("G", "tertiary"), ("H", "tertiary"), ("I", "tertiary"), ("J", "tertiary"),
    ("K", "tertiary"), ("L", "tertiary"), ("M", "tertiary"), ("N", "tertiary"), ("O", "tertiary"),
    ("P", "tertiary"), ("Q", "tertiary"), ("R", "tertiary"), ("S", "tertiary"),
)
NATIONAL_FACTOR = {"primary": 8.0, "secondary": 2.5, "tertiary": 3.0}
SUBPROVINCIAL_NON_CAPITALS = ("210200", "330200", "350200", "370200", "440300")
MUNICIPALITY_PROVINCES = ("11", "12", "31", "50")
NBS_THREE_BELTS: dict[str, str] = {
    **{p: "east" for p in ("11", "12", "13", "21", "31", "32", "33", "35", "37", "44", "46")},
    **{p: "central" for p in ("14", "22", "23", "34", "36", "41", "42", "43")},
    **{p: "west" for p in ("15", "45", "50", "51", "52", "53", "54", "61", "62", "63", "64", "65")},
}
BEC_INTERMEDIATE_CHAPTERS = frozenset([*range(25, 41), *range(44, 49), *range(50, 61), *range(68, 84)])
BEC_FINAL_CHAPTERS = frozenset([*range(1, 25), 42, 43, *range(61, 68), 87, 88, 89, 90, 91, 92, 93, 94, 95, 96])
BEC_OTHER_CHAPTERS = frozenset([27, 97])


# --------------------------------------------------------------------------------------------------
# deterministic draws
# --------------------------------------------------------------------------------------------------
def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), STREAM, *[int(k) for k in key]])


def _logistic(x):
    return 1.0 / (1.0 + np.exp(-x))


def _sector_draws(seed: int) -> dict:
    """Sector paths on the fixed calendar: coefficients (rounded as written), splits, gross output."""
    rng = _rng(seed, 0)
    n = len(SECTORS)
    years = np.arange(CALENDAR[0], CALENDAR[1] + 1)
    tau = years - 2005
    g = rng.uniform(0.0, 0.15, n)
    base = {
        "J61": rng.uniform(0.002, 0.015, n), "J62T63": rng.uniform(0.001, 0.02, n),
        "G46": rng.uniform(0.03, 0.07, n), "G47": rng.uniform(0.005, 0.02, n),
    }
    coef = {}
    for d, b in base.items():
        trend = g[:, None] * tau[None, :] if d in ("J61", "J62T63") else 0.01 * tau[None, :]
        noise = 0.03 * rng.standard_normal((n, len(years)))
        coef[d] = np.round(np.minimum(b[:, None] * np.exp(trend + noise), 0.5), 8)
    split = {
        "J61": np.ones(len(years)), "J62T63": np.ones(len(years)),
        "G46": np.round(0.01 + 0.25 * _logistic(0.35 * (years - 2014)), 6),
        "G47": np.round(0.02 + 0.40 * _logistic(0.35 * (years - 2014)), 6),
    }
    x0 = rng.lognormal(math.log(2e5), 0.8, n)  # gross output, million USD, 2005
    gross = x0[:, None] * np.exp(0.1 * tau[None, :])
    dom_share = {"J61": 0.97, "J62T63": 0.85, "G46": 0.95, "G47": 0.98}
    nat = np.round(80.0 * np.exp(0.16 * (years - 1999)) * np.exp(0.03 * rng.standard_normal(len(years))), 3)
    users = np.round(2000.0 * np.exp(0.25 * (years - 1999)) / (1 + 0.002 * np.exp(0.25 * (years - 1999))), 1)
    return {"years": years, "g": g, "base": base, "coef": coef, "split": split, "gross": gross,
            "dom_share": dom_share, "national": nat, "users": users}


def _virtual(sd: dict) -> np.ndarray:
    """Virtual_st (sector x calendar year) for country CHN, origin total: sum_d coef x split."""
    return sum(sd["coef"][d] * sd["split"][d][None, :] for d in ("J61", "J62T63", "G46", "G47"))


def _city_output(seed: int, city_code: str) -> np.ndarray:
    """Base-year output by sector (thousand yuan, rounded as written) of one city."""
    rng = _rng(seed, 1, int(city_code))
    share = rng.dirichlet(np.full(len(SECTORS), 0.4))
    absent = rng.random(len(SECTORS)) < 0.15
    if absent.all():
        absent[int(np.argmax(share))] = False
    share = np.where(absent, 0.0, share)
    total = rng.lognormal(math.log(5e7), 1.0)
    out = np.round(share / share.sum() * total, 1)
    if out.sum() <= 0:
        out[int(np.argmax(share))] = 1.0
    return out


def _vagg_matrix(seed: int, city_codes: list[str], sd: dict | None = None) -> np.ndarray:
    """Planted vagg (city x calendar year), Eq. (22) from the rounded written values."""
    sd = sd or _sector_draws(seed)
    v = _virtual(sd)
    w = np.vstack([_city_output(seed, c) for c in city_codes]) if city_codes else np.zeros((0, len(SECTORS)))
    w = w / w.sum(axis=1, keepdims=True)
    return w @ v


def planted_vagg_frame(city_codes: list[str], years: tuple[int, int] | list[int], seed: int) -> pl.DataFrame:
    """Planted vagg_ct for the given cities and years (inclusive range or list) -> polars frame
    (city_code, year, vagg). Usable before any file is written (e.g. inside the customs generator)."""
    yrs = list(range(years[0], years[1] + 1)) if isinstance(years, tuple) else [int(y) for y in years]
    if any(y < CALENDAR[0] or y > CALENDAR[1] for y in yrs):
        raise ValueError(f"planted_vagg_frame: years must lie within {CALENDAR}")
    codes = [str(c) for c in city_codes]
    sd = _sector_draws(seed)
    m = _vagg_matrix(seed, codes, sd)
    idx = [y - CALENDAR[0] for y in yrs]
    return pl.DataFrame({
        "city_code": np.repeat(np.array(codes, dtype=object), len(yrs)).astype(str),
        "year": np.tile(np.array(yrs, dtype=np.int32), len(codes)),
        "vagg": m[:, idx].reshape(-1),
    }, schema={"city_code": pl.String, "year": pl.Int32, "vagg": pl.Float64}).sort("city_code", "year")


def planted_ln_lambda_shift(city_codes: list[str], years: tuple[int, int] | list[int], seed: int) -> pl.DataFrame:
    """``BETA_VAGG * (vagg_ct - mean_c - mean_t + mean)``: the planted quality effect with the
    city level AND the common year path removed (two-way demeaned over the given cities and
    years) -> (city_code, year, vagg, ln_lambda_shift).

    vagg rises over time in every city (digital inputs grow), so ``BETA_VAGG * vagg`` alone would
    add a national trend of about two log points to quality, prices and export values, and the
    city means another +-0.6. Under city and year fixed effects (every S004 quality model; the
    quality estimation's destination x year effects absorb year means anyway) the slope of quality
    on vagg is BETA_VAGG either way, and the customs data keep their scale (sd of the shift about
    0.1)."""
    v = planted_vagg_frame(city_codes, years, seed)
    dm = (pl.col("vagg") - pl.col("vagg").mean().over("city_code") - pl.col("vagg").mean().over("year")
          + pl.col("vagg").mean())
    return v.with_columns((BETA_VAGG * dm).alias("ln_lambda_shift"))


def _universe_meta(universe_dir: Path) -> tuple[list[str], tuple[int, int], dict]:
    u = Path(universe_dir)
    src = yaml.safe_load((u / "source.yaml").read_text(encoding="utf-8")) or {}
    years = (int(src["years"]["start"]), int(src["years"]["end"]))
    cities = pl.read_parquet(u / "_truth" / "cities.parquet")["city_code"].sort().to_list()
    return cities, years, src


def planted_vagg(universe_dir: Path | str, seed: int | None = None) -> pl.DataFrame:
    """Planted vagg (city_code, year, vagg) of a universe: cities from ``_truth/cities.parquet``,
    years from ``source.yaml``; ``seed`` from ``_truth/s004_planted.json`` when written, else the
    universe's generator seed."""
    u = Path(universe_dir)
    cities, years, src = _universe_meta(u)
    if seed is None:
        pj = u / "_truth" / "s004_planted.json"
        if pj.is_file():
            seed = int(json.loads(pj.read_text(encoding="utf-8"))["seed"])
        else:
            seed = int((src.get("generator") or {}).get("seed", 1))
    return planted_vagg_frame(cities, years, seed)


# --------------------------------------------------------------------------------------------------
# two-way FE helpers for the planted summary
# --------------------------------------------------------------------------------------------------
def _twoway_resid(y: np.ndarray) -> np.ndarray:
    """Residual of a balanced city x year matrix on city and year dummies (exact: the two-way
    within transform y - row mean - column mean + grand mean), flattened city-major."""
    return (y - y.mean(axis=1, keepdims=True) - y.mean(axis=0, keepdims=True) + y.mean()).reshape(-1)


def _first_stage(v: np.ndarray, z: np.ndarray) -> dict:
    """First stage of v on z with city and year fixed effects (balanced matrices): slope, partial
    R2 and the iid F statistic of the excluded instrument."""
    rv, rz = _twoway_resid(v), _twoway_resid(z)
    if rz @ rz == 0:
        return {"partial_r2": 0.0, "f_iid": 0.0}
    pi = (rz @ rv) / (rz @ rz)
    e = rv - pi * rz
    nc, ny = v.shape
    dof = nc * ny - nc - ny  # city + year effects (nc + ny - 1) and the slope
    s2 = (e @ e) / max(dof, 1)
    f = pi ** 2 * (rz @ rz) / s2 if s2 > 0 else float("inf")
    r2 = 1 - (e @ e) / (rv @ rv) if rv @ rv > 0 else 0.0
    return {"partial_r2": float(r2), "f_iid": float(f), "coef": float(pi)}


# --------------------------------------------------------------------------------------------------
# generation
# --------------------------------------------------------------------------------------------------
def _write_csv(df: pl.DataFrame, path: Path, encoding: str = "utf-8") -> None:
    text = df.write_csv()
    if encoding == "utf-8-sig":
        path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    else:
        path.write_bytes(text.encode(encoding))


def _z(x: np.ndarray) -> np.ndarray:
    s = x.std()
    return (x - x.mean()) / s if s > 0 else np.zeros_like(x)


def generate_s004_inputs(universe_dir: Path | str, seed: int | None = None) -> Path:
    """Write every S004 input table of a generated universe to ``<universe>/<companion_dir>/s004/``
    and the planted values to ``<universe>/_truth/s004_planted.json``; returns the s004 folder.

    ``seed`` defaults to the universe's generator seed (source.yaml). Needs ``source.yaml``,
    ``_truth/cities.parquet`` and ``_truth/products.parquet``. Overwrites earlier S004 files.
    """
    from kspill_pipeline.reference.admin import prefectures  # noqa: PLC0415

    u = Path(universe_dir)
    cities, (y0, y1), src = _universe_meta(u)
    if seed is None:
        seed = int((src.get("generator") or {}).get("seed", 1))
    seed = int(seed)
    if y0 - 1 < CALENDAR[0] or y1 > CALENDAR[1]:
        raise ValueError(f"generate_s004_inputs: universe years {(y0, y1)} outside {CALENDAR}")
    out = u / src.get("companion_dir", "companion") / "s004"
    out.mkdir(parents=True, exist_ok=True)
    for p in out.iterdir():
        if p.is_file() and p.suffix in {".csv", ".parquet"}:
            p.unlink()
    truth = u / "_truth"
    truth.mkdir(parents=True, exist_ok=True)

    sd = _sector_draws(seed)
    cal = sd["years"]
    yrs = np.arange(y0, y1 + 1)
    iy = yrs - CALENDAR[0]
    nc, ny = len(cities), len(yrs)
    vmat = _vagg_matrix(seed, cities, sd)           # city x calendar
    V = vmat[:, iy]                                  # city x study years
    ci = np.repeat(np.arange(nc), ny)
    ti = np.tile(np.arange(ny), nc)

    # ---- digital_coef -----------------------------------------------------------------------------
    rows = []
    for origin in ("total", "domestic"):
        for d in ("J61", "J62T63", "G46", "G47"):
            mult = 1.0 if origin == "total" else sd["dom_share"][d]
            for s, sec in enumerate(SECTORS):
                for t in yrs:
                    k = t - CALENDAR[0]
                    c = float(np.round(sd["coef"][d][s, k] * mult, 8)) if origin == "domestic" else float(sd["coef"][d][s, k])
                    rows.append(("CHN", origin, int(t), sec, d, c,
                                 float(np.round(c * sd["gross"][s, k], 4)), float(sd["split"][d][k])))
    dc = pl.DataFrame(rows, schema={"country": pl.String, "origin": pl.String, "year": pl.Int32, "sector": pl.String,
                                    "digital_sector": pl.String, "coef": pl.Float64, "input_value": pl.Float64,
                                    "split_coef": pl.Float64}, orient="row")
    _write_csv(dc, out / "digital_coef.csv")

    # ---- base_output (parquet) -------------------------------------------------------------------
    bo = pl.DataFrame({
        "city_code": np.repeat(np.array(cities, dtype=object), len(SECTORS)).astype(str),
        "sector": np.tile(np.array(SECTORS, dtype=object), nc).astype(str),
        "base_year": np.full(nc * len(SECTORS), BASE_YEAR, dtype=np.int32),
        "output": np.concatenate([_city_output(seed, c) for c in cities]) if cities else np.zeros(0),
    })
    bo.write_parquet(out / "base_output.parquet")

    # ---- national internet series and 1984 instruments ------------------------------------------
    nat_years = np.arange(y0 - 1, y1 + 1)
    ii = pl.DataFrame({"year": nat_years.astype(np.int32),
                       "internet_investment": sd["national"][nat_years - CALENDAR[0]],
                       "internet_users": sd["users"][nat_years - CALENDAR[0]]})
    _write_csv(ii, out / "internet_investment.csv")
    ex = np.arange(*EXPOSURE_YEARS) + 1  # exposure on the fixed calendar: vagg_t on N_(t-1)
    nlag = sd["national"][ex - 1 - CALENDAR[0]]
    nl = nlag - nlag.mean()
    slope = ((vmat[:, ex - CALENDAR[0]] - vmat[:, ex - CALENDAR[0]].mean(axis=1, keepdims=True)) @ nl) / (nl @ nl)
    zc = _z(slope)
    r = _rng(seed, 2, 1)
    pop84 = np.round(r.lognormal(math.log(300.0), 0.5, nc), 2)
    e1, e2 = r.standard_normal(nc), r.standard_normal(nc)
    tel_pc = np.exp(math.log(150.0) + 0.45 * (0.8 * zc + 0.6 * e1))
    post_pc = np.exp(math.log(0.7) + 0.35 * (0.55 * zc + math.sqrt(1 - 0.55 ** 2) * e2))
    iv = pl.DataFrame({"city_code": cities, "telephones_1984": np.round(tel_pc * pop84),
                       "post_offices_1984": np.round(post_pc * pop84), "population_1984": pop84})
    _write_csv(iv, out / "iv1984.csv")

    # ---- keyword counts ---------------------------------------------------------------------------
    r = _rng(seed, 2, 2)
    zv = _z(V.reshape(-1)).reshape(V.shape)
    ak = r.normal(0.5, 0.5, len(KEYWORDS))
    kw_rows = []
    for c in range(nc):
        for j, t in enumerate(yrs):
            mu = np.exp(ak + 0.12 * (t - 2000) + 0.5 * zv[c, j])
            cnt = r.poisson(mu)
            ntok = int(r.integers(8000, 20000))
            for k, w in enumerate(KEYWORDS):
                kw_rows.append((cities[c], int(t), w, int(cnt[k]), ntok))
    kw = pl.DataFrame(kw_rows, schema={"city_code": pl.String, "year": pl.Int32, "keyword": pl.String,
                                       "count": pl.Int64, "n_tokens": pl.Int64}, orient="row")
    _write_csv(kw, out / "keyword_counts.csv")

    # ---- city controls (Chinese headers, UTF-8 BOM) -----------------------------------------------
    r = _rng(seed, 2, 3)
    n = nc * ny
    ce = {k: r.standard_normal(nc)[ci] for k in ("fdi", "open", "fisc", "dlp", "sci", "edu", "fixinv", "w", "g", "p")}
    tt = (yrs[ti] - 2000).astype(float)
    infl_nat = r.normal(0.02, 0.015, ny)
    chain = np.round(100.0 * np.exp(infl_nat[ti] + 0.005 * r.standard_normal(n)), 2)
    # price level P_t / P_y0 from the rounded chain (only used to make nominal values)
    lvl = np.ones(n)
    for c in range(nc):
        s = slice(c * ny, (c + 1) * ny)
        ch = chain[s] / 100.0
        lvl[s] = np.cumprod(ch) / ch[0]
    pop = np.exp(math.log(400.0) + 0.6 * ce["p"]) * np.exp(0.005 * tt)
    ctl = {
        "fdi": np.clip(np.exp(math.log(0.025) + 0.6 * ce["fdi"] + 0.2 * r.standard_normal(n)), 0, 0.37),
        "open": np.clip(np.exp(math.log(0.3) + 0.9 * ce["open"] + 0.2 * r.standard_normal(n)), 0, 8.0),
        "fisc": np.exp(math.log(0.1) + 0.35 * ce["fisc"] + 0.1 * r.standard_normal(n)),
        "dlp": np.clip(0.39 + 0.05 * ce["dlp"] + 0.02 * r.standard_normal(n), 0.13, 0.85),
        "sci": np.exp(math.log(0.0018) + 0.5 * ce["sci"] + 0.15 * r.standard_normal(n)),
        "edu": np.clip(np.exp(math.log(0.015) + 0.8 * ce["edu"] + 0.05 * tt / 10), 0, 0.13),
        "fixinv": np.clip(np.exp(math.log(0.55) + 0.35 * ce["fixinv"] + 0.03 * tt + 0.1 * r.standard_normal(n)), 0.08, 2.1),
    }
    wage = np.round(np.exp(math.log(9000.0) + 0.2 * ce["w"] + 0.10 * tt + 0.03 * r.standard_normal(n)) * lvl, 0)
    gdp_pc = np.round(np.exp(math.log(10000.0) + 0.5 * ce["g"] + 0.09 * tt + 0.03 * r.standard_normal(n)) * lvl, 0)
    gdp_tot = np.round(gdp_pc * pop, 0)
    miss = {k: r.random(n) < 0.02 for k in ctl}
    cc = pl.DataFrame({
        "城市代码": np.array(cities, dtype=object)[ci].astype(str), "年份": yrs[ti].astype(np.int32),
        "实际利用外资占GDP比重": np.where(miss["fdi"], np.nan, np.round(ctl["fdi"], 6)),
        "进出口总额占GDP比重": np.where(miss["open"], np.nan, np.round(ctl["open"], 6)),
        "财政支出占GDP比重": np.where(miss["fisc"], np.nan, np.round(ctl["fisc"], 6)),
        "存贷款余额占GDP比重": np.where(miss["dlp"], np.nan, np.round(ctl["dlp"], 6)),
        "科教支出占GDP比重": np.where(miss["sci"], np.nan, np.round(ctl["sci"], 7)),
        "高校在校生占总人口比重": np.where(miss["edu"], np.nan, np.round(ctl["edu"], 6)),
        "固定资产投资占GDP比重": np.where(miss["fixinv"], np.nan, np.round(ctl["fixinv"], 6)),
        "职工平均工资": wage, "人均地区生产总值": gdp_pc, "地区生产总值": gdp_tot,
        "居民消费价格指数(上年=100)": chain,
    })
    cc = cc.with_columns([pl.col(k).cast(pl.Float64).fill_nan(None) for k in cc.columns[2:]])
    _write_csv(cc, out / "city_controls.csv", encoding="utf-8-sig")

    # ---- provincial real GDP ----------------------------------------------------------------------
    provs = sorted({c[:2] for c in cities})
    r = _rng(seed, 2, 4)
    lvl0 = r.normal(math.log(5000.0), 0.7, len(provs))
    pg = pl.DataFrame({
        "province_code": np.repeat(np.array(provs, dtype=object), ny).astype(str),
        "year": np.tile(yrs, len(provs)).astype(np.int32),
        "gdp_real": np.round(np.exp(np.repeat(lvl0, ny) + 0.10 * np.tile(yrs - 2000, len(provs))
                                    + 0.01 * r.standard_normal(len(provs) * ny)), 2),
        "price_base_year": np.full(len(provs) * ny, 2000, dtype=np.int32),
    })
    _write_csv(pg, out / "prov_gdp.csv")

    # ---- 8-category CPI (Chinese headers and labels, GB18030) -------------------------------------
    r = _rng(seed, 2, 5)
    vl = vmat[:, iy - 1]  # vagg_{c,t-1}
    zl = np.column_stack([_z(vl[:, j]) for j in range(ny)]) if nc else vl
    sig = 0.012 * np.exp(-0.35 * zl)
    cats = list(CPI_LABELS_ZH)
    infl = {k: r.normal(CPI_MEAN_INFLATION[k], 0.02, ny) for k in cats}
    cpi_rows = []
    for c in range(nc):
        for j, t in enumerate(yrs):
            e = r.standard_normal(len(cats)) * sig[c, j]
            for k, cat in enumerate(cats):
                cpi_rows.append((cities[c], int(t), CPI_LABELS_ZH[cat], round(100.0 * math.exp(infl[cat][j] + e[k]), 2)))
    cpi = pl.DataFrame(cpi_rows, schema={"城市代码": pl.String, "年份": pl.Int32, "类别": pl.String,
                                         "价格指数(上年=100)": pl.Float64}, orient="row")
    _write_csv(cpi, out / "city_cpi.csv", encoding="gb18030")

    # ---- roads ------------------------------------------------------------------------------------
    r = _rng(seed, 2, 6)
    a_c = r.normal(0.0, 0.3, nc)
    lr = (math.log(7.0) + a_c[ci] + 0.04 * (yrs[ti] - 2000) + GAMMA_ROADS * (V - V[:, :1]).reshape(-1)
          + 0.05 * r.standard_normal(n))
    rd = pl.DataFrame({"city_code": np.array(cities, dtype=object)[ci].astype(str), "year": yrs[ti].astype(np.int32),
                       "road_area_pc": np.round(np.exp(lr), 3)})
    _write_csv(rd, out / "city_roads.csv")

    # ---- employment by section ----------------------------------------------------------------------
    r = _rng(seed, 2, 7)
    sec_of = dict(SECTIONS)
    codes = [s for s, _ in SECTIONS]
    ind_rows = []
    a2 = r.normal(-0.3, 0.6, nc)
    for c in range(nc):
        wsec = {k: r.dirichlet(np.full(sum(1 for _, v in SECTIONS if v == k), 2.0)) for k in NATIONAL_FACTOR}
        tot0 = r.lognormal(math.log(40.0), 0.8)
        for j, t in enumerate(yrs):
            tot = tot0 * math.exp(0.02 * (t - 2000))
            s2 = float(_logistic(a2[c] + 0.1 * r.standard_normal()))
            s1 = 0.05 * (1 - s2)
            share = {"primary": s1, "secondary": s2, "tertiary": 1 - s1 - s2}
            pos = {k: 0 for k in NATIONAL_FACTOR}
            for code in codes:
                k = sec_of[code]
                emp = round(tot * share[k] * wsec[k][pos[k]], 3)
                pos[k] += 1
                ind_rows.append((cities[c], int(t), code, k, emp))
    ci_df = pl.DataFrame(ind_rows, schema={"city_code": pl.String, "year": pl.Int32, "industry": pl.String,
                                           "sector": pl.String, "employment": pl.Float64}, orient="row")
    _write_csv(ci_df, out / "city_industry.csv")
    ni = (ci_df.group_by("year", "industry", "sector").agg(pl.col("employment").sum())
          .with_columns((pl.col("employment") * pl.col("sector").replace_strict(NATIONAL_FACTOR, return_dtype=pl.Float64))
                        .round(3).alias("employment"))
          .sort("year", "industry"))
    _write_csv(ni, out / "national_industry.csv")

    # ---- maps ---------------------------------------------------------------------------------------
    centre = []
    for c in cities:
        if c[:2] in MUNICIPALITY_PROVINCES:
            centre.append((c, "municipality"))
        elif c.endswith("0100"):
            centre.append((c, "provincial_capital"))
        elif c in SUBPROVINCIAL_NON_CAPITALS:
            centre.append((c, "subprovincial"))
    _write_csv(pl.DataFrame(centre, schema={"city_code": pl.String, "centre_type": pl.String}, orient="row"),
               out / "centre_cities.csv")
    _write_csv(pl.DataFrame({"province_code": list(NBS_THREE_BELTS), "region3": list(NBS_THREE_BELTS.values())})
               .sort("province_code"), out / "region3.csv")
    prods = pl.read_parquet(u / "_truth" / "products.parquet")["hs6"].unique().sort().to_list()
    gt = []
    for h in prods:
        ch = int(h[:2])
        if ch in BEC_OTHER_CHAPTERS:
            g = "other"
        elif ch in BEC_INTERMEDIATE_CHAPTERS:
            g = "intermediate"
        elif ch in BEC_FINAL_CHAPTERS:
            g = "final"
        else:  # 84, 85, 86, ...: parts vs finished goods, alternating by code
            g = "intermediate" if int(h) % 3 == 0 else "final"
        gt.append((h, g))
    bec = pl.DataFrame({"hs_vintage": ["HS2007"] * len(gt), "hs6": [h for h, _ in gt],
                        "bec_code": [{"intermediate": "22", "final": "61", "other": "7"}[g] for _, g in gt],
                        "goods_type": [g for _, g in gt]})
    _write_csv(bec, out / "bec_map.csv")
    pref = prefectures().filter(pl.col("city_code").is_in(cities)).sort("city_code")
    co = pref.filter(pl.col("longitude").is_not_null())
    xy = np.column_stack([co["longitude"].to_numpy() * np.cos(np.radians(co["latitude"].to_numpy())),
                          co["latitude"].to_numpy()])
    cc_codes = co["city_code"].to_list()
    pairs = set()
    for i in range(len(cc_codes)):
        dist = np.hypot(*(xy - xy[i]).T)
        dist[i] = np.inf
        for j in np.argsort(dist, kind="stable")[: min(3, len(cc_codes) - 1)]:
            a, b = sorted((cc_codes[i], cc_codes[int(j)]))
            pairs.add((a, b))
    _write_csv(pl.DataFrame(sorted(pairs), schema={"city_code": pl.String, "neighbour_code": pl.String}, orient="row"),
               out / "city_adjacency.csv")

    # ---- planted summary ----------------------------------------------------------------------------
    v = V.reshape(-1)
    ivt = iv["telephones_1984"].to_numpy() / pop84
    ivp = iv["post_offices_1984"].to_numpy() / pop84
    nlag_s = sd["national"][yrs - 1 - CALENDAR[0]]
    fs = {}
    if nc > 1 and ny > 1:
        fs = {"telephone": _first_stage(V, ivt[:, None] * nlag_s[None, :]),
              "post_office": _first_stage(V, ivp[:, None] * nlag_s[None, :])}
        within_sd = float(_twoway_resid(V).std())
    else:
        within_sd = 0.0
    planted = {
        "generator": "kspill_pipeline.synthetic.s004_inputs", "version": GENERATOR_VERSION, "seed": seed,
        "rng_stream": [seed, STREAM], "years": [y0, y1], "n_cities": nc,
        "beta_vagg": BETA_VAGG,
        "beta_vagg_rule": "ln_lambda += BETA_VAGG * (vagg_ct - mean_c - mean_t + mean), means over the "
                          "universe's cities and 2000-2016, applied by the customs generator to the firm's home "
                          "city (synthetic._simulate.vagg_shift); vagg on the raw Bartik scale, spec defaults: "
                          "CHN, origin total, all digital sectors, no rescale. Estimand: the slope of quality "
                          "on vagg under city and year fixed effects",
        "vagg": {"mean": float(v.mean()), "sd": float(v.std()), "min": float(v.min()) if v.size else None,
                 "max": float(v.max()) if v.size else None, "within_sd_city_year_fe": within_sd,
                 "implied_ln_lambda_within_sd": BETA_VAGG * within_sd},
        "sectors": {s: {"growth_g": float(sd["g"][i]),
                        **{f"base_{d}": float(sd["base"][d][i]) for d in sd["base"]}} for i, s in enumerate(SECTORS)},
        "digital": {"telecom_it": "coef = base * exp(g_s (t - 2005) + 0.03 N(0,1))",
                    "trade": "coef = base * exp(0.01 (t - 2005) + 0.03 N(0,1))",
                    "split_G46": "0.01 + 0.25 logistic(0.35 (t - 2014))",
                    "split_G47": "0.02 + 0.40 logistic(0.35 (t - 2014))",
                    "domestic_share": sd["dom_share"],
                    "input_value": "coef x sector gross output (million USD, 2005 lognormal(ln 2e5, 0.8), +10 %/yr)"},
        "base_output": {"base_year": BASE_YEAR, "rule": "Dirichlet(0.6) shares, sector absent w.p. 0.15, total "
                                                        "lognormal(ln 5e7, 1) thousand yuan"},
        "instruments": {
            "national": "internet_investment = 80 exp(0.16 (t - 1999)) exp(0.03 N(0,1)), 100 million yuan",
            "exposure": "z_c = standardised slope of planted vagg_t on N_(t-1), 2001-2016",
            "telephones_per_10k": "exp(ln 150 + 0.45 (0.8 z_c + 0.6 e))",
            "post_offices_per_10k": "exp(ln 0.7 + 0.35 (0.55 z_c + 0.835 e'))",
            "corr_log_tel_pc_z": float(np.corrcoef(np.log(np.maximum(ivt, 1e-12)), zc)[0, 1]) if nc > 2 else None,
            "corr_log_post_pc_z": float(np.corrcoef(np.log(np.maximum(ivp, 1e-12)), zc)[0, 1]) if nc > 2 else None,
            "first_stage_two_way_fe": fs,
        },
        "cpi": {"rule": "chained index = 100 exp(pi_kt + e), pi_kt ~ N(mean_k, 0.02), e ~ N(0, 0.012 exp(-0.35 "
                        "z(vagg_c,t-1)))", "mean_inflation": CPI_MEAN_INFLATION, "labels": CPI_LABELS_ZH},
        "roads": {"gamma_roads": GAMMA_ROADS,
                  "rule": "ln road_area_pc = ln 7 + N(0,0.3)_c + 0.04 (t - 2000) + gamma (vagg_ct - vagg_c,y0) + 0.05 N"},
        "employment": {"sections": dict(SECTIONS), "national_factor": NATIONAL_FACTOR,
                       "rule": "secondary share logistic(N(-0.3,0.6)_c + 0.1 N); primary 5 % of the rest"},
        "keywords": {"terms": list(KEYWORDS), "rule": "Poisson, ln mean = a_k + 0.12 (t - 2000) + 0.5 z(vagg_ct)"},
        "controls": {"missing_share": 0.02, "deflator": "chained, national N(0.02, 0.015) + city 0.005 N",
                     "independent_of_vagg": True},
        "maps": {"centre": "xx0100 cities (municipalities, capitals) + sub-provincial non-capitals "
                           f"{list(SUBPROVINCIAL_NON_CAPITALS)}",
                 "region3": "NBS three belts", "bec": "by HS chapter; 84-86 etc. alternate by code mod 3",
                 "adjacency": "3 nearest universe cities by coordinates (stand-in for contiguity)"},
        "formats": {"city_controls.csv": "Chinese headers, UTF-8 with BOM",
                    "city_cpi.csv": "Chinese headers and labels, GB18030", "base_output.parquet": "parquet",
                    "other": "English headers, UTF-8 CSV"},
    }
    (truth / "s004_planted.json").write_text(json.dumps(planted, ensure_ascii=False, indent=1, sort_keys=True),
                                             encoding="utf-8")
    return out
