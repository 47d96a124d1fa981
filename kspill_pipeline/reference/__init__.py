"""Reference tables of kspill: HS concordance, Chinese prefectures, partner countries, trade modes
and ownership classes.

Pure modules (polars only; no Dagster). Every table is read once per process (``functools.lru_cache``).
Submodules are imported lazily by callers: ``from kspill_pipeline.reference import hs`` etc.
"""

from __future__ import annotations

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"

__all__ = ["DATA_DIR"]
