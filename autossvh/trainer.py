"""The epoch skeleton every trainer shares, and single-process training on in-memory arrays.

One epoch (:func:`run_epoch`, the released training loop of REFERENCE §7): a clustering round if
:func:`should_cluster`, one training epoch and one scheduler step, the sampler's diagnostics on a probe set
(``autossvh.diagnostics``), and an evaluation if :func:`should_evaluate` (every ``train.eval_every`` epochs and
after the last one). A trainer supplies the steps through :class:`EpochSteps`: :class:`ArraySteps` here, on
arrays in one process; ``cluster.worker.TrainWorker`` on a Zarr store across Ray Train workers.

Epochs are 0-based in code, checkpoints and MLflow steps; the progress line counts them from 1 (``epoch 3/8``
is epoch 2).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from autossvh.anchors import input_centers, pooled_inputs
from autossvh.clustering import ClusteringResult, RoundReport
from autossvh.config import Config
from autossvh.diagnostics import PROBE_VIDEOS, SamplerDiagnostics, sampler_diagnostics
from autossvh.engine import (
    EpochStats,
    NonFiniteGuard,
    Retrieval,
    array_batches,
    build_optimizer,
    build_scheduler,
    encode,
    encode_and_cluster,
    evaluate_codes,
    is_distributed,
    seconds_to_text,
    should_cluster,
    train_one_epoch,
)
from autossvh.losses import ClusterTargets
from autossvh.model import AutoSSVH

log = logging.getLogger(__name__)


@dataclass
class EpochRecord:
    """What one epoch did: its learning rate, training statistics, clustering, sampler and evaluation."""

    epoch: int
    lr: float
    stats: EpochStats
    cluster_seconds: float = 0.0
    clustering: RoundReport | None = None
    retrieval: Retrieval | None = None
    sampler: SamplerDiagnostics | None = None
    eval_seconds: float = 0.0


def should_evaluate(cfg: Config, epoch: int) -> bool:
    """Evaluation after every ``train.eval_every`` epochs and after the last one."""
    return (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.num_epochs


class EpochSteps(Protocol):
    """The parts of an epoch that depend on where the data and the model live."""

    model: AutoSSVH  # the model being trained (not DDP-wrapped), whose weights the divergence guard measures

    def learning_rate(self) -> float:
        """The hashing network's learning rate for the coming epoch."""

    def cluster(self, epoch: int) -> ClusteringResult:
        """Encode the training split and cluster it."""

    def train_epoch(self, epoch: int, targets: ClusterTargets | None) -> EpochStats:
        """One training epoch and one scheduler step."""

    def probe_sampler(self) -> SamplerDiagnostics | None:
        """The sampler's diagnostics (None where this process does not compute them)."""

    def evaluate(self, epoch: int) -> Retrieval | None:
        """mAP@K and GMAP of the current model (None where this process does not compute them)."""


def run_epoch(steps: EpochSteps, cfg: Config, epoch: int, device: torch.device) -> EpochRecord:
    """One epoch of the released loop through ``steps``; returns its record."""
    lr = steps.learning_rate()
    steps.model.start_epoch(epoch)
    targets, cluster_seconds, report = None, 0.0, None
    if should_cluster(cfg, epoch):
        tic = time.perf_counter()
        result = steps.cluster(epoch)
        targets = ClusterTargets.from_result(result, device)
        cluster_seconds, report = time.perf_counter() - tic, result.report()
    stats = steps.train_epoch(epoch, targets)
    check_divergence(cfg, epoch, stats, steps.model)
    diagnostics = steps.probe_sampler()
    retrieval, eval_seconds = None, 0.0
    if should_evaluate(cfg, epoch):
        tic = time.perf_counter()
        retrieval = steps.evaluate(epoch)
        eval_seconds = time.perf_counter() - tic
    return EpochRecord(epoch, lr, stats, cluster_seconds, report, retrieval, diagnostics, eval_seconds)


class DivergenceError(RuntimeError):
    """A training epoch left the documented bounds (``train.max_loss``, ``train.max_weight_norm``) or took no
    finite step: the run diverged."""


def check_divergence(cfg: Config, epoch: int, stats: EpochStats, model: torch.nn.Module) -> None:
    """Stop a diverging run after a training epoch, before it is evaluated or checkpointed: raises
    :class:`DivergenceError` naming the epoch, the step and the value when every step's loss was non-finite, the
    epoch's mean loss exceeds ``train.max_loss``, or the L2 norm of all weights is non-finite or exceeds
    ``train.max_weight_norm``. In a distributed run the values are maxima over the ranks, so all stop together."""
    norms = [torch.linalg.vector_norm(p.detach(), dtype=torch.float64) for p in model.parameters()]
    norm = torch.linalg.vector_norm(torch.stack(norms))  # in float64: 1e30 weights do not overflow to inf
    all_skipped = float(stats.steps == 0 and stats.skipped_steps > 0)
    values = torch.tensor([stats.loss, float(norm), all_skipped], dtype=torch.float64, device=norm.device)
    if is_distributed():
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX)
    loss, weight_norm, none_finite = values.tolist()
    where = f"epoch {epoch + 1}, step {stats.steps + stats.skipped_steps} (the epoch's last)"
    t = cfg.train
    if none_finite:
        problem = f"all {stats.skipped_steps} steps of the epoch had a non-finite loss"
    elif not loss <= t.max_loss:  # also NaN
        problem = f"mean loss {loss:.4g} > train.max_loss={t.max_loss:g}"
    elif not weight_norm <= t.max_weight_norm:
        problem = f"weight norm {weight_norm:.4g} > train.max_weight_norm={t.max_weight_norm:g}"
    else:
        return
    raise DivergenceError(f"the run diverged at {where}: {problem}; lower train.lr (now {t.lr:g}) or the loss "
                          "weights, or raise the bound if the value is expected for these features")


def epoch_line(record: EpochRecord, epochs: int, eta: float, val_map5: float | None = None) -> str:
    """The per-epoch progress line: losses, learning rate, throughput, sampler, clustering, evaluation (with
    ``val_map5``, the mAP@5 of videos held out of training, where given), ETA."""
    s = record.stats
    line = (f"epoch {record.epoch + 1}/{epochs} loss {s.loss:.4f} (rec {s.rec:.4f} vc {s.vc:.4f} "
            f"p2set {s.p2set:.4f}) lr {record.lr:.2e} {s.videos_per_s:.0f} videos/s train {s.seconds:.1f}s")
    if record.sampler is not None and math.isfinite(record.sampler.selectivity):
        line += f" selectivity {record.sampler.selectivity:.2f}"
    if record.clustering is not None:
        line += f" clustering {record.cluster_seconds:.1f}s ({'warm' if all(record.clustering.warm) else 'cold'})"
    if s.skipped_steps:
        line += f" skipped {s.skipped_steps} non-finite steps"
    if record.retrieval is not None:
        line += f" eval {record.eval_seconds:.1f}s mAP@5 {record.retrieval.map_at_k[5]:.4f}"
    if val_map5 is not None:
        line += f" val mAP@5 {val_map5:.4f}"
    return f"{line} ETA {seconds_to_text(eta)}"


# ----- single process, arrays in memory ------------------------------------------------------------------------


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


def evaluate_arrays(model: AutoSSVH, data: RetrievalData, device: torch.device, with_pr: bool = False) -> Retrieval:
    """mAP@K and GMAP (L2), optionally precision/recall by radius, of ``model`` on in-memory splits under the
    data's query/database protocol."""
    bs = model.cfg.train.test_batch_size
    query = encode(model, array_batches(data.query, bs), device)
    db = query if data.database is data.query else encode(model, array_batches(data.database, bs), device)
    return evaluate_codes(query.codes, data.query_labels, db.codes, data.database_labels, with_pr)


class ArraySteps:
    """:class:`EpochSteps` on arrays in one process (seeded shuffles, precision/recall at the last epoch)."""

    def __init__(self, cfg: Config, data: RetrievalData, device: torch.device) -> None:
        self.cfg, self.data, self.device = cfg, data, device
        torch.manual_seed(cfg.train.seed)
        np.random.seed(cfg.train.seed)
        self.generator = torch.Generator().manual_seed(cfg.train.seed)
        self.model = AutoSSVH(cfg).to(device)
        if self.model.salience is not None:
            self.model.salience.fit_from(data.train, cfg.train.seed)
        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.guard = NonFiniteGuard(cfg.train.max_nonfinite_steps)
        self.probe = torch.from_numpy(np.asarray(data.train[:PROBE_VIDEOS]))
        self.signal = None if data.train_signal is None else data.train_signal[:PROBE_VIDEOS]
        self.previous: ClusteringResult | None = None  # the last round, for the warm start

    def learning_rate(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def cluster(self, epoch: int) -> ClusteringResult:
        if self.cfg.loss.centers == "input":  # fixed before training: computed at the first round, then kept
            if self.previous is None:
                pooled = pooled_inputs(self.model, array_batches(self.data.train, self.cfg.train.test_batch_size),
                                       self.device)
                self.previous = input_centers(pooled, self.cfg, use_gpu=self.device.type == "cuda")
            return self.previous
        self.previous = encode_and_cluster(self.model, array_batches(self.data.train, self.cfg.train.test_batch_size),
                                           self.cfg, self.device, self.previous)
        return self.previous

    def train_epoch(self, epoch: int, targets: ClusterTargets | None) -> EpochStats:
        batches = shuffled_batches(len(self.data.train), self.cfg.train.batch_size, self.generator)
        stats = train_one_epoch(self.model, _train_batches(self.data.train, batches), self.optimizer, self.cfg,
                                self.device, targets, guard=self.guard)
        self.scheduler.step()
        return stats

    def probe_sampler(self) -> SamplerDiagnostics:
        return sampler_diagnostics(self.model, self.probe, self.signal)

    def evaluate(self, epoch: int) -> Retrieval:
        return evaluate_arrays(self.model, self.data, self.device, with_pr=epoch + 1 == self.cfg.train.num_epochs)


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
    steps = ArraySteps(cfg, data, device)
    history: list[EpochRecord] = []
    start = time.perf_counter()
    epochs = cfg.train.num_epochs
    for epoch in range(epochs):
        record = run_epoch(steps, cfg, epoch, device)
        history.append(record)
        log.info(epoch_line(record, epochs, (time.perf_counter() - start) / (epoch + 1) * (epochs - epoch - 1)))
        if on_epoch is not None:
            on_epoch(record)
    retrieval = history[-1].retrieval
    assert retrieval is not None  # should_evaluate holds at the last epoch
    return FitResult(model=steps.model, history=history, retrieval=retrieval, seconds=time.perf_counter() - start)
