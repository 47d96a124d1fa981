"""Tests of the synthetic customs universe (kspill_pipeline.synthetic).

The planted structure is checked by an INDEPENDENT re-computation from the raw files: they are
re-read with pandas, headers resolved through data_contracts/customs_raw.yaml, dirt rows removed
by their recorded positions, and phi / densities rebuilt with plain Python loops.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections import defaultdict
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import pytest
import yaml

from kspill_pipeline.config import KEYWORD_PRESETS, REPO_ROOT
from kspill_pipeline.synthetic import generate

PROCESSING_MODES = {"来料加工装配贸易", "进料加工贸易", "14", "15", "0214", "0615"}
EXPORT = {"export", "出口", "0"}
IMPORT = {"import", "进口", "1"}
S000 = KEYWORD_PRESETS["s000"]


# ----------------------------------------------------------------------------- helpers


def _aliases() -> dict[str, str]:
    spec = yaml.safe_load((REPO_ROOT / "data_contracts" / "customs_raw.yaml").read_text(encoding="utf-8"))
    out = {}
    for c in spec["columns"]:
        for a in c["aliases"]:
            out[a.lower()] = c["name"]
    return out


ALIASES = _aliases()


def _hash_tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def read_raw(path: Path) -> pd.DataFrame:
    """One raw file -> canonical string columns (independent of the generator's writer)."""
    if path.suffix == ".dta":
        df = pd.read_stata(path, convert_categoricals=False)
    elif path.suffix == ".parquet":
        df = pd.read_parquet(path)
    else:
        raw = path.read_bytes()
        if raw.startswith(b"\xef\xbb\xbf"):
            text = raw.decode("utf-8-sig")
        else:
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("gb18030", errors="replace")
        df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    df = df.rename(columns={c: ALIASES[c.lower()] for c in df.columns})

    def to_str(v):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return ""
        if isinstance(v, (float, np.floating)) and float(v).is_integer():
            return str(int(v))
        return str(v)

    for c in df.columns:
        df[c] = [to_str(v) for v in df[c].tolist()]
    return df


def load_year(root: Path, year: int, with_dirt: bool = False) -> pd.DataFrame:
    dirt = pl.read_parquet(root / "_truth" / "dirt.parquet")
    frames = []
    for p in sorted((root / "customs" / str(year)).iterdir()):
        rel = f"customs/{year}/{p.name}"
        df = read_raw(p)
        df["source_file"] = rel
        df["source_row"] = np.arange(1, len(df) + 1)
        bad = set(dirt.filter(pl.col("source_file") == rel)["source_row"].to_list())
        df["is_dirt"] = df["source_row"].isin(bad)
        frames.append(df)
    df = pd.concat(frames, ignore_index=True)
    return df if with_dirt else df[~df["is_dirt"]].reset_index(drop=True)


def hs6_of(hs: str) -> str:
    return hs.zfill(8)[:6]


def _concordance_single_target() -> dict[str, dict[str, str]]:
    """Independent single_target chain (polars joins) HS1996/HS2002/HS2012 -> HS2007."""
    import importlib.util

    spec = importlib.util.find_spec("atlas_common_data")
    d = Path(next(iter(spec.submodule_search_locations))) / "data" / "conversion_weights"

    def rd(a, b):
        return pl.read_csv(d / f"conversion_weights_H{a}_to_H{b}.csv", schema_overrides={f"H{a}": pl.String, f"H{b}": pl.String}).select(
            pl.col(f"H{a}").str.zfill(6).alias("s"), pl.col(f"H{b}").str.zfill(6).alias("t"), pl.col("weight").alias("w")
        ).filter(pl.col("w") > 0)

    def best(ch):
        return dict(ch.sort(["s", "w", "t"], descending=[False, True, False]).group_by("s", maintain_order=True).first().select("s", "t").iter_rows())

    w12, w23, w43 = rd(1, 2), rd(2, 3), rd(4, 3)
    ch13 = (w12.join(w23.rename({"s": "m", "t": "t2", "w": "w2"}), left_on="t", right_on="m")
            .group_by("s", "t2").agg((pl.col("w") * pl.col("w2")).sum().alias("w")).rename({"t2": "t"}))
    return {"HS1996": best(ch13), "HS2002": best(w23.group_by("s", "t").agg(pl.col("w").sum())),
            "HS2012": best(w43.group_by("s", "t").agg(pl.col("w").sum()))}


def vintage(year: int) -> str:
    return "HS1996" if year <= 2001 else "HS2002" if year <= 2006 else "HS2007" if year <= 2011 else "HS2012"


def clean_presence(root: Path, year: int, conc, firms: pd.DataFrame):
    """Clean S000 sample of a year: non-keyword firms, non-processing rows, dirt removed.
    Returns (exports: firm -> set(hs4), imports: firm -> set(hs4), firm -> city)."""
    df = load_year(root, year)
    v = vintage(year)
    flagged = {r.firm_id for r in firms.itertuples() if any(k in r.firm_name for k in S000)}
    exp, imp = defaultdict(set), defaultdict(set)
    city_val: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for r in df.itertuples():
        if r.firm_id in flagged or r.trade_mode in PROCESSING_MODES:
            continue
        h6 = hs6_of(r.hs_code)
        h6 = h6 if v == "HS2007" else conc[v][h6]
        val = float(r.value_usd)
        assert val > 0
        if r.flow in EXPORT:
            exp[r.firm_id].add(h6[:4])
        elif r.flow in IMPORT:
            imp[r.firm_id].add(h6[:4])
        else:
            raise AssertionError(r.flow)
        reg = r.region_code
        city = reg[:4] + "00" if reg[:2] not in ("11", "12", "31", "50") else reg[:2] + "0100"
        city_val[r.firm_id][city] += val
    loc = {f: sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[0][0] for f, c in city_val.items()}
    return exp, imp, loc


# ----------------------------------------------------------------------------- determinism


def test_same_seed_identical_files_different_seed_differs(tiny_universe, tmp_path):
    a = generate(tmp_path / "a", scale="tiny", seed=7)
    ha, h0 = _hash_tree(a), _hash_tree(tiny_universe)
    assert ha == h0
    b = generate(tmp_path / "b", scale="tiny", seed=8)
    hb = _hash_tree(b)
    raw = [k for k in ha if k.startswith("customs/")]
    assert len(raw) == 12 + 16
    differing = [k for k in raw if hb.get(k) != ha[k]]
    assert len(differing) >= len(raw) - 1


def test_regenerate_into_same_dir_is_identical(tmp_path):
    out = tmp_path / "u"
    generate(out, scale="tiny", seed=3, years=(2011, 2013))
    h1 = _hash_tree(out)
    generate(out, scale="tiny", seed=3, years=(2011, 2013))
    assert _hash_tree(out) == h1


def test_refuses_to_overwrite_foreign_dir(tmp_path):
    (tmp_path / "x" / "customs").mkdir(parents=True)
    (tmp_path / "x" / "customs" / "keep.csv").write_text("a\n")
    with pytest.raises(FileExistsError):
        generate(tmp_path / "x", scale="tiny", seed=1)


# ----------------------------------------------------------------------------- layout, formats


def test_layout_and_source_yaml(tiny_universe):
    src = yaml.safe_load((tiny_universe / "source.yaml").read_text(encoding="utf-8"))
    assert src["name"] == "synthetic-tiny"
    assert src["years"] == {"start": 2000, "end": 2016}
    assert src["customs_dir"] == "customs" and src["companion_dir"] == "companion"
    assert src["generator"]["scale"] == "tiny" and src["generator"]["seed"] == 7
    for y in range(2000, 2017):
        files = list((tiny_universe / "customs" / str(y)).iterdir())
        assert files and all(str(y) in f.name for f in files)
    assert len(list((tiny_universe / "customs" / "2003").iterdir())) == 12
    for f in ("planted.json", "firms.parquet", "export_status.parquet", "quality.parquet", "dirt.parquet",
              "expected_counts.json"):
        assert (tiny_universe / "_truth" / f).is_file()


def test_formats(tiny_universe):
    c = tiny_universe / "customs"
    # Stata: English headers, numeric hs8 with lost leading zeros for chapters 01-09
    d = pd.read_stata(c / "2000" / "customs_2000.dta")
    assert {"firm_code", "company_name", "import_export", "hs8", "country", "value", "region"} <= set(d.columns)
    assert pd.api.types.is_integer_dtype(d["hs8"]) and pd.api.types.is_float_dtype(d["value"])
    assert (d["hs8"].astype(str).str.len() == 7).any()
    assert d["company_name"].str.contains("有限公司").any()
    # GBK: not UTF-8, decodes as GBK (except the garbage bytes)
    g = (c / "2002" / "customs_2002.csv").read_bytes()
    with pytest.raises(UnicodeDecodeError):
        g.decode("utf-8")
    head = g.split(b"\n", 1)[0].decode("gbk")
    assert head.split(",")[:3] == ["企业编码", "企业名称", "进出口"]
    # GB18030 year: a character outside GBK
    g5 = (c / "2005" / "customs_2005.csv").read_bytes()
    with pytest.raises(UnicodeEncodeError):
        "㙟".encode("gbk")
    t5 = g5.decode("gb18030")
    assert "㙟" in t5 and "\ufffd" not in t5
    with pytest.raises(UnicodeDecodeError):
        g5.decode("gbk")
    # monthly rows
    m = read_raw(c / "2004" / "customs_2004.csv")
    assert set(m["month"]) - {"13"} <= {str(i) for i in range(1, 13)} and m["month"].nunique() >= 10
    # UTF-8 with BOM in 2009, without in 2008; numeric flow codes; ISO2
    assert (c / "2009" / "customs_2009.csv").read_bytes().startswith(b"\xef\xbb\xbf")
    u8 = (c / "2008" / "customs_2008.csv").read_bytes()
    assert not u8.startswith(b"\xef\xbb\xbf")
    u = read_raw(c / "2008" / "customs_2008.csv")
    assert set(u["flow"]) <= {"0", "1", "2"} and {"0", "1"} <= set(u["flow"])
    assert (u["partner"].str.len() == 2).mean() > 0.98
    uc = load_year(tiny_universe, 2008)
    assert (uc["region_code"] == "").any() and (uc["address"].str.len() > 5).all()
    # parquet: Chinese headers
    import pyarrow.parquet as pq

    names = pq.read_schema(c / "2014" / "customs_2014.parquet").names
    assert "企业代码" in names and "金额(美元)" in names
    # every header is an accepted alias of customs_raw.yaml
    heads = [list(pd.read_stata(c / "2001" / "customs_2001.dta").columns), names,
             pd.read_csv(c / "2009" / "customs_2009.csv", nrows=0, encoding="utf-8-sig").columns.tolist(),
             pd.read_csv(io.BytesIO(g5.split(b"\n", 1)[0]), encoding="gb18030").columns.tolist()]
    for h in heads:
        assert all(x.lower() in ALIASES for x in h), h


def test_hs_codes_round_trip_to_hs2007(tiny_universe):
    conc = _concordance_single_target()
    products = pl.read_parquet(tiny_universe / "_truth" / "products.parquet")
    for v in ("HS1996", "HS2002", "HS2012"):
        for raw, target in zip(products[f"hs6_{v}"], products["hs6"]):
            assert conc[v][raw] == target, (v, raw, target)
    renamed = sum(
        any(r[f"hs6_{v}"] != r["hs6"] for v in ("HS1996", "HS2002", "HS2012")) for r in products.iter_rows(named=True)
    )
    assert renamed >= 2
    assert not products["hs6"].str.slice(0, 2).is_in(["98", "99"]).any()
    # every clean raw code of every year maps into the product list
    allowed = set(products["hs6"])
    for y in (2001, 2004, 2008, 2015):
        df = load_year(tiny_universe, y)
        v = vintage(y)
        for hs in df["hs_code"]:
            h6 = hs6_of(hs)
            assert (h6 if v == "HS2007" else conc[v][h6]) in allowed


def test_sigma_companion(tiny_universe):
    s = pl.read_csv(tiny_universe / "companion" / "sigma_hs3.csv", schema_overrides={"hs3": pl.String})
    assert (s["sigma"] > 1).all() and s["hs3"].str.len_chars().eq(3).all()
    products = pl.read_parquet(tiny_universe / "_truth" / "products.parquet")
    assert set(products["hs6"].str.slice(0, 3)) <= set(s["hs3"])


# ----------------------------------------------------------------------------- planted structure


@pytest.mark.parametrize("year", [2003, 2013])
def test_densities_and_export_status_recomputed_from_raw(tiny_universe, year):
    conc = _concordance_single_target()
    firms = pl.read_parquet(tiny_universe / "_truth" / "firms.parquet").to_pandas()
    exp_prev, _, _ = clean_presence(tiny_universe, year - 1, conc, firms)
    exp, imp, loc = clean_presence(tiny_universe, year, conc, firms)
    # phi_{t-1} by loops
    N: dict[str, int] = defaultdict(int)
    C: dict[tuple[str, str], int] = defaultdict(int)
    for s in exp_prev.values():
        for p in s:
            N[p] += 1
        for p, q in combinations(sorted(s), 2):
            C[p, q] += 1
            C[q, p] += 1
    U = sorted(N)

    def phi(p, q):
        return 1.0 if p == q else C.get((p, q), 0) / max(N[p], N[q])

    city_basket: dict[str, set] = defaultdict(set)
    for f, s in imp.items():
        city_basket[loc[f]] |= s

    def dens(basket, p):
        num = sum(phi(p, q) for q in U if q in basket)
        return num / sum(phi(p, q) for q in U)

    truth = pl.read_parquet(tiny_universe / "_truth" / "export_status.parquet").filter(pl.col("year") == year)
    cand_truth = truth.filter(pl.col("candidate"))
    mine = {}
    for f, basket in imp.items():
        for p in U:
            df_ = dens(basket, p)
            if df_ > 0.05:
                mine[f, p] = (df_, dens(city_basket[loc[f]], p), int(p in exp.get(f, set())))
    assert len(mine) > 50
    tr = {(r["firm_id"], r["hs4"]): (r["density_firm"], r["density_city"], r["exported"]) for r in cand_truth.iter_rows(named=True)}
    assert set(tr) == set(mine)
    for k, (a, b, e) in mine.items():
        ta, tb, te = tr[k]
        assert abs(a - ta) < 1e-9 and abs(b - tb) < 1e-9
        assert e == te, k
    # non-candidate exported pairs in the truth are exactly the other clean exports
    non = truth.filter(~pl.col("candidate"))
    clean_pairs = {(f, p) for f, s in exp.items() for p in s}
    assert {(r["firm_id"], r["hs4"]) for r in non.iter_rows(named=True)} == clean_pairs - set(mine)
    # the export rate among candidates is neither 0 nor 1
    rate = np.mean([e for (_, _, e) in mine.values()])
    assert 0.02 < rate < 0.6


def test_planted_probit_signs_recovered(tiny_universe):
    """Pooled probit on the truth (statsmodels): density_firm > 0; interaction planted negative."""
    sm = pytest.importorskip("statsmodels.api")
    planted = json.loads((tiny_universe / "_truth" / "planted.json").read_text(encoding="utf-8"))["s000_mechanism"]
    assert planted["b1_density_firm"] > 0 and planted["b2_density_city"] > 0 and planted["b3_interaction"] < 0
    t = pl.read_parquet(tiny_universe / "_truth" / "export_status.parquet").filter(pl.col("candidate")).to_pandas()
    X = np.column_stack([np.ones(len(t)), t["density_firm"], t["density_city"]])
    res = sm.Probit(t["exported"].to_numpy(), X).fit(disp=0)
    assert res.params[1] > 0
    # latent index recorded in the truth reproduces the planted formula
    ye, ce = planted["year_effects"], planted["hs2_effects"]
    lat = (planted["b0"] + planted["b1_density_firm"] * t["density_firm"] + planted["b2_density_city"] * t["density_city"]
           + planted["b3_interaction"] * t["density_firm"] * t["density_city"]
           + t["year"].astype(str).map(ye) + t["hs2"].map(ce))
    assert np.allclose(lat, t["latent"])


def test_coexport_concentrated_within_clusters(tiny_universe):
    conc = _concordance_single_target()
    firms = pl.read_parquet(tiny_universe / "_truth" / "firms.parquet").to_pandas()
    products = pl.read_parquet(tiny_universe / "_truth" / "products.parquet")
    cl = dict(zip(products["hs4"], products["cluster"]))
    same = tot = 0
    freq: dict[int, int] = defaultdict(int)
    for y in (2008, 2014):
        exp, _, _ = clean_presence(tiny_universe, y, conc, firms)
        for s in exp.values():
            for p in s:
                freq[cl[p]] += 1
            for p, q in combinations(sorted(s), 2):
                tot += 1
                same += cl[p] == cl[q]
    share = same / tot
    n = sum(freq.values())
    random_share = sum((k / n) ** 2 for k in freq.values())
    assert tot > 30
    assert share > 2 * random_share, (share, random_share)


def test_imports_related_to_exports(tiny_universe):
    firms = pl.read_parquet(tiny_universe / "_truth" / "firms.parquet")
    products = pl.read_parquet(tiny_universe / "_truth" / "products.parquet")
    cl = dict(zip(products["hs4"], products["cluster"]))
    conc = _concordance_single_target()
    _, imp, _ = clean_presence(tiny_universe, 2010, conc, firms.to_pandas())
    home = dict(zip(firms["firm_id"], firms["cluster"]))
    inp = dict(zip(firms["firm_id"], firms["input_cluster"]))
    hits = sum(cl[q] in (home[f], inp[f]) for f, s in imp.items() for q in s)
    total = sum(len(s) for s in imp.values())
    assert hits / total > 0.75


def test_firm_structure(tiny_universe):
    firms = pl.read_parquet(tiny_universe / "_truth" / "firms.parquet")
    assert firms["firm_id"].str.contains(r"^\d{10}$").all() and firms["firm_id"].n_unique() == firms.height
    assert firms["firm_name"].n_unique() == firms.height
    share_int = firms["is_intermediary"].mean()
    assert 0.08 < share_int < 0.3
    # every intermediary is flagged by the S000 list; false positives are flagged manufacturers
    assert (firms.filter(pl.col("is_intermediary"))["keyword_flag"]).all()
    fp = firms.filter(pl.col("is_false_positive_ezone"))
    assert fp.height >= 1 and fp["firm_name"].str.contains("出口加工区").all() and fp["keyword_flag"].all()
    assert not firms.filter(~pl.col("is_intermediary") & ~pl.col("is_false_positive_ezone"))["keyword_flag"].any()
    for name in firms["firm_name"]:
        assert any(k in name for k in KEYWORD_PRESETS["union"]) == any(k in name for k in S000)
    assert firms["is_multiplant"].sum() >= 2 and firms["is_processing_trader"].mean() > 0.05
    # multi-plant firms: same id and name with rows in >= 2 cities in one year
    mp = set(firms.filter(pl.col("is_multiplant"))["firm_id"])
    seen = False
    for y in (2012, 2013, 2014, 2015, 2016):
        df = load_year(tiny_universe, y)
        g = df[df["firm_id"].isin(mp)].groupby("firm_id")["region_code"].agg(lambda s: len({x[:4] for x in s}))
        seen |= bool((g >= 2).any())
    assert seen
    # region codes point at real prefectures; Zipf-like city concentration
    cities = pl.read_parquet(tiny_universe / "_truth" / "cities.parquet")
    r4 = set(cities["region4"])
    assert all(r[:4] in r4 for rs in firms["region_codes"] for r in rs)
    top = firms.group_by("city_code").len().sort("len", descending=True)["len"]
    assert top[0] >= 3 * top[-1]


def test_quality_ces_recoverable(tiny_universe):
    """KSW with sigma imposed on the truth flows: residual of (ln q + sigma ln p) on HS6 and
    partner-year means correlates strongly with the planted ln_lambda."""
    q = pl.read_parquet(tiny_universe / "_truth" / "quality.parquet").filter(pl.col("trade_mode_class") != "processing")
    assert (q["value_usd"] > 0).all() and (q["quantity"] > 0).all()
    assert np.allclose(q["price"], q["value_usd"] / q["quantity"])
    d = q.with_columns(
        (pl.col("quantity").log() + pl.col("sigma") * pl.col("price").log()).alias("y"),
        (pl.col("partner_iso3") + pl.col("year").cast(pl.String)).alias("dt"),
    ).to_pandas()
    y = d["y"].to_numpy().copy()
    for _ in range(30):
        y = y - d.assign(y=y).groupby("hs6")["y"].transform("mean").to_numpy()
        y = y - d.assign(y=y).groupby("dt")["y"].transform("mean").to_numpy()
    qual = y / (d["sigma"].to_numpy() - 1)
    rho = pd.Series(qual).rank().corr(pd.Series(d["ln_lambda"].to_numpy()).rank())
    assert rho > 0.6, rho


# ----------------------------------------------------------------------------- dirt


def test_dirt_positions_and_reasons(tiny_universe):
    dirt = pl.read_parquet(tiny_universe / "_truth" / "dirt.parquet")
    allowed = yaml.safe_load((REPO_ROOT / "data_contracts" / "trade_quarantine.yaml").read_text(encoding="utf-8"))
    reasons = next(c for c in allowed["columns"] if c["name"] == "reason")["allowed"]
    assert set(dirt["expected_reason"]) <= set(reasons)
    expected_all = set(reasons) - {"bad_quantity"}
    assert set(dirt["expected_reason"]) == expected_all
    counts = json.loads((tiny_universe / "_truth" / "expected_counts.json").read_text(encoding="utf-8"))
    total_rows = sum(c["rows_written"] for c in counts.values())
    assert 0.003 < dirt.height / total_rows < 0.03
    key = ["year", "month", "firm_id", "flow", "hs_code", "partner", "trade_mode", "region_code", "unit"]
    prefixes = set(pl.read_parquet(tiny_universe / "_truth" / "cities.parquet")["region4"])
    for y in range(2000, 2017):
        df = load_year(tiny_universe, y, with_dirt=True)
        c = counts[str(y)]
        assert len(df) == c["rows_written"] and df["is_dirt"].sum() == c["dirt_rows"]
        for col in key:
            if col not in df.columns:
                df[col] = ""
        df["year"] = df["year"].where(df["year"] != "", str(y))
        clean = df[~df["is_dirt"]]
        # clean rows break no rule
        assert not clean["firm_name"].str.contains("\ufffd").any()
        assert (clean["year"] == str(y)).all() and clean["firm_id"].str.len().eq(10).all()
        assert clean["value_usd"].astype(float).gt(0).all()
        assert clean.duplicated(subset=key).sum() == 0
        assert clean["region_code"].map(lambda r: r == "" or r[:4] in prefixes).all()
        dd = dirt.filter(pl.col("year") == y)
        for r in dd.iter_rows(named=True):
            row = df[(df["source_file"] == r["source_file"]) & (df["source_row"] == r["source_row"])].iloc[0]
            assert row["firm_id"] == (r["firm_id"] or "")
            rs = r["expected_reason"]
            others = df[(df.index != row.name)]
            if rs == "encoding_garbage":
                assert "\ufffd" in row["firm_name"]
            elif rs == "bad_year":
                assert not row["year"].isdigit()
            elif rs == "year_mismatch":
                assert row["year"] == str(y - 1)
            elif rs == "bad_month":
                assert row["month"] == "13"
            elif rs == "missing_firm_id":
                assert row["firm_id"] == ""
            elif rs == "bad_flow":
                assert row["flow"] not in EXPORT | IMPORT
            elif rs == "bad_hs_code":
                assert not (row["hs_code"].isdigit() and len(row["hs_code"]) in (7, 8))
            elif rs == "hs_unmapped":
                conc = _concordance_single_target() if "conc" not in locals() else conc
                h6 = hs6_of(row["hs_code"])
                assert row["hs_code"].isdigit() and all(h6 not in m for m in conc.values())
            elif rs == "bad_value":
                with pytest.raises(ValueError):
                    float(row["value_usd"])
            elif rs == "nonpositive_value":
                assert float(row["value_usd"]) <= 0
            elif rs == "unknown_partner":
                assert row["partner"] in ("QQQ", "QQ", "火星")
            elif rs == "unmapped_region":
                assert row["region_code"][:4] not in prefixes and row.get("address", "") == ""
            elif rs == "duplicate_exact":
                same = (others[key + ["value_usd", "quantity", "firm_name"]] == row[key + ["value_usd", "quantity", "firm_name"]]).all(axis=1)
                earlier = others[same]
                assert len(earlier) == 1 and not earlier["is_dirt"].iloc[0]
                assert earlier["source_file"].iloc[0] == row["source_file"]
                assert earlier["source_row"].iloc[0] < row["source_row"]
            elif rs == "duplicate_conflict":
                same = (others[key] == row[key]).all(axis=1)
                mates = others[same]
                assert len(mates) >= 1 and mates["is_dirt"].all()
                assert (mates["value_usd"] != row["value_usd"]).all()


def test_full_scale_one_year_bounded(tmp_path):
    """Full universe (all usable HS6, all prefectures) with a reduced firm pool, two years."""
    out = generate(tmp_path / "full", scale="full", seed=2, years=(2011, 2012), n_firms=3000)
    planted = json.loads((out / "_truth" / "planted.json").read_text(encoding="utf-8"))
    assert planted["universe"]["n_hs6"] > 4000 and planted["universe"]["n_cities"] > 330
    assert planted["year_stats"]["2012"]["candidates"] > 0
    files = sorted(p.name for p in (out / "customs").rglob("*") if p.is_file())
    assert files == ["customs_2011.csv", "customs_2012.parquet"]


def test_bad_scale_rejected(tmp_path):
    with pytest.raises(ValueError):
        generate(tmp_path, scale="huge")
