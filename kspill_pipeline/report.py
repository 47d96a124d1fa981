"""The replication report: one static HTML page (plus Markdown) built from the materialised store.

Pure module (no Dagster import): it reads only files, so ``kspill report`` works offline and without a
Dagster instance, and the ``kspill_report`` asset (``assets/report.py``) is thin wiring around
:func:`build_report`.

What it reads (see ``io/store.py`` and ``io/freshness.py`` for the layouts):

* partitions through :func:`store.scan` / :func:`store.existing_years` (``trade_clean``,
  ``trade_quarantine``, ``trade_cleaning_report``, ``quality_city_hs4``, ``quality_decomposition``,
  every study table);
* the check gates ``_checks.json`` beside partitions (blocking-check outcomes; a gate whose data were
  rewritten after its checks ran is *stale*) and the lineage records ``_lineage.json`` written by
  ``kspill run`` / ``kspill backfill`` (check outcomes of assets without a gate, the configuration
  digest and the raw-file fingerprint each partition was built from);
* every asset folder with a ``rendered/`` sub-folder (regression tables rendered to HTML/Markdown:
  ``s000_table1``, ``s000_table2``, later ``s004_table*``), ``s000_replication/replication.md``, and
  every PNG at ``<store>/<asset>/*.png`` or ``<store>/<asset>/rendered/*.png``;
* the raw customs files of the data directory (content fingerprints, :mod:`io.freshness`).

Sections: failed checks (first, always present), data coverage by year, cleaning accounting,
check results, study tables beside the published numbers, export quality summary, figures,
configuration in force, package versions, data source fingerprint. A section whose asset is not in
the store says so ("not materialised"); nothing is silently left out.

Guarantees: the HTML opens offline (inline CSS, figures as ``data:image/png;base64`` URIs, no
script, no external stylesheet or image; embedded rendered tables are stripped of ``<script>``,
``<link>`` and off-page ``src``/``href``). Only aggregates are shown (counts, sums, means per year,
regression coefficients): never firm names, firm identifiers or firm-level rows.

Data source fingerprint (:func:`source_fingerprint`): per year, the fingerprint of
:func:`io.freshness.year_fingerprints` (sha256 over the sorted lines ``relative path \\t size \\t
sha256(content)`` of the year's customs files); combined: sha256 over the lines ``year \\t
fingerprint \\n`` in ascending year order.
"""

from __future__ import annotations

import base64
import hashlib
import html as _html
import importlib.metadata
import json
import math
import platform
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from kspill_pipeline.io.store import write_file_atomic

from kspill_pipeline.io import freshness, store

__all__ = [
    "PACKAGES",
    "build_report",
    "markdown_to_html",
    "package_versions",
    "source_fingerprint",
]

#: Package versions shown in the report (``importlib.metadata``).
PACKAGES: tuple[str, ...] = ("dagster", "polars", "pyarrow", "pyfixest", "great_expectations", "dask", "numpy",
                             "scipy", "pandas", "matplotlib", "kspill-pipeline")
REPORT_ASSET = "kspill_report"  # the asset that builds this report (assets/report.py)
REPORT_HTML = "report.html"
REPORT_MD = "report.md"
DEFAULT_OUT = "_report"  # <store>/_report/
#: Study outputs the report expects (a missing one gets an explicit "not materialised" note).
S000_TABLES = ("s000_table1", "s000_table2")
S000_REPLICATION = "s000_replication"
S000_FIGURES = tuple(f"s000_figure{i}" for i in range(1, 6))
STUDY_TABLE_RE = re.compile(r"^s\d{3}_table\w*$")
#: Columns of a tidy study table shown beside the published numbers.
PUBLISHED_COLS = ("table", "model", "term", "kind", "vcov", "estimate", "std_error", "n_obs", "published",
                  "published_std_error", "published_stars")


# ------------------------------------------------------------------------------------------------
# formatting
# ------------------------------------------------------------------------------------------------


def _is_missing(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def fmt_count(x: Any) -> str:
    """Thousands separators; integral floats without decimals (rows may be float: split weights)."""
    if _is_missing(x):
        return ""
    if isinstance(x, float) and not x.is_integer():
        return f"{x:,.2f}"
    return f"{int(x):,}"


def fmt_usd(x: Any) -> str:
    return "" if _is_missing(x) else f"{x:,.0f}"


def fmt_share(x: Any) -> str:
    return "" if _is_missing(x) else f"{100 * x:.2f}%"


def fmt_num(x: Any, digits: int = 4) -> str:
    if _is_missing(x):
        return ""
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if x != 0 and abs(x) < 10 ** (-digits):
            return f"{x:.2e}"
        return f"{x:.{digits}f}"
    return str(x)


def _md_cell(s: str) -> str:
    return s.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


# ------------------------------------------------------------------------------------------------
# a document written to HTML and Markdown side by side
# ------------------------------------------------------------------------------------------------

_CSS = """
body{font-family:-apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif;margin:0 auto;max-width:1180px;
padding:16px 28px;color:#1d1d1f;line-height:1.45}
h1{font-size:1.7em;margin-bottom:0.2em}h2{border-bottom:2px solid #d0d7de;padding-bottom:4px;margin-top:2em}
h3{margin-top:1.4em}h4{margin-bottom:0.3em}
table.data{border-collapse:collapse;font-size:0.85em;margin:8px 0 14px 0;display:block;overflow-x:auto;max-width:100%}
table.data th,table.data td{border:1px solid #d0d7de;padding:3px 8px}
table.data th{background:#f3f5f7;text-align:left}
table.data td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.fail td{background:#ffe9e9}tr.stale td{background:#fff6dc}tr.missing td{color:#888;font-style:italic}
.banner{border-radius:6px;padding:10px 14px;margin:12px 0}
.banner.bad{background:#ffe9e9;border:2px solid #c62828}.banner.good{background:#e8f5e9;border:1px solid #2e7d32}
.banner.warn{background:#fff6dc;border:1px solid #b58900}
p.missing{color:#8a4b00;background:#fff6dc;border-left:4px solid #b58900;padding:4px 10px}
p.meta{color:#555;font-size:0.9em}
code{background:#f3f5f7;padding:0 3px;border-radius:3px;font-size:0.92em}
code.fp{word-break:break-all}
figure{margin:14px 0 24px 0}figure img{max-width:100%;border:1px solid #d0d7de}
figcaption{font-size:0.85em;color:#444;max-width:900px}
nav ol{columns:2;font-size:0.9em}
div.rendered{margin:8px 0 18px 0;overflow-x:auto}
details summary{cursor:pointer;color:#0b5cad}
pre{background:#f6f8fa;padding:8px;overflow-x:auto;font-size:0.85em}
"""


@dataclass
class _Doc:
    html: list[str] = field(default_factory=list)
    md: list[str] = field(default_factory=list)
    styles: list[str] = field(default_factory=list)

    def heading(self, level: int, text: str, anchor: str | None = None) -> None:
        a = f' id="{_html.escape(anchor)}"' if anchor else ""
        self.html.append(f"<h{level}{a}>{_html.escape(text)}</h{level}>")
        self.md += ["#" * level + " " + text, ""]

    def para(self, text: str, cls: str | None = None) -> None:
        c = f' class="{cls}"' if cls else ""
        self.html.append(f"<p{c}>{_inline_md(text)}</p>")
        self.md += [text, ""]

    def missing(self, what: str) -> None:
        """The explicit note of a section (or part) whose asset is not in the store."""
        self.html.append(f'<p class="missing"><strong>Not materialised:</strong> {_inline_md(what)}</p>')
        self.md += [f"> **Not materialised:** {what}", ""]

    def unavailable(self, what: str) -> None:
        """An input that is not an asset (data directory, source.yaml) could not be read."""
        self.html.append(f'<p class="missing"><strong>Not available:</strong> {_inline_md(what)}</p>')
        self.md += [f"> **Not available:** {what}", ""]

    def banner(self, kind: str, html_body: str, md_body: str) -> None:
        self.html.append(f'<div class="banner {kind}">{html_body}</div>')
        self.md += [md_body, ""]

    def raw(self, html_text: str = "", md_text: str = "") -> None:
        if html_text:
            self.html.append(html_text)
        if md_text:
            self.md += [md_text, ""]

    def table(
        self,
        header: Sequence[str],
        rows: Sequence[Sequence[str]],
        *,
        table_id: str | None = None,
        numeric: Iterable[int] = (),
        row_classes: Sequence[str | None] | None = None,
        max_md_rows: int | None = None,
    ) -> None:
        num = set(numeric)
        tid = f' id="{_html.escape(table_id)}"' if table_id else ""
        out = [f'<table class="data"{tid}><thead><tr>'
               + "".join(f"<th>{_html.escape(h)}</th>" for h in header) + "</tr></thead><tbody>"]
        for i, r in enumerate(rows):
            cls = row_classes[i] if row_classes else None
            c = f' class="{cls}"' if cls else ""
            out.append(f"<tr{c}>" + "".join(
                f'<td class="num">{_html.escape(str(v))}</td>' if j in num else f"<td>{_html.escape(str(v))}</td>"
                for j, v in enumerate(r)) + "</tr>")
        out.append("</tbody></table>")
        self.html.append("\n".join(out))
        md = ["| " + " | ".join(_md_cell(h) for h in header) + " |",
              "|" + "|".join("---:" if j in num else "---" for j in range(len(header))) + "|"]
        shown = rows if max_md_rows is None else rows[:max_md_rows]
        md += ["| " + " | ".join(_md_cell(str(v)) for v in r) + " |" for r in shown]
        if max_md_rows is not None and len(rows) > max_md_rows:
            md.append(f"\n({len(rows) - max_md_rows} more rows in report.html)")
        self.md += md + [""]


# ------------------------------------------------------------------------------------------------
# Markdown -> HTML (the subset the generated pages use) and embedding of rendered HTML
# ------------------------------------------------------------------------------------------------


def _inline_md(text: str) -> str:
    """Escape, then ``**bold**``, ``*em*`` and `` `code` ``; links keep their text only (no off-page
    references in the report)."""
    s = _html.escape(text, quote=False)
    s = re.sub(r"`([^`]+)`", lambda m: f"<code>{m.group(1)}</code>", s)
    s = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", s)
    s = re.sub(r"(?<![\w*])\*(?!\s)([^*]+?)\*(?![\w*])", r"<em>\1</em>", s)
    s = re.sub(r"\[([^\]]+)\]\(([^)]+)\)", r"\1", s)
    return s


def _split_row(line: str, ncols: int | None) -> list[str]:
    body = line.strip()
    if body.startswith("|"):
        body = body[1:]
    if body.endswith("|") and not body.endswith("\\|"):
        body = body[:-1]
    cells = [c.replace("\\|", "|").strip() for c in re.split(r"(?<!\\)\|", body)]
    if ncols is not None and len(cells) > ncols:
        # an unescaped "|" inside the first cell (e.g. "|coefficient|"): merge it back
        extra = len(cells) - ncols
        cells = ["|".join(cells[: extra + 1])] + cells[extra + 1:]
    return cells


def markdown_to_html(text: str, *, heading_offset: int = 0) -> str:
    """Headings, paragraphs, ``-``/``*`` lists, pipe tables and inline emphasis/code: enough for the
    generated study pages (``replication.md``, ``rendered/*.md``). Everything is HTML-escaped."""
    lines = text.splitlines()
    out: list[str] = []
    para: list[str] = []
    i = 0

    def flush() -> None:
        if para:
            out.append("<p>" + _inline_md(" ".join(para)) + "</p>")
            para.clear()

    while i < len(lines):
        line = lines[i]
        st = line.strip()
        m = re.match(r"^(#{1,6})\s+(.*)$", st)
        if not st:
            flush()
            i += 1
        elif m:
            flush()
            lvl = min(6, len(m.group(1)) + heading_offset)
            out.append(f"<h{lvl}>{_inline_md(m.group(2))}</h{lvl}>")
            i += 1
        elif st.startswith("|") and i + 1 < len(lines) and re.match(r"^\|?\s*:?-{2,}", lines[i + 1].strip()):
            flush()
            header = _split_row(st, None)
            i += 2
            rows = []
            while i < len(lines) and lines[i].strip().startswith("|"):
                rows.append(_split_row(lines[i], len(header)))
                i += 1
            t = ['<table class="data"><thead><tr>' + "".join(f"<th>{_inline_md(h)}</th>" for h in header)
                 + "</tr></thead><tbody>"]
            t += ["<tr>" + "".join(f"<td>{_inline_md(c)}</td>" for c in r) + "</tr>" for r in rows]
            out.append("\n".join(t) + "</tbody></table>")
        elif re.match(r"^[-*]\s+", st):
            flush()
            items = []
            while i < len(lines) and re.match(r"^[-*]\s+", lines[i].strip()):
                items.append(re.sub(r"^[-*]\s+", "", lines[i].strip()))
                i += 1
            out.append("<ul>" + "".join(f"<li>{_inline_md(x)}</li>" for x in items) + "</ul>")
        else:
            para.append(st)
            i += 1
    flush()
    return "\n".join(out)


_OFFPAGE = re.compile(r"""\s(?:src|href|srcset|action|poster|data)\s*=\s*(?:"[^"]*(?:https?:)?//[^"]*"|'[^']*(?:https?:)?//[^']*'|[^\s>]*//[^\s>]*)""",
                      re.IGNORECASE)


def sanitize_html_fragment(text: str) -> tuple[list[str], str]:
    """(inline ``<style>`` blocks, body) of a rendered HTML table: the body of a full page, without
    scripts, external stylesheets, frames, meta tags or off-page ``src``/``href`` attributes."""
    styles = re.findall(r"<style[^>]*>.*?</style>", text, flags=re.S | re.I)
    m = re.search(r"<body[^>]*>(.*)</body>", text, flags=re.S | re.I)
    body = m.group(1) if m else re.sub(r"<style[^>]*>.*?</style>", "", text, flags=re.S | re.I)
    for pat in (r"<script\b.*?</script\s*>", r"<script\b[^>]*>", r"<iframe\b.*?</iframe\s*>", r"<link\b[^>]*>",
                r"<meta\b[^>]*>", r"<base\b[^>]*>", r"<!DOCTYPE[^>]*>", r"</?html\b[^>]*>", r"<head\b.*?</head>",
                r"<title\b.*?</title>"):
        body = re.sub(pat, "", body, flags=re.S | re.I)
    body = _OFFPAGE.sub("", body)
    body = re.sub(r"\son\w+\s*=\s*(\"[^\"]*\"|'[^']*')", "", body, flags=re.I)  # event handlers
    styles = [re.sub(r"@import[^;]*;", "", s, flags=re.I) for s in styles]
    styles = [re.sub(r"url\(\s*['\"]?(?:https?:)?//[^)]*\)", "none", s, flags=re.I) for s in styles]
    return styles, body.strip()


# ------------------------------------------------------------------------------------------------
# readers
# ------------------------------------------------------------------------------------------------


def asset_dirs(root: Path) -> list[str]:
    """Asset folders of the store (names starting with ``_`` or ``.`` are bookkeeping)."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))


def _unpartitioned(root: Path, asset: str) -> bool:
    return store.is_published(root, asset, None)


def _published(root: Path, asset: str) -> bool:
    return _unpartitioned(root, asset) or bool(store.existing_years(root, asset))


def _read(root: Path, asset: str, years: Iterable[int] | None = None) -> pl.DataFrame | None:
    try:
        return store.scan(root, asset, years, missing_ok=True).collect()
    except FileNotFoundError:
        return None


def _rows_of(root: Path, asset: str, year: int | None) -> int | None:
    import pyarrow.parquet as pq

    try:
        return int(sum(pq.ParquetFile(p).metadata.num_rows for p in store.partition_files(root, asset, year)))
    except (FileNotFoundError, OSError):
        return None


def _years_label(years: Sequence[int]) -> str:
    """``2000-2003, 2005`` from a sorted list."""
    if not years:
        return ""
    runs, start, prev = [], years[0], years[0]
    for y in list(years[1:]) + [None]:
        if y is not None and y == prev + 1:
            prev = y
            continue
        runs.append(str(start) if start == prev else f"{start}-{prev}")
        if y is not None:
            start = prev = y
    return ", ".join(runs)


@dataclass
class CheckRow:
    asset: str
    partition: str
    check: str
    passed: bool
    source: str  # gate | lineage
    state: str  # passed | FAILED | stale (data rewritten after the checks ran)
    written_utc: str = ""


def check_rows(root: Path) -> list[CheckRow]:
    """Every recorded check outcome: the gate files (``_checks.json``) and, for partitions without a
    gate, the check outcomes of their lineage records (``_lineage.json``)."""
    out: list[CheckRow] = []
    for asset in asset_dirs(root):
        base = root / asset
        folders = [(None, base)] + sorted(
            ((int(d.name.split("=", 1)[1]), d) for d in base.glob("year=*") if d.is_dir()), key=lambda t: t[0])
        for year, d in folders:
            part = "all" if year is None else str(year)
            gate = d / store.GATE_NAME
            lin = d / freshness.LINEAGE_NAME
            body, source = None, None
            if gate.is_file():
                try:
                    body, source = json.loads(gate.read_text(encoding="utf-8")), "gate"
                except (OSError, json.JSONDecodeError):
                    out.append(CheckRow(asset, part, "<_checks.json unreadable>", False, "gate", "FAILED"))
                    continue
            elif lin.is_file():
                body, source = freshness.read_lineage(root, asset, year), "lineage"
            if not body or not body.get("checks"):
                continue
            try:
                current = store.data_fingerprint(root, asset, year)
            except FileNotFoundError:
                current = freshness.MISSING
            stale = body.get("data_fingerprint") != current
            for name, ok in sorted((body.get("checks") or {}).items()):
                state = "FAILED" if not ok else ("stale" if stale else "passed")
                out.append(CheckRow(asset, part, name, bool(ok), source, state, str(body.get("written_utc", ""))))
    return out


def source_fingerprint(data_dir: Path | str, cache: freshness.FileHashCache | None = None) -> dict[str, Any]:
    """Per-year content fingerprints of the raw customs files (``io.freshness``) and their combined
    sha256 (lines ``year\\tfingerprint\\n`` in ascending year order)."""
    files = freshness.year_files(data_dir)
    fps = freshness.year_fingerprints(data_dir, cache=cache, files=files)
    h = hashlib.sha256()
    for y in sorted(fps):
        h.update(f"{y}\t{fps[y]}\n".encode("utf-8"))
    return {"years": fps, "files": {y: len(v) for y, v in files.items()},
            "bytes": {y: sum(p.stat().st_size for p in v) for y, v in files.items()}, "combined": h.hexdigest()}


def package_versions(packages: Iterable[str] = PACKAGES) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for p in packages:
        try:
            out[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            out[p] = "not installed"
    return out


def _load_source(data_dir: Path | None) -> tuple[Any, str | None]:
    if data_dir is None:
        return None, "no data directory given"
    if not (Path(data_dir) / "source.yaml").is_file():
        return None, f"{data_dir}/source.yaml not found"
    from kspill_pipeline.config import load_source_config

    try:
        return load_source_config(data_dir), None
    except Exception as e:  # report, never crash on a broken source.yaml
        return None, f"{data_dir}/source.yaml: {' '.join(str(e).split())}"


def _contract_caption(asset: str) -> str:
    from kspill_pipeline.contracts.loader import load_contract

    try:
        desc = " ".join(load_contract(asset).description.split())
    except Exception:  # no contract for this asset
        return ""
    m = re.match(r"(.+?[.])(\s|$)", desc)
    return m.group(1) if m else desc


# ------------------------------------------------------------------------------------------------
# sections
# ------------------------------------------------------------------------------------------------


def _section_failed_checks(doc: _Doc, checks: list[CheckRow]) -> dict[str, int]:
    failed = [c for c in checks if c.state == "FAILED"]
    stale = [c for c in checks if c.state == "stale"]
    doc.heading(2, "Failed checks", "failed-checks")
    if not checks:
        doc.banner("warn", "<strong>No check outcomes recorded in the store</strong> (no <code>_checks.json</code> "
                   "gate or <code>_lineage.json</code> record): nothing has been materialised, or outputs were "
                   "written outside <code>kspill run</code>/<code>backfill</code>.",
                   "**No check outcomes recorded in the store.**")
    elif failed:
        n_parts = len({(c.asset, c.partition) for c in failed})
        doc.banner("bad", f"<strong>{len(failed)} failed check(s)</strong> in {n_parts} partition(s) of "
                   f"{len({c.asset for c in failed})} asset(s). Outputs downstream of them are not trustworthy.",
                   f"**{len(failed)} FAILED check(s)** in {n_parts} partition(s).")
    else:
        doc.banner("good", f"All {len(checks)} recorded check outcomes passed.",
                   f"All {len(checks)} recorded check outcomes passed.")
    if failed:
        doc.table(["asset", "partition", "check", "recorded in", "written (UTC)"],
                  [[c.asset, c.partition, c.check, c.source, c.written_utc] for c in failed],
                  table_id="failed-checks-table", row_classes=["fail"] * len(failed))
    if stale:
        parts = sorted({(c.asset, c.partition) for c in stale})
        doc.para(f"**{len(parts)} partition(s) were rewritten after their checks ran** (stale evaluation; re-run "
                 "them with `kspill backfill`): " + ", ".join(f"{a}[{p}]" for a, p in parts[:40])
                 + (f" (+{len(parts) - 40} more)" if len(parts) > 40 else ""), cls="missing")
    return {"failed": len(failed), "stale_partitions": len({(c.asset, c.partition) for c in stale}),
            "evaluated": len(checks)}


def _coverage(root: Path, years: list[int]) -> list[dict[str, Any]]:
    report = _read(root, "trade_cleaning_report")
    rows = []
    for y in years:
        r: dict[str, Any] = {"year": y, "materialised": store.is_published(root, "trade_clean", y)}
        if r["materialised"]:
            agg = store.scan(root, "trade_clean", [y]).select(
                pl.len().alias("rows"),
                pl.col("firm_id").n_unique().alias("firms"),
                pl.col("value_usd").filter(pl.col("flow") == "export").sum().alias("export_usd"),
                pl.col("value_usd").filter(pl.col("flow") == "import").sum().alias("import_usd"),
                pl.col("value_usd").sum().alias("value_usd"),
            ).collect().row(0, named=True)
            r.update(agg)
        if store.is_published(root, "trade_quarantine", y):
            r["quarantine_rows"] = _rows_of(root, "trade_quarantine", y)
        if report is not None:
            rep = {d["rule"]: d for d in report.filter(pl.col("year") == y).to_dicts()}
            if "read" in rep:
                r["read"] = rep["read"]["rows"]
                q = rep.get("quarantined", {})
                r["quarantined"] = q.get("rows")
                r["share_rows_q"] = (q.get("rows") or 0) / rep["read"]["rows"] if rep["read"]["rows"] else None
                vr = rep["read"]["value_usd"]
                r["share_value_q"] = (q.get("value_usd") or 0) / vr if vr else None
        rows.append(r)
    return rows


def _section_coverage(doc: _Doc, root: Path, years: list[int], inventory: list[dict[str, Any]]) -> None:
    doc.heading(2, "Data coverage by year", "coverage")
    if not _published(root, "trade_clean"):
        doc.missing("`trade_clean` (no year in the store): run `kspill run --select trade_clean+`.")
    else:
        cov = _coverage(root, years)
        doc.para("Cleaned customs data (`trade_clean`: one row per firm x region x flow x HS line x partner x mode x "
                 "unit x year) and what the cleaning quarantined (`trade_cleaning_report`, `trade_quarantine`). "
                 "Firms = distinct customs firm codes (counted, never listed).")
        body, classes = [], []
        for r in cov:
            if not r["materialised"]:
                body.append([str(r["year"]), "not materialised"] + [""] * 8)
                classes.append("missing")
                continue
            body.append([str(r["year"]), fmt_count(r["rows"]), fmt_count(r["firms"]), fmt_usd(r["export_usd"]),
                         fmt_usd(r["import_usd"]), fmt_usd(r["value_usd"]), fmt_count(r.get("read")),
                         fmt_count(r.get("quarantine_rows")), fmt_share(r.get("share_rows_q")),
                         fmt_share(r.get("share_value_q"))])
            classes.append(None)
        doc.table(["year", "trade_clean rows", "firms", "exports (USD)", "imports (USD)", "value (USD)",
                   "raw rows read", "rows quarantined", "quarantined (rows)", "quarantined (value)"],
                  body, table_id="coverage-table", numeric=range(1, 10), row_classes=classes)
        missing = [r["year"] for r in cov if not r["materialised"]]
        if missing:
            doc.missing(f"`trade_clean` for year(s) {_years_label(missing)} of the source range.")
        if not _published(root, "trade_cleaning_report"):
            doc.missing("`trade_cleaning_report`: raw rows read and quarantine shares are unknown.")
    doc.heading(3, "Materialised assets", "inventory")
    doc.para("Every asset folder of the store (and every asset of the pipeline when the report knows the graph): "
             "partitions present, rows (parquet metadata) and when its newest lineage record was written.")
    body, classes = [], []
    for it in inventory:
        body.append([it["asset"], it["layout"], it["partitions"], fmt_count(it["rows"]) if it["rows"] is not None
                     else "", it["missing"], it["built"]])
        classes.append("missing" if it["partitions"] == "not materialised" else None)
    doc.table(["asset", "layout", "partitions", "rows", "missing years", "last built (UTC)"], body,
              table_id="inventory-table", numeric=[3], row_classes=classes)


def _inventory(root: Path, years: list[int], assets: Mapping[str, bool] | None) -> list[dict[str, Any]]:
    names = set(asset_dirs(root)) | set(assets or {})
    out = []
    for a in sorted(names):
        ys = store.existing_years(root, a)
        unpart = _unpartitioned(root, a)
        partitioned = (assets or {}).get(a, bool(ys) and not unpart)
        built = []
        for y in ([None] if unpart else ys):
            rec = freshness.read_lineage(root, a, y)
            if rec and rec.get("written_utc"):
                built.append(rec["written_utc"])
        if a == REPORT_ASSET:
            rows, part, miss = None, "this report", ""
        elif unpart:
            rows = _rows_of(root, a, None)
            part, miss = "all years (1 partition)", ""
        elif ys:
            rows = sum(_rows_of(root, a, y) or 0 for y in ys)
            part = f"{len(ys)} year(s): {_years_label(ys)}"
            miss = _years_label([y for y in years if y not in set(ys)])
        else:
            rows, part, miss = None, "not materialised", _years_label(years) if partitioned else ""
            if not (root / a).is_dir() and a not in (assets or {}):
                continue
        out.append({"asset": a, "layout": "yearly" if partitioned else "all years", "partitions": part,
                    "rows": rows, "missing": miss, "built": max(built) if built else ""})
    return out


def _section_accounting(doc: _Doc, root: Path, years: list[int]) -> dict[str, Any]:
    doc.heading(2, "Cleaning accounting", "accounting")
    report = _read(root, "trade_cleaning_report")
    if report is None or report.is_empty():
        doc.missing("`trade_cleaning_report`: no cleaning accounting available.")
        return {}
    doc.para("Every raw row read is either kept in `trade_clean` (counted through `source_rows`) or quarantined "
             "in `trade_quarantine` with one reason code: rows read = kept + quarantined, and the same for "
             "parseable trade value (blocking check `row_value_accounting`).")
    body, classes, bad = [], [], []
    for y in sorted(report["year"].unique().to_list()):
        rep = {d["rule"]: d for d in report.filter(pl.col("year") == y).to_dicts()}
        rd, kp, qu = (rep.get(k, {}) for k in ("read", "kept", "quarantined"))
        diff = (rd.get("rows") or 0) - (kp.get("rows") or 0) - (qu.get("rows") or 0)
        vdiff = (rd.get("value_usd") or 0) - (kp.get("value_usd") or 0) - (qu.get("value_usd") or 0)
        ok = abs(diff) < 1e-6 and abs(vdiff) <= 1e-6 * max(1.0, abs(rd.get("value_usd") or 0))
        if not ok:
            bad.append(y)
        body.append([str(y), fmt_count(rd.get("rows")), fmt_count(kp.get("rows")), fmt_count(qu.get("rows")),
                     fmt_count(diff), fmt_usd(rd.get("value_usd")), fmt_usd(kp.get("value_usd")),
                     fmt_usd(qu.get("value_usd")), "yes" if ok else "NO"])
        classes.append(None if ok else "fail")
    doc.table(["year", "rows read", "rows kept", "rows quarantined", "read - kept - quarantined", "value read (USD)",
               "value kept (USD)", "value quarantined (USD)", "identity holds"], body,
              table_id="accounting-table", numeric=range(1, 8), row_classes=classes)
    if bad:
        doc.para(f"**The accounting identity does not hold in year(s) {_years_label(bad)}.**", cls="missing")
    missing = [y for y in years if y not in set(report["year"].unique().to_list())]
    if missing:
        doc.missing(f"`trade_cleaning_report` for year(s) {_years_label(missing)}.")

    reasons = (report.filter(pl.col("rule").str.starts_with("quarantine:"))
               .with_columns(pl.col("rule").str.replace("^quarantine:", "").alias("reason")))
    active = sorted(reasons.filter(pl.col("rows") > 0)["reason"].unique().to_list())
    doc.heading(3, "Rows quarantined by year and reason", "accounting-reasons")
    if not active:
        doc.para("No row was quarantined.")
    else:
        wide = {(d["year"], d["reason"]): d["rows"] for d in reasons.to_dicts()}
        body = []
        for y in sorted(reasons["year"].unique().to_list()):
            vals = [wide.get((y, r), 0.0) for r in active]
            body.append([str(y)] + [fmt_count(v) for v in vals] + [fmt_count(sum(vals))])
        doc.table(["year"] + active + ["total"], body, table_id="reasons-table", numeric=range(1, len(active) + 2))
        doc.para("Reason codes: see README \"Cleaning rules\" (a row carries the first rule it broke). Reasons "
                 "with no quarantined row in any year are not shown as columns.")
    flags = report.filter(pl.col("action") == "flagged")
    if not flags.is_empty():
        doc.heading(3, "Study exclusions flagged (kept in trade_clean)", "accounting-flags")
        rules = [r for r in flags["rule"].unique(maintain_order=True).to_list()
                 if flags.filter(pl.col("rule") == r)["rows"].sum() > 0]
        agg = (flags.filter(pl.col("rule").is_in(rules)).group_by("rule")
               .agg(pl.col("rows").sum(), pl.col("value_usd").sum()).sort("rule"))
        tot = report.filter(pl.col("rule") == "kept").select(pl.col("rows").sum(), pl.col("value_usd").sum()).row(0)
        doc.table(["flag", "rows (all years)", "value (USD)", "share of kept rows", "share of kept value"],
                  [[d["rule"], fmt_count(d["rows"]), fmt_usd(d["value_usd"]),
                    fmt_share(d["rows"] / tot[0] if tot[0] else None),
                    fmt_share(d["value_usd"] / tot[1] if tot[1] else None)] for d in agg.to_dicts()],
                  table_id="flags-table", numeric=range(1, 5))
    return {"identity_failures": bad}


def _section_checks(doc: _Doc, checks: list[CheckRow]) -> None:
    doc.heading(2, "Check results", "checks")
    if not checks:
        doc.missing("no check outcome recorded (no `_checks.json` gate or `_lineage.json` record in the store).")
        return
    doc.para("Blocking-check gates (`_checks.json`, written beside each partition by the gated assets) and, for "
             "partitions without a gate, the check outcomes recorded in their lineage (`_lineage.json`, written by "
             "`kspill run`/`backfill`). *stale*: the data were rewritten after the checks ran.")
    summary: dict[tuple[str, str], list[CheckRow]] = {}
    for c in checks:
        summary.setdefault((c.asset, c.source), []).append(c)
    body, classes = [], []
    for (a, src), cs in sorted(summary.items()):
        failed = [f"{c.partition}: {c.check}" for c in cs if c.state == "FAILED"]
        stale = sorted({c.partition for c in cs if c.state == "stale"})
        body.append([a, src, str(len({c.partition for c in cs})), ", ".join(sorted({c.check for c in cs})),
                     str(len(cs)), str(sum(c.state == "passed" for c in cs)),
                     "; ".join(failed[:20]) + (" ..." if len(failed) > 20 else ""),
                     ", ".join(stale[:20]) + (" ..." if len(stale) > 20 else "")])
        classes.append("fail" if failed else ("stale" if stale else None))
    doc.heading(3, "Summary by asset", "checks-summary")
    doc.table(["asset", "recorded in", "partitions", "checks", "outcomes", "passed", "failed (partition: check)",
               "stale partitions"], body, table_id="checks-summary-table", numeric=[2, 4, 5], row_classes=classes)
    doc.heading(3, "Every recorded check", "checks-all")
    d = _Doc()
    d.table(["asset", "partition", "check", "passed", "state", "recorded in"],
            [[c.asset, c.partition, c.check, "true" if c.passed else "false", c.state, c.source] for c in checks],
            table_id="checks-table",
            row_classes=["fail" if c.state == "FAILED" else ("stale" if c.state == "stale" else None) for c in checks])
    doc.raw(f"<details><summary>{len(checks)} check outcomes (asset, partition, check, passed)</summary>\n"
            + "\n".join(d.html) + "\n</details>", "\n".join(d.md))


def _published_table(doc: _Doc, df: pl.DataFrame, asset: str) -> None:
    cols = [c for c in PUBLISHED_COLS if c in df.columns]
    if "published" not in df.columns or "estimate" not in df.columns:
        doc.para(f"`{asset}` has no `published` column: no published numbers to compare.")
        return
    sub = df.filter(pl.col("published").is_not_null())
    if sub.is_empty():
        doc.para(f"`{asset}`: no published value for any of its rows.")
        return
    body, classes = [], []
    for r in sub.select(cols).to_dicts():
        est, pub = r.get("estimate"), r.get("published")
        agree = None if _is_missing(est) or _is_missing(pub) else (math.copysign(1, est) == math.copysign(1, pub))
        ratio = est / pub if agree is not None and pub else None
        row = []
        for c in cols:
            v = r[c]
            row.append(fmt_num(v, 4) if isinstance(v, float) else ("" if v is None else str(v)))
        row += ["" if agree is None else ("yes" if agree else "no"), fmt_num(ratio, 2)]
        body.append(row)
        classes.append("stale" if agree is False else None)
    header = cols + ["sign agrees", "ours / published"]
    num = [i for i, c in enumerate(header) if c in ("estimate", "std_error", "n_obs", "published",
                                                    "published_std_error", "ours / published")]
    n_agree = sum(1 for b in body if b[-2] == "yes")
    doc.para(f"`{asset}`: {len(body)} cell(s) with a published value; signs agree in {n_agree}.")
    doc.table(header, body, table_id=f"published-{asset}", numeric=num, row_classes=classes)


def _rendered(doc: _Doc, root: Path, asset: str) -> int:
    rd = root / asset / "rendered"
    htmls = sorted(rd.glob("*.html"), key=lambda p: (not p.stem.startswith("table"), p.name))
    mds = {p.stem: p for p in rd.glob("*.md")}
    for f in htmls:
        if f.name.startswith("."):
            continue
        styles, body = sanitize_html_fragment(f.read_text(encoding="utf-8", errors="replace"))
        for s in styles:
            if s not in doc.styles:
                doc.styles.append(s)
        md = mds[f.stem].read_text(encoding="utf-8", errors="replace").strip() if f.stem in mds else \
            f"(rendered HTML only: `{asset}/rendered/{f.name}`)"
        doc.raw(f'<h4>{_html.escape(asset)} / {_html.escape(f.stem)}</h4>\n'
                f'<div class="rendered" id="rendered-{_html.escape(asset)}-{_html.escape(f.stem)}">{body}</div>',
                f"#### {asset} / {f.stem}\n\n{md}")
    for stem, p in sorted(mds.items()):
        if not (rd / f"{stem}.html").is_file() and not stem.startswith("."):
            text = p.read_text(encoding="utf-8", errors="replace")
            doc.raw(f"<h4>{_html.escape(asset)} / {_html.escape(stem)}</h4>\n<div class=\"rendered\">"
                    f"{markdown_to_html(text)}</div>", f"#### {asset} / {stem}\n\n{text.strip()}")
    return len(htmls)


def _section_studies(doc: _Doc, root: Path) -> None:
    doc.heading(2, "Study tables beside the published numbers", "studies")
    dirs = asset_dirs(root)
    table_assets = sorted({a for a in dirs if STUDY_TABLE_RE.match(a) or (root / a / "rendered").is_dir()})
    studies = sorted({a.split("_", 1)[0] for a in table_assets} | {"s000"})
    for study in studies:
        doc.heading(3, f"Study {study.upper()}", f"study-{study}")
        expected = [a for a in table_assets if a.startswith(study + "_")]
        if study == "s000":
            expected = sorted(set(expected) | set(S000_TABLES))
        for a in expected:
            has_rendered = (root / a / "rendered").is_dir()
            if not _published(root, a) and not has_rendered:
                doc.missing(f"`{a}`.")
                continue
            doc.heading(4, a, f"table-{a}")
            cap = _contract_caption(a)
            if cap:
                doc.para(cap, cls="meta")
            if not has_rendered or not _rendered(doc, root, a):
                doc.para(f"`{a}`: no rendered table in `{a}/rendered/`.", cls="missing")
            df = _read(root, a)
            if df is None:
                doc.missing(f"`{a}` tidy data (only its rendered files are in the store).")
            else:
                _published_table(doc, df, a)
        if study == "s000":
            doc.heading(4, "Replication page (s000_replication)", "s000-replication")
            page = root / S000_REPLICATION / "replication.md"
            if page.is_file():
                text = page.read_text(encoding="utf-8", errors="replace")
                md = re.sub(r"^(#{1,4}) ", lambda m: "#" * min(6, len(m.group(1)) + 3) + " ", text, flags=re.M)
                doc.raw(f'<div class="rendered" id="replication-page">{markdown_to_html(text, heading_offset=3)}</div>',
                        md.strip())
            else:
                doc.missing(f"`{S000_REPLICATION}` (`{S000_REPLICATION}/replication.md`).")
            rep = _read(root, S000_REPLICATION)
            if rep is not None and "sign_agrees" in rep.columns:
                by = (rep.group_by("table").agg(pl.len().alias("cells"), pl.col("sign_agrees").sum().alias("agree"))
                      .sort("table"))
                doc.table(["table", "published cells", "signs agree"],
                          [[d["table"], str(d["cells"]), str(d["agree"])] for d in by.to_dicts()],
                          table_id="replication-summary", numeric=[1, 2])
    if not any(a.startswith("s004_") for a in table_assets):
        doc.heading(3, "Study S004", "study-s004")
        doc.missing("S004 tables (`s004_table*`): none in the store yet.")


def _section_quality(doc: _Doc, root: Path) -> None:
    doc.heading(2, "Export quality summary", "quality")
    q = _read(root, "quality_city_hs4")
    if q is None or q.is_empty():
        doc.missing("`quality_city_hs4` (city x HS4 export quality, spec S004 Eq. 21).")
    else:
        doc.para("City x HS4 export quality `hs4_qua` (spec S004 Eq. 21) by year: cells, cities, HS4 industries, "
                 "unweighted and export-value weighted mean, and the range.")
        agg = (q.group_by("year").agg(
            pl.len().alias("cells"), pl.col("city_code").n_unique().alias("cities"),
            pl.col("hs4").n_unique().alias("hs4"), pl.col("hs4_qua").mean().alias("mean"),
            ((pl.col("hs4_qua") * pl.col("value_usd")).sum() / pl.col("value_usd").sum()).alias("wmean"),
            pl.col("hs4_qua").min().alias("min"), pl.col("hs4_qua").max().alias("max"),
            pl.col("value_usd").sum().alias("value"),
            pl.col("variant").unique().sort().str.join(", ").alias("variant")).sort("year"))
        doc.table(["year", "cells", "cities", "HS4", "mean hs4_qua", "value-weighted mean", "min", "max",
                   "rated exports (USD)", "variant"],
                  [[str(d["year"]), fmt_count(d["cells"]), fmt_count(d["cities"]), fmt_count(d["hs4"]),
                    fmt_num(d["mean"]), fmt_num(d["wmean"]), fmt_num(d["min"]), fmt_num(d["max"]),
                    fmt_usd(d["value"]), d["variant"]] for d in agg.to_dicts()],
                  table_id="quality-table", numeric=range(1, 9))
    d = _read(root, "quality_decomposition")
    if d is None:
        doc.missing("`quality_decomposition` (Melitz-Polanec decomposition, spec S004 Eq. 23).")
    elif d.is_empty():
        doc.para("`quality_decomposition`: materialised, no cell with rated units in two consecutive years.")
    else:
        doc.para("Melitz-Polanec decomposition of the change in city x HS4 quality between t-1 and t (spec S004 "
                 "Eq. 23): mean over cells with continuers (status ok) of each component; identity error = "
                 "total - (within + between + entry + exit).")
        ok = pl.col("status") == "ok"
        agg = (d.group_by("year").agg(
            pl.len().alias("cells"), ok.sum().alias("ok"),
            *[pl.col(c).filter(ok).mean().alias(c) for c in ("total", "within", "between", "entry", "exit", "gap")],
            pl.col("identity_error").abs().max().alias("maxerr")).sort("year"))
        doc.table(["year", "cells", "with continuers", "total", "within", "between", "entry", "exit", "gap",
                   "max |identity error|"],
                  [[str(r["year"]), fmt_count(r["cells"]), fmt_count(r["ok"])]
                   + [fmt_num(r[c]) for c in ("total", "within", "between", "entry", "exit", "gap")]
                   + [fmt_num(r["maxerr"], 2) if r["maxerr"] is not None else ""] for r in agg.to_dicts()],
                  table_id="decomposition-table", numeric=range(1, 10))


def figure_files(root: Path) -> list[Path]:
    """Every PNG at ``<store>/<asset>/*.png`` and ``<store>/<asset>/rendered/*.png`` (hidden and
    temporary files excluded)."""
    out: list[Path] = []
    for a in asset_dirs(root):
        for pat in ("*.png", "rendered/*.png"):
            out += sorted(p for p in (root / a).glob(pat) if p.is_file() and not p.name.startswith("."))
    return out


def _section_figures(doc: _Doc, root: Path) -> int:
    doc.heading(2, "Figures", "figures")
    pngs = figure_files(root)
    by_asset = {p.relative_to(root).parts[0] for p in pngs}
    for a in S000_FIGURES:
        if a not in by_asset:
            doc.missing(f"`{a}` (no `{a}/figure.png`).")
    for p in pngs:
        asset = p.relative_to(root).parts[0]
        rel = p.relative_to(root).as_posix()
        b64 = base64.b64encode(p.read_bytes()).decode("ascii")
        cap = _contract_caption(asset)
        caption = f"{rel}" + (f": {cap}" if cap else "")
        doc.raw(f'<figure id="fig-{_html.escape(rel)}"><img alt="{_html.escape(rel)}" '
                f'src="data:image/png;base64,{b64}"><figcaption>{_inline_md(caption)}</figcaption></figure>',
                f"![{rel}](data:image/png;base64,{b64})\n\n*{caption}*")
    if not pngs:
        doc.para("No figure (PNG) in the store.")
    return len(pngs)


def _section_config(doc: _Doc, root: Path, source: Any, source_err: str | None, run_config: Mapping | None,
                    switches: Mapping[str, Mapping[str, Any]] | None, config_digests: Mapping[str, str] | None,
                    config_file: str | None) -> dict[str, Any]:
    doc.heading(2, "Configuration in force", "config")
    out: dict[str, Any] = {}
    if switches:
        doc.para("The study and cleaning switches as the pipeline resolves them for a run with this configuration: "
                 "defaults of the Dagster resources and op configs, the data source's `source.yaml`, then the run "
                 "configuration" + (f" `{config_file}`" if config_file else " (none given: defaults)") + ".")
        for name, vals in switches.items():
            doc.heading(4, name)
            doc.table(["switch", "value"], [[k, json.dumps(v, ensure_ascii=False, default=str)
                                             if not isinstance(v, str) else v] for k, v in vals.items()],
                      table_id=f"config-{re.sub(r'[^A-Za-z0-9_]+', '-', name)}")
    else:
        doc.para("Resolved switches not available (the report was built without the pipeline definitions): shown "
                 "are the data source settings and the run configuration as given.", cls="missing")
    if run_config:
        doc.heading(4, "Run configuration given" + (f" ({config_file})" if config_file else ""))
        txt = json.dumps(run_config, indent=1, ensure_ascii=False, default=str, sort_keys=True)
        doc.raw(f"<pre>{_html.escape(txt)}</pre>", f"```json\n{txt}\n```")
    doc.heading(4, "Data source (source.yaml)")
    if source is None:
        doc.unavailable(f"data source settings: {source_err}.")
    else:
        extra = dict(source.model_extra or {})
        rows = [["name", source.name], ["years", f"{source.years.start}-{source.years.end}"],
                ["customs_dir", source.customs_dir], ["companion_dir", source.companion_dir]]
        rows += [[k, json.dumps(v, ensure_ascii=False, default=str)] for k, v in sorted(extra.items())]
        doc.table(["key", "value"], rows, table_id="source-config")
    # which stored outputs were built with this configuration (lineage records carry its digest)
    recs: dict[str, list[tuple[str, str]]] = {}
    for a in asset_dirs(root):
        for y in [None] + store.existing_years(root, a):
            rec = freshness.read_lineage(root, a, y)
            if rec and (rec.get("inputs") or {}).get("config"):
                recs.setdefault(a, []).append(("all" if y is None else str(y), rec["inputs"]["config"]))
    doc.heading(4, "Configuration the stored outputs were built with", "config-lineage")
    if not recs:
        doc.para("No lineage record (`_lineage.json`) in the store: outputs written outside `kspill run`/`backfill` "
                 "(e.g. from the Dagster UI) carry no record of their configuration here; the UI shows it in each "
                 "materialisation's `config` metadata.", cls="missing")
        return out
    body, classes, differing = [], [], []
    for a, lst in sorted(recs.items()):
        digests = sorted({d for _, d in lst})
        want = (config_digests or {}).get(a)
        if want is None:
            match = "n/a"
        else:
            bad = [p for p, d in lst if d != want]
            match = "all" if not bad else f"NO: {', '.join(bad[:10])}" + (" ..." if len(bad) > 10 else "")
            if bad:
                differing.append(a)
        body.append([a, str(len(lst)), ", ".join(digests[:4]) + (" ..." if len(digests) > 4 else ""), match])
        classes.append("fail" if match.startswith("NO") else None)
    if config_digests:
        if differing:
            doc.para(f"**{len(differing)} asset(s) hold partitions built with a different configuration than the one "
                     f"shown above:** {', '.join(differing)}. Re-run them (`kspill backfill`) or pass the "
                     "configuration they were built with (`--config`).", cls="missing")
        else:
            doc.para("Every stored partition with a lineage record was built with the configuration shown above.")
    doc.table(["asset", "partitions with lineage", "configuration digest(s)", "built with the configuration above"],
              body, table_id="config-lineage-table", numeric=[1], row_classes=classes)
    out["differing"] = differing
    return out


def _section_packages(doc: _Doc) -> dict[str, str]:
    doc.heading(2, "Package versions", "packages")
    v = package_versions()
    doc.table(["package", "version"], [[k, x] for k, x in v.items()], table_id="packages-table")
    return v


def _section_fingerprint(doc: _Doc, root: Path, data_dir: Path | None) -> str | None:
    doc.heading(2, "Data source fingerprint", "fingerprint")
    if data_dir is None or not Path(data_dir).is_dir():
        doc.unavailable(f"raw data directory {data_dir or '(not given)'} not found: no fingerprint.")
        return None
    try:
        fp = source_fingerprint(data_dir, cache=freshness.load_hash_cache(root))
    except (FileNotFoundError, ValueError) as e:
        doc.unavailable(f"raw customs files: {' '.join(str(e).split())}")
        return None
    doc.raw(f'<p>Combined sha256 of the raw customs files: <code class="fp" id="source-fingerprint">'
            f'{fp["combined"]}</code></p>', f"Combined sha256 of the raw customs files: `{fp['combined']}`")
    doc.para("Per year: sha256 over the sorted lines `relative path, size, sha256 of the content` of the year's "
             "files (`io/freshness.py`); combined: sha256 over the lines `year, fingerprint` in year order. "
             "'trade_clean built from it' compares with the raw fingerprint in the lineage record of the stored "
             "partition.", cls="meta")
    body, classes = [], []
    for y, f in sorted(fp["years"].items()):
        rec = ((freshness.read_lineage(root, "trade_clean", y) or {}).get("inputs") or {}).get(
            freshness.raw_input_name(y))
        built = "not recorded" if rec is None else ("yes" if rec == f else "NO (raw files changed since)")
        body.append([str(y), str(fp["files"].get(y, 0)), fmt_count(fp["bytes"].get(y, 0)), f, built])
        classes.append("stale" if built.startswith("NO") else None)
    doc.table(["year", "files", "bytes", "fingerprint (sha256)", "trade_clean built from it"], body,
              table_id="fingerprint-table", numeric=[1, 2], row_classes=classes)
    return fp["combined"]


# ------------------------------------------------------------------------------------------------
# the report
# ------------------------------------------------------------------------------------------------



def build_report(
    store_dir: Path | str,
    data_dir: Path | str | None,
    out_dir: Path | str | None = None,
    run_config: Mapping[str, Any] | None = None,
    *,
    switches: Mapping[str, Mapping[str, Any]] | None = None,
    config_digests: Mapping[str, str] | None = None,
    assets: Mapping[str, bool] | None = None,
    config_file: str | None = None,
) -> dict[str, Any]:
    """Write ``report.html`` and ``report.md`` into ``out_dir`` (default ``<store>/_report``).

    ``run_config``: the Dagster run configuration given (``--config``), shown as given.
    ``switches``: section name -> {switch: value} of the configuration in force (resolved by the caller,
    which knows the Dagster definitions: ``assets.report.config_in_force``); ``config_digests``: asset ->
    configuration digest as ``kspill run`` records it in ``_lineage.json``, to flag stored partitions built
    with another configuration; ``assets``: every asset of the graph -> partitioned?, so assets never
    materialised are listed too. All optional: without them the report shows what the files say.

    Returns ``{"html": Path, "md": Path, "summary": dict, "summary_md": str}``.
    """
    root = Path(store_dir)
    data = Path(data_dir) if data_dir is not None else None
    out = Path(out_dir) if out_dir is not None else root / DEFAULT_OUT
    source, source_err = _load_source(data)
    if source is not None:
        years = source.years.years()
    else:
        years = sorted(set(store.existing_years(root, "trade_clean")))
    checks = check_rows(root)
    inventory = _inventory(root, years, assets)
    synthetic = bool(source is not None and (source.model_extra or {}).get("generator"))

    body = _Doc()
    fc = _section_failed_checks(body, checks)
    _section_coverage(body, root, years, inventory)
    acc = _section_accounting(body, root, years)
    _section_checks(body, checks)
    _section_studies(body, root)
    _section_quality(body, root)
    n_fig = _section_figures(body, root)
    cfg = _section_config(body, root, source, source_err, run_config, switches, config_digests, config_file)
    pkgs = _section_packages(body)
    fp = _section_fingerprint(body, root, data)

    generated = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    n_mat = sum(1 for it in inventory if it["partitions"] != "not materialised")
    summary = {
        "generated_utc": generated, "store": str(root), "data": str(data) if data else None,
        "failed_checks": fc["failed"], "stale_partitions": fc["stale_partitions"],
        "checks_recorded": fc["evaluated"], "assets_materialised": n_mat, "assets_listed": len(inventory),
        "figures": n_fig, "source_fingerprint": fp, "accounting_identity_failures": acc.get("identity_failures", []),
        "config_differs": cfg.get("differing", []), "synthetic": synthetic,
    }
    head = _Doc()
    title = "kspill replication report"
    head.heading(1, title)
    src_label = f"{source.name} ({data})" if source is not None else f"{data} ({source_err})"
    head.raw(f'<p class="meta">Generated {generated} &middot; store <code>{_html.escape(str(root))}</code> &middot; '
             f"data {_inline_md(src_label)} &middot; years {years[0] if years else '?'}-"
             f"{years[-1] if years else '?'} &middot; {n_mat} asset(s) materialised</p>",
             f"Generated {generated} · store `{root}` · data {src_label} · "
             f"years {years[0] if years else '?'}-{years[-1] if years else '?'} · {n_mat} asset(s) materialised")
    if synthetic:
        head.banner("warn", "<strong>Synthetic data.</strong> These outputs come from kspill's synthetic customs "
                    "universe; they cannot reproduce the published magnitudes (compare signs and relative sizes).",
                    "> **Synthetic data.** These outputs come from kspill's synthetic customs universe; they cannot "
                    "reproduce the published magnitudes.")
    if cfg.get("differing"):
        head.banner("warn", f"<strong>{len(cfg['differing'])} asset(s) hold partitions built with another "
                    "configuration</strong> than the one this report shows: "
                    f"{_html.escape(', '.join(cfg['differing']))} (see <a href=\"#config-lineage\">Configuration</a>).",
                    f"> **{len(cfg['differing'])} asset(s) hold partitions built with another configuration** than "
                    f"the one this report shows: {', '.join(cfg['differing'])}.")
    toc = [("failed-checks", "Failed checks"), ("coverage", "Data coverage by year"),
           ("accounting", "Cleaning accounting"), ("checks", "Check results"),
           ("studies", "Study tables beside the published numbers"), ("quality", "Export quality summary"),
           ("figures", "Figures"), ("config", "Configuration in force"), ("packages", "Package versions"),
           ("fingerprint", "Data source fingerprint")]
    nav = "<nav><ol>" + "".join(f'<li><a href="#{a}">{_html.escape(t)}</a></li>' for a, t in toc) + "</ol></nav>"

    styles = f"<style>{_CSS}</style>\n" + "\n".join(body.styles)
    first = _first_section_len(body)  # the failed-checks section goes right below the title
    html_text = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_html.escape(title)}</title>\n{styles}\n</head><body>\n"
        + "\n".join(head.html[:2] + body.html[:first] + head.html[2:] + [nav] + body.html[first:])
        + "\n</body></html>\n"
    )
    md_text = "\n".join(head.md + body.md).rstrip() + "\n"
    out.mkdir(parents=True, exist_ok=True)
    write_file_atomic(out / REPORT_HTML, html_text)
    write_file_atomic(out / REPORT_MD, md_text)
    return {"html": out / REPORT_HTML, "md": out / REPORT_MD, "summary": summary,
            "summary_md": summary_markdown(summary)}


def _first_section_len(doc: _Doc) -> int:
    """Number of HTML blocks of the first section (failed checks): it goes right below the title."""
    for i, h in enumerate(doc.html[1:], start=1):
        if h.startswith("<h2"):
            return i
    return len(doc.html)


def summary_markdown(summary: Mapping[str, Any]) -> str:
    """A few lines for the asset's materialisation metadata."""
    fc = summary["failed_checks"]
    lines = [("**FAILED checks: %d**" % fc) if fc else f"No failed check ({summary['checks_recorded']} recorded).",
             f"- assets materialised: {summary['assets_materialised']} of {summary['assets_listed']}",
             f"- figures: {summary['figures']}"]
    if summary.get("stale_partitions"):
        lines.append(f"- partitions rewritten after their checks ran: {summary['stale_partitions']}")
    if summary.get("accounting_identity_failures"):
        lines.append(f"- accounting identity fails in: {summary['accounting_identity_failures']}")
    if summary.get("config_differs"):
        lines.append(f"- built with another configuration: {', '.join(summary['config_differs'])}")
    if summary.get("source_fingerprint"):
        lines.append(f"- data source fingerprint: `{summary['source_fingerprint']}`")
    return "\n".join(lines)
