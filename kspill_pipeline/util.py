"""Small pure helpers shared by the wiring layers."""

from __future__ import annotations

import polars as pl


def frame_to_markdown(df: pl.DataFrame, max_rows: int = 50, float_fmt: str = "{:,.4g}") -> str:
    """Render a small frame as a GitHub-flavoured Markdown table (no tabulate dependency)."""
    if df.height == 0:
        return "_(no rows)_"
    cols = df.columns
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.head(max_rows).iter_rows():
        cells = []
        for v in row:
            if isinstance(v, float):
                cells.append(float_fmt.format(v))
            elif isinstance(v, list):
                cells.append(", ".join(map(str, v)))
            else:
                cells.append("" if v is None else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    if df.height > max_rows:
        lines.append(f"\n_{df.height - max_rows} more rows_")
    return "\n".join(lines)
