"""The one-epoch engine that every trainer reuses: optimiser, schedule, ``train_one_epoch``, ``encode``, a
clustering round in one process, retrieval evaluation of codes, and model save/load as state dicts."""

from __future__ import annotations

import contextlib
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from autossvh.clustering import ClusteringResult, cluster_codes
from autossvh.config import Config, config_from_dict
from autossvh.losses import ClusterTargets, autossvh_loss
from autossvh.metrics import gmap_l2, map_at_k, precision_recall_by_radius
from autossvh.model import AutoSSVH, video_codes

Batch = Tensor | tuple[Tensor, Tensor] | list[Tensor]


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """Adam over all parameters (the released optimiser), with the fused kernel (same update, one pass).

    With ``sampler.lr_scale`` != 1 Grade-Net's parameters form a second group at ``lr * lr_scale``; the
    first group is the hashing network's, whose learning rate the logs report."""
    lr, scale = cfg.train.lr, cfg.sampler.lr_scale
    grade_net = getattr(getattr(model, "encoder", None), "grade_net", None)
    if grade_net is None or scale == 1.0:
        groups: list[dict[str, Any]] = [{"params": list(model.parameters())}]
    else:
        sampler_ids = {id(p) for p in grade_net.parameters()}
        groups = [{"params": [p for p in model.parameters() if id(p) not in sampler_ids]},
                  {"params": list(grade_net.parameters()), "lr": lr * scale}]
    return torch.optim.Adam(groups, lr=lr, weight_decay=cfg.train.weight_decay, fused=True)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config) -> torch.optim.lr_scheduler.LambdaLR:
    """StepLR (``lr_step`` epochs, ``lr_gamma``) floored at ``min_lr``; stepped once per epoch."""
    t = cfg.train
    floor = t.min_lr / t.lr
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: max(t.lr_gamma ** (e // t.lr_step), floor))


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with native bf16 matrix units (AMX or AVX512-BF16), where bf16 autocast pays off."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def autocast_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """bf16 when autocast is enabled and pays off on ``device`` (CUDA, CPUs with native bf16); None: fp32."""
    if enabled and (device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16())):
        return torch.bfloat16
    return None


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast when enabled, on CUDA and on CPUs with native bf16; a no-op elsewhere (fp32)."""
    dtype = autocast_dtype(device, enabled)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class EpochStats:
    loss: float
    rec: float
    vc: float
    p2set: float
    steps: int
    skipped_steps: int  # steps whose loss was not finite (no update)
    videos: int
    seconds: float
    rank: float = 0.0  # Grade-Net's ranking loss (sampler.kind=predicted)

    @property
    def videos_per_s(self) -> float:
        return self.videos / max(self.seconds, 1e-9)


def is_distributed() -> bool:
    """Whether this process is one of several ranks of an initialised torch.distributed group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class NonFiniteLossError(RuntimeError):
    """Too many consecutive training steps had a non-finite loss (diverged, or NaN/Inf in the input)."""


@dataclass
class NonFiniteGuard:
    """Counts consecutive non-finite losses; the verdict is agreed by all ranks, so they skip the same steps."""

    limit: int
    streak: int = 0
    skipped_total: int = 0

    def finite(self, loss: Tensor) -> bool:
        ok = torch.isfinite(loss.detach()).to(torch.int32).reshape(1)
        if is_distributed():
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if bool(ok.item()):
            self.streak = 0
            return True
        self.streak += 1
        self.skipped_total += 1
        if self.streak >= self.limit:
            raise NonFiniteLossError(
                f"{self.streak} consecutive training steps had a non-finite loss (train.max_nonfinite_steps="
                f"{self.limit}; {self.skipped_total} skipped in all): the run diverged or the features hold NaN/Inf; "
                "lower train.lr or check the input, then resume from the last checkpoint")
        return False


def train_one_epoch(
    model: AutoSSVH,
    batches: Iterable[tuple[Tensor, Tensor]],
    optimizer: torch.optim.Optimizer,
    cfg: Config,
    device: torch.device,
    targets: ClusterTargets | None = None,
    gather: Callable[[Tensor], Tensor] | None = None,
    guard: NonFiniteGuard | None = None,
) -> EpochStats:
    """One pass over ``(features (B, T, F), video index (B,))`` batches with one Adam step per batch.

    ``targets`` holds this epoch's clustering (None before warm-up: no P2Set term). A batch whose loss is not
    finite on any rank is skipped by every rank (no update) and counted; ``guard`` (one per run, so the count
    spans epochs; default: one for this epoch) raises :class:`NonFiniteLossError` after
    ``train.max_nonfinite_steps`` such batches in a row. ``gather`` (e.g. ``cluster.distributed.gather_with_grad``) is
    passed to the loss so that VC and P2Set see the global batch of data-parallel training.
    """
    model.train()
    support = getattr(model, "module", model).support  # DDP wraps the model
    guard = guard or NonFiniteGuard(cfg.train.max_nonfinite_steps)
    sums = {"loss": 0.0, "rec": 0.0, "vc": 0.0, "p2set": 0.0, "rank": 0.0}
    steps = skipped = videos = 0
    start = time.perf_counter()
    for feats, index in batches:
        feats = feats.to(device, non_blocking=True).float()
        index = index.to(device, non_blocking=True).long()
        with autocast(device, cfg.train.amp):
            out = model(feats)
        loss, parts = autossvh_loss(out, index, cfg, targets, gather, support)
        if not guard.finite(loss):
            skipped += 1
            continue
        optimizer.zero_grad(set_to_none=True)
        if loss.requires_grad:
            loss.backward()
            optimizer.step()
        steps += 1
        videos += feats.shape[0]
        sums["loss"] += float(loss.detach())
        for key, value in parts.items():
            sums[key] += float(value.detach())
    seconds = time.perf_counter() - start
    mean = {key: value / max(steps, 1) for key, value in sums.items()}
    return EpochStats(**mean, steps=steps, skipped_steps=skipped, videos=videos, seconds=seconds)


@dataclass
class Encoded:
    """Codes of a set of videos in input order: retrieval codes (N, nbits) int8 in {-1, 0, +1} and the
    L2-normalised mean codes (N, nbits) float32 that k-means clusters."""

    codes: np.ndarray
    features: np.ndarray


def features_of(batch: Batch) -> Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


# Bytes one encoding batch may hold (see encode_batch_size). On CPU, 128 MiB (128 videos of UCF101/FCVID size):
# one thread encodes 32 to 256 videos a batch at the same speed per video (2.2-2.4 ms, released model, bf16)
# and larger batches run slower (2.6 ms at 384, 3.1 ms at 544: the activations leave the caches). On CUDA, 2 GiB
# (about 2,200 such videos, 55,000 frames a matrix multiply) so that this model's small matrices keep the device
# busy between kernel launches: a choice, not measured; the host then holds readahead + 1 float16 batches
# (about 2.3 GB) per worker.
ENCODE_BUDGET_BYTES = {"cpu": 128 << 20, "cuda": 2 << 30}


def encode_batch_size(cfg: Config, device: torch.device, stored_itemsize: int = 2, multiple_of: int = 1) -> int:
    """Videos per batch of :func:`encode`: the most whose working set fits the device's share of
    ``ENCODE_BUDGET_BYTES``, rounded down to a multiple of ``multiple_of`` (the store's chunk, to keep reads
    chunk-aligned), and never fewer than ``train.test_batch_size``.

    A video's working set is its features as stored (``stored_itemsize`` bytes a value), their fp32 copy (the
    larger compute dtype) and one encoder block's activations in fp32: residual stream, normalised input, q/k/v,
    attention output and the MLP's hidden layer before and after GELU, for every frame."""
    d, m = cfg.data, cfg.model
    inner = m.hidden_size // m.encoder_heads * m.encoder_heads
    activations = 2 * m.hidden_size + 4 * inner + 2 * int(m.hidden_size * m.mlp_ratio)
    per_video = d.max_frames * (d.feature_size * (stored_itemsize + 4) + 4 * activations)
    budget = ENCODE_BUDGET_BYTES.get(device.type, ENCODE_BUDGET_BYTES["cpu"])
    fits = budget // per_video // multiple_of * multiple_of
    return max(cfg.train.test_batch_size, fits)


@torch.inference_mode()
def encode(model: AutoSSVH, batches: Iterable[Batch], device: torch.device | None = None) -> Encoded:
    """Eval-mode codes of all frames: sign of the mean of the per-frame binary codes (REFERENCE §3.4).

    ``batches`` yields feature tensors (B, T, F) of any float dtype (float16 as stored: half the bytes to read
    and move) or tuples whose first item is one. Each batch is cast once, on ``device``, to the compute dtype:
    bf16 under ``train.amp`` where :func:`autocast` runs (the values autocast would give the float32 batch, since
    float16 converts to float32 exactly), else float32."""
    device = device or next(model.parameters()).device
    dtype = autocast_dtype(device, model.cfg.train.amp) or torch.float32
    was_training = model.training
    model.eval()
    codes, features = [], []
    with autocast(device, model.cfg.train.amp):
        for batch in batches:
            raw = features_of(batch).to(device, non_blocking=True)
            weights = model.pooling_weights(raw)  # from the features as stored, before any bf16 cast
            code, feature = video_codes(model.encode_frames(raw.to(dtype)).float(), weights)
            codes.append(code.to(torch.int8).cpu())
            features.append(feature.cpu())
    model.train(was_training)
    nbits = model.cfg.model.nbits
    if not codes:
        return Encoded(np.zeros((0, nbits), np.int8), np.zeros((0, nbits), np.float32))
    return Encoded(torch.cat(codes).numpy(), torch.cat(features).numpy())


def array_batches(feats: np.ndarray, batch_size: int) -> Iterator[Tensor]:
    """Sequential, ordered (B, T, F) float32 tensors over an in-memory array (evaluation reading)."""
    for start in range(0, len(feats), batch_size):
        yield torch.from_numpy(np.ascontiguousarray(feats[start:start + batch_size], dtype=np.float32))


def encode_and_cluster(model: AutoSSVH, train_batches: Iterable[Batch], cfg: Config, device: torch.device,
                       previous: ClusteringResult | None = None) -> ClusteringResult:
    """A clustering round in one process: encode the training set and cluster its codes (warm from
    ``previous``, the last round, where ``cluster.warm_start``)."""
    encoded = encode(model, train_batches, device)
    return cluster_codes(encoded.features, encoded.codes, cfg.cluster, use_gpu=device.type == "cuda",
                         previous=previous)


@dataclass
class Retrieval:
    """mAP@K, GMAP (L2) and, when asked for, precision/recall at every Hamming radius 0..nbits."""

    map_at_k: dict[int, float]
    gmap_l2: float
    pr_by_radius: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def table(self, title: str = "") -> str:
        """The mAP@K table as the published tables print it, plus the GMAP (L2 norm of the row)."""
        ks = sorted(self.map_at_k)
        header = " | ".join([*(f"{'mAP@' + str(k):>8}" for k in ks), "GMAP(L2)"])
        row = " | ".join([*(f"{self.map_at_k[k]:>8.4f}" for k in ks), f"{self.gmap_l2:>8.4f}"])
        return "\n".join(line for line in (title, header, "-" * len(header), row) if line)


def evaluate_codes(query_codes: np.ndarray, query_labels: np.ndarray, db_codes: np.ndarray, db_labels: np.ndarray,
                   with_pr: bool = False) -> Retrieval:
    maps = map_at_k(query_codes, db_codes, query_labels, db_labels)
    pr = precision_recall_by_radius(query_codes, db_codes, query_labels, db_labels) if with_pr else None
    return Retrieval(maps, gmap_l2(maps), pr)


def should_cluster(cfg: Config, epoch: int) -> bool:
    """Clustering runs at the start of every epoch from ``warmup_epoch`` on, if P2Set is on (REFERENCE §7.1)."""
    return cfg.loss.p2set and epoch >= cfg.cluster.warmup_epoch


def save_model(path: str | Path, model: AutoSSVH) -> None:
    """State dict plus the config that built the model, written atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"config": model.cfg.to_dict(), "model": model.state_dict()}, tmp)
    tmp.replace(path)


class UnsafeFileError(ValueError):
    """A saved file that ``torch.load(weights_only=True)`` refuses (pickled code) or cannot read (damaged)."""


def load_state(file: str | Path | IO[bytes], where: str, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(weights_only=True)``: tensors, containers and plain values only, never pickled code; a file
    that holds more (or is damaged) raises :class:`UnsafeFileError` naming ``where``."""
    try:
        return torch.load(file, map_location=map_location, weights_only=True)
    except Exception as err:
        lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(err).strip().splitlines()] or [""]
        detail = next((line for line in lines if line.startswith("WeightsUnpickler error")), lines[0])
        raise UnsafeFileError(f"{where}: cannot be loaded safely ({type(err).__name__}: {detail})") from err


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> AutoSSVH:
    """Load a model saved by :func:`save_model` (:func:`load_state`: never runs pickled code)."""
    state = load_state(path, str(path), map_location)
    if not isinstance(state, dict) or "config" not in state or "model" not in state:
        raise ValueError(f"{path}: not an AutoSSVH model file (expected keys 'config' and 'model')")
    model = AutoSSVH(config_from_dict(state["config"]))
    model.load_state_dict(state["model"])
    return model


def seconds_to_text(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, sec = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{sec:02d}s" if hours else f"{minutes}m{sec:02d}s"
