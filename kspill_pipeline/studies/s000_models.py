"""Study S000 estimation: pooled Probit with year and industry fixed effects (Tables 1-2), AMEs, LPM.

Pure pyfixest / numpy / scipy / polars (never import Dagster here). Spec
``specs/S000_import_spillovers_export_evolution.md`` sections 3.5-3.9, 4 and 5; issue 4.

Model (spec eq. 4)::

    Pr(export=1) = Phi(b1 density_firm + b2 density_city + b3 interaction
                       + b4 tradevalue + b5 newexport + mu_year + theta_industry)

Estimation sample and the process-abort hazard
----------------------------------------------
:func:`prepare_sample` selects the model columns, drops rows with a null in any of them (all
Table 1 columns share ONE sample: the rows complete in every variable of the full model), then
removes **perfectly predicted fixed-effect groups** iteratively: a level of any FE whose rows
all have ``export == 0`` (or all ``== 1``) makes its dummy run to -inf (+inf); the Probit MLE
does not exist with that level in the sample, and those rows carry no information on the slopes.
Stata (``probit`` drops "perfectly predicted" observations) and R fixest (``feglm`` drops FE
groups with only 0/1 outcomes) do the same. Dropping rows of one FE can make a group of another
FE constant, so the rule is repeated until nothing changes. Singletons (one-row groups) are a
special case (a single outcome is always constant). ``ProbitFit.n_dropped`` reports the rows
removed, ``ProbitFit.dropped_groups`` the groups per FE. When nothing remains, or the outcome has
no variation, a :class:`ValueError` naming the sample is raised *before* pyfixest is called: with
pyfixest 0.60 an empty sample after its own singleton removal panics the Rust demeaner and aborts
the whole process (SIGABRT, uncatchable; STACK_NOTES section 4). After this filter pyfixest's own
singleton and separation("fe") checks find nothing, and the fit asserts that its N equals ours.
Separation by the slope regressors (the "ir" check) is not tested for; a quasi-separated
continuous regressor shows up as non-convergence or a huge coefficient.

Estimators (``method``)
-----------------------
* ``"pyfixest"`` (default): ``pyfixest.feglm(..., family="probit")`` with the FEs absorbed
  (IRLS on weighted-demeaned data, Rust MAP demeaner). Read from the 0.60 source: IRLS
  convergence is a relative deviance change below ``iwls_tol`` (we pass 1e-12; the default 1e-8
  leaves coefficient errors of ~1e-6 against an exact ML fit, 1e-12 gives ~1e-8 at no measurable
  cost), step-halving, ``fixef_tol`` of the demeaner (we pass 1e-12); vcov ``iid``, ``hetero``/HC1,
  ``{"CRV1": v}``, ``{"CRV3": v}``, NW/DK; the iid vcov is the inverse *expected* information
  ``(X~' W X~)^-1`` with IRLS weights ``W = phi^2 / (Phi (1-Phi))`` at the last iterate. Its
  default small-sample correction is fixest's ``(N-1)/(N-K)`` (K counting the FE levels); we pass
  ``ssc = pf.ssc(k_adj=False, G_adj=True)``, the maximum-likelihood convention (Stata ``probit``,
  statsmodels): no correction for ``iid``, ``G/(G-1)`` for clustered SEs.
* ``"dummies"``: an independent Newton-Raphson ML fit in numpy with the FEs as explicit dummy
  parameters. The dummy design is never materialised: the ``p x p`` information matrix
  (``p = k + sum(levels) - (n_fe - 1)``, ~120 for 15 years + 97 HS2 chapters) is accumulated in
  row chunks from ``X' W X``, group sums (``bincount``) and a year x industry weight table, so
  memory is ``O(n k)`` for the data plus ``O(chunk)`` temporaries. It is the fallback should the
  absorbed-FE IRLS misbehave (it did not in our validation), and the basis of the bounded-memory
  path at 10^7-10^8 rows: every quantity is a sum over rows, so chunks can equally be streamed from
  parquet (not implemented; see the benchmark notes in the report).

Both methods finish by computing the **full-parameter covariance** (slopes and every FE level) with
the same chunked machinery: iid ``V = I(theta)^-1`` (expected information, as pyfixest), CRV1
``V = G/(G-1) I^-1 (sum_g s_g s_g') I^-1`` with per-cluster score sums ``s_g`` (a sparse
cluster x parameter matrix). By Frisch-Waugh-Lovell its slope block equals pyfixest's vcov; the fit
records the largest relative discrepancy in ``vcov_check``. The full covariance is what the delta
method for AMEs needs (AMEs depend on the FE estimates through ``xb``).

Average marginal effects (:func:`average_marginal_effects`)
-----------------------------------------------------------
With ``xb_i`` the full linear index (including FEs) and ``phi`` the normal density:

* ``ame_naive`` (``naive_per_column``, the paper's column 6, Stata ``margins, dydx(*)`` on a
  generated product column): ``mean_i phi(xb_i) * b_k`` for every column, the product column
  treated as its own variable.
* ``ame_interaction_aware``: the derivative of ``P = Phi(xb)`` with respect to a density, the
  product column moving with it. With ``u1, u2, u3`` the model's columns for density_firm,
  density_city and the product term::

      dP/du1 = mean_i phi(xb_i) (b1 + b3 du3/du1),   dP/du2 = mean_i phi(xb_i) (b2 + b3 du3/du2)

  raw model: ``u3 = x1 x2`` so ``du3/du1 = x2``; standardised ``z_of_product``:
  ``u3 = (x1 x2 - m3)/s3`` with ``x1 = m1 + s1 u1`` so ``du3/du1 = s1 x2 / s3``; ``product_of_z``:
  ``u3 = u1 u2`` so ``du3/du1 = u2``. Controls: same as naive.
* ``cross_partial`` (Ai & Norton 2003, "Interaction terms in logit and probit models", Economics
  Letters 80: 123-129), the interaction effect of the two densities::

      d2P/du1du2 = mean_i phi(xb_i) [ b3 g12 - xb_i (b1 + b3 g1_i)(b2 + b3 g2_i) ]

  with ``g1 = du3/du1``, ``g2 = du3/du2``, ``g12 = d2u3/du1du2`` (1 raw and product_of_z,
  ``s1 s2 / s3`` for z_of_product), using ``phi'(z) = -z phi(z)``. This is the mean over
  observations of Ai-Norton's observation-level effect; it is reported as one number.

Standard errors: delta method ``se = sqrt(g' V g)`` with ``V`` the full-parameter covariance and
``g`` the gradient of the AME with respect to (slopes, FE levels). The gradient is numerical: each
AME is ``mean_i h(xb_i, b)``; ``dh/dxb`` is a central difference in ``xb`` (step 1e-6), the partial
``dh/db_j`` at fixed ``xb`` a central difference in ``b_j``; then
``d AME/d b_j = mean(dh/dxb * x_j) + mean(dh/db_j)`` and ``d AME/d fe_g = sum_{i in g}(dh/dxb)/n``.
Validated against statsmodels' ``get_margeff`` (analytic) in the tests.

Standardised Model (5) (spec 3.7): every regressor is z-scored on the estimation sample
(``ddof=1``). ``standardize_interaction="z_of_product"`` (default) z-scores the pre-built product
column, so Model 5 is a reparametrisation of Model 4 and ``b5_k = b4_k * sd_k`` exactly (the
spec's DERIVED relation); ``"product_of_z"`` uses ``z(firm) * z(city)``, also a reparametrisation
(with ``b3' = b3 s1 s2``, ``b1' = s1 (b1 + b3 m2)``, ``b2' = s2 (b2 + b3 m1)``).

Pseudo R2: McFadden ``1 - LL / LL0`` with ``LL0`` the intercept-only log-likelihood (Stata's
``probit`` convention; the FEs count as regressors).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
import scipy.sparse as sp
from scipy.special import log_ndtr, ndtr
from scipy.stats import norm

DEPVAR = "export"
FE_DEFAULT: tuple[str, ...] = ("year", "industry")
INTERACTION: tuple[str, str, str] = ("density_firm", "density_city", "interaction")
CONTROLS: tuple[str, ...] = ("tradevalue", "newexport")
FULL_MODEL: tuple[str, ...] = ("density_firm", "density_city", "interaction", *CONTROLS)

#: Table 1 columns (1)-(4), spec 4.1.
TABLE1_SPECS: dict[str, tuple[str, ...]] = {
    "(1)": ("density_firm", *CONTROLS),
    "(2)": ("density_city", *CONTROLS),
    "(3)": ("density_firm", "density_city", *CONTROLS),
    "(4)": FULL_MODEL,
}

#: Table 2 subsamples, spec 4.2: name -> (column, accepted values, compared case-insensitively).
TABLE2_SUBSAMPLES: dict[str, tuple[str, tuple[str, ...]]] = {
    "East": ("macro_region", ("east",)),
    "West": ("macro_region", ("west",)),
    "High mkt": ("mkt_group", ("high",)),
    "Mid mkt": ("mkt_group", ("mid", "middle")),
    "Low mkt": ("mkt_group", ("low",)),
}

StandardizeInteraction = Literal["z_of_product", "product_of_z"]
Method = Literal["pyfixest", "dummies"]
VcovSpec = str | Mapping[str, str]

TIDY_COLUMNS: tuple[str, ...] = (
    "table", "model", "term", "kind", "estimate", "std_error", "statistic", "p_value",
    "n_obs", "n_dropped", "pseudo_r2", "fixed_effects", "sample", "vcov", "estimator",
    "published", "published_std_error", "published_stars",
)
TIDY_SCHEMA: dict[str, pl.DataType] = {
    "table": pl.String(), "model": pl.String(), "term": pl.String(), "kind": pl.String(),
    "estimate": pl.Float64(), "std_error": pl.Float64(), "statistic": pl.Float64(),
    "p_value": pl.Float64(), "n_obs": pl.Int64(), "n_dropped": pl.Int64(),
    "pseudo_r2": pl.Float64(), "fixed_effects": pl.String(), "sample": pl.String(),
    "vcov": pl.String(), "estimator": pl.String(), "published": pl.Float64(),
    "published_std_error": pl.Float64(), "published_stars": pl.String(),
}

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
_CHUNK = 1 << 21  # rows per chunk in the sums (2M rows x k floats of temporaries)


# --------------------------------------------------------------------------------------------
# Sample preparation
# --------------------------------------------------------------------------------------------


@dataclass
class PreparedSample:
    """Estimation sample after null removal and removal of perfectly predicted FE groups."""

    frame: pl.DataFrame  # model columns; FE and cluster columns as dense UInt32 codes
    sample: str
    depvar: str
    fe: tuple[str, ...]
    n_input: int
    n_dropped_null: int
    n_dropped_separation: int
    dropped_groups: dict[str, int]
    fe_levels: dict[str, pl.Series]  # original FE values in code order

    @property
    def n_obs(self) -> int:
        return self.frame.height


def prepare_sample(
    panel: pl.DataFrame | pl.LazyFrame,
    columns: Sequence[str],
    fe: Sequence[str] = FE_DEFAULT,
    *,
    depvar: str = DEPVAR,
    cluster: Sequence[str] = (),
    sample: str = "full",
) -> PreparedSample:
    """Select, drop nulls, drop perfectly predicted FE groups (iteratively); raise if empty.

    Raises ``ValueError("... sample '<sample>' ...")`` when no row remains or the outcome is
    constant, so that pyfixest is never called on an empty or unidentified sample.
    """
    fe = tuple(fe)
    cols = list(dict.fromkeys([depvar, *columns, *fe, *cluster]))
    df = panel.select(cols)
    if isinstance(df, pl.LazyFrame):
        df = df.collect()
    n_input = df.height
    df = df.drop_nulls()
    for c in columns:
        if df.schema[c].is_float():
            df = df.filter(pl.col(c).is_finite())
    n_nonnull = df.height
    df = df.with_columns(pl.col(depvar).cast(pl.Float64))
    bad = df.filter(~pl.col(depvar).is_in([0.0, 1.0])).height
    if bad:
        raise ValueError(f"sample '{sample}': outcome {depvar!r} has {bad} values outside {{0, 1}}")

    dropped_groups = dict.fromkeys(fe, 0)
    while df.height and fe:
        changed = False
        for f in fe:
            g = df.group_by(f).agg(pl.col(depvar).mean().alias("_m"))
            const = g.filter((pl.col("_m") == 0.0) | (pl.col("_m") == 1.0))
            if const.height:
                dropped_groups[f] += const.height
                df = df.join(const.select(f), on=f, how="anti")
                changed = True
        if not changed:
            break
    n_sep = n_nonnull - df.height
    if df.height == 0:
        raise ValueError(
            f"sample '{sample}': no observation left after removing {n_input - n_nonnull} rows with "
            f"nulls and {n_sep} rows in fixed-effect groups ({', '.join(fe)}) whose outcome is all 0 "
            "or all 1 (perfectly predicted); the Probit is not identified"
        )
    ybar = df[depvar].mean()
    if ybar in (0.0, 1.0):
        raise ValueError(f"sample '{sample}': outcome {depvar!r} has no variation (mean {ybar})")

    levels: dict[str, pl.Series] = {}
    code_exprs = []
    for f in [*fe, *[c for c in cluster if c not in fe]]:
        uniq = df.get_column(f).unique().sort()
        levels[f] = uniq
        code_exprs.append(
            pl.col(f).replace_strict(uniq, pl.int_range(uniq.len(), eager=True), return_dtype=pl.UInt32)
        )
    df = df.with_columns(code_exprs)
    return PreparedSample(
        frame=df, sample=sample, depvar=depvar, fe=fe, n_input=n_input,
        n_dropped_null=n_input - n_nonnull, n_dropped_separation=n_sep,
        dropped_groups=dropped_groups, fe_levels={f: levels[f] for f in fe},
    )


# --------------------------------------------------------------------------------------------
# Probit numerics with dummy FEs handled through group sums
# --------------------------------------------------------------------------------------------


class _Design:
    """Slopes X (n x k) plus FE codes; parameters [b (k), fe0 (G0), fe1[1:], fe2[1:], ...]."""

    def __init__(self, X: np.ndarray, codes: list[np.ndarray], sizes: list[int]):
        self.X = X
        self.codes = codes
        self.sizes = sizes
        self.n, self.k = X.shape
        # offset of each FE block in the parameter vector; first level of FE j>=1 is dropped
        self.offsets = []
        off = self.k
        for j, g in enumerate(sizes):
            self.offsets.append(off)
            off += g if j == 0 else g - 1
        self.p = off

    def split(self, theta: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        beta = theta[: self.k]
        fes = []
        for j, g in enumerate(self.sizes):
            o = self.offsets[j]
            fes.append(theta[o : o + g].copy() if j == 0 else np.r_[0.0, theta[o : o + g - 1]])
        return beta, fes

    def eta(self, theta: np.ndarray, sl: slice = slice(None)) -> np.ndarray:
        beta, fes = self.split(theta)
        e = self.X[sl] @ beta
        for c, v in zip(self.codes, fes, strict=True):
            e += v[c[sl]]
        return e

    def _fe_sum(self, j: int, c: np.ndarray, v: np.ndarray) -> np.ndarray:
        s = np.bincount(c, weights=v, minlength=self.sizes[j])
        return s if j == 0 else s[1:]

    def gradient_sum(self, v: np.ndarray, sl: slice) -> np.ndarray:
        """sum_i v_i * d(eta_i)/d(theta) over the rows in ``sl``."""
        out = np.empty(self.p)
        out[: self.k] = v @ self.X[sl]
        for j, c in enumerate(self.codes):
            o = self.offsets[j]
            s = self._fe_sum(j, c[sl], v)
            out[o : o + s.size] = s
        return out

    def weighted_cross(self, w: np.ndarray, sl: slice) -> np.ndarray:
        """sum_i w_i d_i d_i' with d_i = d(eta_i)/d(theta), rows in ``sl``."""
        p, k = self.p, self.k
        H = np.zeros((p, p))
        Xs = self.X[sl]
        H[:k, :k] = Xs.T @ (Xs * w[:, None])
        cs = [c[sl] for c in self.codes]
        for j, c in enumerate(cs):
            o = self.offsets[j]
            gj = self.sizes[j]
            for a in range(k):
                s = self._fe_sum(j, c, w * Xs[:, a])
                H[a, o : o + s.size] = s
                H[o : o + s.size, a] = s
            d = self._fe_sum(j, c, w)
            idx = np.arange(o, o + d.size)
            H[idx, idx] = d
            for m in range(j + 1, len(cs)):
                gm = self.sizes[m]
                om = self.offsets[m]
                t = np.bincount(c.astype(np.int64) * gm + cs[m], weights=w, minlength=gj * gm)
                t = t.reshape(gj, gm)
                if j > 0:
                    t = t[1:]
                t = t[:, 1:]
                H[o : o + t.shape[0], om : om + t.shape[1]] = t
                H[om : om + t.shape[1], o : o + t.shape[0]] = t.T
        return H

    def cluster_scores(self, r: np.ndarray, cl: np.ndarray, n_cl: int) -> sp.csr_matrix:
        """Sparse (clusters x p) matrix of per-cluster score sums sum_{i in g} r_i d_i."""
        cl = cl.astype(np.int64)
        blocks = [
            sp.csr_matrix(
                np.column_stack([np.bincount(cl, weights=r * self.X[:, a], minlength=n_cl) for a in range(self.k)])
            )
        ]
        for j, c in enumerate(self.codes):
            gj = self.sizes[j]
            key = cl * gj + c
            uk, inv = np.unique(key, return_inverse=True)
            vals = np.bincount(inv, weights=r)
            rows, cols = uk // gj, uk % gj
            if j > 0:
                keep = cols > 0
                rows, cols, vals = rows[keep], cols[keep] - 1, vals[keep]
                gj -= 1
            blocks.append(sp.csr_matrix((vals, (rows, cols)), shape=(n_cl, gj)))
        return sp.hstack(blocks, format="csr")


def _probit_pieces(eta: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """Log-likelihood, score residual r = d ll/d eta, expected and observed information weights."""
    lcdf1 = log_ndtr(eta)
    lcdf0 = log_ndtr(-eta)
    lpdf = -0.5 * eta * eta - _LOG_SQRT_2PI
    lam1 = np.exp(lpdf - lcdf1)  # phi / Phi
    lam0 = np.exp(lpdf - lcdf0)  # phi / (1 - Phi)
    ll = float(np.sum(np.where(y > 0.5, lcdf1, lcdf0)))
    r = np.where(y > 0.5, lam1, -lam0)
    w_exp = lam1 * lam0  # phi^2 / (Phi (1 - Phi))
    w_obs = np.where(y > 0.5, lam1 * (lam1 + eta), lam0 * (lam0 - eta))
    return ll, r, w_exp, w_obs


def _chunks(n: int, chunk: int = _CHUNK):
    for s in range(0, n, chunk):
        yield slice(s, min(n, s + chunk))


def _information(des: _Design, theta: np.ndarray, y: np.ndarray, kind: str = "expected"):
    """(ll, score, information matrix) at theta, accumulated in row chunks."""
    ll = 0.0
    score = np.zeros(des.p)
    H = np.zeros((des.p, des.p))
    for sl in _chunks(des.n):
        e = des.eta(theta, sl)
        lli, r, w_exp, w_obs = _probit_pieces(e, y[sl])
        ll += lli
        score += des.gradient_sum(r, sl)
        H += des.weighted_cross(w_exp if kind == "expected" else w_obs, sl)
    return ll, score, H


def _newton_probit(des: _Design, y: np.ndarray, *, tol: float = 1e-10, maxiter: int = 100):
    """Newton-Raphson on the (globally concave) Probit log-likelihood with step-halving."""
    theta = np.zeros(des.p)
    ll, score, H = _information(des, theta, y, "observed")
    for it in range(1, maxiter + 1):
        step = np.linalg.solve(H, score)
        t = 1.0
        while True:
            cand = theta + t * step
            ll_c, score_c, H_c = _information(des, cand, y, "observed")
            if ll_c >= ll - 1e-12 * abs(ll) or t < 1e-8:
                break
            t /= 2.0
        theta, ll, score, H = cand, ll_c, score_c, H_c
        if np.max(np.abs(t * step)) < tol:
            return theta, it, True
    return theta, maxiter, False


def _vcov_full(
    des: _Design, theta: np.ndarray, y: np.ndarray, cluster: np.ndarray | None,
    information: str = "expected",
) -> tuple[np.ndarray, int | None]:
    """Full-parameter covariance: iid inverse information, or CRV1 sandwich with G/(G-1)."""
    _, _, H = _information(des, theta, y, information)
    Hinv = np.linalg.inv(H)
    if cluster is None:
        return Hinv, None
    n_cl = int(cluster.max()) + 1
    r = np.empty(des.n)
    for sl in _chunks(des.n):
        r[sl] = _probit_pieces(des.eta(theta, sl), y[sl])[1]
    S = des.cluster_scores(r, cluster, n_cl)
    meat = (S.T @ S).toarray()
    return (n_cl / (n_cl - 1)) * (Hinv @ meat @ Hinv), n_cl


def _recover_fe(des: _Design, resid: np.ndarray) -> np.ndarray:
    """Least-squares FE values (in parameter layout) from resid = eta - X b (exact in the span)."""
    p, k = des.p, des.k
    sub = _Design(np.zeros((des.n, 0)), des.codes, des.sizes)
    A = np.zeros((sub.p, sub.p))
    b = np.zeros(sub.p)
    ones = np.ones(des.n)
    for sl in _chunks(des.n):
        A += sub.weighted_cross(ones[sl], sl)
        b += sub.gradient_sum(resid[sl], sl)
    theta_fe = np.linalg.lstsq(A, b, rcond=None)[0]
    out = np.zeros(p)
    out[k:] = theta_fe
    return out


# --------------------------------------------------------------------------------------------
# Fit object
# --------------------------------------------------------------------------------------------


def _vcov_label(vcov: VcovSpec) -> str:
    if isinstance(vcov, str):
        return vcov
    (kind, var), = vcov.items()
    return f"{kind}({var})"


def _cluster_var(vcov: VcovSpec) -> str | None:
    if isinstance(vcov, str):
        return None
    (kind, var), = vcov.items()
    return var.strip() if kind == "CRV1" and "+" not in var else None


@dataclass
class ProbitFit:
    """A fitted Probit with FEs; enough state for AMEs and tidy output."""

    sample: str
    depvar: str
    regressors: list[str]
    fe: tuple[str, ...]
    vcov_spec: VcovSpec
    method: str
    coef: np.ndarray
    vcov: np.ndarray  # slopes (as reported)
    n_obs: int
    n_dropped: int
    dropped_groups: dict[str, int]
    loglik: float
    loglik_null: float
    converged: bool
    iterations: int | None
    standardized: bool
    standardize_interaction: str | None
    means: dict[str, float]
    sds: dict[str, float]
    # state for AMEs / delta method
    theta: np.ndarray = field(repr=False)  # slopes + FE levels (parameter layout)
    vcov_full: np.ndarray | None = field(repr=False)  # full-parameter covariance or None
    vcov_check: float | None = None  # max |V_slopes(ours) - V_slopes(pyfixest)| / max|V_pyfixest|
    n_clusters: int | None = None
    information: str = "expected"
    _design: _Design | None = field(default=None, repr=False)
    _y: np.ndarray | None = field(default=None, repr=False)
    _g: tuple[np.ndarray, np.ndarray, float] | None = field(default=None, repr=False)
    _interaction_idx: tuple[int, int, int] | None = None

    @property
    def se(self) -> np.ndarray:
        return np.sqrt(np.diag(self.vcov))

    @property
    def pseudo_r2(self) -> float:
        return 1.0 - self.loglik / self.loglik_null

    @property
    def eta(self) -> np.ndarray:
        return self._design.eta(self.theta)

    def coef_dict(self) -> dict[str, float]:
        return dict(zip(self.regressors, self.coef.tolist(), strict=True))

    def se_dict(self) -> dict[str, float]:
        return dict(zip(self.regressors, self.se.tolist(), strict=True))

    def fe_values(self) -> dict[str, np.ndarray]:
        """Estimated FE levels (first level of every FE after the first normalised to 0)."""
        _, fes = self._design.split(self.theta)
        return dict(zip(self.fe, fes, strict=True))

    def tidy(self) -> list[dict[str, Any]]:
        z = self.coef / self.se
        return [
            dict(term=t, kind="coef", estimate=float(b), std_error=float(s), statistic=float(zz),
                 p_value=float(2 * norm.sf(abs(zz))))
            for t, b, s, zz in zip(self.regressors, self.coef, self.se, z, strict=True)
        ]


def _standardize(
    frame: pl.DataFrame, regressors: Sequence[str], mode: StandardizeInteraction,
) -> tuple[pl.DataFrame, dict[str, float], dict[str, float]]:
    means = {c: float(frame[c].mean()) for c in regressors}
    sds = {c: float(frame[c].std(ddof=1)) for c in regressors}
    for c, s in sds.items():
        if not s > 0:
            raise ValueError(f"cannot standardise {c!r}: standard deviation {s}")
    exprs = [((pl.col(c) - means[c]) / sds[c]).alias(c) for c in regressors]
    out = frame.with_columns(exprs)
    f, c, i = INTERACTION
    if mode == "product_of_z" and all(v in regressors for v in INTERACTION):
        out = out.with_columns((pl.col(f) * pl.col(c)).alias(i))
    elif mode != "z_of_product":
        raise ValueError(f"standardize_interaction must be 'z_of_product' or 'product_of_z', not {mode!r}")
    return out, means, sds


def fit_probit(
    panel: pl.DataFrame | PreparedSample,
    regressors: Sequence[str],
    fe: Sequence[str] = FE_DEFAULT,
    *,
    vcov: VcovSpec = "iid",
    standardize: bool = False,
    standardize_interaction: StandardizeInteraction = "z_of_product",
    method: Method = "pyfixest",
    depvar: str = DEPVAR,
    sample: str = "full",
    full_vcov: bool = True,
    iwls_tol: float = 1e-12,
    fixef_tol: float = 1e-12,
    information: Literal["expected", "observed"] = "expected",
) -> ProbitFit:
    """Pooled Probit of ``depvar`` on ``regressors`` with absorbed ``fe``.

    ``panel`` may be a frame (then :func:`prepare_sample` runs first) or a ``PreparedSample``
    (Table 1 prepares once so that all columns share one sample). ``vcov``: ``"iid"``
    (default, the paper's plain ML SEs), ``{"CRV1": "firm_id"}``, ``{"CRV1": "city_code"}``, or
    anything pyfixest accepts (AME SEs then need ``iid`` or one-way ``CRV1``; otherwise they are
    NaN). ``standardize`` z-scores every regressor on the estimation sample (Model 5).
    ``full_vcov=False`` skips the full-parameter covariance (no AME SEs) to save time.
    ``information``: ``"expected"`` (default; pyfixest, fixest, statsmodels GLM) or ``"observed"``
    (Stata ``probit`` and statsmodels ``Probit`` default, the negative Hessian). They differ at the
    MLE for the probit link (0.6 % in SEs on a 4k-row test sample, shrinking with n); with
    ``"observed"`` the reported slope vcov is the slope block of our full-parameter one.
    """
    regressors = list(regressors)
    fe = tuple(fe)
    clus = _cluster_var(vcov)
    if isinstance(panel, PreparedSample):
        prep = panel
        if prep.fe != fe:
            raise ValueError(f"prepared sample has FE {prep.fe}, asked for {fe}")
    else:
        extra = [clus] if clus else []
        if not isinstance(vcov, str):
            extra = [v.strip() for v in next(iter(vcov.values())).split("+")]
        prep = prepare_sample(panel, regressors, fe, depvar=depvar, cluster=extra, sample=sample)
    df = prep.frame
    missing = [c for c in regressors if c not in df.columns]
    if missing:
        raise ValueError(f"sample '{prep.sample}': columns {missing} not in the prepared sample")

    means: dict[str, float] = {}
    sds: dict[str, float] = {}
    if standardize:
        df, means, sds = _standardize(df, regressors, standardize_interaction)

    y = df.get_column(depvar).to_numpy().astype(np.float64)
    X = df.select(regressors).to_numpy().astype(np.float64)
    codes = [df.get_column(f).to_numpy().astype(np.int64) for f in fe]
    sizes = [prep.fe_levels[f].len() for f in fe]
    des = _Design(X, codes, sizes)
    n = y.size
    ybar = float(y.mean())
    ll0 = n * (ybar * math.log(ybar) + (1 - ybar) * math.log(1 - ybar))
    cl_codes = df.get_column(clus).to_numpy().astype(np.int64) if clus else None
    if clus and cl_codes is not None:
        # dense codes of the cluster variable (prepare_sample encodes FE/cluster columns already)
        cl_codes = np.unique(cl_codes, return_inverse=True)[1]

    vcov_check = None
    n_clusters = None
    if method == "pyfixest":
        import pyfixest as pf
        from pyfixest.demeaners import MapDemeaner

        fml = f"{depvar} ~ {' + '.join(regressors)} | {' + '.join(fe)}"
        cols = list(dict.fromkeys([depvar, *regressors, *fe, *([clus] if clus else [])]))
        if not isinstance(vcov, str):
            cols = list(dict.fromkeys([*cols, *[v.strip() for v in next(iter(vcov.values())).split("+")]]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fit = pf.feglm(
                fml, data=df.select(cols), family="probit", vcov=vcov,
                ssc=pf.ssc(k_adj=False, G_adj=True), iwls_tol=iwls_tol, iwls_maxiter=100,
                demeaner=MapDemeaner(fixef_tol=fixef_tol), store_data=False, copy_data=False,
            )
        if fit._N != n:
            raise RuntimeError(f"sample '{prep.sample}': pyfixest used {fit._N} rows, expected {n}")
        names = list(fit._coefnames)
        if names != regressors:
            raise CollinearRegressors(f"sample '{prep.sample}': pyfixest dropped collinear regressors: {names}")
        beta = np.asarray(fit.coef().to_numpy(), dtype=float)
        V = np.asarray(fit._vcov, dtype=float)
        eta_pf = np.asarray(fit._Y_hat_link, dtype=float).ravel()
        theta = _recover_fe(des, eta_pf - X @ beta)
        theta[: des.k] = beta
        converged = bool(getattr(fit, "_convergence", True))
        iterations = None
        loglik = float(np.sum(np.where(y > 0.5, log_ndtr(eta_pf), log_ndtr(-eta_pf))))
        Vfull = None
        if information == "observed" and not (vcov == "iid" or clus):
            raise ValueError("information='observed' supports vcov='iid' or one-way {'CRV1': var}")
        if (full_vcov or information == "observed") and (vcov == "iid" or clus):
            Vfull, n_clusters = _vcov_full(des, theta, y, cl_codes, information)
            scale = np.max(np.abs(V))
            if information == "expected":
                vcov_check = float(np.max(np.abs(Vfull[: des.k, : des.k] - V)) / scale)
            else:
                V = Vfull[: des.k, : des.k].copy()
    elif method == "dummies":
        if not (vcov == "iid" or clus):
            raise ValueError("method='dummies' supports vcov='iid' or one-way {'CRV1': var}")
        theta, iterations, converged = _newton_probit(des, y)
        Vfull, n_clusters = _vcov_full(des, theta, y, cl_codes, information)
        beta = theta[: des.k].copy()
        V = Vfull[: des.k, : des.k].copy()
        e = des.eta(theta)
        loglik = float(np.sum(np.where(y > 0.5, log_ndtr(e), log_ndtr(-e))))
    else:
        raise ValueError(f"method must be 'pyfixest' or 'dummies', not {method!r}")

    pf_fit = ProbitFit(
        sample=prep.sample, depvar=depvar, regressors=regressors, fe=fe, vcov_spec=vcov,
        method=method, coef=beta, vcov=V, n_obs=n,
        n_dropped=prep.n_dropped_null + prep.n_dropped_separation,
        dropped_groups=dict(prep.dropped_groups), loglik=loglik, loglik_null=ll0,
        converged=converged, iterations=iterations, standardized=standardize,
        standardize_interaction=standardize_interaction if standardize else None,
        means=means, sds=sds, theta=theta, vcov_full=Vfull, vcov_check=vcov_check,
        n_clusters=n_clusters, information=information, _design=des, _y=y,
    )
    _attach_interaction(pf_fit, prep.frame)
    return pf_fit


def _attach_interaction(fit: ProbitFit, raw: pl.DataFrame) -> None:
    """Store g1 = du3/du1, g2 = du3/du2 (arrays) and g12 (scalar) for interaction-aware AMEs."""
    if not all(v in fit.regressors for v in INTERACTION):
        return
    f, c, i = INTERACTION
    idx = tuple(fit.regressors.index(v) for v in INTERACTION)
    x1 = raw.get_column(f).to_numpy().astype(np.float64)
    x2 = raw.get_column(c).to_numpy().astype(np.float64)
    if not fit.standardized:
        g = (x2, x1, 1.0)
    elif fit.standardize_interaction == "z_of_product":
        s1, s2, s3 = fit.sds[f], fit.sds[c], fit.sds[i]
        g = (s1 * x2 / s3, s2 * x1 / s3, s1 * s2 / s3)
    else:  # product_of_z
        z1 = (x1 - fit.means[f]) / fit.sds[f]
        z2 = (x2 - fit.means[c]) / fit.sds[c]
        g = (z2, z1, 1.0)
    fit._g = g
    fit._interaction_idx = idx


# --------------------------------------------------------------------------------------------
# Average marginal effects
# --------------------------------------------------------------------------------------------


def _phi(e: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * e * e - _LOG_SQRT_2PI)


def ame_functions(fit: ProbitFit) -> list[tuple[str, str, Callable[[np.ndarray, np.ndarray], np.ndarray]]]:
    """(kind, term, h) with AME = mean_i h(eta_i, beta); see the module docstring."""
    out: list[tuple[str, str, Callable]] = []
    for k, t in enumerate(fit.regressors):
        out.append(("ame_naive", t, lambda e, b, k=k: _phi(e) * b[k]))
    idx = fit._interaction_idx
    for k, t in enumerate(fit.regressors):
        if idx is None:
            out.append(("ame_interaction_aware", t, lambda e, b, k=k: _phi(e) * b[k]))
        elif k == idx[0]:
            g1 = fit._g[0]
            out.append(("ame_interaction_aware", t,
                        lambda e, b, g1=g1: _phi(e) * (b[idx[0]] + b[idx[2]] * g1)))
        elif k == idx[1]:
            g2 = fit._g[1]
            out.append(("ame_interaction_aware", t,
                        lambda e, b, g2=g2: _phi(e) * (b[idx[1]] + b[idx[2]] * g2)))
        elif k != idx[2]:
            out.append(("ame_interaction_aware", t, lambda e, b, k=k: _phi(e) * b[k]))
    if idx is not None:
        g1, g2, g12 = fit._g

        def cross(e, b):
            a = b[idx[0]] + b[idx[2]] * g1
            c = b[idx[1]] + b[idx[2]] * g2
            return _phi(e) * (b[idx[2]] * g12 - e * a * c)

        out.append(("cross_partial", fit.regressors[idx[2]], cross))
    return out


def _ame_gradient(fit: ProbitFit, h: Callable, eta: np.ndarray, *, step: float = 1e-6) -> np.ndarray:
    des = fit._design
    beta = fit.theta[: des.k]
    n = des.n
    h_eta = (h(eta + step, beta) - h(eta - step, beta)) / (2 * step)
    grad = des.gradient_sum(h_eta, slice(None)) / n
    for j in range(des.k):
        d = step * max(1.0, abs(beta[j]))
        bp, bm = beta.copy(), beta.copy()
        bp[j] += d
        bm[j] -= d
        grad[j] += float(np.mean(h(eta, bp) - h(eta, bm))) / (2 * d)
    return grad


def average_marginal_effects(
    fit: ProbitFit, *, kinds: Sequence[str] = ("ame_naive", "ame_interaction_aware", "cross_partial"),
    vcov_full: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """AME rows (kind, term, estimate, std_error, statistic, p_value); delta-method SEs.

    ``vcov_full`` overrides the fit's full-parameter covariance (tests feed statsmodels' one).
    """
    V = fit.vcov_full if vcov_full is None else vcov_full
    eta = fit.eta
    beta = fit.theta[: fit._design.k]
    rows = []
    for kind, term, h in ame_functions(fit):
        if kind not in kinds:
            continue
        est = float(np.mean(h(eta, beta)))
        if V is not None:
            g = _ame_gradient(fit, h, eta)
            se = float(math.sqrt(max(g @ V @ g, 0.0)))
        else:
            se = float("nan")
        z = est / se if se > 0 else float("nan")
        rows.append(dict(kind=kind, term=term, estimate=est, std_error=se, statistic=z,
                         p_value=float(2 * norm.sf(abs(z))) if np.isfinite(z) else float("nan")))
    return rows


def mean_predicted_probability(fit: ProbitFit, raw: pl.DataFrame, shift: Mapping[str, float]) -> float:
    """Mean Phi(xb) after shifting raw (unstandardised) variables; the product column and any
    standardisation are rebuilt from the shifted raw values (used by finite-difference tests)."""
    df = raw.with_columns([(pl.col(c) + d).alias(c) for c, d in shift.items()])
    f, c, i = INTERACTION
    if i in fit.regressors and (f in shift or c in shift):
        df = df.with_columns((pl.col(f) * pl.col(c)).alias(i))
    if fit.standardized:
        df = df.with_columns([((pl.col(v) - fit.means[v]) / fit.sds[v]).alias(v) for v in fit.regressors])
        if fit.standardize_interaction == "product_of_z" and i in fit.regressors:
            df = df.with_columns((pl.col(f) * pl.col(c)).alias(i))
    X = df.select(fit.regressors).to_numpy().astype(np.float64)
    des = fit._design
    e = X @ fit.theta[: des.k]
    _, fes = des.split(fit.theta)
    for code, v in zip(des.codes, fes, strict=True):
        e += v[code]
    return float(np.mean(ndtr(e)))


# --------------------------------------------------------------------------------------------
# Published values
# --------------------------------------------------------------------------------------------

PUBLISHED_PATH = Path(__file__).resolve().parent / "published" / "s000.yaml"


@lru_cache(maxsize=4)
def load_published(path: str | None = None) -> dict[str, Any]:
    import yaml

    with open(path or PUBLISHED_PATH, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def published_frame(path: str | None = None) -> pl.DataFrame:
    """Published values as rows (table, model, kind, term, published, published_std_error, stars)."""
    doc = load_published(path)
    rows = []
    for table in ("table1", "table2"):
        for model, spec in doc[table]["models"].items():
            for term, v in spec["terms"].items():
                rows.append(dict(table=table, model=str(model), kind=spec["kind"], term=term,
                                 published=float(v["estimate"]), published_std_error=float(v["std_error"]),
                                 published_stars=str(v.get("stars", ""))))
    return pl.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def _fe_label(fe: Sequence[str]) -> str:
    return "+".join(fe)


def _rows_for_fit(fit: ProbitFit, table: str, model: str, rows: list[dict]) -> list[dict]:
    meta = dict(table=table, model=model, n_obs=fit.n_obs, n_dropped=fit.n_dropped,
                pseudo_r2=fit.pseudo_r2, fixed_effects=_fe_label(fit.fe), sample=fit.sample,
                vcov=_vcov_label(fit.vcov_spec) + ("" if fit.information == "expected" else " (OIM)"),
                estimator=f"probit:{fit.method}")
    return [{**meta, **r} for r in rows]


def _finish(rows: list[dict], published: bool = True) -> pl.DataFrame:
    df = pl.DataFrame(rows, schema={k: v for k, v in TIDY_SCHEMA.items() if not k.startswith("published")},
                      strict=False)
    if published:
        pub = published_frame()
        df = df.join(pub, on=["table", "model", "kind", "term"], how="left", maintain_order="left")
    else:
        df = df.with_columns(pl.lit(None, pl.Float64).alias("published"),
                             pl.lit(None, pl.Float64).alias("published_std_error"),
                             pl.lit(None, pl.String).alias("published_stars"))
    return df.select(TIDY_COLUMNS).cast(TIDY_SCHEMA)


@dataclass
class TableResult:
    tidy: pl.DataFrame
    fits: dict[str, ProbitFit]
    skipped: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def table1(
    panel: pl.DataFrame | pl.LazyFrame,
    *,
    fe: Sequence[str] = FE_DEFAULT,
    vcov: VcovSpec = "iid",
    standardize_interaction: StandardizeInteraction = "z_of_product",
    method: Method = "pyfixest",
    sample: str = "full",
    ame_of: Literal["(5)", "(4)"] = "(5)",
    depvar: str = DEPVAR,
    information: Literal["expected", "observed"] = "expected",
) -> TableResult:
    """Table 1: columns (1)-(4) stepwise, (5) standardised, (6) AMEs (of ``ame_of``).

    All columns share one sample (complete in every full-model variable; FE groups with
    constant outcome removed). Column (6) carries three kinds: ``ame_naive`` (the paper's),
    ``ame_interaction_aware`` and ``cross_partial``.
    """
    import time

    clus = _cluster_var(vcov)
    prep = prepare_sample(panel, FULL_MODEL, fe, depvar=depvar, cluster=[clus] if clus else [],
                          sample=sample)
    fits: dict[str, ProbitFit] = {}
    rows: list[dict] = []
    timings: dict[str, float] = {}
    for model, regs in TABLE1_SPECS.items():
        t0 = time.perf_counter()
        fits[model] = fit_probit(prep, regs, fe, vcov=vcov, method=method, depvar=depvar,
                                 full_vcov=(ame_of == model), information=information)
        timings[model] = time.perf_counter() - t0
        rows += _rows_for_fit(fits[model], "table1", model, fits[model].tidy())
    t0 = time.perf_counter()
    fits["(5)"] = fit_probit(prep, FULL_MODEL, fe, vcov=vcov, method=method, depvar=depvar,
                             standardize=True, standardize_interaction=standardize_interaction,
                             information=information)
    timings["(5)"] = time.perf_counter() - t0
    rows += _rows_for_fit(fits["(5)"], "table1", "(5)", fits["(5)"].tidy())
    t0 = time.perf_counter()
    rows += _rows_for_fit(fits[ame_of], "table1", "(6)", average_marginal_effects(fits[ame_of]))
    timings["(6)"] = time.perf_counter() - t0
    return TableResult(tidy=_finish(rows), fits=fits, timings=timings)


class CollinearRegressors(ValueError):
    """pyfixest dropped a slope regressor as collinear with the others or the fixed effects: the
    model as specified cannot be estimated on that sample (never silently reported without it)."""


def table2(
    panel: pl.DataFrame | pl.LazyFrame,
    *,
    subsamples: Mapping[str, tuple[str, Sequence[str]]] = TABLE2_SUBSAMPLES,
    fe: Sequence[str] = FE_DEFAULT,
    vcov: VcovSpec = "iid",
    method: Method = "pyfixest",
    on_empty: Literal["raise", "skip"] = "raise",
    depvar: str = DEPVAR,
    information: Literal["expected", "observed"] = "expected",
) -> TableResult:
    """Table 2: the full (unstandardised) model on each subsample (East, West, high/mid/low mkt)."""
    fits: dict[str, ProbitFit] = {}
    rows: list[dict] = []
    skipped: dict[str, str] = {}
    clus = _cluster_var(vcov)
    for name, (col, values) in subsamples.items():
        vals = [str(v).lower() for v in values]
        sub = panel.filter(pl.col(col).cast(pl.String).str.to_lowercase().is_in(vals))
        try:
            prep = prepare_sample(sub, FULL_MODEL, fe, depvar=depvar,
                                  cluster=[clus] if clus else [], sample=name)
        except ValueError as exc:
            if on_empty == "skip":
                skipped[name] = str(exc)
                continue
            raise
        try:
            fits[name] = fit_probit(prep, FULL_MODEL, fe, vcov=vcov, method=method, depvar=depvar,
                                    full_vcov=False, information=information)
        except CollinearRegressors as exc:
            if on_empty == "skip":  # e.g. a small subsample where a density has no variation left
                skipped[name] = str(exc)
                continue
            raise
        rows += _rows_for_fit(fits[name], "table2", name, fits[name].tidy())
    return TableResult(tidy=_finish(rows), fits=fits, skipped=skipped)


def lpm(
    panel: pl.DataFrame | pl.LazyFrame | PreparedSample,
    regressors: Sequence[str] = FULL_MODEL,
    fe: Sequence[str] = FE_DEFAULT,
    *,
    vcovs: Sequence[VcovSpec] = ("iid", {"CRV1": "firm_id"}, {"CRV1": "city_code"}),
    probit_sample: bool = True,
    sample: str = "full",
    model: str = "LPM",
    depvar: str = DEPVAR,
) -> pl.DataFrame:
    """Linear probability model with the same FEs (pyfixest feols), one fit, several vcovs.

    ``probit_sample=True`` (default) estimates on the Probit's sample (FE groups with constant
    outcome removed) so that the columns are comparable; ``False`` keeps them (LPM is identified
    there). ``fixef_rm="none"`` so pyfixest drops nothing more (and cannot hit the empty-sample
    abort). Small-sample corrections are pyfixest's defaults (fixest's). ``pseudo_r2`` holds R2.
    """
    import pyfixest as pf

    clusters = [next(iter(v.values())).strip() for v in vcovs if not isinstance(v, str)]
    if isinstance(panel, PreparedSample):
        df = panel.frame
    elif probit_sample:
        df = prepare_sample(panel, regressors, fe, depvar=depvar, cluster=clusters, sample=sample).frame
    else:
        cols = list(dict.fromkeys([depvar, *regressors, *fe, *clusters]))
        df = panel.select(cols)
        df = (df.collect() if isinstance(df, pl.LazyFrame) else df).drop_nulls()
        if df.height == 0:
            raise ValueError(f"sample '{sample}': no complete observation for the LPM")
        df = df.with_columns(pl.col(depvar).cast(pl.Float64),
                             *[pl.col(c).rank("dense").cast(pl.UInt32) for c in [*fe, *clusters]])
    fml = f"{depvar} ~ {' + '.join(regressors)} | {' + '.join(fe)}"
    cols = list(dict.fromkeys([depvar, *regressors, *fe, *clusters]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = pf.feols(fml, data=df.select(cols), vcov="iid", fixef_rm="none")
    rows = []
    for v in vcovs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fit.vcov(v)
        td = fit.tidy()
        for term, r in td.iterrows():
            rows.append(dict(table="lpm", model=model, term=str(term), kind="coef",
                             estimate=float(r["Estimate"]), std_error=float(r["Std. Error"]),
                             statistic=float(r["t value"]), p_value=float(r["Pr(>|t|)"]),
                             n_obs=int(fit._N), n_dropped=None, pseudo_r2=float(fit._r2),
                             fixed_effects=_fe_label(fe), sample=sample, vcov=_vcov_label(v),
                             estimator="lpm:feols"))
    return _finish(rows, published=False)


def tidy_all(*parts: pl.DataFrame) -> pl.DataFrame:
    """Stack tidy tables (Table 1, Table 2, LPM) into one frame."""
    return pl.concat([p.select(TIDY_COLUMNS).cast(TIDY_SCHEMA) for p in parts], how="vertical")


# --------------------------------------------------------------------------------------------
# Simulation helper (tests and benchmarks; never used on real data)
# --------------------------------------------------------------------------------------------

PLANTED_DEFAULT: dict[str, float] = {
    "density_firm": 5.0, "density_city": 0.8, "interaction": -3.0,
    "tradevalue": -0.025, "newexport": 0.29,
}


def simulate_probit_panel(
    n: int,
    *,
    n_years: int = 15,
    n_industries: int = 97,
    n_firms: int | None = None,
    n_cities: int = 300,
    beta: Mapping[str, float] = PLANTED_DEFAULT,
    fe_scale: float = 0.3,
    intercept: float = -2.3,
    seed: int = 0,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """A panel with the S000 columns drawn from a known Probit DGP; returns (panel, truth).

    ``export = 1[ xb + mu_year + theta_industry + e > 0 ]``, ``e ~ N(0, 1)``, with
    ``xb = sum beta_k x_k + intercept``. Densities mimic the paper's scale (density_firm > 0.05,
    sd ~0.07; density_city >= density_firm, sd ~0.2); ``truth`` holds beta and the FE values.
    """
    rng = np.random.default_rng(seed)
    n_firms = n_firms or max(2, n // 20)
    firm = rng.integers(0, n_firms, n)
    firm_city = rng.integers(0, n_cities, n_firms)
    city = firm_city[firm]
    year = rng.integers(0, n_years, n)
    ind = rng.integers(0, n_industries, n)
    d_f = 0.05 + rng.gamma(1.2, 0.055, n)
    d_f = np.minimum(d_f, 0.95)
    d_c = np.minimum(d_f + rng.beta(1.5, 2.5, n) * 0.6, 1.0)
    firm_size = rng.normal(15.0, 2.0, n_firms)
    tv = firm_size[firm] + rng.normal(0.0, 0.8, n)
    ne = np.log1p(rng.poisson(1.5, n).astype(float))
    mu = rng.normal(0.0, fe_scale, n_years)
    th = rng.normal(0.0, fe_scale, n_industries)
    X = {"density_firm": d_f, "density_city": d_c, "interaction": d_f * d_c, "tradevalue": tv, "newexport": ne}
    xb = intercept + sum(beta[k] * X[k] for k in beta) + mu[year] + th[ind]
    y = (xb + rng.standard_normal(n) > 0).astype(np.int8)
    regions = np.array(["east", "central", "west", "northeast"])
    mkt = np.array(["low", "mid", "high"])
    city_region = rng.choice(4, n_cities, p=[0.55, 0.2, 0.15, 0.1])
    city_mkt = rng.choice(3, n_cities, p=[0.25, 0.25, 0.5])
    panel = pl.DataFrame({
        "year": (2002 + year).astype(np.int32), "firm_id": firm.astype(np.int64),
        "hs4": rng.integers(100, 9999, n).astype(np.int32), "export": y,
        "density_firm": d_f, "density_city": d_c, "interaction": d_f * d_c,
        "tradevalue": tv, "newexport": ne, "industry": ind.astype(np.int32),
        "macro_region": regions[city_region[city]], "city_code": city.astype(np.int32),
        "mkt_group": mkt[city_mkt[city]],
    })
    truth = {"beta": dict(beta), "intercept": intercept, "year_fe": mu, "industry_fe": th}
    return panel, truth


# --------------------------------------------------------------------------------------------
# Rendering presets (generic renderer in tables.py)
# --------------------------------------------------------------------------------------------

TERM_LABELS: dict[str, str] = {
    "density_firm": "density_firm",
    "density_city": "density_city",
    "interaction": "density_firm × density_city",
    "tradevalue": "tradevalue",
    "newexport": "newexport",
}
FE_LABELS: dict[str, str] = {"year": "Year FE", "industry": "Industry FE"}


def render_s000(
    tidy: pl.DataFrame,
    which: Literal["table1", "table2", "lpm", "ame"],
    fmt: Literal["markdown", "latex", "html"] = "markdown",
    *,
    show_published: bool = True,
    ame_method: Literal["naive_per_column", "interaction_aware"] = "naive_per_column",
    **options: Any,
) -> str:
    """Render one S000 table from the tidy frame.

    ``table1``: columns (1)-(5) coefficients and (6) = the AMEs chosen by ``ame_method`` (switch of
    spec S000 section 7): ``naive_per_column`` = ``ame_naive`` (the paper's layout, default) or
    ``interaction_aware`` (the densities' derivatives moving the product term; the product-term row
    then holds the Ai-Norton cross-partial). The tidy output always carries all three kinds;
    ``table2``: the five subsamples; ``lpm``: the LPM with its SE types side by side;
    ``ame``: column (6) with the three AME kinds side by side (naive, interaction-aware,
    cross-partial).
    """
    from kspill_pipeline.studies import tables

    opts: dict[str, Any] = dict(terms=list(FULL_MODEL), term_labels=TERM_LABELS, fe_labels=FE_LABELS)
    if which == "table1":
        if ame_method == "naive_per_column":
            col6 = pl.col("kind") == "ame_naive"
            label = "naive_per_column, as in the paper"
        elif ame_method == "interaction_aware":
            col6 = (pl.col("kind") == "ame_interaction_aware") | (
                (pl.col("kind") == "cross_partial") & (pl.col("term") == "interaction"))
            label = "interaction_aware; interaction row = Ai-Norton cross-partial"
        else:
            raise ValueError(f"ame_method must be 'naive_per_column' or 'interaction_aware', not {ame_method!r}")
        df = tidy.filter((pl.col("table") == "table1")
                         & (((pl.col("model") != "(6)") & (pl.col("kind") == "coef"))
                            | ((pl.col("model") == "(6)") & col6)))
        opts.update(title=f"Table 1: Probit, year and industry FE; (5) standardised; (6) AMEs of (5) "
                          f"({label})", show_published=show_published)
    elif which == "table2":
        df = tidy.filter(pl.col("table") == "table2")
        opts.update(title="Table 2: regional heterogeneity (Probit, full model)", show_published=show_published)
    elif which == "lpm":
        df = tidy.filter(pl.col("table") == "lpm")
        opts.update(columns=("model", "vcov"), stats=(("n_obs", "Observations"), ("pseudo_r2", "R2")),
                    title="Linear probability model, same FEs: plain and clustered SEs")
    elif which == "ame":
        df = tidy.filter((pl.col("table") == "table1") & (pl.col("model") == "(6)"))
        opts.update(columns=("kind",), show_published=show_published,
                    title="Average marginal effects of Model (5): naive_per_column (the paper's), "
                          "interaction_aware, and the Ai-Norton cross-partial (row of the product term)")
    else:
        raise ValueError(f"unknown table {which!r}")
    opts.update(options)
    return tables.render(df, fmt, **opts)
