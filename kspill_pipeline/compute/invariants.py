"""Relatedness invariants that the contract language cannot express (pure polars).

Issue 3 "Contracts and blocking checks": phi symmetric (symmetric variants), diagonal as
configured, values in [0, 1], ``phi_pq <= C_pq / u_p`` exactly, and, when the city basket contains
the firm's, ``density_city >= density_firm`` on every row (spec S000 section 9).
"""

from __future__ import annotations

import polars as pl

from kspill_pipeline.contracts.checks import CheckOutcome

PHI_CHECKS = [
    ("phi_symmetric", "phi_12 = phi_21 for every pair (symmetric variants)"),
    ("phi_diagonal", "diagonal of phi as configured (one / zero / raw = C_pp/u_p)"),
    ("phi_bounds", "phi in [0, 1]; phi <= C_12/u_1 and <= C_12/u_2 exactly (min_conditional), = C_12/u_2 (asymmetric)"),
]
CITY_GE_FIRM = (
    "density_city_ge_firm",
    "density_city of the firm's city >= density_firm on every row (the city basket contains the firm's)",
)


def _sample(df: pl.DataFrame, cols: list[str], n: int = 5) -> list[dict]:
    return df.select(cols).head(n).to_dicts()


def phi_checks(df: pl.DataFrame, *, variant: str, diagonal: str) -> list[CheckOutcome]:
    """Checks on a product_relatedness partition (long format, see its contract)."""
    out: list[CheckOutcome] = []
    off = df.filter(pl.col("product_1") != pl.col("product_2"))
    if variant == "asymmetric":
        out.append(CheckOutcome("phi_symmetric", True, "not applicable: asymmetric variant", {"variant": variant}))
    else:
        j = off.join(
            off.select(pl.col("product_1").alias("product_2"), pl.col("product_2").alias("product_1"),
                       pl.col("phi").alias("phi_t")),
            on=["product_1", "product_2"], how="left",
        )
        bad = j.filter(pl.col("phi_t").is_null() | (pl.col("phi") != pl.col("phi_t")))
        out.append(CheckOutcome(
            "phi_symmetric", bad.height == 0, f"{bad.height} asymmetric pair(s) of {off.height}",
            {"violations": bad.height, "pairs": off.height, "sample": _sample(bad, ["product_1", "product_2"])},
        ))
    diag = df.filter(pl.col("product_1") == pl.col("product_2"))
    if variant == "correlation":
        expected = pl.lit(1.0) if diagonal == "one" else (pl.lit(0.0) if diagonal == "zero" else None)
    else:
        raw = pl.when(pl.col("u_1") > 0).then(pl.col("c_12") / pl.col("u_1")).otherwise(0.0)
        expected = {"one": pl.when(pl.col("u_1") > 0).then(1.0).otherwise(0.0), "zero": pl.lit(0.0), "raw": raw}[diagonal]
    if expected is None:
        bad = diag.head(0)
    else:
        bad = diag.filter(pl.col("phi") != expected)
    out.append(CheckOutcome(
        "phi_diagonal", bad.height == 0, f"{bad.height} diagonal cell(s) differ from '{diagonal}'",
        {"violations": bad.height, "products": diag.height, "sample": _sample(bad, ["product_1"])},
    ))
    rng = df.filter((pl.col("phi") < 0) | (pl.col("phi") > 1) | pl.col("phi").is_nan())
    if variant == "min_conditional":
        bound = off.filter((pl.col("phi") > pl.col("c_12") / pl.col("u_1")) | (pl.col("phi") > pl.col("c_12") / pl.col("u_2")))
    elif variant == "asymmetric":
        bound = off.filter(pl.col("phi") != pl.col("c_12") / pl.col("u_2"))
    else:
        bound = off.head(0)
    n_bad = rng.height + bound.height
    out.append(CheckOutcome(
        "phi_bounds", n_bad == 0, f"{rng.height} out of [0,1], {bound.height} above the conditional probabilities",
        {"out_of_range": rng.height, "bound_violations": bound.height,
         "sample": _sample(pl.concat([rng, bound]), ["product_1", "product_2", "phi", "c_12", "u_1", "u_2"])},
    ))
    return out


def city_ge_firm(firm_density: pl.DataFrame, firm_city: pl.DataFrame, city_density: pl.DataFrame,
                 *, tol: float = 1e-6) -> CheckOutcome:
    """density_city >= density_firm (up to float32 storage rounding ``tol``) on every firm row.

    Holds exactly when the city's basket is the union of the baskets of the firms assigned to it
    (firm_city), which is how city_import_density is built.
    """
    j = (
        firm_density.select("firm_id", "product", "density_firm")
        .join(firm_city.select("firm_id", "city_code"), on="firm_id", how="left")
        .join(city_density.select("city_code", "product", "density_city"), on=["city_code", "product"], how="left")
    )
    missing = j.filter(pl.col("density_city").is_null())
    bad = j.filter(pl.col("density_firm").cast(pl.Float64) > pl.col("density_city") + tol)
    ok = missing.height == 0 and bad.height == 0
    return CheckOutcome(
        CITY_GE_FIRM[0], ok,
        f"{bad.height} row(s) with density_firm > density_city, {missing.height} without a city density",
        {"rows": j.height, "violations": bad.height, "missing_city_density": missing.height,
         "max_excess": float((j["density_firm"].cast(pl.Float64) - j["density_city"]).max() or 0.0) if j.height else 0.0,
         "sample": _sample(pl.concat([bad, missing]), ["city_code", "product"])},
    )
