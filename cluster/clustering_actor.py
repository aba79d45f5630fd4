"""The per-run clustering actor: gathers every worker's codes through the Ray object store, runs the
multi-granularity k-means (REFERENCE.md §7.2) and hands one ``ClusteringResult`` back to all workers.

How the Train workers use it (every epoch >= ``cluster.warmup_epoch``)::

    actor = create_clustering_actor(cfg.cluster, num_shards=...)   # once, by the trainer/driver; pass the handle
    # on every rank, after encoding its partition without gradients:
    ray.get(actor.submit.remote(epoch, rank, indices, features, codes, previous))   # previous: rank 0, or None
    result = ray.get(actor.result.remote(epoch, world_size, num_videos))   # blocks until all ranks submitted

Every rank calls ``result``; the first call runs the clustering, later calls (and calls for the same epoch
from other ranks) get the cached result of that epoch, so all ranks see identical arrays. The actor is a
threaded actor (``max_concurrency``) so ``result`` can wait for the remaining ``submit`` calls; no barrier is
needed. ``indices`` are video indices into the training split; padded partitions (DistributedSampler repeats
a few videos to equalise ranks) are de-duplicated by index, keeping the lowest rank's row. The assembled
arrays must cover 0..N-1 exactly (N = ``num_videos`` if given, else max index + 1).

Warm start: a round starts from the actor's own previous result, or from the ``previous`` result a rank hands
in with its codes (the workers do so on their first round after a start or resume, from the checkpoint, and
after a failed round, since a restarted actor is empty); without either the round is cold.

``num_shards`` (``cluster.num_shards``) selects the backend: 1 runs ``autossvh.clustering.cluster_codes`` in
the actor (faiss ``Clustering``, granularities in parallel over the actor's ``cluster.num_cpus`` threads);
> 1 holds the points in ``KMeansShard`` actors behind faiss's ``DatasetAssign`` interface
(:class:`ShardedDataset`), so faiss's own ``faiss.contrib.clustering.kmeans`` (Lloyd, empty clusters split
as faiss does) runs the cold rounds unchanged. That function takes neither initial centroids nor a stopping
rule, so a warm sharded round (:func:`refine_kmeans`) is the same iteration from the previous centroids,
built from the same interface and faiss's ``reassign_centroids``. The sharded path is not bit-identical to
faiss ``Clustering`` (another RNG, no subsampling to ``max_points_per_centroid``), only equivalent in kind.

faiss-gpu is used only when :func:`autossvh.clustering.faiss_has_gpu` is true inside the actor process
(faiss-cpu has no GPU classes); :meth:`ClusteringActor.info` reports the backend that ran.
"""

from __future__ import annotations

import contextlib
import io
import logging
import threading
import time
from typing import Any

import faiss
import numpy as np
import ray
from faiss.contrib.clustering import DatasetAssign, DatasetAssignGPU, reassign_centroids
from faiss.contrib.clustering import kmeans as contrib_kmeans

from autossvh.clustering import (
    ClusteringResult,
    KMeansRun,
    check_num_cluster,
    cluster_codes,
    faiss_has_gpu,
    warm_starts,
)
from autossvh.config import ClusterConfig

log = logging.getLogger(__name__)

__all__ = [
    "ClusteringActor",
    "KMeansShard",
    "ShardedDataset",
    "assemble_partitions",
    "cluster_codes_sharded",
    "create_clustering_actor",
    "create_shards",
    "refine_kmeans",
    "sharded_kmeans",
]


def _quiet(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call ``fn`` with stdout discarded: faiss's contrib k-means prints whatever ``verbose`` says."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


class KMeansShard:
    """One slice of the points as a faiss ``DatasetAssign`` (``DatasetAssignGPU`` where faiss-gpu sees a GPU)."""

    def __init__(self, x: np.ndarray, threads: int = 1) -> None:
        faiss.omp_set_num_threads(max(1, threads))
        self.data = self._dataset(x)

    @staticmethod
    def _dataset(x: np.ndarray) -> DatasetAssign:
        x = np.ascontiguousarray(x, dtype=np.float32)
        return DatasetAssignGPU(x, 0) if faiss_has_gpu() else DatasetAssign(x)

    def load(self, x: np.ndarray) -> int:
        """Replace the held points (n, d); returns n."""
        self.data = self._dataset(x)
        return self.data.count()

    def shape(self) -> tuple[int, int]:
        return self.data.count(), self.data.dim()

    def get_subset(self, local: np.ndarray) -> np.ndarray:
        return self.data.get_subset(np.asarray(local, dtype=np.int64))

    def assign_to(self, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Nearest centroid (n,), its squared distance (n,) and the per-centroid sums (k, d) of the held points."""
        return self.data.assign_to(np.ascontiguousarray(centroids, dtype=np.float32))


def create_shards(parts: list[np.ndarray], num_cpus: int = 0, num_gpus: float = 0.0) -> list[Any]:
    """Start one ``KMeansShard`` actor per slice (each slice goes through the object store)."""
    remote_cls = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(KMeansShard)
    return [remote_cls.remote(ray.put(np.ascontiguousarray(p, dtype=np.float32)), num_cpus) for p in parts]


class ShardedDataset(DatasetAssign):
    """faiss's ``DatasetAssign`` interface over ``KMeansShard`` actors, rows in shard order (shard 0 first)."""

    def __init__(self, shards: list[Any]) -> None:
        self.shards = shards
        shapes = ray.get([s.shape.remote() for s in shards])
        self.sizes = [n for n, _ in shapes]
        self.d = shapes[0][1]

    def count(self) -> int:
        return sum(self.sizes)

    def dim(self) -> int:
        return self.d

    def get_subset(self, indices: np.ndarray) -> np.ndarray:
        """Rows at global ``indices``, gathered from the shards holding them, in the order given."""
        indices = np.asarray(indices, dtype=np.int64)
        offsets = np.cumsum([0, *self.sizes])
        owner = np.searchsorted(offsets, indices, side="right") - 1
        out = np.empty((len(indices), self.d), dtype=np.float32)
        held = {s: np.flatnonzero(owner == s) for s in np.unique(owner)}
        refs = {s: self.shards[s].get_subset.remote(indices[pos] - offsets[s]) for s, pos in held.items()}
        for s, ref in refs.items():
            out[held[s]] = ray.get(ref)
        return out

    def assign_to(self, centroids: np.ndarray, weights: np.ndarray | None = None):
        if weights is not None:
            raise ValueError("ShardedDataset: weighted k-means is not supported")
        parts = ray.get([s.assign_to.remote(centroids) for s in self.shards])
        return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                np.sum([p[2] for p in parts], axis=0))


def refine_kmeans(data: DatasetAssign, init: np.ndarray, max_iter: int, tolerance: float,
                  seed: int) -> tuple[np.ndarray, int]:
    """Lloyd iterations from ``init`` until the objective improves by less than ``tolerance`` (relative), at
    most ``max_iter``; empty clusters are split by faiss's ``reassign_centroids``. Returns (centroids, iterations)."""
    rs = np.random.RandomState(seed)
    centroids, last = np.array(init, dtype=np.float32), np.inf
    for it in range(1, max_iter + 1):
        assign, dist, sums = data.assign_to(centroids)
        objective = float(dist.astype(np.float64).sum())
        counts = np.bincount(assign, minlength=len(centroids))
        centroids = (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)
        reassign_centroids(counts, centroids, rs)
        if last - objective < tolerance * last:
            return centroids, it
        last = objective
    return centroids, max_iter


def sharded_kmeans(data: DatasetAssign, k: int, seed: int, cfg: ClusterConfig,
                   init: np.ndarray | None = None) -> KMeansRun:
    """k-means over a ``DatasetAssign``: cold, ``cfg.nredo`` runs of faiss's contrib k-means keeping the lowest
    objective; or warm from ``init`` (:func:`refine_kmeans`)."""
    check_num_cluster(k, data.count())
    tic = time.perf_counter()
    if init is not None:
        centroids, iterations = refine_kmeans(data, init, cfg.niter * cfg.nredo, cfg.warm_tolerance, seed)
        candidates = [centroids]
    else:
        candidates = [_quiet(contrib_kmeans, k, data, niter=cfg.niter, seed=seed * 1000 + redo, verbose=False)
                      for redo in range(cfg.nredo)]
        iterations = cfg.niter * cfg.nredo
    best = None
    for centroids in candidates:
        assign, dist, _ = data.assign_to(centroids)
        if best is None or dist.astype(np.float64).sum() < best[2].astype(np.float64).sum():
            best = (centroids, assign, dist)
    centroids, assign, dist = best
    return KMeansRun(np.asarray(centroids, np.float32), assign.astype(np.int64), dist, iterations,
                     time.perf_counter() - tic, init is not None)


def cluster_codes_sharded(data: ShardedDataset, codes: np.ndarray, cfg: ClusterConfig,
                          previous: ClusteringResult | None = None) -> ClusteringResult:
    """``cluster_codes`` with sharded k-means: the shards hold the normalised mean codes (in the row order of
    ``codes``); granularities run one after the other, each over all shards."""
    if data.count() != len(codes):
        raise ValueError(f"cluster_codes_sharded: shards hold {data.count()} rows but there are {len(codes)} code rows")
    result = ClusteringResult.empty()
    for g, (k, init) in enumerate(zip(cfg.num_cluster, warm_starts(previous, cfg, data.dim()), strict=True)):
        result.add_granularity(codes, sharded_kmeans(data, k, g, cfg, init), cfg.kmeans_temperature)
    return result


def assemble_partitions(
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]], num_videos: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Features and codes (N, nbits) ordered by video index from (indices, features, codes) partitions.

    Duplicated indices (padded partitions) keep the first occurrence in ``parts`` order; the indices must
    cover 0..N-1 exactly, else a ValueError names the missing ones.
    """
    if not parts:
        raise ValueError("no partitions submitted")
    idx = np.concatenate([np.asarray(p[0], dtype=np.int64).reshape(-1) for p in parts])
    feats = np.concatenate([np.asarray(p[1], dtype=np.float32) for p in parts])
    codes = np.concatenate([np.asarray(p[2]) for p in parts])
    if not (len(idx) == len(feats) == len(codes)):
        raise ValueError(f"partition lengths differ: {len(idx)} indices, {len(feats)} features, {len(codes)} codes")
    if len(idx) and idx.min() < 0:
        raise ValueError(f"negative video index {idx.min()}")
    n = int(num_videos) if num_videos is not None else int(idx.max()) + 1
    if len(idx) and idx.max() >= n:
        raise ValueError(f"video index {idx.max()} out of range for {n} videos")
    uniq, first = np.unique(idx, return_index=True)
    if len(uniq) != n:
        missing = np.setdiff1d(np.arange(n), uniq)
        raise ValueError(
            f"clustering needs codes for all {n} videos; {len(missing)} missing, indices {missing[:20].tolist()}"
            + (" ..." if len(missing) > 20 else "")
        )
    return feats[first], codes[first]


class ClusteringActor:
    """Per-run clustering service; create it as a Ray actor with :func:`create_clustering_actor`."""

    def __init__(self, cfg: ClusterConfig, num_shards: int = 1, shard_num_gpus: float = 0.0) -> None:
        if num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {num_shards}")
        self.cfg = cfg
        self.num_shards = int(num_shards)
        self.shard_num_gpus = shard_num_gpus
        self.use_gpu = faiss_has_gpu()
        faiss.omp_set_num_threads(max(1, cfg.num_cpus))
        self._shards: list[Any] = []
        self._previous: ClusteringResult | None = None
        self._parts: dict[int, dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
        self._results: dict[int, ClusteringResult] = {}
        self._info: dict[int, dict[str, Any]] = {}
        self._cond = threading.Condition()
        self._compute_lock = threading.Lock()
        log.info("clustering actor: backend %s, %d shard(s)", self.backend(), self.num_shards)

    def backend(self) -> str:
        return "faiss-gpu" if self.use_gpu else "faiss-cpu"

    def submit(self, epoch: int, rank: int, indices: Any, features: Any, codes: Any,
               previous: ClusteringResult | None = None) -> int:
        """Store rank ``rank``'s partition for ``epoch`` (a resubmission replaces it); returns its row count.
        ``previous``: the last round's result for a warm start, from a worker that knows it (see the module)."""
        part = (np.asarray(indices, dtype=np.int64).reshape(-1), np.asarray(features, np.float32), np.asarray(codes))
        if not (len(part[0]) == len(part[1]) == len(part[2])):
            raise ValueError(f"rank {rank}: {len(part[0])} indices, {len(part[1])} features, {len(part[2])} codes")
        with self._cond:
            if previous is not None:
                self._previous = previous
            self._parts.setdefault(int(epoch), {})[int(rank)] = part
            self._cond.notify_all()
        return len(part[0])

    def result(
        self, epoch: int, world_size: int, num_videos: int | None = None, timeout_s: float = 600.0
    ) -> ClusteringResult:
        """The clustering of ``epoch``, computed once when ranks 0..world_size-1 have all submitted.

        Waits up to ``timeout_s`` for missing ranks, then raises TimeoutError naming them.
        """
        epoch = int(epoch)
        with self._compute_lock:
            if epoch in self._results:
                return self._results[epoch]
            with self._cond:
                ready = self._cond.wait_for(
                    lambda: all(r in self._parts.get(epoch, {}) for r in range(world_size)), timeout=timeout_s
                )
                got = self._parts.get(epoch, {})
                if not ready:
                    missing = [r for r in range(world_size) if r not in got]
                    raise TimeoutError(f"epoch {epoch}: no codes from rank(s) {missing} after {timeout_s} s")
                parts = [got[r] for r in range(world_size)]
            res = self._compute(epoch, parts, num_videos)
            with self._cond:
                self._parts.pop(epoch, None)
                for old in [e for e in self._results if e < epoch - 1]:
                    self._results.pop(old)
                    self._info.pop(old, None)
            return res

    def received(self, epoch: int) -> list[int]:
        """Ranks whose partition of ``epoch`` is here (a round in progress; for monitoring)."""
        with self._cond:
            return sorted(self._parts.get(int(epoch), {}))

    def info(self, epoch: int) -> dict[str, Any]:
        """Metadata of an epoch's clustering: backend, number of videos/shards, seconds, warm or cold."""
        return dict(self._info[int(epoch)])

    def _compute(self, epoch: int, parts: list[Any], num_videos: int | None) -> ClusteringResult:
        features, codes = assemble_partitions(parts, num_videos)
        start = time.perf_counter()
        if self.num_shards == 1:
            res = cluster_codes(features, codes, self.cfg, use_gpu=self.use_gpu, previous=self._previous)
        else:
            for k in self.cfg.num_cluster:
                check_num_cluster(k, len(features))
            slices = np.array_split(features, self.num_shards)
            if not self._shards:
                self._shards = create_shards(slices, self.cfg.num_cpus, self.shard_num_gpus)
            else:
                ray.get([s.load.remote(ray.put(p)) for s, p in zip(self._shards, slices, strict=True)])
            res = cluster_codes_sharded(ShardedDataset(self._shards), codes, self.cfg, self._previous)
        seconds = time.perf_counter() - start
        self._results[epoch], self._previous = res, res
        self._info[epoch] = {
            "backend": self.backend(), "num_videos": len(features), "num_shards": self.num_shards, "seconds": seconds,
            "warm": all(res.warm),
        }
        log.info("epoch %d: clustered %d videos at k=%s in %.2f s (%s)", epoch, len(features), self.cfg.num_cluster,
                 seconds, "warm" if all(res.warm) else "cold")
        return res


def create_clustering_actor(
    cfg: ClusterConfig,
    num_shards: int = 1,
    num_gpus: float = 0.0,
    shard_num_gpus: float = 0.0,
    name: str | None = None,
    max_concurrency: int = 64,
    max_restarts: int = 3,
) -> Any:
    """Start the clustering actor; ``max_concurrency`` must exceed the world size so ``result`` can wait.

    A killed actor is restarted (up to ``max_restarts`` times) empty; calls in flight fail, and the Train workers
    redo that epoch's round on the restarted actor (``cluster.train``)."""
    options: dict[str, Any] = {"num_cpus": cfg.num_cpus, "num_gpus": num_gpus, "max_concurrency": max_concurrency,
                               "max_restarts": max_restarts}
    if name is not None:
        options["name"] = name
    return ray.remote(ClusteringActor).options(**options).remote(cfg, num_shards, shard_num_gpus)
