"""Melitz-Polanec (2015) dynamic Olley-Pakes decomposition of the change in cell quality.

Pure polars (never import Dagster here). Spec S004 section 3.5, Eq. (23), and the [AMBIG] items
there; issue 5 "Decomposition".

For a cell (default city x HS4) observed in periods 1 = t-1 and 2 = t, with units i (switch
``unit``: HS6 products of the cell, or firm x HS6 x destination flows) carrying an export value
and a quality ``q_i`` (rqua; for HS6 units the value-weighted rqua of the cell's flows of that
product, so that the cell aggregate is exactly ``hs4_qua`` of Eq. 21):

* ``s_it`` = value share of unit i in the cell in period t (over the units with a quality);
* groups: S continuers (in both periods), E entrants (period 2 only), X exiters (period 1 only);
  ``s_Gt = sum_{i in G} s_it``; ``Q_Gt = sum_{i in G} (s_it / s_Gt) q_it``;
* ``qbar_St`` = unweighted mean of ``q_it`` over S; ``cov_St = sum_{i in S} (s_it/s_St - 1/n_S)
  (q_it - qbar_St)``, so that ``Q_St = qbar_St + cov_St``;
* ``Q_t = sum_i s_it q_it`` (the cell's value-weighted quality) and

      total   = Q_2 - Q_1
      within  = qbar_S2 - qbar_S1            (the spec prints qbar_s1 - qbar_s2: sign typo)
      between = cov_S2 - cov_S1
      entry   = s_E2 (Q_E2 - Q_S2)           (0 when there is no entrant)
      exit    = s_X1 (Q_S1 - Q_X1)           (0 when there is no exiter)
      gap     = between + entry + exit       (Griliches-Regev-style "product reallocation")

  with ``total = within + between + entry + exit`` exactly (up to floating rounding; the output
  carries the per-cell ``identity_error`` for the blocking check).

Conventions the paper does not fix (documented in the README):
* only cells with at least one rated unit in BOTH periods are decomposed (a change needs two
  levels); cells present in one period only are counted in the summary;
* a cell without continuers (complete turnover) has no ``Q_S``: its ``total`` is reported, the four
  components and ``gap`` are null and ``status = "no_continuers"``;
* units with a null quality are left out before shares are formed (shares renormalised over the
  rated units, as the weights of Eq. 21).
"""

from __future__ import annotations

from typing import Any, Literal

import polars as pl

__all__ = ["mp_decomposition", "quality_decomposition", "DECOMP_UNITS"]

DECOMP_UNITS: dict[str, list[str]] = {
    # decomp_cell = city_hs4_yearpair_i_hs6 (spec default) / city_hs4_yearpair_i_flow
    "hs6": ["hs6"],
    "flow": ["firm_id", "hs6", "partner_iso3"],
}


def _prep(df: pl.DataFrame, keys: list[str], q: str, v: str, tag: str) -> tuple[pl.DataFrame, int]:
    miss = [c for c in (*keys, q, v) if c not in df.columns]
    if miss:
        raise ValueError(f"mp_decomposition: period {tag} lacks column(s) {miss}")
    d = df.select(*keys, pl.col(q).cast(pl.Float64).alias("q"), pl.col(v).cast(pl.Float64).alias("v"))
    n_null = int(d["q"].null_count())
    d = d.filter(pl.col("q").is_not_null())
    if d.select(pl.struct(keys).is_duplicated().any()).item():
        raise ValueError(f"mp_decomposition: period {tag} has duplicate (cell, unit) rows on {keys}")
    if d.height and not bool((d["v"] > 0).all()):
        raise ValueError(f"mp_decomposition: period {tag} has non-positive or null values in {v!r}")
    return d, n_null


def mp_decomposition(
    prev: pl.DataFrame,
    curr: pl.DataFrame,
    *,
    cell_cols: list[str],
    unit_cols: list[str],
    quality_col: str,
    value_col: str,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Melitz-Polanec decomposition per cell between ``prev`` (period 1) and ``curr`` (period 2).

    Each frame has one row per (cell, unit) with a quality and a positive value (weights). Returns
    (frame, summary). Frame: cell_cols, q_prev (Q_1), q_curr (Q_2), total, within, between, entry,
    exit, gap, n_continuers, n_entrants, n_exiters, share_entrants (s_E2), share_exiters (s_X1),
    identity_error (total - within - between - entry - exit), status (ok | no_continuers); sorted
    by cell. Formulas: module docstring.
    """
    keys = [*cell_cols, *unit_cols]
    p1, null1 = _prep(prev, keys, quality_col, value_col, "t-1")
    p2, null2 = _prep(curr, keys, quality_col, value_col, "t")
    share = pl.col("v") / pl.col("v").sum().over(cell_cols)
    p1 = p1.with_columns(share.alias("s")).select(*keys, pl.col("s").alias("s1"), pl.col("q").alias("q1"))
    p2 = p2.with_columns(share.alias("s")).select(*keys, pl.col("s").alias("s2"), pl.col("q").alias("q2"))
    cells1 = p1.select(cell_cols).unique()
    cells2 = p2.select(cell_cols).unique()
    both = cells1.join(cells2, on=cell_cols, how="inner")
    m = (
        p1.join(p2, on=keys, how="full", coalesce=True)
        .join(both, on=cell_cols, how="semi")
        .with_columns(
            (pl.col("s1").is_not_null() & pl.col("s2").is_not_null()).alias("_S"),
            (pl.col("s1").is_null() & pl.col("s2").is_not_null()).alias("_E"),
            (pl.col("s1").is_not_null() & pl.col("s2").is_null()).alias("_X"),
        )
    )
    S, E, X = pl.col("_S"), pl.col("_E"), pl.col("_X")
    c = cell_cols
    # continuer moments (window over the cell)
    m = m.with_columns(
        S.sum().over(c).alias("nS"),
        pl.col("s1").filter(S).sum().over(c).alias("sS1"),
        pl.col("s2").filter(S).sum().over(c).alias("sS2"),
        pl.col("q1").filter(S).mean().over(c).alias("qbar1"),
        pl.col("q2").filter(S).mean().over(c).alias("qbar2"),
    )
    cov1 = ((pl.col("s1") / pl.col("sS1") - 1.0 / pl.col("nS")) * (pl.col("q1") - pl.col("qbar1"))).filter(S).sum()
    cov2 = ((pl.col("s2") / pl.col("sS2") - 1.0 / pl.col("nS")) * (pl.col("q2") - pl.col("qbar2"))).filter(S).sum()
    agg = m.group_by(c).agg(
        (pl.col("s1") * pl.col("q1")).sum().alias("q_prev"),
        (pl.col("s2") * pl.col("q2")).sum().alias("q_curr"),
        pl.col("nS").first().cast(pl.Int64).alias("n_continuers"),
        E.sum().cast(pl.Int64).alias("n_entrants"),
        X.sum().cast(pl.Int64).alias("n_exiters"),
        pl.col("qbar1").first(), pl.col("qbar2").first(),
        cov1.alias("cov1"), cov2.alias("cov2"),
        ((pl.col("s1") * pl.col("q1")).filter(S).sum() / pl.col("sS1").first()).alias("QS1"),
        ((pl.col("s2") * pl.col("q2")).filter(S).sum() / pl.col("sS2").first()).alias("QS2"),
        pl.col("s2").filter(E).sum().alias("share_entrants"),
        pl.col("s1").filter(X).sum().alias("share_exiters"),
        (pl.col("s2") * pl.col("q2")).filter(E).sum().alias("_sqE"),
        (pl.col("s1") * pl.col("q1")).filter(X).sum().alias("_sqX"),
    )
    # shares and value-weighted qualities are in [0, 1] by construction; a sum of shares that all
    # belong to exiters (or entrants) can land 1-2 ulps above 1 (measured: 1 + 2.2e-16 on the demo
    # data, failing the contract range); clip only removes that rounding
    agg = agg.with_columns(pl.col("share_entrants", "share_exiters", "q_prev", "q_curr").clip(0.0, 1.0))
    has_s = pl.col("n_continuers") > 0
    null = pl.lit(None, dtype=pl.Float64)
    # s_E2 (Q_E2 - Q_S2) = sum_E s2 q2 - s_E2 Q_S2 (and 0 when E is empty); likewise exit
    entry = pl.when(pl.col("n_entrants") > 0).then(pl.col("_sqE") - pl.col("share_entrants") * pl.col("QS2")).otherwise(0.0)
    exit_ = pl.when(pl.col("n_exiters") > 0).then(pl.col("share_exiters") * pl.col("QS1") - pl.col("_sqX")).otherwise(0.0)
    out = agg.with_columns(
        (pl.col("q_curr") - pl.col("q_prev")).alias("total"),
        pl.when(has_s).then(pl.col("qbar2") - pl.col("qbar1")).otherwise(null).alias("within"),
        pl.when(has_s).then(pl.col("cov2") - pl.col("cov1")).otherwise(null).alias("between"),
        pl.when(has_s).then(entry).otherwise(null).alias("entry"),
        pl.when(has_s).then(exit_).otherwise(null).alias("exit"),
        pl.when(has_s).then(pl.lit("ok")).otherwise(pl.lit("no_continuers")).alias("status"),
    ).with_columns(
        (pl.col("between") + pl.col("entry") + pl.col("exit")).alias("gap"),
        (pl.col("total") - (pl.col("within") + pl.col("between") + pl.col("entry") + pl.col("exit")))
        .alias("identity_error"),
    ).select(
        *c, "q_prev", "q_curr", "total", "within", "between", "entry", "exit", "gap", "n_continuers",
        "n_entrants", "n_exiters", "share_entrants", "share_exiters", "identity_error", "status",
    ).sort(c)
    ie = out["identity_error"].drop_nulls().abs()
    summary = {
        "n_cells": out.height,
        "n_cells_prev_only": cells1.height - both.height,
        "n_cells_curr_only": cells2.height - both.height,
        "n_no_continuers": int((out["status"] == "no_continuers").sum()),
        "n_units_null_quality_prev": null1,
        "n_units_null_quality_curr": null2,
        "max_abs_identity_error": float(ie.max()) if ie.len() else 0.0,
    }
    return out, summary


def quality_decomposition(
    flows_prev: pl.DataFrame,
    flows_curr: pl.DataFrame,
    *,
    unit: Literal["hs6", "flow"] = "hs6",
    quality_col: str = "rqua",
    cell_cols: tuple[str, ...] = ("city_code", "hs4"),
    tol: float = 1e-12,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Eq. (23) per city x HS4 between two consecutive years of normalised flows.

    ``flows_prev`` / ``flows_curr``: flow-level frames (quality_normalised of t-1 and t; columns
    year, firm_id, city_code, hs6, partner_iso3, value_usd, ``quality_col``). ``unit = "hs6"``
    (spec default ``city_hs4_yearpair_i_hs6``): units are the HS6 products of the cell with
    ``q_i`` = value-weighted rqua of the product's rated flows and value = their export value;
    ``unit = "flow"``: units are firm x HS6 x destination flows. Either way ``Q_t`` equals the
    cell's ``hs4_qua``. Output: :func:`mp_decomposition` frame with ``year`` (t), ``year_prev``
    and ``decomp_unit`` in front; summary adds ``identity_ok`` (max |identity_error| <= ``tol``).
    """
    if unit not in DECOMP_UNITS:
        raise ValueError(f"quality_decomposition: unknown unit {unit!r}; expected {sorted(DECOMP_UNITS)}")
    years = []
    for tag, f in (("t-1", flows_prev), ("t", flows_curr)):
        ys = f["year"].unique().to_list() if f.height else []
        if len(ys) > 1:
            raise ValueError(f"quality_decomposition: period {tag} holds several years {sorted(ys)}")
        years.append(ys[0] if ys else None)
    if None not in years and years[1] != years[0] + 1:
        raise ValueError(f"quality_decomposition: years {years[0]} and {years[1]} are not consecutive")
    cells = list(cell_cols)

    def units(f: pl.DataFrame) -> pl.DataFrame:
        if "hs4" not in f.columns:
            f = f.with_columns(pl.col("hs6").str.slice(0, 4).alias("hs4"))
        f = f.filter(pl.col(quality_col).is_not_null())
        if unit == "flow":
            return f.select(*cells, *DECOMP_UNITS["flow"], pl.col(quality_col).alias("q"), pl.col("value_usd").alias("v"))
        return f.group_by(*cells, "hs6").agg(
            ((pl.col("value_usd") * pl.col(quality_col)).sum() / pl.col("value_usd").sum()).alias("q"),
            pl.col("value_usd").sum().alias("v"),
        )

    out, summary = mp_decomposition(
        units(flows_prev), units(flows_curr), cell_cols=cells, unit_cols=DECOMP_UNITS[unit],
        quality_col="q", value_col="v",
    )
    out = out.select(
        pl.lit(years[1], dtype=pl.Int32).alias("year"), pl.lit(years[0], dtype=pl.Int32).alias("year_prev"),
        pl.lit(unit).alias("decomp_unit"), pl.all(),
    )
    summary.update(year=years[1], year_prev=years[0], unit=unit, tol=tol,
                   identity_ok=summary["max_abs_identity_error"] <= tol)
    return out, summary
