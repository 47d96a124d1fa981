"""Chinese prefecture-level cities (ref_prefecture.yaml) and the location resolvers of the cleaning.

Source: ``cpca/resources/adcodes.csv`` of the PyPI package cpca 0.5.5 (MIT; about 2020 divisions),
read with importlib without importing ``cpca`` (importing it costs ~0.2 s plus pkg_resources; only
:func:`address_to_city` imports it).

City table (``prefectures()``):

* prefecture rows are adcodes ``xxyy00000000`` with yy != 00 (344 rows in cpca 0.5.5);
* the municipalities 11/12/31/50 collapse to one city ``xx0100`` named after the municipality
  (Chongqing's 500200 "县" folds into 500100), giving 343 rows;
* placeholder units (139000, 419000, 429000, 469000, 659000: province-administered counties) are kept
  so region codes that point at them resolve; they have no coordinates;
* macro_region by province (NBS four regions; S000 footnote 3).

Region codes (customs 5-digit domestic region, digits 1-4 = province + prefecture, S001 2.1 [EXT]):
``resolve_region_codes`` maps ``xxyy?`` -> ``xxyy00`` when that is a city of the table (municipalities:
any ``11yy`` -> ``110100``), else through the historic crosswalk ``data/region_crosswalk.csv``
(prefecture codes of the 2000s absent from the 2020 vintage; one-to-one renamings only, verified
against the GB/T 2260 code lists of 2001 and ~2008). Deliberately NOT in the crosswalk because the
unit was split: 341400 巢湖市 (split 2011 between 合肥, 芜湖 and 马鞍山), 452100 南宁地区 and 452200
柳州地区 (split 2002). Rows with those codes fall through to the city-name and address fallbacks.
Users can extend the CSV.
"""

from __future__ import annotations

import importlib.util
import unicodedata
from functools import lru_cache
from pathlib import Path

import polars as pl

from kspill_pipeline.reference import DATA_DIR

MUNICIPALITIES: tuple[str, ...] = ("11", "12", "31", "50")
PLACEHOLDERS: tuple[str, ...] = ("139000", "419000", "429000", "469000", "659000")

MACRO_REGION: dict[str, str] = {
    **{p: "east" for p in ("11", "12", "13", "31", "32", "33", "35", "37", "44", "46")},
    **{p: "central" for p in ("14", "34", "36", "41", "42", "43")},
    **{p: "west" for p in ("15", "45", "50", "51", "52", "53", "54", "61", "62", "63", "64", "65")},
    **{p: "northeast" for p in ("21", "22", "23")},
}

PREFECTURE_SCHEMA: dict[str, pl.DataType] = {
    "city_code": pl.String(),
    "city_name": pl.String(),
    "province_code": pl.String(),
    "province_name": pl.String(),
    "macro_region": pl.String(),
    "longitude": pl.Float64(),
    "latitude": pl.Float64(),
}

CITY_SOURCES = ("region_code", "region_crosswalk", "address", "city_name")


def cpca_adcodes_path() -> Path:
    """Path of cpca's adcodes.csv, located without importing cpca."""
    spec = importlib.util.find_spec("cpca")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("cpca (0.5.5) is not installed; it ships the adcode table")
    p = Path(next(iter(spec.submodule_search_locations))) / "resources" / "adcodes.csv"
    if not p.is_file():
        raise FileNotFoundError(p)
    return p


@lru_cache(maxsize=1)
def adcodes() -> pl.DataFrame:
    """The raw cpca adcode table (adcode 12-digit string, name, longitude, latitude)."""
    return pl.read_csv(
        cpca_adcodes_path(),
        schema_overrides={"adcode": pl.String, "name": pl.String,
                          "longitude": pl.Float64, "latitude": pl.Float64},
    ).with_columns(pl.col("adcode").str.strip_chars(), pl.col("name").str.strip_chars())


@lru_cache(maxsize=1)
def prefectures() -> pl.DataFrame:
    """Prefecture-level cities per ref_prefecture.yaml (343 rows with cpca 0.5.5)."""
    a = adcodes()
    prov = a.filter(pl.col("adcode").str.contains(r"^\d{2}0{10}$")).select(
        pl.col("adcode").str.slice(0, 2).alias("province_code"),
        pl.col("name").alias("province_name"),
        pl.col("longitude").alias("p_lon"),
        pl.col("latitude").alias("p_lat"),
    )
    pref = a.filter(
        pl.col("adcode").str.contains(r"^\d{4}0{8}$") & ~pl.col("adcode").str.contains(r"^\d{2}00")
    ).select(
        pl.col("adcode").str.slice(0, 6).alias("city_code"),
        pl.col("name").alias("city_name"),
        pl.col("adcode").str.slice(0, 2).alias("province_code"),
        "longitude",
        "latitude",
    )
    pref = pref.join(prov, on="province_code", how="left")
    is_muni = pl.col("province_code").is_in(list(MUNICIPALITIES))
    pref = (
        pref.with_columns(
            pl.when(is_muni).then(pl.col("province_code") + "0100").otherwise("city_code").alias("city_code"),
            pl.when(is_muni).then("province_name").otherwise("city_name").alias("city_name"),
            pl.when(is_muni).then("p_lon").otherwise("longitude").alias("longitude"),
            pl.when(is_muni).then("p_lat").otherwise("latitude").alias("latitude"),
        )
        .unique(subset="city_code", keep="first", maintain_order=True)
        .with_columns(
            pl.col("province_code").replace_strict(MACRO_REGION, default=None).alias("macro_region")
        )
    )
    return pref.select(list(PREFECTURE_SCHEMA)).sort("city_code").cast(PREFECTURE_SCHEMA)


@lru_cache(maxsize=1)
def region_crosswalk() -> pl.DataFrame:
    """Historic prefecture codes -> 2020-vintage city_code (package CSV, with notes)."""
    return pl.read_csv(
        DATA_DIR / "region_crosswalk.csv",
        schema_overrides={"old_code": pl.String, "city_code": pl.String, "changed": pl.String},
    )


def _collapse_municipality(code6: pl.Expr) -> pl.Expr:
    return (
        pl.when(code6.str.slice(0, 2).is_in(list(MUNICIPALITIES)))
        .then(code6.str.slice(0, 2) + "0100")
        .otherwise(code6)
    )


def resolve_region_codes(codes: pl.Series) -> pl.DataFrame:
    """Map 5-digit customs region codes to (city_code, city_source).

    Vectorised over the unique codes. ``codes`` is a Series of strings; returns a frame with columns
    ``region_code`` (the trimmed input, unique), ``city_code`` and ``city_source`` in
    {region_code, region_crosswalk} (null when unresolved). Codes that are not 5 digits do not
    resolve.
    """
    s = codes
    u = pl.DataFrame({"region_code": s.cast(pl.String).str.strip_chars().unique()})
    cities = prefectures().select("city_code").with_columns(pl.lit(True).alias("_ok"))
    xw = region_crosswalk().select(pl.col("old_code"), pl.col("city_code").alias("_xw"))
    cand = _collapse_municipality(pl.col("region_code").str.slice(0, 4) + "00")
    out = (
        u.with_columns(
            pl.when(pl.col("region_code").str.contains(r"^\d{5}$")).then(cand).alias("_cand")
        )
        .join(cities, left_on="_cand", right_on="city_code", how="left")
        .join(xw, left_on="_cand", right_on="old_code", how="left")
        .select(
            "region_code",
            pl.when(pl.col("_ok")).then("_cand").otherwise("_xw").alias("city_code"),
            pl.when(pl.col("_ok")).then(pl.lit("region_code"))
            .when(pl.col("_xw").is_not_null()).then(pl.lit("region_crosswalk"))
            .alias("city_source"),
        )
    )
    return out


def _norm_name(x: str) -> str:
    return "".join(unicodedata.normalize("NFKC", x).split())


_SUFFIXES = ("土家族苗族自治州", "自治州", "地区", "市", "盟")


@lru_cache(maxsize=1)
def city_name_index() -> dict[str, str]:
    """Lookup name -> city_code: full names, names without common suffixes (市, 地区, 盟, 自治州; only
    when unambiguous), historic names of the crosswalk and municipality short names (北京 ...)."""
    pref = prefectures()
    full: dict[str, str] = {}
    short: dict[str, set[str]] = {}
    rows = list(zip(pref["city_name"], pref["city_code"]))
    rows += list(zip(region_crosswalk()["old_name"], region_crosswalk()["city_code"]))
    for name, code in rows:
        if code in PLACEHOLDERS:
            continue
        n = _norm_name(name)
        full[n] = code
        for suf in ("市", "地区", "盟"):
            if n.endswith(suf) and len(n) > len(suf) + 1:
                short.setdefault(n[: -len(suf)], set()).add(code)
    idx = {k: next(iter(v)) for k, v in short.items() if len(v) == 1 and k not in full}
    idx.update(full)
    return idx


def city_name_to_code(names: pl.Series) -> pl.Series:
    """City name -> city_code (null when unknown or ambiguous); vectorised over unique names."""
    idx = city_name_index()
    u = names.cast(pl.String).unique().drop_nulls()
    mapping = {x: idx.get(_norm_name(x)) for x in u.to_list()}
    return names.cast(pl.String).replace_strict(mapping, default=None, return_dtype=pl.String)


def address_to_city(addresses: pl.Series) -> pl.Series:
    """Firm address -> city_code with ``cpca.transform`` run on the unique addresses only.

    The adcode cpca returns is cut to the prefecture (first 4 digits + "00"; municipalities
    collapsed to xx0100); a city not in :func:`prefectures` or a province-only match gives null.
    """
    s = addresses.cast(pl.String)
    u = [x for x in s.unique().drop_nulls().to_list() if x.strip()]
    if not u:
        return pl.Series(s.name, [None] * len(s), dtype=pl.String)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import cpca  # noqa: PLC0415 - heavy import only where needed

        res = cpca.transform(u)
    ad = pl.Series("adcode", [None if a is None else str(a) for a in res["adcode"].tolist()], dtype=pl.String)
    m = pl.DataFrame({"address": u, "adcode": ad}).with_columns(
        pl.when(pl.col("adcode").str.contains(r"^\d{6}") & ~pl.col("adcode").str.contains(r"^\d{2}00"))
        .then(_collapse_municipality(pl.col("adcode").str.slice(0, 4) + "00"))
        .alias("city_code")
    )
    valid = set(prefectures()["city_code"].to_list())
    mapping = {a: (c if c in valid else None) for a, c in zip(m["address"].to_list(), m["city_code"].to_list())}
    return s.replace_strict(mapping, default=None, return_dtype=pl.String)
