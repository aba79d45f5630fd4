"""The clustering actor on a real local Ray: same result as in-process clustering, the sharded k-means behind
faiss's DatasetAssign equals the same k-means on one in-memory DatasetAssign, warm rounds across epochs and
after a hand-over, clear errors for missing partitions and too many clusters."""

import os
import time

import numpy as np
import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import ray  # noqa: E402
from faiss.contrib.clustering import DatasetAssign  # noqa: E402

from autossvh.clustering import cluster_codes  # noqa: E402
from autossvh.config import ClusterConfig  # noqa: E402
from cluster.clustering_actor import (  # noqa: E402
    ShardedDataset,
    cluster_codes_sharded,
    create_clustering_actor,
    create_shards,
    refine_kmeans,
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


def drifted(x: np.ndarray, scale: float = 0.05, seed: int = 9) -> np.ndarray:
    """``x`` moved a little and renormalised, as codes move from one epoch to the next."""
    y = x + scale * np.random.default_rng(seed).normal(size=x.shape)
    return (y / np.linalg.norm(y, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("k", [4, 7])
def test_sharded_equals_in_memory_dataset(shards, k):
    """contrib k-means over the shard actors is the same computation as over one in-memory DatasetAssign."""
    x, _ = blobs(seed=k)
    cfg = ClusterConfig(num_cluster=[k], niter=8, nredo=2)
    want = sharded_kmeans(DatasetAssign(x), k, seed=0, cfg=cfg)
    for count in (1, 2, 3):
        run = sharded_kmeans(ShardedDataset(load(shards, x, count)), k, seed=0, cfg=cfg)
        np.testing.assert_array_equal(run.assign, want.assign)
        np.testing.assert_allclose(run.centroids, want.centroids, atol=1e-5)
        assert run.objective == pytest.approx(want.objective, rel=1e-5)
        assert run.iterations == 16 and not run.warm


def test_sharded_dataset_gathers_rows_in_order(shards):
    x, _ = blobs(seed=5)
    data = ShardedDataset(load(shards, x, 3))
    picks = np.array([299, 0, 150, 101, 100, 7])
    assert data.count() == N and data.dim() == D
    np.testing.assert_array_equal(data.get_subset(picks), x[picks])


def test_refine_stops_when_the_objective_stops_improving():
    x, _ = blobs(seed=6)
    cfg = ClusterConfig(num_cluster=[6], niter=10, nredo=3)
    cold = sharded_kmeans(DatasetAssign(x), 6, seed=0, cfg=cfg)
    y = drifted(x)
    warm = sharded_kmeans(DatasetAssign(y), 6, seed=0, cfg=cfg, init=cold.centroids)
    assert warm.warm and warm.iterations < cfg.niter * cfg.nredo
    recold = sharded_kmeans(DatasetAssign(y), 6, seed=0, cfg=cfg)
    assert warm.objective <= recold.objective * (1 + 1e-3)
    _, iterations = refine_kmeans(DatasetAssign(y), cold.centroids, max_iter=2, tolerance=0.0, seed=0)
    assert iterations == 2  # a zero tolerance runs to the cap


def test_sharded_result_fields_and_warm_round(shards):
    x, codes = blobs(seed=3)
    cfg = ClusterConfig(num_cluster=[4, 6], niter=6, nredo=2)
    a = cluster_codes_sharded(ShardedDataset(load(shards, x, 3)), codes, cfg)
    b = cluster_codes_sharded(ShardedDataset(load(shards, x, 2)), codes, cfg)  # same seeded init across shard counts
    for g, k in enumerate(cfg.num_cluster):
        np.testing.assert_array_equal(a.im2cluster[g], b.im2cluster[g])
        np.testing.assert_allclose(a.centroids[g], b.centroids[g], atol=1e-5)
        assert a.density[g].shape == (k,) and len(a.centers[g]) == a.num_distinct[g]
        assert np.allclose(np.linalg.norm(a.centroids[g], axis=1), 1.0, atol=1e-5)
    assert a.warm == [False, False]
    warm = cluster_codes_sharded(ShardedDataset(load(shards, drifted(x), 3)), codes, cfg, previous=a)
    assert warm.warm == [True, True] and all(i < 12 for i in warm.iterations)


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
    want = cluster_codes_sharded(ShardedDataset(create_shards(np.array_split(x, 2))), codes, cfg)
    np.testing.assert_array_equal(res.im2cluster[0], want.im2cluster[0])
    np.testing.assert_array_equal(res.centers[0], want.centers[0])
    np.testing.assert_allclose(res.density[0], want.density[0], rtol=1e-5)
    assert ray.get(actor.info.remote(1))["num_shards"] == 2
    ray.kill(actor)


def test_actor_rounds_are_warm_after_the_first_and_after_a_hand_over(ray_local):
    """Epoch 2 starts from epoch 1's result; a fresh actor (a restart or resume) is warm only when a rank hands
    it the previous result, and then computes what the first actor computed."""
    x, codes = blobs(seed=8)
    cfg = ClusterConfig(num_cluster=[4, 6], niter=6, nredo=2, num_cpus=2)
    first = create_clustering_actor(cfg)
    ray.get(first.submit.remote(1, 0, np.arange(N), x, codes))
    cold = ray.get(first.result.remote(1, 1, N))
    y = drifted(x)
    ray.get(first.submit.remote(2, 0, np.arange(N), y, codes))
    warm = ray.get(first.result.remote(2, 1, N))
    assert cold.warm == [False, False] and warm.warm == [True, True]
    assert ray.get(first.info.remote(2))["warm"]
    ray.kill(first)  # frees its two CPUs
    restarted = create_clustering_actor(cfg)
    ray.get(restarted.submit.remote(2, 0, np.arange(N), y, codes, cold))
    handed = ray.get(restarted.result.remote(2, 1, N))
    for g in range(2):
        np.testing.assert_array_equal(handed.im2cluster[g], warm.im2cluster[g])
    ray.get(restarted.submit.remote(3, 0, np.arange(N), y, codes))  # no hand-over: its own last round
    assert ray.get(restarted.result.remote(3, 1, N)).warm == [True, True]
    ray.kill(restarted)
    empty = create_clustering_actor(cfg)
    ray.get(empty.submit.remote(2, 0, np.arange(N), y, codes))
    assert ray.get(empty.result.remote(2, 1, N)).warm == [False, False]
    ray.kill(empty)


def test_a_retry_waits_for_the_restarting_actor_and_not_for_a_dead_one(ray_local):
    """A killed actor takes a moment to restart (its calls meanwhile fail with "the actor is restarting");
    ``wait_for_restart`` returns once it answers again, and at once for an actor out of restarts."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError

    from cluster.worker import wait_for_restart

    x, codes = blobs(seed=5)
    actor = create_clustering_actor(ClusterConfig(num_cluster=[3]), max_restarts=1)
    ray.get(actor.submit.remote(1, 0, np.arange(N), x, codes))
    waiting = actor.result.remote(1, 2, N)  # waits for a second rank that never comes
    ray.kill(actor, no_restart=False)
    with pytest.raises(ActorUnavailableError):
        ray.get(waiting)
    wait_for_restart(actor)
    assert ray.get(actor.backend.remote(), timeout=5)  # answered at once: the restart is over
    ray.kill(actor, no_restart=True)
    started = time.monotonic()
    wait_for_restart(actor, timeout_s=600)
    assert time.monotonic() - started < 60  # dead for good: no waiting out the timeout
    with pytest.raises(ActorDiedError):
        ray.get(actor.backend.remote())
