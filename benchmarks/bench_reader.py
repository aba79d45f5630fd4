"""Reader throughput and memory on local disk for FCVID-shaped data (T = 25 frames, F = 4096, float16).

What it measures, all in one process per reader ("per worker": the work one DataLoader worker does, without the
hand-over to the training process) unless a row says DataLoader:

* ``storage.reader.TrainReader`` (shuffled, chunk-aligned, shuffle buffer) and ``EvalReader`` (sequential)
  on Zarr stores of several layouts: chunks of 8 / 16 / 32 videos, 16 chunks per shard, zarr's default zstd
  or no compression;
* the same data as plain h5py files (float16 and float32, contiguous like the released ``*_feats.h5``) and as
  a numpy memmap (float16), read in the same batch size: shuffled one video at a time (a map-style Dataset, as
  the released loader does), shuffled as one sorted fancy-indexed read per batch, and sequentially;
* DataLoader rows: the default layout through ``make_loader`` with 1 and 2 forkserver workers (steady state:
  timed from the first batch);
* peak RSS of a TrainReader reading a whole epoch at 1x and 10x the dataset size (the 10x store repeats the
  1x data), each in a fresh process, with glibc's mmap threshold fixed at the batch size as in make_loader's
  workers (``storage.reader.use_mmap_for_large_buffers``) and with glibc's default.

Every reader hands out float32 tensors (B, T, F); MB/s counts the stored float16 bytes (float32 h5: its own
bytes). "warm" runs read files already in the page cache (a second pass); "cold" runs first evict the files
of that reader from the page cache with ``posix_fadvise(DONTNEED)`` (per file, so other users of the machine
keep their cache; ``sync; echo 3 > /proc/sys/vm/drop_caches`` also works here, as root). The disk is a VM's
virtual disk, so "cold" may still hit the host's cache.

Data: the project's synthetic FCVID-like features (``storage.synthetic``), which zstd barely compresses, and
a "sparse" copy with every value below the median set to 0, as post-ReLU CNN features would be (how sparse the
released VGG features are is not known here), to bound what compression can gain.

``--checksums`` measures only what chunk checksums cost, back to back in one process: the default layout written
as before them (zstd alone, empty chunks skipped) and as now (zstd then a crc32c per inner chunk, every chunk
written), its write rate (the ingest's store side), TrainReader and EvalReader on each, and the readers' NaN/Inf
check and the pre-run shard check (``verify_shards``: listing plus every shard index's crc) on their own.

Usage (repo root): python -m benchmarks.bench_reader [--videos 6000] [--batch 64] [--dir /tmp/bench_reader]
[--keep] [--checksums]. Needs about 22x the dataset's float16 size of disk (25 GiB at 6,000 videos) and, on 2
cores, about 13 minutes the first time (2 minutes of writing; --keep lets a second run skip it).
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from zarr.codecs import ZstdCodec

from storage.reader import EvalReader, TrainReader, make_loader, use_mmap_for_large_buffers
from storage.store import (
    CHUNK_CODECS,
    WRITE_EVERY_CHUNK,
    StoreInfo,
    create_store,
    default_chunking,
    mark_complete,
    nonfinite_rows,
    open_store,
    verify_shards,
)
from storage.synthetic import SyntheticGenerator

FRAMES = 25
FEATURES = 4096
TRAIN_CONSUMES = 150  # videos/s: one training worker, FCVID-sized model, batch 64, this CPU (bench_train)
TARGET = 3 * TRAIN_CONSUMES
BLOCK = 512


@dataclass
class Row:
    name: str
    videos: int
    seconds: float
    video_bytes: int

    @property
    def rate(self) -> float:
        return self.videos / self.seconds

    def line(self) -> str:
        mbs = self.rate * self.video_bytes / 1e6
        flag = "" if self.rate >= TARGET else "  < target"
        return f"{self.name:<58} {self.rate:>9.0f} {mbs:>9.0f}{flag}"


def evict(path: Path) -> None:
    """Drop the page-cache pages of every file under ``path``."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[int, float]:
    start, videos = time.perf_counter(), 0
    for feats, _ in batches:
        videos += feats.shape[0]
    return videos, time.perf_counter() - start


def steady(batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[int, float]:
    """Like :func:`timed` but from the first batch on, leaving out worker start-up."""
    iterator = iter(batches)
    next(iterator)
    return timed(iterator)


def measure(name: str, path: Path, run: Callable[[], tuple[int, float]], video_bytes: int) -> list[Row]:
    """A cold run (files evicted), then the best of two warm runs."""
    evict(path)
    rows = [Row(f"{name} cold", *run(), video_bytes)]
    warm = [Row(f"{name} warm", *run(), video_bytes) for _ in range(2)]
    rows.append(max(warm, key=lambda r: r.rate))
    for row in rows:
        print(row.line(), flush=True)
    return rows


# ---------------------------------------------------------------------------------------------- data


def write_source(path: Path, videos: int) -> np.ndarray:
    """The synthetic FCVID-like train features as a float16 .npy memmap (written once)."""
    if not path.exists():
        tmp = path.with_suffix(".tmp.npy")
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(videos, FRAMES, FEATURES))
        for start, block in SyntheticGenerator("fcvid", videos).iter_blocks("train", BLOCK):
            out[start:start + len(block.feats)] = block.feats
        out.flush()
        del out
        tmp.rename(path)
    return np.load(path, mmap_mode="r")


def sparsify(block: np.ndarray, threshold: np.float16) -> np.ndarray:
    return np.where(block < threshold, np.float16(0), block)


def write_zarr(path: Path, source: np.ndarray, chunk: int, compress: bool, transform: Callable | None = None,
               repeat: int = 1) -> Path:
    """A feature store of ``source`` (``repeat`` times over) with chunks of ``chunk`` videos, 16 per shard."""
    if (path / "zarr.json").exists():
        return path
    n = len(source) * repeat
    info = StoreInfo("fcvid", "query_is_database", FRAMES, FEATURES, 239, "float16", {"train": n, "database": 1},
                     chunk, 16 * chunk)
    group = create_store(str(path), info, overwrite=True)
    if not compress:
        group["train"].create_array("feats", shape=(n, FRAMES, FEATURES), dtype="float16",
                                    chunks=(chunk, FRAMES, FEATURES), shards=(16 * chunk, FRAMES, FEATURES),
                                    fill_value=0, compressors=None, overwrite=True)
    feats = group["train"]["feats"]
    step = 16 * chunk * max(1, BLOCK // (16 * chunk))
    for start in range(0, n, step):
        stop = min(start + step, n)
        rows = np.arange(start, stop) % len(source)
        block = source[rows[0]:rows[-1] + 1] if rows[-1] - rows[0] == stop - start - 1 else source[rows]
        feats[start:stop] = block if transform is None else transform(block)
    mark_complete(group)
    return path


def write_h5(path: Path, source: np.ndarray, dtype: str) -> Path:
    import h5py  # here, not at the top: benchmarks/gpu_check.py imports this module where h5py is absent

    if not path.exists():
        tmp = path.with_suffix(".tmp")
        with h5py.File(tmp, "w") as f:
            ds = f.create_dataset("feats", shape=source.shape, dtype=dtype)
            for start in range(0, len(source), BLOCK):
                ds[start:start + BLOCK] = source[start:start + BLOCK].astype(dtype)
        tmp.rename(path)
    return path


def disk_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------- readers


def to_tensor(block: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(block)).float()


def shuffled_batches(n: int, batch: int, seed: int = 0) -> Iterator[np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    for start in range(0, n, batch):
        yield order[start:start + batch]


def array_reader(array: Any, n: int, batch: int, mode: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of an h5py dataset or memmap: ``per-video`` (shuffled, one read per video), ``fancy`` (shuffled,
    one sorted fancy-indexed read per batch) or ``sequential``."""
    if mode == "sequential":
        for start in range(0, n, batch):
            index = np.arange(start, min(start + batch, n))
            yield to_tensor(array[start:start + len(index)]), torch.from_numpy(index)
        return
    for index in shuffled_batches(n, batch):
        if mode == "per-video":
            yield torch.stack([to_tensor(array[int(i)]) for i in index]), torch.from_numpy(index)
        else:
            index = np.sort(index)
            yield to_tensor(array[index]), torch.from_numpy(index)


def h5_run(path: Path, batch: int, mode: str) -> Callable[[], tuple[int, float]]:
    import h5py

    def run() -> tuple[int, float]:
        with h5py.File(path, "r") as f:
            ds = f["feats"]
            return timed(array_reader(ds, len(ds), batch, mode))
    return run


def memmap_run(path: Path, batch: int, mode: str) -> Callable[[], tuple[int, float]]:
    def run() -> tuple[int, float]:
        array = np.load(path, mmap_mode="r")
        return timed(array_reader(array, len(array), batch, mode))
    return run


def train_run(path: Path, batch: int, workers: int = 0, **options: Any) -> Callable[[], tuple[int, float]]:
    epochs = iter(range(1 << 30))

    def run() -> tuple[int, float]:
        reader = TrainReader(str(path), batch_size=batch, **options)
        reader.set_epoch(next(epochs))
        if workers == 0:
            return timed(reader)
        return steady(make_loader(reader, num_workers=workers))
    return run


def eval_run(path: Path, batch: int) -> Callable[[], tuple[int, float]]:
    return lambda: timed(EvalReader(str(path), "train", batch_size=batch))


# ---------------------------------------------------------------------------------------------- memory


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _rss_child(url: str, batch: int, fixed_malloc: bool, queue: Any) -> None:
    torch.set_num_threads(1)
    reader = TrainReader(url, batch_size=batch)
    if fixed_malloc:
        use_mmap_for_large_buffers(reader.batch_bytes)
    before = _rss_kib("VmRSS")
    videos, seconds = timed(reader)
    queue.put({"videos": videos, "seconds": seconds, "before_mib": before / 1024,
               "peak_mib": _rss_kib("VmHWM") / 1024, "bound_mib": reader.memory_bytes() / 2**20,
               "partition_mib": reader.partition().segments.nbytes / 2**20})


def peak_rss(url: str, batch: int, fixed_malloc: bool) -> dict[str, float]:
    """Peak RSS of a fresh process that reads one whole epoch with a TrainReader, with glibc's mmap threshold
    fixed at the batch size as in make_loader's workers, or left to glibc."""
    ctx = multiprocessing.get_context("forkserver")
    queue = ctx.Queue()
    process = ctx.Process(target=_rss_child, args=(url, batch, fixed_malloc, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


# ---------------------------------------------------------------------------------------------- main


def checksum_cost(root: Path, source: np.ndarray, batch: int, video_bytes: int) -> None:
    """Write the default layout without and with chunk checksums, then read both (see the module docstring)."""
    import storage.store as store_module

    variants = {"before (zstd)": ((ZstdCodec(),), {}), "now (zstd + crc32c)": (CHUNK_CODECS, WRITE_EVERY_CHUNK)}
    paths = {}
    for label, (codecs, config) in variants.items():
        store_module.CHUNK_CODECS, store_module.WRITE_EVERY_CHUNK = codecs, config
        path = root / f"zarr_checksums_{'crc' if len(codecs) > 1 else 'none'}"
        shutil.rmtree(path, ignore_errors=True)
        start = time.perf_counter()
        paths[label] = write_zarr(path, source, 16, True)
        zarr.open_array(str(path / "train" / "video_ids"), mode="r+")[:] = [f"v{i}" for i in range(len(source))]
        seconds = time.perf_counter() - start
        mbs = len(source) * video_bytes / seconds / 1e6
        print(f"write {label:<24} {len(source) / seconds:>9.0f} videos/s {mbs:>7.0f} MB/s, "
              f"{disk_bytes(path) / 2**30:.3f} GiB on disk", flush=True)
    store_module.CHUNK_CODECS, store_module.WRITE_EVERY_CHUNK = variants["now (zstd + crc32c)"]
    print(f"\n{'reader':<58} {'videos/s':>9} {'MB/s':>9}")
    for _ in range(2):  # interleaved, twice
        for label, path in paths.items():
            measure(f"{label} TrainReader shuffled", path, train_run(path, batch), video_bytes)
            measure(f"{label} EvalReader sequential", path, eval_run(path, batch), video_bytes)
    chunks = [np.array(source[lo:lo + 16]) for lo in range(0, min(len(source), 1024), 16)]  # in memory, as read
    start = time.perf_counter()
    for chunk in chunks:
        nonfinite_rows(chunk)
    seconds = time.perf_counter() - start
    print(f"\nNaN/Inf check alone (nonfinite_rows per chunk of 16 in memory): {16 * len(chunks) / seconds:.0f} "
          "videos/s")
    store = open_store(str(paths["now (zstd + crc32c)"]))
    start = time.perf_counter()
    verify_shards(store, "train")
    print(f"verify_shards (list + every shard index crc) of {len(source)} videos: {time.perf_counter() - start:.3f} s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--videos", type=int, default=6000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/bench_reader"))
    parser.add_argument("--keep", action="store_true", help="keep the written data for another run")
    parser.add_argument("--checksums", action="store_true", help="only the cost of chunk checksums (docstring)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    root, batch, n = args.dir, args.batch, args.videos
    root.mkdir(parents=True, exist_ok=True)
    video_bytes = FRAMES * FEATURES * 2
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, load average {os.getloadavg()}")
    print(f"data: {n} videos x {FRAMES} x {FEATURES} float16 = {n * video_bytes / 2**30:.2f} GiB, batch {batch}; "
          f"default_chunking -> {default_chunking(FRAMES, FEATURES, 'float16')}; target {TARGET} videos/s/worker")

    start = time.perf_counter()
    source = write_source(root / "source.npy", n)
    if args.checksums:
        checksum_cost(root, source, batch, video_bytes)
        if not args.keep:
            shutil.rmtree(root)
        return
    threshold = np.float16(np.median(source[: min(n, 64)]))
    zarrs = {(chunk, compress): write_zarr(root / f"zarr_c{chunk}_{'zstd' if compress else 'none'}", source,
                                           chunk, compress) for chunk in (8, 16, 32) for compress in (True, False)}
    sparse = {compress: write_zarr(root / f"zarr_sparse_c16_{'zstd' if compress else 'none'}", source, 16, compress,
                                   lambda b: sparsify(b, threshold)) for compress in (True, False)}
    h5 = {dtype: write_h5(root / f"feats_{dtype}.h5", source, dtype) for dtype in ("float16", "float32")}
    print(f"written in {time.perf_counter() - start:.0f} s")
    print("\non-disk size (GiB): " + ", ".join(
        f"{p.name} {disk_bytes(p) / 2**30:.2f}" for p in [*zarrs.values(), *sparse.values(), *h5.values()]))

    print(f"\n{'reader':<58} {'videos/s':>9} {'MB/s':>9}")
    rows: list[Row] = []
    for (chunk, compress), path in zarrs.items():
        label = f"zarr c{chunk} {'zstd' if compress else 'none'}"
        rows += measure(f"{label} TrainReader shuffled", path, train_run(path, batch), video_bytes)
        rows += measure(f"{label} EvalReader sequential", path, eval_run(path, batch), video_bytes)
    for compress, path in sparse.items():
        label = f"zarr sparse c16 {'zstd' if compress else 'none'}"
        rows += measure(f"{label} TrainReader shuffled", path, train_run(path, batch), video_bytes)
    default = zarrs[(16, True)]
    rows += measure("zarr c16 zstd TrainReader readahead=1", default, train_run(default, batch, readahead=1),
                    video_bytes)
    rows += measure("zarr c16 zstd TrainReader shuffle_buffer=4", default,
                    train_run(default, batch, shuffle_buffer=4), video_bytes)
    for workers in (1, 2):
        rows += measure(f"zarr c16 zstd DataLoader {workers} worker(s) (total)", default,
                        train_run(default, batch, workers), video_bytes)
    for dtype, path in h5.items():
        for mode in ("per-video", "fancy", "sequential"):
            rows += measure(f"h5py {dtype} {mode}", path, h5_run(path, batch, mode),
                            video_bytes * (2 if dtype == "float32" else 1))
    for mode in ("per-video", "fancy", "sequential"):
        rows += measure(f"numpy memmap float16 {mode}", root / "source.npy", memmap_run(root / "source.npy", batch,
                                                                                       mode), video_bytes)

    print("\npeak RSS of one TrainReader process over a whole epoch (default layout: chunks of 16, zstd)")
    big = write_zarr(root / "zarr_c16_zstd_x10", source, 16, True, repeat=10)
    for (label, path), fixed in itertools.product((("1x", default), ("10x", big)), (True, False)):
        result = peak_rss(str(path), batch, fixed)
        malloc = "threshold at batch size" if fixed else "glibc default          "
        rate = result["videos"] / result["seconds"]
        print(f"{label:>4} {malloc}: {result['videos']} videos at {rate:.0f} videos/s; RSS before reading "
              f"{result['before_mib']:.0f} MiB, peak {result['peak_mib']:.0f} MiB "
              f"(+{result['peak_mib'] - result['before_mib']:.0f}); memory_bytes() bound "
              f"{result['bound_mib']:.0f} MiB; partition {result['partition_mib']:.2f} MiB")
    print(f"\nload average at the end {os.getloadavg()}")
    rates = {row.name: row.rate for row in rows}
    print("\nzarr layouts, videos/s (TrainReader shuffled cold / warm, EvalReader sequential cold / warm), GiB:")
    for (chunk, compress), path in zarrs.items():
        label = f"zarr c{chunk} {'zstd' if compress else 'none'}"
        figures = " / ".join(f"{rates[f'{label} {kind} {state}']:.0f}" for kind in
                             ("TrainReader shuffled", "EvalReader sequential") for state in ("cold", "warm"))
        print(f"  {label:<16} {figures}  {disk_bytes(path) / 2**30:.2f}")
    if not args.keep:
        shutil.rmtree(root)


if __name__ == "__main__":
    sys.exit(main())
