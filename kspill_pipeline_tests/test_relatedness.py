"""Relatedness kernels (compute/relatedness.py) on hand-computed matrices.

Every expected number below was computed by hand (fractions written out in the comments), never
copied from the code's output.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp

from kspill_pipeline.compute import relatedness as rel

# 3 units x 4 products. Row totals X_a = 10, X_b = 6, X_c = 4; column totals [6, 4, 6, 4]; X = 20.
X = np.array(
    [
        [4.0, 0.0, 2.0, 4.0],
        [0.0, 3.0, 3.0, 0.0],
        [2.0, 1.0, 1.0, 0.0],
    ]
)
# RCA = (X_up / X_u) / (X_p / X):
#  a: (4/10)/(6/20) = 4/3, 0, (2/10)/(6/20) = 2/3, (4/10)/(4/20) = 2
#  b: 0, (3/6)/(4/20) = 5/2, (3/6)/(6/20) = 5/3, 0
#  c: (2/4)/(6/20) = 5/3, (1/4)/(4/20) = 5/4, (1/4)/(6/20) = 5/6, 0
RCA = np.array(
    [
        [4 / 3, 0.0, 2 / 3, 2.0],
        [0.0, 5 / 2, 5 / 3, 0.0],
        [5 / 3, 5 / 4, 5 / 6, 0.0],
    ]
)
M = np.array([[1, 0, 0, 1], [0, 1, 1, 0], [1, 1, 0, 0]], dtype=float)  # RCA >= 1
# C = M^T M; ubiquity [2, 2, 1, 1] on the diagonal
C = np.array([[2, 1, 0, 1], [1, 2, 1, 0], [0, 1, 1, 0], [1, 0, 0, 1]], dtype=float)
# phi_pq = C_pq / max(u_p, u_q)
PHI = np.array(
    [
        [1.0, 0.5, 0.0, 0.5],
        [0.5, 1.0, 0.5, 0.0],
        [0.0, 0.5, 1.0, 0.0],
        [0.5, 0.0, 0.0, 1.0],
    ]
)
# asymmetric phi_pq = C_pq / u_q (column conditions)
PHI_ASYM = np.array(
    [
        [1.0, 0.5, 0.0, 1.0],
        [0.5, 1.0, 1.0, 0.0],
        [0.0, 0.5, 1.0, 0.0],
        [0.5, 0.0, 0.0, 1.0],
    ]
)
# (1 + Pearson r)/2 of the columns of M: r12 = -1/2, r13 = -1, r14 = 1/2, r23 = 1/2, r24 = -1, r34 = -1/2
PHI_CORR = np.array(
    [
        [1.0, 0.25, 0.0, 0.75],
        [0.25, 1.0, 0.75, 0.0],
        [0.0, 0.75, 1.0, 0.25],
        [0.75, 0.0, 0.25, 1.0],
    ]
)
# density with PHI (column sums 2, 2, 1.5, 1.5), own product included
DENS = np.array(
    [
        [0.75, 0.25, 0.0, 1.0],
        [0.25, 0.75, 1.0, 0.0],
        [0.75, 0.75, 1 / 3, 1 / 3],
    ]
)
# own product excluded (denominators 1, 1, 0.5, 0.5)
DENS_NOSELF = np.array(
    [
        [0.5, 0.5, 0.0, 1.0],
        [0.5, 0.5, 1.0, 0.0],
        [0.5, 0.5, 1.0, 1.0],
    ]
)


def long_frame(mat, units=("a", "b", "c"), products=("0011", "0012", "0013", "0014")) -> pl.DataFrame:
    rows = [(u, p, float(mat[i, j])) for i, u in enumerate(units) for j, p in enumerate(products) if mat[i, j] != 0]
    return pl.DataFrame(rows, schema={"unit": pl.Utf8, "product": pl.Utf8, "value": pl.Float64}, orient="row")


def test_to_matrix_sums_duplicates_keeps_labels_and_aligns_products():
    df = pl.DataFrame(
        {"u": ["b", "a", "a", "b", None], "p": ["01", "02", "02", "003", "01"], "v": [1.0, 2.0, 3.0, None, 9.0]}
    )
    Xm, units, prods = rel.to_matrix(df, "u", "p", "v")
    assert list(units) == ["a", "b"]
    assert list(prods) == ["003", "01", "02"]  # strings: leading zeros kept, lexicographic order
    np.testing.assert_array_equal(Xm.toarray(), [[0, 0, 5], [0, 1, 0]])  # 2 + 3 summed; null value = 0
    Xm2, _, prods2 = rel.to_matrix(df, "u", "p", "v", products=["02", "99", "01"])
    assert list(prods2) == ["02", "99", "01"]
    np.testing.assert_array_equal(Xm2.toarray(), [[5, 0, 0], [0, 0, 1]])  # "003" dropped, "99" empty


def test_rca_dense_and_sparse_and_zero_safe():
    np.testing.assert_allclose(rel.rca(X), RCA, rtol=0, atol=1e-15)
    np.testing.assert_allclose(rel.rca(sp.csr_array(X)).toarray(), RCA, rtol=0, atol=1e-15)
    Z = np.vstack([X, np.zeros(4)])
    Z = np.hstack([Z, np.zeros((4, 1))])
    R = rel.rca(Z)
    assert np.all(np.isfinite(R))
    np.testing.assert_array_equal(R[3], 0)
    np.testing.assert_array_equal(R[:, 4], 0)
    np.testing.assert_allclose(R[:3, :4], RCA, atol=1e-15)


def test_presence_rca_weak_and_strict_inequality():
    P = rel.presence(long_frame(X), "unit", "product", "value")
    np.testing.assert_array_equal(P.M.toarray(), M)
    assert list(P.products) == ["0011", "0012", "0013", "0014"]
    np.testing.assert_array_equal(P.diversity(), [2, 2, 2])
    np.testing.assert_array_equal(P.ubiquity(), [2, 2, 1, 1])
    # [[2, 2], [1, 1]]: every RCA = (2/4)/(3/6) = 1 exactly -> >= keeps all, > keeps none
    eq = pl.DataFrame({"unit": ["a", "a", "b", "b"], "product": ["x", "y", "x", "y"], "value": [2.0, 2.0, 1.0, 1.0]})
    assert rel.presence(eq, "unit", "product", "value").M.toarray().sum() == 4
    assert rel.presence(eq, "unit", "product", "value", strict=True).M.toarray().sum() == 0
    # threshold 1.5 on the 3x4 matrix: 5/3, 2, 5/2, 5/3 pass
    P15 = rel.presence(long_frame(X), "unit", "product", "value", threshold=1.5)
    np.testing.assert_array_equal(P15.M.toarray(), [[0, 0, 0, 1], [0, 1, 1, 0], [1, 0, 0, 0]])


def test_presence_value_and_binary():
    P = rel.presence(long_frame(X), "unit", "product", "value", how="value")
    np.testing.assert_array_equal(P.M.toarray(), (X > 0).astype(float))
    P2 = rel.presence(long_frame(X), "unit", "product", "value", how="value", threshold=2.0)
    np.testing.assert_array_equal(P2.M.toarray(), (X > 2).astype(float))
    B = rel.presence(long_frame(M), "unit", "product", "value", how="binary")
    np.testing.assert_array_equal(B.M.toarray(), M)


@pytest.mark.parametrize("fmt", ["dense", "csr", "sparse_low_density"])
def test_cooccurrence(fmt):
    Mi = {"dense": M, "csr": sp.csr_array(M), "sparse_low_density": sp.csr_matrix(M)}[fmt]
    if fmt == "sparse_low_density":
        old = rel.DENSE_SHARE
        rel.DENSE_SHARE = 1.0  # force the sparse route
        try:
            out = rel.cooccurrence(Mi)
        finally:
            rel.DENSE_SHARE = old
    else:
        out = rel.cooccurrence(Mi)
    assert isinstance(out, np.ndarray) and out.dtype == np.float64
    np.testing.assert_array_equal(out, C)


def test_proximity_variants_and_diagonals():
    np.testing.assert_array_equal(rel.proximity(C), PHI)
    np.testing.assert_array_equal(rel.proximity(C, variant="asymmetric"), PHI_ASYM)
    np.testing.assert_allclose(rel.proximity(None, variant="correlation", M=M), PHI_CORR, atol=1e-15)
    z = rel.proximity(C, diagonal="zero")
    np.testing.assert_array_equal(np.diag(z), 0)
    np.testing.assert_array_equal(z - np.diag(np.diag(z)), PHI - np.eye(4))
    np.testing.assert_array_equal(rel.proximity(C, diagonal="raw"), PHI)  # C_pp / u_p = 1
    # invariant of issue 3 / S000 section 9: phi_pq <= C_pq / u_p exactly
    u = np.diag(C)
    assert np.all(PHI <= C / u[:, None] + 0.0)


def test_proximity_zero_ubiquity_product_is_isolated():
    Cz = np.zeros((5, 5))
    Cz[:4, :4] = C
    for diag in ("one", "zero", "raw"):
        phi = rel.proximity(Cz, diagonal=diag)
        np.testing.assert_array_equal(phi[4], 0)
        np.testing.assert_array_equal(phi[:, 4], 0)
    Mz = np.hstack([M, np.zeros((3, 1))])
    d = rel.density(Mz, rel.proximity(Cz))
    np.testing.assert_array_equal(d[:, 4], 0)
    np.testing.assert_allclose(d[:, :4], DENS, atol=1e-15)


def test_density_options():
    np.testing.assert_allclose(rel.density(M, PHI), DENS, atol=1e-15)
    np.testing.assert_allclose(rel.density(sp.csr_array(M), PHI), DENS, atol=1e-15)
    np.testing.assert_allclose(rel.density(M, PHI, include_self=False), DENS_NOSELF, atol=1e-15)
    np.testing.assert_allclose(rel.density(sp.csr_array(M), PHI, include_self=False), DENS_NOSELF, atol=1e-15)
    # a zero-diagonal phi gives the "exclude self" numbers whatever include_self says (Stata)
    phi0 = rel.proximity(C, diagonal="zero")
    np.testing.assert_allclose(rel.density(M, phi0), DENS_NOSELF, atol=1e-15)
    np.testing.assert_allclose(rel.density(M, phi0, include_self=False), DENS_NOSELF, atol=1e-15)
    # asymmetric phi, column sums all 2: a = [(1 + .5)/2, (.5 + 0)/2, 0, (1 + 1)/2]
    np.testing.assert_allclose(rel.density(M, PHI_ASYM)[0], [0.75, 0.25, 0.0, 1.0], atol=1e-15)


def test_density_of_a_different_presence_matrix():
    # phi from the export presence M (S000: co-export), densities of two import baskets
    imports = np.array([[0, 0, 1, 0], [1, 1, 1, 1]], dtype=float)
    # f1 imports only p3: p1 0/2, p2 .5/2, p3 1/1.5, p4 0
    expect = np.array([[0.0, 0.25, 2 / 3, 0.0], [1.0, 1.0, 1.0, 1.0]])
    np.testing.assert_allclose(rel.density(sp.csr_array(imports), PHI), expect, atol=1e-15)
    # superset basket has weakly larger density on every cell (S000 section 9 invariant)
    city = np.maximum(imports[0], M[0])
    assert np.all(rel.density(city[None, :], PHI) >= rel.density(imports[:1], PHI) - 1e-15)


def test_density_kernel_chunks_identical_to_whole():
    rng = np.random.default_rng(3)
    big = sp.random_array((257, 40), density=0.1, rng=rng, format="csr")
    big.data[:] = 1.0
    phi = rel.proximity(rel.cooccurrence(big))
    whole = rel.density(big, phi)
    chunked = rel.density(big, phi, chunk_rows=17)
    assert np.array_equal(whole, chunked)  # bit-identical
    colsum = phi.sum(axis=0)
    manual = np.vstack([rel.density_kernel(big[s : s + 50], phi, colsum, include_self=False) for s in range(0, 257, 50)])
    assert np.array_equal(manual, rel.density(big, phi, include_self=False))
    assert manual.dtype == np.float64


def test_leave_one_out_discrete_by_hand():
    # unit a left out: basis rows b, c -> u' = [1, 2, 1, 0]; phi'_12 = 1/2, phi'_23 = 1/2, rest 0
    # (diagonal 0, p4 isolated). Column sums [.5, 1, .5, 0]; M_a = [1, 0, 0, 1]:
    # p1: 0/.5 = 0, p2: .5/1, p3: 0/.5, p4: denominator 0 -> 0
    d = rel.density(M, None, leave_one_out=True, basis=M, variant="min_conditional", diagonal="zero")
    np.testing.assert_allclose(d[0], [0.0, 0.5, 0.0, 0.0], atol=1e-15)
    # every row equals re-estimating phi without that row (brute force)
    for i in range(3):
        rest = np.delete(M, i, axis=0)
        phi_i = rel.proximity(rest.T @ rest, diagonal="zero")
        np.testing.assert_allclose(d[i], rel.density(M[i : i + 1], phi_i)[0], atol=1e-15)


def test_leave_one_out_continuous_matches_brute_force_correlation():
    rng = np.random.default_rng(11)
    R = rng.lognormal(size=(9, 6))
    d = rel.density(R, None, leave_one_out=True, basis=R, variant="correlation", diagonal="zero")
    for i in range(9):
        rest = np.delete(R, i, axis=0)
        phi_i = 0.5 * (1 + np.corrcoef(rest.T))  # Stata: 0.5:*(1:+correlation(RCA)) - I
        np.fill_diagonal(phi_i, 0.0)
        expect = (R[i] @ phi_i) / phi_i.sum(axis=0)
        np.testing.assert_allclose(d[i], expect, rtol=1e-12, atol=1e-12)


def test_proximity_long_layout():
    lf = rel.proximity_long(PHI, np.array(["0011", "0012", "0013", "0014"]))
    assert lf.columns == ["product_1", "product_2", "proximity"]
    row = lf.filter((pl.col("product_1") == "0011") & (pl.col("product_2") == "0014"))
    assert row["proximity"].item() == 0.5


# ------------------------------------------------------------------------------------------------
# performance paths must give the same bits as the reference arithmetic
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(300, 700), (7, 13), (1, 1), (40, 1)])
def test_cooccurrence_float32_route_is_exact(shape):
    rng = np.random.default_rng(sum(shape))
    M = (rng.random(shape) < 0.4).astype(np.float64)
    C = rel.cooccurrence(M)
    assert C.dtype == np.float64 and C.flags.c_contiguous
    assert np.array_equal(C, M.T @ M)
    # non-binary input keeps the float64 product
    L = rng.random(shape)
    assert np.array_equal(rel.cooccurrence(L), L.T @ L)


def _dense_reference(M, phi, thr, include_self):
    D = rel.density_kernel(M, phi, phi.sum(axis=0), include_self=include_self)
    r, c = np.nonzero(D > thr)
    return r, c, D[r, c]


@pytest.mark.parametrize("include_self", [True, False])
@pytest.mark.parametrize("seed", range(6))
def test_density_above_bit_identical_to_dense_kernel(seed, include_self):
    rng = np.random.default_rng(seed)
    P = int(rng.integers(20, 400))
    n = int(rng.integers(1, 600))
    # firm-like baskets (mostly 1-5 products, a few large rows) and a sparse-ish symmetric phi
    k = np.minimum(rng.geometric(0.35, n), P)
    k[rng.random(n) < 0.02] = min(P, 90)  # rows above the candidate index's basket cap
    rows = np.repeat(np.arange(n), k)
    cols = np.concatenate([rng.choice(P, size=kk, replace=False) for kk in k])
    M = sp.csr_array((np.ones(rows.size), (rows, cols)), shape=(n, P))
    M.sort_indices()
    phi = rng.random((P, P)) ** 4
    if seed % 2:
        phi = np.round(phi * 8) / 8  # ties with the threshold
    phi = np.maximum(phi, phi.T)
    np.fill_diagonal(phi, [1.0, 0.0, 0.5][seed % 3])
    cs = phi.sum(axis=0)
    for thr in (0.0, 0.05, 0.125, 0.3):
        ref = _dense_reference(M, phi, thr, include_self)
        ix = rel.density_filter_index(phi, cs, thr, include_self=include_self)
        for block in (1, 37, 10_000):
            got = rel.density_above(M, phi, cs, thr, include_self=include_self, index=ix, block_rows=block)
            for a, b in zip(ref, got):
                assert np.array_equal(a, b)
            assert np.array_equal(ref[2].view(np.uint64), got[2].view(np.uint64))


def test_density_above_falls_back_outside_its_domain():
    rng = np.random.default_rng(3)
    M = sp.csr_array((rng.random((50, 30)) < 0.2) * rng.random((50, 30)) * 3)  # not binary
    phi = rng.random((30, 30))
    cs = phi.sum(axis=0)
    for Mx, ph, thr in [(M, phi, 0.05), ((M != 0).astype(float), phi - 0.2, 0.05),
                        ((M != 0).astype(float), phi, -0.1), ((M != 0).astype(float).toarray(), phi, 0.05)]:
        ref = _dense_reference(Mx, ph, thr, True)
        got = rel.density_above(Mx, ph, ph.sum(axis=0), thr)
        for a, b in zip(ref, got):
            assert np.array_equal(a, b)


def test_density_never_exceeds_one_by_rounding():
    """A product exported only by one unit has density exactly 1 for it (M_uq = 1 on every q with
    phi_qp > 0); the reciprocal-multiply kernel gave 1 + 2.2e-16 at full scale (city_complexity
    2011 failed its [0, 1] range check). Rows of M all ones -> every density is 1 by definition."""
    import numpy as np
    import scipy.sparse as sp

    from kspill_pipeline.compute import relatedness as rel

    # many columns with awkward sums so that some ratio rounds above 1 without the snap
    rng = np.random.default_rng(0)
    P = 400
    phi = rng.random((P, P)) / 3
    phi = (phi + phi.T) / 2
    np.fill_diagonal(phi, 1.0)
    M = np.ones((3, P))
    raw = (M @ phi) * (1.0 / phi.sum(axis=0))[None, :]
    assert (raw > 1.0).any()  # the case exists without the snap
    for D in (rel.density(M, phi), rel.density(sp.csr_array(M), phi)):
        assert D.max() == 1.0 and np.allclose(D, 1.0, rtol=0, atol=1e-12)
