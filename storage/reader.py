"""Per-rank readers of one split of a feature store: plain PyTorch iterable datasets, no Ray.

Training (:class:`TrainReader`). Each epoch the chunks of the split are permuted by a generator seeded with
``(seed, epoch)``, the same on every rank. Laid end to end they form one sequence of videos, which is cut into
``world_size`` contiguous pieces of ``ceil(N / world_size)`` videos; rank ``r`` reads piece ``r``. A piece is
whole chunks except at its two ends, so reads stay chunk-aligned.

Pad policy: the sequence is padded to ``world_size * ceil(N / world_size)`` videos by repeating videos from its
start (wrapping around), like ``torch.utils.data.DistributedSampler``. Every video is read exactly once per
epoch across ranks, plus at most ``world_size - 1`` repeated ones, and every rank has the same number of videos
and therefore the same number of batches (:meth:`TrainReader.__len__`). With ``drop_last`` each rank then drops
the ``videos_per_rank % batch_size`` videos at the end of its piece (whole chunks of a random choice, a
different one every epoch), so all batches are full.

Inside a rank, the piece is split between the DataLoader workers at batch boundaries (worker ``w`` of ``W``
reads batches ``[nb * w // W, nb * (w + 1) // W)`` of the rank's ``nb``), so only the last worker can end with
a partial batch and the rank yields exactly ``nb`` batches. A worker reads its chunks in the permuted order
with ``readahead`` reads in flight on a thread pool, puts them into a shuffle buffer of ``shuffle_buffer``
chunks plus one batch, and emits each batch as a uniform random draw from the buffer (a reservoir: the
buffer is refilled from the next chunks before every draw).

Memory per reading process is bounded independently of the dataset size (:meth:`TrainReader.memory_bytes`):
the buffer in the stored dtype, ``readahead + 1`` chunks in flight (three copies each: file bytes, decoded
chunk, zarr's output), two stored-dtype batch gathers and two float32 batches (the one being built and the one
the consumer still holds): 184 MiB for FCVID at batch 64 with the defaults, measured +187 MiB RSS over a whole
epoch at 6,000 and at 60,000 videos. The DataLoader adds ``prefetch_factor`` float32 batches per worker in
shared memory. The partition is built from two int64 per chunk of the split (10 MB for 10M videos in chunks of
16). glibc's malloc keeps far more in freed buffers (measured: a worker at 1.8 GB instead of 0.44 GB) unless its
mmap threshold is fixed at the batch size, which :func:`make_loader`'s workers do
(:func:`use_mmap_for_large_buffers`); a reader iterated in the training process itself (no workers) is left to
glibc's default.

Held-out videos (:class:`Holdout`, ``--val-videos``): the rows of a validation split are taken out of the
permuted chunk sequence before it is cut into pieces (a chunk they fill is never read; a chunk they share is read
in its training runs), so every rank excludes the same rows and the pad policy counts the training videos only.
The reader then yields each video's training index (its position among the training rows), the numbering the
clustering uses; without a holdout that is the row.

Evaluation (:class:`EvalReader`) reads rank ``r``'s contiguous block ``[r * N // world_size, (r + 1) * N //
world_size)`` (no padding, no repeats) in order, batch by batch; with DataLoader workers, worker ``w`` reads
batches ``w, w + W, ...`` and the DataLoader's round-robin returns them in order.

Both yield ``(features float32 (B, T, F), video index int64 (B,))``; an :class:`EvalReader` with ``dtype=None``
yields the features as stored (float16: half the bytes to queue, pin and copy to a GPU), for a consumer that
converts each batch where it computes (``autossvh.engine.encode``). The store is opened lazily in the
process that iterates (never pickled), and :func:`make_loader` starts workers with ``forkserver`` (``spawn``
where it is missing), never ``fork``: a forked child of a process that has touched zarr's event loop or an
fsspec filesystem can deadlock.
"""

from __future__ import annotations

import ctypes
import math
import multiprocessing
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zarr
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from storage.store import READ_ERRORS, FeatureStore, StoreError, open_store

DEFAULT_SHUFFLE_BUFFER = 16
DEFAULT_READAHEAD = 4
MAX_MMAP_THRESHOLD = 32 << 20  # glibc's upper limit on 64-bit
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Partition:
    """Videos in read order as ``segments`` (k, 2) of ``[start, stop)`` video ranges, each inside one chunk."""

    segments: np.ndarray

    @property
    def num_videos(self) -> int:
        return int((self.segments[:, 1] - self.segments[:, 0]).sum())

    def indices(self) -> np.ndarray:
        """The video indices in read order (int64)."""
        if not len(self.segments):
            return np.zeros(0, np.int64)
        return np.concatenate([np.arange(lo, hi, dtype=np.int64) for lo, hi in self.segments])

    def take(self, start: int, stop: int) -> Partition:
        """Videos ``start:stop`` of this partition's read order (``0 <= start <= stop <= num_videos``)."""
        return Partition(_cut(self.segments, start, stop))


def _cut(segments: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Positions ``start:stop`` of the video sequence that ``segments`` lays end to end, as segments."""
    if start >= stop:
        return np.zeros((0, 2), np.int64)
    lengths = segments[:, 1] - segments[:, 0]
    ends = np.cumsum(lengths)
    first = int(np.searchsorted(ends, start, side="right"))
    last = int(np.searchsorted(ends, stop, side="left"))
    out = segments[first:last + 1].copy()
    out[0, 0] += start - (ends[first] - lengths[first])
    out[-1, 1] -= ends[last] - stop
    return out


@dataclass(frozen=True)
class Holdout:
    """Rows of a split kept out of training (a labelled validation split: ``storage.validation.validation_holdout``).

    The training videos are the split's other rows in stored order; a video's training index is its position among
    them (its row less the held-out rows before it). :class:`TrainReader` yields training indices and the clustering
    numbers the training videos ``0 .. num_training - 1`` by them, so held-out rows have no index at all."""

    rows: np.ndarray  # sorted, unique int64 rows in [0, num_videos)
    num_videos: int  # rows of the split

    @property
    def num_training(self) -> int:
        return self.num_videos - len(self.rows)

    def is_training(self, rows: np.ndarray) -> np.ndarray:
        """Whether each of ``rows`` is a training video (bool, the shape of ``rows``)."""
        return ~np.isin(rows, self.rows)

    def training_index(self, rows: np.ndarray) -> np.ndarray:
        """The training index (int64) of each of ``rows``, which must all be training rows."""
        rows = np.asarray(rows, dtype=np.int64)
        return rows - np.searchsorted(self.rows, rows)

    def first_training_rows(self, count: int) -> np.ndarray:
        """The first ``count`` training rows in stored order (all of them when there are fewer)."""
        candidates = np.arange(min(self.num_videos, count + len(self.rows)), dtype=np.int64)
        return candidates[self.is_training(candidates)][:count]

    def remove_from(self, segments: np.ndarray) -> np.ndarray:
        """``segments`` (k, 2) of ``[start, stop)`` rows in their order, the held-out rows taken out: a segment
        holding some becomes the runs between them (in order), one holding only them disappears."""
        first = np.searchsorted(self.rows, segments[:, 0])
        stop = np.searchsorted(self.rows, segments[:, 1])
        pieces, done = [], 0
        for i in np.flatnonzero(first < stop):  # only the segments that hold held-out rows: few
            pieces.append(segments[done:i])
            held = self.rows[first[i]:stop[i]]
            starts = np.concatenate([segments[i, :1], held + 1])
            stops = np.concatenate([held, segments[i, 1:]])
            pieces.append(np.stack([starts, stops], axis=1)[starts < stops])
            done = i + 1
        pieces.append(segments[done:])
        return np.concatenate(pieces).astype(np.int64)


def chunk_segments(num_videos: int, chunk_videos: int, epoch: int, seed: int) -> np.ndarray:
    """All chunks of a split as ``[start, stop)`` segments, permuted by ``(seed, epoch)``."""
    num_chunks = -(-num_videos // chunk_videos)
    order = np.random.default_rng([seed, epoch]).permutation(num_chunks)
    starts = order.astype(np.int64) * chunk_videos
    return np.stack([starts, np.minimum(starts + chunk_videos, num_videos)], axis=1)


def videos_per_rank(num_videos: int, world_size: int) -> int:
    """Videos each rank reads per training epoch: ``ceil(N / world_size)`` (the pad policy)."""
    return -(-num_videos // world_size)


def num_batches(videos: int, batch_size: int, drop_last: bool) -> int:
    return videos // batch_size if drop_last else -(-videos // batch_size)


def partition(num_videos: int, chunk_videos: int, rank: int, world_size: int, epoch: int, seed: int,
              holdout: Holdout | None = None) -> Partition:
    """Rank ``rank``'s training videos for ``epoch``: its contiguous piece of the permuted chunk sequence (less the
    ``holdout`` rows), padded by wrapping around to its start so that every rank gets ``videos_per_rank`` of the
    training videos."""
    if num_videos < 1 or chunk_videos < 1:
        raise ValueError(f"need num_videos >= 1 and chunk_videos >= 1, got {num_videos}, {chunk_videos}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    chunks = chunk_segments(num_videos, chunk_videos, epoch, seed)
    training = num_videos
    if holdout is not None:
        if holdout.num_videos != num_videos or holdout.num_training < 1:
            raise ValueError(f"a holdout of {len(holdout.rows)} of {holdout.num_videos} rows does not leave training "
                             f"videos in a split of {num_videos}")
        chunks, training = holdout.remove_from(chunks), holdout.num_training
    per_rank = videos_per_rank(training, world_size)
    pieces = []
    position, stop = rank * per_rank, (rank + 1) * per_rank
    while position < stop:
        offset = position % training
        length = min(stop - position, training - offset)
        pieces.append(_cut(chunks, offset, offset + length))
        position += length
    return Partition(np.concatenate(pieces))


def eval_range(num_videos: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous block ``[start, stop)`` for evaluation; the blocks tile the split in order."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    return rank * num_videos // world_size, (rank + 1) * num_videos // world_size


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _read_ahead(feats: zarr.Array, ranges: np.ndarray, depth: int,
                on_error: Callable[[int, int, Exception], Exception] | None = None,
                check: Callable[[int, np.ndarray], None] | None = None,
                ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(video indices, stored features)`` of each ``[start, stop)`` range in order, ``depth`` reads in flight.
    A codec error (damaged, truncated or missing file) is replaced by ``on_error(start, stop, err)``; ``check(start,
    features)`` runs on every range read (it raises on NaN/Inf)."""
    def read(lo: int, hi: int) -> np.ndarray:
        try:
            data = np.asarray(feats[lo:hi])
        except READ_ERRORS as err:
            if on_error is None:
                raise
            raise on_error(lo, hi, err) from err
        if check is not None:
            check(lo, data)
        return data

    with ThreadPoolExecutor(max_workers=depth) as pool:
        pending: deque[tuple[int, int, Future[np.ndarray]]] = deque()
        todo = iter(ranges.tolist())
        for lo, hi in todo:
            pending.append((lo, hi, pool.submit(read, lo, hi)))
            if len(pending) == depth:
                break
        while pending:
            lo, hi, future = pending.popleft()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append((nxt[0], nxt[1], pool.submit(read, *nxt)))
            yield np.arange(lo, hi, dtype=np.int64), future.result()


def _shuffled_batches(chunks: Iterator[tuple[np.ndarray, np.ndarray]], buffer: np.ndarray, batch_size: int,
                      rng: np.random.Generator) -> Iterator[Batch]:
    """Batches drawn uniformly from ``buffer`` (capacity >= one chunk + one batch), refilled before every draw;
    full batches until ``chunks`` is exhausted, then the rest."""
    capacity = len(buffer)
    index = np.empty(capacity, np.int64)
    count = 0
    pending = next(chunks, None)
    while True:
        while pending is not None and count + len(pending[0]) <= capacity:
            ids, feats = pending
            buffer[count:count + len(ids)] = feats
            index[count:count + len(ids)] = ids
            count += len(ids)
            pending = next(chunks, None)
        if count == 0:
            return
        take = min(batch_size, count)
        chosen = rng.choice(count, size=take, replace=False)
        batch = torch.from_numpy(buffer[chosen]).float(), torch.from_numpy(index[chosen])
        # Fill the holes the draw left below the tail with the tail's undrawn rows.
        boundary = count - take
        tail_kept = np.ones(take, bool)
        tail_kept[chosen[chosen >= boundary] - boundary] = False
        holes = chosen[chosen < boundary]
        movers = np.arange(boundary, count)[tail_kept]
        buffer[holes] = buffer[movers]
        index[holes] = index[movers]
        count = boundary
        yield batch


class _SplitReader(IterableDataset):
    """What both readers share: the store's shape read once at construction, the features opened lazily."""

    def __init__(self, url: str, split: str, batch_size: int, rank: int, world_size: int,
                 storage_options: dict[str, Any] | None, readahead: int) -> None:
        if batch_size < 1 or readahead < 1:
            raise ValueError(f"batch_size and readahead must be >= 1, got {batch_size}, {readahead}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        store = open_store(url, storage_options)
        info = store.info
        self.url, self.split, self.storage_options = url, split, storage_options
        self.batch_size, self.rank, self.world_size, self.readahead = batch_size, rank, world_size, readahead
        self.num_videos = store.num_videos(split)
        self.chunk_videos, self.dtype = info.chunk_videos, np.dtype(info.dtype)
        self.frame_shape = (info.max_frames, info.feature_dim)
        self._feats: zarr.Array | None = None
        self._store: FeatureStore | None = None

    @property
    def video_bytes(self) -> int:
        """Bytes of one stored video."""
        return math.prod(self.frame_shape) * self.dtype.itemsize

    @property
    def batch_bytes(self) -> int:
        """Bytes of one float32 batch."""
        return self.batch_size * math.prod(self.frame_shape) * 4

    def _arrays(self) -> zarr.Array:
        if self._feats is None:
            self._store = open_store(self.url, self.storage_options)
            self._feats = self._store.split(self.split).feats
        return self._feats

    def _read_error(self, start: int, stop: int, err: Exception) -> StoreError:
        """A failed read of videos ``start:stop`` as a :class:`StoreError` naming the store, split and file."""
        assert self._store is not None
        return self._store.read_error(self.split, "feats", start, stop, err)

    def _check_finite(self, start: int, feats: np.ndarray) -> None:
        """Refuse videos with NaN/Inf features, naming them (they would train or encode silently)."""
        assert self._store is not None
        self._store.check_finite(self.split, start, feats)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_feats": None, "_store": None}


class TrainReader(_SplitReader):
    """Shuffled training batches of one rank's partition of ``split``; call :meth:`set_epoch` before each epoch.

    ``shuffle_buffer`` is in chunks; ``readahead`` is the number of chunk reads in flight per reading process.
    ``holdout``: rows never read, whose videos the batches number by training index (:class:`Holdout`).
    """

    def __init__(self, url: str, split: str = "train", batch_size: int = 64, rank: int = 0, world_size: int = 1,
                 seed: int = 0, storage_options: dict[str, Any] | None = None,
                 shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER, readahead: int = DEFAULT_READAHEAD,
                 drop_last: bool = False, holdout: Holdout | None = None) -> None:
        super().__init__(url, split, batch_size, rank, world_size, storage_options, readahead)
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be >= 1 chunk, got {shuffle_buffer}")
        self.seed, self.shuffle_buffer, self.drop_last, self.holdout = seed, shuffle_buffer, drop_last, holdout
        self.num_training = self.num_videos if holdout is None else holdout.num_training
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        """Batches per rank per epoch, the same on every rank."""
        return num_batches(videos_per_rank(self.num_training, self.world_size), self.batch_size, self.drop_last)

    @property
    def buffer_videos(self) -> int:
        return self.shuffle_buffer * self.chunk_videos + self.batch_size

    def memory_bytes(self) -> int:
        """Estimated peak bytes one reading process holds for features (see the module docstring)."""
        in_flight = 3 * (self.readahead + 1) * self.chunk_videos * self.video_bytes
        gathers = 2 * self.batch_size * self.video_bytes
        return self.buffer_videos * self.video_bytes + in_flight + gathers + 2 * self.batch_bytes

    def partition(self) -> Partition:
        """This rank's videos this epoch in read order (after ``drop_last``), before the buffer shuffle."""
        part = partition(self.num_videos, self.chunk_videos, self.rank, self.world_size, self.epoch, self.seed,
                         self.holdout)
        return part.take(0, min(part.num_videos, len(self) * self.batch_size))

    def __iter__(self) -> Iterator[Batch]:
        worker, workers = _worker()
        total, size = len(self), self.batch_size
        part = self.partition()
        first, last = total * worker // workers, total * (worker + 1) // workers
        share = part.take(first * size, min(last * size, part.num_videos))
        if not len(share.segments):
            return
        chunks = _read_ahead(self._arrays(), share.segments, self.readahead, self._read_error, self._check_finite)
        if self.holdout is not None:
            chunks = ((self.holdout.training_index(rows), feats) for rows, feats in chunks)
        buffer = np.empty((self.buffer_videos, *self.frame_shape), self.dtype)
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker, workers])
        yield from _shuffled_batches(chunks, buffer, size, rng)


class EvalReader(_SplitReader):
    """Ordered batches of rank ``rank``'s contiguous block of ``split`` (:func:`eval_range`), or of the videos
    ``rows = (start, stop)`` when given, for encoding; features in ``dtype`` (None: the stored dtype, unconverted).

    A ``batch_size`` that is a multiple of the store's ``chunk_videos`` keeps reads chunk-aligned; otherwise a
    chunk that straddles two batches is read twice."""

    def __init__(self, url: str, split: str, batch_size: int = 256, rank: int = 0, world_size: int = 1,
                 storage_options: dict[str, Any] | None = None, readahead: int = DEFAULT_READAHEAD,
                 rows: tuple[int, int] | None = None, dtype: torch.dtype | None = torch.float32) -> None:
        super().__init__(url, split, batch_size, rank, world_size, storage_options, readahead)
        self.out_dtype = dtype
        self.start, self.stop = eval_range(self.num_videos, rank, world_size) if rows is None else rows
        if not 0 <= self.start <= self.stop <= self.num_videos:
            raise ValueError(f"rows {self.start}:{self.stop} are outside split {split!r} of {self.num_videos} videos")

    def __len__(self) -> int:
        return num_batches(self.stop - self.start, self.batch_size, drop_last=False)

    @property
    def batch_bytes(self) -> int:
        """Bytes of one batch as yielded (in ``dtype``)."""
        itemsize = self.dtype.itemsize if self.out_dtype is None else self.out_dtype.itemsize
        return self.batch_size * math.prod(self.frame_shape) * itemsize

    def __iter__(self) -> Iterator[Batch]:
        worker, workers = _worker()
        starts = self.start + np.arange(worker, len(self), workers, dtype=np.int64) * self.batch_size
        ranges = np.stack([starts, np.minimum(starts + self.batch_size, self.stop)], axis=1)
        for ids, feats in _read_ahead(self._arrays(), ranges, self.readahead, self._read_error, self._check_finite):
            batch = torch.from_numpy(feats)
            yield (batch if self.out_dtype is None else batch.to(self.out_dtype)), torch.from_numpy(ids)


def use_mmap_for_large_buffers(threshold: int) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes (at most 32 MiB) in this process: larger buffers are
    mapped and go back to the OS when freed.

    By default glibc raises the threshold to the largest buffer freed so far, so float32 batches (26 MB for
    FCVID at batch 64) end up in the heap between chunk buffers, and the heap fragments. Measured for FCVID: a
    DataLoader worker peaks at 1.8-1.9 GB RSS by default and at 0.44 GB with the threshold at the batch size, at
    about the same throughput; read in-process, +560 to +640 MiB against +190 MiB, but ~35% fewer videos/s
    (every batch then costs fresh pages). Returns False where glibc's ``mallopt`` is unavailable.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, min(threshold, MAX_MMAP_THRESHOLD)))


def _init_worker(_: int) -> None:
    info = get_worker_info()
    if info is not None:
        use_mmap_for_large_buffers(info.dataset.batch_bytes)


def make_loader(reader: TrainReader | EvalReader, num_workers: int = 0, prefetch_factor: int = 2) -> DataLoader:
    """A DataLoader over a reader's batches (``batch_size=None``: the reader batches).

    Workers start with ``forkserver`` (``spawn`` where it is missing) and are not persistent: each epoch's
    workers receive the reader with its current epoch. ``prefetch_factor`` batches per worker are queued ahead.
    Each worker first calls :func:`use_mmap_for_large_buffers` with the reader's batch size in bytes. Memory is
    pinned only when CUDA is available. A ``memory://`` store lives in one process: read it with no workers.
    """
    options: dict[str, Any] = {}
    if num_workers > 0:
        methods = multiprocessing.get_all_start_methods()
        options = {"multiprocessing_context": "forkserver" if "forkserver" in methods else "spawn",
                   "prefetch_factor": prefetch_factor, "worker_init_fn": _init_worker}
    return DataLoader(reader, batch_size=None, num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                      **options)
