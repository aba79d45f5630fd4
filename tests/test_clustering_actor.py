"""The clustering actor on a real local Ray: same result as in-process clustering, sharded k-means equals
single-shard and a numpy Lloyd k-means, clear errors for missing partitions and too many clusters."""

import os

import numpy as np
import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import ray  # noqa: E402

from autossvh.clustering import cluster_codes  # noqa: E402
from autossvh.config import ClusterConfig  # noqa: E402
from cluster.clustering_actor import (  # noqa: E402
    _update_centroids,
    cluster_codes_sharded,
    create_clustering_actor,
    create_shards,
    sharded_kmeans,
)

N, D = 300, 16


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray instance, reused if another module already started one (then left running)."""
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, address="local", log_to_driver=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def shards(ray_local):
    """Three shard actors, reloaded by each test with its own slices."""
    return create_shards([np.zeros((1, D), np.float32)] * 3)


def blobs(seed: int = 0, n: int = N, d: int = D, centres: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Normalised clustered features and matching binary codes."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=(centres, d))
    x = mu[rng.integers(0, centres, n)] + 0.4 * rng.normal(size=(n, d))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return x, np.where(x >= 0, 1, -1).astype(np.int8)


def load(shard_handles, x: np.ndarray, count: int) -> list:
    parts = np.array_split(x, count)
    ray.get([s.load.remote(ray.put(p)) for s, p in zip(shard_handles[:count], parts, strict=True)])
    return shard_handles[:count]


def numpy_lloyd(x: np.ndarray, init: np.ndarray, niter: int) -> tuple[np.ndarray, np.ndarray]:
    c = init.astype(np.float64)
    for _ in range(niter):
        a = np.argmin(((x[:, None, :] - c[None]) ** 2).sum(-1), axis=1)
        counts = np.bincount(a, minlength=len(c))
        sums = np.zeros_like(c)
        np.add.at(sums, a, x.astype(np.float64))
        c = _update_centroids(sums, counts, c.astype(np.float32)).astype(np.float64)
    return c, np.argmin(((x[:, None, :] - c[None]) ** 2).sum(-1), axis=1)


def test_actor_matches_in_process(ray_local):
    x, codes = blobs()
    cfg = ClusterConfig(num_cluster=[4, 8], niter=10, nredo=2)
    actor = create_clustering_actor(cfg)
    perm = np.random.default_rng(1).permutation(N)
    ranks = [perm[: N // 2], np.concatenate([perm[N // 2 :], perm[:3]])]  # rank 1 is padded with rank 0's videos
    for rank, idx in enumerate(ranks):
        assert ray.get(actor.submit.remote(5, rank, idx, ray.put(x[idx]), ray.put(codes[idx]))) == len(idx)
    got = ray.get(actor.result.remote(5, 2, N))
    again = ray.get(actor.result.remote(5, 2, N))
    want = cluster_codes(x, codes, cfg)
    for res in (got, again):
        for g in range(2):
            np.testing.assert_array_equal(res.im2cluster[g], want.im2cluster[g])
            np.testing.assert_array_equal(res.centers[g], want.centers[g])
            np.testing.assert_allclose(res.centroids[g], want.centroids[g], atol=1e-5)
            np.testing.assert_allclose(res.density[g], want.density[g], rtol=1e-5)
            assert res.objective[g] == pytest.approx(want.objective[g], rel=1e-5)
    info = ray.get(actor.info.remote(5))
    assert info["backend"] == "faiss-cpu" and info["num_videos"] == N
    ray.kill(actor)


@pytest.mark.parametrize("k", [4, 7])
def test_sharded_equals_single_and_numpy(shards, k):
    x, _ = blobs(seed=k)
    init = x[np.random.default_rng(k).choice(N, k, replace=False)]
    runs = {c: sharded_kmeans(load(shards, x, c), k, seed=0, niter=8, init_centroids=init) for c in (1, 2, 3)}
    for c in (2, 3):
        np.testing.assert_allclose(runs[c][0], runs[1][0], atol=1e-6)
        np.testing.assert_array_equal(runs[c][1], runs[1][1])
        np.testing.assert_allclose(runs[c][2], runs[1][2], atol=1e-5)
        assert runs[c][3] == pytest.approx(runs[1][3], rel=1e-6)
    ref_c, ref_a = numpy_lloyd(x, init, niter=8)
    np.testing.assert_allclose(runs[1][0], ref_c, atol=1e-5)
    np.testing.assert_array_equal(runs[1][1], ref_a)


def test_sharded_seeded_init_and_result_fields(shards):
    x, codes = blobs(seed=3)
    cfg = ClusterConfig(num_cluster=[4, 6], niter=6, nredo=2)
    a = cluster_codes_sharded(load(shards, x, 3), codes, cfg)
    b = cluster_codes_sharded(load(shards, x, 2), codes, cfg)  # same seeded init across shard counts
    for g, k in enumerate(cfg.num_cluster):
        np.testing.assert_array_equal(a.im2cluster[g], b.im2cluster[g])
        np.testing.assert_allclose(a.centroids[g], b.centroids[g], atol=1e-5)
        assert a.centers[g].shape == (k, D) and a.density[g].shape == (k,)
        assert np.allclose(np.linalg.norm(a.centroids[g], axis=1), 1.0, atol=1e-5)


def test_empty_cluster_is_split_deterministically():
    old = np.array([[1.0, 2.0], [9.0, 9.0], [3.0, 3.0]], np.float32)
    sums = np.array([[10.0, 20.0], [0.0, 0.0], [3.0, 3.0]])
    new = _update_centroids(sums, np.array([5, 0, 1]), old)
    np.testing.assert_allclose(new[0] + new[1], 2 * np.array([2.0, 4.0]), rtol=1e-6)
    assert not np.allclose(new[0], new[1])
    np.testing.assert_allclose(new[2], [3.0, 3.0])


def test_missing_partition_raises(ray_local):
    x, codes = blobs()
    actor = create_clustering_actor(ClusterConfig(num_cluster=[4], niter=2, nredo=1))
    ray.get(actor.submit.remote(0, 0, np.arange(100), x[:100], codes[:100]))
    with pytest.raises(TimeoutError, match=r"rank\(s\) \[1\]"):
        ray.get(actor.result.remote(0, 2, N, timeout_s=0.2))
    ray.get(actor.submit.remote(0, 1, np.arange(150, N), x[150:], codes[150:]))
    with pytest.raises(ValueError, match=r"50 missing, indices \[100, 101"):
        ray.get(actor.result.remote(0, 2, N))
    ray.kill(actor)


@pytest.mark.parametrize("num_shards", [1, 2])
def test_too_many_clusters_raises(ray_local, num_shards):
    x, codes = blobs(n=10)
    actor = create_clustering_actor(ClusterConfig(num_cluster=[4, 12], niter=2, nredo=1), num_shards=num_shards)
    ray.get(actor.submit.remote(0, 0, np.arange(10), x, codes))
    with pytest.raises(ValueError, match="12 clusters requested but only 10 training videos"):
        ray.get(actor.result.remote(0, 1))
    ray.kill(actor)


def test_actor_sharded_backend(ray_local):
    x, codes = blobs(seed=4)
    cfg = ClusterConfig(num_cluster=[5], niter=5, nredo=1)
    actor = create_clustering_actor(cfg, num_shards=2)
    ray.get(actor.submit.remote(1, 0, np.arange(N)[::-1], x[::-1], codes[::-1]))
    res = ray.get(actor.result.remote(1, 1, N))
    helpers = create_shards(np.array_split(x, 2))
    want = cluster_codes_sharded(helpers, codes, cfg)
    np.testing.assert_array_equal(res.im2cluster[0], want.im2cluster[0])
    np.testing.assert_array_equal(res.centers[0], want.centers[0])
    np.testing.assert_allclose(res.density[0], want.density[0], rtol=1e-5)
    assert ray.get(actor.info.remote(1))["num_shards"] == 2
    for handle in [actor, *helpers]:
        ray.kill(handle)
