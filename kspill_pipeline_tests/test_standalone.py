"""``kspill relatedness`` standalone command (kspill_pipeline/standalone.py): end to end in a
subprocess, and proof that it never imports Dagster or great_expectations."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from kspill_pipeline import standalone

REPO = Path(__file__).resolve().parents[1]

CSV = """year,iso,hs,exports
2001,aaa,0011,4
2001,aaa,0013,2
2001,aaa,0014,4
2001,bbb,0012,3
2001,bbb,0013,3
2001,ccc,0011,2
2001,ccc,0012,1
2001,ccc,0013,1
2002,aaa,0011,1
2002,aaa,0012,1
2002,bbb,0011,1
2002,bbb,0012,3
2002,ccc,0013,5
2002,ccc,0011,1
"""


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def test_end_to_end_csv(tmp_path):
    inp = tmp_path / "trade.csv"
    inp.write_text(CSV)
    out = tmp_path / "out"
    r = subprocess.run(
        [sys.executable, "-m", "kspill_pipeline.standalone", "--input", str(inp), "--location", "iso",
         "--product", "hs", "--value", "exports", "--time", "year", "--preset", "stata", "--out", str(out)],
        capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    comp = pl.read_parquet(out / "complexity.parquet")
    prox = pl.read_parquet(out / "proximity.parquet")
    assert comp.columns == ["time", "location", "product", "value", "rca", "M", "density", "eci", "pci",
                            "diversity", "ubiquity", "coi", "cog"]
    assert prox.columns == ["time", "product_1", "product_2", "proximity"]
    assert comp.schema["product"] == pl.Utf8
    assert sorted(comp["product"].unique().to_list()) == ["0011", "0012", "0013", "0014"]  # zeros kept
    assert comp["time"].unique().sort().to_list() == [2001, 2002]
    # 2001 is the hand-computed 3 x 4 matrix of test_relatedness; Stata: M = RCA > 1, diagonal 0
    y1 = comp.filter(pl.col("time") == 2001).sort("location", "product")
    assert y1.height == 12
    np.testing.assert_allclose(
        y1["rca"].to_numpy().reshape(3, 4),
        [[4 / 3, 0, 2 / 3, 2], [0, 5 / 2, 5 / 3, 0], [5 / 3, 5 / 4, 5 / 6, 0]], atol=1e-15,
    )
    np.testing.assert_array_equal(y1["M"].to_numpy().reshape(3, 4), [[1, 0, 0, 1], [0, 1, 1, 0], [1, 1, 0, 0]])
    np.testing.assert_allclose(
        y1["density"].to_numpy().reshape(3, 4), [[0.5, 0.5, 0, 1], [0.5, 0.5, 1, 0], [0.5, 0.5, 1, 1]], atol=1e-15
    )
    # 2002 has 3 products only (0014 not traded): 9 rows, 9 proximity pairs
    assert comp.filter(pl.col("time") == 2002).height == 9
    assert prox.filter(pl.col("time") == 2002).height == 9
    p1 = prox.filter(pl.col("time") == 2001).with_columns(pl.col("product_1", "product_2").cast(pl.Utf8))
    assert p1.filter((pl.col("product_1") == "0011") & (pl.col("product_2") == "0014"))["proximity"].item() == 0.5
    assert "kspill relatedness:" in r.stdout


def test_parquet_input_without_time_and_threshold(tmp_path):
    df = pl.read_csv(CSV.encode(), infer_schema=False)
    df = df.filter(pl.col("year") == "2001").drop("year").with_columns(pl.col("exports").cast(pl.Float64))
    inp = tmp_path / "trade.parquet"
    df.write_parquet(inp)
    out = tmp_path / "o"
    args = argparse.Namespace(input=inp, location="iso", product="hs", value="exports", time=None,
                              preset="py-ecomplexity", rca_threshold=1.5, out=out, quiet=True)
    assert standalone.run(args) == 0
    comp = pl.read_parquet(out / "complexity.parquet").sort("location", "product")
    assert comp["time"].null_count() == comp.height
    # RCA >= 1.5: 2 (aaa 0014), 5/2 and 5/3 (bbb), 5/3 (ccc 0011)
    np.testing.assert_array_equal(comp["M"].to_numpy().reshape(3, 4), [[0, 0, 0, 1], [0, 1, 1, 0], [1, 0, 0, 0]])


def test_missing_input_and_bad_column(tmp_path):
    args = argparse.Namespace(input=tmp_path / "nope.csv", location="a", product="b", value="c", time=None,
                              preset="stata", rca_threshold=None, out=tmp_path / "o", quiet=True)
    assert standalone.run(args) == 2
    (tmp_path / "x.csv").write_text(CSV)
    args.input = tmp_path / "x.csv"
    assert standalone.run(args) == 2


def test_add_parser_registers_subcommand():
    p = argparse.ArgumentParser(prog="kspill")
    sub = p.add_subparsers(dest="cmd")
    standalone.add_parser(sub)
    a = p.parse_args(["relatedness", "--input", "f.csv", "--location", "c", "--product", "p", "--value", "v",
                      "--out", "d", "--preset", "r-economiccomplexity", "--rca-threshold", "2"])
    assert a.cmd == "relatedness" and a.preset == "r-economiccomplexity" and a.rca_threshold == 2.0
    with pytest.raises(SystemExit):
        p.parse_args(["relatedness", "--input", "f", "--location", "c", "--product", "p", "--value", "v",
                      "--out", "d", "--preset", "matlab"])


def test_command_never_imports_dagster_or_great_expectations(tmp_path):
    inp = tmp_path / "trade.csv"
    inp.write_text(CSV)
    code = (
        "import sys, json\n"
        "from kspill_pipeline import standalone\n"
        f"rc = standalone.main(['--input', {str(inp)!r}, '--location', 'iso', '--product', 'hs', '--value', 'exports',"
        f" '--time', 'year', '--out', {str(tmp_path / 'o')!r}, '--quiet'])\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('dagster', 'great_expectations', 'dask', 'pandas'))\n"
        "print(json.dumps({'rc': rc, 'bad': bad}))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["rc"] == 0
    assert res["bad"] == [], f"standalone imported {res['bad']}"
