"""Study S000 replication page: our Tables 1-2 beside the published ones (issue 4, "Validation").

Pure polars (no Dagster). Input: the tidy frames of ``s000_table1`` / ``s000_table2`` (their
``published`` / ``published_std_error`` columns come from ``studies/published/s000.yaml``, spec S000
section 5). Output: a comparison frame (one row per published cell) and a Markdown page.

What is compared, and why only this
-----------------------------------
Synthetic data cannot reproduce the paper's magnitudes (the confidential customs panel is not
ours; the synthetic universe plants its own coefficients). The page therefore reports

* **signs**: does our estimate have the published sign (every published cell is significant at 1%)?
* **relative sizes** that do not depend on the data's scale:
  - the ordering of |coefficient| across regressors in the standardised Model (5) (spec 5.1);
  - the ratio AME / beta of Model (6) over Model (5), which the paper's numbers put at 0.070-0.074
    for every regressor (spec 5.1 [DERIVED]); equal ratios across regressors are the signature of
    the naive per-column AMEs;
  - Table 2's patterns (spec 5.2): density_firm higher in the West than the East and density_city
    higher in the East; density_firm falling and density_city rising from low to high
    marketization.
On a researcher's own customs data the same page shows how close the magnitudes come.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import polars as pl

__all__ = ["comparison", "patterns", "replication_page", "DISCLAIMER_SYNTHETIC"]

DISCLAIMER_SYNTHETIC = (
    "**These numbers come from kspill's synthetic customs universe, not from the confidential Chinese "
    "customs data of the paper. Synthetic data cannot reproduce the published magnitudes;** compare "
    "signs and relative sizes only. The synthetic generator plants its own coefficients (see "
    "`_truth/planted.json`), which the test suite recovers."
)
DISCLAIMER_REAL = (
    "These numbers come from the customs data in the configured data directory. Differences in "
    "cleaning choices (see the switches below) move the estimates; the paper's sample is 2002-2016."
)

_T2_ORDER = ("Low mkt", "Mid mkt", "High mkt")


def _sign(x: float | None) -> int | None:
    if x is None:
        return None
    return (x > 0) - (x < 0)


def comparison(tidy: pl.DataFrame) -> pl.DataFrame:
    """One row per published cell: ours beside the published value, sign agreement and ratio.

    Table 1 columns (1)-(5) compare ``kind == "coef"``; column (6) compares ``ame_naive`` (what
    the paper computed, spec 5.1). Table 2 compares the subsample coefficients.
    """
    keep = tidy.filter(pl.col("published").is_not_null() & pl.col("table").is_in(["table1", "table2"]))
    keep = keep.filter(
        ((pl.col("model") != "(6)") & (pl.col("kind") == "coef"))
        | ((pl.col("model") == "(6)") & (pl.col("kind") == "ame_naive"))
    )
    out = keep.select(
        "table", "model", "term", "kind", "estimate", "std_error", "n_obs", "published", "published_std_error",
    ).with_columns(
        pl.col("estimate").sign().cast(pl.Int8).alias("sign"),
        pl.col("published").sign().cast(pl.Int8).alias("published_sign"),
    ).with_columns(
        (pl.col("sign") == pl.col("published_sign")).alias("sign_agrees"),
        pl.when(pl.col("published") != 0).then(pl.col("estimate") / pl.col("published")).alias("ratio_to_published"),
    )
    return out.sort("table", "model", "term")


def _get(tidy: pl.DataFrame, table: str, model: str, term: str, kind: str = "coef") -> float | None:
    r = tidy.filter((pl.col("table") == table) & (pl.col("model") == model) & (pl.col("term") == term)
                    & (pl.col("kind") == kind))
    return None if r.height == 0 else float(r["estimate"][0])


def _pub(tidy: pl.DataFrame, table: str, model: str, term: str, kind: str = "coef") -> float | None:
    r = tidy.filter((pl.col("table") == table) & (pl.col("model") == model) & (pl.col("term") == term)
                    & (pl.col("kind") == kind))
    return None if r.height == 0 or r["published"][0] is None else float(r["published"][0])


def patterns(tidy: pl.DataFrame) -> list[dict[str, Any]]:
    """The scale-free relations of spec S000 section 5, ours and published.

    Each entry: ``name``, ``ours`` (value or ordering), ``published``, ``holds`` (ours shows the
    published relation; None when a needed column is missing, e.g. a skipped subsample).
    """
    res: list[dict[str, Any]] = []
    terms = [t for t in ("density_firm", "density_city", "interaction", "tradevalue", "newexport")]

    # 1. ordering of |standardised coefficient| in Model (5)
    ours5 = {t: _get(tidy, "table1", "(5)", t) for t in terms}
    pub5 = {t: _pub(tidy, "table1", "(5)", t) for t in terms}
    if all(v is not None for v in ours5.values()) and all(v is not None for v in pub5.values()):
        o = sorted(terms, key=lambda t: -abs(ours5[t]))
        p = sorted(terms, key=lambda t: -abs(pub5[t]))
        res.append({"name": "Model (5): regressors ordered by |standardised coefficient|",
                    "ours": " > ".join(o), "published": " > ".join(p), "holds": o == p})

    # 2. AME / beta ratios of (6) over (5)
    ratios = {}
    pub_ratios = {}
    for t in terms:
        a, b = _get(tidy, "table1", "(6)", t, "ame_naive"), ours5.get(t)
        if a is not None and b:
            ratios[t] = a / b
        pa, pb = _pub(tidy, "table1", "(6)", t, "ame_naive"), pub5.get(t)
        if pa is not None and pb:
            pub_ratios[t] = pa / pb
    if ratios:
        spread = max(ratios.values()) - min(ratios.values())
        res.append({"name": "AME/beta, (6) over (5): one common ratio for every regressor (naive AMEs)",
                    "ours": ", ".join(f"{t} {v:.4f}" for t, v in ratios.items()),
                    "published": ", ".join(f"{t} {v:.3f}" for t, v in pub_ratios.items()),
                    "holds": spread < 1e-9 * max(1.0, max(abs(v) for v in ratios.values()))})

    # 3. Table 2: East vs West
    for term, rel, text in (("density_firm", "West", "density_firm: West > East"),
                            ("density_city", "East", "density_city: East > West")):
        e, w = _get(tidy, "table2", "East", term), _get(tidy, "table2", "West", term)
        pe, pw = _pub(tidy, "table2", "East", term), _pub(tidy, "table2", "West", term)
        holds = None if e is None or w is None else ((w > e) if rel == "West" else (e > w))
        res.append({"name": f"Table 2, {text}",
                    "ours": None if holds is None else f"East {e:.3f}, West {w:.3f}",
                    "published": None if pe is None else f"East {pe:.3f}, West {pw:.3f}", "holds": holds})

    # 4. Table 2: marketization gradient
    for term, direction in (("density_firm", "falls"), ("density_city", "rises")):
        vals = [_get(tidy, "table2", g, term) for g in _T2_ORDER]
        pvals = [_pub(tidy, "table2", g, term) for g in _T2_ORDER]
        if any(v is None for v in vals):
            holds = None
        elif direction == "falls":
            holds = vals[0] > vals[1] > vals[2]
        else:
            holds = vals[0] < vals[1] < vals[2]
        res.append({"name": f"Table 2, {term} {direction} from low to high marketization",
                    "ours": None if holds is None else " -> ".join(f"{v:.3f}" for v in vals),
                    "published": " -> ".join(f"{v:.3f}" for v in pvals if v is not None), "holds": holds})
    return res


def _fmt(x: float | None, se: float | None = None, digits: int = 3) -> str:
    if x is None:
        return ""
    s = f"{x:.{digits}f}"
    return s if se is None else f"{s} ({se:.{max(digits, 4)}f})"


def _mark(v: bool | None) -> str:
    return "n/a" if v is None else ("yes" if v else "**no**")


def replication_page(
    tidy: pl.DataFrame,
    *,
    synthetic: bool,
    data_label: str,
    years: Sequence[int],
    switches: Mapping[str, Any],
    skipped: Mapping[str, str] | None = None,
) -> str:
    """The Markdown replication page (generated; never edited by hand)."""
    comp = comparison(tidy)
    lines = ["# Study S000 replication: Liu & Zhu (2021), Tables 1-2", ""]
    lines += [DISCLAIMER_SYNTHETIC if synthetic else DISCLAIMER_REAL, ""]
    yrs = f"{min(years)}-{max(years)}" if years else "none"
    lines += [f"- Data: {data_label}", f"- Panel years: {yrs}",
              "- Estimator: pooled Probit, year and industry fixed effects (pyfixest `feglm` unless the "
              "`estimator` switch says otherwise); published values: spec S000 section 5.", ""]
    n_agree = int(comp["sign_agrees"].sum() or 0)
    lines += [f"**Signs agree in {n_agree} of {comp.height} published cells.**", ""]

    lines += ["## Scale-free relations", "", "| relation | ours | published | holds |", "|---|---|---|---|"]
    for p in patterns(tidy):
        lines.append(f"| {p['name']} | {p['ours'] or ''} | {p['published'] or ''} | {_mark(p['holds'])} |")
    lines.append("")

    for table, title in (("table1", "Table 1 (columns 1-5: coefficients; 6: AMEs of model 5, naive)"),
                         ("table2", "Table 2 (full model by subsample)")):
        sub = comp.filter(pl.col("table") == table)
        lines += [f"## {title}", "", "| model | term | ours (SE) | published (SE) | sign agrees | ours / published |",
                  "|---|---|---|---|---|---|"]
        for r in sub.iter_rows(named=True):
            ratio = "" if r["ratio_to_published"] is None else f"{r['ratio_to_published']:.2f}"
            lines.append(f"| {r['model']} | {r['term']} | {_fmt(r['estimate'], r['std_error'])} | "
                         f"{_fmt(r['published'], r['published_std_error'])} | {_mark(r['sign_agrees'])} | {ratio} |")
        if table == "table2" and skipped:
            lines.append("")
            lines += [f"- subsample **{k}** not estimated: {v}" for k, v in skipped.items()]
        lines.append("")
    n_obs = tidy.filter((pl.col("table") == "table1") & (pl.col("model") == "(4)"))["n_obs"]
    if n_obs.len():
        lines += [f"Table 1 estimation sample: {int(n_obs.max()):,} firm x HS4 x year rows.", ""]
    lines += ["## Switches in force (spec S000 section 7)", "", "| switch | value |", "|---|---|"]
    lines += [f"| `{k}` | `{v}` |" for k, v in switches.items()]
    lines.append("")
    return "\n".join(lines)
