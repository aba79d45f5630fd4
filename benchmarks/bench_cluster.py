"""Clustering rounds: cold against warm on the codes of consecutive epochs, a round's cost as N grows, and one
epoch's cost split.

    .venv/bin/python benchmarks/bench_cluster.py rounds        # FCVID-sized codes of a real training run
    .venv/bin/python benchmarks/bench_cluster.py scaling       # N = 10k ... 400k, 1 and 2 shards
    .venv/bin/python benchmarks/bench_cluster.py epoch-split   # read/train/encode/k-means/eval/... at 1x, 2x, 4x

``rounds`` trains the released FCVID model (64 bits, P2Set from the first epoch, its k-means at 250/500/1000
feeding the loss) on ``--train-videos`` videos of a generated FCVID-shaped set of ``--videos`` videos (256-d
frame features, 239 classes), and after every epoch encodes all ``--videos`` videos and saves their codes
(cached under ``--workdir``). On the codes of each epoch after the first it then runs, in this process, one
cold round (``nredo`` restarts, as the first round of a run) and one warm round started from the previous
epoch's warm round (as a run does), and prints seconds, the k-means objective, Lloyd iterations, and the NMI of
each granularity's assignment against the class labels. A bare faiss ``Kmeans`` with the cold settings is timed
on the same codes for reference.

``scaling`` times a cold and a warm round (from the cold one, on codes moved by a small drift) of N random
codes around 1,000 prototypes, at N = 10k, 45k, 100k and 400k, in one process (1 shard: faiss ``Clustering``,
granularities in parallel over the OpenMP threads) and with the sharded k-means over 2 ``KMeansShard`` actors
of a local Ray (faiss's contrib k-means on the ``DatasetAssign`` interface; no subsampling).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autossvh.clustering import ClusteringResult, cluster_codes  # noqa: E402
from autossvh.config import ClusterConfig, build_config  # noqa: E402
from autossvh.engine import array_batches, build_optimizer, encode, train_one_epoch  # noqa: E402
from autossvh.losses import ClusterTargets  # noqa: E402
from autossvh.model import AutoSSVH  # noqa: E402
from storage.synthetic import make_synthetic  # noqa: E402

FCVID_CLUSTERS = [250, 500, 1000]


def nmi(assign: np.ndarray, labels: np.ndarray) -> float:
    """Normalised mutual information (arithmetic mean of the entropies) of two labellings."""
    from sklearn.metrics import normalized_mutual_info_score

    return float(normalized_mutual_info_score(labels, assign))


def training_codes(args: argparse.Namespace) -> tuple[list[np.ndarray], np.ndarray]:
    """Mean codes (N, 64) of every epoch of a real training run, and the class of each video (cached)."""
    cache = args.workdir / f"codes-fcvid-{args.videos}-{args.train_videos}-e{args.epochs}-lr{args.lr:g}.npz"
    if cache.exists():
        saved = np.load(cache)
        print(f"codes: {cache} (cached)")
        return [saved[f"epoch{e}"] for e in range(args.epochs)], saved["labels"]
    data = make_synthetic("fcvid", args.videos, feature_dim=256, seed=0).splits["train"]
    labels = data.labels.argmax(axis=1)
    cfg = build_config("fcvid", overrides=["data.feature_size=256", "train.batch_size=128", f"train.lr={args.lr}",
                                           "cluster.warmup_epoch=0"])
    torch.manual_seed(0)
    model = AutoSSVH(cfg)
    optimizer = build_optimizer(model, cfg)
    generator = torch.Generator().manual_seed(0)
    epochs, previous = [], None
    for epoch in range(args.epochs):
        tic = time.perf_counter()
        encoded = encode(model, array_batches(data.feats, 1024))
        epochs.append(encoded.features)
        previous = cluster_codes(encoded.features, encoded.codes, cfg.cluster, previous=previous)
        targets = ClusterTargets.from_result(previous, "cpu")
        order = torch.randperm(args.train_videos, generator=generator).split(cfg.train.batch_size)
        batches = ((torch.from_numpy(data.feats[np.sort(i.numpy())]), torch.from_numpy(np.sort(i.numpy())))
                   for i in order if len(i) > 1)
        stats = train_one_epoch(model, batches, optimizer, cfg, torch.device("cpu"), targets)
        print(f"training epoch {epoch + 1}/{args.epochs}: loss {stats.loss:.4f} (p2set {stats.p2set:.4f}) "
              f"{time.perf_counter() - tic:.0f} s", flush=True)
    np.savez(cache, labels=labels, **{f"epoch{e}": f for e, f in enumerate(epochs)})
    return epochs, labels


def bare_faiss_seconds(x: np.ndarray, cfg: ClusterConfig) -> float:
    """faiss ``Kmeans`` with the cold settings at every granularity, one after the other."""
    tic = time.perf_counter()
    for seed, k in enumerate(cfg.num_cluster):
        faiss.Kmeans(x.shape[1], k, niter=cfg.niter, nredo=cfg.nredo, seed=seed,
                     max_points_per_centroid=cfg.max_points_per_centroid,
                     min_points_per_centroid=cfg.min_points_per_centroid).train(x)
    return time.perf_counter() - tic


def describe(name: str, result: ClusteringResult, seconds: float, labels: np.ndarray) -> str:
    parts = [f"k={len(c)}: obj {o:.1f} it {i} nmi {nmi(a, labels):.4f}"
             for c, o, i, a in zip(result.centroids, result.objective, result.iterations, result.im2cluster,
                                   strict=True)]
    return f"  {name:<5} {seconds:6.2f} s | " + " | ".join(parts)


def rounds(args: argparse.Namespace) -> None:
    epochs, labels = training_codes(args)
    cfg = ClusterConfig(num_cluster=FCVID_CLUSTERS)
    signs = [np.where(f >= 0, 1, -1).astype(np.int8) for f in epochs]
    print(f"\n{args.videos} codes x 64 bits, k = {FCVID_CLUSTERS}, cold nredo {cfg.nredo} x niter {cfg.niter}; "
          f"warm until the objective improves < {cfg.warm_tolerance:g} per iteration; "
          f"{faiss.omp_get_max_threads()} OpenMP threads; load {os.getloadavg()[0]:.1f}")
    print(f"bare faiss Kmeans, cold settings, epoch 1 codes: {bare_faiss_seconds(epochs[0], cfg):.2f} s")
    warm = cluster_codes(epochs[0], signs[0], cfg)
    ratios, worse = [], []
    for e in range(1, len(epochs)):
        tic = time.perf_counter()
        cold = cluster_codes(epochs[e], signs[e], cfg)
        cold_s = time.perf_counter() - tic
        tic = time.perf_counter()
        warm = cluster_codes(epochs[e], signs[e], cfg, previous=warm)
        warm_s = time.perf_counter() - tic
        ratios.append(warm_s / cold_s)
        worse.append(max(w / c - 1 for w, c in zip(warm.objective, cold.objective, strict=True)))
        print(f"epoch {e} -> {e + 1}:")
        print(describe("cold", cold, cold_s, labels))
        print(describe("warm", warm, warm_s, labels))
    print(f"warm / cold seconds: {', '.join(f'{r:.3f}' for r in ratios)}; largest relative objective excess of "
          f"warm over cold at any granularity: {max(worse):+.4%}")


def drifted_codes(n: int, d: int, seed: int, drift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    prototypes = rng.normal(size=(1000, d))
    x = prototypes[rng.integers(0, 1000, n)] + 1.5 * rng.normal(size=(n, d))
    x += drift * np.random.default_rng(seed + 1).normal(size=x.shape)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def sharded_round(handles: list, x: np.ndarray, codes: np.ndarray, cfg: ClusterConfig,
                  previous: ClusteringResult | None = None) -> ClusteringResult:
    """Load ``x`` into the shard actors and run a sharded round."""
    import ray

    from cluster.clustering_actor import ShardedDataset, cluster_codes_sharded

    ray.get([h.load.remote(p) for h, p in zip(handles, np.array_split(x, len(handles)), strict=True)])
    return cluster_codes_sharded(ShardedDataset(handles), codes, cfg, previous)


def scaling(args: argparse.Namespace) -> None:
    import ray

    from cluster.clustering_actor import create_shards

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    cfg = ClusterConfig(num_cluster=FCVID_CLUSTERS, num_cpus=1, nredo=args.nredo)
    print(f"k = {FCVID_CLUSTERS}, 64 bits, cold nredo {cfg.nredo} x niter {cfg.niter}; "
          f"{faiss.omp_get_max_threads()} OpenMP threads in this process; shards: 1 thread each")
    print(f"{'N':>7} {'shards':>6} {'cold s':>8} {'warm s':>8} {'warm it':>16} {'load':>5}")
    for n in args.sizes:
        x, y = drifted_codes(n, 64, 0), drifted_codes(n, 64, 0, drift=0.05)
        codes = np.where(y >= 0, 1, -1).astype(np.int8)
        for shards in args.shards:
            handles = create_shards(np.array_split(x, shards), num_cpus=cfg.num_cpus) if shards > 1 else []
            tic = time.perf_counter()
            cold = sharded_round(handles, x, codes, cfg) if handles else cluster_codes(x, codes, cfg)
            cold_s = time.perf_counter() - tic
            tic = time.perf_counter()
            warm = sharded_round(handles, y, codes, cfg, cold) if handles else cluster_codes(y, codes, cfg,
                                                                                              previous=cold)
            warm_s = time.perf_counter() - tic
            print(f"{n:>7} {shards:>6} {cold_s:>8.2f} {warm_s:>8.2f} {str(warm.iterations):>16} "
                  f"{os.getloadavg()[0]:>5.1f}", flush=True)
            for h in handles:
                ray.kill(h)
    ray.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("rounds", help="cold vs warm rounds on the codes of consecutive epochs")
    p.add_argument("--videos", type=int, default=45_585, help="codes per round (FCVID train: 45,585)")
    p.add_argument("--train-videos", type=int, default=2048, help="videos the model trains on each epoch")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate (the FCVID preset's: 1e-4)")
    p.add_argument("--workdir", type=Path, default=ROOT / "runs" / "bench")
    p = sub.add_parser("scaling", help="a round's cost at growing N, 1 and 2 shards")
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 45_000, 100_000, 400_000])
    p.add_argument("--shards", type=int, nargs="+", default=[1, 2])
    p.add_argument("--nredo", type=int, default=5, help="restarts of the cold round")
    p = sub.add_parser("epoch-split", help="one epoch's cost by part at 1x, 2x and 4x the UCF101 train size")
    p.add_argument("--scales", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--workdir", type=Path, default=ROOT / "runs" / "bench")
    args = parser.parse_args()
    if args.command == "rounds":
        args.workdir.mkdir(parents=True, exist_ok=True)
        rounds(args)
    elif args.command == "scaling":
        scaling(args)
    else:
        from benchmarks.epoch_split import epoch_split

        epoch_split(args.workdir, args.scales)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
