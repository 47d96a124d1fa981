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
            Md = Ms.toarray()
            return Md.T @ Md
        return np.asarray((Ms.T @ Ms).toarray(), dtype=np.float64)
    Md = np.asarray(M, dtype=np.float64)
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
    return num


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
