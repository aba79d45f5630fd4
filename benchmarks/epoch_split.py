"""One training epoch's cost, part by part, at multiples of the UCF101 train split, and how each part grows.

    .venv/bin/python benchmarks/epoch_split.py --scales 1 2 4
    >>> from benchmarks.epoch_split import epoch_split
    >>> epoch_split(Path("runs/bench"), [1, 2, 4])

For each scale s a synthetic UCF101-like store with s x 9,537 train videos (query split in UCF101's ratio, the
database is the train split) is written once and cached under ``workdir``. Every part of an epoch after warm-up
then runs in this process on ``threads`` torch and faiss threads (1: one Ray Train worker's share, one CPU core),
with the released UCF101 config (``build_config("ucf101")``) and a fresh model:

* read: one pass of ``TrainReader`` over the whole train split (batch ``train.batch_size``, drop_last);
* encode: ``autossvh.engine.encode`` of the whole train split, read by ``EvalReader`` as a Train worker's
  clustering round reads it (float16 as stored, ``encode_batch_size`` videos a batch);
* k-means: ``cluster_codes`` on those codes at ``cluster.num_cluster``, cold; where ``cluster_codes`` takes
  ``previous``, also a warm round from the cold result on the codes perturbed (the next epoch's codes move a
  little);
* train: ``train_steps`` real steps of ``train_one_epoch`` (after one unmeasured step) on batches of the read
  pass, with the cold round's targets (P2Set on), extrapolated linearly to the epoch's N // batch steps;
* eval: ``encode`` of the query split plus ``map_at_k`` of the queries against the database (the train
  split, whose codes the encode part made: a Train worker reuses its evaluation's database codes for the next
  clustering round, so an epoch encodes the train split once);
* checkpoint: a ``cluster.checkpoint.TrainState`` (model, optimizer, scheduler, RNG, clustering result, the
  epoch's record) saved into a folder and copied to ``workdir`` (as ``ray.train.report`` persists it);
* MLflow: ``cluster.tracking.log_epoch`` (``epoch_metrics``) of one epoch into a SQLite store under ``workdir``.

The seconds are for one process doing the whole split. With W data-parallel workers, read, train and encode
divide by W; k-means (one actor), mAP@K (rank 0), the checkpoint and MLflow (rank 0) do not.
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autossvh.clustering import ClusteringResult, cluster_codes  # noqa: E402
from autossvh.config import Config, build_config  # noqa: E402
from autossvh.engine import (  # noqa: E402
    Encoded,
    Retrieval,
    build_optimizer,
    build_scheduler,
    encode,
    encode_batch_size,
    train_one_epoch,
)
from autossvh.losses import ClusterTargets  # noqa: E402
from autossvh.metrics import gmap_l2, map_at_k  # noqa: E402
from autossvh.model import AutoSSVH  # noqa: E402
from autossvh.trainer import EpochRecord  # noqa: E402
from benchmarks.bench_epoch import ensure_store  # noqa: E402
from storage.reader import EvalReader, TrainReader  # noqa: E402
from storage.store import open_store  # noqa: E402

UCF101_TRAIN = 9537
FCVID_TRAIN, FCVID_DATABASE = 45_585, 45_600  # FCVID evaluates all 45,600 videos against each other
PERTURBATION = 0.1  # relative noise on the codes of the warm round
MIN_SECONDS = 0.1  # parts shorter than this at the largest scale are too noisy to fit a growth to
PARTS = ("read", "train", "encode", "k-means cold", "k-means warm", "eval: encode query", "eval: mAP@K",
         "checkpoint", "MLflow")
DATA_PARALLEL = ("read", "train", "encode", "eval: encode query")  # divided among the Train workers


@dataclass
class ScaleResult:
    """Seconds of every part at one scale, and the sizes they depend on."""

    scale: int
    train_videos: int
    query_videos: int
    train_steps: int  # steps of the epoch
    measured_steps: int
    seconds: dict[str, float]
    load: tuple[float, float]  # 1-min load average before and after


def timed(work: Callable[[], Any]) -> tuple[float, Any]:
    tic = time.perf_counter()
    out = work()
    return time.perf_counter() - tic, out


def perturbed(encoded: Encoded, noise: float, seed: int) -> Encoded:
    """The codes moved a little: Gaussian noise of ``noise`` times the features' norm spread over the bits."""
    rng = np.random.default_rng(seed)
    nbits = encoded.features.shape[1]
    moved = encoded.features + rng.normal(0.0, noise / math.sqrt(nbits), encoded.features.shape).astype(np.float32)
    moved /= np.linalg.norm(moved, axis=1, keepdims=True)
    return Encoded(np.sign(moved).astype(np.int8), moved)


def measure_scale(workdir: Path, cfg: Config, url: str, scale: int, train_steps: int,
                  mlflow_uri: str) -> ScaleResult:
    """Every part of one epoch on the store at ``url`` (see the module docstring)."""
    from cluster import tracking
    from cluster.checkpoint import TrainState
    from cluster.worker import rng_state

    load_before = os.getloadavg()[0]
    store = open_store(url)
    info, n_train, n_query = store.info, store.num_videos("train"), store.num_videos("query")
    device = torch.device("cpu")
    seconds: dict[str, float] = {}

    reader = TrainReader(url, "train", cfg.train.batch_size, 0, 1, cfg.train.seed, drop_last=True)
    kept: list[tuple[torch.Tensor, torch.Tensor]] = []

    def read_pass() -> None:
        for batch in reader:
            if len(kept) <= train_steps:
                kept.append(batch)

    seconds["read"] = timed(read_pass)[0]
    epoch_steps = len(reader)

    model = AutoSSVH(cfg)
    batch = encode_batch_size(cfg, device, np.dtype(info.dtype).itemsize, info.chunk_videos)
    seconds["encode"], train_codes = timed(lambda: encode(model, EvalReader(url, "train", batch, dtype=None)))

    seconds["k-means cold"], cold = timed(lambda: cluster_codes(train_codes.features, train_codes.codes, cfg.cluster))
    result: ClusteringResult = cold
    if "previous" in inspect.signature(cluster_codes).parameters:
        moved = perturbed(train_codes, PERTURBATION, scale)
        seconds["k-means warm"], result = timed(
            lambda: cluster_codes(moved.features, moved.codes, cfg.cluster, previous=cold))

    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    targets = ClusterTargets.from_result(cold, device)
    train_one_epoch(model, kept[:1], optimizer, cfg, device, targets)  # allocations, autocast caches
    stats = train_one_epoch(model, kept[1:], optimizer, cfg, device, targets)
    seconds["train"] = stats.seconds / stats.steps * epoch_steps

    seconds["eval: encode query"], query = timed(
        lambda: encode(model, EvalReader(url, "query", batch, dtype=None)))
    labels = store.eval_labels()
    seconds["eval: mAP@K"], maps = timed(
        lambda: map_at_k(query.codes, train_codes.codes, labels["query"], labels["database"]))

    record = EpochRecord(epoch=scale, lr=optimizer.param_groups[0]["lr"], stats=stats,
                         cluster_seconds=seconds["encode"] + seconds["k-means cold"], clustering=result.report(),
                         retrieval=Retrieval(maps, gmap_l2(maps)),
                         eval_seconds=seconds["eval: encode query"] + seconds["eval: mAP@K"])
    state = TrainState(model=model.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                       epoch=scale, config=cfg.to_dict(), mlflow_run_id="", rng=[rng_state()], clustering=result,
                       history=[record])
    persisted = workdir / "epoch-split-checkpoints" / f"scale-{scale}"
    shutil.rmtree(persisted, ignore_errors=True)

    def checkpoint() -> None:
        with tempfile.TemporaryDirectory() as folder:
            state.save(Path(folder))
            shutil.copytree(folder, persisted)

    seconds["checkpoint"] = timed(checkpoint)[0]
    with tracking.start_run(mlflow_uri, "epoch-split", run_name=f"scale-{scale}"):
        seconds["MLflow"] = timed(lambda: tracking.log_epoch(record, num_cluster=cfg.cluster.num_cluster))[0]
    return ScaleResult(scale, n_train, n_query, epoch_steps, stats.steps, seconds, (load_before, os.getloadavg()[0]))


def epoch_total(seconds: dict[str, float]) -> float:
    """One epoch after warm-up: every part once, the warm k-means round where there is one, else the cold."""
    kmeans = seconds.get("k-means warm", seconds["k-means cold"])
    return kmeans + sum(v for k, v in seconds.items() if not k.startswith("k-means"))


def growth_exponent(results: list[ScaleResult], part: str) -> float:
    """e in seconds ~ scale^e, a least-squares fit in log-log over all scales (0 where a part does not grow)."""
    x = np.log([r.scale for r in results])
    y = np.log([max(r.seconds[part], 1e-6) for r in results])
    return max(0.0, float(np.polyfit(x, y, 1)[0]))


def print_table(results: list[ScaleResult], threads: int, train_steps: int) -> None:
    first, last = results[0], results[-1]
    parts = [p for p in PARTS if all(p in r.seconds for r in results)]
    growth = f"{first.scale}x->{last.scale}x"
    print(f"\nOne epoch after warm-up, seconds in one process on {threads} thread(s), released UCF101 config "
          "(batch 128, k-means at {}):".format(list(build_config("ucf101").cluster.num_cluster)))
    header = f"{'part':<22}" + "".join(f"{str(r.scale) + 'x':>10}" for r in results) + f"{growth:>12}"
    print(header)
    print("-" * len(header))
    for part in parts:
        values = "".join(f"{r.seconds[part]:>10.2f}" for r in results)
        print(f"{part:<22}{values}{last.seconds[part] / max(first.seconds[part], 1e-9):>11.2f}x")
    totals = [epoch_total(r.seconds) for r in results]
    print(f"{'epoch total':<22}" + "".join(f"{t:>10.1f}" for t in totals) + f"{totals[-1] / totals[0]:>11.2f}x")
    print(f"{'train videos':<22}" + "".join(f"{r.train_videos:>10}" for r in results))
    print(f"{'query videos':<22}" + "".join(f"{r.query_videos:>10}" for r in results))
    print(f"{'load avg (1 min)':<22}" + "".join(f"{r.load[0]:>4.1f}-{r.load[1]:<4.1f}".rjust(10) for r in results))
    print(f"train: {train_steps} real steps measured at each scale (after one unmeasured step), extrapolated "
          f"linearly to the epoch's {', '.join(str(r.train_steps) for r in results)} steps. Every other part ran "
          "in full. 'epoch total' counts the warm k-means round where there is one, and the train split's "
          "encoding once (the evaluation's database codes serve the next clustering round).")
    if "k-means warm" not in parts:
        print("k-means warm: not measured (cluster_codes takes no 'previous' here).")
    fastest = max((p for p in parts if last.seconds[p] >= MIN_SECONDS), key=lambda p: growth_exponent(results, p))
    print(f"\nFastest-growing part (of those taking at least {MIN_SECONDS} s at {last.scale}x): {fastest}, "
          f"x{last.seconds[fastest] / first.seconds[fastest]:.1f} for x{last.scale // first.scale} the videos "
          f"(seconds ~ scale^{growth_exponent(results, fastest):.2f}). " + fcvid_sentence(results, fastest))


def fcvid_sentence(results: list[ScaleResult], fastest: str) -> str:
    """What the measured growth means for one FCVID epoch on 8 GPU workers: every part extrapolated from the
    largest scale with its fitted exponent, to FCVID's train split (45,585 videos), its 45,600 encoded database
    videos (query = database) and 45,600 x 45,600 ranked pairs."""
    last = results[-1]
    size = {part: FCVID_TRAIN / last.train_videos for part in last.seconds}
    size["eval: encode query"] = FCVID_DATABASE / last.query_videos
    size["eval: mAP@K"] = math.sqrt(FCVID_DATABASE ** 2 / (last.query_videos * last.train_videos))
    at_fcvid = {p: last.seconds[p] * size[p] ** growth_exponent(results, p) for p in last.seconds}
    kmeans = "k-means warm" if "k-means warm" in at_fcvid else "k-means cold"
    serial = at_fcvid[kmeans] + at_fcvid["eval: mAP@K"] + at_fcvid["checkpoint"] + at_fcvid["MLflow"]
    parallel = sum(at_fcvid[p] for p in DATA_PARALLEL) / 8
    return (f"At FCVID's size (x{size['read']:.1f} the train videos and x{size['eval: mAP@K'] ** 2:.1f} the ranked "
            f"pairs of {last.scale}x), each part extrapolated on this CPU with its exponent (assuming it holds that "
            f"far; k-means at UCF101's granularities), {fastest} takes {at_fcvid[fastest]:.1f} s. The parts that do "
            f"not divide among workers ({kmeans} on the one actor {at_fcvid[kmeans]:.1f} s, mAP@K on rank 0 "
            f"{at_fcvid['eval: mAP@K']:.1f} s, "
            f"checkpoint and MLflow {at_fcvid['checkpoint'] + at_fcvid['MLflow']:.1f} s) sum to {serial:.1f} s; read, "
            f"train and encoding take {parallel:.0f} s split over 8 workers of this CPU. On 8 GPUs the serial parts "
            f"set the epoch once a GPU worker is more than {parallel / serial:.0f}x one core here, unless they move "
            "to the GPU too (faiss-gpu k-means, a GPU or sharded Hamming ranking).")


def epoch_split(workdir: Path, scales: list[int], feature_dim: int = 4096, threads: int = 1, *,
                train_steps: int = 12, train_videos: int = UCF101_TRAIN) -> None:
    """Measure one epoch's parts at ``scales`` x ``train_videos`` train videos and print the table."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads)
    import faiss

    faiss.omp_set_num_threads(threads)
    mlflow_uri = f"sqlite:///{(workdir / 'epoch-split-mlflow.db').resolve()}"
    results = []
    for scale in sorted(scales):
        url = ensure_store(workdir, scale * train_videos, feature_dim)
        info = open_store(url).info
        cfg = build_config("ucf101", overrides=[f"data.feature_size={info.feature_dim}",
                                                f"data.max_frames={info.max_frames}"])
        result = measure_scale(workdir, cfg, url, scale, train_steps, mlflow_uri)
        print(f"scale {scale}x: " + ", ".join(f"{k} {v:.2f} s" for k, v in result.seconds.items())
              + f" (load {result.load[0]:.1f}-{result.load[1]:.1f})", flush=True)
        results.append(result)
    print_table(results, threads, train_steps)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench"), help="stores, checkpoints, MLflow")
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 2, 4], help="multiples of UCF101's train split")
    parser.add_argument("--feature-dim", type=int, default=4096, help="frame feature size (4096: the real one)")
    parser.add_argument("--threads", type=int, default=1, help="torch and faiss threads (1: one Train worker)")
    parser.add_argument("--train-steps", type=int, default=12, help="training steps measured at each scale")
    args = parser.parse_args()
    epoch_split(args.workdir, args.scales, args.feature_dim, args.threads, train_steps=args.train_steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
