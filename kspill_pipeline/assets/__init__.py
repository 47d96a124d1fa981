"""Dagster assets: thin wiring around the pure modules in compute/, reference/ and io/."""
