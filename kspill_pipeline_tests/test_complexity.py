"""ECI/PCI, COI/COG and presets (compute/complexity.py).

Hand cases: the eigenvector of a 3 x 3 nested matrix from its characteristic polynomial (exact
fractions + the quadratic formula + a cross product, no eigen-solver), COI/COG by explicit loops.
Real data: the world trade data against py-ecomplexity 0.5.3 run inside the test.
"""

from __future__ import annotations

import warnings
from fractions import Fraction as F

import numpy as np
import polars as pl
import pytest

from kspill_pipeline.compute import complexity as cx
from kspill_pipeline.compute import relatedness as rel

# nested 3 x 3: diversity [3, 2, 1], ubiquity [3, 2, 1]
MN = [[1, 1, 1], [1, 1, 0], [1, 0, 0]]


def _mcc_fractions(Mi):
    n, p = len(Mi), len(Mi[0])
    d = [sum(r) for r in Mi]
    u = [sum(Mi[i][j] for i in range(n)) for j in range(p)]
    return [[sum(F(Mi[c][q] * Mi[k][q], d[c] * u[q]) for q in range(p)) for k in range(n)] for c in range(n)], d, u


def _second_eigvec_by_hand(A):
    """Second largest eigenpair of a 3 x 3 row-stochastic matrix, without an eigen-solver:
    characteristic polynomial lambda^3 - t lambda^2 + s lambda - det, divided by (lambda - 1),
    quadratic formula, then the eigenvector as the cross product of two rows of (A - lambda I)."""
    t = A[0][0] + A[1][1] + A[2][2]
    s = (A[0][0] * A[1][1] - A[0][1] * A[1][0]) + (A[0][0] * A[2][2] - A[0][2] * A[2][0]) + (
        A[1][1] * A[2][2] - A[1][2] * A[2][1]
    )
    det = (
        A[0][0] * (A[1][1] * A[2][2] - A[1][2] * A[2][1])
        - A[0][1] * (A[1][0] * A[2][2] - A[1][2] * A[2][0])
        + A[0][2] * (A[1][0] * A[2][1] - A[1][1] * A[2][0])
    )
    assert 1 - t + s - det == 0  # 1 is an eigenvalue (rows sum to 1)
    # lambda^3 - t l^2 + s l - det = (l - 1)(l^2 + b l + c): b = 1 - t, c = det
    b, c = 1 - t, det
    disc = float(b * b - 4 * c)
    roots = sorted([(-float(b) + np.sqrt(disc)) / 2, (-float(b) - np.sqrt(disc)) / 2], reverse=True)
    lam = roots[0]
    B = np.array([[float(x) for x in row] for row in A]) - lam * np.eye(3)
    v = np.cross(B[0], B[1])
    return lam, v


def test_eci_pci_nested_case_by_hand():
    A, d, u = _mcc_fractions(MN)
    lam, v = _second_eigvec_by_hand(A)
    d = np.array(d, float)
    u = np.array(u, float)
    Mn = np.array(MN, float)
    # sign: ECI correlates positively with diversity
    if np.corrcoef(d, v)[0, 1] < 0:
        v = -v
    kp = (Mn.T @ v) / u  # kp = U^-1 M^T kc
    kc = (Mn @ kp) / d  # = lambda * v
    np.testing.assert_allclose(kc, lam * v, rtol=1e-12)

    for side in ("small", "units", "products"):
        ep = cx.eci_pci(Mn, side=side)
        assert ep["eigenvalue"] == pytest.approx(lam, abs=1e-12)
        # same direction (positive scale) as the hand eigenvector
        scale = ep["kc"] @ kc / (kc @ kc)
        assert scale > 0
        np.testing.assert_allclose(ep["kc"], scale * kc, atol=1e-12)
        np.testing.assert_allclose(ep["kp"], scale * kp, atol=1e-12)

    # py-ecomplexity standardisation: numpy std (ddof 0) over units; PCI with ECI's moments
    # a nested matrix cannot come out of RCA >= 1 (a unit present in every product would need
    # RCA = 1 everywhere), so feed M itself as the presence (py-ecomplexity presence_test="manual")
    X = Mn
    res = cx.complexity_year(X, np.array(["a", "b", "c"]), np.array(["p", "q", "r"]),
                             cx.get_conventions("py-ecomplexity", presence_test="manual"))
    np.testing.assert_array_equal(res.M, Mn)
    eci = (kc - kc.mean()) / kc.std()
    pci = (kp - kc.mean()) / kc.std()
    np.testing.assert_allclose(res.eci, eci, atol=1e-12)
    np.testing.assert_allclose(res.pci, pci, atol=1e-12)
    assert np.corrcoef(res.eci, res.diversity)[0, 1] > 0
    # Stata: sd over the long rectangular data (N*P rows, ddof 1)
    st = cx.complexity_year(X, np.array(["a", "b", "c"]), np.array(["p", "q", "r"]),
                            cx.get_conventions("stata", presence_test="manual"))
    long_kc = np.repeat(kc, 3)
    np.testing.assert_allclose(st.eci, (kc - long_kc.mean()) / long_kc.std(ddof=1), atol=1e-12)
    np.testing.assert_allclose(st.pci, (kp - long_kc.mean()) / long_kc.std(ddof=1), atol=1e-12)
    # R: each by its own moments, ddof 1
    r = cx.complexity_year(X, np.array(["a", "b", "c"]), np.array(["p", "q", "r"]),
                           cx.get_conventions("r-economiccomplexity", presence_test="manual"))
    np.testing.assert_allclose(r.eci, (kc - kc.mean()) / kc.std(ddof=1), atol=1e-12)
    np.testing.assert_allclose(r.pci, (kp - kp.mean()) / kp.std(ddof=1), atol=1e-12)


def _coi_cog_loops(Mm, dens, phi, k):
    n, p = Mm.shape
    coi = np.zeros(n)
    cog = np.zeros((n, p))
    rs = phi.sum(axis=1)
    for c in range(n):
        for j in range(p):
            coi[c] += dens[c, j] * (1 - Mm[c, j]) * k[j]
            acc = 0.0
            for q in range(p):
                acc += (1 - Mm[c, q]) * phi[q, j] * k[q] / rs[q]
            cog[c, j] = (1 - Mm[c, j]) * acc
    return coi, cog


def test_coi_cog_stata_and_atlas_forms_by_loops():
    Mm = np.array([[1, 0, 0, 1], [0, 1, 1, 0], [1, 1, 0, 0]], float)
    phi = rel.proximity(rel.cooccurrence(Mm))
    dens = rel.density(Mm, phi)
    k = np.array([0.3, -1.2, 2.0, 0.5])
    coi, cog = cx.coi_cog(Mm, dens, phi, k, form="stata")
    coi_l, cog_l = _coi_cog_loops(Mm, dens, phi, k)
    np.testing.assert_allclose(coi, coi_l, atol=1e-14)
    np.testing.assert_allclose(cog, cog_l, atol=1e-14)
    # first unit, by hand: density a = [.75, .25, 0, 1]; absent products p2, p3:
    # coi_a = .25 * -1.2 + 0 * 2.0 = -0.3
    assert coi[0] == pytest.approx(-0.3, abs=1e-15)
    # Atlas 2013: sum_q (1 - M_uq) phi_qp k_q / sum_r phi_qr - (1 - density_up) k_p (no (1 - M_up))
    _, cog_a = cx.coi_cog(Mm, dens, phi, k, form="atlas2013")
    rs = phi.sum(axis=1)
    for c in range(3):
        for j in range(4):
            g = sum((1 - Mm[c, q]) * phi[q, j] * k[q] / rs[q] for q in range(4))
            assert cog_a[c, j] == pytest.approx(g - (1 - dens[c, j]) * k[j], abs=1e-14)


def test_presets_differ_where_documented():
    st, py, r = (cx.get_conventions(n) for n in ("stata", "py-ecomplexity", "r-economiccomplexity"))
    assert st.rca_strict and not py.rca_strict and not r.rca_strict
    assert st.proximity_diagonal == "zero" and py.proximity_diagonal == "one"
    assert (st.std_ddof, st.std_over) == (1, "long") and (py.std_ddof, py.std_over) == (0, "units")
    assert r.pci_moments == "own" and not r.coi_standardise and r.cog_scale == "none"
    assert cx.get_conventions("stata", rca_threshold=2).rca_threshold == 2
    with pytest.raises(ValueError):
        cx.get_conventions("nope")
    with pytest.raises(ValueError):
        cx.get_conventions("stata", not_a_field=1)


def test_ecomplexity_long_output_shapes_and_stata_density():
    X = np.array([[4.0, 0.0, 2.0, 4.0], [0.0, 3.0, 3.0, 0.0], [2.0, 1.0, 1.0, 0.0]])
    rows = [(2001, u, p, X[i, j]) for i, u in enumerate("abc") for j, p in enumerate(["01", "02", "03", "04"]) if X[i, j]]
    df = pl.DataFrame(rows, schema={"year": pl.Int64, "c": pl.Utf8, "p": pl.Utf8, "v": pl.Float64}, orient="row")
    comp, prox = cx.ecomplexity(df, "year", "c", "p", "v", preset="stata")
    assert comp.columns == cx.COMPLEXITY_COLUMNS
    assert prox.columns == cx.PROXIMITY_COLUMNS
    assert comp.height == 12 and prox.height == 16
    assert comp["product"].to_list()[:4] == ["01", "02", "03", "04"]
    # Stata: M = RCA > 1; here no RCA equals 1 so M matches the >= matrix;
    # density with the zero-diagonal proximity = "own product excluded" hand numbers
    dens = comp.sort("location", "product")["density"].to_numpy().reshape(3, 4)
    np.testing.assert_allclose(dens, [[0.5, 0.5, 0.0, 1.0], [0.5, 0.5, 1.0, 0.0], [0.5, 0.5, 1.0, 1.0]], atol=1e-15)
    assert prox.filter(pl.col("product_1") == pl.col("product_2"))["proximity"].to_list() == [0.0] * 4
    # no time column
    comp1, prox1 = cx.ecomplexity(df.drop("year"), None, "c", "p", "v", preset="py-ecomplexity")
    assert comp1["time"].null_count() == comp1.height == 12


def test_ecomplexity_zero_total_rows_dropped_and_periods_separate():
    df = pl.DataFrame({
        "t": [1, 1, 1, 1, 2, 2, 2, 2, 1],
        "c": ["a", "a", "b", "b", "a", "a", "b", "b", "z"],
        "p": ["x", "y", "x", "y", "x", "y", "x", "y", "x"],
        "v": [3.0, 1.0, 1.0, 3.0, 1.0, 1.0, 1.0, 2.0, 0.0],
    })
    comp, prox = cx.ecomplexity(df, "t", "c", "p", "v", preset="py-ecomplexity")
    assert comp.filter(pl.col("location") == "z").height == 0  # zero-total unit dropped
    assert comp.group_by("time").len().sort("time")["len"].to_list() == [4, 4]
    assert prox.group_by("time").len().sort("time")["len"].to_list() == [4, 4]


# --------------------------------------------------------------------------------------------
# real data vs py-ecomplexity
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(shared_data):
    path = shared_data / "world_trade_sitc2_1998_2000" / "exports.csv"
    if not path.is_file():
        pytest.skip(f"{path} missing")
    df = pl.read_csv(path, schema_overrides={"country": pl.Utf8, "product": pl.Utf8})
    return df.with_columns(pl.lit(2000, dtype=pl.Int64).alias("year"))


@pytest.fixture(scope="module")
def py_ecomplexity_output(world):
    ec = pytest.importorskip("ecomplexity")
    pdf = world.to_pandas()
    cols = {"time": "year", "loc": "country", "prod": "product", "val": "value"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = ec.ecomplexity(pdf, cols, verbose=False, check_logsupermodularity=False)
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):
            prox = ec.proximity(pdf, cols)
    return pl.from_pandas(out), pl.from_pandas(prox)


def test_world_trade_matches_py_ecomplexity(world, py_ecomplexity_output):
    ref, ref_prox = py_ecomplexity_output
    comp, prox = cx.ecomplexity(world, "year", "country", "product", "value", preset="py-ecomplexity")
    ref = ref.rename({"year": "time", "country": "location"})
    assert comp.height == ref.height == 226 * 785
    j = comp.join(ref, on=["time", "location", "product"], suffix="_py", how="inner")
    assert j.height == comp.height

    def close(a, b, tol):
        x = j[a].cast(pl.Float64).to_numpy()
        y = j[b].cast(pl.Float64).to_numpy()
        np.testing.assert_allclose(x, y, rtol=0, atol=tol, err_msg=a)

    close("value", "value_py", 0)
    close("rca", "rca_py", 1e-9)
    close("M", "mcp", 0)
    close("diversity", "diversity_py", 0)
    close("ubiquity", "ubiquity_py", 0)
    close("density", "density_py", 1e-9)
    # ECI/PCI after sign alignment (both tools fix the sign by corr(diversity, eci) > 0)
    s = np.sign(np.corrcoef(j["eci"].to_numpy(), j["eci_py"].to_numpy())[0, 1])
    assert s > 0
    close("eci", "eci_py", 1e-6)
    close("pci", "pci_py", 1e-6)
    close("coi", "coi_py", 1e-6)
    close("cog", "cog_py", 1e-6)

    rp = ref_prox.rename({"year": "time"})
    prox = prox.with_columns(pl.col("product_1", "product_2").cast(pl.Utf8))
    jp = prox.join(rp, on=["time", "product_1", "product_2"], suffix="_py")
    assert jp.height == prox.height == 785 * 785
    np.testing.assert_allclose(jp["proximity"].to_numpy(), jp["proximity_py"].to_numpy(), rtol=0, atol=1e-9)


def test_world_trade_stata_preset_invariants(world):
    comp, prox = cx.ecomplexity(world, "year", "country", "product", "value", preset="stata")
    # strict inequality: M = 1 only where RCA > 1
    assert comp.filter((pl.col("M") == 1) & (pl.col("rca") <= 1)).height == 0
    assert comp.filter((pl.col("M") == 0) & (pl.col("rca") > 1)).height == 0
    # ECI standardised on the long data: mean 0, sd 1 with ddof 1 over all rows
    e = comp["eci"].to_numpy()
    assert abs(e.mean()) < 1e-10 and abs(e.std(ddof=1) - 1) < 1e-10
    d = comp["density"].to_numpy()
    assert d.min() >= 0 and d.max() <= 1
    assert prox.filter(pl.col("product_1") == pl.col("product_2"))["proximity"].max() == 0.0
    ph = prox["proximity"].to_numpy().reshape(785, 785)
    assert np.array_equal(ph, ph.T)
    eci_by_loc = comp.group_by("location").agg(pl.col("eci").first(), pl.col("diversity").first())
    assert np.corrcoef(eci_by_loc["eci"].to_numpy(), eci_by_loc["diversity"].to_numpy())[0, 1] > 0
