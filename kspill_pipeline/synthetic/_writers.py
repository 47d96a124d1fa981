"""Rendering one simulated year into the raw format of that year, injecting dirt, writing files.

Formats (documented in planted.json under ``formats``):

* 2000-2001 ``.dta`` (Stata 118), English headers, HS8/region/firm type numeric.
* 2002-2006 CSV with Chinese headers, monthly rows, GBK (2005: GB18030 with an 地址 column holding
  one character outside GBK); 2003 split into 12 monthly files.
* 2007-2011 UTF-8 CSV (2009 with a BOM), English headers, flow 0/1, ISO2 partners, 2-digit trade
  modes, numeric enterprise-type codes, an ``address`` column; some region codes empty.
* 2012-2016 parquet, Chinese headers, ISO3 partners, Chinese trade-mode and ownership labels.
"""

from __future__ import annotations

import datetime as _dt
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from kspill_pipeline.synthetic import _reference as ref
from kspill_pipeline.synthetic._universe import NON_GBK_CHAR, ROADS, TRADE_MODES, Universe

CANON = ("year", "month", "firm_id", "firm_name", "flow", "hs_code", "partner", "trade_mode", "ownership",
         "region_code", "address", "value_usd", "quantity", "unit")
KEY = ("year", "month", "firm_id", "flow", "hs_code", "partner", "trade_mode", "region_code", "unit")
GARBLE_MARK = "@@GARBLED@@"
GARBLE_BYTES = b"\x80\xff"

REASONS = ("encoding_garbage", "bad_year", "year_mismatch", "bad_month", "missing_firm_id", "bad_flow",
           "bad_hs_code", "hs_unmapped", "bad_value", "nonpositive_value", "bad_quantity", "unknown_partner",
           "unmapped_region", "duplicate_exact", "duplicate_conflict")


@dataclass(frozen=True)
class Fmt:
    kind: str  # dta | gbk | utf8 | parquet
    encoding: str | None
    monthly: bool
    headers: dict
    partner: str  # iso3 | iso2 | zh
    flow: dict
    mode: str  # code4 | zh | code2
    own: str  # code | zh
    reasons: tuple
    split_months: bool = False
    address: bool = False
    bom: bool = False


_DTA_H = {"year": "year", "firm_id": "firm_code", "firm_name": "company_name", "flow": "import_export",
          "hs_code": "hs8", "partner": "country", "trade_mode": "trade_mode", "ownership": "firm_type",
          "region_code": "region", "value_usd": "value", "quantity": "qty", "unit": "unit"}
_GBK_H = {"firm_id": "企业编码", "firm_name": "企业名称", "flow": "进出口", "hs_code": "税号",
          "partner": "起运国/目的国", "trade_mode": "贸易方式", "ownership": "企业类型",
          "region_code": "生产销售地代码", "value_usd": "美元", "quantity": "数量", "unit": "单位",
          "year": "年", "month": "月"}
_UTF_H = {"year": "year", "firm_id": "party_id", "firm_name": "firm_name", "flow": "imp_exp",
          "hs_code": "hscode", "partner": "partner_country", "trade_mode": "customs_regime",
          "ownership": "enterprise_type", "region_code": "domestic_region", "address": "address",
          "value_usd": "value_usd", "quantity": "quantity", "unit": "unit"}
_PQ_H = {"year": "年", "firm_id": "企业代码", "firm_name": "经营单位名称", "flow": "进出口", "hs_code": "商品编码",
         "partner": "起运国(地区)/目的国(地区)", "trade_mode": "贸易方式", "ownership": "企业性质",
         "region_code": "境内目的地/货源地", "value_usd": "金额(美元)", "quantity": "数量", "unit": "计量单位"}

_R_DTA = ("year_mismatch", "missing_firm_id", "bad_flow", "hs_unmapped", "nonpositive_value", "unknown_partner",
          "unmapped_region", "duplicate_exact", "duplicate_conflict")
_R_GBK = ("encoding_garbage", "bad_year", "year_mismatch", "bad_month", "missing_firm_id", "bad_flow", "bad_hs_code",
          "hs_unmapped", "bad_value", "nonpositive_value", "unknown_partner", "unmapped_region", "duplicate_exact",
          "duplicate_conflict")
_R_UTF = tuple(r for r in _R_GBK if r not in ("encoding_garbage", "bad_month"))
_R_PQ = ("year_mismatch", "missing_firm_id", "bad_flow", "bad_hs_code", "hs_unmapped", "nonpositive_value",
         "unknown_partner", "unmapped_region", "duplicate_exact", "duplicate_conflict")

FLOW_EN = {0: "export", 1: "import"}
FLOW_ZH = {0: "出口", 1: "进口"}
FLOW_NUM = {0: "0", 1: "1"}
BAD_FLOW = {"dta": "transit", "gbk": "转口", "utf8": "2", "parquet": "未知"}
GB18030_YEAR = 2005
BOM_YEAR = 2009
SPLIT_YEAR = 2003
EMPTY_REGION_SHARE = 0.03


def format_of_year(t: int) -> Fmt:
    if t <= 2001:
        return Fmt("dta", None, False, _DTA_H, "iso3", FLOW_EN, "code4", "code", _R_DTA)
    if t <= 2006:
        gb = t == GB18030_YEAR
        h = dict(_GBK_H)
        if gb:
            h["address"] = "地址"
        return Fmt("gbk", "gb18030" if gb else "gbk", True, h, "zh", FLOW_ZH, "zh", "zh",
                   tuple(r for r in _R_GBK if not (gb and r == "encoding_garbage")),
                   split_months=(t == SPLIT_YEAR), address=gb)
    if t <= 2011:
        return Fmt("utf8", "utf-8-sig" if t == BOM_YEAR else "utf-8", False, _UTF_H, "iso2", FLOW_NUM, "code2",
                   "code", _R_UTF, address=True, bom=(t == BOM_YEAR))
    return Fmt("parquet", None, False, _PQ_H, "iso3", FLOW_ZH, "zh", "zh", _R_PQ)


def format_summary() -> dict:
    out = {}
    for label, t in (("2000-2001", 2000), ("2002-2006", 2002), ("2007-2011", 2007), ("2012-2016", 2012)):
        f = format_of_year(t)
        out[label] = {
            "kind": f.kind, "encoding": f.encoding, "monthly": f.monthly, "headers": f.headers,
            "partner": f.partner, "flow": {str(k): v for k, v in f.flow.items()}, "trade_mode": f.mode,
            "ownership": f.own, "dirt_reasons": list(f.reasons),
        }
    out["2002-2006"]["notes"] = (f"{GB18030_YEAR} is GB18030 with an extra 地址 column holding {NON_GBK_CHAR!r} "
                                 f"(outside GBK) in one firm's address; {SPLIT_YEAR} is split into 12 monthly files "
                                 "customs_<year>_m<month>.csv (month-13 dirt rows go to m12)")
    out["2007-2011"]["notes"] = (f"{BOM_YEAR} has a UTF-8 BOM; {EMPTY_REGION_SHARE:.0%} of the rows of single-plant "
                                 "firms have an empty region code (city from the address)")
    out["2000-2001"]["notes"] = "hs8, region, year, firm_type numeric (chapters 01-09 lose the leading zero)"
    return out


def render(u: Universe, t: int, rows: pl.DataFrame, fmt: Fmt, rng: np.random.Generator) -> pl.DataFrame:
    """Internal rows -> canonical string columns (raw text as written in this year's format)."""
    v = ref.vintage_of_year(t)
    firm = rows["firm"].to_numpy()
    h = rows["h"].to_numpy()
    part = rows["partner"].to_numpy()
    flow = rows["flow"].to_numpy()
    modes = rows["mode"].to_numpy().astype(str)
    pmap = {"iso3": u.p_iso3, "iso2": u.p_iso2, "zh": u.p_zh}[fmt.partner]
    mi = {"code4": 0, "zh": 1}.get(fmt.mode)
    mode_txt = modes if mi is None else np.array([TRADE_MODES[m][mi] for m in modes], dtype=object).astype(str)
    region = rows["region"].to_numpy().astype(object)
    if fmt.kind == "utf8":
        single = ~u.is_multiplant[firm]
        empty = single & (rng.random(len(firm)) < EMPTY_REGION_SHARE)
        region = np.where(empty, "", region)
    month = rows["month"].to_numpy()
    fi = rows["firm"]
    hi = rows["h"]

    def look(arr, idx: pl.Series) -> pl.Series:
        return pl.Series(np.asarray(arr).astype(str)).gather(idx)

    df = pl.DataFrame({
        "year": pl.repeat(str(t), len(firm), eager=True),
        "month": pl.Series(np.where(month > 0, month, 0)).cast(pl.String).replace("0", ""),
        "firm_id": look(u.firm_id, fi),
        "firm_name": look(u.firm_name, fi),
        "flow": pl.Series(flow).replace_strict({0: fmt.flow[0], 1: fmt.flow[1]}, return_dtype=pl.String),
        "hs_code": (look(u.hs6_by_vintage[v], hi) + rows["suffix"].cast(pl.String)),
        "partner": look(pmap, rows["partner"]),
        "trade_mode": pl.Series(mode_txt),
        "ownership": look(u.own_code.astype(str) if fmt.own == "code" else u.own_label, fi),
        "region_code": pl.Series(region.astype(str)),
        "address": look(u.firm_address, fi) if fmt.address else pl.repeat("", len(firm), eager=True),
        "value_usd": rows["value"].cast(pl.Int64).cast(pl.String),
        "quantity": rows["qty"].cast(pl.String),
        "unit": look(u.hs6_unit, hi),
    })
    return df


def _key_hash(df: pl.DataFrame) -> np.ndarray:
    return df.select(pl.concat_str([pl.col(c) for c in KEY], separator="\x1f").hash(seed=17)).to_series().to_numpy()


class DirtState:
    """Running counters so that every reason eligible for a format is used across the years."""

    def __init__(self) -> None:
        self.counter: dict[str, int] = {}


def unmapped_hs6_codes(u: Universe) -> list[str]:
    bad = []
    allc = ref.all_codes_any_vintage()
    for h4 in u.hs4:
        for sub in ("99", "98", "97", "89", "79", "59"):
            c = h4 + sub
            if c not in allc:
                bad.append(c)
                break
    return bad or ["970999"]


def unmapped_region_codes() -> list[str]:
    valid = ref.valid_region_prefixes()
    out = []
    for p in ("33", "44", "32", "37", "35"):
        for yy in ("99", "98", "97"):
            if p + yy not in valid:
                out.append(p + yy)
                break
    return out


def make_dirt(u: Universe, t: int, df: pl.DataFrame, fmt: Fmt, rng: np.random.Generator, state: DirtState,
              rate: float, min_per_year: int) -> tuple[pl.DataFrame, list[str], list[str], list[int]]:
    """Dirt rows (canonical strings), their expected reasons, details, and for exact duplicates the
    index of the copied real row (else -1)."""
    n = df.height
    target = max(min_per_year, int(round(rate * n)))
    E = fmt.reasons
    start = state.counter.get(fmt.kind, 0)
    if target < len(E):
        reasons = [E[(start + i) % len(E)] for i in range(target)]
        state.counter[fmt.kind] = start + target
    else:
        reasons = [E[i % len(E)] for i in range(target)]
    reasons.sort(key=E.index)
    hashes = np.sort(_key_hash(df))
    used: set[int] = set()
    # template rows: real rows of non-empty region (so a single rule is broken)
    elig = np.flatnonzero(df["region_code"].to_numpy() != "")
    bad_hs = unmapped_hs6_codes(u)
    bad_reg = unmapped_region_codes()
    unknown = ref.UNKNOWN_PARTNERS[fmt.partner]
    partners = {"iso3": u.p_iso3, "iso2": u.p_iso2, "zh": u.p_zh}[fmt.partner]
    out_rows: list[dict] = []
    out_reason: list[str] = []
    out_detail: list[str] = []
    out_src: list[int] = []
    cols = df.columns

    def template() -> tuple[int, dict]:
        i = int(elig[rng.integers(len(elig))])
        return i, dict(zip(cols, df.row(i)))

    def fresh(r: dict) -> dict:
        """Change the partner until the key is new (no real or earlier dirt row shares it)."""
        for _ in range(200):
            r["partner"] = str(partners[rng.integers(len(partners))])
            hv = _key_hash(pl.DataFrame({c: [r[c]] for c in cols}))[0]
            pos = np.searchsorted(hashes, hv)
            if (pos >= len(hashes) or hashes[pos] != hv) and int(hv) not in used:
                used.add(int(hv))
                return r
        raise RuntimeError("no fresh key found for a dirt row")

    for k, reason in enumerate(reasons):
        i, r = template()
        detail = ""
        src = -1
        if reason == "encoding_garbage":
            nm = r["firm_name"]
            r["firm_name"] = nm[:2] + GARBLE_MARK + nm[2:]
            r = fresh(r)
            detail = "undecodable bytes 0x80 0xFF in firm name"
        elif reason == "bad_year":
            r["year"] = str(t).replace("0", "O", 1)
            detail = f"year {r['year']!r}"
        elif reason == "year_mismatch":
            r["year"] = str(t - 1)
            detail = f"year {t - 1} in a {t} file"
        elif reason == "bad_month":
            r["month"] = "13"
            detail = "month 13"
        elif reason == "missing_firm_id":
            r["firm_id"] = ""
            detail = "empty firm id"
        elif reason == "bad_flow":
            r["flow"] = BAD_FLOW[fmt.kind]
            detail = f"flow {r['flow']!r}"
        elif reason == "bad_hs_code":
            hs = r["hs_code"]
            variants = (hs[:4] + "A" + hs[5:], hs[:3], hs + "12345")
            r["hs_code"] = variants[k % 3]
            detail = f"hs {r['hs_code']!r}"
        elif reason == "hs_unmapped":
            pool = [c for c in bad_hs if not (fmt.kind == "dta" and c.startswith("0"))] or ["970999"]
            r["hs_code"] = pool[rng.integers(len(pool))] + "00"
            r = fresh(r)
            detail = f"HS6 {r['hs_code'][:6]} in no vintage"
        elif reason == "bad_value":
            r["value_usd"] = ("N/A", "abc")[k % 2]
            r = fresh(r)
            detail = f"value {r['value_usd']!r}"
        elif reason == "nonpositive_value":
            r["value_usd"] = "0" if k % 2 == 0 else "-" + r["value_usd"]
            r = fresh(r)
            detail = f"value {r['value_usd']}"
        elif reason == "unknown_partner":
            r["partner"] = unknown
            detail = f"partner {unknown!r}"
        elif reason == "unmapped_region":
            r["region_code"] = bad_reg[rng.integers(len(bad_reg))] + str(rng.integers(10))
            r["address"] = ""
            detail = f"region {r['region_code']} (no city, no address)"
        elif reason == "duplicate_exact":
            src = i
            detail = "exact copy of a kept row (second copy)"
        elif reason == "duplicate_conflict":
            r = fresh(r)
            r2 = dict(r)
            v0 = int(r["value_usd"])
            r2["value_usd"] = str(int(v0 * 1.5) + 7)
            out_rows.append(r)
            out_reason.append(reason)
            out_detail.append("same key, different value (all copies)")
            out_src.append(-1)
            r = r2
            detail = "same key, different value (all copies)"
        out_rows.append(r)
        out_reason.append(reason)
        out_detail.append(detail)
        out_src.append(src)
    dirt = pl.DataFrame(out_rows, schema={c: pl.String for c in cols}) if out_rows else df.clear()
    return dirt, out_reason, out_detail, out_src


def place(df: pl.DataFrame, dirt: pl.DataFrame, src: list[int], rng: np.random.Generator) -> tuple[pl.DataFrame, np.ndarray, np.ndarray]:
    """Insert dirt rows at random positions. Returns the combined frame, the 0-based positions of
    the dirt rows, and the final positions of the real rows."""
    n, m = df.height, dirt.height
    N = n + m
    slots = np.sort(rng.choice(N, size=m, replace=False)) if m else np.empty(0, dtype=np.int64)
    perm_dirt = rng.permutation(m)
    is_dirt = np.zeros(N, dtype=bool)
    is_dirt[slots] = True
    real_pos = np.flatnonzero(~is_dirt)
    dirt_pos = np.empty(m, dtype=np.int64)
    dirt_pos[perm_dirt] = slots
    order = np.empty(N, dtype=np.int64)
    order[real_pos] = np.arange(n)
    order[dirt_pos] = n + np.arange(m)
    both = pl.concat([df, dirt]) if m else df
    out = both[order]
    # exact duplicates: the later of the two identical rows is the duplicate
    for j, s in enumerate(src):
        if s >= 0 and real_pos[s] > dirt_pos[j]:
            dirt_pos[j], real_pos[s] = real_pos[s], dirt_pos[j]
    return out, dirt_pos, real_pos


def _to_csv_bytes(df: pl.DataFrame, fmt: Fmt) -> bytes:
    cols = [c for c in fmt.headers]
    out = df.select([pl.col(c).alias(fmt.headers[c]) for c in cols])
    buf = io.BytesIO()
    out.write_csv(buf, quote_style="necessary")
    text = buf.getvalue().decode("utf-8")
    enc = fmt.encoding or "utf-8"
    b = text.encode(enc)
    if GARBLE_MARK.encode() in b:
        b = b.replace(GARBLE_MARK.encode(), GARBLE_BYTES)
    return b


def _write_dta(df: pl.DataFrame, path: Path, fmt: Fmt) -> None:
    import pandas as pd

    cols = [c for c in fmt.headers]
    d = {}
    for c in cols:
        s = df[c]
        name = fmt.headers[c]
        if c in ("year", "hs_code", "region_code"):
            d[name] = s.cast(pl.Int32).to_numpy()
        elif c == "ownership":
            d[name] = s.cast(pl.Int8).to_numpy()
        elif c in ("value_usd", "quantity"):
            d[name] = s.cast(pl.Float64).to_numpy()
        else:
            d[name] = pd.Series(s.to_list(), dtype=object)
    pdf = pd.DataFrame(d)
    pdf.to_stata(path, write_index=False, version=118, time_stamp=_dt.datetime(2020, 1, 1, 0, 0),
                 data_label="China customs (synthetic)")


def _write_parquet(df: pl.DataFrame, path: Path, fmt: Fmt) -> None:
    arrays, names = [], []
    for c in fmt.headers:
        s = df[c]
        if c == "year":
            a = pa.array(s.cast(pl.Int64).to_numpy(), type=pa.int64())
        elif c in ("value_usd", "quantity"):
            a = pa.array(s.cast(pl.Float64).to_numpy(), type=pa.float64())
        else:
            vals = s.to_list()
            if c == "firm_id":
                vals = [None if x == "" else x for x in vals]
            a = pa.array(vals, type=pa.string())
        arrays.append(a)
        names.append(fmt.headers[c])
    pq.write_table(pa.Table.from_arrays(arrays, names=names), path, compression="zstd", row_group_size=500_000)


def write_year(u: Universe, t: int, rows: pl.DataFrame, out: Path, state: DirtState) -> dict:
    """Render, dirty and write one year. Returns dirt records and counts."""
    fmt = format_of_year(t)
    rng = np.random.default_rng([u.seed, 505, t])
    if fmt.address and u.gb18030_firm < 0 and rows.height:
        # one single-plant manufacturer trading this year gets a non-GBK character in its address
        firms = np.unique(rows["firm"].to_numpy())
        cand = firms[~u.flagged[firms] & ~u.is_multiplant[firms]]
        if len(cand):
            f = int(cand[0])
            ci = u.firm_city[f]
            prov = "" if u.city_code[ci][:2] in ref.MUNICIPALITIES else u.city_prov_name[ci]
            u.firm_address[f] = f"{prov}{u.city_name[ci]}{NON_GBK_CHAR}头村{ROADS[0]}8号"
            u.gb18030_firm = f
    df = render(u, t, rows, fmt, rng)
    ydir = out / "customs" / str(t)
    ydir.mkdir(parents=True, exist_ok=True)
    dirt, reasons, details, src = make_dirt(u, t, df, fmt, rng, state, u.scale.dirt_rate, 5 if df.height < 5000 else 0)
    records: list[dict] = []
    files: dict[str, int] = {}
    if fmt.split_months:
        dm = dirt["month"].to_numpy().astype(object)
        groups = []
        for mth in range(1, 13):
            sel_real = df["month"] == str(mth)
            sel_d = np.flatnonzero((dm == str(mth)) | ((dm == "13") & (mth == 12)) | ((dm == "") & (mth == 12)))
            groups.append((f"customs_{t}_m{mth}.csv", df.filter(sel_real), np.flatnonzero(sel_real.to_numpy()), sel_d))
    else:
        ext = {"dta": "dta", "gbk": "csv", "utf8": "csv", "parquet": "parquet"}[fmt.kind]
        groups = [(f"customs_{t}.{ext}", df, np.arange(df.height), np.arange(dirt.height))]
    for fname, part, real_idx, dsel in groups:
        back = np.full(df.height, -1, dtype=np.int64)
        back[real_idx] = np.arange(len(real_idx))
        psrc = [int(back[src[j]]) if src[j] >= 0 else -1 for j in dsel]
        pdirt = dirt[dsel.tolist()] if len(dsel) else dirt.clear()
        combined, dpos, _ = place(part, pdirt, psrc, rng)
        path = ydir / fname
        if fmt.kind == "dta":
            _write_dta(combined, path, fmt)
        elif fmt.kind == "parquet":
            _write_parquet(combined, path, fmt)
        else:
            path.write_bytes(_to_csv_bytes(combined, fmt))
        rel = f"customs/{t}/{fname}"
        files[rel] = combined.height
        for k, j in enumerate(dsel):
            records.append({
                "year": t, "source_file": rel, "source_row": int(dpos[k]) + 1, "expected_reason": reasons[j],
                "detail": details[j], "firm_id": pdirt["firm_id"][k], "hs_code_raw": pdirt["hs_code"][k],
                "value_usd_raw": pdirt["value_usd"][k],
            })
    by_reason: dict[str, int] = {}
    for r in reasons:
        by_reason[r] = by_reason.get(r, 0) + 1
    counts = {
        "format": fmt.kind, "encoding": fmt.encoding, "files": files, "rows_written": int(sum(files.values())),
        "clean_rows": int(df.height), "dirt_rows": int(dirt.height), "dirt_by_reason": dict(sorted(by_reason.items())),
    }
    return {"records": records, "counts": counts}
