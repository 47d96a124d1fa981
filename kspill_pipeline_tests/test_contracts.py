"""Contracts: YAML loader validation, schemas, conform/to_arrow, polars checks, GE suite."""

from __future__ import annotations

import copy
import json

import polars as pl
import pyarrow as pa
import pytest
import yaml

from kspill_pipeline.contracts import (
    all_contracts,
    contracts_dir,
    load_contract,
    load_contract_file,
    normalise_header,
    parse_contract,
)
from kspill_pipeline.contracts.checks import (
    CheckOutcome,
    check_names,
    check_row_accounting,
    run_contract_checks,
)

TOY = {
    "name": "toy_clean",
    "kind": "asset",
    "group": "trade",
    "description": "Toy cleaned trade table for tests.",
    "partitioned_by": "year",
    "grain": ["year", "firm_id", "city_code", "flow", "hs6"],
    "columns": [
        {"name": "year", "type": "int32", "nullable": False, "range": {"min": 1990, "max": 2100},
         "description": "Calendar year."},
        {"name": "firm_id", "type": "string", "nullable": False},
        {"name": "firm_name_hash", "type": "string", "nullable": True, "pattern": "^[0-9a-f]{16}$"},
        {"name": "city_code", "type": "string", "nullable": False, "pattern": "^[0-9]{6}$",
         "foreign_key": {"table": "ref_city", "column": "city_code"}},
        {"name": "flow", "type": "string", "nullable": False, "allowed": ["export", "import"]},
        {"name": "hs6", "type": "string", "nullable": True, "pattern": "^[0-9]{6}$"},
        {"name": "value_usd", "type": "float64", "nullable": False, "unit": "US dollars",
         "range": {"min": 0, "min_exclusive": True}},
        {"name": "n_months", "type": "int16", "nullable": False, "range": {"min": 1, "max": 12}},
        {"name": "keywords", "type": "list[string]", "nullable": False},
    ],
}
REF = pl.DataFrame({"city_code": ["110100", "310100", "440300"]})
SENSITIVE = {"firm_id", "firm_name_hash"}


@pytest.fixture(scope="module")
def toy():
    return parse_contract(copy.deepcopy(TOY), "toy_clean.yaml")


def good_frame(n: int = 6) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "year": pl.Series([2005] * n, dtype=pl.Int32),
            "firm_id": [f"F{i:04d}" for i in range(n)],
            "firm_name_hash": [f"{i:016x}" for i in range(n)],
            "city_code": [["110100", "310100", "440300"][i % 3] for i in range(n)],
            "flow": [["export", "import"][i % 2] for i in range(n)],
            "hs6": [f"{100000 + i}" for i in range(n)],
            "value_usd": [10.0 + i for i in range(n)],
            "n_months": pl.Series([1 + i % 12 for i in range(n)], dtype=pl.Int16),
            "keywords": pl.Series([[] if i % 2 else ["贸易"] for i in range(n)], dtype=pl.List(pl.String)),
        }
    )


def _write(tmp_path, d, name="toy_clean"):
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(d, allow_unicode=True), encoding="utf-8")
    return p


def _by_name(outcomes: list[CheckOutcome]) -> dict[str, CheckOutcome]:
    return {o.name: o for o in outcomes}


def _sample_keys(md: dict) -> set[str]:
    keys: set[str] = set()
    s = md.get("samples")
    rows = s if isinstance(s, list) else [r for v in (s or {}).values() for r in v]
    for r in rows:
        keys |= set(r)
    return keys


# --------------------------------------------------------------------------------------------------
# loader
# --------------------------------------------------------------------------------------------------
def test_repo_contracts_load():
    """Every YAML in data_contracts/ must pass the strict validation."""
    cs = all_contracts()
    assert {"customs_raw", "trade_clean", "trade_quarantine"} <= set(cs)
    for name, c in cs.items():
        assert c.name == name
        assert c.arrow_schema().names == c.column_names


def test_customs_raw_aliases_and_header_normaliser():
    c = load_contract("customs_raw")
    assert c.kind == "raw"
    amap = c.alias_map()
    assert amap["起运国(地区)"] == "partner"
    assert c.resolve_header("起运国（地区）") == "partner"
    assert c.resolve_header("\ufeff 企业编码 ") == "firm_id"
    assert c.resolve_header("ＨＳ编码") == "hs_code"
    assert c.resolve_header("Firm ID") == "firm_id"
    assert c.resolve_header("金额（美元）") == "value_usd"
    assert c.resolve_header("unknown column") is None
    assert normalise_header("  Value   USD\u3000") == "value usd"


def test_contracts_dir_env_override(tmp_path, monkeypatch):
    _write(tmp_path, TOY)
    monkeypatch.setenv("KSPILL_CONTRACTS_DIR", str(tmp_path))
    assert contracts_dir() == tmp_path.resolve()
    assert load_contract("toy_clean").grain == tuple(TOY["grain"])
    assert list(all_contracts()) == ["toy_clean"]
    with pytest.raises(KeyError, match="nope"):
        load_contract("nope")


def _mutated(fn):
    d = copy.deepcopy(TOY)
    fn(d)
    return d


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d: d["columns"][0].update(type="integer"), r"columns\.year\.type"),
        (lambda d: d["columns"][0].update(type="list[foo]"), r"columns\.year\.type"),
        (lambda d: d.update(owner="me"), r"unknown key.*owner"),
        (lambda d: d["columns"][1].update(colour="red"), r"columns\[1\].*unknown key.*colour"),
        (lambda d: d["grain"].append("nope"), r"grain.*nope"),
        (lambda d: d["columns"].append({"name": "flow", "type": "string", "nullable": True}), "duplicate column"),
        (lambda d: d["columns"][1].update(aliases=["code", "flow"]), "alias 'flow'"),
        (lambda d: d["columns"][1].update(aliases=["Code", "code"]), "duplicate alias"),
        (lambda d: d["columns"][1].pop("nullable"), r"missing required key.*nullable"),
        (lambda d: d["columns"][1].update(range={"min": 0}), "only numeric"),
        (lambda d: d["columns"][0].update(pattern="^1"), "only string"),
        (lambda d: d["columns"][2].update(pattern="(unclosed"), "invalid regex"),
        (lambda d: d["columns"][4].update(allowed=[1, 2]), "does not match type"),
        (lambda d: d["columns"][6].update(range={"min": 5, "max": 1}), "min > max"),
        (lambda d: d.update(kind="table"), "kind"),
        (lambda d: d.update(name="other"), "does not match the file name"),
        (lambda d: d.update(partitioned_by="month"), "partitioned_by"),
    ],
)
def test_loader_validation_errors(tmp_path, mutate, match):
    p = _write(tmp_path, _mutated(mutate))
    with pytest.raises(ValueError, match=match) as ei:
        load_contract_file(p)
    assert str(p) in str(ei.value)


def test_loader_hints_at_unquoted_flow_mapping(tmp_path):
    p = tmp_path / "toy_clean.yaml"
    text = yaml.safe_dump(TOY, allow_unicode=True).replace(
        "- name: firm_id\n", "- {name: firm_id, type: string, nullable: false, description: a code (a, b).}\n  - name: firm_idx\n"
    )
    p.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match="unquoted"):
        load_contract_file(p)


def test_arrow_and_polars_schema(toy):
    s = toy.arrow_schema()
    assert s.names == toy.column_names
    assert s.field("year").type == pa.int32() and not s.field("year").nullable
    assert s.field("hs6").nullable
    assert s.field("keywords").type == pa.list_(pa.string())
    assert s.field("value_usd").metadata[b"unit"] == b"US dollars"
    assert s.field("year").metadata[b"description"] == b"Calendar year."
    assert s.metadata[b"description"] == b"Toy cleaned trade table for tests."
    assert json.loads(s.metadata[b"kspill.grain"]) == TOY["grain"]
    ps = toy.polars_schema()
    assert ps["n_months"] == pl.Int16 and ps["keywords"] == pl.List(pl.String)


def test_conform_reorders_casts_and_is_strict(toy):
    g = good_frame()
    shuffled = g.select(list(reversed(g.columns))).with_columns(
        pl.col("year").cast(pl.Int64), pl.col("n_months").cast(pl.Int64)
    )
    out = toy.conform(shuffled)
    assert out.columns == toy.column_names and out.schema == toy.polars_schema()
    with pytest.raises(ValueError, match=r"toy_clean.*missing=\['flow'\].*extra=\['junk'\]"):
        toy.conform(g.drop("flow").with_columns(pl.lit(1).alias("junk")))
    bad = g.with_columns(pl.Series("n_months", ["1", "x", "3", "4", "5", "6"]))
    with pytest.raises(ValueError, match=r"n_months: 1 value"):
        toy.conform(bad)
    frac = g.with_columns(pl.Series("year", [2005.5] * 6))
    with pytest.raises(ValueError, match="year"):
        toy.conform(frac)


def test_to_arrow_enforces_nullability(toy):
    t = toy.to_arrow(good_frame())
    assert t.schema.equals(toy.arrow_schema(), check_metadata=True)
    bad = good_frame().with_columns(pl.when(pl.col("n_months") < 3).then(None).otherwise(pl.col("flow")).alias("flow"))
    with pytest.raises(ValueError, match=r"flow \(2 nulls\)"):
        toy.to_arrow(bad)


# --------------------------------------------------------------------------------------------------
# polars checks
# --------------------------------------------------------------------------------------------------
def test_check_names_and_all_pass_on_good_frame(toy):
    names = [n for n, _ in check_names(toy)]
    assert names == ["schema", "not_null", "unique_grain", "allowed_values", "ranges", "patterns", "foreign_keys"]
    outs = run_contract_checks(toy, good_frame(), context={"references": {"ref_city": REF}})
    assert [o.name for o in outs] == names
    assert all(o.passed and o.severity == "ERROR" for o in outs), [o.to_dict() for o in outs if not o.passed]
    lazy = run_contract_checks(toy, good_frame().lazy(), context={"ref_city": REF.lazy()})
    assert all(o.passed for o in lazy)


def test_checks_fail_on_crafted_bad_frame(toy):
    bad = good_frame(8).with_columns(
        pl.Series("firm_id", ["A", "B", "C", None, "E", "E", "G", "G"]),
        pl.Series("city_code", ["110100", "999999", "310100", "310100", "440300", "440300", "110100", "110100"]),
        pl.Series("flow", ["export", "exprt", "import", "import", "export", "export", "import", "import"]),
        pl.Series("hs6", ["12345", "123456", "123456", "12a456", None, None, "654321", "654321"]),
        pl.Series("value_usd", [0.0, 1.0, -3.0, 4.0, 5.0, 6.0, 7.0, float("nan")]),
        pl.Series("n_months", [1, 13, 2, 2, 2, 2, 2, 2], dtype=pl.Int16),
    )
    # rows 4/5 duplicate the grain with a null hs6 (null-safe), rows 6/7 duplicate it fully
    out = _by_name(run_contract_checks(toy, bad, context={"ref_city": REF}))
    assert out["schema"].passed

    nn = out["not_null"]
    assert not nn.passed and nn.metadata["counts"]["firm_id"] == 1 and nn.metadata["failing_columns"] == ["firm_id"]

    u = out["unique_grain"]
    assert not u.passed
    assert u.metadata["duplicate_keys"] == 2 and u.metadata["duplicate_rows"] == 4
    assert {"year", "city_code", "flow", "hs6", "rows"} == _sample_keys(u.metadata)

    a = out["allowed_values"]
    assert not a.passed and a.metadata["counts"]["flow"] == 1
    assert a.metadata["disallowed_values"]["flow"] == ["exprt"]

    r = out["ranges"]
    assert not r.passed
    assert r.metadata["counts"] == {"year": 0, "value_usd": 3, "n_months": 1}  # 0 (exclusive), -3, NaN; 13

    p = out["patterns"]
    assert not p.passed and p.metadata["counts"]["hs6"] == 2 and p.metadata["counts"]["city_code"] == 0

    fk = out["foreign_keys"]
    assert not fk.passed and fk.metadata["counts"]["city_code"] == 1
    assert fk.metadata["missing_keys"]["city_code"] == ["999999"]

    for o in out.values():
        keys = _sample_keys(o.metadata)
        assert not keys & SENSITIVE and not any("name" in k for k in keys), (o.name, keys)
        for rows in (o.metadata.get("samples") or {}).values() if isinstance(o.metadata.get("samples"), dict) else []:
            assert len(rows) <= 5


def test_schema_check_and_missing_columns(toy):
    g = good_frame()
    out = _by_name(run_contract_checks(
        toy, g.drop("hs6").with_columns(pl.col("year").cast(pl.Int64), pl.lit("x").alias("firm_name")),
        context={"ref_city": REF},
    ))
    s = out["schema"]
    assert not s.passed
    assert s.metadata["missing_columns"] == ["hs6"] and s.metadata["extra_columns"] == ["firm_name"]
    assert s.metadata["dtype_mismatches"]["year"] == {"expected": "Int32", "found": "Int64"}
    assert not out["unique_grain"].passed and out["unique_grain"].metadata["missing_columns"] == ["hs6"]
    assert not out["patterns"].passed and out["patterns"].metadata["missing_columns"] == ["hs6"]
    order = _by_name(run_contract_checks(toy, g.select(list(reversed(g.columns))), context={"ref_city": REF}))
    assert not order["schema"].passed and order["schema"].metadata["order_matches"] is False


def test_foreign_key_without_reference_fails(toy):
    fk = _by_name(run_contract_checks(toy, good_frame()))["foreign_keys"]
    assert not fk.passed and "ref_city" in fk.metadata["errors"]["city_code"]


def test_unique_grain_on_larger_frame(toy):
    n = 300_000
    g = pl.DataFrame({
        "year": pl.Series([2001] * n, dtype=pl.Int32),
        "firm_id": pl.int_range(n, eager=True).cast(pl.String),
        "firm_name_hash": pl.Series([None] * n, dtype=pl.String),
        "city_code": ["110100"] * n, "flow": ["export"] * n,
        "hs6": pl.Series([None] * n, dtype=pl.String),
        "value_usd": [1.0] * n, "n_months": pl.Series([1] * n, dtype=pl.Int16),
        "keywords": pl.Series([[]] * n, dtype=pl.List(pl.String)),
    })
    assert _by_name(run_contract_checks(toy, g, context={"ref_city": REF}))["unique_grain"].passed
    dup = pl.concat([g, g.slice(1000, 3)])
    u = _by_name(run_contract_checks(toy, dup, context={"ref_city": REF}))["unique_grain"]
    assert not u.passed and u.metadata["duplicate_keys"] == 3 and u.metadata["duplicate_rows"] == 6


def test_row_accounting():
    ok = check_row_accounting(10, 7.5 + 0.25, 2.25, 100.0, 70.0, 30.0)
    assert ok.passed and ok.name == "row_accounting"
    assert check_row_accounting(10, 7.0000000001, 3, 1e12, 1e12 - 1e-4, 0).passed
    bad = check_row_accounting(10, 7, 2, 100.0, 70.0, 30.0)
    assert not bad.passed and bad.metadata["rows_difference"] == 1.0 and bad.metadata["value_ok"]
    badv = check_row_accounting(10, 7, 3, 100.0, 70.0, 29.0)
    assert not badv.passed and not badv.metadata["value_ok"]


# --------------------------------------------------------------------------------------------------
# great_expectations (slow import: one module-scoped validation of a good and a bad frame)
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ge_results(toy):
    from kspill_pipeline.contracts.ge_suite import build_suite, validate_with_ge

    g = good_frame(8)
    bad = g.with_columns(
        pl.Series("flow", ["export", "exprt", "import", "import", "export", "import", "import", "export"]),
        pl.Series("value_usd", [0.0, 1.0, -3.0, 4.0, 5.0, 6.0, 7.0, 8.0]),
        pl.Series("hs6", ["12345", "123456", "223456", "12a456", "323456", "423456", "523456", "623456"]),
        pl.Series("firm_id", ["A", "B", "C", None, "E", "E", "G", "G"]),
    )
    bad = pl.concat([bad, bad.slice(0, 1)])
    return {
        "suite": build_suite(toy),
        "good": validate_with_ge(toy, g),
        "bad": validate_with_ge(toy, bad),
        "bad_no_unique": validate_with_ge(toy, bad, max_rows_for_unique=5),
    }


def test_ge_suite_content(ge_results, toy):
    suite = ge_results["suite"]
    types = [e.expectation_type for e in suite.expectations]
    assert types[0] == "expect_table_columns_to_match_ordered_list"
    assert suite.expectations[0].column_list == [c for c in toy.column_names if c != "keywords"]
    assert types.count("expect_column_values_to_not_be_null") == 6  # keywords (list) skipped
    between = [e for e in suite.expectations if e.expectation_type == "expect_column_values_to_be_between"]
    vu = next(e for e in between if e.column == "value_usd")
    assert vu.strict_min is True and vu.min_value == 0
    assert types.count("expect_column_values_to_match_regex") == 3
    assert types[-1] == "expect_compound_columns_to_be_unique"


def test_ge_validation_good_and_bad(ge_results):
    good = ge_results["good"]
    assert good.success and good.statistics["unsuccessful_expectations"] == 0 and good.unique_checked
    bad = ge_results["bad"]
    assert not bad.success
    counts = bad.unexpected_counts()
    assert counts["expect_column_values_to_be_in_set:flow"] == 1
    assert counts["expect_column_values_to_be_between:value_usd"] == 3  # 0 (strict), -3, 0 (dup row)
    assert counts["expect_column_values_to_match_regex:hs6"] == 3
    assert counts["expect_column_values_to_not_be_null:firm_id"] == 1
    failed = {e["key"] for e in bad.failed}
    assert "expect_compound_columns_to_be_unique:year,firm_id,city_code,flow,hs6" in failed
    flow = next(e for e in bad.expectations if e["key"] == "expect_column_values_to_be_in_set:flow")
    assert flow["sample"] == ["exprt"]
    for e in bad.expectations:
        if e["column"] in {"firm_id", "firm_name_hash"} or e["column"] is None:
            assert "sample" not in e
    nu = ge_results["bad_no_unique"]
    assert not nu.unique_checked
    assert not any(e["expectation_type"] == "expect_compound_columns_to_be_unique" for e in nu.expectations)
