"""Deterministic synthetic China-customs universe: the embedded default data of kspill.

``generate(out, scale="demo", seed=1)`` writes a data directory the pipeline reads like real
customs data (``source.yaml``, ``customs/<year>/...``, ``companion/sigma_hs3.csv``) plus a sidecar
``_truth/`` that only tests read. Same (scale, seed, years, n_firms) -> byte-identical files.
Pure numpy/polars/pandas/pyarrow; never imports Dagster.

Design (every number is also written to ``_truth/planted.json``):

* **Products**: real HS2007 HS6 codes (chapters 01-97) that round-trip exactly under the pipeline's
  default concordance (single_target = largest chained Growth Lab weight, atlas-common-data 1.1.1):
  for each raw vintage (HS1996 2000-01, HS2002 2002-06, HS2007 2007-11, HS2012 2012-16) a source
  code whose largest chained weight (> 0.5, so no tie rule matters; step-wise argmax agrees) goes to
  the HS2007 code is written in that vintage's years. ~8% of codes are renamed in some vintage.
  HS8 = raw HS6 + "00" or one of "10"/"90". Chapters map to 14 clusters (food, textiles,
  electronics, machinery, ...); tiny uses 6, demo 12, full all 14.
* **Cities**: real prefecture-level cities (cpca 0.5.5 adcodes, municipalities as xx0100), large
  exporters first, firm counts Zipf (rank^-1). Region code = first 4 adcode digits + a digit.
* **Firms**: 10-digit ids (city4 + customs enterprise-type code + serial), realistic Chinese names;
  ~17% trade intermediaries (names with S000 keywords, some with union-only ones too, so the S000
  and union lists flag the same firms); ~1.5% manufacturers named after 出口加工区 (keyword false
  positives); ~20% processing traders; ~3% multi-plant firms (export rows in 2-3 cities).
* **S000 mechanism** (t > first year): phi_{t-1} from the clean sample of t-1; densities from the
  clean import baskets of t; candidates density_firm > 0.05; export status by a planted probit.
  See ``_simulate.py`` and planted.json ``s000_mechanism``.
* **CES**: ln q = a_h + delta_{d,t} - sigma_h ln p + (sigma_h - 1) ln_lambda + noise.
* **Dirt**: ~0.7% extra rows (at least 5 a year in small years), each breaking exactly one rule.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from kspill_pipeline.synthetic import _reference as ref
from kspill_pipeline.synthetic import _simulate as sim
from kspill_pipeline.synthetic import _writers as wr
from kspill_pipeline.synthetic._universe import (
    CLUSTERS,
    ENTRY,
    GENERATOR_VERSION,
    OWNERSHIP_CLASSES,
    OWNERSHIP_LABELS,
    SCALES,
    TRADE_MODES,
    Scale,
    build_universe,
    keyword_hits,
    universe_summary,
)

__all__ = ["generate", "SCALES", "GENERATOR_VERSION"]

DEFAULT_YEARS = (2000, 2016)

EXPORT_STATUS_SCHEMA = pa.schema([
    ("year", pa.int32()), ("firm_id", pa.string()), ("hs4", pa.string()), ("hs2", pa.string()),
    ("city_code", pa.string()), ("exported", pa.int8()), ("candidate", pa.bool_()),
    ("density_firm", pa.float64()), ("density_city", pa.float64()), ("latent", pa.float64()),
])
QUALITY_SCHEMA = pa.schema([
    ("year", pa.int32()), ("firm_id", pa.string()), ("hs6", pa.string()), ("hs6_raw", pa.string()),
    ("hs8_raw", pa.string()), ("partner_iso3", pa.string()), ("trade_mode", pa.string()),
    ("trade_mode_class", pa.string()), ("ln_lambda", pa.float64()), ("price", pa.float64()),
    ("quantity", pa.float64()), ("value_usd", pa.float64()), ("sigma", pa.float64()),
    ("city_code", pa.string()), ("keyword_flag", pa.bool_()),
])


def _prepare_out(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    marker = out / "source.yaml"
    ours = False
    if marker.is_file():
        try:
            ours = "generator" in (yaml.safe_load(marker.read_text(encoding="utf-8")) or {})
        except yaml.YAMLError:
            ours = False
    for sub in ("customs", "companion", "_truth"):
        d = out / sub
        if d.exists() and any(d.iterdir()):
            if not ours:
                raise FileExistsError(f"{d} exists and {out} is not a synthetic universe; refusing to overwrite")
            shutil.rmtree(d)


def generate(
    out: Path | str,
    scale: str = "demo",
    seed: int = 1,
    *,
    years: tuple[int, int] | None = None,
    n_firms: int | None = None,
) -> Path:
    """Write the synthetic universe to ``out`` and return ``out``.

    ``scale`` is one of ``tiny``, ``demo``, ``full``. ``years`` (inclusive, default 2000-2016) and
    ``n_firms`` (firm pool) override the scale, e.g. one year of ``full`` with fewer firms in a test.
    Memory is bounded by one year of rows: each year is simulated, written and released before the
    next (only the firm x HS4 clean export matrix of t-1 is carried over).
    """
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; expected one of {sorted(SCALES)}")
    sc: Scale = SCALES[scale]
    if n_firms is not None:
        from dataclasses import replace

        sc = replace(sc, n_firms=int(n_firms))
    y0, y1 = years if years is not None else DEFAULT_YEARS
    if not (1996 <= y0 <= y1 <= 2016):
        raise ValueError(f"years must lie within 1996-2016, got {(y0, y1)}")
    out = Path(out)
    _prepare_out(out)
    t0 = time.perf_counter()
    u = build_universe(sc, int(seed), (y0, y1))
    truth = out / "_truth"
    truth.mkdir(parents=True, exist_ok=True)
    comp = out / "companion"
    comp.mkdir(parents=True, exist_ok=True)

    ye, ce = sim.planted_effects(u)
    prev = None
    state = wr.DirtState()
    dirt_records: list[dict] = []
    counts: dict[str, dict] = {}
    year_stats: dict[str, dict] = {}
    es_w = pq.ParquetWriter(truth / "export_status.parquet", EXPORT_STATUS_SCHEMA, compression="zstd")
    q_w = pq.ParquetWriter(truth / "quality.parquet", QUALITY_SCHEMA, compression="zstd")
    firm_id_s = pl.Series(u.firm_id)
    city_of_firm = pl.Series(u.city_code[u.firm_city])
    hs4_s = pl.Series(u.hs4)
    try:
        for t in range(y0, y1 + 1):
            fmt = wr.format_of_year(t)
            res = sim.simulate_year(u, t, prev, monthly=fmt.monthly)
            w = wr.write_year(u, t, res.rows, out, state)
            dirt_records.extend(w["records"])
            counts[str(t)] = w["counts"]
            year_stats[str(t)] = res.stats
            if res.export_status is not None and res.export_status.height:
                es = res.export_status
                f = es["firm"].to_numpy()
                p = es["hs4_idx"].to_numpy()
                tbl = pl.DataFrame({
                    "year": es["year"], "firm_id": firm_id_s[f], "hs4": hs4_s[p],
                    "hs2": hs4_s[p].str.slice(0, 2), "city_code": city_of_firm[f],
                    "exported": es["exported"], "candidate": es["candidate"],
                    "density_firm": es["density_firm"], "density_city": es["density_city"], "latent": es["latent"],
                }).sort("year", "firm_id", "hs4")
                es_w.write_table(tbl.to_arrow().cast(EXPORT_STATUS_SCHEMA))
            q = res.quality
            v = ref.vintage_of_year(t)
            f = q["firm"].to_numpy()
            h = q["h"].to_numpy()
            modes = q["mode"].to_numpy().astype(str)
            raw6 = u.hs6_by_vintage[v][h]
            qt = pl.DataFrame({
                "year": np.full(q.height, t, dtype=np.int32), "firm_id": u.firm_id[f], "hs6": u.hs6[h],
                "hs6_raw": raw6, "hs8_raw": np.char.add(raw6.astype(str), q["suffix"].to_numpy().astype(str)),
                "partner_iso3": u.p_iso3[q["partner"].to_numpy()], "trade_mode": modes,
                "trade_mode_class": np.array([TRADE_MODES[m][2] for m in modes], dtype=str) if len(modes) else modes,
                "ln_lambda": q["ln_lambda"], "price": q["price"], "quantity": q["quantity"],
                "value_usd": q["value_usd"].cast(pl.Float64), "sigma": u.hs6_sigma[h],
                "city_code": u.city_code[u.firm_city[f]], "keyword_flag": u.flagged[f],
            }).sort("firm_id", "hs6", "partner_iso3")
            q_w.write_table(qt.to_arrow().cast(QUALITY_SCHEMA))
            prev = res.clean_exports
            del res, w
    finally:
        es_w.close()
        q_w.close()

    # ---- companion: sigma by HS3 (HS2007)
    pl.DataFrame({"hs3": list(u.sigma_hs3), "sigma": list(u.sigma_hs3.values())}).sort("hs3").write_csv(
        comp / "sigma_hs3.csv"
    )
    # ---- truth tables
    _write_firms(u, truth / "firms.parquet")
    _write_products(u, truth / "products.parquet")
    pl.DataFrame({
        "city_code": u.city_code, "city_name": u.city_name, "province_name": u.city_prov_name,
        "zipf_weight": u.city_weight, "region4": [c[:4] for c in u.city_code],
    }).write_parquet(truth / "cities.parquet")
    dirt_schema = {"year": pl.Int32, "source_file": pl.String, "source_row": pl.Int64, "expected_reason": pl.String,
                   "detail": pl.String, "firm_id": pl.String, "hs_code_raw": pl.String, "value_usd_raw": pl.String}
    pl.DataFrame(dirt_records, schema=dirt_schema).sort("source_file", "source_row").write_parquet(truth / "dirt.parquet")
    (truth / "expected_counts.json").write_text(json.dumps(counts, ensure_ascii=False, indent=1, sort_keys=True),
                                                encoding="utf-8")
    planted = _planted(u, ye, ce, year_stats)
    (truth / "planted.json").write_text(json.dumps(planted, ensure_ascii=False, indent=1, sort_keys=True),
                                        encoding="utf-8")
    src = {
        "name": f"synthetic-{scale}",
        "years": {"start": y0, "end": y1},
        "customs_dir": "customs",
        "companion_dir": "companion",
        "description": (f"Synthetic China-customs universe ({scale}, seed {seed}) generated by "
                        "kspill_pipeline.synthetic; planted truths in _truth/ (read by tests only)."),
        "generator": {"scale": scale, "seed": int(seed), "version": GENERATOR_VERSION,
                      "n_firms": int(sc.n_firms)},
        # export quality (issue 5): the planted sigmas are HS3 codes of HS2007, one table, no country
        # min_obs_per_hs6: the spec's 100 flows per HS6-year would keep a handful of products in the
        # small universes (demo 2004: 27 of 438 HS6); the full universe keeps the spec value
        "quality": {"sigma_file": "companion/sigma_hs3.csv", "sigma_vintage": "HS2007",
                    "min_obs_per_hs6": {"tiny": 3, "demo": 20}.get(scale, 100)},
    }
    (out / "source.yaml").write_text(yaml.safe_dump(src, allow_unicode=True, sort_keys=False), encoding="utf-8")
    # study S004 inputs beyond customs (companion/s004/), same seed as the planted quality shift
    from kspill_pipeline.synthetic.s004_inputs import generate_s004_inputs

    generate_s004_inputs(out, seed)
    _ = time.perf_counter() - t0
    return out


def _write_firms(u, path: Path) -> None:
    n = u.n_firms
    sec_codes, sec_regs = [], []
    for f in range(n):
        cs = [u.city_code[u.firm_city[f]]] + [u.city_code[c] for c in u.firm_sec_city[f] if c >= 0]
        rs = [u.firm_region[f]] + [r for r in u.firm_sec_region[f] if r]
        sec_codes.append(cs)
        sec_regs.append(rs)
    pl.DataFrame({
        "firm_id": u.firm_id, "firm_name": u.firm_name, "address": u.firm_address,
        "city_code": u.city_code[u.firm_city], "city_codes": sec_codes, "region_codes": sec_regs,
        "ownership_class": np.array(OWNERSHIP_CLASSES)[u.own_class], "ownership_label": u.own_label,
        "ownership_code": u.own_code, "is_intermediary": u.is_intermediary,
        "is_false_positive_ezone": u.is_false_positive, "keyword_flag": u.flagged,
        "keywords": [keyword_hits(x) for x in u.firm_name], "is_processing_trader": u.is_processing,
        "is_multiplant": u.is_multiplant, "entry_year": u.entry.astype(np.int32),
        "exit_year": u.exit.astype(np.int32), "cluster": u.home_cluster.astype(np.int32),
        "input_cluster": u.input_cl.astype(np.int32), "quality_firm": u.quality, "cost_firm": u.cost,
    }).write_parquet(path)


def _write_products(u, path: Path) -> None:
    pl.DataFrame({
        "hs6": u.hs6, "hs4": u.hs4[u.hs6_hs4_idx], "cluster": u.hs4_cluster[u.hs6_hs4_idx].astype(np.int32),
        **{f"hs6_{v}": u.hs6_by_vintage[v] for v in ref.RAW_VINTAGES},
        "unit": u.hs6_unit, "sigma": u.hs6_sigma, "a_h": u.hs6_a, "base_log_price": u.hs6_base_lp,
        "n_hs8": u.hs6_n_hs8.astype(np.int32),
    }).write_parquet(path)


def _planted(u, ye: dict, ce: dict, year_stats: dict) -> dict:
    return {
        "generator": {"version": GENERATOR_VERSION, "seed": u.seed, "scale": u.scale.name},
        "universe": universe_summary(u),
        "years": {"start": u.years[0], "end": u.years[1]},
        "hs": {
            "target_vintage": "HS2007",
            "vintage_by_year": {"HS1996": "2000-2001", "HS2002": "2002-2006", "HS2007": "2007-2011",
                                "HS2012": "2012-2016"},
            "rule": ("every HS2007 code c used has, for each raw vintage v, a code c_v whose largest chained "
                     "Growth Lab weight (atlas-common-data 1.1.1; H1->H2->H3, H2->H3, H4->H3) goes to c with weight "
                     "> 0.5 and the step-wise argmax agrees; c_v = c when possible. HS8 = c_v + '00'|'10'|'90'."),
            "chapters_excluded": ["98", "99"],
        },
        "clusters": [{"id": c, "name": CLUSTERS[c]["name"], "chapters": list(CLUSTERS[c]["chapters"]),
                      "input_cluster": u.input_cluster[c]} for c in u.clusters],
        "cities": {"rule": "cpca 0.5.5 prefecture rows xxyy00000000 (yy != 00), placeholders 1390/4190/4290/4690/6590 "
                           "and 5002 excluded, municipalities xx0100; firm share Zipf rank^-1; region code = "
                           "first 4 digits of the adcode + one digit (firm-specific)",
                   "n": len(u.city_code)},
        "firms": {
            "intermediary_share": 0.17, "false_positive_ezone_share": 0.015, "processing_trader_p":
                {"foreign": 0.45, "other": 0.12}, "multiplant_share": 0.03,
            "multiplant_rule": ("export flows of multi-plant firms are split with prob 0.5 into 80% main plant / 20% "
                                "a secondary plant (other city); imports only at the main plant, so the main city "
                                "is the firm's largest-value city under any definition"),
            "entry": {**ENTRY, "rule": "incumbents active from 2000; others enter 2001-2016 with density rising "
                                        "(2001 + floor(16 sqrt(U))); lifetime geometric(exit_hazard); the calendar is "
                                        "2000-2016 whatever years are generated"},
            "ownership_labels": {k: [list(x) for x in v] for k, v in OWNERSHIP_LABELS.items()},
            "ownership_written": {"2000-2001": "customs enterprise-type code 1-9", "2002-2006": "Chinese label",
                                  "2007-2011": "customs enterprise-type code 1-9", "2012-2016": "Chinese label"},
            "keyword_rule": ("intermediary names contain an S000 keyword (贸易, 进出口, 出口, 进口, 外贸, 商贸, 边贸, 物流); "
                             "some also union-only ones (经贸, 工贸, 科贸, 外经). Manufacturers never contain a union "
                             "keyword except the 出口加工区 false positives, so S000 list == union list on this data."),
        },
        "trade_modes": {k: {"code4": v[0], "label": v[1], "class": v[2]} for k, v in TRADE_MODES.items()},
        "partners": [{"iso3": p[0], "iso2": p[1], "zh": p[2], "weight": p[3]} for p in ref.PARTNERS],
        "unknown_partner_strings": ref.UNKNOWN_PARTNERS,
        "s000_mechanism": {
            **sim.MECHANISM,
            "year_effects": {str(k): v for k, v in ye.items()},
            "hs2_effects": ce,
            "clean_sample": ("rows of firms whose name has no keyword of the S000 list (== union list here), "
                             "trade_mode_class != processing (ordinary and other modes; other-mode rows only occur "
                             "in firm x HS4 x flow cells that also have ordinary rows, so excluding them changes "
                             "no presence), dirt rows excluded, presence = value > 0 at firm x HS4"),
            "phi": "phi_{pq,t-1} = C_pq / max(C_pp, C_qq), C = M'M over clean exporters of t-1; phi_pp = 1; "
                   "products with C_pp = 0 are outside the universe U_{t-1}",
            "density_firm": "sum_{q in U} phi_pq I_fq / sum_{q in U} phi_pq, I_fq = clean imports of f in t",
            "density_city": "same with the union of the clean import baskets of the firms located in the city "
                            "(firm located at its main plant = largest-value city)",
            "candidates": "(f, p) with f a clean importer in t, p in U_{t-1}, density_firm > 0.05",
            "draw": "exported = 1{b0 + b1 df + b2 dc + b3 df dc + year_effect_t + hs2_effect + e > 0}, e ~ N(0,1)",
            "non_candidates": (f"each core HS4 of an active firm (1 + Binomial(3, p) products of its home cluster; "
                               f"intermediaries 4+ across clusters) is exported with prob {sim.BASELINE_CORE_EXPORT_P} "
                               "a year; nothing else"),
            "first_year": "no mechanism (baseline only); export_status starts the year after",
            "imports": (f"firms import in a year with prob 0.35-0.7 (by ownership / intermediary); each of their "
                        f"import-pool HS4 (55% input cluster, 35% home cluster, 10% any) with prob "
                        f"{sim.IMPORT_ITEM_P}; processing traders put {sim.PROCESSING_IMPORT_SHARE:.0%} of their "
                        "import pairs in processing modes"),
        },
        "ces": {**sim.CES, "equation": "ln q = a_h + delta_{d,t} - sigma_h ln p + (sigma_h - 1) ln_lambda + e",
                "ln_lambda": "quality_firm + 0.3 * N(f,h) (hash, persistent) + 0.25 * flow noise",
                "ln_p": "base_log_price_h + cost_f + 0.5 ln_lambda + 0.1 noise",
                "sigma_hs3": u.sigma_hs3,
                "sigma_rule": "1.5 + lognormal(ln 3, 0.55) clipped to [2, 12] per HS3 (HS2007)"},
        "formats": wr.format_summary(),
        "dirt": {
            "rate": u.scale.dirt_rate, "min_per_year_small": 5,
            "rule_order": list(wr.REASONS),
            "rules": ("each dirt row is an ADDITIONAL row breaking exactly one rule; keys are made unique by "
                      "changing the partner; exact duplicates: the later copy is the dirt row; conflicting "
                      "duplicates: two new rows sharing a key with different values, both dirt"),
            "garbage_bytes": "0x80 0xFF inserted in the firm name (GBK years only)",
            "bad_quantity": "not injected",
        },
        "year_stats": year_stats,
    }
