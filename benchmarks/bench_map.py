"""Wall time and peak memory of ``map_at_k`` and ``precision_recall_by_radius`` at FCVID-protocol size.

The FCVID standalone protocol (REFERENCE.md §8.1) ranks all 45,600 test videos against the same 45,600 videos
(the query is in the database), 64 bits, 239 classes, one label per video. The released evaluation builds
dense 45,600 x 45,600 float64 matrices (Hamming distances, argsort indices, label similarity): 45,600^2 x 8 B
= 16.6 GB per matrix (``python -c "print(45600**2 * 8 / 1e9)"`` -> 16.63), and its log shows about 40 minutes
for evaluation alone (REFERENCE.md §12.2 #10). ``autossvh.metrics`` processes query chunks instead.

The codes are random but structured: each class has a random prototype code and each video flips every bit of
its class prototype with probability ``--flip``, so the retrieval numbers are non-trivial and Hamming ties are
common. Every measurement runs in a fresh subprocess: it generates the data, resets the kernel's peak-RSS
counter (``/proc/self/clear_refs``; falls back to ``ru_maxrss``), calls the function, and reports the wall
time and the peak RSS above the RSS just before the call.

``map_at_k`` is also measured against a plain search: before each of its calls (and outside its peak-RSS
window) the same process times a bare faiss ``IndexBinaryFlat`` top-100 search of the same codes (default
index settings; packing and adding the codes are not timed), and the ratio map_at_k / search is printed per
call. Both run on the same number of OpenMP threads (``--threads`` sets faiss's and torch's). Other processes
on the machine inflate both, so the ratio of each back-to-back pair is the figure to read.

Usage: ``python benchmarks/bench_map.py [--n 45600] [--bits 64] [--labels 239] [--repeat 3]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def make_data(n: int, bits: int, n_labels: int, flip: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Codes (n, bits) int8 in {-1, +1} around per-class prototypes, and one-hot labels (n, n_labels) bool."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, n_labels, n)
    protos = rng.choice(np.array([-1, 1], dtype=np.int8), size=(n_labels, bits))
    flips = np.where(rng.random((n, bits)) < flip, -1, 1).astype(np.int8)
    codes = protos[label] * flips
    labels = np.zeros((n, n_labels), dtype=bool)
    labels[np.arange(n), label] = True
    return codes, labels


def _status_kib(field: str) -> int | None:
    """A ``/proc/self/status`` memory field in KiB, or None where unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset the peak-RSS counter (VmHWM) of this process; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def worker(args: argparse.Namespace) -> None:
    """Measure one function in this (fresh) process and print one JSON line."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
    import faiss
    import torch

    from autossvh.metrics import gmap_l2, map_at_k, precision_recall_by_radius

    if args.threads:
        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    codes, labels = make_data(args.n, args.bits, args.labels, args.flip, args.seed)
    packed = np.packbits(codes > 0, axis=1)
    index = faiss.IndexBinaryFlat(packed.shape[1] * 8)
    if args.worker == "map":
        index.add(packed)
    walls, cpus, loads, peaks, searches = [], [], [], [], []
    result: dict[str, object] = {}
    for _ in range(args.repeat):
        loads.append(os.getloadavg()[0])
        if args.worker == "map":
            start = time.perf_counter()
            index.search(packed, 100)
            searches.append(time.perf_counter() - start)
        rss_before = _status_kib("VmRSS")
        exact = _reset_peak() and rss_before is not None
        maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        cpu_start = time.process_time()
        start = time.perf_counter()
        if args.worker == "map":
            maps = map_at_k(codes, codes, labels, labels)
            result = {"map": maps, "gmap_l2": gmap_l2(maps)}
        else:
            radii, prec, rec = precision_recall_by_radius(codes, codes, labels, labels)
            pick = [int(r) for r in radii[:: max(1, len(radii) // 8)]]
            result = {
                "precision": {r: round(float(prec[r]), 4) for r in pick},
                "recall": {r: round(float(rec[r]), 4) for r in pick},
            }
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu_start)
        if exact:
            peaks.append((_status_kib("VmHWM") or 0) - rss_before)
        else:
            peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - maxrss_before)
    print(
        json.dumps(
            {
                "walls_s": walls,
                "cpu_s": cpus,
                "load1": loads,
                "peak_delta_kib": peaks,
                "exact_peak": exact,
                "rss_before_kib": rss_before,
                "threads": torch.get_num_threads(),
                "faiss_threads": faiss.omp_get_max_threads(),
                "search_s": searches,
                **result,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=45_600, help="videos; queries = database (FCVID: 45,600)")
    parser.add_argument("--bits", type=int, default=64, help="code length")
    parser.add_argument("--labels", type=int, default=239, help="number of classes (FCVID: 239)")
    parser.add_argument(
        "--flip", type=float, default=0.2, help="per-bit flip probability around the prototype"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3, help="calls per measurement (each one is timed)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--skip-pr", action="store_true", help="only benchmark map_at_k")
    parser.add_argument("--worker", choices=["map", "pr"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    dense_gb = args.n**2 * 8 / 1e9
    print(f"FCVID-style all-vs-all: {args.n} queries = database, {args.bits} bits, {args.labels} labels")
    print(
        f"a dense float64 {args.n} x {args.n} matrix (released evaluation) would take {dense_gb:.1f} GB each"
    )
    common: list[str] = []
    for flag in ("n", "bits", "labels", "flip", "seed", "repeat", "threads"):
        common += [f"--{flag}", str(getattr(args, flag))]
    for name in ["map"] + ([] if args.skip_pr else ["pr"]):
        cmd = [sys.executable, __file__, "--worker", name, *common]
        rec = json.loads(
            subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1]
        )
        label = "map_at_k" if name == "map" else "precision_recall_by_radius"
        walls = ", ".join(f"{w:.2f}" for w in rec["walls_s"])
        cpus = ", ".join(f"{c:.2f}" for c in rec["cpu_s"])
        loads = ", ".join(f"{x:.1f}" for x in rec["load1"])
        how = "VmHWM after clear_refs" if rec["exact_peak"] else "ru_maxrss delta, a lower bound"
        print(f"\n{label} ({rec['threads']} torch threads, {rec['faiss_threads']} faiss threads)")
        print(f"  wall [s] per call: {walls} (min {min(rec['walls_s']):.2f}); process CPU [s]: {cpus}")
        print(f"  1-min load average before each call: {loads} (other processes inflate the wall time)")
        if name == "map":
            search = ", ".join(f"{x:.2f}" for x in rec["search_s"])
            ratios = ", ".join(f"{w / x:.2f}" for w, x in zip(rec["walls_s"], rec["search_s"], strict=True))
            best = min(rec["walls_s"]) / min(rec["search_s"])
            print(f"  bare faiss IndexBinaryFlat top-100 search of the same codes, just before each call [s]: {search}")
            print(f"  ratio map_at_k / search per call: {ratios} (min over min {best:.2f})")
        print(
            f"  peak RSS above the pre-call RSS: {max(rec['peak_delta_kib']) / 1024:.0f} MiB ({how}); "
            f"pre-call RSS {rec['rss_before_kib'] / 1024:.0f} MiB"
        )
        if name == "map":
            maps = {k: round(v, 4) for k, v in rec["map"].items()}
            print(f"  mAP@K: {maps}; GMAP (L2) = {rec['gmap_l2']:.4f}")
        else:
            print(f"  precision by radius: {rec['precision']}")
            print(f"  recall by radius:    {rec['recall']}")


if __name__ == "__main__":
    main()
