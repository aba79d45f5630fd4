"""Shared tiny configurations and data for the tests, and the one Ray instance of the test session."""

import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from autossvh.clustering import ClusteringResult
from autossvh.config import Config, build_config
from autossvh.voting import merge_centers

TINY = [
    "data.feature_size=16", "data.max_frames=8", "model.hidden_size=32", "model.encoder_depth=2",
    "model.encoder_heads=2", "model.decoder_dim=16", "model.decoder_depth=1", "model.decoder_heads=2",
    "model.nbits=16", "sampler.mask_prob=0.5", "train.batch_size=8", "cluster.num_cluster=[3, 5]",
]


def tiny_config(*overrides: str, recipe: str = "paper") -> Config:
    return build_config("ucf101", recipe, overrides=[*TINY, *overrides])


def random_clustering(n: int, nbits: int, sizes: list[int], seed: int = 0) -> ClusteringResult:
    """A clustering result of the right shapes with random content (for loss/gradient tests)."""
    rng = np.random.default_rng(seed)
    result = ClusteringResult.empty()
    for k in sizes:
        centroids = rng.normal(size=(k, nbits)).astype(np.float32)
        assign = rng.integers(0, k, size=n)
        result.im2cluster.append(assign)
        centers, im2center = merge_centers(np.where(rng.random((k, nbits)) < 0.5, -1, 1).astype(np.int8), assign)
        result.centers.append(centers)
        result.im2center.append(im2center)
        result.centroids.append(centroids / np.linalg.norm(centroids, axis=1, keepdims=True))
        result.density.append(rng.uniform(0.1, 0.3, size=k).astype(np.float32))
        result.objective.append(0.0)
    return result


def bound_arguments(func: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The arguments of a call to ``func`` by parameter name (spies check names, not positions)."""
    return inspect.signature(func).bind(*args, **kwargs).arguments


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
    np.random.seed(0)


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ray_session() -> str:
    """One local Ray instance for the whole session (4 logical CPUs: 2 Train workers, a trial or job driver and
    driver-side tasks), on 127.0.0.1 without the dashboard; yields its GCS address for subprocess jobs."""
    import ray

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(num_cpus=4, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}})
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_store_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A UCF101-like feature store shaped for ``TINY`` (160 train videos, T=8, F=16, 8 classes), read-only."""
    from storage.synthetic_store import write_synthetic

    url = str(tmp_path_factory.mktemp("data") / "ucf101-tiny")
    write_synthetic(url, "ucf101", 160, feature_dim=16, max_frames=8, num_classes=8, seed=1)
    return url
