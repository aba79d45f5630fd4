"""Component voting (paper §3.4-3.5, App. A.1): a cluster's hash centre is the bitwise majority of members.

For members b_1..b_M in {-1, 0, +1}^nbits, the summed Hamming distance of a centre c in {-1, +1}^nbits is
sum_j 0.5 * (nbits - c . b_j) = 0.5 * (M * nbits - c . S) with S = sum_j b_j, so it is minimised bit by bit by
c_k = sign(S_k) (App. A.1). Where S_k = 0 both signs are optimal; the paper leaves this open (REFERENCE.md
§6.6), and this module fixes the TIE RULE: a tie gives +1. An empty cluster has S = 0 and gets the all-(+1)
centre.

P2Set needs each granularity's centres to be distinct: two k-means clusters whose votes coincide would make
one centre a negative of its own positive (the loss is then floored at log 2 and pushes codes away from
popular centres). :func:`merge_centers` keeps one row per distinct voted code of the non-empty clusters and
maps every video to it, so merged clusters share one target and empty clusters never enter the logits.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["merge_centers", "vote_centers"]


def _codes_array(x: Any, name: str) -> np.ndarray:
    """Return ``x`` (numpy array or torch tensor) as a numpy array whose values are in {-1, 0, +1}."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        a = (x.float() if x.dtype == torch.bfloat16 else x).numpy()
    else:
        a = np.asarray(x)
    if a.dtype == np.bool_ or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise ValueError(f"{name} must be numeric with values in {{-1, 0, +1}}, got dtype {a.dtype}")
    if a.size and not np.all((a == 1) | (a == -1) | (a == 0)):
        raise ValueError(f"{name} has values not in {{-1, 0, +1}}")
    return a


def vote_centers(codes: Any, assignment: Any, n_clusters: int) -> np.ndarray:
    """Bitwise majority-vote hash centre of every cluster, shape (n_clusters, nbits), int8 in {-1, +1}.

    ``codes`` is (N, nbits) in {-1, 0, +1} and ``assignment`` (N,) integer cluster ids in [0, n_clusters);
    numpy arrays or torch tensors. Centre bit k of cluster c is +1 if the sum of its members' bit k is >= 0,
    else -1: a tie (sum exactly 0, including an empty cluster) gives +1. The per-cluster sums are one
    ``index_add_`` over all codes, so 45k x 64 codes into 1000 clusters take milliseconds.
    """
    if isinstance(n_clusters, bool) or not isinstance(n_clusters, (int, np.integer)) or n_clusters < 1:
        raise ValueError(f"n_clusters must be a positive integer, got {n_clusters!r}")
    c = _codes_array(codes, "codes")
    if c.ndim != 2:
        raise ValueError(f"codes must be a 2-D (N, nbits) array, got shape {c.shape}")
    if c.shape[1] == 0:
        raise ValueError(f"codes have zero bits (shape {c.shape})")
    a = assignment.detach().cpu().numpy() if isinstance(assignment, torch.Tensor) else np.asarray(assignment)
    if a.ndim != 1 or a.shape[0] != c.shape[0]:
        raise ValueError(f"assignment must have shape ({c.shape[0]},) to match codes, got shape {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"assignment must hold integer cluster ids, got dtype {a.dtype}")
    if a.size and (a.min() < 0 or a.max() >= n_clusters):
        raise ValueError(f"assignment values must lie in [0, {n_clusters}), got range [{a.min()}, {a.max()}]")
    sums = torch.zeros(int(n_clusters), c.shape[1], dtype=torch.int64)
    if a.size:
        sums.index_add_(0, torch.from_numpy(a.astype(np.int64)), torch.from_numpy(c.astype(np.int64)))
    return np.where(sums.numpy() >= 0, 1, -1).astype(np.int8)


def merge_centers(centers: np.ndarray, assignment: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct voted centres of the non-empty clusters and each video's index into them.

    ``centers`` (k, nbits) are :func:`vote_centers` of the k clusters and ``assignment`` (N,) the cluster of
    every video. Returns ``(distinct (k', nbits) int8, im2center (N,) int64)`` with k' <= the number of
    non-empty clusters; rows are in lexicographic order, so the result is deterministic.
    """
    assignment = np.asarray(assignment, dtype=np.int64)
    used = np.unique(assignment)
    distinct, inverse = np.unique(np.asarray(centers)[used], axis=0, return_inverse=True)
    to_center = np.full(len(centers), -1, dtype=np.int64)
    to_center[used] = inverse.reshape(-1)
    return distinct.astype(np.int8), to_center[assignment]
