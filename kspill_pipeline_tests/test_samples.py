"""Study samples and firm -> city assignment on hand-made trade_clean rows."""

import polars as pl

from kspill_pipeline.compute.samples import firm_main_city, study_sample, unit_product_values


def _rows():
    return pl.DataFrame(
        {
            "year": [2005] * 7,
            "firm_id": ["A", "A", "B", "C", "C", "D", "D"],
            "city_code": ["110100", "310100", "310100", "440300", "440300", "330200", "330100"],
            "flow": ["export", "export", "export", "import", "export", "export", "import"],
            "hs4": ["0101", "0101", "8501", "8501", "8502", "0101", "0101"],
            "value_usd": [10.0, 30.0, 5.0, 7.0, 8.0, 4.0, 4.0],
            "trade_mode_class": ["ordinary", "processing", "ordinary", "ordinary", "ordinary", "ordinary", "other"],
            "partner_is_hk": [False, False, True, False, False, False, False],
            "intermediary_keywords": [[], [], ["进出口", "出口", "进口"], [], [], ["经贸"], ["经贸"]],
        }
    ).lazy()


def test_s000_drops_keyword_firms_and_processing_transactions():
    out = study_sample(_rows(), "s000").collect()
    # B (进出口) dropped; A's processing row dropped; D's 经贸 is not an S000 keyword -> kept
    assert sorted(zip(out["firm_id"], out["value_usd"])) == [("A", 10.0), ("C", 7.0), ("C", 8.0), ("D", 4.0), ("D", 4.0)]


def test_s000_firm_level_processing_drop():
    out = study_sample(_rows(), "s000", processing_drop_level="firm").collect()
    assert "A" not in out["firm_id"].to_list()


def test_s001_drops_hk_exports_and_its_keywords():
    out = study_sample(_rows(), "s001").collect()
    assert set(out["firm_id"]) == {"A", "C"}  # B (进出口) and D (经贸) dropped
    assert out["value_usd"].sum() == 10 + 30 + 7 + 8


def test_firm_main_city_largest_value_and_count():
    out = firm_main_city(_rows()).collect().sort("firm_id")
    got = dict(zip(out["firm_id"], zip(out["city_code"], out["n_cities"])))
    assert got["A"] == ("310100", 2)  # 30 > 10
    assert got["D"] == ("330100", 2)  # tie 4 = 4 -> lowest code
    assert got["C"] == ("440300", 1)


def test_unit_product_values_sums_by_flow():
    out = unit_product_values(_rows(), unit="firm_id", level="hs4", flow="export").collect().sort("firm_id")
    assert out.filter(pl.col("firm_id") == "A")["value"].item() == 40.0
    assert set(out.columns) == {"year", "firm_id", "product", "value"}
