"""IO: raw customs readers (this package's ``raw`` module; pure, no Dagster).

The parquet IO manager lives beside them in the Dagster layer.
"""

from kspill_pipeline.io.raw import (
    RawFrame,
    count_rows,
    customs_root,
    detect_encoding,
    discover_files,
    read_customs_file,
    read_year,
    year_of_path,
)

__all__ = [
    "RawFrame",
    "count_rows",
    "customs_root",
    "detect_encoding",
    "discover_files",
    "read_customs_file",
    "read_year",
    "year_of_path",
]
