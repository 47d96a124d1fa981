"""Pure computations of kspill (polars/numpy; never import Dagster here).

One module per topic; every formula cites its spec section in the docstring.
"""
