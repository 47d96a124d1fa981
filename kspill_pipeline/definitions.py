"""The kspill Dagster code location: one place where Definitions are assembled.

The data directory and store come from ``KSPILL_DATA_DIR`` / ``KSPILL_STORE_DIR`` (defaults:
``.kspill/data/demo`` and ``.kspill/store`` in the repository); the yearly partitions come from
the data source's ``source.yaml``.
"""

from __future__ import annotations

from pathlib import Path

from dagster import AssetSelection, Definitions, define_asset_job

from kspill_pipeline.assets.relatedness import RelatednessSettings, build_relatedness_assets
from kspill_pipeline.assets.s000 import S000Settings, build_s000_assets
from kspill_pipeline.assets.trade import build_trade_assets
from kspill_pipeline.dask_resource import DaskResource
from kspill_pipeline.config import default_data_dir, default_store_dir, load_source_config
from kspill_pipeline.io.io_manager import ParquetStoreIOManager
from kspill_pipeline.partitions import years_partitions
from kspill_pipeline.resources import KspillPaths


def build_definitions(data_dir: Path | str | None = None, store_dir: Path | str | None = None) -> Definitions:
    data = Path(data_dir).resolve() if data_dir else default_data_dir()
    store = Path(store_dir).resolve() if store_dir else default_store_dir()
    source = load_source_config(data)
    years = years_partitions(source.years)
    assets = build_trade_assets(years) + build_relatedness_assets(years) + build_s000_assets(years)
    yearly_job = define_asset_job(
        "yearly_trade",
        selection=AssetSelection.groups("trade"),
        partitions_def=years,
        description="Clean one year of customs data (trade_clean, trade_quarantine, trade_cleaning_report).",
    )
    relatedness_job = define_asset_job(
        "yearly_relatedness",
        selection=AssetSelection.groups("relatedness"),
        partitions_def=years,
        description="Relatedness, densities and complexity for one year (needs trade_clean of that year).",
    )
    return Definitions(
        assets=assets,
        jobs=[yearly_job, relatedness_job],
        resources={
            "io_manager": ParquetStoreIOManager(base_dir=str(store)),
            "paths": KspillPaths(data_dir=str(data), store_dir=str(store)),
            "relatedness": RelatednessSettings(),
            "dask": DaskResource(),
            "s000": S000Settings(),
        },
    )


defs = build_definitions()
