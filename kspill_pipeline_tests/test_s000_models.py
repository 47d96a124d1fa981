"""S000 estimation: pyfixest Probit vs independent ML fits, AMEs, standardisation, planted truth."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import polars as pl
import pytest
from scipy.stats import norm

from kspill_pipeline.studies import s000_models as m

sm = pytest.importorskip("statsmodels.api")


@pytest.fixture(scope="module")
def small():
    """~4k rows, 4 years x 6 industries, from a known Probit DGP."""
    panel, truth = m.simulate_probit_panel(4000, n_years=4, n_industries=6, n_firms=400, n_cities=40,
                                           intercept=-1.6, seed=11)
    prep = m.prepare_sample(panel, m.FULL_MODEL, sample="small", cluster=["firm_id"])
    return panel, prep


def _sm_design(prep: m.PreparedSample, regs) -> tuple[np.ndarray, np.ndarray]:
    """[regressors, all year dummies, industry dummies without the first]: the layout of ProbitFit.theta."""
    df = prep.frame
    y = df["export"].to_numpy().astype(float)
    X = df.select(list(regs)).to_numpy().astype(float)
    yc = df["year"].to_numpy().astype(int)
    ic = df["industry"].to_numpy().astype(int)
    Dy = np.eye(yc.max() + 1)[yc]
    Di = np.eye(ic.max() + 1)[ic][:, 1:]
    return y, np.column_stack([X, Dy, Di])


@pytest.fixture(scope="module")
def sm_fits(small):
    _, prep = small
    y, Z = _sm_design(prep, m.FULL_MODEL)
    probit = sm.Probit(y, Z).fit(method="newton", tol=1e-12, maxiter=100, disp=0)
    glm = sm.GLM(y, Z, family=sm.families.Binomial(link=sm.families.links.Probit())).fit(tol=1e-13, maxiter=200)
    return probit, glm


@pytest.fixture(scope="module")
def fit4(small):
    return m.fit_probit(small[1], m.FULL_MODEL)


def test_prepare_drops_perfectly_predicted_groups_iteratively():
    rows = [(2002, "a", 0), (2002, "a", 0), (2002, "b", 1), (2002, "b", 1),
            (2003, "b", 0), (2003, "b", 1), (2003, "c", 0), (2003, "c", 1)]
    df = pl.DataFrame(rows, schema=["year", "industry", "export"], orient="row").with_columns(
        x=pl.int_range(8).cast(pl.Float64))
    prep = m.prepare_sample(df, ["x"], sample="hand")
    # pass 1 drops industry a (all 0); then year 2002 is all 1 and goes in pass 2
    assert prep.n_obs == 4
    assert prep.n_dropped_separation == 4
    assert prep.dropped_groups == {"year": 1, "industry": 1}
    assert sorted(prep.frame["x"].to_list()) == [4.0, 5.0, 6.0, 7.0]


def test_prepare_raises_named_error_when_nothing_left():
    df = pl.DataFrame({"year": [1, 1, 2], "industry": [1, 2, 2], "export": [0, 1, 1], "x": [0.1, 0.2, 0.3]})
    with pytest.raises(ValueError, match="sample 'tiny'"):
        m.prepare_sample(df, ["x"], sample="tiny")


def test_pyfixest_probit_equals_statsmodels_ml(small, sm_fits, fit4):
    """Coefficients to 1e-6 against statsmodels Probit with dummies; iid SEs (expected
    information, as pyfixest) to 1e-6 against statsmodels GLM(probit) with dummies."""
    probit, glm = sm_fits
    k = len(m.FULL_MODEL)
    assert fit4.n_obs == small[1].n_obs
    assert np.max(np.abs(fit4.coef - probit.params[:k])) < 1e-6
    assert np.max(np.abs(fit4.se - glm.bse[:k])) < 1e-6
    # FE levels recovered from pyfixest's linear predictor equal the dummy coefficients
    assert np.max(np.abs(fit4.theta - probit.params)) < 1e-5
    assert fit4.vcov_check < 1e-6  # full-parameter vcov slope block == pyfixest vcov
    assert abs(fit4.loglik - probit.llf) < 1e-6
    assert abs(fit4.pseudo_r2 - probit.prsquared) < 1e-8


def test_observed_information_matches_statsmodels_probit(small, sm_fits):
    """information='observed' (Stata's default) == statsmodels Probit's SEs (negative Hessian)."""
    probit, _ = sm_fits
    k = len(m.FULL_MODEL)
    for method in ("pyfixest", "dummies"):
        f = m.fit_probit(small[1], m.FULL_MODEL, information="observed", method=method)
        assert np.max(np.abs(f.se - probit.bse[:k])) < 1e-6


def test_dummies_method_equals_statsmodels(small, sm_fits):
    probit, glm = sm_fits
    k = len(m.FULL_MODEL)
    f = m.fit_probit(small[1], m.FULL_MODEL, method="dummies")
    assert f.converged
    assert np.max(np.abs(f.coef - probit.params[:k])) < 1e-8
    assert np.max(np.abs(f.se - glm.bse[:k])) < 1e-8


def test_clustered_se_matches_dense_numpy_sandwich(small, sm_fits):
    """CRV1(firm): bread = inverse expected information of the full dummy model (as pyfixest),
    meat = sum of per-firm score sums, times G/(G-1); computed here densely with numpy at
    statsmodels' MLE. (statsmodels' own GLM cluster option uses the observed-information bread,
    so it differs by ~1 % here and is not the reference.)"""
    _, prep = small
    probit, _ = sm_fits
    y, Z = _sm_design(prep, m.FULL_MODEL)
    groups = prep.frame["firm_id"].to_numpy()
    e = Z @ probit.params
    lam1, lam0 = norm.pdf(e) / norm.cdf(e), norm.pdf(e) / norm.sf(e)
    r = np.where(y > 0.5, lam1, -lam0)
    Hinv = np.linalg.inv(Z.T @ (Z * (lam1 * lam0)[:, None]))
    S = np.zeros((groups.max() + 1, Z.shape[1]))
    np.add.at(S, groups, r[:, None] * Z)
    G = np.unique(groups).size
    V = Hinv @ (S.T @ S) @ Hinv * G / (G - 1)
    k = len(m.FULL_MODEL)
    f = m.fit_probit(prep, m.FULL_MODEL, vcov={"CRV1": "firm_id"})
    assert f.n_clusters == G
    np.testing.assert_allclose(f.se, np.sqrt(np.diag(V))[:k], rtol=1e-6)  # pyfixest
    assert np.max(np.abs(f.vcov_full - V)) < 1e-6 * np.max(np.abs(V))  # ours, all parameters
    assert f.vcov_check < 1e-5


def test_naive_ame_equals_hand_and_statsmodels_margeff(small, sm_fits, fit4):
    probit, _ = sm_fits
    k = len(m.FULL_MODEL)
    rows = [r for r in m.average_marginal_effects(fit4) if r["kind"] == "ame_naive"]
    est = np.array([r["estimate"] for r in rows])
    hand = norm.pdf(fit4.eta).mean() * fit4.coef
    np.testing.assert_allclose(est, hand, rtol=1e-12)
    mfx = probit.get_margeff(at="overall", method="dydx")
    np.testing.assert_allclose(est, mfx.margeff[:k], rtol=1e-6)
    # delta-method SEs with statsmodels' covariance (observed information) == get_margeff's SEs
    rows_sm = [r for r in m.average_marginal_effects(fit4, vcov_full=probit.cov_params())
               if r["kind"] == "ame_naive"]
    np.testing.assert_allclose([r["std_error"] for r in rows_sm], mfx.margeff_se[:k], rtol=1e-5)


@pytest.mark.parametrize("standardize,mode", [(False, None), (True, "z_of_product"), (True, "product_of_z")])
def test_interaction_aware_ame_and_cross_partial_equal_finite_differences(small, standardize, mode):
    _, prep = small
    f = m.fit_probit(prep, m.FULL_MODEL, standardize=standardize,
                     standardize_interaction=mode or "z_of_product")
    raw = prep.frame
    res = {(r["kind"], r["term"]): r["estimate"] for r in m.average_marginal_effects(f)}
    s1 = f.sds["density_firm"] if standardize else 1.0
    s2 = f.sds["density_city"] if standardize else 1.0
    P = lambda **sh: m.mean_predicted_probability(f, raw, sh)  # noqa: E731
    h = 1e-5
    d1 = (P(density_firm=h) - P(density_firm=-h)) / (2 * h) * s1
    d2 = (P(density_city=h) - P(density_city=-h)) / (2 * h) * s2
    np.testing.assert_allclose(res[("ame_interaction_aware", "density_firm")], d1, rtol=1e-6)
    np.testing.assert_allclose(res[("ame_interaction_aware", "density_city")], d2, rtol=1e-6)
    h = 1e-3
    cp = (P(density_firm=h, density_city=h) - P(density_firm=h, density_city=-h)
          - P(density_firm=-h, density_city=h) + P(density_firm=-h, density_city=-h)) / (4 * h * h) * s1 * s2
    np.testing.assert_allclose(res[("cross_partial", "interaction")], cp, rtol=1e-4, atol=1e-7)
    # controls: interaction-aware == naive
    assert res[("ame_interaction_aware", "tradevalue")] == pytest.approx(res[("ame_naive", "tradevalue")])


def test_standardised_model_is_model4_times_sd(small, fit4):
    """Spec 3.7 [DERIVED]: with z_of_product, b5_k = b4_k * sd_k (and SEs likewise)."""
    _, prep = small
    f5 = m.fit_probit(prep, m.FULL_MODEL, standardize=True, standardize_interaction="z_of_product")
    sd = np.array([f5.sds[c] for c in m.FULL_MODEL])
    np.testing.assert_allclose(f5.coef, fit4.coef * sd, rtol=1e-6)
    np.testing.assert_allclose(f5.se, fit4.se * sd, rtol=1e-5)
    # product_of_z is another reparametrisation of the same model
    fz = m.fit_probit(prep, m.FULL_MODEL, standardize=True, standardize_interaction="product_of_z")
    b1, b2, b3 = fit4.coef[:3]
    s1, s2 = fz.sds["density_firm"], fz.sds["density_city"]
    m1, m2 = fz.means["density_firm"], fz.means["density_city"]
    np.testing.assert_allclose(fz.coef[:3], [s1 * (b1 + b3 * m2), s2 * (b2 + b3 * m1), b3 * s1 * s2], rtol=1e-6)
    assert fz.loglik == pytest.approx(fit4.loglik, abs=1e-6)
    # the paper's column (6): naive AMEs of (5); AME / b5 is the same ratio for every column
    ame = np.array([r["estimate"] for r in m.average_marginal_effects(f5, kinds=("ame_naive",))])
    ratio = ame / f5.coef
    assert np.ptp(ratio) < 1e-12


def test_planted_coefficients_recovered_within_3_se():
    panel, truth = m.simulate_probit_panel(150_000, n_years=10, n_industries=20, seed=3)
    f = m.fit_probit(panel, m.FULL_MODEL)
    z = (f.coef - np.array([truth["beta"][c] for c in m.FULL_MODEL])) / f.se
    assert np.all(np.abs(z) < 3), dict(zip(m.FULL_MODEL, z.round(2), strict=True))
    # FE levels (relative to the first level of each FE) recover the planted ones as well
    fe = f.fe_values()
    np.testing.assert_allclose(fe["industry"] - fe["industry"][0],
                               truth["industry_fe"] - truth["industry_fe"][0], atol=0.1)


def test_tables_tidy_schema_and_published(small):
    panel, _ = small
    t1 = m.table1(panel)
    assert t1.tidy.columns == list(m.TIDY_COLUMNS)
    assert set(t1.tidy["model"]) == {"(1)", "(2)", "(3)", "(4)", "(5)", "(6)"}
    six = t1.tidy.filter(pl.col("model") == "(6)")
    assert set(six["kind"]) == {"ame_naive", "ame_interaction_aware", "cross_partial"}
    pub = t1.tidy.filter(pl.col("published").is_not_null())
    assert pub.height == 3 + 3 + 4 + 5 + 5 + 5
    assert pub.filter((pl.col("model") == "(4)") & (pl.col("term") == "interaction"))["published"][0] == -2.988
    assert six.filter(pl.col("kind") != "ame_naive")["published"].null_count() == 4 + 1
    # all columns share one sample
    assert t1.tidy["n_obs"].n_unique() == 1
    t2 = m.table2(panel, on_empty="skip")
    assert set(t2.fits) | set(t2.skipped) == set(m.TABLE2_SUBSAMPLES)
    lp = m.lpm(panel)
    assert set(lp["vcov"]) == {"iid", "CRV1(firm_id)", "CRV1(city_code)"}
    allt = m.tidy_all(t1.tidy, t2.tidy, lp)
    for which in ("table1", "table2", "lpm", "ame"):
        for fmt in ("markdown", "latex", "html"):
            assert m.render_s000(allt, which, fmt)


def test_published_yaml_matches_spec_section5():
    pub = m.published_frame()
    assert pub.height == 3 + 3 + 4 + 5 + 5 + 5 + 5 * 5
    t1 = {(r["model"], r["term"]): r["published"] for r in pub.filter(pl.col("table") == "table1").iter_rows(named=True)}
    assert t1[("(5)", "density_firm")] == 0.344 and t1[("(6)", "density_city")] == 0.012
    t2 = {(r["model"], r["term"]): (r["published"], r["published_std_error"])
          for r in pub.filter(pl.col("table") == "table2").iter_rows(named=True)}
    assert t2[("West", "interaction")] == (-6.097, 0.1220)
    assert t2[("Low mkt", "tradevalue")] == (-0.005, 0.0005)
    # spec 3.7 DERIVED: implied SD of density_firm = b5 / b4 ~ 0.068
    assert t1[("(5)", "density_firm")] / t1[("(4)", "density_firm")] == pytest.approx(0.068, abs=0.001)


def test_perfectly_predicted_subsample_raises_cleanly_in_subprocess():
    """A subsample whose FE groups all have constant outcomes must raise ValueError naming the
    sample, not abort the process (pyfixest 0.60 SIGABRT hazard). Run in a subprocess."""
    code = textwrap.dedent(
        """
        import polars as pl
        from kspill_pipeline.studies import s000_models as m
        panel, _ = m.simulate_probit_panel(3000, n_years=3, n_industries=4, seed=5)
        # West: every industry group has a constant outcome (industry parity decides export)
        panel = panel.with_columns(
            pl.when(pl.col("macro_region") == "west")
            .then((pl.col("industry") % 2).cast(pl.Int8))
            .otherwise(pl.col("export")).alias("export"))
        m.table2(panel, subsamples={"East": ("macro_region", ["east"]), "West": ("macro_region", ["west"])})
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert "ValueError: sample 'West'" in proc.stderr
    assert "perfectly predicted" in proc.stderr


def test_ame_method_switch_selects_column6(small):
    """Switch ``ame_method``: column (6) of the rendered Table 1 shows the chosen AME kind."""
    panel, _ = small
    tidy = m.table1(panel).tidy
    six = tidy.filter(pl.col("model") == "(6)")
    naive = six.filter((pl.col("kind") == "ame_naive") & (pl.col("term") == "density_firm"))["estimate"][0]
    aware = six.filter((pl.col("kind") == "ame_interaction_aware") & (pl.col("term") == "density_firm"))["estimate"][0]
    cross = six.filter(pl.col("kind") == "cross_partial")["estimate"][0]
    assert abs(naive - aware) > 1e-3  # the two kinds differ on this panel, so the check can fail
    md_naive = m.render_s000(tidy, "table1", "markdown", show_published=False)
    md_aware = m.render_s000(tidy, "table1", "markdown", show_published=False, ame_method="interaction_aware")
    assert f"{naive:.3f}" in md_naive and f"{aware:.3f}" not in md_naive.split("naive_per_column")[-1]
    assert f"{aware:.3f}" in md_aware and f"{cross:.3f}" in md_aware
    assert "interaction_aware" in md_aware.splitlines()[0] or "interaction_aware" in md_aware
    with pytest.raises(ValueError, match="ame_method"):
        m.render_s000(tidy, "table1", "markdown", ame_method="stata")
