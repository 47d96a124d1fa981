"""Study S000 Figures 1-5 (Liu & Zhu 2021, spec S000 section 5.3) as Dagster assets.

Thin wiring around ``studies.s000_figures``: five unpartitioned assets ``s000_figure1`` ..
``s000_figure5`` (group ``s000``) read every partition of ``s000_panel`` (and, for Fig. 4,
``ref_prefecture``), refuse to run when any panel or trade_clean year failed (or never ran) its
blocking checks (``require_gates``, as the regression tables), and output the figure DATA (tidy
frame, contract ``data_contracts/s000_figureN.yaml``, stored by the IO manager at
``<store>/s000_figureN/part-0.parquet``). The PNG rendered from that data is written atomically to
``<store>/s000_figureN/figure.png`` and embedded in the materialisation metadata (``figure``, a
Markdown image with a base64 data URI, shown in the Dagster UI), with ``figure_path``, a caption
and the year(s) drawn. When a contract check of the figure data fails, no PNG is drawn (a stale
one is removed) and the failing blocking check is reported.

Run config (all optional; ``S000FigureConfig``): ``year`` for Figs. 1, 2 and 4 (default: the latest
panel year), ``fig3_years`` (default the paper's 2009 and 2016, with the fallback of
``studies.s000_figures.resolve_fig3_years``) and ``bw_rule`` (``silverman`` or ``scott``) for Fig. 1.
"""

import base64
import hashlib
from pathlib import Path
from typing import Callable, Iterator, Optional

import polars as pl
from dagster import AssetExecutionContext, AssetIn, Config, MetadataValue, Output, asset

from kspill_pipeline.assets.contract_checks import contract_check_specs, evaluate_contract, require_gates
from kspill_pipeline.contracts.loader import load_contract
from kspill_pipeline.io.store import write_file_atomic
from kspill_pipeline.resources import KspillPaths

GROUP = "s000"
PNG_NAME = "figure.png"


class S000FigureConfig(Config):
    """Choices of the S000 figures (spec S000 section 5.3); defaults reproduce the paper's layout."""

    year: Optional[int] = None  # Figs. 1, 2, 4; None = latest panel year (paper: 2016)
    fig3_years: list[int] = [2009, 2016]  # Fig. 3; fallback: middle and last year with exporters
    bw_rule: str = "silverman"  # Fig. 1 kernel bandwidth rule: silverman | scott


def _desc(name: str) -> str:
    return " ".join(load_contract(name).description.split())


def png_path(store_root: Path | str, asset_name: str) -> Path:
    return Path(store_root) / asset_name / PNG_NAME



def _emit(name: str, number: int, df: pl.DataFrame, render: Callable[[pl.DataFrame], bytes], paths: KspillPaths,
          caption: str, meta: dict) -> Iterator:
    """Conform, check, draw (only when every contract check passed), then yield Output + checks."""
    df = load_contract(name).conform(df)
    results = evaluate_contract(name, df, ge=False)
    failed = sorted(r.check_name for r in results if not r.passed)
    target = png_path(paths.store, name)
    md = {"caption": caption, "rows": df.height, **meta}
    if failed:
        target.unlink(missing_ok=True)
        md["figure"] = MetadataValue.md(f"_Figure {number} not drawn: failed check(s) {', '.join(failed)}._")
    else:
        png = render(df)
        write_file_atomic(target, png)
        b64 = base64.b64encode(png).decode("ascii")
        md["figure"] = MetadataValue.md(f"**Figure {number}.** {caption}\n\n![Figure {number}](data:image/png;base64,{b64})")
        md["figure_path"] = MetadataValue.path(str(target))
        md["png_sha256"] = hashlib.sha256(png).hexdigest()
    yield Output(df, metadata=md)
    yield from results


def build_s000_figure_assets(years_def) -> list:
    """The five figure assets; ``years_def`` is the yearly partitions definition of ``s000_panel``
    (the figure assets themselves are unpartitioned and read all of its partitions)."""
    from kspill_pipeline.studies import s000_figures as fig

    panel_in = {"s000_panel": AssetIn()}

    def _panel_years(context) -> list[int]:
        keys = context.asset_partition_keys_for_input("s000_panel")
        return sorted(int(k) for k in keys)

    def _gate(context, paths: KspillPaths) -> list[int]:
        years = _panel_years(context)
        require_gates(paths.store, [("s000_panel", years), ("trade_clean", years)])
        return years

    def _spec(n: int) -> dict:
        name = f"s000_figure{n}"
        return dict(name=name, group_name=GROUP, description=_desc(name), kinds={"matplotlib", "parquet"},
                    ins=panel_in, check_specs=contract_check_specs(name, ge=False))

    @asset(**_spec(1))
    def s000_figure1(context: AssetExecutionContext, config: S000FigureConfig, s000_panel: pl.LazyFrame,
                     paths: KspillPaths):
        """Fig. 1: kernel densities of both densities by export status (one year)."""
        _gate(context, paths)
        df = fig.figure1_data(s000_panel, config.year, bw_rule=config.bw_rule)
        year = int(df["year"][0])
        groups = (df.group_by("variable", "export").agg(pl.first("n"), pl.first("bandwidth"))
                  .sort("variable", "export").to_dicts())
        caption = (f"Kernel densities of density_firm and density_city by export status, {year} "
                   f"(Gaussian kernel, {config.bw_rule} bandwidth); S000 Fig. 1.")
        yield from _emit("s000_figure1", 1, df, fig.render_figure1, paths, caption, {
            "year": year, "bandwidth_rule": config.bw_rule, "groups": MetadataValue.json(groups)})

    @asset(**_spec(2))
    def s000_figure2(context: AssetExecutionContext, config: S000FigureConfig, s000_panel: pl.LazyFrame,
                     paths: KspillPaths):
        """Fig. 2: box plots of both densities by export status (one year)."""
        _gate(context, paths)
        df = fig.figure2_data(s000_panel, config.year)
        year = int(df["year"][0])
        caption = (f"Box plots of density_firm and density_city by export status, {year} "
                   "(whiskers at 1.5 IQR, outliers not drawn); S000 Fig. 2.")
        yield from _emit("s000_figure2", 2, df, fig.render_figure2, paths, caption, {"year": year})

    @asset(**_spec(3))
    def s000_figure3(context: AssetExecutionContext, config: S000FigureConfig, s000_panel: pl.LazyFrame,
                     paths: KspillPaths):
        """Fig. 3: box plots by macro-region, export == 1, two years (paper: 2009 and 2016)."""
        _gate(context, paths)
        years, rule = fig.figure3_years(s000_panel, config.fig3_years)
        df = fig.figure3_data(s000_panel, years)
        note = "" if rule == "requested" else (
            f" Requested years {config.fig3_years} not all in the panel: middle and last year with exporters.")
        caption = (f"Box plots of density_firm and density_city of exported products by macro-region, "
                   f"{' and '.join(map(str, years))}; S000 Fig. 3.{note}")
        yield from _emit("s000_figure3", 3, df, fig.render_figure3, paths, caption, {
            "years": MetadataValue.json(years), "year_rule": rule,
            "requested_years": MetadataValue.json(list(config.fig3_years))})

    @asset(**{**_spec(4), "ins": {**panel_in, "ref_prefecture": AssetIn()}})
    def s000_figure4(context: AssetExecutionContext, config: S000FigureConfig, s000_panel: pl.LazyFrame,
                     ref_prefecture: pl.LazyFrame, paths: KspillPaths):
        """Fig. 4: city means (export == 1, one year) as a point map of prefecture coordinates."""
        _gate(context, paths)
        df = fig.figure4_data(s000_panel, ref_prefecture, config.year)
        year = int(df["year"][0]) if df.height else (config.year or fig.latest_year(s000_panel))
        missing = fig.cities_without_coordinates(df)
        caption = (f"City means of density_firm and density_city of exported products, {year}: point map of "
                   "prefecture coordinates (cpca), marker area ~ n; not the official standard map "
                   f"GS(2020)4619. {df.height - len(missing)} cities drawn, {len(missing)} without coordinates "
                   "kept in the data but not drawn; S000 Fig. 4.")
        yield from _emit("s000_figure4", 4, df, fig.render_figure4, paths, caption, {
            "year": year, "cities": df.height, "cities_without_coordinates": len(missing),
            "cities_without_coordinates_codes": MetadataValue.json(missing)})

    @asset(**_spec(5))
    def s000_figure5(context: AssetExecutionContext, s000_panel: pl.LazyFrame, paths: KspillPaths):
        """Fig. 5: annual means of both densities, export == 1, every panel year."""
        years = _gate(context, paths)
        df = fig.figure5_data(s000_panel, years)
        drawn = sorted(set(df.filter(pl.col("n") > 0)["year"].to_list()))
        span = f"{drawn[0]}-{drawn[-1]}" if drawn else "no year with exporters"
        caption = (f"Annual means of density_firm and density_city of exported products, {span}; S000 Fig. 5.")
        yield from _emit("s000_figure5", 5, df, fig.render_figure5, paths, caption, {
            "years": MetadataValue.json(years), "years_with_exporters": MetadataValue.json(drawn)})

    return [s000_figure1, s000_figure2, s000_figure3, s000_figure4, s000_figure5]
