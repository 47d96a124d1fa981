"""Label tables: a CSV (label, <class column>, note) mapping raw labels and codes to a class, plus
a fallback rule for labels not in the table. Shared by trade modes and ownership."""

from __future__ import annotations

import unicodedata
from collections.abc import Callable
from functools import cached_property

import polars as pl

from kspill_pipeline.reference import DATA_DIR


def norm_label(x: str) -> str:
    """NFKC, whitespace collapsed, lower case."""
    return " ".join(unicodedata.normalize("NFKC", x).split()).lower()


class LabelTable:
    """``classify_one(label)``: exact (normalised) table match, then ``fallback(normalised, index)``;
    null -> ``default``. ``classify(series)`` runs Python only over the unique labels."""

    def __init__(self, csv_name: str, class_column: str, classes: tuple[str, ...],
                 fallback: Callable[[str, dict[str, str]], str], default: str = "other"):
        self.csv_name, self.class_column, self.classes = csv_name, class_column, classes
        self.fallback, self.default = fallback, default

    @cached_property
    def table(self) -> pl.DataFrame:
        return pl.read_csv(DATA_DIR / self.csv_name, schema_overrides={"label": pl.String})

    @cached_property
    def index(self) -> dict[str, str]:
        t = self.table
        out = {norm_label(k): v for k, v in zip(t["label"], t[self.class_column])}
        bad = set(out.values()) - set(self.classes)
        if bad:
            raise ValueError(f"{self.csv_name}: unknown classes {bad}")
        return out

    def classify_one(self, label: str | None) -> str:
        if label is None:
            return self.default
        n = norm_label(label)
        idx = self.index
        if n in idx:
            return idx[n]
        return self.fallback(n, idx)

    def classify(self, labels: pl.Series) -> pl.Series:
        s = labels.cast(pl.String)
        mapping = {u: self.classify_one(u) for u in s.unique().drop_nulls().to_list()}
        return s.replace_strict(mapping, default=self.default, return_dtype=pl.String)
