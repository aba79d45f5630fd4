"""Reference codes that a trained model must beat."""

from __future__ import annotations

import numpy as np


def random_projection_codes(
    feats: np.ndarray, nbits: int, seed: int = 0, center: np.ndarray | None = None, block: int = 4096
) -> tuple[np.ndarray, np.ndarray]:
    """Sign codes (N, nbits) int8 of a random Gaussian projection of mean-pooled frame features (N, T, F).

    ``center`` (F,) is subtracted before projecting (pass the training mean so query and database share it;
    default: the mean of ``feats``). Returns the codes and the centre used. A sign of exactly 0 maps to +1.
    """
    if feats.ndim != 3:
        raise ValueError(f"feats must be (N, T, F), got shape {feats.shape}")
    pooled = np.concatenate([feats[i:i + block].mean(axis=1, dtype=np.float64) for i in range(0, len(feats), block)])
    center = pooled.mean(axis=0) if center is None else np.asarray(center, dtype=np.float64)
    projection = np.random.default_rng(seed).standard_normal((feats.shape[2], nbits))
    return np.where((pooled - center) @ projection >= 0, 1, -1).astype(np.int8), center
