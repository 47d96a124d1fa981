"""Configuration of the data source and of the customs cleaning rules.

Pure module (no Dagster import). Every switch has the default documented in the README
section "Cleaning rules". Dagster `Config` classes in ``assets/`` wrap these models.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

REPO_ROOT = Path(__file__).resolve().parent.parent

#: Union of the intermediary keywords used by the specs (S000 8 words, S001 5 words, S004 7 words).
KEYWORD_UNION: tuple[str, ...] = (
    "贸易", "进出口", "出口", "进口", "外贸", "商贸", "边贸", "物流", "经贸", "工贸", "科贸", "外经",
)
#: Study presets of the intermediary keyword list.
KEYWORD_PRESETS: dict[str, tuple[str, ...]] = {
    "union": KEYWORD_UNION,
    "s000": ("贸易", "进出口", "出口", "进口", "外贸", "商贸", "边贸", "物流"),
    "s001": ("进出口", "经贸", "贸易", "科贸", "外经"),
    "s004": ("贸易", "进出口", "外贸", "经贸", "工贸", "科贸", "外经"),
}

HsVintage = Literal["HS1992", "HS1996", "HS2002", "HS2007", "HS2012", "HS2017"]


def default_vintage_by_year() -> dict[int, str]:
    """HS vintage in force in China by year (HS1996 until 2001, HS2002 2002-06, ...)."""
    out: dict[int, str] = {}
    for y in range(1992, 2031):
        if y <= 1995:
            out[y] = "HS1992"
        elif y <= 2001:
            out[y] = "HS1996"
        elif y <= 2006:
            out[y] = "HS2002"
        elif y <= 2011:
            out[y] = "HS2007"
        elif y <= 2016:
            out[y] = "HS2012"
        else:
            out[y] = "HS2017"
    return out


class CleaningConfig(BaseModel):
    """Switches of the customs cleaning rules (issue 2, specs S000 2.3, S001 2.5, S004 2.3)."""

    model_config = ConfigDict(extra="forbid")

    intermediary_keywords: list[str] = Field(
        default_factory=lambda: list(KEYWORD_UNION),
        description="Active keyword list for is_intermediary (substring match on the NFKC firm name).",
    )
    hs_target_vintage: HsVintage = "HS2007"
    hs_mode: Literal["single_target", "value_split"] = "single_target"
    hs_vintage_by_year: dict[int, HsVintage] = Field(default_factory=default_vintage_by_year)
    flow_codes: dict[str, Literal["export", "import"]] = Field(
        default_factory=lambda: {"0": "export", "1": "import"},
        description="Meaning of numeric flow codes in post-2007 files. [EXT] verify against your data's codebook.",
    )
    duplicate_policy: Literal["quarantine_conflicts", "sum"] = "quarantine_conflicts"
    address_fallback: bool = True
    ownership_rule: Literal["largest_value", "per_row"] = "largest_value"

    @field_validator("intermediary_keywords")
    @classmethod
    def _non_empty_keywords(cls, v: list[str]) -> list[str]:
        if any(not k.strip() for k in v):
            raise ValueError("intermediary_keywords: empty keyword")
        return v

    @model_validator(mode="after")
    def _keywords_in_union(self) -> "CleaningConfig":
        extra = [k for k in self.intermediary_keywords if k not in KEYWORD_UNION]
        if extra:
            raise ValueError(
                f"intermediary_keywords: {extra} not in the union list {list(KEYWORD_UNION)}; "
                "add new keywords to KEYWORD_UNION so trade_clean records them"
            )
        return self


class YearRange(BaseModel):
    model_config = ConfigDict(extra="forbid")
    start: int
    end: int  # inclusive

    @model_validator(mode="after")
    def _ordered(self) -> "YearRange":
        if self.end < self.start:
            raise ValueError(f"years: end {self.end} < start {self.start}")
        return self

    def years(self) -> list[int]:
        return list(range(self.start, self.end + 1))


class SourceConfig(BaseModel):
    """Description of a customs data directory (``<data>/source.yaml``)."""

    model_config = ConfigDict(extra="allow")
    name: str = "customs"
    years: YearRange
    customs_dir: str = "customs"
    companion_dir: str = "companion"
    description: str = ""


DEFAULT_YEARS = YearRange(start=2000, end=2016)


def default_data_dir() -> Path:
    return Path(os.environ.get("KSPILL_DATA_DIR", REPO_ROOT / ".kspill" / "data" / "demo")).resolve()


def default_store_dir() -> Path:
    return Path(os.environ.get("KSPILL_STORE_DIR", REPO_ROOT / ".kspill" / "store")).resolve()


def load_source_config(data_dir: Path | str | None = None) -> SourceConfig:
    """Read ``source.yaml`` of a data directory; without one, years come from the file names."""
    d = Path(data_dir) if data_dir is not None else default_data_dir()
    f = d / "source.yaml"
    if f.is_file():
        raw = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        return SourceConfig.model_validate(raw)
    from kspill_pipeline.io.raw import discover_files  # local import: pure module

    years = sorted(discover_files(d).keys()) if d.is_dir() else []
    if years:
        return SourceConfig(years=YearRange(start=years[0], end=years[-1]), customs_dir=".")
    return SourceConfig(years=DEFAULT_YEARS)


class RelatednessConfig(BaseModel):
    """Switches of the relatedness assets (issue 3; spec S000 section 7 where it applies)."""

    model_config = ConfigDict(extra="forbid")

    sample: Literal["s000", "s001", "s004", "all"] = "s000"
    processing_drop_level: Literal["transaction", "firm"] = "transaction"
    product_level: Literal["hs2", "hs4", "hs6"] = "hs4"
    phi_basis: Literal["firm", "city"] = "firm"
    phi_variant: Literal["min_conditional", "asymmetric", "correlation"] = "min_conditional"
    phi_diagonal: Literal["one", "zero", "raw"] = "one"
    city_preset: Literal["stata", "py-ecomplexity", "r-economiccomplexity"] = "stata"
    rca_threshold: float = Field(1.0, gt=0)
    density_include_self: bool = True
    density_firm_threshold: float = Field(0.05, ge=0, lt=1)
    n_buckets: int = Field(16, ge=1, le=4096)
