"""Per-epoch cost of the Ray Train entry on a UCF101-sized synthetic store, and an estimate of one FCVID epoch.

    .venv/bin/python benchmarks/bench_epoch.py                        # 9,537 videos x 25 x 4096, 2 workers
    .venv/bin/python benchmarks/bench_epoch.py --videos 1500 --epochs 3 --fcvid-workers 1 4 8

Steps:

1. write (once, cached under ``--workdir``) a synthetic store ``like="ucf101"`` with ``--videos`` train videos;
2. run ``jobs/train_ucf101.py`` on it (``--workers`` Ray Train workers of one CPU each, ``--epochs`` epochs,
   clustering from epoch 1 and an evaluation every epoch) with its own MLflow SQLite database;
3. read the per-epoch metrics back from that run (``time/train_s``, ``time/cluster_s``, ``time/eval_s``,
   ``train/videos_per_s`` of rank 0; steps count epochs from 1) and print them with the seconds per global batch;
4. time two components in this process on one thread (one Train worker's share of the CPU): encoding the
   train split (seconds per video) and k-means on ``n_train`` codes at the run's granularities;
5. print an estimate of one FCVID epoch on N workers (see :func:`fcvid_estimate` for the assumptions).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autossvh.clustering import cluster_codes  # noqa: E402
from autossvh.config import Config, build_config  # noqa: E402
from autossvh.engine import encode, encode_batch_size  # noqa: E402
from autossvh.model import AutoSSVH  # noqa: E402
from storage.reader import EvalReader, make_loader  # noqa: E402
from storage.schema import stored_split  # noqa: E402
from storage.store import open_store  # noqa: E402
from storage.synthetic_store import write_synthetic  # noqa: E402

# FCVID protocol sizes (REFERENCE.md section 2.1) and the released preset (autossvh.config.PRESETS["fcvid"]).
FCVID_TRAIN, FCVID_DATABASE, FCVID_BATCH, FCVID_CLUSTERS = 45_585, 45_600, 512, (250, 500, 1000)
# map_at_k on 45,600 x 45,600 codes, 64 bits, 2 threads: 1.0-1.1 s on this CPU (README, Performance).
FCVID_MAP_SECONDS = 1.1
# Default ratio of one GPU worker's throughput to one Train worker here (one core of this CPU, bf16 on AVX512-BF16).
# Not measured: README puts the FCVID model at ~150 videos/s on 2 cores (~2 GFLOP per video forward+backward,
# ~0.3 TFLOPS); an H100 reaches hundreds of TFLOPS on large bf16 GEMMs, but this model's matrices are small
# (7-25 tokens x 256-d) and the step also reads ~205 KB of fp16 features per video, so a conservative 50x
# (~3,750 videos/s, ~0.8 GB/s of reads per GPU) is assumed. Pass the ratio of your own card with --gpu-speedup.
DEFAULT_GPU_SPEEDUP = 50.0
METRICS = {"time/train_s": "train_seconds", "time/cluster_s": "cluster_seconds", "time/eval_s": "eval_seconds",
           "train/videos_per_s": "videos_per_s"}  # MLflow name -> name here


@dataclass(frozen=True)
class Components:
    """Measured costs on this machine (seconds; the per-video costs are for one Train worker)."""

    step_seconds: float  # one global batch of the run (median over the epochs with clustering targets)
    global_batch: int
    workers: int
    encode_per_video: float  # eval-mode encoding, one thread
    kmeans_seconds: float  # cluster_codes on n_train codes at the run's granularities, one thread
    kmeans_videos: int
    kmeans_clusters: tuple[int, ...]
    cluster_overhead: float  # run's clustering time minus its encoding and k-means (Ray transfers, actor)

    @property
    def train_per_video(self) -> float:
        """Seconds one worker spends training one video (the step is data-parallel over the workers)."""
        return self.step_seconds * self.workers / self.global_batch


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench"), help="store, Ray and MLflow files")
    parser.add_argument("--videos", type=int, default=9537, help="train videos of the synthetic store")
    parser.add_argument("--feature-dim", type=int, default=4096, help="frame feature size (4096: the real one)")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers of the measured run")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override of the run (e.g. model.encoder_depth=2)")
    parser.add_argument("--gpu-speedup", type=float, default=DEFAULT_GPU_SPEEDUP,
                        help="throughput of one GPU worker / one Train worker (CPU core) here; see the source")
    parser.add_argument("--kmeans-gpu-speedup", type=float, default=1.0,
                        help="speed-up of the k-means actor (1: as measured on CPU; faiss-gpu is not measured)")
    parser.add_argument("--map-seconds", type=float, default=FCVID_MAP_SECONDS,
                        help="map_at_k on 45,600 x 45,600 codes (README: 1.1 s on CPU, rank 0)")
    parser.add_argument("--fcvid-workers", type=int, nargs="+", default=[1, 2, 4, 8], help="N of the estimate")
    parser.add_argument("--encode-videos", type=int, default=512, help="videos encoded to time the encoder")
    return parser.parse_args()


def ensure_store(workdir: Path, videos: int, feature_dim: int) -> str:
    """The cached synthetic UCF101-like store of this size, written on first use."""
    url = str((workdir / f"store-ucf101-{videos}-f{feature_dim}").resolve())
    try:
        open_store(url)
        print(f"store: {url} (cached)")
    except ValueError:
        tic = time.perf_counter()
        write_synthetic(url, "ucf101", videos, feature_dim=feature_dim, seed=0)
        print(f"store: {url} (written in {time.perf_counter() - tic:.1f} s)")
    return url


def run_training(args: argparse.Namespace, url: str, overrides: list[str]) -> tuple[str, str, float]:
    """Run the Ray Train entry; returns (MLflow tracking URI, run id, wall seconds of the command)."""
    workdir = args.workdir.resolve()
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    name = f"bench-epoch-{time.strftime('%Y%m%d-%H%M%S')}"  # a fresh name: never resume an earlier run
    summary = workdir / f"{name}.json"
    cmd = [sys.executable, str(ROOT / "jobs/train_ucf101.py"), "--data", url, "--workers", str(args.workers),
           "--epochs", str(args.epochs), "--storage", str(workdir / "ray"), "--name", name, "--mlflow-uri", uri,
           "--mlflow-artifacts", str(workdir / "mlartifacts"), "--experiment", "bench-epoch",
           "--summary-json", str(summary), "--max-failures", "0"]
    for item in overrides:
        cmd += ["--set", item]
    print("command:", " ".join(cmd), flush=True)
    tic = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    wall = time.perf_counter() - tic
    return uri, json.loads(summary.read_text())["mlflow_run_id"], wall


def epoch_metrics(uri: str, run_id: str) -> dict[int, dict[str, float]]:
    """Epoch → {metric: value} of the run, from its MLflow metric histories."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    table: dict[int, dict[str, float]] = {}
    for metric, key in METRICS.items():
        for m in client.get_metric_history(run_id, metric):
            table.setdefault(m.step, {})[key] = m.value
    return table


def time_encode(cfg: Config, url: str, videos: int) -> float:
    """Seconds per video of eval-mode encoding of about ``videos`` train videos with a fresh model, read and
    batched as a Train worker's clustering round reads them (stored dtype, ``encode_batch_size`` videos)."""
    store = open_store(url)
    info, n = store.info, store.num_videos("train")
    batch = encode_batch_size(cfg, torch.device("cpu"), np.dtype(info.dtype).itemsize, info.chunk_videos)
    reader = EvalReader(url, "train", batch, 0, max(1, n // videos), dtype=None)
    model = AutoSSVH(cfg).eval()
    encode(model, [torch.from_numpy(np.zeros((2, cfg.data.max_frames, cfg.data.feature_size), np.float32))])
    tic = time.perf_counter()
    encoded = encode(model, make_loader(reader, 0))
    return (time.perf_counter() - tic) / len(encoded.codes)


def time_kmeans(cfg: Config, videos: int) -> float:
    """Seconds of ``cluster_codes`` on ``videos`` random unit-norm codes at ``cfg.cluster.num_cluster``."""
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((videos, cfg.model.nbits)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    codes = np.where(feats > 0, 1, -1).astype(np.int8)
    tic = time.perf_counter()
    cluster_codes(feats, codes, cfg.cluster)
    return time.perf_counter() - tic


def fcvid_estimate(c: Components, n: int, gpu_speedup: float, kmeans_speedup: float,
                   map_seconds: float) -> dict[str, float]:
    """One FCVID epoch (seconds) on ``n`` GPU workers from the measured components.

    - train: 45,585 // 512 = 89 steps; a step costs ``train_per_video * 512 / n / gpu_speedup`` (the global
      batch splits evenly over the workers; linear scaling, gradient all-reduce and gathers not counted);
    - clustering: the train split encoded in ``n`` blocks (``encode_per_video * 45,585 / n / gpu_speedup``) plus
      k-means scaled from the measured one by (videos x sum of k) to 45,585 x (250 + 500 + 1000), divided by
      ``kmeans_speedup``, plus the run's measured clustering overhead (Ray transfers), kept constant;
    - evaluation: 45,600 videos encoded in ``n`` blocks (query = database, encoded once) plus ``map_seconds``
      for map_at_k on rank 0 (CPU).
    """
    steps = FCVID_TRAIN // FCVID_BATCH
    step = c.train_per_video * FCVID_BATCH / n / gpu_speedup
    scale = (FCVID_TRAIN * sum(FCVID_CLUSTERS)) / (c.kmeans_videos * sum(c.kmeans_clusters))
    kmeans = c.kmeans_seconds * scale / kmeans_speedup
    cluster = c.encode_per_video * FCVID_TRAIN / n / gpu_speedup + kmeans + c.cluster_overhead
    evaluation = c.encode_per_video * FCVID_DATABASE / n / gpu_speedup + map_seconds
    return {"step": step, "train": steps * step, "kmeans": kmeans, "cluster": cluster, "eval": evaluation,
            "total": steps * step + cluster + evaluation}


def main() -> int:
    args = parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    url = ensure_store(args.workdir, args.videos, args.feature_dim)
    info = open_store(url).info
    overrides = ["cluster.warmup_epoch=1", "train.eval_every=1", *args.overrides]
    cfg = build_config("ucf101", overrides=[*overrides, f"data.feature_size={info.feature_dim}",
                                            f"data.max_frames={info.max_frames}"])
    n_train = open_store(url).num_videos("train")
    uri, run_id, wall = run_training(args, url, overrides)
    table = epoch_metrics(uri, run_id)

    world, batch = args.workers, cfg.train.batch_size
    per_rank = max(batch // world, 2)
    global_batch = per_rank * world
    print(f"\nRay Train run {run_id} ({uri}): {n_train} train videos, {info.feature_dim}-d x {info.max_frames} "
          f"frames, {world} workers, global batch {global_batch}, {args.epochs} epochs, command wall {wall:.1f} s")
    print(f"{'epoch':>5} {'train s':>8} {'steps':>5} {'s/step':>7} {'clustering s':>12} {'eval s':>7} "
          f"{'videos/s':>8}")
    step_times, cluster_times = [], []
    for epoch in sorted(table):
        m = table[epoch]
        vps = m["videos_per_s"] * world  # rank 0 trains its 1/world share of every global batch
        steps = round(m["videos_per_s"] * m["train_seconds"] / per_rank)
        step = m["train_seconds"] / max(steps, 1)
        if m["cluster_seconds"] > 0:
            step_times.append(step)
            cluster_times.append(m["cluster_seconds"])
        print(f"{epoch:>5} {m['train_seconds']:>8.1f} {steps:>5} {step:>7.3f} {m['cluster_seconds']:>12.1f} "
              f"{m['eval_seconds']:>7.1f} {vps:>8.1f}")
    if not step_times:  # no epoch with clustering: use every epoch
        step_times = [table[e]["train_seconds"] / max(1, round(table[e]["videos_per_s"] * table[e]["train_seconds"]
                                                               / per_rank)) for e in table]
    step_seconds = statistics.median(step_times)
    print(f"per-step cost: {step_seconds:.3f} s per global batch of {global_batch} ({world} workers x {per_rank}), "
          f"median over {len(step_times)} epoch(s) with clustering targets; "
          f"{global_batch / step_seconds:.1f} videos/s")

    torch.set_num_threads(1)  # one Ray Train worker's share (--cpus-per-worker 1)
    encode_per_video = time_encode(cfg, url, args.encode_videos)
    kmeans_seconds = time_kmeans(cfg, n_train)
    measured_cluster = statistics.median(cluster_times) if cluster_times else 0.0
    # Where the database is the train split and every epoch evaluates, a round takes the codes of the last
    # evaluation's database (cluster.worker.TrainWorker._encode_block) and encodes nothing.
    reused = stored_split(info.protocol, "database") == "train" and cfg.train.eval_every == 1
    encode_seconds = 0.0 if reused else encode_per_video * math.ceil(n_train / world)
    overhead = max(0.0, measured_cluster - encode_seconds - kmeans_seconds)
    note = " (the evaluation's, reused)" if reused else ""
    print(f"components (1 thread): encode {encode_per_video * 1e3:.2f} ms/video; k-means of {n_train} codes at "
          f"{list(cfg.cluster.num_cluster)}: {kmeans_seconds:.2f} s; run's clustering {measured_cluster:.1f} s "
          f"= encode {encode_seconds:.1f}{note} "
          f"+ k-means {kmeans_seconds:.1f} + overhead {overhead:.1f}")
    comp = Components(step_seconds, global_batch, world, encode_per_video, kmeans_seconds, n_train,
                      tuple(cfg.cluster.num_cluster), overhead)

    print(f"\nFCVID epoch estimate: {FCVID_TRAIN} train videos, batch {FCVID_BATCH} ({FCVID_TRAIN // FCVID_BATCH} "
          f"steps), k-means at {list(FCVID_CLUSTERS)}, eval {FCVID_DATABASE} x {FCVID_DATABASE}")
    print(f"assumptions: train {comp.train_per_video * 1e3:.2f} ms per video per worker here (measured step x "
          f"workers / batch), divided by --gpu-speedup {args.gpu_speedup:g} per GPU worker and scaled linearly "
          f"over N (no all-reduce/gather cost); encoding {encode_per_video * 1e3:.2f} ms/video likewise; k-means "
          f"scaled by videos x sum(k) from the measured one, / --kmeans-gpu-speedup {args.kmeans_gpu_speedup:g}; "
          f"clustering overhead {overhead:.1f} s constant; map_at_k {args.map_seconds:g} s (README, CPU). "
          f"Same model size as the run, whose mask ratio is UCF101's (0.5) where FCVID's is 0.75.")
    print(f"{'N':>3} {'s/step':>7} {'train s':>8} {'k-means s':>9} {'clustering s':>12} {'eval s':>7} "
          f"{'epoch s':>8}")
    for n in args.fcvid_workers:
        e = fcvid_estimate(comp, n, args.gpu_speedup, args.kmeans_gpu_speedup, args.map_seconds)
        print(f"{n:>3} {e['step']:>7.3f} {e['train']:>8.1f} {e['kmeans']:>9.1f} {e['cluster']:>12.1f} "
              f"{e['eval']:>7.1f} {e['total']:>8.1f}")
    cpu = fcvid_estimate(comp, world, 1.0, 1.0, args.map_seconds)
    print(f"for reference, this CPU with {world} workers (speed-up 1): {cpu['total']:.0f} s per FCVID epoch "
          f"(train {cpu['train']:.0f}, clustering {cpu['cluster']:.0f}, eval {cpu['eval']:.0f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
