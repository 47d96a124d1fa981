"""Glue between trade_clean samples and the relatedness kernels (pure: polars, numpy).

Each function turns long polars frames into the matrices of ``compute.relatedness`` /
``compute.complexity`` and back into the long tables described by the data contracts
(product_relatedness, city_export_rca, city_export_density, city_complexity,
city_import_density, firm_import_density).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import scipy.sparse as sp

from kspill_pipeline.compute import relatedness as rel
from kspill_pipeline.compute.samples import unit_product_values
from kspill_pipeline.config import RelatednessConfig


def _preset_strict(preset: str) -> bool:
    from kspill_pipeline.compute.complexity import PRESETS

    return bool(PRESETS[preset].rca_strict)


def export_presence(sample: pl.LazyFrame, year: int, cfg: RelatednessConfig) -> rel.Presence:
    """Presence matrix of the phi basis: firm exports (value > 0, S000 eq. 1) or city RCA."""
    unit = "firm_id" if cfg.phi_basis == "firm" else "city_code"
    vals = (
        unit_product_values(sample.filter(pl.col("year") == year), unit=unit, level=cfg.product_level, flow="export")
        .filter(pl.col("value") > 0)
        .collect()
    )
    if vals.height == 0:
        raise ValueError(f"year {year}: no exports in the study sample '{cfg.sample}'")
    if cfg.phi_basis == "firm":
        return rel.presence(vals, unit, "product", "value", how="value", threshold=0.0, strict=True)
    return rel.presence(vals, unit, "product", "value", how="rca", threshold=cfg.rca_threshold,
                        strict=_preset_strict(cfg.city_preset))


def relatedness_long(sample: pl.LazyFrame, year: int, cfg: RelatednessConfig) -> pl.DataFrame:
    """product_relatedness rows for one year: pairs with C_12 > 0 plus the diagonal (all pairs for
    the correlation variant)."""
    P = export_presence(sample, year, cfg)
    C = rel.cooccurrence(P.M)
    u = np.diag(C).copy()
    keep = u > 0
    C = C[np.ix_(keep, keep)]
    u = u[keep]
    products = np.asarray(P.products)[keep]
    if cfg.phi_variant == "correlation":
        levels = P.rca if getattr(P, "rca", None) is not None else P.M
        levels = levels[:, keep] if hasattr(levels, "shape") else levels
        phi = rel.proximity(None, variant="correlation", diagonal=cfg.phi_diagonal, M=levels)
        ii, jj = np.indices(phi.shape)
        ii, jj = ii.ravel(), jj.ravel()
    else:
        phi = rel.proximity(C, variant=cfg.phi_variant, diagonal=cfg.phi_diagonal)
        mask = C > 0
        np.fill_diagonal(mask, True)
        ii, jj = np.nonzero(mask)
    return pl.DataFrame(
        {
            "year": np.full(ii.size, year, dtype=np.int32),
            "product_level": cfg.product_level,
            "basis": cfg.phi_basis,
            "variant": cfg.phi_variant,
            "product_1": pl.Series(products[ii], dtype=pl.String),
            "product_2": pl.Series(products[jj], dtype=pl.String),
            "phi": phi[ii, jj].astype(np.float64),
            "c_12": np.rint(C[ii, jj]).astype(np.int64),
            "u_1": np.rint(u[ii]).astype(np.int64),
            "u_2": np.rint(u[jj]).astype(np.int64),
            "n_units": np.full(ii.size, P.M.shape[0], dtype=np.int64),
        }
    )


def phi_from_long(df: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Dense phi and the product order (sorted codes) from a product_relatedness partition."""
    if df.height == 0:
        raise ValueError("product_relatedness partition is empty")
    products = np.asarray(df.filter(pl.col("product_1") == pl.col("product_2"))["product_1"].sort().to_list(), dtype=object)
    index = {p: i for i, p in enumerate(products)}
    i = df["product_1"].replace_strict(index, return_dtype=pl.Int64).to_numpy()
    j = df["product_2"].replace_strict(index, return_dtype=pl.Int64).to_numpy()
    phi = np.zeros((len(products), len(products)), dtype=np.float64)
    phi[i, j] = df["phi"].to_numpy()
    return phi, products


def import_baskets(sample: pl.LazyFrame, cfg: RelatednessConfig, products: np.ndarray) -> pl.DataFrame:
    """Binary firm import baskets (unit = firm_id, product) restricted to the year's product space.

    Imports of products outside the product space (never exported in the phi sample) have no phi
    and are left out of both numerator and denominator (documented in the README).
    """
    vals = unit_product_values(sample, unit="firm_id", level=cfg.product_level, flow="import")
    space = pl.DataFrame({"product": pl.Series(list(products), dtype=pl.String)})
    return (
        vals.filter(pl.col("value") > 0)
        .select(pl.col("firm_id").alias("unit"), "product")
        .unique()
        .collect()
        .join(space, on="product", how="semi")
        .sort("unit", "product")
    )


def basket_density_long(
    baskets: pl.DataFrame, units, phi: np.ndarray, products: np.ndarray, *, include_self: bool,
    value_name: str, keep_presence: bool = False,
) -> pl.DataFrame:
    """Density of every unit's basket around every product (full unit x product grid, long)."""
    units = np.asarray(list(units), dtype=object)
    bk = baskets.with_columns(pl.lit(1.0).alias("x"))
    X, u_order, _ = rel.to_matrix(bk, "unit", "product", "x", products=list(products), units=list(units))
    X = X.copy()
    X.data[:] = 1.0
    D = rel.density(X, phi, include_self=include_self)
    n_u, n_p = D.shape
    out = {
        "unit": pl.Series(np.repeat(np.asarray(u_order, dtype=object), n_p), dtype=pl.String),
        "product": pl.Series(np.tile(np.asarray(products, dtype=object), n_u), dtype=pl.String),
        value_name: D.ravel(),
    }
    if keep_presence:
        out["M"] = np.asarray(X.toarray(), dtype=np.int8).ravel()
    return pl.DataFrame(out)


def city_rca_long(sample: pl.LazyFrame, year: int, cfg: RelatednessConfig) -> pl.DataFrame:
    """City x product exports, RCA and M (cells with positive exports)."""
    vals = (
        unit_product_values(sample.filter(pl.col("year") == year), unit="city_code", level=cfg.product_level,
                            flow="export")
        .filter(pl.col("value") > 0)
        .collect()
    )
    P = rel.presence(vals, "city_code", "product", "value", how="rca", threshold=cfg.rca_threshold,
                     strict=_preset_strict(cfg.city_preset))
    Xc = sp.coo_array(P.values)
    R = P.rca.toarray() if sp.issparse(P.rca) else np.asarray(P.rca)
    M = P.M.toarray() if sp.issparse(P.M) else np.asarray(P.M)
    rows, cols = Xc.row, Xc.col
    return pl.DataFrame(
        {
            "year": np.full(rows.size, year, dtype=np.int32),
            "city_code": pl.Series(np.asarray(P.units, dtype=object)[rows], dtype=pl.String),
            "product": pl.Series(np.asarray(P.products, dtype=object)[cols], dtype=pl.String),
            "export_value": Xc.data.astype(np.float64),
            "rca": R[rows, cols].astype(np.float64),
            "M": M[rows, cols].astype(np.int8),
        }
    ).sort("city_code", "product")


def city_complexity_long(city_rca: pl.DataFrame, cfg: RelatednessConfig) -> pl.DataFrame:
    """ECI/PCI, density, COI/COG of cities with the configured preset (compute.complexity)."""
    from kspill_pipeline.compute.complexity import ecomplexity

    comp, _ = ecomplexity(
        city_rca.select("year", "city_code", "product", "export_value"),
        "year", "city_code", "product", "export_value", preset=cfg.city_preset, rca_threshold=cfg.rca_threshold,
    )
    return comp.rename({"time": "year", "location": "city_code", "value": "export_value"})


def firm_density_partition(
    baskets: pl.DataFrame, phi: np.ndarray, products: np.ndarray, year: int, store_root: Path | str, *,
    client, cfg: RelatednessConfig,
) -> dict:
    """density_firm of one year, chunked by firm bucket (compute.firm_density), published into the
    store partition ``firm_import_density/year=YYYY`` through the manifest protocol."""
    from kspill_pipeline.compute.firm_density import firm_density_to_parquet
    from kspill_pipeline.io.store import partition_dir

    res = firm_density_to_parquet(
        baskets.rename({"unit": "firm_id"}).lazy(), phi, products,
        partition_dir(store_root, "firm_import_density", year),
        threshold=cfg.density_firm_threshold, include_self=cfg.density_include_self, n_buckets=cfg.n_buckets,
        client=client, dtype=np.float32, extra_columns={"year": pl.Series([year], dtype=pl.Int32)},
        unit="firm_id", product="product", out_names=("firm_id", "product", "density_firm"),
        manifest_metadata={"asset": "firm_import_density", "year": year, "config": cfg.model_dump(mode="json")},
    )
    return {"units": res.n_units, "cells": res.cells_computed, "share_kept": res.share_kept,
            "parts": len(res.files), "rows": res.rows_written, "seconds_compute": res.seconds_compute}
