"""Study modules: panel building and model specifications per paper (pure: polars, numpy, scipy).

One module per study (``s000.py``, ...). Like ``compute/``, nothing here imports Dagster: the
asset layer reads the stored inputs, calls these functions and writes their outputs
(ARCHITECTURE.md, "Layers"). Every formula cites its spec section and equation.
"""
