"""S004 non-customs inputs: synthetic generator -> files -> readers -> contracts (issue 6).

The generated tables are checked with the independent contract checker
(``contracts.checks.run_contract_checks``); planted vagg is recomputed from the written files with a
plain loop; corrupted files must fail with an error naming file, row and rule.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from kspill_pipeline.contracts.checks import run_contract_checks
from kspill_pipeline.contracts.loader import load_contract
from kspill_pipeline.io import s004_inputs as rd
from kspill_pipeline.reference.admin import prefectures
from kspill_pipeline.studies import s004_indices as ix
from kspill_pipeline.synthetic import s004_inputs as gen


def _mini_universe(src: Path, dst: Path) -> Path:
    """The parts of a universe the S004 generator reads (keeps the shared fixture untouched)."""
    (dst / "_truth").mkdir(parents=True)
    shutil.copy(src / "source.yaml", dst / "source.yaml")
    for f in ("cities.parquet", "products.parquet"):
        shutil.copy(src / "_truth" / f, dst / "_truth" / f)
    return dst


@pytest.fixture(scope="module")
def s004_universe(tiny_universe, tmp_path_factory) -> Path:
    d = _mini_universe(tiny_universe, tmp_path_factory.mktemp("s004u"))
    gen.generate_s004_inputs(d, seed=7)
    return d


@pytest.fixture(scope="module")
def inputs(s004_universe) -> dict[str, pl.DataFrame | None]:
    return rd.read_s004_inputs(s004_universe)


def _hash_dir(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


# --------------------------------------------------------------------------------------------------
# generated tables satisfy their contracts
# --------------------------------------------------------------------------------------------------
def test_every_table_written_and_passes_its_contract(s004_universe, inputs):
    folder = rd.companion_s004_dir(s004_universe)
    assert folder == s004_universe / "companion" / "s004"
    assert set(inputs) == set(rd.TABLES)
    refs = {"ref_prefecture": prefectures()}
    for table, df in inputs.items():
        assert df is not None and df.height > 0, table
        contract = load_contract(rd.TABLES[table].contract)
        outcomes = run_contract_checks(contract, df, context=refs)
        failed = [(o.name, o.metadata) for o in outcomes if not o.passed]
        assert not failed, (table, failed)
    cities = sorted(pl.read_parquet(s004_universe / "_truth" / "cities.parquet")["city_code"].to_list())
    cc = inputs["city_controls"]
    assert sorted(cc["city_code"].unique().to_list()) == cities
    assert cc.height == len(cities) * 17  # tiny universe: 2000-2016
    # the national series covers the year before the first study year (one-year lag)
    assert inputs["internet_investment"]["year"].min() == 1999


def test_chinese_headers_and_encodings_are_mapped(s004_universe):
    folder = rd.companion_s004_dir(s004_universe)
    f = rd.read_s004_file(folder / "city_controls.csv", "city_controls")
    assert f.encoding == "utf-8-sig"
    assert f.header_map["城市代码"] == "city_code" and f.header_map["固定资产投资占GDP比重"] == "fixinv"
    assert f.header_map["居民消费价格指数(上年=100)"] == "deflator_chain"
    assert f.df["deflator_index"].null_count() == f.df.height  # column absent -> all null
    cpi = rd.read_s004_file(folder / "city_cpi.csv", "city_cpi")
    assert cpi.encoding.startswith("gb18030")
    assert sorted(cpi.df["category"].unique().to_list()) == sorted(ix.CPI_CATEGORIES)
    bo = rd.read_s004_file(folder / "base_output.parquet", "base_output")
    assert bo.format == "parquet" and bo.df["base_year"].unique().to_list() == [2004]


def test_hand_written_gbk_file_with_aliases_separators_and_blank_rows(tmp_path):
    d = tmp_path / "data"
    (d / "companion" / "s004").mkdir(parents=True)
    text = ("城市代码,年份,固定资产投资,职工平均工资,居民消费价格指数(上年=100),备注\n"
            "110100000000,2005,0.5,\"12,400\",101.5,甲\n"
            ",,,,,\n"
            "120100.0,2005,—,9800,{defl},乙\n")
    path = d / "companion" / "s004" / "city_controls.csv"
    path.write_bytes(text.format(defl="99.8").encode("gbk"))
    f = rd.read_s004_file(path, "city_controls", data_dir=d)
    assert f.encoding == "gb18030" and f.ignored_columns == ["备注"] and f.n_blank_rows == 1
    # 12-digit adcode and a float-looking code are normalised; "12,400" -> 12400; "—" -> null
    assert f.df["city_code"].to_list() == ["110100", "120100"]
    assert f.df["wage_nominal"].to_list() == [12400.0, 9800.0]
    assert f.df["fixinv"].to_list() == [0.5, None]
    assert f.df["deflator_chain"].to_list() == [101.5, 99.8]
    # without a deflator the row is named by a table rule (data row 3: the blank record is row 2)
    path.write_bytes(text.format(defl="NA").encode("gbk"))
    with pytest.raises(rd.S004InputError) as e:
        rd.read_s004_input(d, "city_controls")
    assert e.value.rows == [3] and e.value.rule == "deflator_index_or_deflator_chain"
    assert "companion/s004/city_controls.csv" in str(e.value)


# --------------------------------------------------------------------------------------------------
# planted structure
# --------------------------------------------------------------------------------------------------
def test_planted_vagg_equals_vagg_from_the_files(s004_universe, inputs):
    pv = gen.planted_vagg(s004_universe)
    assert pv.columns == ["city_code", "year", "vagg"]
    v = ix.vagg(inputs["base_output"], inputs["digital_coef"])
    j = pv.join(v, on=["city_code", "year"], suffix="_files")
    assert j.height == pv.height == v.height
    assert (j["vagg"] - j["vagg_files"]).abs().max() < 1e-12
    # independent recomputation of one city-year straight from the files with a plain loop (Eq. 22)
    folder = rd.companion_s004_dir(s004_universe)
    bo = pl.read_parquet(folder / "base_output.parquet").filter(pl.col("city_code") == "110100")
    dc = pl.read_csv(folder / "digital_coef.csv", schema_overrides={"sector": pl.String})
    dc = dc.filter((pl.col("country") == "CHN") & (pl.col("origin") == "total") & (pl.col("year") == 2010))
    total = sum(bo["output"].to_list())
    expect = 0.0
    for sec, out in zip(bo["sector"].to_list(), bo["output"].to_list()):
        rows = dc.filter(pl.col("sector") == sec)
        expect += out / total * sum(c * s for c, s in zip(rows["coef"].to_list(), rows["split_coef"].to_list()))
    assert pv.filter((pl.col("city_code") == "110100") & (pl.col("year") == 2010))["vagg"][0] == pytest.approx(
        expect, rel=1e-12)
    planted = json.loads((s004_universe / "_truth" / "s004_planted.json").read_text(encoding="utf-8"))
    assert planted["beta_vagg"] == gen.BETA_VAGG and planted["seed"] == 7
    sh = gen.planted_ln_lambda_shift(pv["city_code"].unique().to_list(), (2000, 2016), 7)
    # shift = BETA * two-way demeaned vagg: zero mean within every city and every year
    assert sh.group_by("city_code").agg(pl.col("ln_lambda_shift").mean())["ln_lambda_shift"].abs().max() < 1e-12
    assert sh.group_by("year").agg(pl.col("ln_lambda_shift").mean())["ln_lambda_shift"].abs().max() < 1e-12


def _twoway_first_stage(df: pl.DataFrame, x: str, z: str) -> tuple[float, float]:
    """Partial R2 and F of z in x ~ z + city + year dummies (numpy lstsq with dummies)."""
    d = df.drop_nulls([x, z]).sort("city_code", "year")
    cities = {c: i for i, c in enumerate(sorted(d["city_code"].unique().to_list()))}
    years = {y: i for i, y in enumerate(sorted(d["year"].unique().to_list()))}
    n = d.height
    D = np.zeros((n, len(cities) + len(years) - 1))
    for r, (c, y) in enumerate(zip(d["city_code"].to_list(), d["year"].to_list())):
        D[r, cities[c]] = 1.0
        if years[y] > 0:
            D[r, len(cities) + years[y] - 1] = 1.0
    xv, zv = d[x].to_numpy(), d[z].to_numpy()
    rr = xv - D @ np.linalg.lstsq(D, xv, rcond=None)[0]          # restricted residual
    full = np.column_stack([D, zv])
    ru = xv - full @ np.linalg.lstsq(full, xv, rcond=None)[0]    # unrestricted residual
    dof = n - full.shape[1]
    f = ((rr @ rr - ru @ ru) / 1) / ((ru @ ru) / dof)
    return 1 - (ru @ ru) / (rr @ rr), f


def test_historical_instruments_strong_but_not_perfect(inputs):
    v = ix.vagg(inputs["base_output"], inputs["digital_coef"])
    iv = ix.historical_iv(inputs["iv1984"], inputs["internet_investment"], years=list(range(2000, 2017)))
    df = v.join(iv, on=["city_code", "year"])
    for z in ("iv_tel", "iv_post"):
        r2, f = _twoway_first_stage(df, "vagg", z)
        assert f > 10, (z, f)           # strong ...
        assert r2 < 0.95, (z, r2)       # ... but not perfect


def test_generator_is_deterministic_and_seed_dependent(tiny_universe, tmp_path):
    a = _mini_universe(tiny_universe, tmp_path / "a")
    b = _mini_universe(tiny_universe, tmp_path / "b")
    c = _mini_universe(tiny_universe, tmp_path / "c")
    ha = _hash_dir(gen.generate_s004_inputs(a, seed=7))
    hb = _hash_dir(gen.generate_s004_inputs(b, seed=7))
    hc = _hash_dir(gen.generate_s004_inputs(c, seed=8))
    assert ha == hb
    assert ha["digital_coef.csv"] != hc["digital_coef.csv"]
    # a city's planted vagg does not depend on which other cities the universe has
    full = gen.planted_vagg_frame(["110100", "440300"], (2005, 2006), 7)
    one = gen.planted_vagg_frame(["440300"], (2005, 2006), 7)
    assert full.filter(pl.col("city_code") == "440300")["vagg"].to_list() == pytest.approx(
        one["vagg"].to_list(), rel=1e-13)  # equal up to BLAS summation order


# --------------------------------------------------------------------------------------------------
# corrupted files are rejected with file, row and rule
# --------------------------------------------------------------------------------------------------
@pytest.fixture()
def data_copy(s004_universe, tmp_path) -> Path:
    d = tmp_path / "data"
    shutil.copytree(s004_universe, d)
    return d


def _edit_csv(path: Path, fn, encoding: str = "utf-8") -> None:
    df = pl.read_csv(path, infer_schema=False, encoding="utf8" if encoding.startswith("utf") else encoding)
    df = fn(df)
    text = df.write_csv()
    path.write_bytes(text.encode(encoding))


def _set(df: pl.DataFrame, row: int, col: str, value: str | None) -> pl.DataFrame:
    """Set data row ``row`` (1-based) of column ``col``."""
    s = df[col].to_list()
    s[row - 1] = value
    return df.with_columns(pl.Series(col, s, dtype=pl.String))


CASES = [
    # (table, file, edit, rule, row)
    ("city_roads", "city_roads.csv", lambda d: _set(d, 3, "road_area_pc", "abc"), "type", 3),
    ("city_roads", "city_roads.csv", lambda d: _set(d, 5, "road_area_pc", "-1"), "ranges", 5),
    ("city_roads", "city_roads.csv", lambda d: _set(d, 2, "city_code", "11010"), "patterns", 2),
    ("city_roads", "city_roads.csv", lambda d: _set(d, 4, "city_code", "999999"), "foreign_keys", 4),
    ("city_roads", "city_roads.csv", lambda d: _set(d, 6, "year", None), "not_null", 6),
    ("city_roads", "city_roads.csv", lambda d: _set(_set(d, 2, "year", "2000"), 2, "city_code", d["city_code"][0]),
     "unique_grain", 1),
    ("city_industry", "city_industry.csv", lambda d: _set(d, 7, "sector", "quaternary"), "allowed_values", 7),
    ("iv1984", "iv1984.csv", lambda d: d.drop("city_code"), "required_columns", None),
    ("iv1984", "iv1984.csv", lambda d: d.with_columns(pl.col("city_code").alias("adcode")), "header_unique", None),
    ("prov_gdp", "prov_gdp.csv", lambda d: _set(d, 2, "price_base_year", "2005"), "single_price_base_year", 2),
]


@pytest.mark.parametrize("table,fname,edit,rule,row", CASES)
def test_corrupted_file_names_file_row_and_rule(data_copy, table, fname, edit, rule, row):
    path = rd.companion_s004_dir(data_copy) / fname
    _edit_csv(path, edit)
    with pytest.raises(rd.S004InputError) as e:
        rd.read_s004_input(data_copy, table)
    msg = str(e.value)
    assert e.value.rule == rule, msg
    assert f"companion/s004/{fname}" in msg
    assert f"[rule {rule}]" in msg
    if row is not None:
        assert e.value.rows[0] == row and f"row{'s' if len(e.value.rows) > 1 else ''} {row}" in msg


def test_double_count_is_named(data_copy):
    path = rd.companion_s004_dir(data_copy) / "digital_coef.csv"
    # turn the first telecom row into a wholesale+retail aggregate: with the G46/G47 rows of the same
    # sector-year already present this double counts
    _edit_csv(path, lambda d: _set(d, 1, "digital_sector", "G45T47"))
    with pytest.raises(rd.S004InputError, match="double counting") as e:
        rd.read_s004_input(data_copy, "digital_coef")
    assert 1 in e.value.rows


def test_range_error_hints_at_a_level_instead_of_a_ratio(data_copy):
    path = rd.companion_s004_dir(data_copy) / "city_controls.csv"
    _edit_csv(path, lambda d: _set(d, 2, "固定资产投资占GDP比重", "1234567"), encoding="utf-8-sig")
    with pytest.raises(rd.S004InputError, match="ratio is expected") as e:
        rd.read_s004_input(data_copy, "city_controls")
    assert e.value.rule == "ranges" and e.value.rows == [2] and "fixinv" in str(e.value)


def test_logged_wage_is_rejected(data_copy):
    path = rd.companion_s004_dir(data_copy) / "city_controls.csv"
    _edit_csv(path, lambda d: d.with_columns(pl.col("职工平均工资").cast(pl.Float64).log().cast(pl.String)),
              encoding="utf-8-sig")
    with pytest.raises(rd.S004InputError, match="looks logged") as e:
        rd.read_s004_input(data_copy, "city_controls")
    assert e.value.rule == "wage_nominal_level"


def test_missing_and_ambiguous_files(data_copy):
    folder = rd.companion_s004_dir(data_copy)
    (folder / "keyword_counts.csv").unlink()
    assert rd.read_s004_input(data_copy, "keyword_counts") is None  # optional
    (folder / "region3.csv").unlink()
    with pytest.raises(FileNotFoundError, match="region3"):
        rd.read_s004_input(data_copy, "region3")
    pl.read_parquet(folder / "base_output.parquet").write_csv(folder / "base_output.csv")
    with pytest.raises(rd.S004InputError, match="several files"):
        rd.read_s004_input(data_copy, "base_output")


def test_value_aliases_codes_and_case(tmp_path):
    folder = tmp_path / "companion" / "s004"
    folder.mkdir(parents=True)
    (folder / "region3.csv").write_text("省份代码,三大地带\n110000,East\n42,中部\n51,西部地区\n", encoding="utf-8")
    r = rd.read_s004_input(tmp_path, "region3")
    # 110000 -> 11; East -> east; 中部 -> central; 西部地区 -> west
    assert r.rows() == [("11", "east"), ("42", "central"), ("51", "west")]
    (folder / "bec_map.csv").write_text("vintage,hs_code,bec,产品类型\nhs2007,10110,111,资本品\nHS2007,847330,42,中间品\n",
                                        encoding="utf-8")
    b = rd.read_s004_input(tmp_path, "bec_map")
    # numeric HS6 that lost its leading zero is padded; capital goods count as final
    assert b.rows() == [("HS2007", "010110", "111", "final"), ("HS2007", "847330", "42", "intermediate")]
    pl.DataFrame({"城市代码": [110100, 420100], "城市类型": ["直辖市", "省会"]}).write_parquet(
        folder / "centre_cities.parquet")
    c = rd.read_s004_input(tmp_path, "centre_cities")  # integer codes in parquet are read as text
    assert c.rows() == [("110100", "municipality"), ("420100", "provincial_capital")]
