"""The replication report (``kspill report``, ``kspill_report`` asset, ``kspill_pipeline.report``).

Built from the shared ``full_tiny_store`` (every asset materialised once on the tiny universe);
tests that modify a store work on a copy. Expected numbers are computed here independently: polars
reads of the partition files, ``hashlib`` over the raw files, ``importlib.metadata``, ``glob`` of
the PNG and rendered files; the HTML is parsed with ``html.parser``.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import polars as pl
import pytest

from kspill_pipeline import cli
from kspill_pipeline.report import build_report

PACKAGES = ("dagster", "polars", "pyarrow", "pyfixest", "great_expectations", "dask", "numpy", "scipy", "pandas",
            "matplotlib")


# ------------------------------------------------------------------------------------------------
# helpers (independent of the code under test)
# ------------------------------------------------------------------------------------------------


class _Tables(HTMLParser):
    """Every ``<table id=...>``: its rows as lists of cell texts (header row first)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tables: dict[str, list[list[str]]] = {}
        self._stack: list[str | None] = []
        self._row: list[str] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self._stack.append(a.get("id"))
            if a.get("id"):
                self.tables[a["id"]] = []
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            tid = self._stack[-1] if self._stack else None
            if tid:
                self.tables[tid].append(self._row)
            self._row = None
        elif tag == "table" and self._stack:
            self._stack.pop()

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def tables(html: str) -> dict[str, list[dict[str, str]]]:
    p = _Tables()
    p.feed(html)
    return {k: [dict(zip(rows[0], r)) for r in rows[1:]] for k, rows in p.tables.items() if rows}


def num(s: str) -> float:
    return float(s.replace(",", "").rstrip("%"))


def parts(root: Path, asset: str, year: int | None = None) -> pl.DataFrame:
    d = root / asset if year is None else root / asset / f"year={year}"
    files = sorted(d.glob("part-*.parquet"))
    assert files, d
    return pl.concat([pl.read_parquet(f) for f in files], how="vertical_relaxed")


def store_years(root: Path, asset: str) -> list[int]:
    return sorted(int(p.name[5:]) for p in (root / asset).glob("year=*") if list(p.glob("part-*.parquet")))


def store_pngs(root: Path) -> list[Path]:
    """Every PNG anywhere in the store except the report's own folder and hidden temp files."""
    out = []
    for dirpath, _dirs, files in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        if rel.parts and rel.parts[0].startswith("_"):
            continue
        out += [Path(dirpath) / f for f in files if f.lower().endswith(".png") and not f.startswith(".")]
    return sorted(out)


@pytest.fixture(scope="module")
def built(full_tiny_store, tiny_universe, tmp_path_factory):
    """``kspill report`` on the shared store (the default configuration)."""
    out = tmp_path_factory.mktemp("report_out")
    rc = cli.main(["report", "--data", str(tiny_universe), "--store", str(full_tiny_store), "--out", str(out)])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.md"]
    return (out / "report.html").read_text(encoding="utf-8"), (out / "report.md").read_text(encoding="utf-8")


@pytest.fixture()
def store_copy(full_tiny_store, tmp_path) -> Path:
    dst = tmp_path / "store"
    shutil.copytree(full_tiny_store, dst, ignore=shutil.ignore_patterns("_report"))
    return dst


# ------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------


def test_html_opens_offline_no_external_resources(built):
    html, md = built
    assert "<script" not in html.lower() and "<link" not in html.lower() and "@import" not in html
    refs = re.findall(r"""\b(src|href)\s*=\s*["']([^"']*)["']""", html, flags=re.I)
    assert refs
    for attr, val in refs:
        if attr.lower() == "src":
            assert val.startswith("data:image/png;base64,"), val[:80]
        else:
            assert val.startswith("#"), val  # in-page anchors only
    assert not re.search(r"https?://", html) and not re.search(r"https?://", md)
    # every anchor of the table of contents exists
    for target in re.findall(r'href="#([^"]+)"', html):
        assert f'id="{target}"' in html, target


def test_every_png_of_the_store_is_embedded_as_a_data_uri(built, full_tiny_store):
    html, md = built
    pngs = store_pngs(full_tiny_store)
    assert len(pngs) >= 5  # the five S000 figures at least
    assert html.count("data:image/png;base64,") == len(pngs)
    assert md.count("](data:image/png;base64,") == len(pngs)
    for p in pngs:
        assert base64.b64encode(p.read_bytes()).decode("ascii") in html, p


def test_coverage_table_equals_independent_polars_counts(built, full_tiny_store, tiny_universe):
    html, _ = built
    cov = {int(r["year"]): r for r in tables(html)["coverage-table"]}
    years = store_years(full_tiny_store, "trade_clean")
    assert sorted(cov) == years == list(range(2000, 2017))
    for y in years:
        tc = parts(full_tiny_store, "trade_clean", y)
        tq = parts(full_tiny_store, "trade_quarantine", y)
        rep = parts(full_tiny_store, "trade_cleaning_report", y)
        read = rep.filter(pl.col("rule") == "read")["rows"].item()
        row = cov[y]
        assert num(row["trade_clean rows"]) == tc.height
        assert num(row["firms"]) == tc["firm_id"].n_unique()
        assert num(row["value (USD)"]) == pytest.approx(tc["value_usd"].sum(), abs=1.0)
        assert num(row["exports (USD)"]) == pytest.approx(
            tc.filter(pl.col("flow") == "export")["value_usd"].sum(), abs=1.0)
        assert num(row["rows quarantined"]) == tq.height
        assert num(row["raw rows read"]) == read
        assert num(row["quarantined (rows)"]) == pytest.approx(100 * tq.height / read, abs=0.006)


def test_cleaning_accounting_sums_match_clean_and_quarantine(built, full_tiny_store):
    html, _ = built
    t = tables(html)
    acc = {int(r["year"]): r for r in t["accounting-table"]}
    reasons = {int(r["year"]): r for r in t["reasons-table"]}
    assert sorted(acc) == sorted(reasons) == store_years(full_tiny_store, "trade_cleaning_report")
    all_reasons = set()
    for y, row in acc.items():
        tc = parts(full_tiny_store, "trade_clean", y)
        tq = parts(full_tiny_store, "trade_quarantine", y)
        kept, quar, read = num(row["rows kept"]), num(row["rows quarantined"]), num(row["rows read"])
        assert read == kept + quar
        assert num(row["read - kept - quarantined"]) == 0 and row["identity holds"] == "yes"
        assert kept == pytest.approx(tc["source_rows"].sum())
        assert quar == tq.height
        assert num(row["value kept (USD)"]) == pytest.approx(tc["value_usd"].sum(), abs=1.0)
        by_reason = dict(tq.group_by("reason").len().iter_rows())
        all_reasons |= set(by_reason)
        shown = {k: num(v) for k, v in reasons[y].items() if k not in ("year", "total")}
        assert {k: v for k, v in shown.items() if v} == by_reason
        assert num(reasons[y]["total"]) == tq.height
    # every reason that quarantined a row in some year is a column
    assert set(t["reasons-table"][0]) - {"year", "total"} == all_reasons


def test_all_checks_pass_on_the_shared_store_and_every_gate_is_listed(built, full_tiny_store):
    html, _ = built
    t = tables(html)
    assert "failed-checks-table" not in t
    assert "recorded check outcomes passed" in html
    listed = {(r["asset"], r["partition"], r["check"]): r["passed"] for r in t["checks-table"]}
    gates = sorted(full_tiny_store.glob("*/year=*/_checks.json")) + sorted(full_tiny_store.glob("*/_checks.json"))
    assert gates
    for g in gates:
        body = json.loads(g.read_text())
        part = "all" if body["year"] is None else str(body["year"])
        for check, ok in body["checks"].items():
            assert listed[(body["asset"], part, check)] == ("true" if ok else "false")


def test_failed_gate_is_listed_first_and_stale_gate_flagged(store_copy, tiny_universe, tmp_path):
    gate = store_copy / "trade_clean" / "year=2005" / "_checks.json"
    body = json.loads(gate.read_text())
    body["checks"]["not_null"] = False
    gate.write_text(json.dumps(body))
    # rewrite 2006's data after its checks ran (new mtime): its gate evaluation is stale
    f = store_copy / "trade_clean" / "year=2006" / "part-0.parquet"
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    res = build_report(store_copy, tiny_universe, tmp_path / "out")
    html = res["html"].read_text(encoding="utf-8")
    failed = tables(html)["failed-checks-table"]
    assert [(r["asset"], r["partition"], r["check"]) for r in failed] == [("trade_clean", "2005", "not_null")]
    assert res["summary"]["failed_checks"] == 1
    # prominent: the first section of the page, before any other heading
    h2 = re.findall(r'<h2 id="([^"]+)"', html)
    assert h2[0] == "failed-checks"
    assert html.index('id="failed-checks-table"') < html.index("<nav>") < html.index('id="coverage"')
    assert 'class="banner bad"' in html
    summary = {r["asset"]: r for r in tables(html)["checks-summary-table"] if r["recorded in"] == "gate"}
    assert summary["trade_clean"]["failed (partition: check)"] == "2005: not_null"
    assert summary["trade_quarantine"]["failed (partition: check)"] == ""
    stale = {(r["asset"], r["partition"]) for r in tables(html)["checks-table"] if r["state"] == "stale"}
    assert stale == {("trade_clean", "2006")}  # the copy kept every other fingerprint
    assert "trade_clean[2006]" in html
    assert "FAILED check" in res["md"].read_text(encoding="utf-8")


def test_no_firm_identifiers_anywhere_in_the_report(built, full_tiny_store):
    html, md = built
    tc = pl.concat([parts(full_tiny_store, "trade_clean", y) for y in store_years(full_tiny_store, "trade_clean")])
    ids = tc["firm_id"].unique().to_list()
    hashes = tc["firm_name_hash"].drop_nulls().unique().sort().to_list()[:25]
    assert len(ids) > 20
    for v in ids + hashes:
        assert v not in html and v not in md, v


def test_package_versions_are_listed(built):
    html, _ = built
    got = {r["package"]: r["version"] for r in tables(html)["packages-table"]}
    for p in PACKAGES:
        assert got[p] == importlib.metadata.version(p), p


def test_source_fingerprint_equals_independent_hashlib(built, tiny_universe):
    """freshness.py: per year sha256 over the sorted lines 'relative path, size, sha256(content)' of the
    year's customs files; the report combines the years as sha256 over 'year<TAB>fingerprint<LF>'."""
    html, _ = built
    per_year: dict[int, list[str]] = {}
    customs = tiny_universe / "customs"
    for p in sorted(customs.rglob("*")):
        if not p.is_file() or p.suffix.lower() not in (".csv", ".txt", ".tsv", ".dta", ".parquet"):
            continue
        year = int(re.search(r"(19|20)\d\d", p.name).group(0))
        digest = hashlib.sha256(p.read_bytes()).hexdigest()
        per_year.setdefault(year, []).append(f"{p.relative_to(tiny_universe).as_posix()}\t{p.stat().st_size}\t{digest}")
    fps = {y: hashlib.sha256("".join(line + "\n" for line in sorted(rows)).encode()).hexdigest()
           for y, rows in per_year.items()}
    combined = hashlib.sha256("".join(f"{y}\t{fps[y]}\n" for y in sorted(fps)).encode()).hexdigest()
    m = re.search(r'<code class="fp" id="source-fingerprint">([0-9a-f]{64})</code>', html)
    assert m and m.group(1) == combined
    table = {int(r["year"]): r for r in tables(html)["fingerprint-table"]}
    assert {y: r["fingerprint (sha256)"] for y, r in table.items()} == fps
    assert all(r["trade_clean built from it"] == "yes" for r in table.values())


def test_study_tables_beside_published_numbers(built, full_tiny_store):
    html, md = built
    t = tables(html)
    for asset in ("s000_table1", "s000_table2"):
        tidy = parts(full_tiny_store, asset).filter(pl.col("published").is_not_null())
        shown = t[f"published-{asset}"]
        assert len(shown) == tidy.height > 0
        want = {(r["model"], r["term"], r["kind"], r["vcov"]): (r["estimate"], r["published"])
                for r in tidy.iter_rows(named=True)}
        for r in shown:
            est, pub = want[(r["model"], r["term"], r["kind"], r["vcov"])]
            assert num(r["estimate"]) == pytest.approx(est, abs=5e-5)
            assert num(r["published"]) == pytest.approx(pub, abs=5e-5)
            assert r["sign agrees"] == ("yes" if (est > 0) == (pub > 0) else "no")
    # every rendered HTML table of the store is embedded (one etable each)
    rendered = sorted(full_tiny_store.glob("*/rendered/*.html"))
    assert len(rendered) >= 4
    assert html.count('<table class="etable">') == len(rendered)
    # the replication page, with the sign count read from the s000_replication data
    rep = parts(full_tiny_store, "s000_replication")
    sentence = f"Signs agree in {int(rep['sign_agrees'].sum())} of {rep.height} published cells."
    assert sentence in html and sentence in md
    assert 'id="quality-table"' in html and 'id="decomposition-table"' in html
    q = tables(html)["quality-table"]
    assert [int(r["year"]) for r in q] == store_years(full_tiny_store, "quality_city_hs4")
    assert sum(num(r["cells"]) for r in q) == sum(
        parts(full_tiny_store, "quality_city_hs4", y).height for y in store_years(full_tiny_store, "quality_city_hs4"))


def test_missing_assets_are_noted_and_new_study_tables_picked_up(store_copy, tiny_universe, tmp_path):
    for a in ("s000_table2", "s000_figure3", "quality_decomposition"):
        shutil.rmtree(store_copy / a)
    # a later (hypothetical) study's table: tidy parquet + a rendered page that loads remote resources
    s4 = store_copy / "s009_table3"
    (s4 / "rendered").mkdir(parents=True)
    pl.DataFrame({"table": ["table3"] * 2, "model": ["(1)", "(1)"], "term": ["digital", "size"],
                  "kind": ["coef", "coef"], "estimate": [0.25, -1.5], "std_error": [0.1, 0.2], "vcov": ["CRV1"] * 2,
                  "n_obs": [100, 100], "published": [0.31, 2.0], "published_std_error": [0.05, 0.4],
                  "published_stars": ["***", "**"]}).write_parquet(s4 / "part-0.parquet")
    (s4 / "rendered" / "table3.html").write_text(
        '<!DOCTYPE html><html><head><link rel="stylesheet" href="https://cdn.example.org/x.css">'
        '<script src="https://cdn.example.org/x.js"></script><style>table.etable{color:#111}</style></head><body>'
        '<table class="etable"><tr><td>digital</td><td>0.250***</td></tr></table>'
        '<img src="http://example.org/p.png"><script>alert(1)</script></body></html>', encoding="utf-8")
    res = build_report(store_copy, tiny_universe, tmp_path / "out")
    html = res["html"].read_text(encoding="utf-8")
    md = res["md"].read_text(encoding="utf-8")
    for a in ("s000_table2", "s000_figure3", "quality_decomposition"):
        assert re.search(rf"Not materialised:</strong>[^<]*<code>{a}</code>", html), a
        assert f"**Not materialised:** `{a}`" in md, a
    # S000 Figures 1, 2, 4, 5 (Figure 3 removed) and the S004 placebo histogram
    assert html.count("data:image/png;base64,") == len(store_pngs(store_copy)) == 5
    t = tables(html)
    pub = t["published-s009_table3"]
    assert [(r["term"], r["sign agrees"]) for r in pub] == [("digital", "yes"), ("size", "no")]
    assert 'id="study-s009"' in html and "0.250***" in html
    assert "<script" not in html and "<link" not in html and not re.search(r"https?://", html)
    # the inventory lists the removed assets only when the report knows the graph; a bare store:
    empty = tmp_path / "empty_store"
    empty.mkdir()
    res = build_report(empty, tiny_universe, tmp_path / "out_empty")
    html = res["html"].read_text(encoding="utf-8")
    for sec in ("failed-checks", "coverage", "accounting", "checks", "studies", "quality", "figures", "config",
                "packages", "fingerprint"):
        assert f'<h2 id="{sec}">' in html, sec
    for a in ("trade_clean", "trade_cleaning_report", "s000_table1", "s000_replication", "quality_city_hs4",
              "s000_figure1"):
        assert re.search(rf"Not materialised:</strong>[^<]*<code>{a}</code>", html), a


def test_config_section_shows_given_switches_and_flags_outputs_built_otherwise(full_tiny_store, tiny_universe,
                                                                                tmp_path):
    cfg = tmp_path / "planted.yaml"
    cfg.write_text("resources:\n  s000:\n    config:\n      preset: planted\n", encoding="utf-8")
    out = tmp_path / "out"
    assert cli.main(["report", "--data", str(tiny_universe), "--store", str(full_tiny_store), "--out", str(out),
                     "--config", str(cfg)]) == 0
    html = (out / "report.html").read_text(encoding="utf-8")
    t = tables(html)
    s000 = next(v for k, v in t.items() if k.startswith("config-resource-s000"))
    assert {r["switch"]: r["value"] for r in s000}["preset"] == "planted"
    # the shared store was built with the defaults: exactly the assets using the s000 resource differ
    from kspill_pipeline.definitions import build_definitions

    defs = build_definitions(tiny_universe, full_tiny_store)
    uses_s000 = {k.to_user_string() for ad in defs.resolve_asset_graph().assets_defs if ad.is_executable
                 and "s000" in ad.required_resource_keys for k in ad.keys}
    with_lineage = {p.parent.name for p in full_tiny_store.glob("*/_lineage.json")}
    with_lineage |= {p.parent.parent.name for p in full_tiny_store.glob("*/year=*/_lineage.json")}
    differ = {r["asset"] for r in t["config-lineage-table"] if r["built with the configuration above"].startswith("NO")}
    assert differ == uses_s000 & with_lineage and differ
    assert 'class="banner warn"' in html and "built with another configuration" in html
    # an invalid setting: exit 2, naming the key and the allowed values, nothing written
    bad = tmp_path / "bad.yaml"
    bad.write_text("resources:\n  s000:\n    config:\n      preset: nope\n", encoding="utf-8")
    assert cli.main(["report", "--data", str(tiny_universe), "--store", str(full_tiny_store),
                     "--out", str(tmp_path / "out_bad"), "--config", str(bad)]) == 2
    assert not (tmp_path / "out_bad").exists()


def test_report_asset_is_registered_after_the_study_outputs_and_links_to_the_page(store_copy, tiny_universe):
    from dagster import AssetKey, DagsterInstance, materialize

    from kspill_pipeline.assets.report import REPORT_DEPS
    from kspill_pipeline.definitions import build_definitions

    defs = build_definitions(tiny_universe, store_copy)
    graph = defs.resolve_asset_graph()
    node = graph.get(AssetKey("kspill_report"))
    assert node.group_name == "report" and node.partitions_def is None
    assert {k.to_user_string() for k in node.parent_keys} == set(REPORT_DEPS)
    for dep in REPORT_DEPS:  # only deps that exist in the graph, all materialisable
        assert graph.has(AssetKey(dep)) and graph.get(AssetKey(dep)).is_materializable, dep
    assert not any(s.asset_key == AssetKey("kspill_report") for s in defs.resolve_assets_def(
        AssetKey("kspill_report")).check_specs)  # not gated: it reports the checks
    res = materialize(list(defs.assets), selection=["kspill_report"], resources=dict(defs.resources),
                      instance=DagsterInstance.ephemeral(), raise_on_error=False)
    assert res.success
    md = res.get_asset_materialization_events()[0].event_specific_data.materialization.metadata
    page = store_copy / "_report" / "report.html"
    assert md["path"].value == str(page) and page.is_file()
    assert md["url"].value == page.resolve().as_uri() and md["url"].value.startswith("file:///")
    assert md["failed_checks"].value == 0 and "No failed check" in md["summary"].value
    assert md["figures"].value == len(store_pngs(store_copy))
