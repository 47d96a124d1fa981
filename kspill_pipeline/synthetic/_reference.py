"""Public reference material the synthetic universe is built from (read-only, offline).

* HS6 codes and their vintage round-trips: Harvard Growth Lab conversion weights shipped in the PyPI
  package ``atlas-common-data`` 1.1.1, located with ``importlib.util.find_spec`` WITHOUT importing the
  package (its ``__init__`` pulls network libraries). Codes are zero-padded to 6 characters.
* Prefecture-level cities: ``cpca/resources/adcodes.csv`` of cpca 0.5.5 (found the same way).
* Partner countries: a fixed table of ~60 real partners (ISO3, ISO2, the China-customs short Chinese
  name) with gravity-like weights.

This module is independent of ``kspill_pipeline.reference`` on purpose: the synthetic data is the
ground truth the pipeline's reference tables are tested against.
"""

from __future__ import annotations

import csv
import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

#: Growth Lab revision label of each HS vintage used by China 2000-2016.
H_OF = {"HS1992": "H0", "HS1996": "H1", "HS2002": "H2", "HS2007": "H3", "HS2012": "H4", "HS2017": "H5"}
#: Chain to the target vintage HS2007 (single_target: largest chained weight, ties lowest code).
CHAINS: dict[str, tuple[str, ...]] = {
    "HS1996": ("H1", "H2", "H3"),
    "HS2002": ("H2", "H3"),
    "HS2007": ("H3",),
    "HS2012": ("H4", "H3"),
}
RAW_VINTAGES = ("HS1996", "HS2002", "HS2007", "HS2012")


def vintage_of_year(year: int) -> str:
    """HS vintage in force in China (config.default_vintage_by_year, 2000-2016 part)."""
    if year <= 2001:
        return "HS1996"
    if year <= 2006:
        return "HS2002"
    if year <= 2011:
        return "HS2007"
    return "HS2012"


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)  # does not execute the package __init__
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {name!r} is required by the synthetic generator")
    return Path(next(iter(spec.submodule_search_locations)))


def weights_file(a: str, b: str) -> Path:
    return _package_dir("atlas_common_data") / "data" / "conversion_weights" / f"conversion_weights_{a}_to_{b}.csv"


@lru_cache(maxsize=None)
def _weights(a: str, b: str) -> dict[str, dict[str, float]]:
    import polars as pl

    df = pl.read_csv(weights_file(a, b), schema_overrides={a: pl.String, b: pl.String, "weight": pl.Float64})
    df = (
        df.filter(pl.col("weight") > 0)
        .select(pl.col(a).str.strip_chars().str.zfill(6).alias("s"), pl.col(b).str.strip_chars().str.zfill(6).alias("t"),
                "weight")
        .group_by("s", "t").agg(pl.col("weight").sum())
        .sort("s", "t")
    )
    out: dict[str, dict[str, float]] = {}
    for s, t, w in df.iter_rows():
        out.setdefault(s, {})[t] = w
    return out


@lru_cache(maxsize=None)
def valid_codes(vintage: str) -> frozenset[str]:
    """Codes of a vintage = source codes of the weight files leaving it (both directions)."""
    h = int(H_OF[vintage][1])
    codes: set[str] = set()
    for j in (h - 1, h + 1):
        if 0 <= j <= 5:
            f = weights_file(f"H{h}", f"H{j}")
            if f.is_file():
                codes.update(_weights(f"H{h}", f"H{j}").keys())
    return frozenset(codes)


@lru_cache(maxsize=None)
def all_codes_any_vintage() -> frozenset[str]:
    s: set[str] = set()
    for v in ("HS1992", "HS1996", "HS2002", "HS2007", "HS2012", "HS2017"):
        s |= valid_codes(v)
    return frozenset(s)


def _chained(vintage: str) -> dict[str, dict[str, float]]:
    """Chained weights vintage -> HS2007 (products along the path, summed over paths)."""
    chain = CHAINS[vintage]
    if len(chain) == 1:
        return {c: {c: 1.0} for c in valid_codes("HS2007")}
    cur = {s: dict(t) for s, t in _weights(chain[0], chain[1]).items()}
    for a, b in zip(chain[1:-1], chain[2:]):
        nxt = _weights(a, b)
        new: dict[str, dict[str, float]] = {}
        for s, tw in cur.items():
            acc: dict[str, float] = {}
            for m, w in tw.items():
                for t, w2 in nxt.get(m, {}).items():
                    acc[t] = acc.get(t, 0.0) + w * w2
            if acc:
                new[s] = acc
        cur = new
    return cur


def _stepwise(vintage: str, code: str) -> str | None:
    """Largest-weight target taken step by step (an alternative reading of 'chain')."""
    chain = CHAINS[vintage]
    c = code
    for a, b in zip(chain[:-1], chain[1:]):
        tw = _weights(a, b).get(c)
        if not tw:
            return None
        c = sorted(tw.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
    return c


@dataclass(frozen=True)
class RoundTrip:
    """One HS2007 code with the raw code used in each vintage (all map back exactly to it)."""

    hs6: str
    by_vintage: dict  # vintage -> raw hs6

    @property
    def renamed(self) -> bool:
        return any(v != self.hs6 for v in self.by_vintage.values())


@lru_cache(maxsize=1)
def round_trip_codes(margin: float = 0.5) -> tuple[RoundTrip, ...]:
    """HS2007 codes c (chapters 01-97) such that every raw vintage has a code mapping to c.

    A source code s of vintage v is accepted for c when its largest chained weight goes to c with a
    weight > ``margin`` (unique argmax whatever the tie rule), the step-by-step argmax agrees, and
    s is a valid code of v. Identity (s == c) is preferred; otherwise the lowest such s is used
    (a 'renamed' code that exercises the concordance).
    """
    targets = sorted(c for c in valid_codes("HS2007") if "01" <= c[:2] <= "97")
    pre: dict[str, dict[str, list[str]]] = {v: {} for v in RAW_VINTAGES}
    for v in RAW_VINTAGES:
        if v == "HS2007":
            continue
        vc = valid_codes(v)
        for s, tw in _chained(v).items():
            if s not in vc or not ("01" <= s[:2] <= "97"):
                continue
            tot = sum(tw.values())
            best, w = sorted(tw.items(), key=lambda kv: (-kv[1], kv[0]))[0]
            if w / tot <= margin or w <= margin:
                continue
            if _stepwise(v, s) != best:
                continue
            pre[v].setdefault(best, []).append(s)
    out: list[RoundTrip] = []
    for c in targets:
        byv = {"HS2007": c}
        ok = True
        for v in ("HS1996", "HS2002", "HS2012"):
            cands = sorted(pre[v].get(c, []))
            if not cands:
                ok = False
                break
            byv[v] = c if c in cands else cands[0]
        if ok:
            out.append(RoundTrip(c, byv))
    return tuple(out)


# --------------------------------------------------------------------------- cities

MUNICIPALITIES = ("11", "12", "31", "50")
PLACEHOLDER_PREFIX = ("1390", "4190", "4290", "4690", "6590", "5002")

#: Large exporting cities first (by rough real export rank); the rest of the ranking is random.
PREFERRED_CITIES = (
    "440300", "310100", "320500", "441900", "330200", "440100", "110100", "350200", "120100", "330100",
    "370200", "320200", "442000", "440600", "210200", "330700", "350100", "330300", "320600", "500100",
    "510100", "420100", "610100", "430100", "340100", "410100", "530100", "450100", "650100", "220100",
)


@dataclass(frozen=True)
class City:
    code: str  # 6-digit adcode (prefecture)
    name: str
    province_code: str
    province_name: str
    short: str
    districts: tuple[str, ...]


@lru_cache(maxsize=1)
def cities() -> tuple[City, ...]:
    """Real prefecture-level cities of cpca 0.5.5 (placeholders excluded), municipalities as xx0100."""
    path = _package_dir("cpca") / "resources" / "adcodes.csv"
    rows: list[tuple[str, str]] = []
    with open(path, encoding="utf-8", newline="") as fh:
        for r in csv.DictReader(fh):
            rows.append((r["adcode"].strip(), r["name"].strip()))
    prov = {a[:2]: n for a, n in rows if a[2:] == "0" * 10}
    pref: dict[str, str] = {}
    dist: dict[str, list[str]] = {}
    for a, n in rows:
        if a[4:] == "0" * 8 and a[2:4] != "00":
            pref[a[:4]] = n
        elif a[6:] == "0" * 6 and a[4:6] != "00" and n not in ("市辖区", "县"):
            dist.setdefault(a[:4], []).append((a, n))
    out: list[City] = []
    seen: set[str] = set()
    for p4 in sorted(pref):
        if p4 in PLACEHOLDER_PREFIX:
            continue
        pc = p4[:2]
        if pc in MUNICIPALITIES:
            code = pc + "0100"
            if code in seen:
                continue
            name = prov[pc]
            ds = sorted(d for k, v in dist.items() if k[:2] == pc for d in v)
        else:
            code = p4 + "00"
            name = pref[p4]
            ds = sorted(dist.get(p4, []))
        seen.add(code)
        short = name
        for suf in ("市", "地区", "盟"):
            if short.endswith(suf) and len(short) > len(suf) + 1:
                short = short[: -len(suf)]
                break
        if "自治州" in short:
            short = short[:2]
        districts = tuple(n for _, n in ds if not n.endswith("县") or True)[:12]
        out.append(City(code, name, pc, prov[pc], short, districts))
    return tuple(out)


@lru_cache(maxsize=1)
def valid_region_prefixes() -> frozenset[str]:
    """All 4-digit prefixes of prefecture-level adcodes (incl. placeholders) in cpca."""
    path = _package_dir("cpca") / "resources" / "adcodes.csv"
    s: set[str] = set()
    with open(path, encoding="utf-8", newline="") as fh:
        for r in csv.DictReader(fh):
            a = r["adcode"].strip()
            if a[2:4] != "00":
                s.add(a[:4])
    return frozenset(s)


# --------------------------------------------------------------------------- partners

#: (ISO3, ISO2, China-customs short Chinese name, relative weight): 61 real partners. Chinese names
#: are the customs short forms; each is either pycountry's zh_CN name or a common short form
#: (韩国, 伊朗, 俄罗斯联邦, 阿联酋). Bangladesh and Cambodia are left out because their customs names
#: (孟加拉国, 柬埔寨) differ from pycountry's zh_CN strings.
PARTNERS: tuple[tuple[str, str, str, float], ...] = (
    ("HKG", "HK", "香港", 16.0), ("USA", "US", "美国", 18.0), ("JPN", "JP", "日本", 10.0),
    ("KOR", "KR", "韩国", 6.0), ("DEU", "DE", "德国", 5.0), ("NLD", "NL", "荷兰", 3.0),
    ("GBR", "GB", "英国", 3.0), ("SGP", "SG", "新加坡", 2.5), ("FRA", "FR", "法国", 2.0),
    ("ITA", "IT", "意大利", 2.0), ("AUS", "AU", "澳大利亚", 2.0), ("CAN", "CA", "加拿大", 2.0),
    ("RUS", "RU", "俄罗斯联邦", 2.0), ("IND", "IN", "印度", 2.0), ("MYS", "MY", "马来西亚", 2.0),
    ("THA", "TH", "泰国", 1.5), ("VNM", "VN", "越南", 1.8), ("IDN", "ID", "印度尼西亚", 1.5),
    ("ARE", "AE", "阿联酋", 1.5), ("BRA", "BR", "巴西", 1.3), ("ESP", "ES", "西班牙", 1.3),
    ("BEL", "BE", "比利时", 1.0), ("MEX", "MX", "墨西哥", 1.0), ("PHL", "PH", "菲律宾", 1.0),
    ("SAU", "SA", "沙特阿拉伯", 1.0), ("TUR", "TR", "土耳其", 0.9), ("ZAF", "ZA", "南非", 0.7),
    ("IRN", "IR", "伊朗", 0.8), ("PAK", "PK", "巴基斯坦", 0.6),
    ("EGY", "EG", "埃及", 0.5), ("NGA", "NG", "尼日利亚", 0.5), ("CHL", "CL", "智利", 0.5),
    ("ARG", "AR", "阿根廷", 0.4), ("POL", "PL", "波兰", 0.6), ("SWE", "SE", "瑞典", 0.5),
    ("CHE", "CH", "瑞士", 0.5), ("NZL", "NZ", "新西兰", 0.3), ("MAC", "MO", "澳门", 0.3),
    ("KAZ", "KZ", "哈萨克斯坦", 0.5), ("UKR", "UA", "乌克兰", 0.4), ("DNK", "DK", "丹麦", 0.4),
    ("FIN", "FI", "芬兰", 0.3), ("NOR", "NO", "挪威", 0.3), ("AUT", "AT", "奥地利", 0.3),
    ("IRL", "IE", "爱尔兰", 0.2), ("ISR", "IL", "以色列", 0.3), ("KWT", "KW", "科威特", 0.2),
    ("OMN", "OM", "阿曼", 0.2), ("QAT", "QA", "卡塔尔", 0.2), ("PER", "PE", "秘鲁", 0.2),
    ("COL", "CO", "哥伦比亚", 0.2), ("PAN", "PA", "巴拿马", 0.3), ("KEN", "KE", "肯尼亚", 0.2),
    ("DZA", "DZ", "阿尔及利亚", 0.2), ("MMR", "MM", "缅甸", 0.2),
    ("LKA", "LK", "斯里兰卡", 0.1), ("GRC", "GR", "希腊", 0.2), ("PRT", "PT", "葡萄牙", 0.2),
    ("CZE", "CZ", "捷克", 0.2), ("HUN", "HU", "匈牙利", 0.2), ("ROU", "RO", "罗马尼亚", 0.1),
    ("AGO", "AO", "安哥拉", 0.2),
)

#: Partner strings that name no country in any accepted form (dirt: unknown_partner).
UNKNOWN_PARTNERS = {"iso3": "QQQ", "iso2": "QQ", "zh": "火星"}


def partner_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    iso3 = np.array([p[0] for p in PARTNERS])
    iso2 = np.array([p[1] for p in PARTNERS])
    zh = np.array([p[2] for p in PARTNERS])
    w = np.array([p[3] for p in PARTNERS], dtype=float)
    return iso3, iso2, zh, w / w.sum()
