"""Static part of the synthetic universe: scales, clusters, products, cities, firms.

Everything here is drawn once per (scale, seed) from ``numpy.random.default_rng([seed, stream])``;
the yearly simulation lives in :mod:`kspill_pipeline.synthetic._simulate`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from kspill_pipeline.config import KEYWORD_PRESETS, KEYWORD_UNION
from kspill_pipeline.synthetic import _reference as ref

GENERATOR_VERSION = "1.2.0"  # 1.1: source.yaml quality section; 1.2: S004 inputs + planted vagg effect
CALENDAR = (2000, 2016)
#: Firm entry/exit: incumbents in 2000, the rest enter with density rising over time (sqrt), geometric
#: lifetimes. Active share of the pool rises from ~0.30 (2000) to ~0.69 (2016), mean ~0.41.
ENTRY = {"incumbent_share": 0.3, "exit_hazard": 0.05}


# --------------------------------------------------------------------------- scales


@dataclass(frozen=True)
class Scale:
    name: str
    n_firms: int  # firm pool over all years (~30% active in 2000 rising to ~69% in 2016)
    n_cities: int | None  # None = all prefecture-level cities
    n_clusters: int
    n_hs4: int | None  # None = all usable HS4
    n_hs6: int | None  # None = all usable HS6
    core_extra_p: float = 0.4  # core HS4 pool = 1 + Binomial(3, p)
    dest_lambda: float = 1.4  # destinations per export HS6 = 1 + Poisson(lambda)
    origin_lambda: float = 0.5  # origins per import HS6 = 1 + Poisson(lambda)
    import_pool_lambda: float = 3.0  # import HS4 pool = 2 + Poisson(lambda) (+2 foreign)
    month_p: float = 0.3  # months per flow in monthly years = 1 + Binomial(3, p)
    dirt_rate: float = 0.007
    chunk_firms: int = 20000  # firms per chunk in the density computation


SCALES: dict[str, Scale] = {
    "tiny": Scale("tiny", n_firms=150, n_cities=15, n_clusters=6, n_hs4=25, n_hs6=60, dest_lambda=0.6,
                  origin_lambda=0.3, month_p=0.12),
    "demo": Scale("demo", n_firms=4000, n_cities=120, n_clusters=12, n_hs4=150, n_hs6=600, dest_lambda=3.0,
                  core_extra_p=0.5,
                  origin_lambda=0.8),
    "full": Scale("full", n_firms=370_000, n_cities=None, n_clusters=14, n_hs4=None, n_hs6=None),
}


# --------------------------------------------------------------------------- clusters

#: id, name, HS chapters, industry words for firm names, units (prob), preferred input clusters.
CLUSTERS: tuple[dict, ...] = (
    dict(id=0, name="food_agri", chapters=range(1, 25), words=("食品", "农产品", "水产", "粮油"),
         units=(("千克", 1.0),), inputs=(3, 2, 5, 9)),
    dict(id=1, name="minerals_fuels", chapters=range(25, 28), words=("矿业", "能源", "矿产"),
         units=(("千克", 0.8), ("吨", 0.2)), inputs=(9, 8, 2, 10)),
    dict(id=2, name="chemicals", chapters=range(28, 39), words=("化工", "精细化工", "医药"),
         units=(("千克", 1.0),), inputs=(1, 0, 3, 9)),
    dict(id=3, name="plastics_rubber", chapters=range(39, 41), words=("塑料制品", "橡胶", "塑胶"),
         units=(("千克", 0.7), ("个", 0.3)), inputs=(2, 1, 8, 9)),
    dict(id=4, name="leather_footwear", chapters=(41, 42, 43, 64, 65, 66, 67),
         words=("鞋业", "皮革制品", "箱包"), units=(("双", 0.5), ("个", 0.3), ("千克", 0.2)), inputs=(6, 2, 3, 9)),
    dict(id=5, name="wood_paper", chapters=range(44, 50), words=("木业", "纸业", "印刷"),
         units=(("千克", 0.8), ("立方米", 0.2)), inputs=(2, 9, 3)),
    dict(id=6, name="textiles_apparel", chapters=range(50, 64), words=("纺织", "服装", "针织", "服饰"),
         units=(("件", 0.4), ("千克", 0.35), ("米", 0.25)), inputs=(2, 3, 9)),
    dict(id=7, name="stone_glass", chapters=range(68, 72), words=("陶瓷", "玻璃", "建材"),
         units=(("千克", 0.7), ("平方米", 0.3)), inputs=(1, 2, 9)),
    dict(id=8, name="base_metals", chapters=range(72, 84), words=("金属制品", "五金", "钢铁"),
         units=(("千克", 0.85), ("个", 0.15)), inputs=(1, 9, 2)),
    dict(id=9, name="machinery", chapters=(84,), words=("机械制造", "机械", "重工"),
         units=(("台", 0.7), ("千克", 0.15), ("个", 0.15)), inputs=(8, 10, 3, 2)),
    dict(id=10, name="electronics", chapters=(85,), words=("电子", "电器", "电子科技"),
         units=(("个", 0.5), ("台", 0.4), ("千克", 0.1)), inputs=(8, 3, 12, 2, 9)),
    dict(id=11, name="vehicles", chapters=range(86, 90), words=("汽车配件", "车辆", "船舶"),
         units=(("辆", 0.4), ("千克", 0.3), ("个", 0.3)), inputs=(8, 9, 3, 10)),
    dict(id=12, name="instruments", chapters=range(90, 93), words=("仪器", "光学", "精密仪器"),
         units=(("台", 0.5), ("个", 0.5)), inputs=(10, 8, 3, 2)),
    dict(id=13, name="misc_manufactures", chapters=range(93, 98), words=("家具", "玩具", "工艺品"),
         units=(("个", 0.5), ("件", 0.3), ("套", 0.2)), inputs=(5, 3, 8, 6, 2)),
)
CLUSTER_ORDER = (0, 6, 10, 9, 2, 13, 8, 3, 4, 5, 11, 12, 1, 7)
#: Log of a typical unit price (USD) by statutory unit.
UNIT_LOG_PRICE = {"千克": np.log(3.0), "吨": np.log(400.0), "个": np.log(5.0), "台": np.log(250.0),
                  "件": np.log(8.0), "双": np.log(6.0), "米": np.log(2.0), "辆": np.log(3000.0),
                  "套": np.log(30.0), "平方米": np.log(10.0), "立方米": np.log(300.0)}


def chapter_cluster() -> dict[int, int]:
    return {ch: c["id"] for c in CLUSTERS for ch in c["chapters"]}


# --------------------------------------------------------------------------- ownership, modes

#: class -> [(Chinese label, customs enterprise-type code, prob within class)]
OWNERSHIP_LABELS: dict[str, tuple[tuple[str, int, float], ...]] = {
    "soe": (("国有企业", 1, 1.0),),
    "collective": (("集体企业", 5, 1.0),),
    "private": (("私营企业", 6, 0.85), ("个体工商户", 7, 0.15)),
    "foreign": (("中外合资企业", 3, 0.4), ("中外合作企业", 2, 0.15), ("外商独资企业", 4, 0.45)),
    "other": (("其他", 9, 1.0),),
}
OWNERSHIP_CLASSES = ("soe", "collective", "private", "foreign", "other")
OWN_P_MANUF = (0.10, 0.08, 0.45, 0.32, 0.05)
OWN_P_INTERMED = (0.30, 0.05, 0.50, 0.05, 0.10)

#: Trade modes: code2 (statistical), code4 (supervision), Chinese label, class.
TRADE_MODES: dict[str, tuple[str, str, str]] = {
    "10": ("0110", "一般贸易", "ordinary"),
    "14": ("0214", "来料加工装配贸易", "processing"),
    "15": ("0615", "进料加工贸易", "processing"),
    "19": ("4019", "边境小额贸易", "other"),
    "25": ("2025", "外商投资企业作为投资进口的设备、物品", "other"),
    "33": ("1233", "保税仓库进出境货物", "other"),
    "34": ("1234", "保税区仓储转口货物", "other"),
}
MODE_CODES = tuple(TRADE_MODES)

# --------------------------------------------------------------------------- names

BRAND_CHARS = tuple("华通宏达永兴金利恒丰新盛泰源鑫隆昌宝安康德信誉祥瑞福东方海天明光正大中美嘉和凯旋亿佳汇联立万顺星辉升环球龙腾飞鹏远航卓越荣富强威")
SUFFIXES = (("有限公司", 0.72), ("股份有限公司", 0.12), ("有限责任公司", 0.1), ("厂", 0.06))
#: Intermediary name templates: every one contains an S000 keyword, so the S000 list and the union
#: list flag exactly the same firms; some also contain union-only keywords (经贸, 工贸, 科贸, 外经).
INTERMEDIARY_TEMPLATES = (
    ("{city}{brand}进出口有限公司", 0.30), ("{city}{brand}贸易有限公司", 0.2),
    ("{city}{brand}国际贸易有限公司", 0.1), ("{city}{brand}外贸有限公司", 0.06),
    ("{city}{brand}商贸有限公司", 0.08), ("{brand}国际物流({city})有限公司", 0.05),
    ("{city}{brand}边贸有限公司", 0.03), ("{city}{brand}经贸进出口有限公司", 0.05),
    ("{city}{brand}工贸进出口有限公司", 0.05), ("{city}{brand}科贸进出口有限公司", 0.03),
    ("{city}{brand}外经贸易有限公司", 0.03), ("{city}{brand}出口服务有限公司", 0.02),
)
ROADS = ("人民路", "解放路", "中山路", "建设路", "工业路", "开发大道", "滨海大道", "科技路", "长江路", "黄河路",
         "和平路", "新华路", "胜利路", "迎宾大道", "创业路")
#: Character outside GBK (in GB18030) used in one firm's address in the GB18030 year.
NON_GBK_CHAR = "㙟"


def keyword_hits(name: str, keywords=KEYWORD_UNION) -> list[str]:
    return [k for k in keywords if k in name]


@dataclass
class Universe:
    scale: Scale
    seed: int
    years: tuple[int, int]
    # clusters
    clusters: list[int]
    input_cluster: dict[int, int]
    # products (HS6, target vintage HS2007)
    hs6: np.ndarray  # str
    hs6_by_vintage: dict[str, np.ndarray]
    hs6_hs4_idx: np.ndarray
    hs6_unit: np.ndarray
    hs6_sigma: np.ndarray
    hs6_a: np.ndarray
    hs6_base_lp: np.ndarray
    hs6_n_hs8: np.ndarray
    hs4: np.ndarray  # str
    hs4_cluster: np.ndarray
    hs4_prod_off: np.ndarray
    hs4_prod_idx: np.ndarray
    sigma_hs3: dict[str, float]
    # cities
    city_code: np.ndarray
    city_name: np.ndarray
    city_prov_name: np.ndarray
    city_short: np.ndarray
    city_districts: list
    city_weight: np.ndarray
    city_cluster_p: np.ndarray
    # partners
    p_iso3: np.ndarray
    p_iso2: np.ndarray
    p_zh: np.ndarray
    p_weight: np.ndarray
    p_delta: np.ndarray
    # firms
    firm_id: np.ndarray
    firm_name: np.ndarray
    firm_address: np.ndarray
    firm_city: np.ndarray
    firm_region: np.ndarray  # str 5-digit main region code
    firm_sec_city: np.ndarray  # (n, 2) secondary city index or -1
    firm_sec_region: np.ndarray  # (n, 2) str
    own_class: np.ndarray  # index into OWNERSHIP_CLASSES
    own_label: np.ndarray
    own_code: np.ndarray
    is_intermediary: np.ndarray  # truth
    is_false_positive: np.ndarray  # manufacturer named after 出口加工区
    flagged: np.ndarray  # name contains a keyword of the union (== s000) list
    is_processing: np.ndarray
    is_multiplant: np.ndarray
    entry: np.ndarray
    exit: np.ndarray
    home_cluster: np.ndarray
    input_cl: np.ndarray
    core_pool: np.ndarray  # (n, K) hs4 idx or -1
    import_pool: np.ndarray  # (n, K) hs4 idx or -1
    p_import: np.ndarray
    cost: np.ndarray
    quality: np.ndarray
    gb18030_firm: int
    notes: dict = field(default_factory=dict)

    @property
    def n_firms(self) -> int:
        return len(self.firm_id)


def _pick(rng: np.random.Generator, items, probs, size):
    p = np.asarray(probs, dtype=float)
    return rng.choice(len(items), size=size, p=p / p.sum())


def build_universe(scale: Scale, seed: int, years: tuple[int, int]) -> Universe:
    rng = np.random.default_rng([seed, 101])
    cc = chapter_cluster()
    clusters = list(CLUSTER_ORDER[: scale.n_clusters])
    cset = set(clusters)
    input_cluster = {}
    for c in clusters:
        prefs = [x for x in CLUSTERS[c]["inputs"] if x in cset and x != c]
        input_cluster[c] = prefs[0] if prefs else next(x for x in clusters if x != c)

    # ---- products
    rts = [r for r in ref.round_trip_codes() if cc.get(int(r.hs6[:2])) in cset]
    by_hs4: dict[str, list] = {}
    for r in rts:
        by_hs4.setdefault(r.hs6[:4], []).append(r)
    hs4_all = sorted(by_hs4)
    if scale.n_hs4 is None:
        hs4_sel = hs4_all
    else:
        per = [scale.n_hs4 // len(clusters)] * len(clusters)
        for i in range(scale.n_hs4 - sum(per)):
            per[i % len(clusters)] += 1
        hs4_sel = []
        for c, k in zip(clusters, per):
            cand = [h for h in hs4_all if cc[int(h[:2])] == c]
            cand = [cand[i] for i in rng.permutation(len(cand))]
            if c == 0:  # make sure chapters 01-09 are present (7-digit codes in the .dta years)
                early = [h for h in cand if int(h[:2]) <= 9][:2]
                cand = early + [h for h in cand if h not in early]
            hs4_sel.extend(cand[:k])
        hs4_sel = sorted(hs4_sel)
    chosen: list = []
    if scale.n_hs6 is None:
        for h in hs4_sel:
            chosen.extend(by_hs4[h])
    else:
        n_avail = np.array([len(by_hs4[h]) for h in hs4_sel])
        alloc = np.ones(len(hs4_sel), dtype=int)
        extra = scale.n_hs6 - alloc.sum()
        while extra > 0:
            room = np.flatnonzero(alloc < n_avail)
            if len(room) == 0:
                break
            i = rng.choice(room)
            alloc[i] += 1
            extra -= 1
        for h, k in zip(hs4_sel, alloc):
            lst = by_hs4[h]
            order = rng.permutation(len(lst))
            chosen.extend(lst[i] for i in sorted(order[:k]))
        # a few percent of renamed codes at least
        min_renamed = max(2, int(round(0.03 * len(chosen))))
        n_ren = sum(r.renamed for r in chosen)
        if n_ren < min_renamed:
            chosen_set = {r.hs6 for r in chosen}
            for h in hs4_sel:
                if n_ren >= min_renamed:
                    break
                ren = [r for r in by_hs4[h] if r.renamed and r.hs6 not in chosen_set]
                plain = [i for i, r in enumerate(chosen) if r.hs6[:4] == h and not r.renamed]
                if ren and plain:
                    chosen[plain[0]] = ren[0]
                    n_ren += 1
        chosen.sort(key=lambda r: r.hs6)
    hs6 = np.array([r.hs6 for r in chosen])
    hs6_by_v = {v: np.array([r.by_vintage[v] for r in chosen]) for v in ref.RAW_VINTAGES}
    hs4 = np.array(sorted({h[:4] for h in hs6}))
    hs4_pos = {h: i for i, h in enumerate(hs4)}
    hs6_hs4 = np.array([hs4_pos[h[:4]] for h in hs6])
    hs4_cluster = np.array([cc[int(h[:2])] for h in hs4])
    order = np.argsort(hs6_hs4, kind="stable")
    counts = np.bincount(hs6_hs4, minlength=len(hs4))
    off = np.concatenate([[0], np.cumsum(counts)])
    n6 = len(hs6)
    units = []
    for h in hs6:
        spec = CLUSTERS[cc[int(h[:2])]]["units"]
        us, ps = zip(*spec)
        units.append(us[_pick(rng, us, ps, 1)[0]])
    hs6_unit = np.array(units)
    hs3 = sorted({h[:3] for h in hs6})
    sig = np.clip(1.5 + np.exp(rng.normal(np.log(3.0), 0.55, len(hs3))), 2.0, 12.0).round(3)
    sigma_hs3 = dict(zip(hs3, sig.tolist()))
    hs6_sigma = np.array([sigma_hs3[h[:3]] for h in hs6])
    base_lp = np.array([UNIT_LOG_PRICE[u] for u in hs6_unit]) + rng.normal(0, 0.5, n6)
    ln_v = np.log(40000.0) + rng.normal(0, 0.5, n6)
    hs6_a = ln_v + (hs6_sigma - 1.0) * base_lp  # a_h: typical flow value ~ exp(ln_v)
    n_hs8 = np.where(rng.random(n6) < 0.4, 2, 1)

    # ---- cities
    allc = ref.cities()
    by_code = {c.code: c for c in allc}
    pref = [by_code[c] for c in ref.PREFERRED_CITIES if c in by_code]
    rest = [c for c in allc if c.code not in set(ref.PREFERRED_CITIES)]
    rest = [rest[i] for i in rng.permutation(len(rest))]
    if scale.n_cities is None:
        sel = pref + rest
    else:
        n_pref = min(len(pref), max(scale.n_cities * 2 // 3, scale.n_cities - len(rest)))
        sel = pref[:n_pref] + rest[: scale.n_cities - n_pref]
    nc = len(sel)
    city_weight = 1.0 / np.arange(1, nc + 1)
    city_weight /= city_weight.sum()
    dirich = rng.dirichlet(np.full(len(clusters), 0.4), size=nc)
    city_cluster_p = 0.75 * dirich + 0.25 / len(clusters)

    # ---- partners
    iso3, iso2, zh, pw = ref.partner_arrays()
    p_delta = np.log(pw / pw.max()) * 0.6 + rng.normal(0, 0.1, len(iso3))

    # ---- firms
    n = scale.n_firms
    rng_f = np.random.default_rng([seed, 202])
    firm_city = rng_f.choice(nc, size=n, p=city_weight)
    is_int = rng_f.random(n) < 0.17
    is_fp = (~is_int) & (rng_f.random(n) < 0.015)
    if n <= 500:  # make sure the tiny universe has a few false positives
        cand = np.flatnonzero(~is_int)
        is_fp[cand[:2]] = True
    own = np.where(is_int, _pick(rng_f, OWNERSHIP_CLASSES, OWN_P_INTERMED, n),
                   _pick(rng_f, OWNERSHIP_CLASSES, OWN_P_MANUF, n))
    own_label = np.empty(n, dtype=object)
    own_code = np.zeros(n, dtype=np.int64)
    u_own = rng_f.random(n)
    for ci, cname in enumerate(OWNERSHIP_CLASSES):
        m = own == ci
        labs = OWNERSHIP_LABELS[cname]
        cum = np.cumsum([x[2] for x in labs])
        j = np.searchsorted(cum, u_own[m] * cum[-1], side="right").clip(max=len(labs) - 1)
        own_label[m] = np.array([x[0] for x in labs], dtype=object)[j]
        own_code[m] = np.array([x[1] for x in labs])[j]
    foreign = own == OWNERSHIP_CLASSES.index("foreign")
    is_proc = (~is_int) & (rng_f.random(n) < np.where(foreign, 0.45, 0.12))
    is_mp = (~is_int) & (rng_f.random(n) < 0.03)
    if n <= 500:
        is_mp[np.flatnonzero(~is_int & ~is_fp)[2:6]] = True
    # entry/exit on the fixed 2000-2016 calendar (whatever the generated years), so a run of a
    # few years sees the same firm population as the full run
    y0, y1 = CALENDAR
    nyears = y1 - y0 + 1
    incumbent = rng_f.random(n) < ENTRY["incumbent_share"]
    later = y0 + 1 + np.minimum((nyears - 1) * np.sqrt(rng_f.random(n)), nyears - 2).astype(int)
    entry = np.where(incumbent, y0, later)
    life = rng_f.geometric(ENTRY["exit_hazard"], size=n)
    exitv = entry + life - 1
    home = np.empty(n, dtype=np.int64)
    u_home = rng_f.random(n)
    cum = np.cumsum(city_cluster_p, axis=1)
    home_pos = (u_home[:, None] > cum[firm_city]).sum(1)
    home_pos = np.minimum(home_pos, len(clusters) - 1)
    home[:] = np.array(clusters)[home_pos]
    input_cl = np.array([input_cluster[c] for c in home])
    # secondary plants
    sec = np.full((n, 2), -1, dtype=np.int64)
    mp_idx = np.flatnonzero(is_mp)
    for f in mp_idx:
        k = 1 + (rng_f.random() < 0.35)
        others = [c for c in rng_f.choice(nc, size=6, p=city_weight) if c != firm_city[f]]
        others = list(dict.fromkeys(others))[:k]
        sec[f, : len(others)] = others
        if not others:
            is_mp[f] = False
    # HS4 lists per cluster, popularity-weighted
    cl_hs4 = {c: np.flatnonzero(hs4_cluster == c) for c in clusters}
    hs4_pop = rng.gamma(1.0, 1.0, len(hs4))
    K = 8
    core = np.full((n, K), -1, dtype=np.int64)
    n_core = np.where(is_int, np.minimum(4 + rng_f.poisson(3, n), K), 1 + rng_f.binomial(3, scale.core_extra_p, n))
    for c in clusters:
        m = np.flatnonzero((home == c) & ~is_int)
        pool = cl_hs4[c]
        if len(pool) == 0 or len(m) == 0:
            continue
        w = hs4_pop[pool] / hs4_pop[pool].sum()
        draws = pool[rng_f.choice(len(pool), size=(len(m), K), p=w)]
        core[m] = draws
    m = np.flatnonzero(is_int)
    w = hs4_pop / hs4_pop.sum()
    core[m] = rng_f.choice(len(hs4), size=(len(m), K), p=w)
    core = _dedupe_rows(core, n_core)
    imp = np.full((n, K), -1, dtype=np.int64)
    n_imp = np.minimum(2 + rng_f.poisson(scale.import_pool_lambda, n) + 2 * foreign, K)
    src = rng_f.random((n, K))
    allw = hs4_pop / hs4_pop.sum()
    for c in clusters:
        for role, lo, hi in (("input", 0.0, 0.55), ("home", 0.55, 0.9)):
            sel_f = np.flatnonzero((input_cl == c) if role == "input" else (home == c))
            if len(sel_f) == 0:
                continue
            pool = cl_hs4[c]
            w = hs4_pop[pool] / hs4_pop[pool].sum()
            d = pool[rng_f.choice(len(pool), size=(len(sel_f), K), p=w)]
            s = src[sel_f]
            mm = (s >= lo) & (s < hi)
            blk = imp[sel_f]
            blk[mm] = d[mm]
            imp[sel_f] = blk
    rnd = rng_f.choice(len(hs4), size=(n, K), p=allw)
    imp = np.where(src >= 0.9, rnd, imp)
    imp = _dedupe_rows(imp, n_imp)
    p_import = np.select(
        [is_int, own == 3, own == 0], [0.6, 0.7, 0.5], default=0.35
    ).astype(float)
    cost = rng_f.normal(0, 0.15, n)
    quality = rng_f.normal(0, 0.4, n)

    # ids, names, addresses, region codes
    city_code = np.array([c.code for c in sel])
    city4 = np.array([c.code[:4] for c in sel])
    serial: dict[tuple[str, int], int] = {}
    firm_id = np.empty(n, dtype=object)
    names = np.empty(n, dtype=object)
    addr = np.empty(n, dtype=object)
    seen_names: set[str] = set()
    suf_items, suf_p = zip(*SUFFIXES)
    it_items, it_p = zip(*INTERMEDIARY_TEMPLATES)
    bc = np.array(BRAND_CHARS)
    b1 = rng_f.integers(0, len(bc), n)
    b2 = rng_f.integers(0, len(bc), n)
    suf = _pick(rng_f, suf_items, suf_p, n)
    tmpl = _pick(rng_f, it_items, it_p, n)
    wordpick = rng_f.integers(0, 4, n)
    roads = rng_f.integers(0, len(ROADS), n)
    numbers = rng_f.integers(1, 999, n)
    distpick = rng_f.integers(0, 10_000, n)
    union = KEYWORD_UNION
    s000 = KEYWORD_PRESETS["s000"]
    for f in range(n):
        c = sel[firm_city[f]]
        key = (city4[firm_city[f]], int(own_code[f]))
        serial[key] = serial.get(key, 0) + 1
        firm_id[f] = f"{key[0]}{key[1]}{serial[key]:05d}"
        brand = bc[b1[f]] + bc[b2[f]]
        if brand[0] == brand[1]:
            brand = brand[0] + bc[(b2[f] + 7) % len(bc)]
        ws = CLUSTERS[home[f]]["words"]
        word = ws[wordpick[f] % len(ws)]
        k = 0
        while True:
            b = brand if k == 0 else brand + bc[(b1[f] * 31 + k * 17) % len(bc)]
            if is_int[f]:
                nm = it_items[tmpl[f]].format(city=c.short, brand=b)
            elif is_fp[f]:
                nm = f"{c.short}出口加工区{b}{word}有限公司"
            elif foreign[f] and own_code[f] == 4:
                nm = f"{b}{word}({c.short})有限公司"
            else:
                nm = f"{c.short}{b}{word}{suf_items[suf[f]]}"
            hit_u = bool(keyword_hits(nm, union))
            hit_s = bool(keyword_hits(nm, s000))
            want = bool(is_int[f] or is_fp[f])
            if nm not in seen_names and hit_u == want and hit_s == want:
                break
            k += 1
            if k > 50:
                raise RuntimeError(f"cannot name firm {f}")
        seen_names.add(nm)
        names[f] = nm
        dist = c.districts[distpick[f] % len(c.districts)] if c.districts else ""
        prov = "" if c.province_code in ref.MUNICIPALITIES else c.province_name
        addr[f] = f"{prov}{c.name}{dist}{ROADS[roads[f]]}{numbers[f]}号"
    digit = rng_f.integers(0, 10, (n, 3))
    firm_region = np.array([f"{city4[firm_city[f]]}{digit[f, 0]}" for f in range(n)], dtype=object)
    sec_region = np.full((n, 2), "", dtype=object)
    for f in np.flatnonzero(is_mp):
        for j in range(2):
            if sec[f, j] >= 0:
                sec_region[f, j] = f"{city4[sec[f, j]]}{digit[f, j + 1]}"
    flagged = np.array([bool(keyword_hits(x)) for x in names])
    gbf = -1  # chosen when the GB18030 year is written (a firm with rows that year)

    return Universe(
        scale=scale, seed=seed, years=years, clusters=clusters, input_cluster=input_cluster,
        hs6=hs6, hs6_by_vintage=hs6_by_v, hs6_hs4_idx=hs6_hs4, hs6_unit=hs6_unit, hs6_sigma=hs6_sigma,
        hs6_a=hs6_a, hs6_base_lp=base_lp, hs6_n_hs8=n_hs8, hs4=hs4, hs4_cluster=hs4_cluster,
        hs4_prod_off=off, hs4_prod_idx=order, sigma_hs3=sigma_hs3,
        city_code=city_code, city_name=np.array([c.name for c in sel]),
        city_prov_name=np.array([c.province_name for c in sel]), city_short=np.array([c.short for c in sel]),
        city_districts=[c.districts for c in sel], city_weight=city_weight, city_cluster_p=city_cluster_p,
        p_iso3=iso3, p_iso2=iso2, p_zh=zh, p_weight=pw, p_delta=p_delta,
        firm_id=firm_id.astype(str), firm_name=names.astype(str), firm_address=addr.astype(str),
        firm_city=firm_city, firm_region=firm_region.astype(str), firm_sec_city=sec,
        firm_sec_region=sec_region.astype(str), own_class=own, own_label=own_label.astype(str),
        own_code=own_code, is_intermediary=is_int, is_false_positive=is_fp, flagged=flagged,
        is_processing=is_proc, is_multiplant=is_mp, entry=entry, exit=exitv, home_cluster=home,
        input_cl=input_cl, core_pool=core, import_pool=imp, p_import=p_import, cost=cost,
        quality=quality, gb18030_firm=gbf,
    )


def _dedupe_rows(a: np.ndarray, n_keep: np.ndarray) -> np.ndarray:
    """Keep the first ``n_keep`` distinct entries of each row (rest -1)."""
    out = np.full_like(a, -1)
    n, K = a.shape
    srt = np.sort(a, axis=1)
    # first occurrence positions per row in original order
    for j in range(K):
        col = a[:, j]
        dup = np.zeros(n, dtype=bool)
        for i in range(j):
            dup |= a[:, i] == col
        a_j = np.where(dup, -1, col)
        out[:, j] = a_j
    del srt
    # compact: move -1 to the end keeping order, then cut to n_keep
    key = np.where(out < 0, 1, 0)
    order = np.argsort(key, axis=1, kind="stable")
    out = np.take_along_axis(out, order, axis=1)
    cnt = np.arange(K)[None, :] < n_keep[:, None]
    return np.where(cnt, out, -1)


def universe_summary(u: Universe) -> dict:
    return {
        "scale": asdict(u.scale),
        "n_firms": int(u.n_firms),
        "n_cities": int(len(u.city_code)),
        "n_hs6": int(len(u.hs6)),
        "n_hs4": int(len(u.hs4)),
        "clusters": [{"id": c, "name": CLUSTERS[c]["name"], "input_cluster": u.input_cluster[c]} for c in u.clusters],
        "n_renamed_hs6": int(np.any(np.stack([u.hs6_by_vintage[v] != u.hs6 for v in ref.RAW_VINTAGES]), axis=0).sum()),
    }
