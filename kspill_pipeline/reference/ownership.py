"""Enterprise type (企业类型/企业性质) -> ownership_class {soe, collective, private, foreign, other}.

Table ``data/ownership.csv`` maps Chinese and English labels and the numeric codes. The numeric
coding 1 国有, 2 中外合作, 3 中外合资, 4 外商独资, 5 集体, 6 私营, 7 个体工商户, 8 报关 (customs
brokers -> other), 9 其他 is the one commonly used with the customs micro data: **[EXT]** assumption
to verify against your data's codebook.

Substring rules for labels not in the table (in this order): 外资/外商/中外/合资/合作/独资/foreign ->
foreign; 国有/国营/state -> soe; 集体/collective -> collective; 私营/民营/个体/private -> private;
anything else (and null) -> other.
"""

from __future__ import annotations

import polars as pl

from kspill_pipeline.reference.labels import LabelTable, norm_label

OWNERSHIP_CLASSES = ("soe", "collective", "private", "foreign", "other")

_RULES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("外资", "外商", "中外", "合资", "合作", "独资", "foreign"), "foreign"),
    (("国有", "国营", "state"), "soe"),
    (("集体", "collective"), "collective"),
    (("私营", "民营", "个体", "private"), "private"),
)


def _fallback(n: str, idx: dict[str, str]) -> str:
    if n.isdigit():
        return idx.get(n.lstrip("0") or "0", "other")
    for words, cls in _RULES:
        if any(w in n for w in words):
            return cls
    return "other"


TABLE = LabelTable("ownership.csv", "ownership_class", OWNERSHIP_CLASSES, _fallback)
_norm = norm_label


def ownership_table() -> pl.DataFrame:
    return TABLE.table


def classify_one(label: str | None) -> str:
    return TABLE.classify_one(label)


def classify_ownership(labels: pl.Series) -> pl.Series:
    """Vectorised classification (Python only over unique labels); null -> other."""
    return TABLE.classify(labels)
