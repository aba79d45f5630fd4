"""Training-free reference rows of an ablation: ITQ codes of a store's videos pooled three ways.

* ``ITQ``: the mean of every frame (what a trained model must beat);
* ``ITQ-salience``: the frame-salience weights of :mod:`autossvh.salience` (the base config's ``salience.*``,
  its bank drawn from the training split): what choosing frames is worth without training;
* ``ITQ-informative`` (generated stores, which record the frames that show the class): the mean of those frames
  alone, the ceiling that a perfect choice of frames gives mean-pooled codes.

ITQ is fitted on the pooled training split and evaluated under the store's protocol. Each row also reports
the share of its pooling weight on informative frames (on generated stores), to set beside the trained rows'
``pooling_precision``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from autossvh.baselines import ITQ
from autossvh.config import Config
from autossvh.engine import Retrieval, evaluate_codes
from autossvh.salience import FrameSalience
from storage.schema import queries_are_database
from storage.store import FeatureStore, open_store

Weigh = Callable[[np.ndarray, str, int], np.ndarray]  # (block (b, T, F), split, first row) -> weights (b, T)


@dataclass
class ReferenceRow:
    row: str
    description: str
    retrieval: Retrieval
    pooling_precision: float  # share of the pooling weight on informative frames of the train split; NaN: unknown


def pool_split(store: FeatureStore, split: str, weigh: Weigh) -> np.ndarray:
    """The weighted mean over frames of every video of ``split`` → (N, F) float64, a shard of videos at a time."""
    feats, block = store.split(split).feats, store.info.shard_videos
    out = []
    for start in range(0, feats.shape[0], block):
        x = np.asarray(feats[start:start + block], dtype=np.float64)
        w = weigh(x, split, start)
        out.append((x * w[..., None]).sum(1) / w.sum(1, keepdims=True))
    return np.concatenate(out)


def itq_of(store: FeatureStore, weigh: Weigh, nbits: int, labels: dict[str, np.ndarray]) -> Retrieval:
    train = pool_split(store, "train", weigh)[:, None, :]
    itq = ITQ.fit(train, nbits)
    query = itq.codes(pool_split(store, "query", weigh)[:, None, :])
    db = query if queries_are_database(store.info.protocol) else itq.codes(
        pool_split(store, "database", weigh)[:, None, :])
    return evaluate_codes(query, labels["query"], db, labels["database"])


def reference_rows(url: str, options: dict[str, Any], cfg: Config) -> list[ReferenceRow]:
    """The training-free rows of :mod:`cluster.reference_codes` for ``cfg.model.nbits`` bits."""
    store = open_store(url, options)
    labels = store.eval_labels()
    n_train = store.num_videos("train")
    salience = FrameSalience(cfg.salience, store.info.feature_dim, store.info.max_frames)
    salience.fit_from(store.split("train").feats, cfg.train.seed, store.info.chunk_videos)
    signals = {name: store.frame_signal(name, store.num_videos(name)) for name in ("train", "query", "database")}

    def uniform(x: np.ndarray, split: str, start: int) -> np.ndarray:
        return np.ones(x.shape[:2])

    def salient(x: np.ndarray, split: str, start: int) -> np.ndarray:
        return salience.weights(salience.scores(torch.from_numpy(x).float())).double().numpy()

    def informative(x: np.ndarray, split: str, start: int) -> np.ndarray:
        shows = signals[split][start:start + len(x)] >= 0.5
        return np.where(shows.any(1, keepdims=True), shows, True).astype(np.float64)  # none: every frame

    def precision(weigh: Weigh) -> float:
        if signals["train"] is None:
            return float("nan")
        n = min(n_train, store.info.shard_videos * 4)
        w = weigh(np.asarray(store.split("train").feats[:n], dtype=np.float64), "train", 0)
        return float((w * (signals["train"][:n] >= 0.5)).sum() / w.sum())

    nbits = cfg.model.nbits
    out = [ReferenceRow("ITQ", "ITQ of mean-pooled features", itq_of(store, uniform, nbits, labels),
                        precision(uniform)),
           ReferenceRow("ITQ-salience", "ITQ, salience-weighted frames", itq_of(store, salient, nbits, labels),
                        precision(salient))]
    if all(signal is not None for signal in signals.values()):
        out.append(ReferenceRow("ITQ-informative", "ITQ, informative frames (ceiling)",
                                itq_of(store, informative, nbits, labels), 1.0))
    return out
