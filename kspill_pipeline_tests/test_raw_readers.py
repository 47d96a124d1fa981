"""Raw customs readers: encodings, delimiters, header aliases, Stata/parquet, discovery, row counts."""

from __future__ import annotations

import codecs

import pandas as pd
import polars as pl
import pytest

from kspill_pipeline.contracts import load_contract
from kspill_pipeline.io import raw
from kspill_pipeline.io.raw import (
    count_rows,
    detect_encoding,
    discover_files,
    read_customs_file,
    read_year,
    year_of_path,
)

CANONICAL = load_contract("customs_raw").column_names
OUT_COLUMNS = [*CANONICAL, "source_file", "source_row"]

HEADER = "企业编码,企业名称,进出口,税号,起运国（地区）,美元,贸易方式,计量单位"
ROWS = [
    "0102030405,北京贸易有限公司,出口,01012100,美国,1000,一般贸易,千克",
    "0000012345,上海电子科技有限公司,进口,84713000,日本,2000.5,进料加工,台",
    "0203040506,深圳外贸集团,出口,00000001,德国,3,来料加工,个",
]


def _csv_text(header: str = HEADER, rows: list[str] = ROWS, sep: str = ",") -> str:
    return "\n".join([header.replace(",", sep), *[r.replace(",", sep) for r in rows]]) + "\n"


def _assert_shape(rf, n: int) -> None:
    assert rf.df.columns == OUT_COLUMNS
    assert all(dt == pl.String for c, dt in rf.df.schema.items() if c != "source_row")
    assert rf.df.schema["source_row"] == pl.Int64
    assert rf.df.height == n


def _assert_content(rf, year: str) -> None:
    df = rf.df
    assert df["firm_id"].to_list() == ["0102030405", "0000012345", "0203040506"]  # leading zeros kept
    assert df["hs_code"].to_list() == ["01012100", "84713000", "00000001"]
    assert df["partner"].to_list() == ["美国", "日本", "德国"]
    assert df["flow"].to_list() == ["出口", "进口", "出口"]
    assert df["value_usd"].to_list() == ["1000", "2000.5", "3"]
    assert df["firm_name"][0] == "北京贸易有限公司"
    assert df["year"].to_list() == [year] * 3  # filled from the file name
    assert df["source_row"].to_list() == [1, 2, 3]
    assert df["region_code"].null_count() == 3  # absent optional column -> all null


@pytest.mark.parametrize(
    ("encoding", "prefix", "expected"),
    [
        ("utf-8", b"", "utf-8"),
        ("utf-8", codecs.BOM_UTF8, "utf-8-sig"),
        ("gbk", b"", "gb18030"),
        ("gb18030", b"", "gb18030"),
    ],
)
def test_csv_encodings_with_chinese_headers(tmp_path, encoding, prefix, expected):
    f = tmp_path / "customs" / "exports_2003.csv"
    f.parent.mkdir()
    f.write_bytes(prefix + _csv_text().encode(encoding))
    rf = read_customs_file(f, tmp_path)
    _assert_shape(rf, 3)
    _assert_content(rf, "2003")
    assert rf.encoding == expected
    assert rf.source_file == "customs/exports_2003.csv"
    assert rf.df["source_file"].unique().to_list() == ["customs/exports_2003.csv"]
    assert rf.header_map["起运国（地区）"] == "partner"
    assert rf.format == "csv" and rf.numeric_hs is False
    assert count_rows(f) == rf.n_rows


def test_gb18030_only_characters(tmp_path):
    # U+20000 (CJK Ext. B) exists in GB18030 but not in GBK
    rows = [ROWS[0].replace("北京贸易有限公司", "\U00020000贸易公司"), *ROWS[1:]]
    f = tmp_path / "t_2004.csv"
    f.write_bytes(_csv_text(rows=rows).encode("gb18030"))
    rf = read_customs_file(f, tmp_path)
    assert rf.encoding == "gb18030"
    assert rf.df["firm_name"][0] == "\U00020000贸易公司"


@pytest.mark.parametrize(("sep", "ext"), [("\t", ".txt"), ("\t", ".tsv"), ("|", ".csv"), (";", ".csv")])
def test_delimiters(tmp_path, sep, ext):
    f = tmp_path / f"d_2005{ext}"
    f.write_bytes(_csv_text(sep=sep).encode("gbk"))
    rf = read_customs_file(f, tmp_path)
    assert rf.delimiter == sep
    _assert_content(rf, "2005")
    assert count_rows(f) == 3


def test_undecodable_bytes_become_replacement_in_that_row_only(tmp_path):
    body = _csv_text().encode("gbk")
    bad = body.replace("上海电子".encode("gbk"), b"\xff\x80" + "电子".encode("gbk"))
    assert bad != body
    f = tmp_path / "g_2006.csv"
    f.write_bytes(bad)
    rf = read_customs_file(f, tmp_path)
    _assert_shape(rf, 3)
    assert rf.encoding.startswith("gb18030") and "lossy" in rf.encoding
    has_fffd = rf.df.select(
        pl.any_horizontal([pl.col(c).str.contains("\ufffd", literal=True) for c in CANONICAL]).fill_null(False)
    ).to_series().to_list()
    assert has_fffd == [False, True, False]
    assert rf.df["firm_name"][1].endswith("电子科技有限公司")
    assert rf.df["hs_code"].to_list() == ["01012100", "84713000", "00000001"]


def test_utf8_with_a_few_bad_bytes_stays_utf8(tmp_path):
    rows = ROWS * 20
    body = _csv_text(rows=rows).encode("utf-8")
    bad = body.replace("上海".encode(), b"\xff\xfe", 1)
    f = tmp_path / "u_2006.csv"
    f.write_bytes(bad)
    enc, lossy = detect_encoding(f)
    assert (enc, lossy) == ("utf-8", True)
    rf = read_customs_file(f, tmp_path)
    assert "\ufffd" in rf.df["firm_name"][1]
    assert rf.df["firm_name"][0] == "北京贸易有限公司"


def test_utf16_excel_unicode_text(tmp_path):
    f = tmp_path / "x_2007.txt"
    f.write_bytes(_csv_text(sep="\t").encode("utf-16"))  # with BOM, as Excel writes it
    rf = read_customs_file(f, tmp_path)
    assert rf.encoding == "utf-16"
    _assert_content(rf, "2007")
    assert count_rows(f) == 3


def test_english_headers_quotes_blank_lines_and_lone_quote(tmp_path):
    text = (
        'Firm ID,Company_Name,IMP_EXP,HS8,Partner Country,Value,Year,Month,extra_col\n'
        '0001,"Acme, Ltd",E,01012100,USA,10,2001,1,a\n'
        '\n'
        '0002,"multi\nline",I,02011000,JPN,20,2001,2,b\n'
        '0003,He said "hi,E,03011000,KOR,30,2001,3,c\n'
        ',,,,,,,,\n'
    )
    f = tmp_path / "eng_2001.csv"
    f.write_text(text, encoding="utf-8")
    rf = read_customs_file(f, tmp_path)
    df = rf.df
    assert df["firm_id"].to_list() == ["0001", "0002", "0003"]
    assert df["firm_name"].to_list() == ["Acme, Ltd", "multi\nline", 'He said "hi']
    assert df["month"].to_list() == ["1", "2", "3"]
    assert df["source_row"].to_list() == [1, 3, 4]  # record numbers of the file; blank record 2 dropped
    assert rf.n_blank_rows == 2
    assert rf.ignored_columns == ["extra_col"]
    assert "extra_col" not in df.columns
    assert count_rows(f) == 3


def test_missing_required_column_names_file_field_and_headers(tmp_path):
    f = tmp_path / "m_2002.csv"
    f.write_text("企业编码,进出口,起运国,美元\n1,出口,美国,5\n", encoding="utf-8")
    with pytest.raises(ValueError) as ei:
        read_customs_file(f, tmp_path)
    msg = str(ei.value)
    assert "m_2002.csv" in msg and "hs_code" in msg and "企业编码" in msg


def test_ambiguous_headers_and_ragged_rows_raise(tmp_path):
    f = tmp_path / "a_2002.csv"
    f.write_text("firm_id,企业编码,flow,hs,partner,value\n1,1,E,1,USA,5\n", encoding="utf-8")
    with pytest.raises(ValueError, match="firm_id"):
        read_customs_file(f, tmp_path)
    g = tmp_path / "r_2002.csv"
    g.write_text("firm_id,flow,hs,partner,value\n1,E,1,USA,5,6\n", encoding="utf-8")
    with pytest.raises(ValueError, match="r_2002.csv"):
        read_customs_file(g, tmp_path)


def test_year_column_kept_and_missing_year_without_name_year(tmp_path):
    f = tmp_path / "data.csv"
    f.write_text("firm_id,flow,hs,partner,value\n1,E,1,USA,5\n", encoding="utf-8")
    with pytest.raises(ValueError, match="year"):
        read_customs_file(f, tmp_path)
    g = tmp_path / "data2.csv"
    g.write_text("年份,firm_id,flow,hs,partner,value\n1999,1,E,1,USA,5\n", encoding="utf-8")
    assert read_customs_file(g, tmp_path).df["year"].to_list() == ["1999"]


def _stata_frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "firm_code": ["0102030405", "0000012345", "0203040506"],
            "company_name": ["北京贸易有限公司", "上海电子科技有限公司", "深圳外贸集团"],
            "impexp": pd.Categorical(["出口", "进口", "出口"]),
            "hs8": [1012100, 84713000, 2011000],  # numeric: leading zeros lost
            "country": ["美国", "日本", "德国"],
            "value": [1000.0, 2000.5, 3.0],
            "qty": [float("nan"), 7.0, 1.25],
            "v9": ["x", "y", "z"],
        }
    )


def test_stata_numeric_hs_and_number_formatting(tmp_path, monkeypatch):
    monkeypatch.setattr(raw, "STATA_CHUNK_ROWS", 2)  # force several chunks
    f = tmp_path / "stata" / "2008" / "customs.dta"
    f.parent.mkdir(parents=True)
    _stata_frame().to_stata(f, write_index=False, version=118)
    rf = read_customs_file(f, tmp_path)
    _assert_shape(rf, 3)
    df = rf.df
    assert rf.numeric_hs is True and rf.format == "dta"
    assert df["hs_code"].to_list() == ["1012100", "84713000", "2011000"]  # no ".0"; cleaner pads
    assert df["value_usd"].to_list() == ["1000", "2000.5", "3"]
    assert df["quantity"].to_list() == [None, "7", "1.25"]
    assert df["flow"].to_list() == ["出口", "进口", "出口"]  # categorical labels
    assert df["firm_name"][1] == "上海电子科技有限公司"
    assert df["year"].to_list() == ["2008"] * 3  # from the folder name
    assert df["source_row"].to_list() == [1, 2, 3]
    assert rf.ignored_columns == ["v9"]
    assert rf.source_file == "stata/2008/customs.dta"
    assert count_rows(f) == 3


def test_stata_variable_labels_map_headers(tmp_path):
    pdf = _stata_frame().drop(columns=["v9"]).rename(columns={"firm_code": "v1"})
    f = tmp_path / "lab_2009.dta"
    pdf.to_stata(f, write_index=False, version=118, variable_labels={"v1": "企业编码"})
    rf = read_customs_file(f, tmp_path)
    assert rf.header_map["v1"] == "firm_id"
    assert rf.df["firm_id"][0] == "0102030405"


def test_parquet_int_columns(tmp_path):
    f = tmp_path / "p_2010.parquet"
    pl.DataFrame(
        {
            "firm_id": [102030405, 12345],
            "flow": [0, 1],
            "hs_code": [1012100, 84713000],
            "partner": ["USA", "JPN"],
            "value_usd": [1000.0, 2.5],
            "quantity": pl.Series([None, 3], dtype=pl.Int32),
            "year": [2010, 2010],
        }
    ).write_parquet(f)
    rf = read_customs_file(f, tmp_path)
    _assert_shape(rf, 2)
    assert rf.numeric_hs is True
    assert rf.df["hs_code"].to_list() == ["1012100", "84713000"]
    assert rf.df["value_usd"].to_list() == ["1000", "2.5"]
    assert rf.df["flow"].to_list() == ["0", "1"]
    assert rf.df["quantity"].to_list() == [None, "3"]
    assert count_rows(f) == 2


def test_discover_files(tmp_path):
    (tmp_path / "source.yaml").write_text("years: {start: 2000, end: 2003}\ncustoms_dir: raw\n")
    r = tmp_path / "raw"
    (r / "2001").mkdir(parents=True)
    (r / "_truth").mkdir()
    (r / ".cache").mkdir()
    (r / "b_2000.CSV").write_text("x")
    (r / "a_2000.dta").write_bytes(b"")
    (r / "2001" / "jan.csv").write_text("x")
    (r / "2001" / "customs_200102.txt").write_text("x")
    (r / "2002_exports.parquet").write_bytes(b"")
    (r / "_truth" / "truth_2000.csv").write_text("x")
    (r / ".cache" / "c_2000.csv").write_text("x")
    (r / ".hidden_2000.csv").write_text("x")
    (r / "notes_2000.md").write_text("x")
    (tmp_path / "stray_2003.csv").write_text("x")  # outside customs_dir
    found = discover_files(tmp_path)
    assert list(found) == [2000, 2001, 2002]
    assert [p.name for p in found[2000]] == ["a_2000.dta", "b_2000.CSV"]
    assert [p.name for p in found[2001]] == ["customs_200102.txt", "jan.csv"]
    assert [p.name for p in found[2002]] == ["2002_exports.parquet"]


def test_discover_files_errors(tmp_path):
    (tmp_path / "customs_2001_2002.csv").write_text("x")
    with pytest.raises(ValueError, match="customs_2001_2002.csv"):
        discover_files(tmp_path)
    (tmp_path / "customs_2001_2002.csv").unlink()
    (tmp_path / "customs.csv").write_text("x")
    with pytest.raises(ValueError, match="customs.csv"):
        discover_files(tmp_path)


def test_year_of_path_tokens(tmp_path):
    assert year_of_path(tmp_path / "x_2001_2001.csv") == 2001
    assert year_of_path(tmp_path / "m_20050315.csv") == 2005  # YYYYMMDD token
    with pytest.raises(ValueError):
        year_of_path(tmp_path / "trade12001.csv", tmp_path)  # digits glued to the year
    with pytest.raises(ValueError):
        year_of_path(tmp_path / "a" / "f_1989.csv", tmp_path)  # out of range -> no year
    assert year_of_path(tmp_path / "y2015" / "f.csv", tmp_path) == 2015


def test_read_year_and_count_rows_agree(tmp_path):
    d = tmp_path / "customs"
    d.mkdir()
    (d / "a_2011.csv").write_bytes(_csv_text().encode("gbk"))
    (d / "b_2011.csv").write_bytes(_csv_text(sep="\t").encode("utf-8"))
    frames = read_year(tmp_path, 2011)
    assert [f.source_file for f in frames] == ["customs/a_2011.csv", "customs/b_2011.csv"]
    for fr, p in zip(frames, sorted(d.iterdir())):
        assert fr.n_rows == count_rows(p) == 3
    assert read_year(tmp_path, 1999) == []


def test_legacy_stata_gbk_bytes_are_redecoded(tmp_path):
    # Stata < 118 stores bytes; Chinese files hold GBK that pandas decodes as latin-1
    def moj(s: str) -> str:
        return s.encode("gbk").decode("latin-1")

    pdf = pd.DataFrame(
        {
            "firm_id": ["01", "02"], "firm_name": [moj("北京贸易公司"), "ACME"], "flow": [moj("出口"), "E"],
            "hs_code": ["01012100", "02"], "partner": [moj("美国"), "USA"], "value_usd": [1.5, 2.0],
        }
    )
    f = tmp_path / "old_2001.dta"
    pdf.to_stata(f, write_index=False, version=117)
    rf = read_customs_file(f, tmp_path)
    assert "gb18030" in rf.encoding and rf.numeric_hs is False
    assert rf.df.select("firm_name", "flow", "partner", "hs_code", "value_usd").rows() == [
        ("北京贸易公司", "出口", "美国", "01012100", "1.5"),
        ("ACME", "E", "USA", "02", "2"),
    ]


def test_header_only_empty_and_repeated_headers(tmp_path):
    h = tmp_path / "h_2001.csv"
    h.write_text("firm_id,flow,hs,partner,value\n", encoding="utf-8")
    rf = read_customs_file(h, tmp_path)
    assert rf.n_rows == 0 and rf.df.columns == OUT_COLUMNS and count_rows(h) == 0
    t = tmp_path / "t_2001.csv"
    t.write_text("firm_id,flow,hs,partner,value,,备注,备注\r\n1,E,0101,USA,5,,x,y\r\n", encoding="utf-8")
    rf = read_customs_file(t, tmp_path)
    assert rf.ignored_columns == ["__unnamed_5", "备注", "备注.1"]
    assert rf.df.select("firm_id", "value_usd").rows() == [("1", "5")]  # CRLF handled
    d = tmp_path / "d_2001.csv"
    d.write_text("firm_id,flow,hs,partner,value,flow\n1,E,0101,USA,5,E\n", encoding="utf-8")
    with pytest.raises(ValueError, match="flow"):
        read_customs_file(d, tmp_path)


# ------------------------------------------------------------------------------------------------
# batched reading (iter_customs_file): the batches concatenate to read_customs_file's frame
# ------------------------------------------------------------------------------------------------
def _write_reader_zoo(tmp_path) -> list:
    """One file of every reader path: encodings, delimiters, blank records, the csv-module fallback,
    header-only, Stata (chunked, labels, legacy bytes) and parquet with numeric columns."""
    files = []
    many = [r.replace("1000", str(1000 + i)) for i in range(7) for r in ROWS]  # 21 records
    for name, data in [
        ("utf8_2003.csv", _csv_text(rows=many).encode("utf-8")),
        ("bom_2003.csv", codecs.BOM_UTF8 + _csv_text(rows=many).encode("utf-8")),
        ("gbk_2003.csv", _csv_text(rows=many).encode("gbk")),
        ("tab_2003.tsv", _csv_text(rows=many, sep="\t").encode("gb18030")),
        ("u16_2003.txt", _csv_text(rows=many, sep="\t").encode("utf-16")),
        ("lossy_2003.csv", _csv_text(rows=many).encode("gbk").replace("上海电子".encode("gbk"), b"\xff\x80", 1)),
        ("blank_2003.csv", (
            "Firm ID,Company_Name,IMP_EXP,HS8,Partner Country,Value,Year,Month\n"
            "0001,\"Acme, Ltd\",E,01012100,USA,10,2003,1\n\n"
            "0002,\"multi\nline\",I,02011000,JPN,20,2003,2\n,,,,,,,\n"
            "0004,x,E,03011000,KOR,40,2003,4\n\n\n0005,y,I,03011000,KOR,50,2003,5\n"
        ).encode("utf-8")),
        ("quote_2003.csv", (
            "Firm ID,Company_Name,IMP_EXP,HS8,Partner Country,Value\n"
            + "".join(f"{i:04d},n{i},E,01012100,USA,{i}\n" for i in range(1, 6))
            + "\n0006,He said \"hi,E,03011000,KOR,30\n0007,z,I,03011000,KOR,70\n"
        ).encode("utf-8")),
        ("header_2003.csv", b"firm_id,flow,hs,partner,value\n"),
    ]:
        f = tmp_path / name
        f.write_bytes(data)
        files.append(f)
    big = pd.concat([_stata_frame()] * 3, ignore_index=True)
    f = tmp_path / "stata118_2008.dta"
    big.to_stata(f, write_index=False, version=118)
    files.append(f)
    f = tmp_path / "stata117_2008.dta"  # legacy: GBK bytes read as latin-1, re-decoded in some batches only
    big.assign(
        company_name=["ACME", "北京贸易".encode("gbk").decode("latin-1"), "GAMMA"] * 3,
        country=["USA", "JPN", "美国".encode("gbk").decode("latin-1")] * 3,
        impexp=pd.Categorical(["E", "I", "E"] * 3),
    ).to_stata(f, write_index=False, version=117)
    files.append(f)
    f = tmp_path / "p_2010.parquet"
    pl.DataFrame(
        {"firm_id": list(range(11)), "flow": [0, 1] * 5 + [1], "hs_code": [1012100 + i for i in range(11)],
         "partner": ["USA"] * 11, "value_usd": [1000.0 + i / 4 for i in range(11)],
         "quantity": pl.Series([None, 3] * 5 + [None], dtype=pl.Int32)},
    ).write_parquet(f, row_group_size=4)
    files.append(f)
    f = tmp_path / "empty_2010.parquet"
    pl.DataFrame(schema={"firm_id": pl.String, "flow": pl.String, "hs_code": pl.Int64, "partner": pl.String,
                         "value_usd": pl.Float64}).write_parquet(f)
    files.append(f)
    return files


@pytest.mark.parametrize("batch_rows", [1, 2, 5, 1000])
def test_iter_customs_file_concatenates_to_read_customs_file(tmp_path, batch_rows):
    for f in _write_reader_zoo(tmp_path):
        ref = read_customs_file(f, tmp_path)
        parts = list(raw.iter_customs_file(f, tmp_path, batch_rows=batch_rows))
        assert parts, f
        df = pl.concat([p.df for p in parts], how="vertical")
        assert df.schema == ref.df.schema, f
        assert df.equals(ref.df), f  # same rows, values, nulls and source_row numbering
        assert all(p.df.height <= max(batch_rows, 1) for p in parts), f
        assert sum(p.n_blank_rows for p in parts) == ref.n_blank_rows, f
        assert df.height == count_rows(f), f
        assert {p.numeric_hs for p in parts} == {ref.numeric_hs}, f
        assert {p.format for p in parts} == {ref.format} and parts[0].source_file == ref.source_file
        assert parts[0].ignored_columns == ref.ignored_columns and parts[0].header_map == ref.header_map
        if ref.format == "csv":
            assert parts[0].encoding == ref.encoding and parts[0].delimiter == ref.delimiter
            assert any(p.warnings for p in parts) == bool(ref.warnings), f
        if batch_rows == 1 and df.height > 1:
            assert len(parts) >= df.height, f


def test_iter_customs_file_errors(tmp_path):
    g = tmp_path / "r_2002.csv"
    g.write_text("firm_id,flow,hs,partner,value\n1,E,1,USA,5\n2,E,1,USA,5,6\n", encoding="utf-8")
    with pytest.raises(ValueError, match="r_2002.csv"):
        list(raw.iter_customs_file(g, tmp_path, batch_rows=1))
    m = tmp_path / "m_2002.csv"
    m.write_text("企业编码,进出口,起运国,美元\n1,出口,美国,5\n", encoding="utf-8")
    with pytest.raises(ValueError, match="hs_code"):
        list(raw.iter_customs_file(m, tmp_path))
    with pytest.raises(FileNotFoundError):
        list(raw.iter_customs_file(tmp_path / "none_2002.csv", tmp_path))
