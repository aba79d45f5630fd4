"""Single-process training on in-memory arrays: the released training loop (REFERENCE §7) in one process.

Per epoch: a clustering round if P2Set is on and the epoch is past warm-up, then one training epoch, then one
scheduler step and the sampler's diagnostics on the first training videos (``autossvh.diagnostics``);
evaluation every ``train.eval_every`` epochs and after the last one. Distributed training reuses the same
engine pieces.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from autossvh.config import Config
from autossvh.diagnostics import PROBE_VIDEOS, SamplerDiagnostics, sampler_diagnostics
from autossvh.engine import (
    EpochStats,
    NonFiniteGuard,
    Retrieval,
    array_batches,
    build_optimizer,
    build_scheduler,
    clustering_round,
    encode,
    evaluate_codes,
    seconds_to_text,
    should_cluster,
    train_one_epoch,
)
from autossvh.losses import ClusterTargets
from autossvh.model import AutoSSVH

log = logging.getLogger(__name__)


@dataclass
class RetrievalData:
    """Train features and labelled query/database splits as arrays. Pass the same array object for
    ``query`` and ``database`` (FCVID protocol) or for ``database`` and ``train`` (UCF101/HMDB51) to encode
    it once. ``train_signal`` (N, T): the true per-frame class signal of generated data, for diagnostics."""

    train: np.ndarray
    query: np.ndarray
    query_labels: np.ndarray
    database: np.ndarray
    database_labels: np.ndarray
    train_signal: np.ndarray | None = None


@dataclass
class EpochRecord:
    epoch: int
    lr: float
    stats: EpochStats
    cluster_seconds: float = 0.0
    kmeans_objective: list[float] = field(default_factory=list)
    retrieval: Retrieval | None = None
    distinct_centers: list[int] = field(default_factory=list)
    sampler: SamplerDiagnostics | None = None


@dataclass
class FitResult:
    model: AutoSSVH
    history: list[EpochRecord]
    retrieval: Retrieval
    seconds: float


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator) -> list[Tensor]:
    """Index batches of a fresh permutation; a final batch of one video is dropped (the contrastive loss
    needs two), any other remainder is kept."""
    order = torch.randperm(n, generator=generator)
    batches = list(order.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches.pop()
    return batches


def _train_batches(feats: np.ndarray, index_batches: list[Tensor]) -> Iterator[tuple[Tensor, Tensor]]:
    for index in index_batches:
        rows = np.sort(index.numpy())
        yield torch.from_numpy(np.asarray(feats[rows], dtype=np.float32)), torch.from_numpy(rows)


def evaluate_model(model: AutoSSVH, data: RetrievalData, device: torch.device, with_pr: bool = False) -> Retrieval:
    """mAP@K and GMAP (L2), optionally precision/recall by radius, under the data's query/database protocol."""
    bs = model.cfg.train.test_batch_size
    query = encode(model, array_batches(data.query, bs), device)
    db = query if data.database is data.query else encode(model, array_batches(data.database, bs), device)
    return evaluate_codes(query.codes, data.query_labels, db.codes, data.database_labels, with_pr)


def fit(
    cfg: Config,
    data: RetrievalData,
    device: torch.device | str = "cpu",
    on_epoch: Callable[[EpochRecord], None] | None = None,
) -> FitResult:
    """Train a fresh model for ``cfg.train.num_epochs`` epochs; returns it with its history and the final
    retrieval (mAP@K, GMAP and precision/recall by radius). Model selection: the last epoch."""
    device = torch.device(device)
    if data.train.ndim != 3 or data.train.shape[1:] != (cfg.data.max_frames, cfg.data.feature_size):
        raise ValueError(f"train features have shape {data.train.shape}; the config expects "
                         f"(N, {cfg.data.max_frames}, {cfg.data.feature_size})")
    if len(data.train) < 2:
        raise ValueError(f"the train split has {len(data.train)} videos; at least 2 are needed")
    torch.manual_seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    generator = torch.Generator().manual_seed(cfg.train.seed)
    model = AutoSSVH(cfg).to(device)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    history: list[EpochRecord] = []
    retrieval: Retrieval | None = None
    guard = NonFiniteGuard(cfg.train.max_nonfinite_steps)
    start = time.perf_counter()
    epochs = cfg.train.num_epochs
    for epoch in range(epochs):
        lr = optimizer.param_groups[0]["lr"]
        targets, cluster_seconds, objective, distinct = None, 0.0, [], []
        if should_cluster(cfg, epoch):
            result, cluster_seconds = clustering_round(
                model, array_batches(data.train, cfg.train.test_batch_size), cfg, device)
            objective, distinct = result.objective, result.num_distinct
            targets = ClusterTargets.from_result(result, device)
        index_batches = shuffled_batches(len(data.train), cfg.train.batch_size, generator)
        stats = train_one_epoch(model, _train_batches(data.train, index_batches), optimizer, cfg, device, targets,
                                guard=guard)
        scheduler.step()
        signal = None if data.train_signal is None else data.train_signal[:PROBE_VIDEOS]
        diagnostics = sampler_diagnostics(model, torch.from_numpy(np.asarray(data.train[:PROBE_VIDEOS])), signal)
        evaluation = None
        if (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == epochs:
            evaluation = retrieval = evaluate_model(model, data, device, with_pr=epoch + 1 == epochs)
        record = EpochRecord(epoch, lr, stats, cluster_seconds, objective, evaluation, distinct, diagnostics)
        history.append(record)
        elapsed = time.perf_counter() - start
        log.info(epoch_line(record, epochs, elapsed / (epoch + 1) * (epochs - epoch - 1)))
        if on_epoch is not None:
            on_epoch(record)
    assert retrieval is not None
    return FitResult(model=model, history=history, retrieval=retrieval, seconds=time.perf_counter() - start)


def epoch_line(record: EpochRecord, epochs: int, eta: float, eval_seconds: float | None = None) -> str:
    """The per-epoch progress line: losses, learning rate, throughput, clustering and evaluation, ETA."""
    s = record.stats
    line = (f"epoch {record.epoch + 1}/{epochs} loss {s.loss:.4f} (rec {s.rec:.4f} vc {s.vc:.4f} "
            f"p2set {s.p2set:.4f}) lr {record.lr:.2e} {s.videos_per_s:.0f} videos/s train {s.seconds:.1f}s")
    if record.sampler is not None and math.isfinite(record.sampler.selectivity):
        line += f" selectivity {record.sampler.selectivity:.2f}"
    if record.cluster_seconds:
        line += f" clustering {record.cluster_seconds:.1f}s"
    if s.skipped_steps:
        line += f" skipped {s.skipped_steps} non-finite steps"
    if record.retrieval is not None:
        if eval_seconds is not None:
            line += f" eval {eval_seconds:.1f}s"
        line += f" mAP@5 {record.retrieval.map_at_k[5]:.4f}"
    return f"{line} ETA {seconds_to_text(eta)}"
