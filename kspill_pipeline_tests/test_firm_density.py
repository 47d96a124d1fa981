"""Firm-scale density on Dask (issue 3, "Firm scale with Dask"; S000 sections 3.1-3.2, 8.2).

The chunked path (firm buckets by hash, ``relatedness.density_kernel`` per row block, filter,
parquet parts, manifest commit) must equal the in-memory path (one ``relatedness.density`` call)
EXACTLY, on hand-made baskets and on firm x HS4 baskets of the tiny and demo synthetic universes
(real ingestion: ``io.raw`` + ``cleaning.clean_customs``), with the synchronous scheduler and with
a real ``LocalCluster(processes=False)``. A failing bucket must leave the previous generation.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import polars as pl
import pytest

from kspill_pipeline.compute import firm_density as fd
from kspill_pipeline.compute import relatedness as rel
from kspill_pipeline.compute.cleaning import clean_customs
from kspill_pipeline.config import CleaningConfig
from kspill_pipeline.io.raw import read_year

# ------------------------------------------------------------------------------------------------
# fixtures: firm x HS4 baskets from the synthetic universes through the real ingestion
# ------------------------------------------------------------------------------------------------


def _baskets(data_dir: Path, year: int) -> dict:
    frames = read_year(data_dir, year)
    raw = pl.concat([rf.df.with_columns(pl.lit(rf.numeric_hs).alias("source_numeric_hs")) for rf in frames],
                    how="vertical_relaxed")
    clean = clean_customs(raw, year, CleaningConfig()).clean
    ex = fd.basket_edges(clean, "export").collect()
    im = fd.basket_edges(clean, "import").collect()
    products = np.sort(ex["product"].unique().to_numpy())
    C = rel.cooccurrence(rel.to_matrix(ex.with_columns(v=pl.lit(1.0)), "unit_id", "product", "v",
                                       products=products)[0])
    return {"exports": ex, "imports": im, "products": products, "C": C, "phi": rel.proximity(C), "year": year}


@pytest.fixture(scope="module")
def tiny(tiny_universe) -> dict:
    src = json.loads((tiny_universe / "_truth" / "planted.json").read_text(encoding="utf-8"))
    year = int(src["years"]["start"]) + 4
    return _baskets(tiny_universe, year)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    from kspill_pipeline.synthetic import generate

    out = tmp_path_factory.mktemp("demo_2004_2005")
    generate(out, "demo", 1, years=(2004, 2005))
    return _baskets(out, 2005)


@pytest.fixture(scope="module")
def threaded_client():
    from kspill_pipeline.dask_resource import DaskResource

    with DaskResource(n_workers=2, threads_per_worker=1, processes=False, memory_limit="2GB").get_client() as c:
        yield c


def _chunked(d: dict, out: Path, client=None, **kw) -> tuple[fd.DensityResult, pl.DataFrame]:
    res = fd.firm_density_to_parquet(d["imports"].lazy(), d["phi"], d["products"], out, client=client, **kw)
    df = fd.scan_parts(out).collect().sort("unit_id", "product")
    return res, df


def _assert_bits_equal(a: pl.DataFrame, b: pl.DataFrame) -> None:
    assert a.columns == b.columns
    assert a.height == b.height
    assert a["unit_id"].to_list() == b["unit_id"].to_list()
    assert a["product"].to_list() == b["product"].to_list()
    va, vb = a["density"].to_numpy(), b["density"].to_numpy()
    assert va.dtype == vb.dtype
    assert np.array_equal(va.view(np.uint32 if va.dtype == np.float32 else np.uint64),
                          vb.view(np.uint32 if vb.dtype == np.float32 else np.uint64))


# ------------------------------------------------------------------------------------------------
# hand-made baskets
# ------------------------------------------------------------------------------------------------

PRODUCTS = np.array(["0101", "0202", "0303", "0404"])
EDGES = pl.DataFrame({
    "unit_id": ["a", "a", "b", "b", "b", "c", "d", "a"],
    "product": ["0101", "0202", "0202", "0303", "0404", "0404", "0101", "0101"],  # a-0101 twice
})


def test_cooccurrence_chunked_hand_counts():
    # a: {0101, 0202}; b: {0202, 0303, 0404}; c: {0404}; d: {0101}
    C = fd.cooccurrence_chunked(EDGES.lazy(), PRODUCTS, n_buckets=3)
    expected = np.array([
        [2, 1, 0, 0],
        [1, 2, 1, 1],
        [0, 1, 1, 1],
        [0, 1, 1, 2],
    ], dtype=np.float64)
    assert np.array_equal(C, expected)
    # any bucket count gives the same exact matrix (a firm is never split)
    for nb in (1, 2, 7, 50):
        assert np.array_equal(fd.cooccurrence_chunked(EDGES, PRODUCTS, n_buckets=nb), expected)


def test_cooccurrence_unknown_product_raises():
    with pytest.raises(ValueError, match="not in `products`"):
        fd.cooccurrence_chunked(EDGES.lazy(), PRODUCTS[:3], n_buckets=2)


def test_bucket_keeps_firms_whole():
    bb = fd.bucket_baskets(EDGES.lazy(), PRODUCTS, 3)
    seen = {}
    for k, (units, _) in enumerate(bb.pieces):
        for u in units.to_pylist():
            assert seen.setdefault(u, k) == k
    assert set(seen) == {"a", "b", "c", "d"}


def test_bucket_pieces_own_their_buffers():
    # a slice of one big arrow array would pickle (and travel to its worker) with the whole parent
    import pickle

    rng = np.random.default_rng(0)
    n = 20_000
    edges = pl.DataFrame({"unit_id": [f"f{i:07d}" for i in rng.integers(0, 5_000, n)],
                          "product": rng.choice(PRODUCTS, n)})
    bb = fd.bucket_baskets(edges, PRODUCTS, 16)
    whole = len(pickle.dumps(edges.get_column("unit_id").to_arrow()))
    assert sum(len(pickle.dumps(p)) for p in bb.pieces) < 2 * whole
    assert sum(len(p[1]) for p in bb.pieces) == n


def test_cooccurrence_partials_sparse_dense_mix_exact():
    a = sp.csr_array(np.array([[1.0, 0.0], [0.0, 2.0]]))
    b = np.array([[0.0, 3.0], [4.0, 0.0]])
    for x, y in [(a, b), (b, a), (a, a), (b, b)]:
        got = fd._add(x, y)
        got = got.toarray() if sp.issparse(got) else got
        assert np.array_equal(got, (x.toarray() if sp.issparse(x) else x) + (y.toarray() if sp.issparse(y) else y))


def test_misaligned_phi_gives_the_same_rows(tmp_path):
    # arrays received through distributed can be unaligned views; the bucket realigns them once
    phi = np.array([[1.0, .5, 0, 0], [.5, 1, .5, .5], [0, .5, 1, .5], [0, .5, .5, 1]])
    buf = np.zeros(phi.size * 8 + 1, dtype=np.uint8)
    odd = buf[1:].view(np.float64).reshape(phi.shape)
    odd[:] = phi
    assert not odd.flags.aligned
    assert fd._aligned(odd).flags.aligned and np.array_equal(fd._aligned(odd), phi)
    assert fd._aligned(phi) is phi


def test_density_hand_values(tmp_path):
    C = fd.cooccurrence_chunked(EDGES, PRODUCTS, 2)
    phi = rel.proximity(C)
    # phi = C_pq / max(u_p, u_q), diagonal 1:
    #   0101-0202: 1/2; 0202-0303: 1/2; 0202-0404: 1/2; 0303-0404: 1/2; 0101-0303/0404: 0
    # column sums: 0101: 1.5, 0202: 2.5, 0303: 2.0, 0404: 2.0
    # firm c (basket {0404}): density(0101) = 0/1.5 = 0, (0202) = .5/2.5 = .2, (0303) = .5/2 = .25, (0404) = 1/2
    res = fd.firm_density_to_parquet(EDGES.lazy(), phi, PRODUCTS, tmp_path / "out", threshold=0.05, n_buckets=2,
                                     dtype=np.float64)
    df = fd.scan_parts(tmp_path / "out").collect()
    c = {r["product"]: r["density"] for r in df.filter(pl.col("unit_id") == "c").iter_rows(named=True)}
    assert c == {"0202": 0.2, "0303": 0.25, "0404": 0.5}
    assert res.cells_computed == 4 * 4
    assert res.rows_written == df.height
    assert 0 < res.share_kept <= 1
    assert df.schema == pl.Schema({"unit_id": pl.String, "product": pl.String, "density": pl.Float64})
    ref = fd.firm_density_in_memory(EDGES.lazy(), phi, PRODUCTS, threshold=0.05, dtype=np.float64)
    _assert_bits_equal(df.sort("unit_id", "product"), ref)


def test_extra_columns_and_empty_buckets(tmp_path):
    phi = rel.proximity(fd.cooccurrence_chunked(EDGES, PRODUCTS, 1))
    res = fd.firm_density_to_parquet(
        EDGES, phi, PRODUCTS, tmp_path / "o", n_buckets=20,
        extra_columns={"year": pl.Series([2016], dtype=pl.Int32), "basis": "firm"},
    )
    assert len(res.files) == 20  # one part per bucket, empty ones included (same schema)
    df = fd.scan_parts(tmp_path / "o").collect()
    assert df.schema == pl.Schema({"unit_id": pl.String, "product": pl.String, "density": pl.Float32,
                                   "year": pl.Int32, "basis": pl.String})
    assert df["year"].unique().to_list() == [2016]
    assert df.height == res.rows_written


# ------------------------------------------------------------------------------------------------
# exactness on the synthetic universes
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("universe", ["tiny", "demo"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_chunked_equals_in_memory_sync(universe, dtype, request, tmp_path):
    d = request.getfixturevalue(universe)
    assert d["imports"].height > 0
    # co-occurrence: chunked == whole matrix, bit for bit
    for nb in (1, 5, 16):
        assert np.array_equal(fd.cooccurrence_chunked(d["exports"].lazy(), d["products"], nb), d["C"])
    ref = fd.firm_density_in_memory(d["imports"].lazy(), d["phi"], d["products"], dtype=dtype)
    assert ref.height > 0
    for nb, block in ((1, 100_000), (7, 3), (16, 256)):
        res, df = _chunked(d, tmp_path / f"nb{nb}", n_buckets=nb, block_rows=block, dtype=dtype)
        _assert_bits_equal(df, ref)
        assert res.rows_written == ref.height
        n_units = d["imports"].filter(pl.col("product").is_in(d["products"].tolist()))["unit_id"].n_unique()
        assert res.n_units == n_units
        assert res.cells_computed == n_units * len(d["products"])
    # the S000 filter: every kept row is > 0.05, and densities lie in [0, 1]
    assert ref["density"].min() > 0.05 and ref["density"].max() <= 1.0


def test_chunked_equals_in_memory_include_self_false(demo, tmp_path):
    ref = fd.firm_density_in_memory(demo["imports"], demo["phi"], demo["products"], include_self=False)
    _, df = _chunked(demo, tmp_path / "o", n_buckets=6, include_self=False)
    _assert_bits_equal(df, ref)


def test_chunked_equals_in_memory_localcluster(tiny, demo, threaded_client, tmp_path):
    for name, d in (("tiny", tiny), ("demo", demo)):
        C = fd.cooccurrence_chunked(d["exports"].lazy(), d["products"], 8, client=threaded_client)
        assert np.array_equal(C, d["C"])
        ref = fd.firm_density_in_memory(d["imports"].lazy(), d["phi"], d["products"])
        res, df = _chunked(d, tmp_path / name, client=threaded_client, n_buckets=8)
        _assert_bits_equal(df, ref)
        assert res.committed and res.generation
        assert len({s["bucket"] for s in res.bucket_stats}) == 8


# ------------------------------------------------------------------------------------------------
# manifest protocol and failures
# ------------------------------------------------------------------------------------------------


def test_manifest_generations(demo, tmp_path):
    out = tmp_path / "firm_import_density" / "year=2005"
    with pytest.raises(FileNotFoundError, match="nothing has been published"):
        fd.read_manifest(out)
    r1, _ = _chunked(demo, out, n_buckets=4)
    m1 = json.loads((out / fd.MANIFEST_NAME).read_text())
    assert m1["files"] == [p.name for p in r1.files]
    assert all(n.startswith(f"part-{r1.generation}-") for n in m1["files"])
    assert m1["total_rows"] == r1.rows_written
    r2, df2 = _chunked(demo, out, n_buckets=3)
    m2 = json.loads((out / fd.MANIFEST_NAME).read_text())
    assert m2["previous_generation"] == r1.generation != r2.generation
    # the old generation is gone, only the new files (and the manifest) remain, no staging folder
    assert sorted(p.name for p in out.iterdir()) == sorted(m2["files"] + [fd.MANIFEST_NAME])
    assert df2.height == r1.rows_written


def test_commit_false_stages_without_publishing(demo, tmp_path):
    out = tmp_path / "o"
    r1, _ = _chunked(demo, out, n_buckets=2)
    r2 = fd.firm_density_to_parquet(demo["imports"], demo["phi"], demo["products"], out, n_buckets=5, commit=False)
    assert not r2.committed and r2.staging_dir is not None and len(r2.files) == 5
    assert fd.read_manifest(out) == r1.files  # still the first generation
    files = fd.commit_parts(r2.staging_dir, out)
    assert fd.read_manifest(out) == files and len(files) == 5
    assert not r2.staging_dir.exists()


def test_orphans_of_a_crashed_commit_are_invisible_and_cleaned(demo, tmp_path):
    out = tmp_path / "o"
    r1, df1 = _chunked(demo, out, n_buckets=2)
    # a commit that died after moving its parts but before replacing the manifest
    (out / "part-99999999999999999999zz-00000.parquet").write_bytes(b"not parquet")
    (out / ".staging-deadbeef").mkdir()
    assert fd.read_manifest(out) == r1.files
    assert fd.scan_parts(out).collect().height == df1.height
    _chunked(demo, out, n_buckets=2)
    assert not (out / "part-99999999999999999999zz-00000.parquet").exists()
    assert not (out / ".staging-deadbeef").exists()


def _failing_bucket(k: int):
    real = fd._density_bucket

    def bucket(*args):
        if args[4] == k:
            raise OSError("simulated worker failure")
        return real(*args)

    return bucket


@pytest.mark.parametrize("where", ["sync", "localcluster"])
def test_failed_bucket_keeps_previous_generation(demo, tmp_path, monkeypatch, where, request):
    client = request.getfixturevalue("threaded_client") if where == "localcluster" else None
    out = tmp_path / "o"
    r1, df1 = _chunked(demo, out, client=client, n_buckets=4)
    before = sorted(p.name for p in out.iterdir())
    monkeypatch.setattr(fd, "_density_bucket", _failing_bucket(2))
    with pytest.raises(fd.FirmDensityError, match=r"bucket 2 failed.*simulated worker failure") as ei:
        fd.firm_density_to_parquet(demo["imports"], demo["phi"] * 0.5, demo["products"], out, n_buckets=4,
                                   client=client)
    assert "nothing was published" in str(ei.value)
    # previous manifest + generation intact and readable; no staging left behind
    assert sorted(p.name for p in out.iterdir()) == before
    assert fd.read_manifest(out) == r1.files
    _assert_bits_equal(fd.scan_parts(out).collect().sort("unit_id", "product"), df1)
    # and a later run succeeds normally
    monkeypatch.undo()
    r3, df3 = _chunked(demo, out, client=client, n_buckets=4)
    assert r3.generation != r1.generation
    _assert_bits_equal(df3, df1)


def test_dask_resource_lifecycle():
    from dagster import build_init_resource_context

    from kspill_pipeline.dask_resource import DaskResource

    res = DaskResource(n_workers=1, processes=False, memory_limit="1GB", preload=[])
    with pytest.raises(RuntimeError, match="only available during step execution"):
        _ = res.client
    with res.yield_for_execution(build_init_resource_context()) as r:
        client = r.client
        assert client.submit(lambda x: x + 1, 1).result() == 2
        assert len(client.scheduler_info()["workers"]) == 1
        cluster = client.cluster
    assert "LocalCluster 1 threads" in res.describe()
    assert client.status == "closed"
    assert cluster.status.name == "closed"
