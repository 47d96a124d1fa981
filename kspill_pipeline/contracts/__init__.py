"""Data contracts: YAML loader, polars-native checks, great_expectations suite (pure, no Dagster)."""

from kspill_pipeline.contracts.loader import (
    Column,
    Contract,
    ForeignKey,
    Range,
    all_contracts,
    contracts_dir,
    is_sensitive_column,
    load_contract,
    load_contract_file,
    normalise_header,
    parse_contract,
    parse_type,
)

__all__ = [
    "Column",
    "Contract",
    "ForeignKey",
    "Range",
    "all_contracts",
    "contracts_dir",
    "is_sensitive_column",
    "load_contract",
    "load_contract_file",
    "normalise_header",
    "parse_contract",
    "parse_type",
]
