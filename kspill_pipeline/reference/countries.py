"""Partner-country strings -> ISO 3166 alpha-3.

Accepted forms (after NFKC normalisation and trimming):

1. ISO alpha-3 (``USA``), alpha-2 (``US``) and English names (pycountry 26.x: name, official and
   common name; case-insensitive);
2. Chinese names: pycountry's zh_CN gettext translations of iso3166-1 (names and official names),
   plus the short forms of ``data/partner_aliases.csv`` (香港/中国香港 -> HKG, 台湾/台澎金马关税区 ->
   TWN, 韩国, 朝鲜, 伊朗, 叙利亚, 刚果(金)/(布) ...) where pycountry only has the long form;
3. China-customs 3-digit numeric country codes from ``data/customs_country_codes.csv``
   **[EXT]**: an assumption to verify against the codebook of your data. Only codes we are confident
   of are listed; any other 3-digit code maps to null (-> quarantine ``unknown_partner``), never to a
   guess. ISO numeric codes are NOT accepted (they collide with customs codes).

Everything runs on the unique partner strings only.
"""

from __future__ import annotations

import gettext
import unicodedata
from functools import lru_cache

import polars as pl

from kspill_pipeline.reference import DATA_DIR


def _norm(x: str) -> str:
    return "".join(unicodedata.normalize("NFKC", x).split())


@lru_cache(maxsize=1)
def customs_codes() -> pl.DataFrame:
    """China-customs 3-digit country codes [EXT] (code, iso3, name_zh, note)."""
    return pl.read_csv(DATA_DIR / "customs_country_codes.csv", schema_overrides={"code": pl.String})


@lru_cache(maxsize=1)
def partner_index() -> dict[str, str]:
    """Normalised partner string -> ISO3 (upper-cased keys for Latin strings)."""
    import pycountry

    idx: dict[str, str] = {}
    try:
        zh = gettext.translation("iso3166-1", pycountry.LOCALES_DIR, languages=["zh_CN"])
    except OSError:  # pragma: no cover - locale missing
        zh = None
    for c in pycountry.countries:
        a3 = c.alpha_3
        for attr in ("name", "official_name", "common_name"):
            v = getattr(c, attr, None)
            if not v:
                continue
            idx[_norm(v).upper()] = a3
            if zh is not None:
                t = zh.gettext(v)
                if t and t != v:
                    idx[_norm(t)] = a3
        idx[c.alpha_2] = a3
        idx[a3] = a3
    aliases = pl.read_csv(DATA_DIR / "partner_aliases.csv")
    for alias, iso3 in zip(aliases["alias"], aliases["iso3"]):
        idx[_norm(alias).upper()] = iso3
    cc = customs_codes()
    for code, iso3, name in zip(cc["code"], cc["iso3"], cc["name_zh"]):
        idx[code] = iso3
        idx.setdefault(_norm(name), iso3)
    return idx


def normalise_partner(x: str | None) -> str | None:
    """One partner string -> ISO3 or None (unknown)."""
    if x is None:
        return None
    n = _norm(x).upper()
    if not n:
        return None
    if n.isdigit():
        if len(n) < 3:  # customs codes lose leading zeros in numeric columns? they start at 101
            return None
        return partner_index().get(n) if len(n) == 3 else None
    return partner_index().get(n)


def to_iso3(partners: pl.Series) -> pl.Series:
    """Vectorised :func:`normalise_partner` (Python runs on the unique strings only)."""
    s = partners.cast(pl.String)
    mapping = {u: normalise_partner(u) for u in s.unique().drop_nulls().to_list()}
    return s.replace_strict(mapping, default=None, return_dtype=pl.String)


def is_hk(iso3: pl.Expr | pl.Series) -> pl.Expr | pl.Series:
    """Partner is Hong Kong (S001 drops it as a destination)."""
    return (iso3 == "HKG").fill_null(False)
