"""Every GPU path of the project measured in one call: one table on stdout, the same as JSON (``--json``).

Run on a GPU machine (Python 3.12, torch + torchvision + numpy installed; faiss, zarr and the rest from the
wheels that ``tools/fetch_gpu_wheels.sh`` puts in the git-ignored ``wheels/gpu_check``), from the repo root:

    python3 -m pip install -q --no-index --no-deps --target /tmp/gpu_check_site wheels/gpu_check/*.whl &&
      PYTHONPATH=/tmp/gpu_check_site python3 benchmarks/gpu_check.py --json gpu_check.json

(``--target`` installs beside the system's packages without a venv and without ``--break-system-packages``;
``--no-deps``: the folder holds every wheel needed, torch and numpy come from the machine.)

Parts (``--parts`` picks some; each runs under its own time cap, all together under ``--budget-s``):

* ``train``: the training step at FCVID size (T = 25, F = 4096, 64 bits), batch 64 and 512: ours
  (``autossvh.engine.train_one_epoch`` on one batch, recipes ``paper`` and ``released``) in fp32 and with bf16
  autocast, and the released re-creation of ``benchmarks/bench_train.py``, before warm-up and with P2Set / CVH;
  videos/s and the ratio to the re-creation of the same phase.
* ``nccl``: a process group on the NCCL backend, world size 1, running the global-batch losses: the loss and
  the codes' gradient with ``cluster.distributed.gather_with_grad`` against the local loss, the object
  collectives the workers use, and a DDP training step with the gathers against a plain one. At world size 1
  every collective is a copy on one GPU: no bytes cross GPUs or nodes, so the communication cost, NCCL's
  transports and topology, and disagreements between ranks (the non-finite guard's verdict, uneven partitions)
  are not covered, nor is Ray Train's set-up of the group.
* ``cluster``: a cold clustering round (``autossvh.clustering.cluster_codes``: nredo 5 x niter 20, voting and
  densities included) of 45,585 codes at k = 250 / 500 / 1000 with faiss-cpu, against the same round with an
  exact Lloyd k-means written in torch here (on the GPU; for comparison only), with objectives.
* ``map``: ``autossvh.metrics.map_at_k`` at the FCVID protocol size (45,600 x 45,600, 64 bits, 239 labels) on
  CPU faiss, against an exact ranking in torch written here (on the GPU; comparison only): seconds and the
  largest difference of the mAP@K values (0 when the rankings, ties included, agree).
* ``extract``: the backbones (VGG16 fc7, ResNet-50, ViT-B/16, random weights, 224 x 224) through
  ``storage.backbones.encode_frames`` on the GPU, 400 frames (16 videos) a call, fp32 (cuDNN's TF32 default)
  and bf16 autocast, in frames/s.
* ``reader``: ``storage.reader.TrainReader`` over a local Zarr store at FCVID shape (4,096 videos, float16,
  chunks of 16, zstd; written by ``benchmarks/bench_reader.py``), each batch copied to the GPU: in process at
  batch 64 and 512, through a DataLoader with 2 and 4 workers at batch 64; videos/s against what one GPU step
  of ``train`` (ours, ``paper``, bf16) consumes at the same batch size.

A part that cannot run is reported as skipped with the reason (``no CUDA``; ``missing package X``) and the
others still run; a part that raises is reported as failed (the exit status is then 1). The JSON is rewritten
after every part (``"complete": false`` until the end), so a run cut short still leaves what it measured.

``--tiny`` runs every part at tiny sizes, on the GPU if there is one, else on CPU (gloo instead of NCCL) so
that the code paths are exercised without a GPU (``tests/test_gpu_check.py``).

Duration on one H200 host (16 cores): estimated at about 1.5 minutes, not yet measured (README, "GPU check").
Every part's timed loops stop at its cap (``CAPS_S``, 300 s in all, also ``--budget-s``); what cannot be cut
(model construction, one faiss round, the store's write) is small, so the run ends within about 5.5 minutes
even where every cap is reached. The estimate per part: train 15-20 s (20 model builds of about 0.3 s, 260
steps of 10-50 ms), nccl 5-8 s (the NCCL communicator, 3 models, 24 steps), cluster about 5 s (the faiss round
takes 9-14 s on the development machine's 2 cores, so 2-3 s on 16; the torch round under 1 s), map under 2 s
(1.0 s on 2 cores), extract 15-20 s (backbone construction 3 s, cuDNN's tuning, at most 20 calls of 400 frames
per backbone and precision), reader 15-20 s (generating 256 videos 3 s, writing 4,096 at about 1,000-2,000
videos/s, four passes), plus 5-10 s of Python, torch and CUDA start-up. The tiny mode runs in 13-17 s on
the 2-core development machine.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import random
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from autossvh.clustering import ClusteringResult

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Distributions a GPU machine with Python 3.12, torch, torchvision and numpy lacks, and why the check needs
# them; tools/fetch_gpu_wheels.sh downloads them (the versions installed here) for Python 3.12 / x86-64.
EXTRA_WHEELS: dict[str, str] = {
    "faiss-cpu": "k-means and map_at_k; autossvh.engine imports autossvh.clustering, so the training step too",
    "PyYAML": "autossvh.config reads the presets; donfig",
    "zarr": "the feature store of the reader part",
    "numcodecs": "zarr's codecs",
    "donfig": "zarr's configuration",
    "google-crc32c": "storage.store's chunk checksums; zarr",
    "packaging": "faiss-cpu, zarr",
    "typing_extensions": "zarr, numcodecs",
    "pytest": "benchmarks/bench_train.py takes its random clustering from tests/conftest.py, which imports it",
    "pluggy": "pytest",
    "iniconfig": "pytest",
    "Pygments": "pytest",
}
FRAMES, FEATURES, NBITS = 25, 4096, 64
TINY_NOTE = "tiny mode on CPU: figures show the code path runs, not GPU speed"


class Skip(Exception):
    """A part (or one row of it) that cannot run here; the message is the reason."""


@dataclass
class Row:
    """One figure: ``value`` in ``unit``; ``ratio`` is value / the same figure of ``ratio_to``."""

    name: str
    value: float
    unit: str
    ratio: float | None = None
    ratio_to: str = ""


@dataclass
class PartResult:
    """One part's outcome: its figures and notes, or why it was skipped or failed."""

    status: str = "ok"  # ok | skipped | failed
    reason: str = ""
    device: str = ""
    seconds: float = 0.0
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    peak_gpu_memory_gib: float | None = None
    traceback: str = ""


@dataclass(frozen=True)
class Sizes:
    """What each part measures, full (FCVID) or tiny."""

    model_overrides: tuple[str, ...]  # after the FCVID preset (T stays 25, 64 bits)
    train_batches: tuple[int, ...]
    train_warmup: int
    train_steps: int
    random_clustering_videos: int
    nccl_batch: int
    nccl_steps: int
    cluster_videos: int
    cluster_k: tuple[int, ...]
    map_videos: int
    map_labels: int
    image_size: int | None  # None: the backbone's own 224
    extract_frames: int
    extract_batches: int
    reader_source_videos: int
    reader_repeat: int
    reader_loader_workers: tuple[int, ...]


FULL = Sizes(model_overrides=(), train_batches=(64, 512), train_warmup=3, train_steps=10, random_clustering_videos=5000,
             nccl_batch=512, nccl_steps=10, cluster_videos=45_585, cluster_k=(250, 500, 1000), map_videos=45_600,
             map_labels=239, image_size=None, extract_frames=400, extract_batches=20, reader_source_videos=256,
             reader_repeat=16, reader_loader_workers=(2, 4))
TINY = Sizes(model_overrides=("data.feature_size=64", "model.hidden_size=32", "model.encoder_depth=2",
                              "model.encoder_heads=2", "model.decoder_dim=16", "model.decoder_depth=1",
                              "model.decoder_heads=2"),
             train_batches=(8, 16), train_warmup=1, train_steps=1, random_clustering_videos=1200, nccl_batch=8,
             nccl_steps=2, cluster_videos=2000, cluster_k=(10, 20, 40), map_videos=2000, map_labels=20,
             image_size=32, extract_frames=4, extract_batches=2, reader_source_videos=16, reader_repeat=4,
             reader_loader_workers=(1,))
# Seconds each part may take; they sum to --budget-s's default, 300 s. Timed loops stop at a part's cap (and
# are bounded in steps too); what cannot be cut (model construction, a faiss round, a store's write) is small.
CAPS_S = {"train": 70.0, "nccl": 30.0, "cluster": 50.0, "map": 40.0, "extract": 60.0, "reader": 50.0}


class Context:
    """What the parts share: the mode, the device, the part's deadline and the training step's consumption."""

    def __init__(self, tiny: bool) -> None:
        self.tiny = tiny
        self.sizes = TINY if tiny else FULL
        self.cuda = torch.cuda.is_available()
        self.deadline = math.inf
        self.consumed: dict[int, float] = {}  # batch -> videos/s of one training step (ours, paper, bf16)

    def gpu(self) -> torch.device:
        """The CUDA device; CPU in tiny mode without one; else the part is skipped."""
        if self.cuda:
            return torch.device("cuda", torch.cuda.current_device())
        if self.tiny:
            return torch.device("cpu")
        raise Skip("no CUDA (torch.cuda.is_available() is False)")

    def left(self) -> float:
        return self.deadline - time.perf_counter()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------------------
# train
# ----------------------------------------------------------------------------------------------------------


def part_train(ctx: Context, result: PartResult) -> None:
    device = ctx.gpu()
    from benchmarks import bench_train
    from tests.conftest import random_clustering

    sizes = ctx.sizes
    clustering = random_clustering(sizes.random_clustering_videos, NBITS, [250, 500, 1000])
    for position, batch in enumerate(sizes.train_batches):
        args = argparse.Namespace(batch=batch, warmup=sizes.train_warmup, steps=sizes.train_steps,
                                  overrides=list(sizes.model_overrides))
        features = bench_train.fcvid_config("paper", args).data.feature_size
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(batch, FRAMES, features, generator=gen).to(device)
        index = torch.randint(0, sizes.random_clustering_videos, (batch,), generator=gen).to(device)
        random.seed(0)
        benches = [bench_train.bench_released(cvh, args, device, x, index, clustering) for cvh in (False, True)]
        ours = {(recipe, amp, p2set): bench_train.bench_ours(recipe, p2set, amp, args, device, x, index, clustering)
                for amp in (False, True) for recipe in ("paper", "released") for p2set in (False, True)}
        benches += list(ours.values())
        share = max(1.0, ctx.left()) / (len(sizes.train_batches) - position)
        bench_train.run_interleaved(benches, args.warmup, args.steps, device, max_seconds=share / 2)
        base = {b.phase: b for b in benches[:2]}
        for b in benches:
            ratio = None if b in benches[:2] else b.videos_per_s / base[b.phase].videos_per_s
            result.rows.append(Row(f"{b.name}, batch {batch}", b.videos_per_s, "videos/s", ratio,
                                   "" if ratio is None else "released re-creation, same phase"))
        ctx.consumed[batch] = ours[("paper", True, False)].videos_per_s
        result.notes.append(f"batch {batch}: {len(benches[0].times)} timed steps per variant (median), "
                            f"{args.warmup} warm-up")
        del benches, ours
    result.notes.append("ours with train.amp=true runs " + bench_train.amp_label(device, True))


# ----------------------------------------------------------------------------------------------------------
# nccl
# ----------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def multi_rank_paths() -> Iterator[None]:
    """Take the branches written for more than one rank at world size 1 (``is_distributed()`` is False there,
    which makes the gathers identities): ``gather_with_grad``'s all_gather and its backward's all_reduce, the
    object collectives, ``all_ranks_agree`` and the non-finite guard's MIN all-reduce."""
    import autossvh.engine
    import cluster.distributed

    saved = autossvh.engine.is_distributed, cluster.distributed.is_distributed
    autossvh.engine.is_distributed = cluster.distributed.is_distributed = lambda: True
    try:
        yield
    finally:
        autossvh.engine.is_distributed, cluster.distributed.is_distributed = saved


def part_nccl(ctx: Context, result: PartResult) -> None:
    device = ctx.gpu()
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from autossvh.config import build_config
    from autossvh.engine import NonFiniteGuard, autocast, autocast_dtype, build_optimizer, train_one_epoch
    from autossvh.losses import ClusterTargets, autossvh_loss
    from autossvh.model import AutoSSVH, leaves_parameters_unused
    from cluster.distributed import all_ranks_agree, broadcast_from_rank0, gather_rows_to_rank0, gather_with_grad
    from tests.conftest import random_clustering

    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_available() or (backend == "nccl" and not dist.is_nccl_available()):
        raise Skip(f"this torch build has no {backend} backend")
    sizes = ctx.sizes
    folder = tempfile.mkdtemp(prefix="gpu_check_pg_")
    options: dict[str, Any] = {"device_id": device} if backend == "nccl" else {}
    began = time.perf_counter()
    dist.init_process_group(backend, init_method=f"file://{folder}/store", rank=0, world_size=1, **options)
    try:
        result.rows.append(Row(f"init_process_group ({backend}, world size 1)", time.perf_counter() - began, "s"))
        cfg = build_config("fcvid", "paper", overrides=[f"train.batch_size={sizes.nccl_batch}", "train.amp=true",
                                                        *sizes.model_overrides])
        n_train = sizes.random_clustering_videos
        targets = ClusterTargets.from_result(random_clustering(n_train, NBITS, [250, 500, 1000]), device)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(sizes.nccl_batch, FRAMES, cfg.data.feature_size, generator=gen).to(device)
        index = torch.randint(0, n_train, (sizes.nccl_batch,), generator=gen).to(device)

        torch.manual_seed(0)
        model = AutoSSVH(cfg).to(device)
        with autocast(device, cfg.train.amp):
            out = model(x)
        local, _ = autossvh_loss(out, index, cfg, targets)
        (local_grad,) = torch.autograd.grad(local, out.codes, retain_graph=True)
        with multi_rank_paths():
            gathered, _ = autossvh_loss(out, index, cfg, targets, gather_with_grad)
            (gathered_grad,) = torch.autograd.grad(gathered, out.codes)
            agree = all_ranks_agree(True)
            rows = gather_rows_to_rank0(np.arange(5))
            sent = broadcast_from_rank0({"epoch": 3})
        if not agree or rows is None or rows.tolist() != list(range(5)) or sent != {"epoch": 3}:
            raise RuntimeError(f"object collectives returned {agree}, {rows}, {sent}")
        precision = "bf16" if autocast_dtype(device, cfg.train.amp) == torch.bfloat16 else "fp32"
        result.rows.append(Row(f"|loss gathered - loss local| (P2Set voted, {precision})",
                               abs(float(gathered.detach()) - float(local.detach())), "abs"))
        result.rows.append(Row("max |codes' gradient gathered - local|",
                               float((gathered_grad - local_grad).abs().max()), "abs"))

        batches = [(x, index)] * sizes.nccl_steps
        plain = AutoSSVH(cfg).to(device)
        plain_opt = build_optimizer(plain, cfg)
        ddp_model = AutoSSVH(cfg).to(device)
        ddp = DistributedDataParallel(ddp_model, device_ids=[device.index] if device.type == "cuda" else None,
                                      find_unused_parameters=leaves_parameters_unused(cfg))
        ddp_opt = build_optimizer(ddp_model, cfg)
        guard = NonFiniteGuard(cfg.train.max_nonfinite_steps)
        train_one_epoch(plain, batches[:1], plain_opt, cfg, device, targets)  # warm-up
        plain_stats = train_one_epoch(plain, batches, plain_opt, cfg, device, targets)
        with multi_rank_paths():
            train_one_epoch(ddp, batches[:1], ddp_opt, cfg, device, targets, gather_with_grad, guard)
            ddp_stats = train_one_epoch(ddp, batches, ddp_opt, cfg, device, targets, gather_with_grad, guard)
        if plain_stats.skipped_steps or ddp_stats.skipped_steps:
            raise RuntimeError(f"non-finite training steps: {plain_stats.skipped_steps} plain, "
                               f"{ddp_stats.skipped_steps} DDP")
        shape = f"batch {sizes.nccl_batch}, {precision}, P2Set voted, {sizes.nccl_steps} steps"
        result.rows.append(Row(f"plain step (no DDP, no gathers), {shape}", plain_stats.videos_per_s, "videos/s"))
        result.rows.append(Row(f"DDP + gather_with_grad + guard ({backend}), {shape}",
                               ddp_stats.videos_per_s, "videos/s", ddp_stats.videos_per_s / plain_stats.videos_per_s,
                               "plain step"))
        result.notes.append(f"backend {dist.get_backend()}; collectives run: all_gather (codes, indices), "
                            "all_reduce (gradient, MIN verdicts), gather_object, broadcast_object_list, DDP buckets")
        result.notes.append("world size 1: every collective is a copy on one GPU; not covered: bytes between GPUs or "
                            "nodes, NCCL transports and topology, ranks that disagree, Ray Train's set-up")
    finally:
        dist.destroy_process_group()
        shutil.rmtree(folder, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------
# cluster
# ----------------------------------------------------------------------------------------------------------


def nearest(x: torch.Tensor, x_sq: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's nearest centroid and its squared distance (exact, fp32)."""
    d = x_sq[:, None] - 2 * x @ centroids.T + (centroids * centroids).sum(1)[None, :]
    dist, assign = d.min(dim=1)
    return assign, dist.clamp_min(0)


def torch_kmeans(x: torch.Tensor, k: int, seed: int, niter: int, nredo: int) -> tuple[np.ndarray, ...]:
    """Exact Lloyd k-means: ``nredo`` restarts from k distinct random rows, ``niter`` iterations each, the lowest
    objective kept; an empty cluster keeps its centroid. Returns centroids, assignment, squared distances."""
    n = x.shape[0]
    x_sq = (x * x).sum(1)
    gen = torch.Generator().manual_seed(seed)
    best: tuple[float, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    for _ in range(nredo):
        centroids = x[torch.randperm(n, generator=gen)[:k].to(x.device)].clone()
        for _ in range(niter):
            assign, _ = nearest(x, x_sq, centroids)
            sums = torch.zeros_like(centroids).index_add_(0, assign, x)
            counts = torch.bincount(assign, minlength=k)
            filled = counts > 0
            centroids[filled] = sums[filled] / counts[filled, None].to(x.dtype)
        assign, dist = nearest(x, x_sq, centroids)
        objective = float(dist.double().sum())
        if best is None or objective < best[0]:
            best = (objective, centroids, assign, dist)
    assert best is not None
    return tuple(t.cpu().numpy() for t in best[1:])


def torch_round(features: np.ndarray, codes: np.ndarray, ks: list[int], device: torch.device, niter: int,
                nredo: int, temperature: float) -> ClusteringResult:
    """A cold clustering round like ``cluster_codes`` with :func:`torch_kmeans` in place of faiss."""
    from autossvh.clustering import ClusteringResult, KMeansRun

    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)).to(device)
    result = ClusteringResult.empty()
    for seed, k in enumerate(ks):
        began = time.perf_counter()
        centroids, assign, dist = torch_kmeans(x, k, seed, niter, nredo)
        run = KMeansRun(centroids, assign.astype(np.int64), dist, niter * nredo, time.perf_counter() - began, False)
        result.add_granularity(codes, run, temperature)
    return result


def part_cluster(ctx: Context, result: PartResult) -> None:
    import faiss

    from autossvh.clustering import cluster_codes, faiss_has_gpu
    from autossvh.config import ClusterConfig
    from benchmarks.bench_cluster import drifted_codes

    sizes = ctx.sizes
    ks = list(sizes.cluster_k)
    features = drifted_codes(sizes.cluster_videos, NBITS, 0)
    codes = np.where(features >= 0, 1, -1).astype(np.int8)
    cfg = ClusterConfig(num_cluster=ks)
    began = time.perf_counter()
    cpu = cluster_codes(features, codes, cfg)
    cpu_s = time.perf_counter() - began
    label = f"{sizes.cluster_videos} codes, k = {'/'.join(map(str, ks))}, nredo {cfg.nredo} x niter {cfg.niter}"
    result.rows.append(Row(f"faiss-cpu round ({faiss.omp_get_max_threads()} threads), {label}", cpu_s, "s"))
    for k, objective in zip(ks, cpu.objective, strict=True):
        result.rows.append(Row(f"faiss-cpu objective k={k}", objective, "sum sq dist"))
    if faiss_has_gpu():
        began = time.perf_counter()
        cluster_codes(features, codes, cfg, use_gpu=True)
        result.rows.append(Row("faiss-gpu round, same settings", time.perf_counter() - began, "s"))
    else:
        result.notes.append("no faiss GPU round: a faiss-cpu build (no GPU classes), or no GPU visible to faiss")
    try:
        device = ctx.gpu()
    except Skip as skip:
        result.notes.append(f"torch Lloyd round skipped: {skip}")
        return
    result.device = device.type
    torch.zeros(1, device=device).sum().item()  # CUDA context and kernels loaded outside the timing
    began = time.perf_counter()
    ours = torch_round(features, codes, ks, device, cfg.niter, cfg.nredo, cfg.kmeans_temperature)
    seconds = time.perf_counter() - began
    result.rows.append(Row(f"torch exact Lloyd round on {device.type}, same settings", seconds, "s",
                           seconds / cpu_s, "faiss-cpu round"))
    for k, objective, reference in zip(ks, ours.objective, cpu.objective, strict=True):
        result.rows.append(Row(f"torch objective k={k}", objective, "sum sq dist", objective / reference,
                               "faiss-cpu objective"))
    result.notes.append("torch Lloyd: written in this script for comparison only (not in autossvh); faiss also "
                        "subsamples above 200 points per centroid (not at these sizes) and splits empty clusters")


# ----------------------------------------------------------------------------------------------------------
# map
# ----------------------------------------------------------------------------------------------------------


def torch_map_at_k(codes: np.ndarray, labels: np.ndarray, ks: Iterable[int], device: torch.device
                   ) -> dict[int, float]:
    """mAP@K of all codes against all codes (FCVID protocol) with the tie rule of ``autossvh.metrics``: rank by
    Hamming distance, ties by ascending database index (a top-k of distance * N + index), in query chunks."""
    ks = list(ks)
    kmax, (n, nbits) = max(ks), codes.shape
    dtype = torch.float16 if device.type == "cuda" else torch.float32  # sums of +-1 / 0 up to 64: exact
    c = torch.from_numpy(codes).to(device=device, dtype=dtype)
    lab = torch.from_numpy(labels).to(device)
    order = torch.arange(n, device=device)
    budget = (1 << 30) if device.type == "cuda" else (1 << 26)
    rows = max(1, budget // (8 * n))
    rel_hits = torch.zeros(kmax, dtype=torch.float64, device=device)
    for start in range(0, n, rows):
        dot = c[start:start + rows] @ c.T
        key = (nbits - dot).to(torch.int64) * n + order  # twice the distance, then the index
        idx = key.topk(kmax, dim=1, largest=False, sorted=True).indices
        rel = (lab[start:start + rows, None, :] & lab[idx]).any(dim=-1)
        hits = rel.cumsum(dim=1)
        rel_hits += (hits * rel).sum(dim=0).double()
    ap = torch.cumsum(rel_hits / torch.arange(1, kmax + 1, device=device, dtype=torch.float64), 0).cpu().numpy()
    return {k: float(ap[k - 1] / (n * k)) for k in ks}


def part_map(ctx: Context, result: PartResult) -> None:
    import faiss

    from autossvh.metrics import DEFAULT_KS, map_at_k
    from benchmarks.bench_map import make_data

    sizes = ctx.sizes
    codes, labels = make_data(sizes.map_videos, NBITS, sizes.map_labels, 0.2, 0)
    began = time.perf_counter()
    reference = map_at_k(codes, codes, labels, labels)
    cpu_s = time.perf_counter() - began
    n = sizes.map_videos
    result.rows.append(Row(f"map_at_k faiss-cpu ({faiss.omp_get_max_threads()} threads), {n} x {n}, "
                           f"{sizes.map_labels} labels", cpu_s, "s"))
    result.rows.append(Row(f"mAP@{max(DEFAULT_KS)} (faiss-cpu)", reference[max(DEFAULT_KS)], "mAP"))
    try:
        device = ctx.gpu()
    except Skip as skip:
        result.notes.append(f"torch ranking skipped: {skip}")
        return
    result.device = device.type
    torch.zeros(1, device=device).sum().item()
    began = time.perf_counter()
    ours = torch_map_at_k(codes, labels, DEFAULT_KS, device)
    seconds = time.perf_counter() - began
    result.rows.append(Row(f"torch exact ranking on {device.type} (same tie rule)", seconds, "s", seconds / cpu_s,
                           "map_at_k faiss-cpu"))
    result.rows.append(Row("max |mAP@K torch - map_at_k| over K", max(abs(ours[k] - reference[k]) for k in reference),
                           "abs"))
    result.notes.append("the torch ranking is written in this script for comparison only: autossvh has no GPU "
                        "map_at_k")


# ----------------------------------------------------------------------------------------------------------
# extract
# ----------------------------------------------------------------------------------------------------------


def part_extract(ctx: Context, result: PartResult) -> None:
    device = ctx.gpu()
    from storage.backbones import BACKBONES, ExtractorSettings, FrameEncoder, encode_frames

    sizes = ctx.sizes
    benchmark_flag = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True  # as cluster/extract.py sets it on a GPU
    try:
        for position, name in enumerate(BACKBONES):
            settings = ExtractorSettings(name, FRAMES, random_seed=0, image_size=sizes.image_size)
            encoder = FrameEncoder(settings).to(device)
            frames = np.random.default_rng(0).integers(0, 256, (sizes.extract_frames, settings.crop, settings.crop,
                                                                3), dtype=np.uint8)
            slot = max(1.0, ctx.left()) / (2 * (len(BACKBONES) - position))  # per precision; half of it timed
            for precision in ("fp32", "bf16"):
                bf16 = precision == "bf16"
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    encode_frames(encoder, frames, device, sizes.extract_frames)  # warm-up (cuDNN's choice)
                    sync(device)
                    began, done = time.perf_counter(), 0
                    while done < sizes.extract_batches and (done == 0 or time.perf_counter() - began < slot / 2):
                        encode_frames(encoder, frames, device, sizes.extract_frames)
                        done += 1
                    seconds = time.perf_counter() - began
                result.rows.append(Row(f"{name} {precision}, {settings.crop} x {settings.crop}, "
                                       f"{sizes.extract_frames} frames a call", done * sizes.extract_frames / seconds,
                                       "frames/s"))
            del encoder
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        torch.backends.cudnn.benchmark = benchmark_flag
    result.notes.append("fp32 convolutions use TF32 (torch's default cudnn.allow_tf32="
                        f"{torch.backends.cudnn.allow_tf32}); includes the uint8 upload and the features' download")


# ----------------------------------------------------------------------------------------------------------
# reader
# ----------------------------------------------------------------------------------------------------------


def feed(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device, max_seconds: float,
         skip_first: bool) -> tuple[int, float]:
    """Videos copied to ``device`` and seconds, until the batches end or ``max_seconds`` pass; ``skip_first``
    starts the clock at the first batch (DataLoader workers' start-up left out)."""
    iterator = iter(batches)
    if skip_first:
        next(iterator)
    began, videos = time.perf_counter(), 0
    for feats, _ in iterator:
        feats.to(device, non_blocking=True)
        videos += feats.shape[0]
        if time.perf_counter() - began > max_seconds:
            break
    sync(device)
    return videos, time.perf_counter() - began


def part_reader(ctx: Context, result: PartResult) -> None:
    from benchmarks.bench_reader import write_zarr
    from storage.reader import TrainReader, make_loader
    from storage.synthetic import SyntheticGenerator

    sizes = ctx.sizes
    device = torch.device("cuda") if ctx.cuda else torch.device("cpu")
    result.device = device.type
    if not ctx.cuda:
        result.notes.append("no CUDA: batches are read but not copied to a GPU")
    n_source = sizes.reader_source_videos
    source = SyntheticGenerator("fcvid", n_source).generate("train", 0, n_source).feats.astype(np.float16)
    folder = Path(tempfile.mkdtemp(prefix="gpu_check_reader_"))
    try:
        began = time.perf_counter()
        url = str(write_zarr(folder / "fcvid", source, 16, True, repeat=sizes.reader_repeat))
        n = n_source * sizes.reader_repeat
        result.rows.append(Row(f"write the store ({n} x {FRAMES} x {FEATURES} float16, chunks of 16, zstd)",
                               n / (time.perf_counter() - began), "videos/s"))
        passes = [(batch, 0) for batch in sizes.train_batches]  # then DataLoaders at the small batch: more batches
        passes += [(sizes.train_batches[0], workers) for workers in sizes.reader_loader_workers]
        for position, (batch, workers) in enumerate(passes):
            reader = TrainReader(url, batch_size=batch)
            batches = make_loader(reader, num_workers=workers) if workers else reader
            share = max(1.0, ctx.left()) / (len(passes) - position)
            videos, seconds = feed(batches, device, share / 2, skip_first=workers > 0)
            rate = videos / seconds
            consumed = ctx.consumed.get(batch)
            where = f"{workers} DataLoader workers" if workers else "in process"
            result.rows.append(Row(f"TrainReader -> {device.type}, batch {batch}, {where}", rate, "videos/s",
                                   None if consumed is None else rate / consumed,
                                   "" if consumed is None else f"one training step at batch {batch} (ours, bf16)"))
        if not ctx.consumed:
            result.notes.append("no training figure to compare with (the train part did not run)")
        result.notes.append("the store was just written: its files are in the page cache (warm reads)")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------
# harness
# ----------------------------------------------------------------------------------------------------------

PARTS: dict[str, Callable[[Context, PartResult], None]] = {
    "train": part_train, "nccl": part_nccl, "cluster": part_cluster, "map": part_map, "extract": part_extract,
    "reader": part_reader,
}


def run_part(name: str, ctx: Context, budget_end: float) -> PartResult:
    """One part under its cap: ok, skipped (``Skip``, a missing package) or failed (anything else)."""
    result = PartResult(device="cuda" if ctx.cuda else "cpu")
    began = time.perf_counter()
    left = budget_end - began
    if left < 5:
        result.status, result.reason = "skipped", f"time budget spent ({left:.0f} s left of --budget-s)"
        return result
    ctx.deadline = began + min(CAPS_S[name], left)
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout: the table only
            PARTS[name](ctx, result)
    except Skip as skip:
        result.status, result.reason = "skipped", str(skip)
    except ModuleNotFoundError as err:
        result.status = "skipped"
        result.reason = f"missing package {err.name!r} (the wheels: tools/fetch_gpu_wheels.sh, README 'GPU check')"
    except (Exception, SystemExit) as err:  # bench_train exits on a non-finite loss
        result.status, result.reason = "failed", f"{type(err).__name__}: {err}"[:500]
        result.traceback = traceback.format_exc()[-4000:]
    if ctx.tiny and result.device == "cpu" and result.status == "ok":
        result.notes.append(TINY_NOTE)
    if ctx.cuda:
        result.peak_gpu_memory_gib = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.empty_cache()
    result.seconds = time.perf_counter() - began
    return result


def version_of(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "numpy": np.__version__, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "extra_packages": {name: version_of(name) for name in EXTRA_WHEELS},
        "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
    }
    if torch.cuda.is_available():
        began = time.perf_counter()
        torch.zeros(1, device="cuda").sum().item()
        info["cuda_init_s"] = time.perf_counter() - began
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info["gpu"] = {"name": props.name, "memory_gib": props.total_memory / 2**30,
                       "capability": f"{props.major}.{props.minor}", "count": torch.cuda.device_count()}
    return info


def format_value(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    if value == 0 or abs(value) >= 100:
        return f"{value:,.0f}" if value != 0 else "0"
    return f"{value:.2f}" if abs(value) >= 1 else f"{value:.3g}"


def print_table(report: dict[str, Any]) -> None:
    header = f"{'part':<8} {'measurement':<78} {'value':>12} {'unit':<12} ratio"
    print(header)
    print("-" * len(header))
    for name, part in report["parts"].items():
        if part["status"] != "ok":
            print(f"{name:<8} {part['status'].upper()}: {part['reason']}")
            continue
        for row in part["rows"]:
            ratio = "" if row["ratio"] is None else f"{row['ratio']:.2f}x {row['ratio_to']}"
            print(f"{name:<8} {row['name'][:78]:<78} {format_value(row['value']):>12} {row['unit']:<12} {ratio}")
    print()
    for name, part in report["parts"].items():
        extra = f", peak GPU memory {part['peak_gpu_memory_gib']:.1f} GiB" if part["peak_gpu_memory_gib"] else ""
        print(f"{name}: {part['status']} in {part['seconds']:.1f} s on {part['device']}{extra}")
        for note in part["notes"]:
            print(f"  - {note}")
    gpu = report["machine"].get("gpu", {}).get("name", "no GPU")
    print(f"total {report['seconds']:.1f} s; {gpu}; torch {report['machine']['torch']}, "
          f"Python {report['machine']['python']}, {report['machine']['cpus']} CPUs")


def write_json(path: Path, report: dict[str, Any]) -> None:
    """Atomically: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.replace(path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny sizes; on CPU (gloo) where there is no CUDA")
    parser.add_argument("--json", type=Path, help="also write the results here (rewritten after every part)")
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS), help="parts to run")
    parser.add_argument("--budget-s", type=float, default=sum(CAPS_S.values()),
                        help="seconds for all parts together (default: the sum of the part caps)")
    parser.add_argument("--list-wheels", action="store_true",
                        help="print the distributions needed beyond torch/torchvision/numpy as name==version "
                             "(the versions installed here) and exit")
    args = parser.parse_args(argv)
    if args.budget_s <= 0:
        parser.error(f"--budget-s must be positive, got {args.budget_s}")
    if args.json is not None and not args.json.parent.is_dir():
        parser.error(f"--json {args.json}: the folder {args.json.parent} does not exist")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list_wheels:
        missing = [name for name in EXTRA_WHEELS if version_of(name) is None]
        if missing:
            print(f"not installed here, so no version to pin: {', '.join(missing)}", file=sys.stderr)
            return 2
        print("\n".join(f"{name}=={version_of(name)}" for name in EXTRA_WHEELS))
        return 0
    began = time.perf_counter()
    report: dict[str, Any] = {"mode": "tiny" if args.tiny else "full", "complete": False, "machine": machine(),
                              "parts": {}, "seconds": 0.0}
    ctx = Context(args.tiny)
    if args.tiny:
        torch.set_num_threads(1)  # tiny operations: one thread is faster, and a shared CPU is not oversubscribed
    budget_end = began + args.budget_s
    for name in args.parts:
        print(f"[gpu_check] {name} ...", file=sys.stderr, flush=True)
        result = run_part(name, ctx, budget_end)
        report["parts"][name] = dataclasses.asdict(result)
        report["seconds"] = time.perf_counter() - began
        print(f"[gpu_check] {name}: {result.status} in {result.seconds:.1f} s {result.reason}", file=sys.stderr,
              flush=True)
        if args.json:
            write_json(args.json, report)
    report["complete"] = True
    if args.json:
        write_json(args.json, report)
    print_table(report)
    return 1 if any(part["status"] == "failed" for part in report["parts"].values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
