"""Trade modes (贸易方式) -> trade_mode_class {ordinary, processing, other}.

Table ``data/trade_modes.csv`` (label, trade_mode_class, note) maps Chinese and English labels, the
2-digit customs statistical codes (10 一般贸易 ordinary; 14 来料加工装配贸易, 15 进料加工贸易
processing) and a few 4-digit supervision codes **[EXT]**. Documented choice: 出料加工贸易 and the
processing-equipment regime 来料加工装配进口的设备 are ``processing`` (they belong to the processing
trade regime; S000 drops all 加工贸易). 出口加工区进口设备 is ``other``.

Rules for labels not in the table (applied in this order to the NFKC-normalised, trimmed label):
contains 加工 or "processing" -> processing; contains 一般贸易 or is "ordinary"/"general" -> ordinary;
a numeric code is matched with leading zeros stripped (``010`` == ``10``); anything else (and null)
-> other.
"""

from __future__ import annotations

import polars as pl

from kspill_pipeline.reference.labels import LabelTable, norm_label

TRADE_MODE_CLASSES = ("ordinary", "processing", "other")


def _fallback(n: str, idx: dict[str, str]) -> str:
    if n.isdigit():
        stripped = n.lstrip("0") or "0"
        for cand in (stripped, stripped.zfill(2), stripped.zfill(4)):
            if cand in idx:
                return idx[cand]
        return "other"
    if "加工" in n or "processing" in n:
        return "processing"
    if "一般贸易" in n or n in ("ordinary", "general"):
        return "ordinary"
    return "other"


TABLE = LabelTable("trade_modes.csv", "trade_mode_class", TRADE_MODE_CLASSES, _fallback)
_norm = norm_label


def trade_mode_table() -> pl.DataFrame:
    return TABLE.table


def classify_one(label: str | None) -> str:
    return TABLE.classify_one(label)


def classify_trade_mode(labels: pl.Series) -> pl.Series:
    """Vectorised classification (Python only over unique labels); null -> other."""
    return TABLE.classify(labels)
