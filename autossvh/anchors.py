"""Targets anchored in the input (``loss.centers=input``, not in the paper): hash centres fixed before training.

S5VH (AAAI 2025) fixes its hash centres before training from the input features instead of re-deriving them
from the codes being learned. Here, once, before the first epoch:

1. every training video is pooled from its input frame features with the model's own pooling
   (:meth:`AutoSSVH.pooling_weights`: salience weights under ``model.pooling=salience``, else the mean);
2. k-means at every ``cluster.num_cluster`` granularity runs on those pooled features, centred on their mean
   and L2-normalised (cosine k-means, faiss, the settings of :mod:`autossvh.clustering`);
3. each cluster's binary centre is the bitwise majority of its members' ITQ codes of the pooled features
   (:class:`autossvh.baselines.ITQ`, ``model.nbits`` bits), merged to distinct centres as the voted centres
   are, so clusters that are close in the input get centres that are close in Hamming space.

P2Set then pulls every video's code towards its fixed centre with the loss of the voted centres
(``loss.p2set_temperature``). The targets cannot drift with the codes, so a model cannot satisfy them by coding
what its own codes already separate (for example which video a frame comes from).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from autossvh.baselines import ITQ
from autossvh.clustering import ClusteringResult, cluster_codes
from autossvh.config import Config
from autossvh.engine import Batch, features_of
from autossvh.model import AutoSSVH


@torch.no_grad()
def pooled_inputs(model: AutoSSVH, batches: Iterable[Batch], device: torch.device) -> np.ndarray:
    """Input features (B, T, F) (or tuples led by them) pooled over frames with the model's pooling weights →
    (N, F) float32."""
    pooled = []
    for batch in batches:
        x = features_of(batch).to(device).float()
        weights = model.pooling_weights(x)
        pooled.append((x.mean(1) if weights is None else (x * weights.unsqueeze(-1)).sum(1)).cpu())
    return torch.cat(pooled).numpy()


def input_centers(pooled: np.ndarray, cfg: Config, use_gpu: bool = False) -> ClusteringResult:
    """The fixed clustering of :mod:`autossvh.anchors` from pooled training features (N, F)."""
    centred = pooled - pooled.mean(0, dtype=np.float64)
    normed = (centred / np.maximum(np.linalg.norm(centred, axis=1, keepdims=True), 1e-12)).astype(np.float32)
    itq = ITQ.fit(pooled[:, None, :], cfg.model.nbits, seed=cfg.train.seed)
    codes = itq.codes(pooled[:, None, :])
    return cluster_codes(normed, codes, cfg.cluster, use_gpu)
