"""Study S004 permutation placebo (spec 4.3, Fig. 2): vagg reshuffled N times, everything else fixed.

Pure numpy / pyfixest / polars (never import Dagster here); issue 6.

Method (Frisch-Waugh-Lovell, exact)
-----------------------------------
Model: ``y = b x + C g + FE + e`` (default: Table 2 (4), x = vagg, C = the nine controls, FE city +
year + HS4, CRV1 by city x HS4) on the real model's estimation sample (complete cases, singletons
removed; a permutation of x changes neither the FE structure nor the clusters, so the sample is the
same for every replication).

1. Once: demean ``[y, C]`` by the FEs with pyfixest's MAP demeaner (``pyfixest.core.demean.demean``,
   the routine ``feols`` uses, same tolerance) -> ``y~, C~``; project C~ out of y~:
   ``y. = y~ - C~ (C~'C~)^-1 C~'y~``.
2. Per replication r: permute x (scheme below) with ``numpy.random.default_rng([seed, r])``, demean the
   permuted column only (replications are demeaned in batches, one column per replication),
   ``x. = x~ - C~ (C~'C~)^-1 C~'x~``; then ``b = x.'y. / x.'x.``, residuals ``e = y. - b x.`` (the
   full model's residuals), CRV1 variance ``V = ssc * sum_g (sum_{i in g} x._i e_i)^2 / (x.'x.)^2``
   (FWL: the first row of ``(X'X)^-1 X'`` is ``x.' / x.'x.``), ``t = b / sqrt(V)``, p-value from the
   t distribution with ``G - 1`` degrees of freedom. ``ssc`` (pyfixest's small-sample factor,
   fixest's default ``(N-1)/(N-K) G/(G-1)``) and the degrees of freedom are read from the full
   pyfixest fit of the real model: they depend on N, K and G only, which no permutation changes.
   Coefficient, SE and t equal a full pyfixest refit on the permuted data to ~1e-12 (tested).

Permutation schemes (switch ``placebo_permutation``)
---------------------------------------------------
* ``row_level`` (spec default, "随机匹配到每个观测"): x permuted across all rows of the sample.
* ``city_year_level``: the city-year values of x permuted across city-years, then broadcast to the
  city-year's rows (keeps the city-year block structure of vagg); x must be constant within city-year.
* ``within_year_city_level``: the city values permuted across cities within each year.

Parallelism: replications are split into batches; ``n_workers > 1`` runs the batches in a process
pool (``concurrent.futures.ProcessPoolExecutor``, spawn context; each worker receives the arrays once
through the pool initializer). Results do not depend on ``n_workers`` or ``batch_size``
(replication r always uses the stream ``[seed, r]``).

Outputs: per-replication estimates (:class:`PlaceboResult.draws`), a summary (real estimate and t,
mean and SD of the placebo coefficients and t, share of placebo ``|t| >= |t_real|`` = the
permutation p-value, share of placebo p-values below 0.10), and a histogram PNG
(:func:`render_placebo_histogram`: matplotlib Agg, no ``Software`` text chunk, byte-identical for
the same draws) with the real estimate as a vertical line.
"""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import polars as pl

from kspill_pipeline.studies.s004_models import (
    FE_BASE,
    ModelSpec,
    PreparedSample,
    S004Config,
    _feols,
    load_published,
    prepare_sample,
)

__all__ = ["PlaceboResult", "permutation_placebo", "render_placebo_histogram", "placebo_spec", "permute"]

Scheme = Literal["row_level", "city_year_level", "within_year_city_level"]


def placebo_spec(cfg: S004Config) -> ModelSpec:
    """The model whose vagg is permuted: Table 2 (4) (the preferred baseline)."""
    return ModelSpec("placebo", "(4)", "hs4_qua", ("vagg", *cfg.controls), FE_BASE, "city_hs4")


@dataclass
class PlaceboResult:
    draws: pl.DataFrame  # rep, estimate, std_error, t_stat, p_value
    summary: dict[str, Any]
    png: bytes | None = None
    timings: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# permutation schemes
# --------------------------------------------------------------------------------------------------
@dataclass
class _PermPlan:
    scheme: str
    x: np.ndarray
    unit_of_row: np.ndarray | None = None  # city-year unit index of each row
    unit_values: np.ndarray | None = None  # x per unit
    groups: list[np.ndarray] | None = None  # within-year: unit indices per year


def _plan(x: np.ndarray, scheme: str, city: np.ndarray | None, year: np.ndarray | None) -> _PermPlan:
    if scheme == "row_level":
        return _PermPlan(scheme, x)
    if scheme not in ("city_year_level", "within_year_city_level"):
        raise ValueError(f"placebo_permutation must be row_level | city_year_level | within_year_city_level, "
                         f"not {scheme!r}")
    if city is None or year is None:
        raise ValueError(f"placebo scheme {scheme!r} needs the city_code and year of every row")
    key = pl.DataFrame({"c": city, "y": year})
    unit = (key.select(pl.struct("c", "y").rank("dense")).to_series().cast(pl.Int64) - 1).to_numpy()
    n_u = int(unit.max()) + 1
    vmin = np.full(n_u, np.inf)
    vmax = np.full(n_u, -np.inf)
    np.minimum.at(vmin, unit, x)
    np.maximum.at(vmax, unit, x)
    if np.any(vmax - vmin > 1e-12 * max(1.0, float(np.abs(x).max()))):
        raise ValueError(f"placebo scheme {scheme!r}: the regressor varies within city-year; use row_level")
    plan = _PermPlan(scheme, x, unit_of_row=unit, unit_values=vmin)
    if scheme == "within_year_city_level":
        uy = np.empty(n_u, dtype=year.dtype)
        uy[unit] = year
        plan.groups = [np.flatnonzero(uy == y) for y in np.unique(uy)]
    return plan


def permute(plan: _PermPlan, rng: np.random.Generator) -> np.ndarray:
    """One permuted copy of the regressor under the plan's scheme."""
    if plan.scheme == "row_level":
        return plan.x[rng.permutation(plan.x.size)]
    v = plan.unit_values
    if plan.scheme == "city_year_level":
        pv = v[rng.permutation(v.size)]
    else:
        pv = v.copy()
        for g in plan.groups:
            pv[g] = v[g[rng.permutation(g.size)]]
    return pv[plan.unit_of_row]


# --------------------------------------------------------------------------------------------------
# the FWL kernel
# --------------------------------------------------------------------------------------------------
@dataclass
class _State:
    fe: np.ndarray  # n x n_fe uint64
    ydot: np.ndarray  # y~ with C~ projected out
    Ct: np.ndarray | None  # C~ (n x k) or None
    Cpinv: np.ndarray | None  # (C~'C~)^-1 C~'  (k x n)
    cl: np.ndarray  # cluster codes
    n_cl: int
    ssc: float
    df_t: float
    plan: _PermPlan
    seed: int
    tol: float
    maxiter: int


def _demean(M: np.ndarray, fe: np.ndarray, tol: float, maxiter: int) -> np.ndarray:
    from pyfixest.core.demean import demean

    M2 = np.ascontiguousarray(M.reshape(M.shape[0], -1), dtype=np.float64)
    out, ok = demean(M2, fe, np.ones(M2.shape[0]), tol=tol, maxiter=maxiter)
    if not ok:
        raise RuntimeError(f"placebo: FE demeaning did not converge in {maxiter} iterations (tol {tol})")
    return out


def _stats(st: _State, xt: np.ndarray) -> np.ndarray:
    """(estimate, se, t) for each column of the demeaned regressor matrix ``xt`` (n x B)."""
    from scipy import stats as sps

    xd = xt - st.Ct @ (st.Cpinv @ xt) if st.Ct is not None else xt
    sxx = np.einsum("ij,ij->j", xd, xd)
    b = (xd.T @ st.ydot) / sxx
    e = st.ydot[:, None] - xd * b[None, :]
    out = np.empty((xt.shape[1], 4))
    for j in range(xt.shape[1]):
        s = np.bincount(st.cl, weights=xd[:, j] * e[:, j], minlength=st.n_cl)
        v = st.ssc * float(s @ s) / sxx[j] ** 2
        se = np.sqrt(v)
        t = b[j] / se
        out[j] = (b[j], se, t, 2.0 * sps.t.sf(abs(t), st.df_t))
    return out


_WORKER_STATE: _State | None = None


def _init_worker(st: _State) -> None:
    global _WORKER_STATE
    _WORKER_STATE = st


def _run_batch(reps: Sequence[int], st: _State | None = None) -> np.ndarray:
    st = st or _WORKER_STATE
    X = np.column_stack([permute(st.plan, np.random.default_rng([st.seed, int(r)])) for r in reps])
    xt = _demean(X, st.fe, st.tol, st.maxiter)
    res = _stats(st, xt)
    return np.column_stack([np.asarray(reps, dtype=float), res])


# --------------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------------
def permutation_placebo(
    panel: pl.DataFrame | PreparedSample,
    cfg: S004Config | None = None,
    *,
    spec: ModelSpec | None = None,
    n_replications: int | None = None,
    scheme: Scheme | None = None,
    seed: int | None = None,
    n_workers: int = 1,
    batch_size: int = 16,
    render: bool = True,
) -> PlaceboResult:
    """Permutation placebo of ``spec`` (default :func:`placebo_spec`: Table 2 (4)); see the module
    docstring. ``n_replications``, ``scheme`` and ``seed`` default to the config
    (placebo_replications, placebo_permutation, placebo_seed)."""
    cfg = cfg or S004Config()
    spec = spec or placebo_spec(cfg)
    if spec.is_iv:
        raise ValueError("permutation_placebo: OLS specifications only")
    n_rep = int(n_replications or cfg.placebo_replications)
    scheme = scheme or cfg.placebo_permutation
    seed = cfg.placebo_seed if seed is None else int(seed)
    t0 = time.perf_counter()
    prep = panel if isinstance(panel, PreparedSample) else prepare_sample(
        panel, spec.variables, spec.fe, cluster=spec.cluster, singleton_handling=cfg.singleton_handling,
        name=f"placebo {spec.model}")
    d = prep.frame
    if not spec.cluster:
        raise ValueError("permutation_placebo: the specification needs a cluster variable (CRV1)")
    xname, controls = spec.regressors[0], list(spec.regressors[1:])
    data = d.select(list(dict.fromkeys([*spec.variables, *spec.fe, spec.cluster])))
    real = _feols(f"{spec.depvar} ~ {' + '.join(spec.regressors)} | {' + '.join(spec.fe)}", data, spec.cluster, cfg)
    t_fit = time.perf_counter()
    ssc = float(np.squeeze(real._ssc))
    df_t = float(np.squeeze(real._df_t))
    fe = np.column_stack([d[c].to_numpy().astype(np.uint64) for c in spec.fe])
    y = d[spec.depvar].to_numpy().astype(float)
    C = d.select(controls).to_numpy().astype(float) if controls else None
    M = _demean(y if C is None else np.column_stack([y, C]), fe, cfg.fixef_tol, cfg.fixef_maxiter)
    yt = M[:, 0]
    if C is not None:
        Ct = M[:, 1:]
        Cpinv = np.linalg.pinv(Ct)
        ydot = yt - Ct @ (Cpinv @ yt)
    else:
        Ct = Cpinv = None
        ydot = yt
    cl = d[spec.cluster].to_numpy().astype(np.int64)
    x = d[xname].to_numpy().astype(float)
    city = d["_city"].to_numpy() if "_city" in d.columns else None
    year = d["_year"].to_numpy() if "_year" in d.columns else None
    plan = _plan(x, scheme, city, year)
    st = _State(fe=fe, ydot=ydot, Ct=Ct, Cpinv=Cpinv, cl=cl, n_cl=int(cl.max()) + 1, ssc=ssc, df_t=df_t,
                plan=plan, seed=seed, tol=cfg.fixef_tol, maxiter=cfg.fixef_maxiter)
    # the shortcut on the real regressor must reproduce the full fit
    real_fwl = _stats(st, _demean(x, fe, cfg.fixef_tol, cfg.fixef_maxiter))[0]
    b_real, se_real = float(real.coef()[xname]), float(real.se()[xname])
    t_real = b_real / se_real
    t_pre = time.perf_counter()
    batches = [list(range(i, min(i + batch_size, n_rep))) for i in range(0, n_rep, batch_size)]
    if n_workers <= 1 or len(batches) == 1:
        parts = [_run_batch(b, st) for b in batches]
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=n_workers, mp_context=mp.get_context("spawn"),
                                 initializer=_init_worker, initargs=(st,)) as ex:
            parts = list(ex.map(_run_batch, batches))
    res = np.vstack(parts)
    res = res[np.argsort(res[:, 0], kind="stable")]
    t_end = time.perf_counter()
    draws = pl.DataFrame({"rep": res[:, 0].astype(np.int64), "estimate": res[:, 1], "std_error": res[:, 2],
                          "t_stat": res[:, 3], "p_value": res[:, 4]})
    pub = load_published().get("placebo", {})
    summary = {
        "model": f"{spec.table} {spec.model}", "regressor": xname, "scheme": scheme, "seed": seed,
        "n_replications": n_rep, "n_obs": d.height, "n_clusters": st.n_cl, "vcov": f"CRV1({spec.cluster})",
        "real_estimate": b_real, "real_std_error": se_real, "real_t": t_real,
        "fwl_check_abs_diff_estimate": abs(float(real_fwl[0]) - b_real),
        "fwl_check_abs_diff_std_error": abs(float(real_fwl[1]) - se_real),
        "mean_estimate": float(res[:, 1].mean()), "sd_estimate": float(res[:, 1].std(ddof=1)) if n_rep > 1 else None,
        "mean_t": float(res[:, 3].mean()), "sd_t": float(res[:, 3].std(ddof=1)) if n_rep > 1 else None,
        "share_abs_t_ge_real": float(np.mean(np.abs(res[:, 3]) >= abs(t_real))),
        "share_abs_estimate_ge_real": float(np.mean(np.abs(res[:, 1]) >= abs(b_real))),
        "share_p_below_0.10": float(np.mean(res[:, 4] < 0.10)),
        "published_mean_estimate": pub.get("mean_coefficient"), "published_mean_t": pub.get("mean_t"),
        "n_workers": n_workers, "batch_size": batch_size,
    }
    timings = {"prepare_and_real_fit_s": t_fit - t0, "demean_once_s": t_pre - t_fit,
               "replications_s": t_end - t_pre, "per_replication_s": (t_end - t_pre) / n_rep}
    png = render_placebo_histogram(draws, summary) if render else None
    return PlaceboResult(draws=draws, summary=summary, png=png, timings=timings)


# --------------------------------------------------------------------------------------------------
# figure
# --------------------------------------------------------------------------------------------------
def render_placebo_histogram(draws: pl.DataFrame, summary: dict[str, Any], *, dpi: int = 100) -> bytes:
    """Two panels: histogram of the placebo coefficients with the real estimate as a vertical line,
    and of the placebo t statistics with +-|t_real|. matplotlib Agg (no pyplot), ``default`` style,
    PNG without the ``Software`` chunk: the same draws give byte-identical bytes."""
    import matplotlib.style
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with matplotlib.style.context("default"):
        fig = Figure(figsize=(10.0, 4.0), dpi=dpi, layout="constrained")
        FigureCanvasAgg(fig)
        ax1, ax2 = fig.subplots(1, 2)
        est = draws["estimate"].to_numpy()
        ts = draws["t_stat"].to_numpy()
        bins = max(10, min(60, int(np.sqrt(max(est.size, 1))) * 2))
        ax1.hist(est, bins=bins, color="#8fa8c8", edgecolor="#44546a", linewidth=0.4)
        ax1.axvline(summary["real_estimate"], color="#c0392b", linewidth=1.5,
                    label=f"real estimate {summary['real_estimate']:.4g}")
        ax1.set_xlabel(f"placebo coefficient of {summary['regressor']}")
        ax1.set_ylabel("replications")
        ax1.legend(loc="upper left", fontsize=8, frameon=False)
        ax2.hist(ts, bins=bins, color="#a9c7a0", edgecolor="#3d5a35", linewidth=0.4)
        for s in (-1, 1):
            ax2.axvline(s * abs(summary["real_t"]), color="#c0392b", linewidth=1.2, linestyle="--")
        ax2.set_xlabel("placebo t statistic (dashed: ±|t real|)")
        ax2.set_title(f"share |t| ≥ |t real| = {summary['share_abs_t_ge_real']:.3f}", fontsize=9)
        fig.suptitle(f"Permutation placebo ({summary['scheme']}, {summary['n_replications']} replications)",
                     fontsize=10)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    return buf.getvalue()
