"""kspill."""
