"""Product relatedness kernels: RCA, presence, co-occurrence, proximity and density.

Pure numpy / scipy / polars (never import Dagster here). Every function cites the formula it
implements; the spec references are

* S000 section 3.1, Eq. (1): ``phi_ij = N_ij / max(N_i, N_j)`` from firm co-export (HS4, per year);
* S000 section 3.2, Eqs. (2)-(3): ``density_{f,i} = sum_j phi_ij x_fj / sum_j phi_ij`` for firm and
  city IMPORT baskets ``x`` (a different presence matrix than the one ``phi`` came from);
* S000 section 8.2: ``C = M^T M`` (diagonal = ubiquity), ``D = X Phi / (1^T Phi)``, chunked by firm;
* issue 3 ("Computation"): the Balassa RCA, presence by RCA ``>=`` or ``>``, value ``> 0`` or a given
  binary matrix, proximity options (diagonal, asymmetric, continuous) and density options
  (diagonal, Stata ``leaveout``, density of another presence matrix).

Matrix orientation everywhere: rows are units (countries, cities or firms), columns are products.
Products are in the column order carried by :class:`Presence` / :func:`to_matrix`; phi is indexed
``phi[p, q]`` in that same order.

Conventions (the three external tools differ; see ``complexity.PRESETS`` and the README table):

* proximity ``phi[p, q]`` for ``variant="asymmetric"`` is ``C_pq / u_q = P(p | q)``: the row index is
  the product whose presence is predicted, the column index the conditioning product. This is the
  Stata ``ecomplexity`` matrix ``P1 = C :/ S`` (``proxdiscrete.ado``).
* density uses COLUMN sums of phi: ``density_{u,p} = sum_q M_uq phi_qp / sum_q phi_qp``
  (Stata ``calculate_density.ado``: ``(M*prox) :/ (J(Nix,Npx,1)*prox)``; py-ecomplexity
  ``calc_density`` computes the same thing through ``phi.T / rowsum``). For a symmetric phi this is
  the formula of S000 Eqs. (2)-(3); for the asymmetric phi it weights each present product q by
  ``P(q | p)``, which is what both tools do.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import polars as pl

if TYPE_CHECKING:  # scipy.sparse is imported lazily: the dense country-scale path (and the
    import scipy.sparse as sp  # `kspill relatedness` start-up) never pays for it.


def _sp():
    import scipy.sparse as sp

    return sp

__all__ = [
    "Presence",
    "to_matrix",
    "rca",
    "presence",
    "cooccurrence",
    "proximity",
    "density",
    "density_kernel",
    "density_leave_one_out",
    "diversity",
    "ubiquity",
    "proximity_long",
]

ProximityVariant = Literal["min_conditional", "asymmetric", "correlation"]
DiagonalMode = Literal["one", "zero", "raw"]

# Above this share of non-zero cells a presence matrix is multiplied as a dense array (BLAS);
# below it stays scipy.sparse (STACK_NOTES section 3: dense BLAS pays above about 5 %).
DENSE_SHARE = 0.05


@dataclass
class Presence:
    """Binary presence matrix ``M`` (units x products) in sparse CSR, with its labels.

    ``M[u, p] = 1`` when unit ``u`` is present in product ``p`` (RCA above the threshold, value > 0,
    or a given binary indicator; see :func:`presence`). ``units`` and ``products`` are the labels in
    row and column order. ``values`` (the summed raw values) and ``rca`` (Balassa RCA, only for
    ``how="rca"``) are kept when they were computed, in the same layout, as CSR arrays.
    """

    M: sp.csr_array
    units: np.ndarray
    products: np.ndarray
    values: sp.csr_array | None = None
    rca: sp.csr_array | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.M.shape

    def diversity(self) -> np.ndarray:
        """Row sums of M (``k_{u,0}``)."""
        return diversity(self.M)

    def ubiquity(self) -> np.ndarray:
        """Column sums of M (``k_{p,0}``), equal to ``diag(C)``."""
        return ubiquity(self.M)


# --------------------------------------------------------------------------------------------
# long -> matrix
# --------------------------------------------------------------------------------------------


def to_matrix(
    df: pl.DataFrame | pl.LazyFrame,
    unit: str,
    product: str,
    value: str,
    products: Sequence | np.ndarray | None = None,
    units: Sequence | np.ndarray | None = None,
) -> tuple[sp.csr_array, np.ndarray, np.ndarray]:
    """Pivot a long frame into a CSR matrix ``X[u, p] = sum of value`` (duplicates are summed).

    Rows with a null unit or product are dropped; null values count as 0. Units are sorted
    ascending unless ``units`` is given; products are sorted ascending unless ``products`` is given,
    in which case the columns follow that order exactly (products absent from the data are all-zero
    columns, and rows whose product is not in ``products`` are DROPPED: this is how an import basket
    is aligned with the product list of a phi matrix, S000 section 3.2). ``units`` works the same
    way for rows. Explicit zeros are not stored. Returns ``(X, units, products)`` with the label
    arrays as numpy arrays (strings stay strings, so HS codes keep their leading zeros).
    """
    lf = df.lazy() if isinstance(df, pl.DataFrame) else df
    agg = (
        lf.select(pl.col(unit).alias("_u"), pl.col(product).alias("_p"), pl.col(value).cast(pl.Float64).alias("_v"))
        .drop_nulls(["_u", "_p"])
        .with_columns(pl.col("_v").fill_null(0.0).fill_nan(0.0))
        .group_by(["_u", "_p"])
        .agg(pl.col("_v").sum())
        .collect()
    )
    u_dtype = agg.schema["_u"]
    p_dtype = agg.schema["_p"]
    if units is None:
        u_labels = agg.get_column("_u").unique().sort()
    else:
        u_labels = pl.Series("_u", list(units) if not isinstance(units, np.ndarray) else units).cast(u_dtype)
    if products is None:
        p_labels = agg.get_column("_p").unique().sort()
    else:
        p_labels = pl.Series("_p", list(products) if not isinstance(products, np.ndarray) else products).cast(p_dtype)
    if u_labels.n_unique() != len(u_labels):
        raise ValueError("`units` contains duplicate labels")
    if p_labels.n_unique() != len(p_labels):
        raise ValueError("`products` contains duplicate labels")
    u_idx = pl.DataFrame({"_u": u_labels}).with_row_index("_i")
    p_idx = pl.DataFrame({"_p": p_labels}).with_row_index("_j")
    joined = agg.join(u_idx, on="_u", how="inner").join(p_idx, on="_p", how="inner").filter(pl.col("_v") != 0.0)
    rows = joined.get_column("_i").to_numpy().astype(np.int64, copy=False)
    cols = joined.get_column("_j").to_numpy().astype(np.int64, copy=False)
    vals = joined.get_column("_v").to_numpy().astype(np.float64, copy=False)
    X = _sp().csr_array((vals, (rows, cols)), shape=(len(u_labels), len(p_labels)), dtype=np.float64)
    X.sum_duplicates()
    X.sort_indices()
    return X, u_labels.to_numpy(), p_labels.to_numpy()


# --------------------------------------------------------------------------------------------
# RCA and presence
# --------------------------------------------------------------------------------------------


def _is_sparse(X) -> bool:
    # scipy.sparse.issparse without importing scipy.sparse: every sparse array/matrix class
    # lives in a scipy.sparse module
    return type(X).__module__.startswith("scipy.sparse")


def _as_csr(M) -> sp.csr_array:
    sp = _sp()
    if sp.issparse(M):
        out = sp.csr_array(M)
        if out.dtype != np.float64:
            out = out.astype(np.float64)
        return out
    return sp.csr_array(np.asarray(M, dtype=np.float64))


UNIT_SNAP = 1e-12


def _snap_unit(x: np.ndarray) -> np.ndarray:
    """Set values in (1, 1 + 1e-12] to exactly 1, in place, and return ``x``.

    A density ``sum_q M_uq phi_qp / sum_q phi_qp`` with 0/1 presence and phi >= 0 is at most 1,
    but the ratio of two sums accumulated in different orders (the kernel multiplies by the
    reciprocal of the denominator) can land one or two ulps above 1 when ``M_uq = 1`` on every q
    with phi_qp > 0, e.g. a product exported only by this unit (measured: 1 + 2.2e-16 at ``full``
    scale). Values further above 1 (weighted M) are left alone so that the contracts catch them.
    """
    over = x > 1.0
    if over.any():
        x[over & (x <= 1.0 + UNIT_SNAP)] = 1.0
    return x


def _safe_inv(v: np.ndarray) -> np.ndarray:
    out = np.zeros_like(v, dtype=np.float64)
    nz = v != 0
    out[nz] = 1.0 / v[nz]
    return out


def rca(X):
    """Balassa revealed comparative advantage (issue 3, "Computation"; Balassa 1965).

    ``RCA_up = (X_up / X_u) / (X_p / X)`` with ``X_u = sum_p X_up``, ``X_p = sum_u X_up`` and
    ``X = sum X``, evaluated as ``(X_up / X_u) / (X_p / X)`` in that order of operations, the order
    Stata (``complexity_rca.ado``) and py-ecomplexity (``calculate_rca``) use, so the floats agree
    with theirs up to the summation order of the totals.

    Zero-safe: cells in a row with ``X_u = 0`` or a column with ``X_p = 0`` get RCA 0 (both tools
    drop such rows and columns before this step; :func:`complexity.ecomplexity` does too).
    Sparse in, sparse (CSR, same pattern) out; dense in, dense out; float64.
    """
    if _is_sparse(X):
        Xs = _as_csr(X)
        Xu = np.asarray(Xs.sum(axis=1)).ravel()
        Xp = np.asarray(Xs.sum(axis=0)).ravel()
        tot = Xp.sum()
        share_p = Xp / tot if tot != 0 else np.zeros_like(Xp)
        out = Xs.copy()
        r = np.repeat(np.arange(Xs.shape[0]), np.diff(Xs.indptr))
        c = Xs.indices
        with np.errstate(divide="ignore", invalid="ignore"):
            num = Xs.data / Xu[r]
            v = num / share_p[c]
        v[~np.isfinite(v)] = 0.0
        out.data = v
        out.eliminate_zeros()
        return out
    Xd = np.asarray(X, dtype=np.float64)
    Xu = Xd.sum(axis=1)[:, None]
    Xp = Xd.sum(axis=0)[None, :]
    tot = Xp.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        out = (Xd / Xu) / (Xp / tot)
    out[~np.isfinite(out)] = 0.0
    return out


def presence(
    df: pl.DataFrame | pl.LazyFrame,
    unit: str,
    product: str,
    value: str,
    *,
    how: Literal["rca", "value", "binary"] = "rca",
    threshold: float | None = None,
    strict: bool | None = None,
    products: Sequence | np.ndarray | None = None,
    units: Sequence | np.ndarray | None = None,
) -> Presence:
    """Binary presence matrix from a long frame (issue 3; S000 sections 3.1-3.2).

    * ``how="rca"``: ``M = RCA >= threshold`` (default threshold 1, ``strict=False``), or
      ``RCA > threshold`` with ``strict=True``. py-ecomplexity and R ``economiccomplexity`` use
      ``>=``; the Stata ``ecomplexity`` CODE uses ``>`` (``mata M = (RCA:>`rca')``) although its
      help text says ``>=``.
    * ``how="value"``: ``M = value > threshold`` (default threshold 0: firm f exports/imports p,
      S000 ``V_{fi} > 0``); ``strict=False`` gives ``>=``.
    * ``how="binary"``: the value column already is the indicator; every non-zero cell is 1.

    RCA is computed on the matrix as given (all units and products present in the frame, or the
    ``products``/``units`` lists; see :func:`to_matrix`). Returns :class:`Presence` with
    float64 0/1 data and the summed values (and RCA) attached.
    """
    X, u, p = to_matrix(df, unit, product, value, products=products, units=units)
    R = None
    if how == "rca":
        thr = 1.0 if threshold is None else float(threshold)
        st = False if strict is None else bool(strict)
        R = rca(X)
        base = R
    elif how == "value":
        thr = 0.0 if threshold is None else float(threshold)
        st = True if strict is None else bool(strict)
        base = X
    elif how == "binary":
        thr, st, base = 0.0, True, abs(X)
    else:  # pragma: no cover - guarded by Literal
        raise ValueError(f"unknown presence rule {how!r}")
    M = _threshold(base, thr, st)
    return Presence(M=M, units=u, products=p, values=X, rca=R)


def _threshold(base: sp.csr_array, thr: float, strict: bool) -> sp.csr_array:
    """0/1 CSR of ``base > thr`` (strict) or ``base >= thr``; only stored cells can be 1 when
    the rule is not satisfied by 0 (a threshold <= 0 with >= would make every cell present)."""
    if (not strict and thr <= 0) or (strict and thr < 0):
        raise ValueError("a presence threshold that zero cells satisfy would make M dense; use thr > 0")
    data = base.data
    keep = data > thr if strict else data >= thr
    M = base.copy()
    M.data = keep.astype(np.float64)
    M.eliminate_zeros()
    return M


def diversity(M) -> np.ndarray:
    """Diversity ``k_{u,0} = sum_p M_up`` (row sums), float64."""
    return np.asarray(M.sum(axis=1), dtype=np.float64).ravel()


def ubiquity(M) -> np.ndarray:
    """Ubiquity ``k_{p,0} = sum_u M_up`` (column sums) = ``diag(M^T M)``, float64."""
    return np.asarray(M.sum(axis=0), dtype=np.float64).ravel()


# --------------------------------------------------------------------------------------------
# co-occurrence and proximity
# --------------------------------------------------------------------------------------------


def cooccurrence(M) -> np.ndarray:
    """Co-occurrence ``C = M^T M`` (S000 section 8.2; ``C_pq = N_pq`` = units present in both p and q,
    ``C_pp = N_p`` = ubiquity). Sparse or dense in, dense float64 (products x products) out.

    For a 0/1 matrix every entry is an integer count below 2**53, so the result is exact and
    identical whichever route (sparse product, dense BLAS, or a sum of per-chunk partials) computes
    it. Dense BLAS is used when more than ``DENSE_SHARE`` of the cells are non-zero.
    """
    if _is_sparse(M):
        Ms = _as_csr(M)
        n = Ms.shape[0] * Ms.shape[1]
        if n and Ms.nnz / n > DENSE_SHARE:
            return _dense_gram(Ms.toarray())
        return np.asarray((Ms.T @ Ms).toarray(), dtype=np.float64)
    return _dense_gram(np.asarray(M, dtype=np.float64))


def _dense_gram(Md: np.ndarray) -> np.ndarray:
    """``Md^T Md`` (float64). For a 0/1 matrix with fewer than 2**24 rows the product runs in float32
    BLAS (syrk): every partial sum is an integer below 2**24, exact in float32 whatever the
    summation order, so the result is identical to the float64 product, in half the time."""
    if Md.shape[0] < 2**24 and Md.size:
        M32 = Md.astype(np.float32)
        if np.array_equal(M32, M32 != 0):  # binary (no NaN, no other values)
            P = Md.shape[1]
            # the float32 product is written into the first half of the float64 result's buffer and
            # widened in place from the last row down (each block is copied out before the float64
            # rows overwrite it; float64 rows [i0, i1) only cover float32 rows >= i0, already
            # consumed): no extra products x products array to allocate and page in
            out = np.empty((P, P), dtype=np.float64)
            c32 = out.reshape(-1).view(np.float32)[: P * P].reshape(P, P)
            np.matmul(M32.T, M32, out=c32)
            flat32 = c32.reshape(-1)
            block = max(1, min(P, (1 << 18) // max(P, 1)))
            for i1 in range(P, 0, -block):
                i0 = max(0, i1 - block)
                tmp = flat32[i0 * P : i1 * P].copy()
                out[i0:i1] = tmp.reshape(i1 - i0, P)
            return out
    return Md.T @ Md


def _pearson_columns(L: np.ndarray) -> np.ndarray:
    """Pearson correlation of the columns of L (n x P), like ``np.corrcoef(L.T)`` and Stata
    ``correlation()``. Columns with zero variance get correlation 0 with everything (NaN in the
    tools) and 1 with themselves."""
    L = np.asarray(L, dtype=np.float64)
    Lc = L - L.mean(axis=0, keepdims=True)
    S = Lc.T @ Lc
    return _corr_from_scatter(S)


def _corr_from_scatter(S: np.ndarray) -> np.ndarray:
    d = np.sqrt(np.clip(np.diag(S), 0.0, None))
    inv = _safe_inv(d)
    R = S * inv[:, None] * inv[None, :]
    np.clip(R, -1.0, 1.0, out=R)
    zero = d == 0
    if zero.any():
        R[zero, :] = 0.0
        R[:, zero] = 0.0
    np.fill_diagonal(R, 1.0)
    return R


def proximity(
    C: np.ndarray | None,
    *,
    variant: ProximityVariant = "min_conditional",
    diagonal: DiagonalMode = "one",
    M=None,
    overwrite: bool = False,
) -> np.ndarray:
    """Product proximity phi (products x products, dense float64).

    Let ``u = diag(C)`` (ubiquity).

    * ``"min_conditional"`` (S000 Eq. (1); Hidalgo et al. 2007):
      ``phi_pq = C_pq / max(u_p, u_q) = min(P(p|q), P(q|p))``; symmetric. Computed as
      ``min(C_pq / u_q, C_pq / u_p)``, the operation order of py-ecomplexity and Stata.
    * ``"asymmetric"``: ``phi_pq = C_pq / u_q = P(p | q)``, the share of units present in q that
      are also present in p. The COLUMN index conditions. This is Stata's ``asym`` matrix
      (``P1 = C :/ S``) and the transpose of py-ecomplexity's returned matrix; density uses
      column sums, so both tools then weight present products q by ``P(q | p)`` (see
      :func:`density`).
    * ``"correlation"`` (continuous proximity): ``phi_pq = (1 + r_pq) / 2`` where ``r_pq`` is the
      Pearson correlation across units of columns p and q of the level matrix passed as ``M``.
      This is what both Stata (``proxcontinous.ado``: ``0.5:*(1:+correlation(RCA))``) and
      py-ecomplexity (``calc_continuous_proximity``: ``(1 + np.corrcoef(rca.T)) / 2``) do, with the
      RCA matrix as levels; pass ``M=RCA`` (dense or sparse) to reproduce them. ``C`` is ignored
      (may be None). A column with zero variance has r = 0 with every other column (the tools
      produce NaN there).

    ``diagonal``: ``"one"`` sets ``phi_pp = 1`` (py-ecomplexity, R), ``"zero"`` sets 0 (Stata subtracts
    the identity: ``... - I(Npx)``), ``"raw"`` keeps the formula's value (1 whenever ``u_p > 0``).

    Zero-ubiquity products (``u_p = 0``; for "correlation": an all-zero level column) get a zero
    row and column, diagonal included, whatever ``diagonal`` says: they are related to nothing and
    their density is 0 (see :func:`density`). The tools give NaN there.

    ``overwrite=True`` computes phi in place in ``C`` (a float64 C-contiguous array that the caller
    no longer needs), in row blocks: no new products x products array is allocated, which matters
    at 5,000 products (each fresh 200 MB array costs page faults comparable to the arithmetic).
    """
    if variant == "correlation":
        if M is None:
            raise ValueError("variant='correlation' needs the level matrix M (e.g. the RCA matrix)")
        L = M.toarray() if _is_sparse(M) else np.asarray(M, dtype=np.float64)
        phi = 0.5 * (1.0 + _pearson_columns(L))
        empty = ~np.any(L != 0, axis=0)
    else:
        if C is None:
            if M is None:
                raise ValueError("proximity needs C (or M to compute it)")
            C = cooccurrence(M)
        C = np.asarray(C, dtype=np.float64)
        u = np.diag(C).copy()
        phi = C if (overwrite and C.flags.c_contiguous and C.flags.writeable) else np.empty_like(C)
        P = C.shape[0]
        block = max(1, min(P, 1 << 20 // max(P, 1)))
        if variant == "min_conditional":
            # C_pq / max(u_p, u_q): IEEE division is correctly rounded and monotone, so this is
            # bit-identical to min(C_pq / u_q, C_pq / u_p) (the tools' order of operations)
            buf = np.empty((block, P))
            for i0 in range(0, P, block):
                i1 = min(P, i0 + block)
                b = buf[: i1 - i0]
                np.maximum(u[i0:i1, None], u[None, :], out=b)
                zero = b == 0
                b[zero] = 1.0  # both ubiquities 0 -> C_pq = 0 -> phi 0
                np.divide(C[i0:i1], b, out=phi[i0:i1])
        elif variant == "asymmetric":
            inv = _safe_inv(u)[None, :]  # C_pq / u_q = P(p | q)
            for i0 in range(0, P, block):
                i1 = min(P, i0 + block)
                np.multiply(C[i0:i1], inv, out=phi[i0:i1])
        else:
            raise ValueError(f"unknown proximity variant {variant!r}")
        empty = u == 0
    if diagonal == "one":
        np.fill_diagonal(phi, 1.0)
    elif diagonal == "zero":
        np.fill_diagonal(phi, 0.0)
    elif diagonal != "raw":
        raise ValueError(f"unknown diagonal mode {diagonal!r}")
    if empty.any():
        phi[empty, :] = 0.0
        phi[:, empty] = 0.0
    return phi


def proximity_long(phi: np.ndarray, products: np.ndarray, *, names=("product_1", "product_2", "proximity")) -> pl.DataFrame:
    """phi as a long frame ``product_1, product_2, proximity`` (row-major: product_1 = row index)."""
    n = len(products)
    idx = np.arange(n)
    return pl.DataFrame(
        {
            names[0]: pl.Series(np.asarray(products)[np.repeat(idx, n)]),
            names[1]: pl.Series(np.asarray(products)[np.tile(idx, n)]),
            names[2]: np.ascontiguousarray(phi, dtype=np.float64).ravel(),
        }
    )


# --------------------------------------------------------------------------------------------
# density
# --------------------------------------------------------------------------------------------


def density_kernel(M_chunk, phi: np.ndarray, phi_colsum: np.ndarray, *, include_self: bool = True) -> np.ndarray:
    """The exact inner kernel of :func:`density` (S000 Eqs. (2)-(3), section 8.2 ``D = X Phi / 1^T Phi``).

    ``out[u, p] = sum_q M_uq phi_qp / sum_q phi_qp`` for the rows of ``M_chunk``.

    * ``phi_colsum`` must be ``phi.sum(axis=0)`` of the FULL phi (diagonal included), computed once
      by the caller and passed to every chunk; the kernel subtracts the diagonal itself when
      ``include_self=False`` (numerator and denominator both drop q = p).
    * ``M_chunk``: scipy.sparse (any format; converted to CSR) or dense. Sparse chunks use the scipy
      CSR x dense product, which computes every output row independently, so splitting the rows into
      chunks gives bit-identical numbers to one call on the whole matrix. Dense input uses BLAS
      (fast at country/city scale, but not guaranteed bit-identical to the sparse route).
    * Columns whose denominator is 0 (zero-ubiquity products) give density 0.

    Returns a dense float64 array (rows of M_chunk x products).
    """
    phi = np.asarray(phi, dtype=np.float64)
    den = np.asarray(phi_colsum, dtype=np.float64).ravel()
    if _is_sparse(M_chunk):
        Ms = _as_csr(M_chunk)
        num = np.asarray(Ms @ phi, dtype=np.float64)
    else:
        Ms = None
        Md = np.asarray(M_chunk, dtype=np.float64)
        num = Md @ phi
    if not include_self:
        dphi = np.diag(phi).copy()
        if np.any(dphi != 0):
            den = den - dphi
            if Ms is not None:
                # subtract M_up * phi_pp on the stored cells only
                r = np.repeat(np.arange(Ms.shape[0]), np.diff(Ms.indptr))
                num[r, Ms.indices] -= Ms.data * dphi[Ms.indices]
            else:
                num -= Md * dphi[None, :]
    inv = _safe_inv(den)
    num *= inv[None, :]
    return _snap_unit(num)


def density(
    M_units,
    phi: np.ndarray,
    *,
    include_self: bool = True,
    leave_one_out: bool = False,
    denominator: Literal["column_sum"] = "column_sum",
    basis=None,
    variant: ProximityVariant = "min_conditional",
    diagonal: DiagonalMode = "zero",
    chunk_rows: int | None = None,
) -> np.ndarray:
    """Relatedness density (S000 Eqs. (2)-(3); Hidalgo et al. 2007).

    ``density_{u,p} = sum_q phi_qp M_uq / sum_q phi_qp`` (column sums of phi; equal to S000's
    ``sum_j phi_ij x_j / sum_j phi_ij`` for symmetric phi). ``M_units`` (units x products, sparse or
    dense, any number of rows) may come from a DIFFERENT presence matrix than phi, e.g. phi from
    firm co-export and densities of firm or city import baskets (S000 section 3.2); its columns
    must be in phi's product order (use ``to_matrix(..., products=...)``). ``M_units`` may also hold
    continuous levels (RCA) for the tools' ``cont`` option.

    * ``include_self=False`` drops q = p from numerator and denominator (S000 switch
      ``density_include_self``). With a phi whose diagonal is already 0 (Stata) both settings agree.
    * ``denominator``: only ``"column_sum"`` (both tools) is implemented.
    * ``leave_one_out=True`` is the Stata ``ecomplexity, leaveout`` convention
      (``calculate_density.ado``): for every unit u, phi is RE-ESTIMATED from the basis matrix
      without row u, its diagonal set by ``diagonal`` (Stata: 0, via ``- I(Npx)``), and unit u's
      density uses that phi: ``density_{u,p} = sum_q L_uq phi^(-u)_qp / sum_q phi^(-u)_qp``. Stata
      only reaches this branch with ``cont``, i.e. ``variant="correlation"`` on ``basis = levels = RCA``.
      Here ``basis`` (rows aligned with ``M_units``) and ``variant`` must be given; the passed phi
      is ignored. This is NOT the S000 ``city_density_leave_one_out`` switch (which removes a
      firm's own imports from its city's basket); that is a basket construction done by the
      caller. Cost O(units x products^2): country/city scale only.

    Without leave-one-out the work is :func:`density_kernel`, called on row chunks of
    ``chunk_rows`` rows (default: all rows at once) so the firm-scale path can call the kernel
    directly and obtain identical numbers.
    """
    if denominator != "column_sum":
        raise ValueError(f"unknown density denominator {denominator!r}")
    if leave_one_out:
        if basis is None:
            raise ValueError("leave_one_out=True needs `basis`: the matrix phi is estimated from")
        return density_leave_one_out(M_units, basis, variant=variant, diagonal=diagonal, include_self=include_self)
    phi = np.asarray(phi, dtype=np.float64)
    colsum = phi.sum(axis=0)
    n = M_units.shape[0]
    if chunk_rows is None or chunk_rows >= n:
        return density_kernel(M_units, phi, colsum, include_self=include_self)
    out = np.empty((n, phi.shape[1]), dtype=np.float64)
    Ms = _as_csr(M_units) if _is_sparse(M_units) else np.asarray(M_units, dtype=np.float64)
    for s in range(0, n, chunk_rows):
        out[s : s + chunk_rows] = density_kernel(Ms[s : s + chunk_rows], phi, colsum, include_self=include_self)
    return out


def density_leave_one_out(
    levels,
    basis,
    *,
    variant: ProximityVariant = "correlation",
    diagonal: DiagonalMode = "zero",
    include_self: bool = True,
) -> np.ndarray:
    """Stata ``leaveout`` density: unit u's density uses phi estimated without unit u.

    ``levels`` (units x products; what is averaged, M or RCA) and ``basis`` (same rows; what phi is
    estimated from: M for discrete variants, RCA for ``"correlation"``) must have the same row
    order. The per-unit phi is obtained by exact rank-one downdates instead of re-estimation:

    * discrete: ``C^(-u) = C - b_u b_u^T`` and ``u^(-u) = diag(C^(-u))``, then :func:`proximity`;
    * correlation: with columns centred on the full-sample mean, the scatter matrix without row u
      is ``S - (1 + 1/(n-1)) y_u y_u^T`` (``y_u`` = centred row u), then Pearson correlation.

    See :func:`density` for the formula and the Stata source it follows.
    """
    B = basis.toarray() if _is_sparse(basis) else np.asarray(basis, dtype=np.float64)
    L = levels.toarray() if _is_sparse(levels) else np.asarray(levels, dtype=np.float64)
    n, P = B.shape
    if L.shape != (n, P):
        raise ValueError("levels and basis must have the same shape (same units, same products)")
    out = np.zeros((n, P), dtype=np.float64)
    if variant == "correlation":
        mu = B.mean(axis=0, keepdims=True)
        Y = B - mu
        S = Y.T @ Y
        f = 1.0 + 1.0 / max(n - 1, 1)
        for i in range(n):
            y = Y[i]
            Si = S - f * np.outer(y, y)
            phi = 0.5 * (1.0 + _corr_from_scatter(Si))
            rest = np.ones(n, dtype=bool)
            rest[i] = False
            empty = ~np.any(B[rest] != 0, axis=0)
            phi = _set_diag(phi, diagonal, empty)
            out[i] = density_kernel(L[i : i + 1], phi, phi.sum(axis=0), include_self=include_self)[0]
        return out
    C = B.T @ B
    for i in range(n):
        b = B[i]
        Ci = C - np.outer(b, b)
        phi = proximity(Ci, variant=variant, diagonal=diagonal)
        out[i] = density_kernel(L[i : i + 1], phi, phi.sum(axis=0), include_self=include_self)[0]
    return out


def _set_diag(phi: np.ndarray, diagonal: DiagonalMode, empty: np.ndarray) -> np.ndarray:
    if diagonal == "one":
        np.fill_diagonal(phi, 1.0)
    elif diagonal == "zero":
        np.fill_diagonal(phi, 0.0)
    if empty.any():
        phi[empty, :] = 0.0
        phi[:, empty] = 0.0
    return phi


# --------------------------------------------------------------------------------------------
# density filtered at a threshold, without the dense units x products pass (firm scale)
# --------------------------------------------------------------------------------------------

# relative safety margin of the candidate bound (see density_above); rounding of a sum of k <= 2**20
# non-negative terms and of the normalisation is below (k + 3) * 2**-53 < 1.2e-10 relative
_CANDIDATE_MARGIN = 1e-9
# largest basket size with precomputed candidate lists; larger rows take every product as candidate
_KCAP_MAX = 64
# cells per step of the shortcut in density_above (bool scratch of this size)
_SHORTCUT_CELLS = 1 << 22


@dataclass
class DensityFilterIndex:
    """Candidate lists for :func:`density_above` (built once per phi by :func:`density_filter_index`).

    For product q and basket size k, the candidate columns of q are those p with
    ``k * phi_qp >= threshold * den_p * (1 - 1e-9)`` (``den`` the density denominator): they are the
    first ``counts[q, k]`` entries of ``cols[ptr[q]:ptr[q + 1]]`` (sorted by the smallest such k).
    ``kcap``: largest basket size covered; rows with more products use every column.
    """

    n_products: int
    threshold: float
    include_self: bool
    subtract_diag: bool
    dphi: np.ndarray
    inv: np.ndarray
    kcap: int
    ptr: np.ndarray
    cols: np.ndarray
    counts: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.dphi.nbytes + self.inv.nbytes + self.ptr.nbytes + self.cols.nbytes + self.counts.nbytes)


def _density_den(phi: np.ndarray, phi_colsum: np.ndarray, include_self: bool) -> tuple[np.ndarray, np.ndarray, bool]:
    """(denominator, diagonal of phi, whether the kernel subtracts the diagonal): exactly the
    arithmetic of :func:`density_kernel`."""
    den = np.asarray(phi_colsum, dtype=np.float64).ravel()
    dphi = np.diag(phi).copy()
    sub = (not include_self) and bool(np.any(dphi != 0))
    if sub:
        den = den - dphi
    return den, dphi, sub


def density_filter_index(phi: np.ndarray, phi_colsum: np.ndarray, threshold: float, *,
                         include_self: bool = True, budget: float = 0.25) -> DensityFilterIndex | None:
    """Precompute what :func:`density_above` needs to skip cells that cannot pass ``> threshold``.

    Returns None when the shortcut does not apply (negative or non-finite phi, a negative or
    non-finite threshold, a negative denominator): :func:`density_above` then computes every cell.
    ``budget``: at most ``budget * P^2`` candidate entries are stored (this fixes ``kcap``).
    """
    phi = np.asarray(phi, dtype=np.float64)
    P = phi.shape[0]
    thr = float(threshold)
    if not (np.isfinite(thr) and thr >= 0) or P == 0 or P >= 2**31:
        return None
    if not np.all(np.isfinite(phi)) or phi.min() < 0:
        return None
    den, dphi, sub = _density_den(phi, phi_colsum, include_self)
    if not np.all(np.isfinite(den)) or (den.size and den.min() < 0):
        return None
    inv = _safe_inv(den)
    # (q, p) is a candidate for baskets of k products when k * phi_qp >= bound_p (exact comparison;
    # the margin in bound_p covers the kernel's rounding). Only k <= _KCAP_MAX is indexed:
    # phi_qp * _KCAP_MAX (exact, a power of two) >= bound_p preselects the entries.
    bound = (thr * (1.0 - _CANDIDATE_MARGIN)) * den
    q_idx, p_idx = np.nonzero((phi * float(_KCAP_MAX) >= bound[None, :]) & (phi > 0))
    vals = phi[q_idx, p_idx]
    # smallest such k: ceil(bound_p / phi_qp); correctly rounded division is monotone, so this never
    # exceeds the exact smallest k (the index stays a superset)
    km = np.maximum(np.ceil(bound[p_idx] / vals), 1.0).astype(np.int64)
    np.minimum(km, _KCAP_MAX, out=km)
    # kcap: as many basket sizes as fit in the budget
    cum = np.cumsum(np.bincount(km, minlength=_KCAP_MAX + 1))
    fits = np.flatnonzero(cum[1:] <= budget * P * P)
    kcap = int(fits[-1]) + 1 if fits.size else 0
    if kcap < _KCAP_MAX:
        sel = km <= kcap
        q_idx, p_idx, km = q_idx[sel], p_idx[sel], km[sel]
    # entries come in (q, p) order; a stable sort on (q, k) gives (q, k, p)
    order = np.argsort(q_idx * (_KCAP_MAX + 1) + km, kind="stable")
    q_idx, p_idx, km = q_idx[order], p_idx[order], km[order]
    ptr = np.zeros(P + 1, dtype=np.int64)
    np.cumsum(np.bincount(q_idx, minlength=P), out=ptr[1:])
    counts = np.zeros((P, kcap + 1), dtype=np.int64)
    if kcap:
        counts.ravel()[:] = np.bincount(q_idx * (kcap + 1) + km, minlength=P * (kcap + 1))
        np.cumsum(counts, axis=1, out=counts)
    return DensityFilterIndex(n_products=P, threshold=thr, include_self=bool(include_self), subtract_diag=sub,
                              dphi=dphi, inv=inv, kcap=kcap, ptr=ptr, cols=p_idx.astype(np.int32), counts=counts)


def _dense_above(Ms, phi, phi_colsum, thr, include_self, block_rows):
    """Reference route: :func:`density_kernel` on row blocks, then ``> thr`` (row-major order)."""
    P = phi.shape[1]
    rows_l, cols_l, vals_l = [], [], []
    n = Ms.shape[0]
    for s in range(0, n, block_rows):
        D = density_kernel(Ms[s : s + block_rows], phi, phi_colsum, include_self=include_self)
        flat = D.reshape(-1)
        idx = np.flatnonzero(flat > thr)
        vals_l.append(flat[idx])
        r, c = np.divmod(idx, P)
        rows_l.append(r + s)
        cols_l.append(c)
        del D, flat
    if not rows_l:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64)
    return np.concatenate(rows_l), np.concatenate(cols_l), np.concatenate(vals_l)


def density_above(
    M_chunk,
    phi: np.ndarray,
    phi_colsum: np.ndarray,
    threshold: float,
    *,
    include_self: bool = True,
    index: DensityFilterIndex | None = None,
    block_rows: int = 256,
    max_candidate_share: float = 0.25,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The cells of :func:`density_kernel` above ``threshold``, without computing the others.

    Returns ``(rows, cols, values)`` (int64, int64, float64) of the cells with
    ``density_kernel(M_chunk, phi, phi_colsum, include_self=...)[r, c] > threshold``, in row-major
    order, with values BIT-IDENTICAL to the kernel's: exactly what ``np.nonzero(D > threshold)`` on
    the dense kernel output gives.

    Shortcut (binary sparse rows, phi >= 0, threshold >= 0; S000 firm baskets of ~3 HS4 products,
    0.4 % of the cells kept): ``density_up = sum_{q in basket(u)} phi_qp / den_p``, so a row with k
    products can only pass if some ``phi_qp >= threshold * den_p / k`` (up to a 1e-9 relative margin
    that covers every rounding of the kernel). Only those candidate cells are summed, over the
    basket's phi rows in the CSR column order, starting from 0.0, i.e. the same additions in the same
    order as the scipy CSR x dense product (``y += 1.0 * phi[q]``), then multiplied by the same
    ``1 / den``; with ``include_self=False`` the basket's own cells are candidates too and get the
    same ``- phi_pp``. Blocks whose candidate lists exceed ``max_candidate_share`` of their cells,
    non-binary or non-canonical rows, and phi/threshold outside the shortcut's domain go through
    :func:`density_kernel` itself (``block_rows`` rows at a time: the dense block stays in cache).

    ``index``: a :func:`density_filter_index` for this phi/colsum/threshold/include_self (built
    here when None; build it once when calling this for many chunks).
    """
    phi = np.asarray(phi, dtype=np.float64)
    thr = float(threshold)
    if not phi.flags.c_contiguous or not phi.flags.aligned:
        phi = np.require(phi, requirements=["C", "A"])
    P = phi.shape[1]
    if not _is_sparse(M_chunk):
        return _dense_above(np.asarray(M_chunk, dtype=np.float64), phi, phi_colsum, thr, include_self, block_rows)
    Ms = _as_csr(M_chunk)
    binary = Ms.has_canonical_format and (Ms.nnz == 0 or bool(np.all(Ms.data == 1.0)))
    if index is None and binary:
        index = density_filter_index(phi, phi_colsum, thr, include_self=include_self)
    if index is not None and (index.n_products != P or index.threshold != thr
                              or index.include_self != bool(include_self)):
        raise ValueError("`index` was built for another phi shape, threshold or include_self")
    if not binary or index is None:
        return _dense_above(Ms, phi, phi_colsum, thr, include_self, block_rows)
    n = Ms.shape[0]
    out_r, out_c, out_v = [], [], []
    # rows per shortcut step: a bool scratch of about 4M cells, set and cleared only where candidates
    # are (never re-zeroed whole); block_rows is the row block of the dense route
    step = max(1, min(n, max(block_rows, _SHORTCUT_CELLS // max(P, 1)), (2**31 - 1) // max(P, 1)))
    scratch = _scratch(step * P)  # never initialised: only read where just written
    phi_flat = phi.reshape(-1)
    for s in range(0, n, step):
        blk = Ms[s : s + step]
        r, c, v = _above_block(blk, phi, phi_flat, phi_colsum, thr, include_self, index, scratch,
                               max_candidate_share, block_rows)
        out_r.append(r + s)
        out_c.append(c)
        out_v.append(v)
    if not out_r:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64)
    return np.concatenate(out_r), np.concatenate(out_c), np.concatenate(out_v)


_TLS = threading.local()


def _scratch(n: int) -> np.ndarray:
    """A per-thread int32 buffer of at least n cells, reused across calls: its pages are faulted in
    once per thread instead of once per call (a fresh 16 MB array costs milliseconds of page faults)."""
    buf = getattr(_TLS, "scratch", None)
    if buf is None or buf.size < n:
        buf = np.empty(n, dtype=np.int32)
        _TLS.scratch = buf
    return buf[:n]


def _radix_order(v: np.ndarray, bound: int) -> np.ndarray:
    """Stable argsort of non-negative integers below ``bound`` (radix sort for 16-bit values)."""
    if bound <= 2**15:
        return np.argsort(v.astype(np.int16), kind="stable")
    return np.argsort(v, kind="stable")


def _basket_sums(cr, cc, kc, indptr, indices, phi_flat, P):
    """``sum_j phi[indices[indptr[r] + j], c]`` for cells (r, c) of rows with kc products, added
    from 0.0 in CSR order (the scipy CSR x dense accumulation). Cells must come in non-increasing kc,
    so that the cells still adding their j-th term are a prefix."""
    m_all = cr.size
    acc = np.zeros(m_all, dtype=np.float64)
    if m_all == 0:
        return acc
    kmax = int(kc[0])
    alive = np.searchsorted(-kc, -np.arange(kmax, dtype=np.int64), side="left")  # #(kc > j)
    pos = indptr[cr]
    tmp = np.empty(m_all, dtype=np.int64)
    val = np.empty(m_all, dtype=np.float64)
    for j in range(kmax):
        m = int(alive[j])
        t = tmp[:m]
        np.take(indices, pos[:m], out=t)  # q_j of each cell's row
        t *= P
        t += cc[:m]
        np.take(phi_flat, t, out=val[:m])
        acc[:m] += val[:m]
        pos[:m] += 1
    return acc


def _above_block(blk, phi, phi_flat, phi_colsum, thr, include_self, ix: DensityFilterIndex, scratch,
                 max_share, block_rows):
    """:func:`density_above` on one row block (binary canonical CSR)."""
    P = ix.n_products
    n = blk.shape[0]
    indptr = blk.indptr.astype(np.int64, copy=False)
    indices = blk.indices.astype(np.int64, copy=False)
    k = np.diff(indptr)
    big = k > ix.kcap  # rows with every product as candidate
    n_big = int(np.count_nonzero(big))
    # rows by basket size, largest first: every cell inherits its row's size, so cells generated row
    # by row come out grouped by size (what _basket_sums needs) without sorting the cells
    kc1 = ix.kcap + 1
    rord = _radix_order(kc1 - np.minimum(k, kc1), kc1 + 1)
    if n_big > 1:
        bigr = rord[:n_big]
        rord[:n_big] = bigr[np.argsort(-k[bigr], kind="stable")]
    ks = k[rord]
    # edges in that row order
    E = int(ks.sum())
    ends = np.cumsum(ks)
    epos = np.arange(E, dtype=np.int64) + np.repeat(indptr[rord] - (ends - ks), ks)
    q_all = indices[epos]
    re_all = np.repeat(rord, ks)
    e_big = int(ends[n_big - 1]) if n_big else 0  # edges of the big rows come first
    q, re = q_all[e_big:], re_all[e_big:]
    L = ix.counts[q, k[re]] if ix.kcap else np.zeros(q.size, dtype=np.int64)
    total = int(L.sum())
    if total + n_big * P > max_share * n * P:
        return _dense_above(blk, phi, phi_colsum, thr, include_self, block_rows)
    parts = []
    if n_big:
        parts.append(((rord[:n_big] * P)[:, None] + np.arange(P, dtype=np.int64)[None, :]).ravel())
    if total:
        lends = np.cumsum(L)
        pos = np.arange(total, dtype=np.int64) + np.repeat(ix.ptr[q] - (lends - L), L)
        parts.append(np.repeat(re * P, L) + ix.cols[pos])
    keys = np.concatenate(parts) if len(parts) > 1 else (parts[0] if parts else np.zeros(0, np.int64))
    # de-duplicate without sorting: each key writes its position into the scratch and the cell is kept
    # by its last writer; the order (grouped by row, rows by size) is preserved
    ar = np.arange(keys.size, dtype=scratch.dtype)
    scratch[keys] = ar
    own = None
    if ix.subtract_diag and E:
        own = re_all * P + q_all  # the basket's own cells: handled below (minus phi_pp)
        scratch[own] = -1
    keys = keys[scratch[keys] == ar]
    res = []
    if keys.size:
        cr, cc = np.divmod(keys, P)
        num = _basket_sums(cr, cc, k[cr], indptr, indices, phi_flat, P)
        num *= ix.inv[cc]
        _snap_unit(num)
        keep = num > thr
        res.append((cr[keep], cc[keep], num[keep]))
    if own is not None:
        # include_self=False: the kernel's num[u, p] - 1.0 * phi_pp on the basket's cells, then / den
        num = _basket_sums(re_all, q_all, k[re_all], indptr, indices, phi_flat, P)
        num -= ix.dphi[q_all]
        num *= ix.inv[q_all]
        _snap_unit(num)
        keep = num > thr
        res.append((re_all[keep], q_all[keep], num[keep]))
    if not res:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64)
    r = np.concatenate([x[0] for x in res]) if len(res) > 1 else res[0][0]
    c = np.concatenate([x[1] for x in res]) if len(res) > 1 else res[0][1]
    v = np.concatenate([x[2] for x in res]) if len(res) > 1 else res[0][2]
    # row-major order: stable radix sorts by column, then by row
    o = _radix_order(c, P)
    o = o[_radix_order(r[o], n)]
    return r[o], c[o], v[o]
