"""Dagster IO manager for polars frames over the hive parquet store (thin wiring on io.store).

* Output: a polars DataFrame (or LazyFrame, collected) is conformed to the asset's data contract
  (column order, dtypes, nullability) and written atomically to its partition file.
* Input: always ONE ``pl.LazyFrame`` over every mapped upstream partition (no dict-vs-frame
  trap for window mappings: a single year and several years come back the same way).
"""

from __future__ import annotations

import polars as pl
from dagster import ConfigurableIOManager, InputContext, MetadataValue, OutputContext, TableColumn, TableSchema

from kspill_pipeline.contracts.loader import load_contract
from kspill_pipeline.io import store


def _asset_name(context) -> str:
    return context.asset_key.path[-1]


def _partition_years(context) -> list[int] | None:
    if not context.has_asset_partitions:
        return None
    return [int(k) for k in context.asset_partition_keys]


class ParquetStoreIOManager(ConfigurableIOManager):
    """Hive-layout parquet store ``<base_dir>/<asset>/year=YYYY/part-0.parquet``."""

    base_dir: str

    def handle_output(self, context: OutputContext, obj) -> None:
        if obj is None:
            return
        if isinstance(obj, pl.LazyFrame):
            obj = obj.collect()
        name = _asset_name(context)
        contract = load_contract(name)
        df = contract.conform(obj)
        years = _partition_years(context)
        if years is not None and len(years) != 1:
            raise ValueError(f"asset {name}: one partition per output expected, got {years}")
        year = years[0] if years else None
        path = store.write_frame(df, self.base_dir, name, year, schema=contract.arrow_schema())
        context.add_output_metadata(
            {
                "dagster/row_count": df.height,
                "path": MetadataValue.path(str(path)),
                "dagster/column_schema": TableSchema(
                    columns=[TableColumn(name=c, type=str(t)) for c, t in df.schema.items()]
                ),
            }
        )

    def load_input(self, context: InputContext) -> pl.LazyFrame:
        upstream = context.upstream_output
        name = context.asset_key.path[-1] if context.has_asset_key else upstream.name
        years = _partition_years(context)
        allow_missing = bool((context.definition_metadata or {}).get("allow_missing_partitions", False))
        return store.scan(self.base_dir, name, years, missing_ok=allow_missing)
