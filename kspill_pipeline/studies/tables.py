"""Regression tables from tidy rows, rendered to Markdown, LaTeX (booktabs) and HTML.

Generic (any study): the input is a tidy frame (polars or pandas) with one row per
(column, term) and at least ``model, term, estimate, std_error``; optional ``p_value`` (stars),
``n_obs``, ``pseudo_r2``, ``fixed_effects`` (``"year+industry"``), ``vcov``, ``published``,
``published_std_error``, ``published_stars``. The layout follows fixest ``etable``: one column per
model, the estimate with significance stars and the standard error in parentheses below it, then
fixed-effect indicator rows, then the fit statistics (N, pseudo R2), and a note with the
significance codes. ``pf.etable`` is not used (with two or more FEs its FE rows show "-",
STACK_NOTES section 4).

``columns`` names the tidy columns whose values identify a table column (default ``("model",)``;
``("model", "vcov")`` puts several SE types of one model side by side). A (column, term) pair must
be unique: filter the tidy frame first (e.g. ``kind == "ame_naive"`` for Table 1 column 6).
``show_published=True`` adds a "published" side column next to every model column that has a
published value for any of its terms.

HTML output is self-contained (inline CSS, no script, no CDN).
"""

from __future__ import annotations

import html as _html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import polars as pl

DEFAULT_STARS: tuple[tuple[float, str], ...] = ((0.01, "***"), (0.05, "**"), (0.10, "*"))
Fmt = Literal["markdown", "latex", "html"]


def _as_polars(tidy: Any) -> pl.DataFrame:
    if isinstance(tidy, pl.DataFrame):
        return tidy
    if isinstance(tidy, pl.LazyFrame):
        return tidy.collect()
    return pl.from_pandas(tidy)


def stars_for(p: float | None, stars: Sequence[tuple[float, str]] = DEFAULT_STARS) -> str:
    """Significance stars for a p-value (thresholds ascending; '' when p is missing)."""
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return ""
    for cut, s in sorted(stars):
        if p < cut:
            return s
    return ""


def fmt_number(x: float | None, digits: int = 3) -> str:
    """Fixed ``digits`` decimals; values below ``10**-digits`` get two significant digits."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    if x == 0:
        return "0"
    if abs(x) >= 10 ** (-digits):
        return f"{x:.{digits}f}"
    mag = -int(math.floor(math.log10(abs(x))))
    return f"{x:.{mag + 1}f}"


@dataclass
class Grid:
    """Rendered cell texts, independent of the output format."""

    header: list[str]
    body: list[list[str]]  # coefficient block (estimate rows and SE rows)
    body_is_se: list[bool]
    fe_rows: list[list[str]]
    stat_rows: list[list[str]]
    notes: list[str] = field(default_factory=list)
    title: str | None = None
    published_cols: list[int] = field(default_factory=list)  # indices of published columns


def build_grid(
    tidy: Any,
    *,
    columns: Sequence[str] = ("model",),
    models: Sequence[str] | None = None,
    terms: Sequence[str] | None = None,
    term_labels: Mapping[str, str] | None = None,
    column_labels: Mapping[str, str] | None = None,
    fe_labels: Mapping[str, str] | None = None,
    digits: int = 3,
    se_digits: int = 4,
    stars: Sequence[tuple[float, str]] = DEFAULT_STARS,
    show_published: bool = False,
    show_fe: bool = True,
    stats: Sequence[tuple[str, str]] = (("n_obs", "Observations"), ("pseudo_r2", "Pseudo R2")),
    show_vcov: bool = True,
    title: str | None = None,
    notes: Sequence[str] = (),
) -> Grid:
    """Lay out a tidy frame as a grid of strings (see the module docstring)."""
    df = _as_polars(tidy)
    need = {"term", "estimate", "std_error", *columns}
    miss = need - set(df.columns)
    if miss:
        raise ValueError(f"tidy table lacks columns {sorted(miss)}")
    df = df.with_columns(
        pl.concat_str([pl.col(c).cast(pl.String) for c in columns], separator=" ").alias("_col")
    )
    col_keys = list(dict.fromkeys(df.get_column("_col").to_list()))
    if models is not None:
        col_keys = [c for c in models if c in col_keys]
        df = df.filter(pl.col("_col").is_in(col_keys))
    dup = df.group_by(["_col", "term"]).len().filter(pl.col("len") > 1)
    if dup.height:
        raise ValueError(
            f"(column, term) not unique, e.g. {dup.row(0)[:2]}; filter the tidy frame (kind, vcov) "
            f"or pass columns=(..., 'vcov')"
        )
    term_keys = list(dict.fromkeys(df.get_column("term").to_list()))
    if terms is not None:
        term_keys = [t for t in terms if t in term_keys]
    term_labels = dict(term_labels or {})
    column_labels = dict(column_labels or {})
    fe_labels = dict(fe_labels or {})
    cells: dict[tuple[str, str], dict[str, Any]] = {
        (r["_col"], r["term"]): r for r in df.iter_rows(named=True)
    }
    has_pub = show_published and "published" in df.columns
    pub_cols = set()
    if has_pub:
        pub_cols = {c for (c, _), r in cells.items() if r.get("published") is not None}

    header = [""]
    layout: list[tuple[str, bool]] = []  # (column key, is_published)
    for c in col_keys:
        header.append(column_labels.get(c, c))
        layout.append((c, False))
        if c in pub_cols:
            header.append("published")
            layout.append((c, True))
    published_idx = [i + 1 for i, (_, p) in enumerate(layout) if p]

    body: list[list[str]] = []
    is_se: list[bool] = []
    for t in term_keys:
        est_row = [term_labels.get(t, t)]
        se_row = [""]
        for c, pub in layout:
            r = cells.get((c, t))
            if r is None:
                est_row.append("")
                se_row.append("")
            elif pub:
                v = r.get("published")
                est_row.append("" if v is None else fmt_number(v, digits) + (r.get("published_stars") or ""))
                s = r.get("published_std_error")
                se_row.append("" if s is None else f"({fmt_number(s, se_digits)})")
            else:
                est_row.append(fmt_number(r["estimate"], digits) + stars_for(r.get("p_value"), stars))
                s = r["std_error"]
                se_row.append("" if s is None or (isinstance(s, float) and math.isnan(s))
                              else f"({fmt_number(s, se_digits)})")
        body += [est_row, se_row]
        is_se += [False, True]

    def per_column(getter) -> list[str]:
        out = []
        for c, pub in layout:
            if pub:
                out.append("")
                continue
            rs = [r for (cc, _), r in cells.items() if cc == c]
            out.append(getter(rs[0]) if rs else "")
        return out

    fe_rows: list[list[str]] = []
    if show_fe and "fixed_effects" in df.columns:
        fes: list[str] = []
        for v in df.get_column("fixed_effects").drop_nulls().to_list():
            for f in str(v).split("+"):
                f = f.strip()
                if f and f not in fes:
                    fes.append(f)
        for f in fes:
            fe_rows.append([fe_labels.get(f, f"{f} FE")] + per_column(
                lambda r, f=f: "Yes" if r.get("fixed_effects") and f in
                [x.strip() for x in str(r["fixed_effects"]).split("+")] else "No"))
    stat_rows: list[list[str]] = []
    for key, label in stats:
        if key not in df.columns:
            continue
        if key == "n_obs":
            stat_rows.append([label] + per_column(
                lambda r: "" if r.get("n_obs") is None else f"{int(r['n_obs']):,}"))
        else:
            stat_rows.append([label] + per_column(
                lambda r, key=key: fmt_number(r.get(key), 4) if r.get(key) is not None else ""))
    if show_vcov and "vcov" in df.columns and "vcov" not in columns:
        stat_rows.append(["S.E. type"] + per_column(lambda r: str(r.get("vcov") or "")))
    sig = ", ".join(f"{s} p<{c:g}" for c, s in sorted(stars, reverse=True))
    all_notes = [f"Standard errors in parentheses. Significance: {sig}.", *notes]
    if published_idx:
        all_notes.append("'published' columns: values as printed in the paper (stars as printed).")
    return Grid(header=header, body=body, body_is_se=is_se, fe_rows=fe_rows, stat_rows=stat_rows,
                notes=all_notes, title=title, published_cols=published_idx)


# --------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|").replace("*", "\\*")


def grid_to_markdown(g: Grid) -> str:
    lines = []
    if g.title:
        lines += [f"**{_md_escape(g.title)}**", ""]
    ncol = len(g.header)
    lines.append("| " + " | ".join(_md_escape(h) for h in g.header) + " |")
    lines.append("|" + "|".join([":---"] + [":---:"] * (ncol - 1)) + "|")
    for row in [*g.body, *g.fe_rows, *g.stat_rows]:
        lines.append("| " + " | ".join(_md_escape(c) for c in row) + " |")
    lines.append("")
    lines += [_md_escape(n) for n in g.notes]
    return "\n".join(lines) + "\n"


_LATEX_SPECIAL = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
                  "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}"}


def _tex(s: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in s)


def _tex_cell(s: str) -> str:
    core = s.rstrip("*")
    st = s[len(core):]
    out = _tex(core)
    return out + (f"$^{{{st}}}$" if st else "")


def grid_to_latex(g: Grid, *, caption: str | None = None, label: str | None = None) -> str:
    ncol = len(g.header)
    lines = [r"% requires \usepackage{booktabs}", r"\begin{table}[htbp]", r"\centering"]
    if caption or g.title:
        lines.append(rf"\caption{{{_tex(caption or g.title)}}}")
    if label:
        lines.append(rf"\label{{{label}}}")
    lines.append(r"\begin{tabular}{l" + "c" * (ncol - 1) + "}")
    lines.append(r"\toprule")
    lines.append(" & ".join(_tex(h) for h in g.header) + r" \\")
    lines.append(r"\midrule")
    for row in g.body:
        lines.append(" & ".join(_tex_cell(c) for c in row) + r" \\")
    if g.fe_rows:
        lines.append(r"\midrule")
        for row in g.fe_rows:
            lines.append(" & ".join(_tex(c) for c in row) + r" \\")
    if g.stat_rows:
        lines.append(r"\midrule")
        for row in g.stat_rows:
            lines.append(" & ".join(_tex(c) for c in row) + r" \\")
    lines.append(r"\bottomrule")
    lines.append(r"\end{tabular}")
    for n in g.notes:
        lines.append(rf"\par\footnotesize {_tex(n)}")
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


_CSS = (
    "table.etable{border-collapse:collapse;font-family:sans-serif;font-size:0.9em}"
    "table.etable th,table.etable td{padding:2px 10px;text-align:center}"
    "table.etable td:first-child,table.etable th:first-child{text-align:left}"
    "table.etable thead tr{border-top:2px solid #000;border-bottom:1px solid #000}"
    "table.etable tbody.stats tr:first-child,table.etable tbody.fe tr:first-child{border-top:1px solid #000}"
    "table.etable tbody:last-of-type tr:last-child{border-bottom:2px solid #000}"
    "table.etable .pub{color:#666;font-style:italic}"
    "table.etable tr.se td{color:#333;font-size:0.9em}"
    "p.etable-note{font-family:sans-serif;font-size:0.8em;margin:2px 0}"
)


def grid_to_html(g: Grid, *, full_page: bool = True) -> str:
    esc = _html.escape
    pub = set(g.published_cols)

    def cells(row: list[str], tag: str = "td") -> str:
        pub_attr = ' class="pub"'
        return "".join(
            f"<{tag}{pub_attr if i in pub else ''}>{esc(c)}</{tag}>" for i, c in enumerate(row)
        )

    parts = ['<table class="etable">']
    if g.title:
        parts.append(f"<caption>{esc(g.title)}</caption>")
    parts.append(f"<thead><tr>{cells(g.header, 'th')}</tr></thead>")
    parts.append("<tbody>")
    for row, se in zip(g.body, g.body_is_se, strict=True):
        se_attr = ' class="se"' if se else ""
        parts.append(f"<tr{se_attr}>{cells(row)}</tr>")
    parts.append("</tbody>")
    if g.fe_rows:
        parts.append('<tbody class="fe">' + "".join(f"<tr>{cells(r)}</tr>" for r in g.fe_rows) + "</tbody>")
    if g.stat_rows:
        parts.append('<tbody class="stats">' + "".join(f"<tr>{cells(r)}</tr>" for r in g.stat_rows)
                     + "</tbody>")
    parts.append("</table>")
    parts += [f'<p class="etable-note">{esc(n)}</p>' for n in g.notes]
    body = "\n".join(parts)
    if not full_page:
        return f"<style>{_CSS}</style>\n{body}\n"
    title = esc(g.title or "Regression table")
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{_CSS}</style></head><body>\n{body}\n</body></html>\n"
    )


def render(tidy: Any, fmt: Fmt = "markdown", **options: Any) -> str:
    """Render a tidy table: ``fmt`` in markdown | latex | html; options as :func:`build_grid`,
    plus ``caption``/``label`` (latex) and ``full_page`` (html)."""
    writer_opts = {k: options.pop(k) for k in ("caption", "label", "full_page") if k in options}
    g = build_grid(tidy, **options)
    if fmt == "markdown":
        return grid_to_markdown(g)
    if fmt == "latex":
        return grid_to_latex(g, **{k: v for k, v in writer_opts.items() if k in ("caption", "label")})
    if fmt == "html":
        return grid_to_html(g, **{k: v for k, v in writer_opts.items() if k == "full_page"})
    raise ValueError(f"fmt must be markdown, latex or html, not {fmt!r}")


def to_markdown(tidy: Any, **options: Any) -> str:
    return render(tidy, "markdown", **options)


def to_latex(tidy: Any, **options: Any) -> str:
    return render(tidy, "latex", **options)


def to_html(tidy: Any, **options: Any) -> str:
    return render(tidy, "html", **options)
