"""The kspill Dagster code location: one place where Definitions are assembled.

The data directory and store come from ``KSPILL_DATA_DIR`` / ``KSPILL_STORE_DIR`` (defaults:
``.kspill/data/demo`` and ``.kspill/store`` in the repository); the yearly partitions come from
the data source's ``source.yaml``.
"""

from __future__ import annotations

from pathlib import Path

from dagster import AssetSelection, Definitions, define_asset_job, map_asset_specs

from kspill_pipeline.assets.quality import QualitySettings, build_quality_assets
from kspill_pipeline.assets.relatedness import RelatednessSettings, build_relatedness_assets
from kspill_pipeline.assets.s004 import S004Settings, build_s004_assets
from kspill_pipeline.assets.report import build_report_assets
from kspill_pipeline.assets.s000 import S000Settings, build_s000_assets
from kspill_pipeline.assets.s000_figures import build_s000_figure_assets
from kspill_pipeline.assets.trade import build_trade_assets
from kspill_pipeline.automation import add_automation
from kspill_pipeline.dask_resource import DaskResource
from kspill_pipeline.config import default_data_dir, default_store_dir, load_source_config
from kspill_pipeline.io.io_manager import ParquetStoreIOManager
from kspill_pipeline.partitions import years_partitions
from kspill_pipeline.resources import KspillPaths


OWNER = "team:kspill"


def build_definitions(data_dir: Path | str | None = None, store_dir: Path | str | None = None) -> Definitions:
    data = Path(data_dir).resolve() if data_dir else default_data_dir()
    store = Path(store_dir).resolve() if store_dir else default_store_dir()
    source = load_source_config(data)
    years = years_partitions(source.years)
    assets = (build_trade_assets(years) + build_relatedness_assets(years) + build_s000_assets(years)
              + build_s000_figure_assets(years) + build_quality_assets(years)
              + build_s004_assets() + build_report_assets())
    # every asset shows an owner badge in the UI (assets that name none get the project team)
    assets = map_asset_specs(lambda spec: spec if spec.owners else spec.replace_attributes(owners=[OWNER]), assets)
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
    defs = Definitions(
        assets=assets,
        jobs=[yearly_job, relatedness_job],
        resources={
            "io_manager": ParquetStoreIOManager(base_dir=str(store)),
            "paths": KspillPaths(data_dir=str(data), store_dir=str(store)),
            "relatedness": RelatednessSettings(),
            "dask": DaskResource(),
            "s000": S000Settings(),
            "quality": QualitySettings(),
            "s004": S004Settings(),
        },
    )
    # schedules, raw-data sensor, declarative automation (all off until enabled): automation.py
    return add_automation(defs, years_def=years, data_dir=data, store_dir=store)


defs = build_definitions()
