"""Multi-granularity k-means over the training codes, cluster densities and component-voted centres.

Inputs and outputs are plain numpy arrays so the same computation can run in-process or in a remote actor.
k-means follows the released settings (REFERENCE.md §7.2): faiss ``Clustering`` on the L2-normalised mean
codes with niter 20, nredo 5, seed = the granularity's position, max/min points per centroid 200/2, squared
L2; nearest-centroid assignment; centroids L2-normalised afterwards.

Warm start (``cluster.warm_start``, not in the released code): codes drift slowly from one epoch to the next,
so a round given the ``previous`` round's result starts each granularity from that round's centroids, once,
and iterates until the objective improves by less than ``cluster.warm_tolerance`` (relative) per iteration,
at most ``niter * nredo`` iterations (the cold round's budget). The first round, and any round without a
previous result of the same granularities, is cold: ``nredo`` seeded restarts keep the lowest objective.
Granularities are independent, so they run in parallel threads (faiss releases the GIL) whenever the process
has more than one OpenMP thread or a GPU; each thread gets its share of the threads.

Density (PCL concentration) per cluster c with n_c members and squared distances D_i:
phi_c = mean(sqrt(D_i)) / ln(n_c + 10) if n_c > 1, else the max phi over clusters with n_c > 1; clipped to its
[10th, 90th] percentiles, then floored at ``DENSITY_FLOOR`` (the released code can reach 0 here and divide by
zero, REFERENCE §12.2 #4), then rescaled to mean ``kmeans_temperature``.

Voted centres (paper): the bitwise majority of each cluster's binary codes (:func:`autossvh.voting.vote_centers`,
a tie gives +1), then merged to the distinct codes of the non-empty clusters
(:func:`autossvh.voting.merge_centers`): ``im2center`` maps each video to its centre, and no granularity ever
holds two identical centres or an empty cluster's.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import faiss
import numpy as np

from autossvh.config import ClusterConfig
from autossvh.voting import merge_centers, vote_centers

DENSITY_FLOOR = 1e-3


@dataclass
class KMeansRun:
    """One granularity's k-means: raw centroids (k, d), each point's cluster (N,) and squared distance (N,)
    to it under the final centroids, Lloyd iterations (a cold round: niter x nredo), seconds, and whether it
    was started from the previous round's centroids."""

    centroids: np.ndarray
    assign: np.ndarray
    sq_dist: np.ndarray
    iterations: int
    seconds: float
    warm: bool

    @property
    def objective(self) -> float:
        """The k-means objective of the final centroids: the sum of squared distances."""
        return float(self.sq_dist.astype(np.float64).sum())


@dataclass
class RoundReport:
    """What one clustering round did, per granularity: the k-means objective, Lloyd iterations, seconds,
    empty clusters, clusters merged into another's voted centre, distinct centres, and warm or cold start."""

    objective: list[float]
    iterations: list[int]
    seconds: list[float]
    empty: list[int]
    merged: list[int]
    distinct: list[int]
    warm: list[bool]

    def metrics(self) -> dict[str, list[float]]:
        """Metric name (without the granularity) → one value per granularity."""
        named = {"kmeans_objective": self.objective, "kmeans_iterations": self.iterations,
                 "kmeans_seconds": self.seconds, "empty_clusters": self.empty, "merged_clusters": self.merged,
                 "distinct_centers": self.distinct, "warm_start": self.warm}
        return {name: [float(v) for v in values] for name, values in named.items()}


@dataclass
class ClusteringResult:
    """One clustering round, per granularity: k-means assignments ``im2cluster`` (N,), L2-normalised
    centroids (k, nbits), densities (k,) and the final k-means objective (the prototype loss's inputs); the
    distinct voted centres ``centers`` (k', nbits) int8 +-1 and each video's centre ``im2center`` (N,) (the
    voted P2Set's inputs); the Lloyd iterations, seconds and warm start of each granularity's k-means, and its
    raw (unnormalised) centroids ``kmeans_centroids``, where the next round's warm start begins."""

    im2cluster: list[np.ndarray]
    centers: list[np.ndarray]
    centroids: list[np.ndarray]
    density: list[np.ndarray]
    objective: list[float]
    im2center: list[np.ndarray]
    iterations: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    warm: list[bool] = field(default_factory=list)
    kmeans_centroids: list[np.ndarray] = field(default_factory=list)

    @classmethod
    def empty(cls) -> ClusteringResult:
        return cls([], [], [], [], [], [])

    @property
    def num_distinct(self) -> list[int]:
        """Distinct voted centres per granularity."""
        return [len(c) for c in self.centers]

    @property
    def num_empty(self) -> list[int]:
        """k-means clusters without a member, per granularity."""
        return [len(c) - len(np.unique(a)) for c, a in zip(self.centroids, self.im2cluster, strict=True)]

    @property
    def num_merged(self) -> list[int]:
        """Non-empty clusters whose voted centre another cluster already holds, per granularity."""
        return [len(c) - e - d for c, e, d in zip(self.centroids, self.num_empty, self.num_distinct, strict=True)]

    def report(self) -> RoundReport:
        return RoundReport(list(self.objective), list(self.iterations), list(self.seconds), self.num_empty,
                           self.num_merged, self.num_distinct, list(self.warm))

    def add_granularity(self, codes: np.ndarray, run: KMeansRun, temperature: float) -> None:
        """Append one k-means outcome: voted centres of ``codes``, normalised centroids and densities."""
        k = len(run.centroids)
        norms = np.linalg.norm(run.centroids, axis=1, keepdims=True)
        self.im2cluster.append(run.assign)
        centers, im2center = merge_centers(vote_centers(codes, run.assign, k), run.assign)
        self.centers.append(centers)
        self.im2center.append(im2center)
        self.centroids.append((run.centroids / np.maximum(norms, 1e-12)).astype(np.float32))
        self.density.append(cluster_density(run.sq_dist, run.assign, k, temperature))
        self.objective.append(run.objective)
        self.iterations.append(run.iterations)
        self.seconds.append(run.seconds)
        self.warm.append(run.warm)
        self.kmeans_centroids.append(run.centroids)


def faiss_has_gpu() -> bool:
    """True only for a faiss-gpu build that sees a GPU (faiss-cpu silently lacks the GPU classes)."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _flat_index(d: int, use_gpu: bool) -> faiss.Index:
    """An exact L2 index, on the GPU only where :func:`faiss_has_gpu`."""
    if use_gpu and faiss_has_gpu():
        return faiss.GpuIndexFlatL2(faiss.StandardGpuResources(), d, faiss.GpuIndexFlatConfig())
    return faiss.IndexFlatL2(d)


def check_num_cluster(k: int, n: int) -> None:
    """k-means needs at least as many points as clusters."""
    if k > n:
        raise ValueError(f"cluster.num_cluster: {k} clusters requested but only {n} training videos")


def kmeans(x: np.ndarray, k: int, seed: int, cfg: ClusterConfig, use_gpu: bool = False,
           init: np.ndarray | None = None) -> KMeansRun:
    """faiss k-means of (N, d) float32 rows: cold (``cfg.nredo`` seeded restarts), or warm from ``init``
    (k, d) until the relative improvement falls below ``cfg.warm_tolerance``. ``use_gpu`` is honoured only
    where :func:`faiss_has_gpu`."""
    n, d = x.shape
    check_num_cluster(k, n)
    tic = time.perf_counter()
    x = np.ascontiguousarray(x, dtype=np.float32)
    params = faiss.ClusteringParameters()
    params.niter, params.nredo, params.seed = cfg.niter, cfg.nredo, seed
    params.max_points_per_centroid = cfg.max_points_per_centroid
    params.min_points_per_centroid = cfg.min_points_per_centroid
    if init is not None:
        params.niter, params.nredo = cfg.niter * cfg.nredo, 1
        params.early_stop_threshold = cfg.warm_tolerance
    clus = faiss.Clustering(d, k, params)
    if init is not None:
        faiss.copy_array_to_vector(np.ascontiguousarray(init, dtype=np.float32).ravel(), clus.centroids)
    index = _flat_index(d, use_gpu)
    clus.train(x, index)
    centroids = faiss.vector_to_array(clus.centroids).reshape(k, d)
    dist, assign = index.search(x, 1)
    # faiss keeps the statistics of the restarts up to the best one only, so a cold round reports its budget
    iterations = int(clus.iteration_stats.size()) if init is not None else params.niter * params.nredo
    return KMeansRun(centroids, assign[:, 0].astype(np.int64), dist[:, 0], iterations, time.perf_counter() - tic,
                     init is not None)


def cluster_density(sq_dist: np.ndarray, assign: np.ndarray, k: int, temperature: float) -> np.ndarray:
    """Per-cluster temperature phi (k,), mean ``temperature``, never below a positive floor."""
    counts = np.bincount(assign, minlength=k)
    spread = np.bincount(assign, weights=np.sqrt(np.maximum(sq_dist, 0.0)), minlength=k)
    many = counts > 1
    phi = np.zeros(k, dtype=np.float64)
    phi[many] = spread[many] / counts[many] / np.log(counts[many] + 10)
    phi[~many] = phi[many].max() if many.any() else 1.0
    phi = np.clip(phi, np.percentile(phi, 10), np.percentile(phi, 90))
    phi = np.maximum(phi, DENSITY_FLOOR)
    return (temperature * phi / phi.mean()).astype(np.float32)


def warm_starts(previous: ClusteringResult | None, cfg: ClusterConfig, dim: int) -> list[np.ndarray | None]:
    """Per granularity, the previous round's centroids to start from, or None (a cold start): warm only with
    ``cfg.warm_start`` and a previous round whose centroids at that position have shape (k, ``dim``). The raw
    k-means centroids are used; a result without them (a checkpoint of an earlier version) gives its normalised
    ones, which cost a few more iterations."""
    if previous is None or not cfg.warm_start:
        return [None] * len(cfg.num_cluster)
    old = previous.kmeans_centroids or previous.centroids
    return [old[g] if g < len(old) and old[g].shape == (k, dim) else None for g, k in enumerate(cfg.num_cluster)]


def parallel_granularities(num_cluster: list[int], use_gpu: bool) -> tuple[int, int]:
    """(granularities run at once, OpenMP threads for each): all at once on a GPU; on CPU as many as this
    process has OpenMP threads (Ray sets them from the actor's ``num_cpus``), the threads split among them."""
    threads = faiss.omp_get_max_threads()
    if use_gpu and faiss_has_gpu():
        return len(num_cluster), threads
    workers = max(1, min(len(num_cluster), threads))
    return workers, max(1, threads // workers)


def cluster_codes(features: np.ndarray, codes: np.ndarray, cfg: ClusterConfig, use_gpu: bool = False,
                  previous: ClusteringResult | None = None) -> ClusteringResult:
    """k-means of the normalised mean codes (N, nbits) at every ``cfg.num_cluster`` granularity, warm from
    ``previous`` where it fits, with densities and the bitwise-majority centres of the binary codes (N, nbits)
    of each cluster's members."""
    if len(features) != len(codes):
        raise ValueError(f"cluster_codes: {len(features)} feature rows but {len(codes)} code rows")
    for k in cfg.num_cluster:
        check_num_cluster(k, len(features))
    inits = warm_starts(previous, cfg, features.shape[1])
    workers, threads = parallel_granularities(cfg.num_cluster, use_gpu)

    def one(g: int) -> KMeansRun:
        if workers > 1:
            faiss.omp_set_num_threads(threads)  # this thread's OpenMP setting only
        return kmeans(features, cfg.num_cluster[g], g, cfg, use_gpu, inits[g])

    largest_first = sorted(range(len(cfg.num_cluster)), key=lambda g: -cfg.num_cluster[g])  # balances the threads
    with ThreadPoolExecutor(workers) as pool:
        runs = dict(zip(largest_first, pool.map(one, largest_first), strict=True))
    result = ClusteringResult.empty()
    for g in range(len(cfg.num_cluster)):
        result.add_granularity(codes, runs[g], cfg.kmeans_temperature)
    return result
