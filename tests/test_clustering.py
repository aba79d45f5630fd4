"""Clustering rounds in one process: warm starts from the previous round (no worse than cold nredo restarts,
fewer iterations, cold where they cannot apply), granularities in parallel threads equal to one after the other,
and the round's report surviving a checkpoint (also one of an earlier version)."""

import faiss
import numpy as np
import pytest

from autossvh.clustering import RoundReport, cluster_codes, parallel_granularities, warm_starts
from autossvh.config import ClusterConfig
from cluster.checkpoint import _record_from_state, _record_state, _result_from_state, _result_state
from tests.conftest import tiny_config


def codes_of(seed: int, n: int = 2000, d: int = 32, classes: int = 40, noise: float = 0.9):
    """Normalised mean codes around class prototypes, and their signs."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(classes, d))[rng.integers(0, classes, n)] + noise * rng.normal(size=(n, d))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return x, np.where(x >= 0, 1, -1).astype(np.int8)


def drift(x: np.ndarray, scale: float = 0.03, seed: int = 1) -> np.ndarray:
    y = x + scale * np.random.default_rng(seed).normal(size=x.shape)
    return (y / np.linalg.norm(y, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def one_thread():
    """One OpenMP thread (granularities one after the other), restored afterwards."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def test_warm_round_is_no_worse_than_cold_and_faster(one_thread):
    cfg = ClusterConfig(num_cluster=[20, 40, 80])
    x, codes = codes_of(0)
    first = cluster_codes(x, codes, cfg)
    assert first.warm == [False] * 3
    y = drift(x)
    cold = cluster_codes(y, codes, cfg)
    warm = cluster_codes(y, codes, cfg, previous=first)
    assert warm.warm == [True] * 3 and cold.warm == [False] * 3
    for g in range(3):  # one local optimum against the best of nredo: close, not always lower
        assert warm.objective[g] <= cold.objective[g] * 1.01
        assert warm.iterations[g] < cold.iterations[g] == cfg.niter * cfg.nredo
    again = cluster_codes(y, codes, cfg, previous=warm)  # codes that did not move: it stays where it was
    for g in range(3):
        assert again.objective[g] <= warm.objective[g] * (1 + 1e-5) and again.iterations[g] <= 3


def test_cold_where_a_warm_start_cannot_apply(one_thread):
    x, codes = codes_of(2, n=600)
    previous = cluster_codes(x, codes, ClusterConfig(num_cluster=[10, 20], nredo=2))
    off = cluster_codes(x, codes, ClusterConfig(num_cluster=[10, 20], nredo=2, warm_start=False), previous=previous)
    assert off.warm == [False, False]
    other_k = cluster_codes(x, codes, ClusterConfig(num_cluster=[10, 30, 5], nredo=2), previous=previous)
    assert other_k.warm == [True, False, False]  # only the first granularity has centroids of its shape


def test_parallel_granularities_equal_one_after_the_other(one_thread):
    cfg = ClusterConfig(num_cluster=[8, 16, 24], nredo=2)
    x, codes = codes_of(3, n=800)
    assert parallel_granularities(cfg.num_cluster, use_gpu=False) == (1, 1)
    serial = cluster_codes(x, codes, cfg)
    faiss.omp_set_num_threads(2)
    assert parallel_granularities(cfg.num_cluster, use_gpu=False) == (2, 1)
    parallel = cluster_codes(x, codes, cfg)
    assert faiss.omp_get_max_threads() == 2  # the workers' thread settings stay in the workers
    for g in range(3):
        np.testing.assert_array_equal(parallel.im2cluster[g], serial.im2cluster[g])
        np.testing.assert_array_equal(parallel.centers[g], serial.centers[g])
        assert parallel.objective[g] == pytest.approx(serial.objective[g], rel=1e-5)


def test_report_counts_empty_and_merged_clusters(one_thread):
    rng = np.random.default_rng(4)
    codes = np.where(rng.random((3, 8)) < 0.5, -1, 1)[rng.integers(0, 3, 300)].astype(np.int8)
    x = (codes / np.sqrt(8) + 0.01 * rng.normal(size=codes.shape)).astype(np.float32)
    report = cluster_codes(x, codes, ClusterConfig(num_cluster=[12], nredo=1)).report()
    assert report.distinct == [3] and report.empty[0] + report.merged[0] == 9  # 12 clusters, 3 distinct codes
    assert report.iterations[0] >= 1 and report.seconds[0] > 0 and report.warm == [False]


def test_round_and_report_survive_a_checkpoint(one_thread):
    x, codes = codes_of(5, n=300)
    result = cluster_codes(x, codes, ClusterConfig(num_cluster=[4, 6], nredo=1))
    back = _result_from_state(_result_state(result))
    assert (back.iterations, back.seconds, back.warm, back.objective) == (
        result.iterations, result.seconds, result.warm, result.objective)
    cfg = ClusterConfig(num_cluster=[4, 6])
    for g, start in enumerate(warm_starts(back, cfg, x.shape[1])):
        np.testing.assert_array_equal(start, result.kmeans_centroids[g])  # raw centroids, not the normalised ones
    earlier_state = _result_state(result)
    del earlier_state["kmeans_centroids"], earlier_state["iterations"]  # a checkpoint of an earlier version
    earlier_result = _result_from_state(earlier_state)
    assert earlier_result.kmeans_centroids == [] and earlier_result.iterations == []
    for g, start in enumerate(warm_starts(earlier_result, cfg, x.shape[1])):
        np.testing.assert_array_equal(start, result.centroids[g])
    from autossvh.engine import EpochStats
    from autossvh.trainer import EpochRecord

    record = EpochRecord(3, 1e-4, EpochStats(1.0, 0.5, 0.3, 0.2, 4, 0, 32, 1.0), 2.5, result.report())
    assert _record_from_state(_record_state(record)).clustering == result.report()
    earlier = _record_state(record)
    del earlier["clustering"]
    earlier |= {"kmeans_objective": [5.0, 4.0], "distinct_centers": [4, 6]}  # a record of an earlier version
    old = _record_from_state(earlier).clustering
    assert isinstance(old, RoundReport) and old.objective == [5.0, 4.0] and old.distinct == [4, 6]
    assert old.iterations == []


def test_the_released_recipe_clusters_cold_every_round():
    assert not tiny_config(recipe="released").cluster.warm_start and tiny_config().cluster.warm_start
