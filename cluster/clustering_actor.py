"""The per-run clustering actor: gathers every worker's codes through the Ray object store, runs the
multi-granularity k-means (REFERENCE.md §7.2) and hands one ``ClusteringResult`` back to all workers.

How the Train workers use it (every epoch >= ``cluster.warmup_epoch``)::

    actor = create_clustering_actor(cfg.cluster, num_shards=...)   # once, by the trainer/driver; pass the handle
    # on every rank, after encoding its partition without gradients:
    ray.get(actor.submit.remote(epoch, rank, indices, features, codes))
    result = ray.get(actor.result.remote(epoch, world_size, num_videos))   # blocks until all ranks submitted

Every rank calls ``result``; the first call runs the clustering, later calls (and calls for the same epoch
from other ranks) get the cached result of that epoch, so all ranks see identical arrays. The actor is a
threaded actor (``max_concurrency``) so ``result`` can wait for the remaining ``submit`` calls; no barrier is
needed. ``indices`` are video indices into the training split; padded partitions (DistributedSampler repeats
a few videos to equalise ranks) are de-duplicated by index, keeping the lowest rank's row. The assembled
arrays must cover 0..N-1 exactly (N = ``num_videos`` if given, else max index + 1).

``num_shards`` (the training entry maps a config key, e.g. ``cluster.num_shards``, to it) selects the
backend: 1 runs ``autossvh.clustering.cluster_codes`` in the actor (faiss ``Clustering``, identical to the
in-process computation); > 1 shards the points over ``KMeansShard`` actors and runs Lloyd iterations
coordinated here (:func:`sharded_kmeans`, the pattern of faiss's ``distributed_kmeans.py``): shards compute
assignments, per-centroid partial sums, counts and the objective; the coordinator updates the centroids.
The sharded path is Lloyd k-means with its own seeded initialisation, so it is NOT bit-identical to faiss
``Clustering`` (different RNG, no subsampling to ``max_points_per_centroid``), only equivalent in kind.

faiss-gpu is used only when :func:`autossvh.clustering.faiss_has_gpu` is true inside the actor process
(faiss-cpu has no GPU classes); :meth:`ClusteringActor.info` reports the backend that ran.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import faiss
import numpy as np
import ray

from autossvh.clustering import ClusteringResult, cluster_codes, faiss_has_gpu
from autossvh.config import ClusterConfig

log = logging.getLogger(__name__)

__all__ = [
    "ClusteringActor",
    "KMeansShard",
    "assemble_partitions",
    "cluster_codes_sharded",
    "create_clustering_actor",
    "create_shards",
    "sharded_kmeans",
]

# Relative perturbation used when an empty cluster is re-seeded by splitting another (faiss uses 1/1024).
SPLIT_EPS = 1.0 / 1024.0


def _flat_index(d: int, use_gpu: bool) -> faiss.Index:
    """An exact L2 index, on the GPU only where faiss-gpu sees one."""
    if use_gpu and faiss_has_gpu():
        return faiss.GpuIndexFlatL2(faiss.StandardGpuResources(), d, faiss.GpuIndexFlatConfig())
    return faiss.IndexFlatL2(d)


class KMeansShard:
    """One slice of the points for sharded k-means: the assignment step and the partial sums."""

    def __init__(self, x: np.ndarray | None = None) -> None:
        self.use_gpu = faiss_has_gpu()
        self.x = np.zeros((0, 0), dtype=np.float32)
        if x is not None:
            self.load(x)

    def load(self, x: np.ndarray) -> int:
        """Replace the held points (n, d); returns n."""
        self.x = np.ascontiguousarray(x, dtype=np.float32)
        return len(self.x)

    def size(self) -> int:
        return len(self.x)

    def rows(self, local: np.ndarray) -> np.ndarray:
        """The held rows at the given local positions (for initialisation)."""
        return self.x[np.asarray(local, dtype=np.int64)]

    def assign(self, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Nearest centroid (n,) int64 and its squared L2 distance (n,) float32 for every held point."""
        c = np.ascontiguousarray(centroids, dtype=np.float32)
        index = _flat_index(c.shape[1], self.use_gpu)
        index.add(c)
        dist, idx = index.search(self.x, 1)
        return idx[:, 0].astype(np.int64), dist[:, 0]

    def step(self, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        """One Lloyd E-step: per-centroid sums (k, d) float64, counts (k,) int64 and the objective."""
        k, d = centroids.shape
        assign, dist = self.assign(centroids)
        sums = np.zeros((k, d), dtype=np.float64)
        np.add.at(sums, assign, self.x.astype(np.float64))
        return sums, np.bincount(assign, minlength=k).astype(np.int64), float(dist.astype(np.float64).sum())



def create_shards(parts: list[np.ndarray], num_gpus: float = 0.0) -> list[Any]:
    """Start one ``KMeansShard`` actor per slice (each slice goes through the object store)."""
    remote_cls = ray.remote(num_cpus=0, num_gpus=num_gpus)(KMeansShard)
    return [remote_cls.remote(ray.put(np.ascontiguousarray(p, dtype=np.float32))) for p in parts]


def _update_centroids(sums: np.ndarray, counts: np.ndarray, old: np.ndarray) -> np.ndarray:
    """Lloyd M-step with deterministic empty-cluster handling.

    An empty cluster takes a copy of the currently largest cluster (lowest index on ties) and the two are
    pushed apart symmetrically: even dims x(1 +- eps), odd dims x(1 -/+ eps), as faiss's ``split_clusters``
    does, but choosing the largest cluster instead of faiss's random size-weighted draw; the split cluster's
    count is halved so the next empty one picks another.
    """
    k, d = old.shape
    counts = counts.astype(np.float64).copy()
    new = old.astype(np.float64).copy()
    full = counts > 0
    new[full] = sums[full] / counts[full, None]
    sign = np.where(np.arange(d) % 2 == 0, 1.0, -1.0)
    for ci in np.flatnonzero(~full):
        cj = int(np.argmax(counts))
        new[ci] = new[cj] * (1.0 + sign * SPLIT_EPS)
        new[cj] = new[cj] * (1.0 - sign * SPLIT_EPS)
        counts[ci] = counts[cj] / 2.0
        counts[cj] -= counts[ci]
    return new.astype(np.float32)


def _init_centroids(shards: list[Any], sizes: list[int], k: int, seed: int) -> np.ndarray:
    """k distinct points drawn uniformly (seeded) from the whole set, gathered from the shards holding them."""
    n = sum(sizes)
    picks = np.random.default_rng(seed).choice(n, size=k, replace=False)
    offsets = np.cumsum([0, *sizes])
    owner = np.searchsorted(offsets, picks, side="right") - 1
    rows: dict[int, np.ndarray] = {}
    refs = {s: shards[s].rows.remote(picks[owner == s] - offsets[s]) for s in np.unique(owner)}
    for s, ref in refs.items():
        for g, row in zip(picks[owner == s], ray.get(ref), strict=True):
            rows[int(g)] = row
    return np.stack([rows[int(g)] for g in picks]).astype(np.float32)


def sharded_kmeans(
    shards: list[Any], k: int, seed: int, niter: int, init_centroids: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Lloyd k-means over ``KMeansShard`` actor handles; the coordinator (this function) updates centroids.

    Returns centroids (k, d), assignment (N,) and squared distances (N,) to the final centroids, in shard
    order (shard 0's rows first), and the objective (sum of those squared distances).
    """
    sizes = ray.get([s.size.remote() for s in shards])
    n = sum(sizes)
    if k > n:
        raise ValueError(f"cluster.num_cluster: {k} clusters requested but only {n} training videos")
    if init_centroids is None:
        centroids = _init_centroids(shards, sizes, k, seed)
    else:
        centroids = np.ascontiguousarray(init_centroids, dtype=np.float32)
        if centroids.shape[0] != k:
            raise ValueError(f"init_centroids has {centroids.shape[0]} rows, expected k={k}")
    for it in range(niter):
        parts = ray.get([s.step.remote(centroids) for s in shards])
        sums = np.sum([p[0] for p in parts], axis=0)
        counts = np.sum([p[1] for p in parts], axis=0)
        log.debug("sharded k-means k=%d iter %d objective %.6g", k, it, sum(p[2] for p in parts))
        centroids = _update_centroids(sums, counts, centroids)
    final = ray.get([s.assign.remote(centroids) for s in shards])
    assign = np.concatenate([f[0] for f in final])
    sq_dist = np.concatenate([f[1] for f in final])
    return centroids, assign, sq_dist, float(sq_dist.astype(np.float64).sum())


def cluster_codes_sharded(shards: list[Any], codes: np.ndarray, cfg: ClusterConfig) -> ClusteringResult:
    """``cluster_codes`` with sharded k-means: the shards hold the normalised mean codes (in the row order of
    ``codes``); ``cfg.nredo`` seeded restarts per granularity keep the lowest objective, as faiss does."""
    n = sum(ray.get([s.size.remote() for s in shards]))
    if n != len(codes):
        raise ValueError(f"cluster_codes_sharded: shards hold {n} rows but there are {len(codes)} code rows")
    result = ClusteringResult.empty()
    for g, k in enumerate(cfg.num_cluster):
        best = None
        for redo in range(max(cfg.nredo, 1)):
            run = sharded_kmeans(shards, k, seed=g * 1000 + redo, niter=cfg.niter)
            if best is None or run[3] < best[3]:
                best = run
        result.add_granularity(codes, *best, cfg.kmeans_temperature)
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
        self._shards: list[Any] = []
        self._parts: dict[int, dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
        self._results: dict[int, ClusteringResult] = {}
        self._info: dict[int, dict[str, Any]] = {}
        self._cond = threading.Condition()
        self._compute_lock = threading.Lock()
        log.info("clustering actor: backend %s, %d shard(s)", self.backend(), self.num_shards)

    def backend(self) -> str:
        return "faiss-gpu" if self.use_gpu else "faiss-cpu"

    def submit(self, epoch: int, rank: int, indices: Any, features: Any, codes: Any) -> int:
        """Store rank ``rank``'s partition for ``epoch`` (a resubmission replaces it); returns its row count."""
        part = (np.asarray(indices, dtype=np.int64).reshape(-1), np.asarray(features, np.float32), np.asarray(codes))
        if not (len(part[0]) == len(part[1]) == len(part[2])):
            raise ValueError(f"rank {rank}: {len(part[0])} indices, {len(part[1])} features, {len(part[2])} codes")
        with self._cond:
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
        """Metadata of an epoch's clustering: backend, number of videos/shards, seconds."""
        return dict(self._info[int(epoch)])

    def _compute(self, epoch: int, parts: list[Any], num_videos: int | None) -> ClusteringResult:
        features, codes = assemble_partitions(parts, num_videos)
        start = time.perf_counter()
        if self.num_shards == 1:
            res = cluster_codes(features, codes, self.cfg, use_gpu=self.use_gpu)
        else:
            for k in self.cfg.num_cluster:
                if k > len(features):
                    raise ValueError(
                        f"cluster.num_cluster: {k} clusters requested but only {len(features)} training videos"
                    )
            slices = np.array_split(features, self.num_shards)
            if not self._shards:
                self._shards = create_shards(slices, self.shard_num_gpus)
            else:
                ray.get([s.load.remote(ray.put(p)) for s, p in zip(self._shards, slices, strict=True)])
            res = cluster_codes_sharded(self._shards, codes, self.cfg)
        seconds = time.perf_counter() - start
        self._results[epoch] = res
        self._info[epoch] = {
            "backend": self.backend(), "num_videos": len(features), "num_shards": self.num_shards, "seconds": seconds,
        }
        log.info("epoch %d: clustered %d videos at k=%s in %.2f s", epoch, len(features), self.cfg.num_cluster, seconds)
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
    options: dict[str, Any] = {"num_cpus": 0, "num_gpus": num_gpus, "max_concurrency": max_concurrency,
                               "max_restarts": max_restarts}
    if name is not None:
        options["name"] = name
    return ray.remote(ClusteringActor).options(**options).remote(cfg, num_shards, shard_num_gpus)
