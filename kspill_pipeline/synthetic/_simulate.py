"""Yearly simulation: imports, the planted S000 export mechanism, flows, CES prices and quantities.

One call of :func:`simulate_year` needs only the universe and the previous year's clean export
presence matrix (firm x HS4), so a long run holds one year of rows at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import scipy.sparse as sp
from scipy.special import ndtri

from kspill_pipeline.synthetic._universe import Universe

#: Planted S000 probit (Eq. 4 without the controls): signs as in the paper (b1, b2 > 0, b3 < 0).
MECHANISM = {
    "b0": -1.9,
    "b1_density_firm": 2.2,
    "b2_density_city": 0.9,
    "b3_interaction": -1.4,
    "candidate_threshold": 0.05,
    "year_effect_sd": 0.08,
    "hs2_effect_sd": 0.15,
}
BASELINE_CORE_EXPORT_P = 0.85
IMPORT_ITEM_P = 0.6
PROCESSING_IMPORT_SHARE = 0.5
PROCESSING_EXPORT_P = 0.5
OTHER_MODE_P = 0.2
MULTIPLANT_SPLIT_P = 0.5
MULTIPLANT_MAIN_SHARE = 0.8
CES = {
    "lambda_firm_sd": 0.4,
    "lambda_firm_product_sd": 0.3,
    "lambda_flow_sd": 0.25,
    "price_quality_elasticity": 0.5,
    "firm_cost_sd": 0.15,
    "price_noise_sd": 0.1,
    "quantity_noise_sd": 0.1,
    "partner_year_trend": 0.05,
    "partner_year_shock_sd": 0.1,
}

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = (x + np.uint64(0x9E3779B97F4A7C15)) & _M64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _M64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _M64
        return z ^ (z >> np.uint64(31))


def hash_u(keys: np.ndarray, salt: int) -> np.ndarray:
    """Deterministic uniform(0,1) per integer key (independent of draw order)."""
    k = np.asarray(keys, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = _splitmix(k ^ _splitmix(np.full(k.shape, salt, dtype=np.uint64)))
    return ((z >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)


def hash_normal(keys: np.ndarray, salt: int) -> np.ndarray:
    return ndtri(hash_u(keys, salt))


def planted_effects(u: Universe) -> tuple[dict[int, float], dict[str, float]]:
    rng = np.random.default_rng([u.seed, 404])
    y0, y1 = u.years
    ye = {y: round(float(v), 4) for y, v in zip(range(y0, y1 + 1), rng.normal(0, MECHANISM["year_effect_sd"], y1 - y0 + 1))}
    ye[y0] = 0.0
    hs2 = sorted({h[:2] for h in u.hs4})
    ce = {c: round(float(v), 4) for c, v in zip(hs2, rng.normal(0, MECHANISM["hs2_effect_sd"], len(hs2)))}
    return ye, ce


@dataclass
class YearResult:
    year: int
    rows: pl.DataFrame  # one row per raw record (before dirt), internal codes
    export_status: pl.DataFrame | None
    quality: pl.DataFrame
    clean_exports: sp.csr_matrix  # firm x HS4 presence (S000 clean sample), for phi of t+1
    stats: dict


def _unique_pairs(f: np.ndarray, p: np.ndarray, n_p: int) -> tuple[np.ndarray, np.ndarray]:
    key = np.unique(f.astype(np.int64) * n_p + p)
    return key // n_p, key % n_p


def phi_matrix(M: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """phi_pq = C_pq / max(C_pp, C_qq), C = M'M, phi_pp = 1; products never exported get 0 rows."""
    Mb = (M > 0).astype(np.float64)
    C = np.asarray((Mb.T @ Mb).todense())
    N = np.diag(C).copy()
    U = N > 0
    mx = np.maximum.outer(N, N)
    with np.errstate(divide="ignore", invalid="ignore"):
        phi = np.where(mx > 0, C / np.where(mx > 0, mx, 1.0), 0.0)
    phi[~U, :] = 0.0
    phi[:, ~U] = 0.0
    idx = np.flatnonzero(U)
    phi[idx, idx] = 1.0
    return phi, U


_VAGG_SHIFT: dict[tuple, dict[int, np.ndarray]] = {}


def vagg_shift(u: Universe, t: int) -> np.ndarray:
    """Planted S004 quality shift per city index for year t (``synthetic.s004_inputs.
    planted_ln_lambda_shift``; city means over the fixed window 2000-2016, so the shift of a
    city-year does not depend on which years are generated)."""
    from kspill_pipeline.synthetic.s004_inputs import EXPOSURE_YEARS, planted_ln_lambda_shift

    key = (int(u.seed), tuple(u.city_code.tolist()))
    if key not in _VAGG_SHIFT:
        fr = planted_ln_lambda_shift(list(u.city_code), EXPOSURE_YEARS, int(u.seed))
        pos = {c: i for i, c in enumerate(u.city_code.tolist())}
        out: dict[int, np.ndarray] = {}
        for (yr,), g in fr.group_by(["year"]):
            a = np.zeros(len(pos))
            a[[pos[c] for c in g["city_code"].to_list()]] = g["ln_lambda_shift"].to_numpy()
            out[int(yr)] = a
        _VAGG_SHIFT.clear()
        _VAGG_SHIFT[key] = out
    return _VAGG_SHIFT[key].get(int(t), np.zeros(len(u.city_code)))


def simulate_year(u: Universe, t: int, prev_clean: sp.csr_matrix | None, monthly: bool) -> YearResult:
    sc = u.scale
    n, n4, n6 = u.n_firms, len(u.hs4), len(u.hs6)
    rng = np.random.default_rng([u.seed, 303, t])
    active = (u.entry <= t) & (u.exit >= t)
    K = u.import_pool.shape[1]

    # ------------------------------------------------------------------ imports (firm x HS4)
    imp_year = active & (rng.random(n) < u.p_import)
    incl = rng.random((n, K)) < IMPORT_ITEM_P
    incl[:, 0] = True
    m = imp_year[:, None] & incl & (u.import_pool >= 0)
    fi, ki = np.nonzero(m)
    qi = u.import_pool[fi, ki]
    proc_i = u.is_processing[fi] & (rng.random(len(fi)) < PROCESSING_IMPORT_SHARE)
    clean_imp = ~u.flagged[fi] & ~proc_i
    cf, cq = fi[clean_imp], qi[clean_imp]

    # ------------------------------------------------------------------ baseline exports
    core = u.core_pool
    mb = active[:, None] & (core >= 0) & (rng.random(core.shape) < BASELINE_CORE_EXPORT_P)
    bf, bk = np.nonzero(mb)
    bp = core[bf, bk]

    ye, ce = planted_effects(u)
    status = None
    cand_key = np.empty(0, dtype=np.int64)
    y_key = np.empty(0, dtype=np.int64)
    stats: dict = {"active_firms": int(active.sum()), "importing_firms": int(imp_year.sum())}
    if prev_clean is not None:
        phi, U = phi_matrix(prev_clean)
        denom = phi.sum(1)
        denom_safe = np.where(denom > 0, denom, 1.0)
        F = np.unique(cf)
        row_of = np.full(n, -1, dtype=np.int64)
        row_of[F] = np.arange(len(F))
        I = sp.csr_matrix((np.ones(len(cf)), (row_of[cf], cq)), shape=(len(F), n4))
        I.data[:] = 1.0
        I.sum_duplicates()
        I.data[:] = 1.0
        ncity = len(u.city_code)
        Xc = sp.csr_matrix((np.ones(len(cf)), (u.firm_city[cf], cq)), shape=(ncity, n4))
        Xc.sum_duplicates()
        Xc.data[:] = 1.0
        dcity = np.asarray(Xc @ phi) / denom_safe  # phi symmetric
        dcity[:, ~U] = np.nan
        thr = MECHANISM["candidate_threshold"]
        cf_l, cp_l, df_l = [], [], []
        # baseline pairs of clean importers: densities for non-candidate exported pairs
        b_is_imp = row_of[bf] >= 0
        bdf = np.where(U[bp], 0.0, np.nan)
        for s in range(0, len(F), sc.chunk_firms):
            e = min(len(F), s + sc.chunk_firms)
            D = np.asarray((I[s:e] @ phi)) / denom_safe
            D[:, ~U] = 0.0
            r, c = np.nonzero(D > thr)
            cf_l.append(F[s + r])
            cp_l.append(c)
            df_l.append(D[r, c])
            sel = np.flatnonzero(b_is_imp & (row_of[bf] >= s) & (row_of[bf] < e))
            bdf[sel] = np.where(U[bp[sel]], D[row_of[bf[sel]] - s, bp[sel]], np.nan)
        c_f = np.concatenate(cf_l) if cf_l else np.empty(0, dtype=np.int64)
        c_p = np.concatenate(cp_l) if cp_l else np.empty(0, dtype=np.int64)
        c_df = np.concatenate(df_l) if df_l else np.empty(0)
        c_dc = dcity[u.firm_city[c_f], c_p]
        hs2_of4 = np.array([h[:2] for h in u.hs4])
        latent = (
            MECHANISM["b0"] + MECHANISM["b1_density_firm"] * c_df + MECHANISM["b2_density_city"] * c_dc
            + MECHANISM["b3_interaction"] * c_df * c_dc + ye[t]
            + np.array([ce[h] for h in hs2_of4])[c_p]
        )
        eps = rng.standard_normal(len(c_f))
        y = (latent + eps) > 0
        cand_key = c_f.astype(np.int64) * n4 + c_p
        y_key = cand_key[y]
        cand = pl.DataFrame({
            "firm": c_f.astype(np.int64), "hs4_idx": c_p.astype(np.int64), "exported": y.astype(np.int8),
            "candidate": np.ones(len(c_f), dtype=bool), "density_firm": c_df, "density_city": c_dc,
            "latent": latent,
        })
        stats.update(candidates=int(len(c_f)), candidate_export_rate=float(y.mean()) if len(y) else None,
                     clean_importers=int(len(F)), phi_products=int(U.sum()))
    # ordinary export pairs: baseline minus candidates, plus candidates with y = 1
    bkey = bf.astype(np.int64) * n4 + bp
    keep_b = ~np.isin(bkey, cand_key)
    ekey = np.unique(np.concatenate([bkey[keep_b], y_key]))
    ef, ep = ekey // n4, ekey % n4
    if prev_clean is not None:
        # exported non-candidate pairs of clean (non-flagged) firms
        nb_key, first = np.unique(bkey[keep_b], return_index=True)
        nb_f, nb_p = nb_key // n4, nb_key % n4
        nb_df = bdf[keep_b][first]
        ok = ~u.flagged[nb_f]
        non = pl.DataFrame({
            "firm": nb_f[ok], "hs4_idx": nb_p[ok], "exported": np.ones(ok.sum(), dtype=np.int8),
            "candidate": np.zeros(ok.sum(), dtype=bool), "density_firm": nb_df[ok],
            "density_city": dcity[u.firm_city[nb_f[ok]], nb_p[ok]], "latent": np.full(ok.sum(), np.nan),
        })
        status = pl.concat([cand, non]).with_columns(pl.lit(t, dtype=pl.Int32).alias("year"))
    clean_mask = ~u.flagged[ef]
    clean_exports = sp.csr_matrix(
        (np.ones(int(clean_mask.sum())), (ef[clean_mask], ep[clean_mask])), shape=(n, n4)
    )
    # processing exports of processing traders (core products)
    pm = active[:, None] & u.is_processing[:, None] & (core >= 0) & (rng.random(core.shape) < PROCESSING_EXPORT_P)
    pf, pk = np.nonzero(pm)
    pf, pp = _unique_pairs(pf, core[pf, pk], n4)

    # ------------------------------------------------------------------ flows
    ex_o = _expand(u, rng, ef, ep, sc.dest_lambda, salt=11)
    ex_p = _expand(u, rng, pf, pp, sc.dest_lambda, salt=11)
    okey = set()
    key_o = ex_o[0] * (n6 * 100) + ex_o[1] * 100 + ex_o[2]
    key_p = ex_p[0] * (n6 * 100) + ex_p[1] * 100 + ex_p[2]
    keepp = ~np.isin(key_p, key_o)
    ex_p = tuple(a[keepp] for a in ex_p)
    del okey
    im_o = _expand(u, rng, fi[~proc_i], qi[~proc_i], sc.origin_lambda, salt=13)
    im_p = _expand(u, rng, fi[proc_i], qi[proc_i], sc.origin_lambda, salt=13)

    def modes(ff, hh, kind):
        if kind == "proc":
            return np.where(rng.random(len(ff)) < 0.7, "15", "14")
        # ordinary: relabel some flows to an 'other' mode inside cells with >= 2 flows
        cell = ff.astype(np.int64) * n4 + u.hs6_hs4_idx[hh]
        order = np.lexsort((hh, cell))
        cs = cell[order]
        rank = np.zeros(len(cs), dtype=np.int64)
        if len(cs):
            start = np.r_[True, cs[1:] != cs[:-1]]
            grp = np.cumsum(start) - 1
            first_pos = np.flatnonzero(start)
            rank = np.arange(len(cs)) - first_pos[grp]
        r = np.empty(len(ff), dtype=np.int64)
        r[order] = rank
        other = (r >= 1) & (rng.random(len(ff)) < OTHER_MODE_P)
        alt = ("34", "19") if kind == "exp" else ("33", "25")
        pick = np.where(rng.random(len(ff)) < 0.5, alt[0], alt[1])
        return np.where(other, pick, "10")

    parts = []
    for (ff, hh, dd), flow, kind in ((ex_o, 0, "exp"), (ex_p, 0, "proc"), (im_o, 1, "imp"), (im_p, 1, "proc")):
        parts.append(pl.DataFrame({
            "firm": ff.astype(np.int64), "h": hh.astype(np.int64), "partner": dd.astype(np.int64),
            "flow": np.full(len(ff), flow, dtype=np.int8), "mode": modes(ff, hh, kind),
        }))
    fl = pl.concat(parts).sort("flow", "firm", "h", "partner", "mode")
    nf = fl.height
    f_ = fl["firm"].to_numpy()
    h_ = fl["h"].to_numpy()
    d_ = fl["partner"].to_numpy()
    isexp = fl["flow"].to_numpy() == 0
    # CES prices and quantities (exports); simple lognormals (imports)
    fh = f_.astype(np.uint64) * np.uint64(n6) + h_.astype(np.uint64)
    lam = u.quality[f_] + CES["lambda_firm_product_sd"] * hash_normal(fh, 7) + CES["lambda_flow_sd"] * rng.standard_normal(nf)
    # study S004: planted effect of virtual agglomeration on quality, BETA_VAGG * (vagg_ct - city mean)
    # by the firm's home city (deterministic, own RNG stream: no draw of the customs stream moves)
    lam = lam + vagg_shift(u, t)[u.firm_city[f_]]
    lnp = u.hs6_base_lp[h_] + u.cost[f_] + CES["price_quality_elasticity"] * lam + CES["price_noise_sd"] * rng.standard_normal(nf)
    sig = u.hs6_sigma[h_]
    dt = (u.p_delta[d_] + CES["partner_year_trend"] * (t - 2000)
          + CES["partner_year_shock_sd"] * hash_normal(d_.astype(np.uint64) * np.uint64(10000) + np.uint64(t), 9))
    lnq = u.hs6_a[h_] + dt - sig * lnp + (sig - 1.0) * lam + CES["quantity_noise_sd"] * rng.standard_normal(nf)
    lnp_i = u.hs6_base_lp[h_] + 0.2 + 0.3 * rng.standard_normal(nf)
    lnv_i = np.log(30000.0) + 1.2 * rng.standard_normal(nf)
    lnq = np.where(isexp, lnq, lnv_i - lnp_i)
    lnp = np.where(isexp, lnp, lnp_i)
    value = np.maximum(1.0, np.round(np.exp(lnp + lnq)))
    qty = np.maximum(0.001, np.round(np.exp(lnq), 3))
    # raw HS8 suffix (firm-stable)
    two = u.hs6_n_hs8[h_] == 2
    suf = np.where(two, np.where(hash_u(fh, 5) < 0.5, "10", "90"), "00")
    fl = fl.with_columns(
        pl.Series("flow_id", np.arange(nf, dtype=np.int64)),
        pl.Series("suffix", suf),
        pl.Series("value", value),
        pl.Series("qty", qty),
        pl.Series("ln_lambda", np.where(isexp, lam, np.nan)),
    )
    # ------------------------------------------------------------------ plants (multi-plant exports)
    mp = u.is_multiplant[f_] & isexp & (rng.random(nf) < MULTIPLANT_SPLIT_P) & (value >= 2)
    nsec = (u.firm_sec_city[f_] >= 0).sum(1)
    j = np.where(nsec > 0, (rng.random(nf) * np.maximum(nsec, 1)).astype(int), 0)
    sec_city = u.firm_sec_city[f_, j]
    sec_reg = u.firm_sec_region[f_, j]
    main_v = np.where(mp, np.round(value * MULTIPLANT_MAIN_SHARE), value)
    main_q = np.where(mp, np.round(qty * MULTIPLANT_MAIN_SHARE, 3), qty)
    base = pl.DataFrame({
        "flow_id": np.arange(nf, dtype=np.int64), "city": u.firm_city[f_], "region": u.firm_region[f_],
        "value": main_v, "qty": np.maximum(main_q, 0.001),
    })
    extra = pl.DataFrame({
        "flow_id": np.flatnonzero(mp).astype(np.int64), "city": sec_city[mp], "region": sec_reg[mp],
        "value": (value - main_v)[mp], "qty": np.maximum(np.round(qty - main_q, 3), 0.001)[mp],
    })
    plants = pl.concat([base, extra])
    # ------------------------------------------------------------------ months
    if monthly:
        npl = plants.height
        nm = 1 + rng.binomial(3, sc.month_p, npl)
        v = plants["value"].to_numpy()
        nm = np.minimum(nm, np.maximum(v, 1).astype(int))
        m0 = rng.integers(0, 12, npl)
        step = np.array([1, 2, 3, 5])[rng.integers(0, 4, npl)]
        rep = np.repeat(np.arange(npl), nm)
        k = np.arange(len(rep)) - np.repeat(np.cumsum(nm) - nm, nm)
        month = (m0[rep] + k * step[rep]) % 12 + 1
        w = rng.gamma(2.0, 1.0, len(rep))
        wsum = np.bincount(rep, weights=w, minlength=npl)
        share = w / wsum[rep]
        plants = plants[rep].with_columns(
            pl.Series("month", month.astype(np.int8)),
            pl.Series("value", np.maximum(1.0, np.round(v[rep] * share))),
            pl.Series("qty", np.maximum(0.001, np.round(plants["qty"].to_numpy()[rep] * share, 3))),
        )
    else:
        plants = plants.with_columns(pl.lit(0, dtype=pl.Int8).alias("month"))
    rows = plants.join(fl.drop("value", "qty"), on="flow_id", how="left", maintain_order="left")
    rows = rows.with_columns(pl.col("value").cast(pl.Int64)).sort("month", "firm", "flow", "h", "partner", "mode", "region")

    # ------------------------------------------------------------------ truth: quality
    agg = rows.filter(pl.col("flow") == 0).group_by("flow_id").agg(
        pl.col("value").sum().alias("value_usd"), pl.col("qty").sum().alias("quantity")
    )
    q = (
        fl.filter(pl.col("flow") == 0)
        .join(agg, on="flow_id", how="inner")
        .with_columns((pl.col("value_usd") / pl.col("quantity")).alias("price"))
    )
    stats.update(rows=rows.height, flows=nf, export_flows=int(isexp.sum()))
    return YearResult(t, rows, status, q, clean_exports, stats)


def _expand(u: Universe, rng: np.random.Generator, f: np.ndarray, p: np.ndarray, lam: float, salt: int):
    """(firm, HS4) pairs -> unique (firm, HS6, partner) flows."""
    n6 = len(u.hs6)
    if len(f) == 0:
        e = np.empty(0, dtype=np.int64)
        return e, e, e
    cnt = np.diff(u.hs4_prod_off)[p]
    nh = np.minimum(1 + (rng.random(len(f)) < 0.3), cnt)
    rep = np.repeat(np.arange(len(f)), nh)
    j = np.arange(len(rep)) - np.repeat(np.cumsum(nh) - nh, nh)
    base = (hash_u(f.astype(np.uint64) * np.uint64(100003) + p.astype(np.uint64), salt) * cnt).astype(np.int64)
    h = u.hs4_prod_idx[u.hs4_prod_off[p[rep]] + (base[rep] + j) % cnt[rep]]
    ff = f[rep]
    nd = 1 + rng.poisson(lam, len(ff))
    rep2 = np.repeat(np.arange(len(ff)), nd)
    d = rng.choice(len(u.p_iso3), size=len(rep2), p=u.p_weight)
    key = np.unique((ff[rep2].astype(np.int64) * n6 + h[rep2]) * 100 + d)
    return key // (n6 * 100), (key // 100) % n6, key % 100
