"""Economic complexity: diversity, ubiquity, ECI/PCI, COI/COG, and tool presets.

Pure numpy / scipy / polars (never import Dagster here). Issue 3 ("Computation": ECI/PCI by the
eigenvector method on the small side, explicit eigenvalue sorting, documented sign convention,
standardised like Stata; COI and COG in the Stata form and the Atlas-2013 form; presets
``stata``, ``py-ecomplexity``, ``r-economiccomplexity``).

Notation (Hausmann, Hidalgo et al. 2013, *The Atlas of Economic Complexity*): ``M`` units x
products (0/1), diversity ``d = M 1`` (``k_{c,0}``), ubiquity ``u = M^T 1`` (``k_{p,0}``),

    M~_pp' = sum_c M_cp M_cp' / (d_c u_p)      (products x products, = U^-1 M^T D^-1 M)
    M~_cc' = sum_p M_cp M_c'p / (d_c u_p)      (units x units,       = D^-1 M U^-1 M^T)

Both have eigenvalue 1 (constant eigenvector) as the largest; the eigenvector of the SECOND
largest eigenvalue defines PCI (``kp``) and ECI (``kc``). They are linked by ``kc = D^-1 M kp`` (ECI =
mean kp of the products a unit is present in) and ``kp = U^-1 M^T kc``.

Solver (:func:`eci_pci`): both matrices are similar to symmetric PSD matrices
(``D^-1/2 M U^-1 M^T D^-1/2`` and ``U^-1/2 M^T D^-1 M U^-1/2``), so kspill solves the symmetric one
on the SMALL side (units x units when units < products, else products x products) with
``numpy.linalg.eigh`` (LAPACK syevd), sorts the eigenvalues explicitly in descending order and
takes the eigenvector of the second one, maps back, and obtains the other side by the link above. This is mathematically identical to the tools (Stata/py-ecomplexity solve the
general eigenproblem of M~_pp'; R solves each side separately) and faster and more stable.

Sign convention: ``kc`` is multiplied by ``sign(corr(diversity, kc))`` (ECI correlates
positively with diversity: Stata ``ecipci.ado`` ``eigensign``, py-ecomplexity ``calc_eci_pci``), and
``kp`` gets the SAME sign, so ``kc = D^-1 M kp`` keeps holding (ECI is the mean PCI direction of a
unit's products). R economiccomplexity instead flips each of ECI and PCI to correlate positively
with the 20-iteration method-of-reflections result (``kc`` of even order, ``kp`` of odd order),
which gives the same signs except in degenerate cases (not verified beyond reading the code).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Literal

import numpy as np
import polars as pl

from kspill_pipeline.compute import relatedness as rel

__all__ = [
    "Conventions",
    "PRESETS",
    "get_conventions",
    "diversity",
    "ubiquity",
    "eci_pci",
    "standardise",
    "coi_cog",
    "complexity_year",
    "ecomplexity",
]

diversity = rel.diversity
ubiquity = rel.ubiquity


# --------------------------------------------------------------------------------------------
# conventions
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Conventions:
    """Every switch on which Stata ``ecomplexity``, py-ecomplexity and R ``economiccomplexity`` differ.

    Fields (what each tool does is in :data:`PRESETS` and the README table):

    * ``presence_test``: ``rca`` (Balassa RCA + threshold) or ``manual`` (the value column already is
      the 0/1 presence, py-ecomplexity ``presence_test="manual"``; Stata switches to this by itself
      when the value variable has min 0 and max 1, which kspill does not guess).
    * ``rca_threshold``, ``rca_strict``: presence ``M = RCA > thr`` (strict) or ``RCA >= thr``.
    * ``continuous``: the tools' ``cont``/``continuous`` option: proximity = (1 + Pearson corr of the
      RCA columns)/2 and density averages the RCA LEVELS instead of M.
    * ``proximity_variant``: ``min_conditional`` (default), ``asymmetric`` (C_pq/u_q); ignored when
      ``continuous``.
    * ``proximity_diagonal``: ``one`` (py, R) or ``zero`` (Stata subtracts I). Density and COG use
      this same matrix, so with ``zero`` the own product is excluded from both (Stata).
    * ``density_include_self``: drop q = p from the density sums (S000 switch); with a zero
      diagonal it has no effect.
    * ``density_leave_one_out``: Stata ``leaveout`` (see :func:`relatedness.density`).
    * ``eigen_side``: ``small`` (kspill: the smaller of units x units / products x products),
      ``units`` or ``products``; identical results up to round-off.
    * ``std_ddof``, ``std_over``: standardisation ``(x - mean) / sd`` with ``sd`` of ddof
      ``std_ddof`` computed over the ``units`` vector or over the rectangular ``long`` data set (units
      x products rows, Stata's ``sum eci`` on the long data: same mean, sd with ``N*P - ddof``).
    * ``pci_moments``: ``eci`` (PCI standardised with ECI's mean and sd, Stata/py: this keeps
      ECI = mean PCI of a unit's products) or ``own`` (R: PCI by its own mean and sd over products).
    * ``outlook_pci``: which PCI enters COI/COG: ``eigenvector`` (the raw, sign-aligned eigenvector
      ``kp``, Stata/py) or ``standardised`` (the final PCI, R).
    * ``coi_standardise``: standardise COI like ECI (Stata/py) or leave it raw (R).
    * ``cog_scale``: ``eci_sd`` (divide COG by the sd of the raw ECI vector, Stata/py) or ``none`` (R).
    * ``cog_form``: ``stata`` ``(1-M_up) sum_q (1-M_uq) phi_qp kp_q / sum_r phi_qr`` or
      ``atlas2013`` ``sum_q (1-M_uq) phi_qp kp_q / sum_r phi_qr - (1 - density_up) kp_p``.
    * ``drop_zero``: drop units and products with zero total value in the period before
      anything else (all three tools do).
    """

    name: str = "custom"
    presence_test: Literal["rca", "manual"] = "rca"
    rca_threshold: float = 1.0
    rca_strict: bool = False
    continuous: bool = False
    proximity_variant: Literal["min_conditional", "asymmetric"] = "min_conditional"
    proximity_diagonal: Literal["one", "zero"] = "one"
    density_include_self: bool = True
    density_leave_one_out: bool = False
    density_denominator: Literal["column_sum"] = "column_sum"
    eigen_side: Literal["small", "units", "products"] = "small"
    std_ddof: int = 0
    std_over: Literal["units", "long"] = "units"
    pci_moments: Literal["eci", "own"] = "eci"
    outlook_pci: Literal["eigenvector", "standardised"] = "eigenvector"
    coi_standardise: bool = True
    cog_scale: Literal["eci_sd", "none"] = "eci_sd"
    cog_form: Literal["stata", "atlas2013"] = "stata"
    drop_zero: bool = True

    def as_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, Conventions] = {
    # Stata ecomplexity (cid-harvard/ecomplexity, ecomplexity.ado + proxdiscrete/calculate_density/
    # ecipci/coicog.ado): M = RCA > rca (strict, although the help text says >=); proximity
    # min(C/u_q, C/u_p) - I (diagonal 0); density (M*prox):/(colsum prox); eigensystem of
    # M~_pp', second eigenvector; sign by corr(diversity, kc); `sum eci` on the long rectangular
    # data: (x - mean)/sd with ddof 1 over N*P rows; pci with eci moments; cog/sd(eci);
    # coi standardised by its own moments.
    "stata": Conventions(
        name="stata",
        rca_strict=True,
        proximity_diagonal="zero",
        density_include_self=True,
        std_ddof=1,
        std_over="long",
        pci_moments="eci",
        outlook_pci="eigenvector",
        coi_standardise=True,
        cog_scale="eci_sd",
        cog_form="stata",
    ),
    # py-ecomplexity 0.5.3 (ecomplexity/*.py, read in the venv): M = RCA >= 1; proximity
    # min(C/u_q, (C/u_q)^T) with diagonal 1; density M @ (phi.T / rowsum); np.linalg.eig of Mpp,
    # eigvals.argsort()[-2]; sign by corrcoef(diversity, kc); numpy .std() (ddof 0) over the
    # units vector; pci with eci moments; cog/std(eci); coi standardised with its own moments.
    "py-ecomplexity": Conventions(
        name="py-ecomplexity",
        rca_strict=False,
        proximity_diagonal="one",
        density_include_self=True,
        std_ddof=0,
        std_over="units",
        pci_moments="eci",
        outlook_pci="eigenvector",
        coi_standardise=True,
        cog_scale="eci_sd",
        cog_form="stata",
    ),
    # R economiccomplexity (pachadotdev/economiccomplexity; balassa_index: RCA < cutoff -> 0,
    # i.e. M = RCA >= 1; proximity C/max(u_p, u_q) with diagonal C_pp/u_p = 1;
    # complexity_measures(method="eigenvalues"): eigen() of each side, second vector, each
    # standardised by its OWN mean and sd (ddof 1, R sd()); complexity_outlook: COI = rowSums
    # ((1 - distance) * (1 - M) * PCI) with distance = (1 - M) (phi / rowSums(phi))^T, COG =
    # (1 - M) * ((1 - M) (phi * PCI / rowSums(phi))), both with the standardised PCI and no
    # further scaling. R has no density() in 2.x; 1 - distance is the density used here.
    "r-economiccomplexity": Conventions(
        name="r-economiccomplexity",
        rca_strict=False,
        proximity_diagonal="one",
        density_include_self=True,
        std_ddof=1,
        std_over="units",
        pci_moments="own",
        outlook_pci="standardised",
        coi_standardise=False,
        cog_scale="none",
        cog_form="stata",
    ),
}


def get_conventions(preset: str | Conventions = "stata", **overrides) -> Conventions:
    """Preset by name (or a Conventions instance) with field overrides applied."""
    if isinstance(preset, Conventions):
        base = preset
    else:
        key = preset.lower().replace("_", "-")
        aliases = {"py": "py-ecomplexity", "python": "py-ecomplexity", "ecomplexity": "py-ecomplexity",
                   "r": "r-economiccomplexity", "economiccomplexity": "r-economiccomplexity"}
        key = aliases.get(key, key)
        if key not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        base = PRESETS[key]
    overrides = {k: v for k, v in overrides.items() if v is not None}
    bad = set(overrides) - set(Conventions.__dataclass_fields__)
    if bad:
        raise ValueError(f"unknown convention field(s) {sorted(bad)}")
    return replace(base, **overrides) if overrides else base


# --------------------------------------------------------------------------------------------
# ECI / PCI
# --------------------------------------------------------------------------------------------


_BLAS_CONTROLLER: list = []


def _blas_controller():
    """One ``threadpoolctl.ThreadpoolController`` per process (None without threadpoolctl): building
    it scans every loaded shared library (about 10 ms), so it is not rebuilt per period."""
    if not _BLAS_CONTROLLER:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:  # pragma: no cover - optional
            _BLAS_CONTROLLER.append(None)
        else:
            _BLAS_CONTROLLER.append(ThreadpoolController())
    return _BLAS_CONTROLLER[0]


def _eigh_small(S: np.ndarray):
    """``numpy.linalg.eigh`` with ONE BLAS thread for small matrices: a few-hundred-square
    tridiagonalisation is dominated by thread hand-offs, and under CPU contention (2 busy cores)
    multi-threaded OpenBLAS took 0.5 s for a 226 x 226 matrix that takes 10 ms serially.
    Uses threadpoolctl when it is installed; otherwise runs as is."""
    if S.shape[0] <= 2000:
        ctl = _blas_controller()
        if ctl is None:  # pragma: no cover - optional
            return np.linalg.eigh(S)
        with ctl.limit(limits=1, user_api="blas"):
            return np.linalg.eigh(S)
    return np.linalg.eigh(S)


def _second_eigvec_sym(S: np.ndarray) -> tuple[float, np.ndarray]:
    """Eigenpair of the second largest eigenvalue of a symmetric matrix (explicit ordering)."""
    n = S.shape[0]
    if n < 2:
        return float("nan"), np.full(n, np.nan)
    S = 0.5 * (S + S.T)
    # numpy's LAPACK syevd on the small side (scipy.linalg is not imported, for start-up time);
    # eigenvalues come back ascending; sort explicitly anyway
    w, V = _eigh_small(S)
    order = np.argsort(w)[::-1]  # descending: order[1] is the second largest
    return float(w[order[1]]), V[:, order[1]]


def eci_pci(M, *, side: Literal["small", "units", "products"] = "small") -> dict:
    """Raw ECI/PCI eigenvectors (Hidalgo & Hausmann 2009; Atlas 2013), sign-aligned, unstandardised.

    Returns a dict with ``kc`` (units; = ``D^-1 M kp``, Stata's ``kc``), ``kp`` (products; unit
    2-norm over the valid products, sign-aligned), ``eigenvalue`` (the second largest),
    ``diversity``, ``ubiquity``. Units with zero diversity and products with zero ubiquity are left
    out of the eigenproblem and get NaN (py-ecomplexity does the same).

    Sign: ``kc`` correlates positively with diversity (see module docstring); kp gets the same sign.
    """
    Md = M.toarray() if rel._is_sparse(M) else np.asarray(M, dtype=np.float64)
    Md = np.asarray(Md, dtype=np.float64)
    d_all = Md.sum(axis=1)
    u_all = Md.sum(axis=0)
    ru = d_all > 0
    cp = u_all > 0
    Mv = Md[np.ix_(ru, cp)]
    d = d_all[ru]
    u = u_all[cp]
    n, P = Mv.shape
    kc_full = np.full(Md.shape[0], np.nan)
    kp_full = np.full(Md.shape[1], np.nan)
    out = {"diversity": d_all, "ubiquity": u_all, "eigenvalue": float("nan"), "kc": kc_full, "kp": kp_full}
    if n < 2 or P < 2:
        return out
    use_units = side == "units" or (side == "small" and n < P)
    if use_units:
        A = Mv / np.sqrt(d)[:, None] / np.sqrt(u)[None, :]  # D^-1/2 M U^-1/2
        lam, v = _second_eigvec_sym(A @ A.T)  # D^-1/2 M U^-1 M^T D^-1/2
        kc0 = v / np.sqrt(d)
        kp = (Mv.T @ kc0) / u  # U^-1 M^T kc
    else:
        A = Mv / np.sqrt(d)[:, None] / np.sqrt(u)[None, :]
        lam, v = _second_eigvec_sym(A.T @ A)  # U^-1/2 M^T D^-1 M U^-1/2
        kp = v / np.sqrt(u)
    nrm = np.linalg.norm(kp)
    if nrm > 0:
        kp = kp / nrm
    kc = (Mv @ kp) / d  # Stata: kc = (M :/ kc0) * kp
    s = _corr_sign(d, kc)
    kc_full[ru] = s * kc
    kp_full[cp] = s * kp
    out.update(kc=kc_full, kp=kp_full, eigenvalue=lam)
    return out


def _corr_sign(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    c = float(a @ b)
    return 1.0 if c > 0 else -1.0  # Stata: 2*(corr > 0) - 1


def standardise(x: np.ndarray, ref: np.ndarray | None = None, *, ddof: int = 0, over: str = "units",
                n_products: int = 1) -> np.ndarray:
    """``(x - mean(ref)) / sd(ref)`` (``ref`` defaults to ``x``), NaNs ignored.

    ``over="long"`` reproduces Stata's ``sum`` on the rectangular long data, where every unit
    value is repeated ``n_products`` times: the mean is unchanged and the sd uses
    ``n_products * SS / (n_products * N - ddof)``.
    """
    r = x if ref is None else ref
    r = r[np.isfinite(r)]
    mu = r.mean()
    ss = float(((r - mu) ** 2).sum())
    k = n_products if over == "long" else 1
    dof = k * r.size - ddof
    if r.size == 0 or dof <= 0:
        return np.full_like(np.asarray(x, dtype=np.float64), np.nan)
    sd = np.sqrt(k * ss / dof)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (x - mu) / sd


def coi_cog(M, dens: np.ndarray, phi: np.ndarray, kp: np.ndarray, *,
            form: Literal["stata", "atlas2013"] = "stata") -> tuple[np.ndarray, np.ndarray]:
    """Raw complexity outlook index and gain (before the convention's scaling).

    * COI (Atlas 2013 "complexity outlook" / opportunity value; Stata ``coicog.ado``):
      ``coi_u = sum_p density_up (1 - M_up) kp_p``.
    * COG, Stata form (``coicog.ado``, also py-ecomplexity ``coicog.py`` and R
      ``complexity_outlook``): ``cog_up = (1 - M_up) sum_q (1 - M_uq) phi_qp kp_q / sum_r phi_qr``.
    * COG, ``atlas2013`` form (Atlas 2013, technical box on opportunity gain, as usually
      transcribed; not verified against the printed book in this session):
      ``cog_up = sum_q (1 - M_uq) phi_qp kp_q / sum_r phi_qr - (1 - density_up) kp_p``
      (no leading ``(1 - M_up)`` factor).

    ``kp`` is whatever PCI the convention feeds in (raw eigenvector or standardised PCI); NaN
    entries of kp (zero-ubiquity products) count as 0.
    """
    Md = M.toarray() if rel._is_sparse(M) else np.asarray(M, dtype=np.float64)
    NM = 1.0 - Md
    k = np.nan_to_num(np.asarray(kp, dtype=np.float64))
    coi = (dens * NM) @ k
    rs = phi.sum(axis=1)
    w = k * rel._safe_inv(rs)
    # G[u, p] = sum_q (1 - M_uq) phi_qp w_q with w_q = kp_q / sum_r phi_qr, as (NM * w) @ phi
    # (no products x products temporary)
    G = (NM * w[None, :]) @ phi
    if form == "stata":
        cog = NM * G
    elif form == "atlas2013":
        cog = G - (1.0 - dens) * k[None, :]
    else:
        raise ValueError(f"unknown COG form {form!r}")
    return coi, cog


# --------------------------------------------------------------------------------------------
# one period, matrices in, matrices out
# --------------------------------------------------------------------------------------------


@dataclass
class YearResult:
    units: np.ndarray
    products: np.ndarray
    X: np.ndarray
    rca: np.ndarray
    M: np.ndarray
    phi: np.ndarray
    density: np.ndarray
    eci: np.ndarray
    pci: np.ndarray
    diversity: np.ndarray
    ubiquity: np.ndarray
    coi: np.ndarray
    cog: np.ndarray
    eigenvalue: float


def complexity_year(X, units: np.ndarray, products: np.ndarray, conv: Conventions) -> YearResult:
    """All measures for one period from the value matrix X (units x products, dense or sparse).

    Steps (each function cites its formula): drop zero-total units/products (``drop_zero``),
    :func:`relatedness.rca`, presence, :func:`relatedness.cooccurrence`,
    :func:`relatedness.proximity`, :func:`relatedness.density`, :func:`eci_pci`, :func:`coi_cog`,
    then the convention's standardisation.
    """
    Xd = X.toarray() if rel._is_sparse(X) else np.asarray(X, dtype=np.float64)
    units = np.asarray(units)
    products = np.asarray(products)
    if conv.drop_zero:
        ru = Xd.sum(axis=1) > 0
        cp = Xd.sum(axis=0) > 0
        if not (ru.all() and cp.all()):
            Xd = Xd[np.ix_(ru, cp)]
            units = units[ru]
            products = products[cp]
    if conv.presence_test == "manual":
        R = Xd  # py-ecomplexity calculate_manual_mcp: rca_t = mcp_t = the data
        M = (Xd != 0).astype(np.float64)
    else:
        R = rel.rca(Xd)
        thr = conv.rca_threshold
        M = (R > thr) if conv.rca_strict else (R >= thr)
        M = M.astype(np.float64)
    if conv.continuous:
        phi = rel.proximity(None, variant="correlation", diagonal=conv.proximity_diagonal, M=R)
        levels = R
        loo_variant = "correlation"
    else:
        C = rel.cooccurrence(M)
        phi = rel.proximity(C, variant=conv.proximity_variant, diagonal=conv.proximity_diagonal, overwrite=True)
        levels = M
        loo_variant = conv.proximity_variant
    if conv.density_leave_one_out:
        dens = rel.density(levels, phi, include_self=conv.density_include_self, leave_one_out=True,
                           basis=R if conv.continuous else M, variant=loo_variant,
                           diagonal=conv.proximity_diagonal)
    else:
        dens = rel.density(levels, phi, include_self=conv.density_include_self)
    ep = eci_pci(M, side=conv.eigen_side)
    kc, kp = ep["kc"], ep["kp"]
    P = M.shape[1]
    std = dict(ddof=conv.std_ddof, over=conv.std_over, n_products=P)
    eci = standardise(kc, **std)
    if conv.pci_moments == "eci":
        pci = standardise(kp, kc, **std)
    else:
        pci = standardise(kp, ddof=conv.std_ddof, over="units")
    k_out = kp if conv.outlook_pci == "eigenvector" else pci
    if conv.density_include_self or conv.proximity_diagonal == "zero":
        phi_out = phi
    else:
        phi_out = phi.copy()
        np.fill_diagonal(phi_out, 0.0)
    coi, cog = coi_cog(M, dens, phi_out, k_out, form=conv.cog_form)
    if conv.coi_standardise:
        coi = standardise(coi, **std)
    if conv.cog_scale == "eci_sd":
        # cog / sd(kc): the sd that standardise() divides by, recovered from a unit shift
        sd_inv = standardise(np.array([1.0, 0.0]), kc, **std)
        cog = cog * (sd_inv[0] - sd_inv[1])
    return YearResult(units=units, products=products, X=Xd, rca=R, M=M, phi=phi, density=dens, eci=eci,
                      pci=pci, diversity=ep["diversity"], ubiquity=ep["ubiquity"], coi=coi, cog=cog,
                      eigenvalue=ep["eigenvalue"])


# --------------------------------------------------------------------------------------------
# long frame in, long frames out
# --------------------------------------------------------------------------------------------

COMPLEXITY_COLUMNS = ["time", "location", "product", "value", "rca", "M", "density", "eci", "pci",
                      "diversity", "ubiquity", "coi", "cog"]
PROXIMITY_COLUMNS = ["time", "product_1", "product_2", "proximity"]


def _rep(a: np.ndarray, k: int) -> np.ndarray:
    """``np.repeat(a, k)`` as one strided copy (numpy's repeat copies element by element)."""
    return np.broadcast_to(a[:, None], (a.shape[0], k)).reshape(-1)


def _tile(a: np.ndarray, k: int) -> np.ndarray:
    """``np.tile(a, k)`` for a 1-D array, as one strided copy."""
    return np.broadcast_to(a[None, :], (k, a.shape[0])).reshape(-1)


def _encode(data: pl.DataFrame, col: str) -> tuple[pl.Series, np.ndarray]:
    """Sorted unique labels of ``col`` and the integer code of every row (label order).
    A null label (only the ``time=None`` case) is its own single label."""
    s = data.get_column(col)
    if s.null_count() == len(s):
        return s.head(1), np.zeros(len(s), dtype=np.int64)
    labels = s.unique().sort()
    if s.dtype == pl.Utf8 and s.null_count() == 0:
        # codes = positions in the sorted labels, through an Enum over them (a hash lookup per row
        # instead of a binary search over strings)
        codes = s.cast(pl.Enum(labels)).to_physical().to_numpy().astype(np.int64, copy=False)
    else:
        codes = labels.search_sorted(s).to_numpy().astype(np.int64, copy=False)
    return labels, codes


def ecomplexity(
    df: pl.DataFrame | pl.LazyFrame,
    time: str | None,
    location: str,
    product: str,
    value: str,
    preset: str | Conventions = "stata",
    **overrides,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """py-ecomplexity / Stata ``ecomplexity``-style computation on a long frame, per period.

    Returns ``(complexity_long, proximity_long)``:

    * ``complexity_long``: ``time, location, product, value, rca, M, density, eci, pci, diversity,
      ubiquity, coi, cog``, one row per (time, location, product) of the RECTANGULAR period
      matrix after dropping zero-total units/products (cells absent from the input have value 0),
      sorted by time, location, product. ``M`` is Int8, ``diversity``/``ubiquity`` Int64.
    * ``proximity_long``: ``time, product_1, product_2, proximity``, all P x P pairs of each period
      (diagonal included, as py-ecomplexity's ``proximity()`` returns it), sorted the same way.
      When product labels are strings, ``product_1``/``product_2`` are a polars ``Enum`` over the
      sorted product labels (dictionary-encoded strings in parquet; ``.cast(pl.Utf8)`` for plain
      strings): at 5,000 products this frame has 25M rows.

    Rows with a null time, location or product are ignored, null values count as 0, duplicate
    (time, location, product) rows are summed (py-ecomplexity keeps the first; Stata requires
    unique rows). ``time=None`` treats the frame as one period and writes a null ``time`` column.
    Labels keep their dtype (codes read as strings keep leading zeros). ``preset`` is a
    :data:`PRESETS` name or a :class:`Conventions`; keyword ``overrides`` replace single fields
    (e.g. ``rca_threshold=1.5``).
    """
    conv = get_conventions(preset, **overrides)
    lf = df.lazy() if isinstance(df, pl.DataFrame) else df
    t_expr = pl.lit(None, dtype=pl.Int64) if time is None else pl.col(time)
    data = (
        lf.select(t_expr.alias("_t"), pl.col(location).alias("_u"), pl.col(product).alias("_p"),
                  pl.col(value).cast(pl.Float64).fill_null(0.0).fill_nan(0.0).alias("_v"))
        .drop_nulls(["_u", "_p"] if time is None else ["_t", "_u", "_p"])
        .collect(engine="in-memory")
    )
    t_dtype = data.schema["_t"]
    u_labels, ucode = _encode(data, "_u")
    p_labels, pcode = _encode(data, "_p")
    t_labels, tcode = _encode(data, "_t")
    vals = data.get_column("_v").to_numpy()
    NU, NP = len(u_labels), len(p_labels)
    # stable sort of the period codes (radix sort when they fit in 16 bits): rows of a period keep
    # their input order
    order = np.argsort(tcode.astype(np.int16) if len(t_labels) <= 2**15 else tcode, kind="stable")
    bounds = np.searchsorted(tcode[order], np.arange(len(t_labels) + 1))

    cols: dict[str, list] = {c: [] for c in COMPLEXITY_COLUMNS}
    pcols: dict[str, list] = {c: [] for c in PROXIMITY_COLUMNS}
    for k in range(len(t_labels)):
        rows = order[bounds[k]: bounds[k + 1]]
        X = np.bincount(ucode[rows] * NP + pcode[rows], weights=vals[rows], minlength=NU * NP).reshape(NU, NP)
        ui = np.arange(NU)
        pi = np.arange(NP)
        if conv.drop_zero:
            ui = ui[X.sum(axis=1) > 0]
            pi = pi[X.sum(axis=0) > 0]
            X = X[np.ix_(ui, pi)]
        res = complexity_year(X, ui, pi, replace(conv, drop_zero=False))
        N, P = res.M.shape
        cols["time"].append((k, N * P))
        cols["location"].append(_rep(ui, P))
        cols["product"].append(_tile(pi, N))
        cols["value"].append(res.X.ravel())
        cols["rca"].append(res.rca.ravel())
        cols["M"].append(res.M.ravel().astype(np.int8))
        cols["density"].append(res.density.ravel())
        cols["eci"].append(_rep(res.eci, P))
        cols["pci"].append(_tile(res.pci, N))
        cols["diversity"].append(_rep(res.diversity.astype(np.int64), P))
        cols["ubiquity"].append(_tile(res.ubiquity.astype(np.int64), N))
        cols["coi"].append(_rep(res.coi, P))
        cols["cog"].append(res.cog.ravel())
        pcols["time"].append((k, P * P))
        code_t = np.uint16 if NP <= 2**16 else np.uint32
        pcols["product_1"].append(_rep(pi.astype(code_t), P))
        pcols["product_2"].append(_tile(pi.astype(code_t), P))
        pcols["proximity"].append(np.ascontiguousarray(res.phi).ravel())

    # product_1/product_2 of the P x P proximity frame are Enum (dictionary-encoded strings in
    # parquet): gathering 25M strings at 5,000 products costs more than the whole computation
    p_enum = None
    if p_labels.dtype == pl.Utf8 and p_labels.null_count() == 0:
        p_enum = p_labels.cast(pl.Enum(p_labels.to_list()))
    labels = {"time": t_labels, "location": u_labels, "product": p_labels,
              "product_1": p_enum if p_enum is not None else p_labels,
              "product_2": p_enum if p_enum is not None else p_labels}

    def build(cs: dict[str, list], names: list[str]) -> pl.DataFrame:
        # one frame per period from zero-copy numpy-backed Series, concatenated without rechunk:
        # no full-length temporary arrays (fresh large allocations are page-fault bound)
        frames = []
        for k in range(len(cs["time"])):
            series = []
            for c in names:
                part = cs[c][k]
                if c == "time":
                    k0, n0 = part
                    t_val = t_labels[k0]
                    if t_dtype == pl.Int64 and t_val is not None:
                        series.append(pl.Series(c, np.full(n0, t_val, dtype=np.int64)))
                    else:
                        series.append(pl.repeat(t_val, n0, dtype=t_dtype, eager=True).alias(c))
                elif c in labels and isinstance(labels[c].dtype, pl.Enum):
                    # Enum from its physical codes (the label order): no 25M-row gather
                    series.append(pl.Series(c, part).cat.to(labels[c].dtype))
                elif c in labels:
                    series.append(labels[c].gather(part).alias(c))
                else:
                    series.append(pl.Series(c, part))
            frames.append(pl.DataFrame(series))
        if not frames:
            return pl.DataFrame(schema={c: pl.Float64 for c in names})
        return pl.concat(frames, how="vertical", rechunk=False)

    return build(cols, COMPLEXITY_COLUMNS), build(pcols, PROXIMITY_COLUMNS)
