"""The chunked cleaning path (bounded memory) gives exactly the single-shot result.

``clean_customs_chunked`` applies rules 1-13 per chunk and duplicates, firm-year attributes,
concordance and the annual aggregation once on the compact kept rows; ``clean_customs`` does all of
it on the whole year. Same rows, values (to 1e-12 relative: sums may add in another order), same
quarantine (rows, order, reasons, details) and report.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from kspill_pipeline.compute.cleaning import CleanResult, clean_customs, clean_customs_chunked
from kspill_pipeline.config import CleaningConfig
from kspill_pipeline.io.raw import discover_files, iter_customs_file, read_customs_file

REL = 1e-12

CONFIGS = {
    "default": CleaningConfig(),
    "value_split_per_row": CleaningConfig(hs_mode="value_split", ownership_rule="per_row"),
    "sum_no_address": CleaningConfig(duplicate_policy="sum", address_fallback=False),
}


def assert_same(a: CleanResult, b: CleanResult) -> None:
    assert a.clean.height > 0
    assert_frame_equal(a.clean, b.clean, check_exact=False, rel_tol=REL, abs_tol=0)
    assert_frame_equal(a.quarantine, b.quarantine)  # exact: same rows, order, reasons, details
    assert_frame_equal(a.report, b.report, check_exact=False, rel_tol=REL, abs_tol=0)
    assert a.accounting.keys() == b.accounting.keys()
    for k, v in a.accounting.items():
        if isinstance(v, float):
            assert b.accounting[k] == pytest.approx(v, rel=REL, abs=0), k
        else:
            assert b.accounting[k] == v, k
    assert b.accounting["identity_rows_ok"] and b.accounting["identity_value_ok"]


def _single_shot(data: Path, year: int, cfg: CleaningConfig) -> CleanResult:
    frames = []
    for f in discover_files(data)[year]:
        rf = read_customs_file(f, data)
        frames.append(rf.df.with_columns(pl.lit(rf.numeric_hs).alias("source_numeric_hs")))
    return clean_customs(pl.concat(frames, how="vertical_relaxed"), year, cfg)


def _chunked(data: Path, year: int, cfg: CleaningConfig, batch_rows: int, chunk_rows: int) -> CleanResult:
    def batches():
        for f in discover_files(data)[year]:
            for rf in iter_customs_file(f, data, batch_rows=batch_rows):
                yield rf.df.with_columns(pl.lit(rf.numeric_hs).alias("source_numeric_hs"))

    return clean_customs_chunked(batches(), year, cfg, chunk_rows=chunk_rows)


def _dups_across_chunks(res: CleanResult, chunk_rows: int) -> int:
    """Exact duplicates whose first copy lies at least ``chunk_rows`` records earlier in the file."""
    q = res.quarantine.filter(pl.col("reason") == "duplicate_exact").with_columns(
        pl.col("rule_detail").str.extract(r"source_row (\d+)").cast(pl.Int64).alias("_first")
    )
    return q.filter(pl.col("source_row") - pl.col("_first") >= chunk_rows).height


# ------------------------------------------------------------------------------------------------
# synthetic universes: every format and year layout the generator writes
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg_name", list(CONFIGS))
def test_chunked_equals_single_shot_tiny(tiny_universe, cfg_name):
    cfg = CONFIGS[cfg_name]
    files = discover_files(tiny_universe)
    n_dups_split = 0
    n_multi_file = 0
    for year in files:
        ref = _single_shot(tiny_universe, year, cfg)
        res = _chunked(tiny_universe, year, cfg, batch_rows=53, chunk_rows=17)
        assert_same(ref, res)
        n_dups_split += _dups_across_chunks(ref, 17)
        n_multi_file += len(files[year]) > 1
    if cfg.duplicate_policy == "quarantine_conflicts":
        assert n_dups_split > 0, "no duplicate split across chunks: the test would not exercise rule 14"
    assert n_multi_file > 0, "no year with several (monthly) files"


@pytest.fixture(scope="module")
def demo_two_years(tmp_path_factory) -> Path:
    from kspill_pipeline.synthetic import generate

    out = tmp_path_factory.mktemp("demo_2004_2005")
    generate(out, "demo", 1, years=(2004, 2005))
    return out


@pytest.mark.parametrize("year", [2004, 2005])
@pytest.mark.parametrize("cfg_name", ["default", "value_split_per_row"])
def test_chunked_equals_single_shot_demo(demo_two_years, year, cfg_name):
    cfg = CONFIGS[cfg_name]
    ref = _single_shot(demo_two_years, year, cfg)
    res = _chunked(demo_two_years, year, cfg, batch_rows=4_000, chunk_rows=1_500)
    assert_same(ref, res)
    assert ref.accounting["quarantine_by_reason"]["duplicate_exact"] > 0
    assert _dups_across_chunks(ref, 1_500) > 0


# ------------------------------------------------------------------------------------------------
# hand-made rows: duplicates split across chunks, monthly rows of one key across files
# ------------------------------------------------------------------------------------------------

BASE = {
    "year": "2010", "month": None, "firm_id": "F1", "firm_name": "深圳市某某电子制造有限公司", "flow": "出口",
    "hs_code": "85171200", "partner": "USA", "trade_mode": "一般贸易", "ownership": "私营企业",
    "region_code": "44031", "city": None, "address": None, "value_usd": "100", "quantity": "10", "unit": "台",
}


def _file(name: str, *rows: dict) -> pl.DataFrame:
    return pl.DataFrame([{**BASE, **r} for r in rows], schema={k: pl.String for k in BASE}).with_columns(
        pl.lit(name).alias("source_file"), pl.int_range(1, pl.len() + 1, dtype=pl.Int64).alias("source_row"),
    )


def _monthly_files() -> list[pl.DataFrame]:
    jan = _file(
        "m01.csv",
        {"month": "1", "value_usd": "100"},                                     # key A, January
        {"month": "1", "firm_id": "F2", "value_usd": "7"},                      # exact dup first copy
        {"month": "1", "firm_id": "F3", "value_usd": "5"},                      # conflict, copy 1
        {"month": "1", "firm_id": "F4", "hs_code": "x"},                        # bad_hs_code
        {"month": "1", "firm_id": "F5", "firm_name": "宁波进出口贸易有限公司", "value_usd": "9"},
    )
    feb = _file(
        "m02.csv",
        {"month": "2", "value_usd": "200"},                                     # key A, February
        {"month": "1", "firm_id": "F3", "value_usd": "6"},                      # conflict, copy 2
        {"month": "2", "firm_id": "F5", "firm_name": "宁波进出口贸易有限公司", "value_usd": "1"},
    )
    mar = _file(
        "m03.csv",
        {"month": "3", "value_usd": "300"},                                     # key A, March
        {"month": "1", "firm_id": "F2", "value_usd": "7"},                      # exact dup of m01 row 2
        {"month": "1", "firm_id": "F2", "value_usd": "7"},                      # another exact copy
        {"month": "3", "firm_id": "F5", "firm_name": "宁波某某制造厂", "value_usd": "1"},
        {"month": "13", "firm_id": "F6"},                                       # bad_month
    )
    return [jan, feb, mar]


@pytest.mark.parametrize("chunk_rows", [1, 2, 3, 100])
def test_duplicates_and_months_across_chunks_and_files(chunk_rows):
    files = _monthly_files()
    cfg = CleaningConfig()
    ref = clean_customs(pl.concat(files), 2010, cfg)
    res = clean_customs_chunked(iter(files), 2010, cfg, chunk_rows=chunk_rows)
    assert_same(ref, res)
    q = res.quarantine
    assert q.select("source_file", "source_row", "reason").rows() == [
        ("m01.csv", 3, "duplicate_conflict"),
        ("m01.csv", 4, "bad_hs_code"),
        ("m02.csv", 2, "duplicate_conflict"),
        ("m03.csv", 2, "duplicate_exact"),
        ("m03.csv", 3, "duplicate_exact"),
        ("m03.csv", 5, "bad_month"),
    ]
    assert q.filter(pl.col("reason") == "duplicate_exact")["rule_detail"].to_list() == [
        "exact copy of an earlier row (source_row 2)"
    ] * 2
    a = res.clean.filter(pl.col("firm_id") == "F1").row(0, named=True)
    assert (a["value_usd"], a["n_months"], a["source_rows"]) == (600.0, 3, 3.0)
    # firm-year canonical name from rows in all files: 2 x 进出口贸易 vs 1 x 制造厂
    f5 = res.clean.filter(pl.col("firm_id") == "F5")
    assert f5["is_intermediary"].all() and f5["value_usd"].sum() == 11.0


def test_chunked_sum_policy_and_empty_input():
    files = _monthly_files()
    cfg = CleaningConfig(duplicate_policy="sum")
    assert_same(clean_customs(pl.concat(files), 2010, cfg), clean_customs_chunked(files, 2010, cfg, chunk_rows=2))
    empty = files[0].head(0)
    ref = clean_customs(empty, 2010)
    res = clean_customs_chunked([empty], 2010)
    assert res.clean.height == 0 and res.quarantine.height == 0
    assert_frame_equal(ref.clean, res.clean)
    assert_frame_equal(ref.quarantine, res.quarantine)
    assert_frame_equal(ref.report, res.report)
    assert clean_customs_chunked([], 2010).clean.schema == ref.clean.schema


def test_chunked_numbers_rows_without_source_row_like_single_shot():
    df = pl.concat(_monthly_files()).drop("source_row")
    assert_same(clean_customs(df, 2010), clean_customs_chunked([df.head(4), df.slice(4)], 2010, chunk_rows=3))
