"""Training-free reference codes that a trained model must beat: random projection and ITQ of mean-pooled
frame features."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def mean_pool(feats: np.ndarray, block: int = 4096) -> np.ndarray:
    """Mean over frames (N, T, F) → (N, F) float64, a block of videos at a time (``feats`` may be any array
    that slices into numpy, such as a Zarr array)."""
    if feats.ndim != 3:
        raise ValueError(f"feats must be (N, T, F), got shape {feats.shape}")
    return np.concatenate([np.asarray(feats[i:i + block]).mean(axis=1, dtype=np.float64)
                           for i in range(0, feats.shape[0], block)])


def random_projection_codes(
    feats: np.ndarray, nbits: int, seed: int = 0, center: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Sign codes (N, nbits) int8 of a random Gaussian projection of mean-pooled frame features (N, T, F).

    ``center`` (F,) is subtracted before projecting (pass the training mean so query and database share it;
    default: the mean of ``feats``). Returns the codes and the centre used. A sign of exactly 0 maps to +1.
    """
    pooled = mean_pool(feats)
    center = pooled.mean(axis=0) if center is None else np.asarray(center, dtype=np.float64)
    projection = np.random.default_rng(seed).standard_normal((feats.shape[2], nbits))
    return np.where((pooled - center) @ projection >= 0, 1, -1).astype(np.int8), center


@dataclass
class ITQ:
    """Iterative quantisation (Gong & Lazebnik, CVPR 2011) of mean-pooled frame features: PCA to ``nbits``
    dimensions, then the rotation that minimises the quantisation error, fitted on the training videos."""

    mean: np.ndarray  # (F,)
    projection: np.ndarray  # (F, nbits): PCA directions times the learned rotation

    @classmethod
    def fit(cls, train_feats: np.ndarray, nbits: int, iterations: int = 50, seed: int = 0,
            block: int = 4096) -> ITQ:
        """Fit on (N, T, F) features: any array that slices into numpy blocks of ``block`` videos."""
        pooled = mean_pool(train_feats, block)
        if nbits > min(pooled.shape):
            raise ValueError(f"ITQ: {nbits} bits need at least {nbits} training videos and feature dims, got "
                             f"{pooled.shape}")
        mean = pooled.mean(axis=0)
        centred = pooled - mean
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        pca = vt[:nbits].T
        v = centred @ pca
        rotation, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((nbits, nbits)))
        for _ in range(iterations):
            b = np.where(v @ rotation >= 0, 1.0, -1.0)
            u, _, wt = np.linalg.svd(b.T @ v)
            rotation = (u @ wt).T
        return cls(mean, pca @ rotation)

    def codes(self, feats: np.ndarray, block: int = 4096) -> np.ndarray:
        """Sign codes (N, nbits) int8 of (N, T, F) features; a sign of exactly 0 maps to +1."""
        return np.where((mean_pool(feats, block) - self.mean) @ self.projection >= 0, 1, -1).astype(np.int8)
