"""The yearly partitions definition shared by every yearly asset.

Dagster 1.13 has no yearly class: a time window with cron ``0 0 1 1 *`` and format ``%Y``.
The year range comes from the data source configuration (``<data>/source.yaml``), never from
constants in asset code. ``end`` of the Dagster definition is exclusive, so ``end + 1``.
"""

from __future__ import annotations

from dagster import TimeWindowPartitionsDefinition

from kspill_pipeline.config import YearRange


def years_partitions(years: YearRange) -> TimeWindowPartitionsDefinition:
    return TimeWindowPartitionsDefinition(
        cron_schedule="0 0 1 1 *",
        fmt="%Y",
        start=str(years.start),
        end=str(years.end + 1),
        timezone="UTC",
    )
