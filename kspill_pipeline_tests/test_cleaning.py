"""Cleaning rules on small hand-made rows (expected numbers derived by hand in the comments)."""

from __future__ import annotations

import csv
import hashlib
import unicodedata
from pathlib import Path

import polars as pl
import pytest
import yaml

from kspill_pipeline.compute.cleaning import REASONS, CleanResult, clean_customs
from kspill_pipeline.config import KEYWORD_PRESETS, CleaningConfig

REPO = Path(__file__).resolve().parent.parent
YEAR = 2010  # HS2007 in force; target HS2007 by default -> identity concordance

BASE = {
    "year": "2010", "month": "1", "firm_id": "F1", "firm_name": "深圳市某某电子制造有限公司", "flow": "出口",
    "hs_code": "85171200", "partner": "USA", "trade_mode": "一般贸易", "ownership": "私营企业",
    "region_code": "44031", "city": None, "address": None, "value_usd": "100", "quantity": "10", "unit": "台",
}


def frame(*rows: dict, **extra_cols) -> pl.DataFrame:
    recs = [{**BASE, **r} for r in rows]
    df = pl.DataFrame(recs, schema={k: pl.String for k in BASE})
    df = df.with_columns(
        pl.lit("raw_2010.csv").alias("source_file"),
        pl.int_range(1, pl.len() + 1, dtype=pl.Int64).alias("source_row"),
    )
    for k, v in extra_cols.items():
        df = df.with_columns(pl.Series(k, v))
    return df


def run(*rows: dict, cfg: CleaningConfig | None = None, **kw) -> CleanResult:
    return clean_customs(frame(*rows), YEAR, cfg or CleaningConfig(), **kw)


def reasons(res: CleanResult) -> list[str]:
    return res.quarantine.sort("source_row")["reason"].to_list()


# ------------------------------------------------------------------------------------------------
# schemas match the contracts exactly
# ------------------------------------------------------------------------------------------------

_TYPES = {"string": pl.String, "int32": pl.Int32, "int64": pl.Int64, "int16": pl.Int16,
          "float64": pl.Float64, "bool": pl.Boolean, "list[string]": pl.List(pl.String)}


@pytest.mark.parametrize("attr,contract", [("clean", "trade_clean"), ("quarantine", "trade_quarantine"),
                                           ("report", "trade_cleaning_report")])
def test_outputs_match_contracts(attr, contract):
    spec = yaml.safe_load((REPO / "data_contracts" / f"{contract}.yaml").read_text(encoding="utf-8"))
    res = run({}, {"value_usd": "x"})
    df = getattr(res, attr)
    assert df.columns == [c["name"] for c in spec["columns"]]
    assert df.dtypes == [_TYPES[c["type"]] for c in spec["columns"]]
    for c in spec["columns"]:
        if not c.get("nullable", True):
            assert df[c["name"]].null_count() == 0, c["name"]
        if "allowed" in c:
            assert set(df[c["name"]].drop_nulls().to_list()) <= set(c["allowed"]), c["name"]


def test_quarantine_reasons_cover_contract():
    spec = yaml.safe_load((REPO / "data_contracts" / "trade_quarantine.yaml").read_text(encoding="utf-8"))
    allowed = next(c["allowed"] for c in spec["columns"] if c["name"] == "reason")
    assert list(REASONS) == allowed


# ------------------------------------------------------------------------------------------------
# each rule
# ------------------------------------------------------------------------------------------------

GBK_GARBAGE = "中国".encode("gbk").decode("latin-1")  # 'ÖÐ¹ú': GBK bytes read as Latin-1
UTF8_AS_LATIN1 = "贸易".encode("utf-8").decode("latin-1")
REPLACEMENT = "中国".encode("gbk").decode("utf-8", errors="replace")  # GBK read as UTF-8 -> U+FFFD


@pytest.mark.parametrize(
    "override,reason",
    [
        ({"firm_name": GBK_GARBAGE + "有限公司"}, "encoding_garbage"),
        ({"firm_name": UTF8_AS_LATIN1}, "encoding_garbage"),
        ({"address": REPLACEMENT}, "encoding_garbage"),
        ({"partner": "锟斤拷"}, "encoding_garbage"),
        ({"year": "2010a"}, "bad_year"),
        ({"year": "2010.5"}, "bad_year"),
        ({"year": "2009"}, "year_mismatch"),
        ({"month": "13"}, "bad_month"),
        ({"month": "0"}, "bad_month"),
        ({"month": "Jan"}, "bad_month"),
        ({"firm_id": None}, "missing_firm_id"),
        ({"firm_id": "   "}, "missing_firm_id"),
        ({"flow": "转口"}, "bad_flow"),
        ({"flow": None}, "bad_flow"),
        ({"flow": "2"}, "bad_flow"),
        ({"hs_code": "851712"}, "bad_hs_code"),
        ({"hs_code": "851712000"}, "bad_hs_code"),
        ({"hs_code": "8517120A"}, "bad_hs_code"),
        ({"hs_code": "77010000"}, "hs_unmapped"),  # chapter 77 is reserved in HS
        ({"hs_code": "85252000"}, "hs_unmapped"),  # 852520 is HS2002 (phones); HS2007 moved it to 8517
        ({"value_usd": "abc"}, "bad_value"),
        ({"value_usd": None}, "bad_value"),
        ({"value_usd": "nan"}, "bad_value"),
        ({"value_usd": "0"}, "nonpositive_value"),
        ({"value_usd": "-5"}, "nonpositive_value"),
        ({"quantity": "-1"}, "bad_quantity"),
        ({"quantity": "lots"}, "bad_quantity"),
        ({"partner": "999"}, "unknown_partner"),
        ({"partner": "Atlantis"}, "unknown_partner"),
        ({"region_code": "99991"}, "unmapped_region"),
        ({"region_code": None}, "unmapped_region"),
    ],
)
def test_single_rule(override, reason):
    res = run({}, override)
    assert reasons(res) == [reason]
    assert res.clean["source_rows"].sum() == 1.0  # the first (valid) row is kept


def test_valid_variants_are_kept():
    res = run({"year": None}, {"year": "2010.0", "firm_id": "F2"}, {"month": "201003", "firm_id": "F3"},
              {"month": None, "firm_id": "F4"}, {"quantity": None, "firm_id": "F5"},
              {"value_usd": "1,234.5", "firm_id": "F6"}, {"hs_code": "8517.12.00", "firm_id": "F7"},
              {"flow": "E", "firm_id": "F8"}, {"flow": "X", "firm_id": "F9"}, {"flow": "imp", "firm_id": "F10"})
    assert res.quarantine.height == 0
    assert res.clean.height == 10
    got = dict(zip(res.clean["firm_id"], res.clean["value_usd"]))
    assert got["F6"] == 1234.5
    flows = dict(zip(res.clean["firm_id"], res.clean["flow"]))
    assert flows["F8"] == "export" and flows["F9"] == "export" and flows["F10"] == "import"


def test_rule_order_precedence():
    res = run(
        {"year": "20x0", "flow": "??", "hs_code": "1"},                    # bad_year beats bad_flow, bad_hs
        {"year": "2011", "firm_id": None},                                  # year_mismatch before firm id
        {"firm_name": GBK_GARBAGE, "year": "bad", "value_usd": "-1"},       # garbage first of all
        {"hs_code": "12", "value_usd": "abc"},                              # bad_hs_code before bad_value
        {"value_usd": "-3", "partner": "999", "region_code": "99991"},      # nonpositive before partner
        {"partner": "999", "region_code": "99991"},                         # partner before region
        {"month": "14", "firm_id": None},                                   # month before firm id
    )
    assert reasons(res) == ["bad_year", "year_mismatch", "encoding_garbage", "bad_hs_code",
                            "nonpositive_value", "unknown_partner", "bad_month"]


def test_quarantine_never_stores_firm_names():
    name = "机密名称贸易有限公司"
    res = run({"firm_name": name, "value_usd": "x"}, {"firm_name": name + GBK_GARBAGE})
    for df in (res.quarantine, res.report, res.clean):
        for c in df.columns:
            if df[c].dtype == pl.String:
                assert not df[c].str.contains("机密", literal=True).any()
    assert "firm_name" not in res.quarantine.columns
    assert res.quarantine.filter(pl.col("reason") == "encoding_garbage")["rule_detail"].to_list() == [
        "mojibake/replacement characters in field(s): firm_name"
    ]


# ------------------------------------------------------------------------------------------------
# HS code padding and truncation
# ------------------------------------------------------------------------------------------------

def test_seven_digit_codes_are_padded_and_recorded():
    # 0101.10 (pure-bred horses) exists in HS2007; the leading zero was lost
    res = run({"hs_code": "1011000"}, {"hs_code": "1011000", "firm_id": "F2", "partner": "JPN"})
    assert res.quarantine.height == 0
    assert res.clean["hs8_raw"].to_list() == ["01011000", "01011000"]
    assert res.clean["hs6"].to_list() == ["010110", "010110"]
    assert res.accounting["hs7_padded_rows"] == 2
    assert res.accounting["hs7_padded_text_rows"] == 2
    flag = res.report.filter(pl.col("rule") == "flag:hs7_padded")
    assert flag["rows"].to_list() == [2.0]


def test_numeric_hs_column():
    df = frame({"hs_code": "1011000.0"}, {"hs_code": "85171200.0", "firm_id": "F2"},
               source_numeric_hs=[True, True])
    res = clean_customs(df, YEAR, CleaningConfig())
    assert res.quarantine.height == 0
    assert sorted(res.clean["hs8_raw"].to_list()) == ["01011000", "85171200"]
    assert res.accounting["hs7_padded_rows"] == 1 and res.accounting["hs7_padded_text_rows"] == 0
    res2 = run({"hs_code": "1011000"}, source_numeric_hs=True)
    assert res2.accounting["hs7_padded_text_rows"] == 0


def test_ten_digit_codes_keep_first_eight():
    res = run({"hs_code": "8517120010"})
    assert res.clean["hs8_raw"].to_list() == ["85171200"]
    assert res.accounting["hs10_truncated_rows"] == 1


# ------------------------------------------------------------------------------------------------
# flows
# ------------------------------------------------------------------------------------------------

def test_numeric_flow_codes_default_and_configured():
    res = run({"flow": "0"}, {"flow": "1", "firm_id": "F2"})
    assert dict(zip(res.clean["firm_id"], res.clean["flow"])) == {"F1": "export", "F2": "import"}
    cfg = CleaningConfig(flow_codes={"1": "export", "2": "import"})
    res = run({"flow": "1"}, {"flow": "2", "firm_id": "F2"}, {"flow": "0", "firm_id": "F3"}, cfg=cfg)
    assert dict(zip(res.clean["firm_id"], res.clean["flow"])) == {"F1": "export", "F2": "import"}
    assert reasons(res) == ["bad_flow"]


# ------------------------------------------------------------------------------------------------
# monthly aggregation and duplicates
# ------------------------------------------------------------------------------------------------

def test_months_aggregate_to_year():
    res = run({"month": "1", "value_usd": "10", "quantity": "1"},
              {"month": "2", "value_usd": "20", "quantity": "2"},
              {"month": "3", "value_usd": "30", "quantity": None},
              {"month": None, "firm_id": "F2", "value_usd": "7", "quantity": None})
    c = res.clean.sort("firm_id")
    assert c.height == 2
    # F1: 10 + 20 + 30 = 60 over 3 months, quantity 1 + 2 (month 3 missing) = 3
    assert c.row(0, named=True)["value_usd"] == 60.0
    assert c.row(0, named=True)["n_months"] == 3
    assert c.row(0, named=True)["source_rows"] == 3.0
    assert c.row(0, named=True)["quantity"] == 3.0
    # F2: one annual row, quantity missing in every month -> null
    assert c.row(1, named=True)["n_months"] == 1 and c.row(1, named=True)["quantity"] is None


def test_duplicates_exact_and_conflict():
    res = run(
        {"month": "1"}, {"month": "1"}, {"month": "1"},                      # 3 identical -> keep 1
        {"month": "2", "value_usd": "5"}, {"month": "2", "value_usd": "6"},  # conflict -> both out
        {"month": "3", "quantity": "1"}, {"month": "3", "quantity": "2"},    # quantity conflict
        {"month": "4", "flow": "export"}, {"month": "4", "flow": "出口"},     # same normalised key
    )
    assert reasons(res) == ["duplicate_exact", "duplicate_exact", "duplicate_conflict", "duplicate_conflict",
                            "duplicate_conflict", "duplicate_conflict", "duplicate_exact"]
    q = res.quarantine.sort("source_row")
    assert q["source_row"].to_list() == [2, 3, 4, 5, 6, 7, 9]
    assert q["rule_detail"][0] == "exact copy of an earlier row (source_row 1)"
    # kept: row 1 (month 1, 100) and row 8 (month 4, 100) -> one annual row of 200 over 2 months
    assert res.clean["value_usd"].to_list() == [200.0]
    assert res.clean["n_months"].to_list() == [2]
    assert res.accounting["identity_rows_ok"] and res.accounting["identity_value_ok"]


def test_duplicates_sum_policy():
    cfg = CleaningConfig(duplicate_policy="sum")
    res = run({"month": "1"}, {"month": "1"}, {"month": "1", "value_usd": "5"}, cfg=cfg)
    assert res.quarantine.height == 0
    assert res.clean["value_usd"].to_list() == [205.0]
    assert res.clean["source_rows"].to_list() == [3.0]
    assert res.clean["n_months"].to_list() == [1]


def test_duplicates_ignore_rows_already_quarantined():
    res = run({"month": "1"}, {"month": "1", "quantity": "-1"})
    assert reasons(res) == ["bad_quantity"]


# ------------------------------------------------------------------------------------------------
# concordance amounts
# ------------------------------------------------------------------------------------------------

def _gl_weights(shared: Path, code: str) -> dict[str, float]:
    with open(shared / "hs_concordance" / "conversion_weights_H3_to_H2.csv", newline="") as f:
        return {r["H2"].zfill(6): float(r["weight"]) for r in csv.DictReader(f)
                if r["H3"].zfill(6) == code and float(r["weight"]) > 0}


def test_value_split_vs_single_target(shared_data):
    # HS2007 010594 (fowls > 185 g) splits into HS2002 010592 / 010593 (Growth Lab H3->H2 weights)
    w = _gl_weights(shared_data, "010594")
    assert len(w) == 2
    rows = ({"hs_code": "01059400", "value_usd": "1000", "quantity": "50"},)
    vs = run(*rows, cfg=CleaningConfig(hs_target_vintage="HS2002", hs_mode="value_split"))
    got = dict(zip(vs.clean["hs6"], vs.clean["value_usd"]))
    assert set(got) == set(w)
    for t, wt in w.items():
        assert got[t] == pytest.approx(1000 * wt, rel=1e-12)
    q = dict(zip(vs.clean["hs6"], vs.clean["quantity"]))
    assert q[max(w, key=w.get)] == pytest.approx(50 * max(w.values()), rel=1e-12)
    assert vs.clean["source_rows"].sum() == pytest.approx(1.0, rel=1e-12)
    assert set(vs.clean["hs8_raw"]) == {"01059400"} and set(vs.clean["hs_vintage_raw"]) == {"HS2007"}
    st = run(*rows, cfg=CleaningConfig(hs_target_vintage="HS2002", hs_mode="single_target"))
    assert st.clean["hs6"].to_list() == [max(w, key=w.get)]
    assert st.clean["value_usd"].to_list() == [1000.0]
    assert st.clean["hs_split_weight"].to_list() == [1.0]
    for r in (vs, st):
        assert r.accounting["identity_rows_ok"] and r.accounting["identity_value_ok"]


def test_year_vintage_drives_concordance():
    # 2005 is HS2002: 852520 (mobile phones, HS2002) -> HS2007 851712 per the 2007 revision
    df = frame({"year": "2005", "hs_code": "85252000"})
    res = clean_customs(df, 2005, CleaningConfig())
    assert res.quarantine.height == 0
    assert res.clean["hs_vintage_raw"].to_list() == ["HS2002"]
    assert res.clean["hs6"].to_list() == ["851712"]


# ------------------------------------------------------------------------------------------------
# accounting identities
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["single_target", "value_split"])
def test_accounting_identities(mode):
    rows = [
        {"value_usd": "100"}, {"value_usd": "250.5", "month": "2"}, {"value_usd": "abc", "month": "3"},
        {"value_usd": "-4", "month": "4"}, {"value_usd": "7", "partner": "999", "month": "5"},
        {"value_usd": "11", "month": "6"}, {"value_usd": "12", "month": "6"},
        {"value_usd": "1e3", "hs_code": "01059400", "month": "7"},
    ]
    res = run(*rows, cfg=CleaningConfig(hs_target_vintage="HS2002", hs_mode=mode))
    a = res.accounting
    # by hand: parseable = 100 + 250.5 - 4 + 7 + 11 + 12 + 1000 = 1376.5 ("abc" is not parseable)
    assert a["rows_read"] == 8 and a["value_read"] == pytest.approx(1376.5)
    # quarantined: abc (bad_value), -4, 999 partner, the 11/12 conflict pair -> 5 rows, -4+7+11+12 = 26
    assert a["rows_quarantined"] == 5 and a["value_quarantined"] == pytest.approx(26.0)
    assert a["rows_kept"] == pytest.approx(3.0, rel=1e-12)
    assert a["value_kept"] == pytest.approx(1350.5, rel=1e-12)
    assert a["identity_rows_ok"] and a["identity_value_ok"]
    rep = {r["rule"]: r for r in res.report.iter_rows(named=True)}
    assert rep["read"]["rows"] == 8 and rep["quarantined"]["rows"] == 5
    assert rep["quarantine:duplicate_conflict"]["rows"] == 2
    assert rep["quarantine:duplicate_conflict"]["value_usd"] == pytest.approx(23.0)
    assert rep["quarantine:bad_value"]["value_usd"] == 0.0
    assert rep["kept"]["share_value"] == pytest.approx(1350.5 / 1376.5)
    assert len([r for r in rep if r.startswith("quarantine:")]) == len(REASONS)


# ------------------------------------------------------------------------------------------------
# firm attributes
# ------------------------------------------------------------------------------------------------

def test_ownership_largest_value_per_firm_year():
    rows = (
        {"ownership": "国有企业", "value_usd": "100", "partner": "USA"},
        {"ownership": "外商独资企业", "value_usd": "60", "partner": "JPN"},
        {"ownership": "中外合资企业", "value_usd": "50", "partner": "KOR"},   # foreign total 110 > soe 100
        {"ownership": None, "value_usd": "1000", "partner": "DEU"},          # missing: no vote
        {"firm_id": "F2", "ownership": None},                                # no class at all -> other
    )
    res = run(*rows)
    own = dict(zip(res.clean["firm_id"] + "/" + res.clean["partner_iso3"], res.clean["ownership_class"]))
    assert {k: v for k, v in own.items() if k.startswith("F1")} == {
        "F1/USA": "foreign", "F1/JPN": "foreign", "F1/KOR": "foreign", "F1/DEU": "foreign"}
    assert own["F2/USA"] == "other"
    per_row = run(*rows, cfg=CleaningConfig(ownership_rule="per_row"))
    own = dict(zip(per_row.clean["firm_id"] + "/" + per_row.clean["partner_iso3"], per_row.clean["ownership_class"]))
    assert own["F1/USA"] == "soe" and own["F1/JPN"] == "foreign" and own["F1/DEU"] == "other"


def test_firm_name_hash():
    res = run({"firm_name": " 深圳 某某 公司 "}, {"firm_id": "F2", "firm_name": "ＡＢＣ公司"},
              {"firm_id": "F3", "firm_name": None})
    h = dict(zip(res.clean["firm_id"], res.clean["firm_name_hash"]))
    assert h["F1"] == hashlib.sha256("深圳某某公司".encode()).hexdigest()[:16]
    assert h["F2"] == hashlib.sha256("ABC公司".encode()).hexdigest()[:16]  # NFKC: full-width -> ASCII
    assert h["F3"] is None
    assert unicodedata.normalize("NFKC", "ＡＢＣ") == "ABC"


def test_intermediary_keywords_and_export_processing_zone_false_positive():
    rows = (
        {"firm_id": "T", "firm_name": "宁波某某进出口有限公司"},
        {"firm_id": "Z", "firm_name": "苏州出口加工区某某电子有限公司"},   # 出口加工区: flagged (as in the papers)
        {"firm_id": "K", "firm_name": "北京某某科贸有限公司"},
        {"firm_id": "M", "firm_name": "某某机械制造有限公司"},
    )
    res = run(*rows)
    kw = {f: sorted(k) for f, k in zip(res.clean["firm_id"], res.clean["intermediary_keywords"].to_list())}
    # 进出口 contains 出口 but not the contiguous 进口
    assert kw == {"T": sorted(["进出口", "出口"]), "Z": ["出口"], "K": ["科贸"], "M": []}
    inter = dict(zip(res.clean["firm_id"], res.clean["is_intermediary"]))
    assert inter == {"T": True, "Z": True, "K": True, "M": False}
    s001 = run(*rows, cfg=CleaningConfig(intermediary_keywords=list(KEYWORD_PRESETS["s001"])))
    inter = dict(zip(s001.clean["firm_id"], s001.clean["is_intermediary"]))
    assert inter == {"T": True, "Z": False, "K": True, "M": False}  # S001 list has no 出口
    rep = {r["rule"]: r for r in res.report.iter_rows(named=True)}
    assert rep["flag:keyword:出口"]["rows"] == 2 and rep["flag:keyword:科贸"]["rows"] == 1
    assert rep["flag:intermediary"]["rows"] == 3 and rep["flag:intermediary"]["value_usd"] == 300.0


def test_processing_and_hk_flags():
    res = run({"trade_mode": "进料加工贸易", "partner": "香港"},
              {"trade_mode": "14", "firm_id": "F2"},
              {"trade_mode": "保税仓库进出境货物", "firm_id": "F3", "partner": "344"})
    cls = dict(zip(res.clean["firm_id"], res.clean["trade_mode_class"]))
    assert cls == {"F1": "processing", "F2": "processing", "F3": "other"}
    assert dict(zip(res.clean["firm_id"], res.clean["partner_iso3"])) == {"F1": "HKG", "F2": "USA", "F3": "RUS"}
    assert dict(zip(res.clean["firm_id"], res.clean["partner_is_hk"])) == {"F1": True, "F2": False, "F3": False}
    rep = {r["rule"]: r for r in res.report.iter_rows(named=True)}
    assert rep["flag:processing"]["rows"] == 2 and rep["flag:partner_hk"]["rows"] == 1
    assert rep["flag:partner_hk"]["share_rows"] == pytest.approx(1 / 3)


# ------------------------------------------------------------------------------------------------
# location
# ------------------------------------------------------------------------------------------------

def test_location_sources():
    res = run(
        {"firm_id": "R", "region_code": "44031"},
        {"firm_id": "X", "region_code": "52221"},                                   # 铜仁地区 -> 520600
        {"firm_id": "N", "region_code": None, "city": "苏州市"},
        {"firm_id": "A", "region_code": "99991", "address": "浙江省杭州市西湖区文三路"},
        {"firm_id": "B", "region_code": "11051"},                                   # Beijing district
    )
    c = {r["firm_id"]: r for r in res.clean.iter_rows(named=True)}
    assert (c["R"]["city_code"], c["R"]["city_source"], c["R"]["region_code"]) == ("440300", "region_code", "44031")
    assert (c["X"]["city_code"], c["X"]["city_source"], c["X"]["province_code"]) == ("520600", "region_crosswalk", "52")
    assert (c["N"]["city_code"], c["N"]["city_source"]) == ("320500", "city_name")
    assert (c["A"]["city_code"], c["A"]["city_source"], c["A"]["region_code"]) == ("330100", "address", None)
    assert (c["B"]["city_code"], c["B"]["macro_region"]) == ("110100", "east")
    assert c["X"]["macro_region"] == "west"


def test_address_fallback_switch():
    row = {"region_code": "99991", "address": "浙江省杭州市西湖区文三路"}
    assert reasons(run(row, cfg=CleaningConfig(address_fallback=False))) == ["unmapped_region"]
    assert reasons(run(row)) == []


def test_empty_input():
    res = clean_customs(frame({}).head(0), YEAR, CleaningConfig())
    assert res.clean.height == 0 and res.quarantine.height == 0
    assert res.accounting["rows_read"] == 0 and res.accounting["identity_rows_ok"]


def test_missing_columns_are_treated_as_null():
    df = frame({}).drop("city", "address", "quantity", "ownership", "month", "year")
    res = clean_customs(df, YEAR, CleaningConfig())
    assert res.clean.height == 1 and res.clean["quantity"].to_list() == [None]
    assert res.clean["ownership_class"].to_list() == ["other"]
