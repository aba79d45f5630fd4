"""Multi-granularity k-means over the training codes, cluster densities and component-voted centres.

Inputs and outputs are plain numpy arrays so the same computation can run in-process or in a remote actor.
k-means follows the released settings (REFERENCE.md §7.2): faiss ``Clustering`` on the L2-normalised mean
codes with niter 20, nredo 5, seed = the granularity's position, max/min points per centroid 200/2, squared
L2; nearest-centroid assignment; centroids L2-normalised afterwards.

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

from dataclasses import dataclass

import faiss
import numpy as np

from autossvh.config import ClusterConfig
from autossvh.voting import merge_centers, vote_centers

DENSITY_FLOOR = 1e-3


@dataclass
class ClusteringResult:
    """One clustering round, per granularity: k-means assignments ``im2cluster`` (N,), L2-normalised
    centroids (k, nbits), densities (k,) and the final k-means objective (the prototype loss's inputs); the
    distinct voted centres ``centers`` (k', nbits) int8 +-1 and each video's centre ``im2center`` (N,) (the
    voted P2Set's inputs)."""

    im2cluster: list[np.ndarray]
    centers: list[np.ndarray]
    centroids: list[np.ndarray]
    density: list[np.ndarray]
    objective: list[float]
    im2center: list[np.ndarray]

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

    def add_granularity(self, codes: np.ndarray, centroids: np.ndarray, assign: np.ndarray, sq_dist: np.ndarray,
                        objective: float, temperature: float) -> None:
        """Append one k-means outcome: voted centres of ``codes``, normalised centroids and densities."""
        k = len(centroids)
        norms = np.linalg.norm(centroids, axis=1, keepdims=True)
        self.im2cluster.append(assign)
        centers, im2center = merge_centers(vote_centers(codes, assign, k), assign)
        self.centers.append(centers)
        self.im2center.append(im2center)
        self.centroids.append((centroids / np.maximum(norms, 1e-12)).astype(np.float32))
        self.density.append(cluster_density(sq_dist, assign, k, temperature))
        self.objective.append(objective)


def faiss_has_gpu() -> bool:
    """True only for a faiss-gpu build that sees a GPU (faiss-cpu silently lacks the GPU classes)."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def kmeans(
    x: np.ndarray, k: int, seed: int, cfg: ClusterConfig, use_gpu: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """faiss k-means of (N, d) float32 rows; returns centroids (k, d), assignment (N,), squared distance (N,)
    and the final objective. ``use_gpu`` is honoured only where :func:`faiss_has_gpu`."""
    n, d = x.shape
    if k > n:
        raise ValueError(f"cluster.num_cluster: {k} clusters requested but only {n} training videos")
    x = np.ascontiguousarray(x, dtype=np.float32)
    clus = faiss.Clustering(d, k)
    clus.niter = cfg.niter
    clus.nredo = cfg.nredo
    clus.seed = seed
    clus.max_points_per_centroid = cfg.max_points_per_centroid
    clus.min_points_per_centroid = cfg.min_points_per_centroid
    clus.verbose = False
    if use_gpu and faiss_has_gpu():
        index = faiss.GpuIndexFlatL2(faiss.StandardGpuResources(), d, faiss.GpuIndexFlatConfig())
    else:
        index = faiss.IndexFlatL2(d)
    clus.train(x, index)
    centroids = faiss.vector_to_array(clus.centroids).reshape(k, d)
    dist, assign = index.search(x, 1)
    stats = clus.iteration_stats
    objective = float(stats.at(stats.size() - 1).obj) if stats.size() else float("nan")
    return centroids, assign[:, 0].astype(np.int64), dist[:, 0], objective


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


def cluster_codes(
    features: np.ndarray, codes: np.ndarray, cfg: ClusterConfig, use_gpu: bool = False
) -> ClusteringResult:
    """k-means of the normalised mean codes (N, nbits) at every ``cfg.num_cluster`` granularity, with
    densities and the bitwise-majority centres of the binary codes (N, nbits) of each cluster's members."""
    if len(features) != len(codes):
        raise ValueError(f"cluster_codes: {len(features)} feature rows but {len(codes)} code rows")
    result = ClusteringResult.empty()
    for seed, k in enumerate(cfg.num_cluster):
        result.add_granularity(codes, *kmeans(features, k, seed, cfg, use_gpu), cfg.kmeans_temperature)
    return result
