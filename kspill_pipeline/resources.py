"""Dagster resources (thin): where the raw data and the store live."""

from __future__ import annotations

from pathlib import Path

from dagster import ConfigurableResource

from kspill_pipeline.config import SourceConfig, load_source_config


class KspillPaths(ConfigurableResource):
    """Data directory (raw customs files + companion tables) and store directory (outputs)."""

    data_dir: str
    store_dir: str

    @property
    def data(self) -> Path:
        return Path(self.data_dir)

    @property
    def store(self) -> Path:
        return Path(self.store_dir)

    def source(self) -> SourceConfig:
        return load_source_config(self.data)
