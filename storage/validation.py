"""A validation store carved from a store's training split, so that sweeps never select on the test queries.

The carved store follows the ``database_is_train`` protocol (as UCF101): its ``query`` split is a held-out
``fraction`` of the source's training videos, drawn as whole chunks with ``seed``, and its ``train`` split is
the rest, which is also the retrieval database. A trial trains on ``train`` (the held-out videos are never
seen) and is scored by the published mAP@K protocol with the held-out videos as queries. The source's query
and database splits are not copied. The copy is written once with the shared block writer (resumable, marked
complete last) and found again on later sweeps by its fingerprint (source identity, fraction, seed).

A training run holds out its own validation split instead (``--val-videos N``, :func:`validation_holdout`):
no copy is written; the reader skips the held-out rows (``storage.reader.Holdout``) and rank 0 reads them once.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from storage.reader import Holdout
from storage.store import FeatureStore, StoreError, check_apart, open_store
from storage.writer import Block, SplitSource, store_info, write_store

log = logging.getLogger(__name__)

# Fixed, not train.seed: every seed of a sweep or an ablation trains on the same videos and selects on the same ones.
VALIDATION_SEED = 2025


def held_out_rows(num_videos: int, chunk_videos: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of the held-out videos: ``round(fraction * chunks)`` whole chunks (at least one, and at
    least one chunk left for training), chosen by ``seed``."""
    if not 0 < fraction < 1:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
    num_chunks = -(-num_videos // chunk_videos)
    if num_chunks < 2:
        raise ValueError(f"the train split has {num_videos} videos in {num_chunks} chunk; a validation split needs "
                         "at least 2 chunks")
    count = min(max(round(fraction * num_chunks), 1), num_chunks - 1)
    chunks = np.sort(np.random.default_rng(seed).choice(num_chunks, size=count, replace=False))
    rows = [np.arange(c * chunk_videos, min((c + 1) * chunk_videos, num_videos)) for c in chunks]
    return np.concatenate(rows).astype(np.int64)


def validation_holdout(num_videos: int, chunk_videos: int, count: int, seed: int = VALIDATION_SEED) -> Holdout:
    """The ``count`` videos of a train split of ``num_videos`` that ``--val-videos`` holds out of training: whole
    chunks of the store in an order drawn with ``seed``, the last one cut to ``count`` (its first rows).

    Whole chunks, not single rows: the training reads stay whole chunks (a held-out chunk is never read, at most
    one chunk is read in two runs) and rank 0 reads the validation videos once in about ``count / chunk_videos``
    chunk reads, where random rows would split up to ``count`` chunks of every epoch's reads. Chunks drawn from the
    whole split, not its tail, since stored order may follow the classes. ``count`` 0: an empty holdout."""
    if not 0 <= count < num_videos:
        raise ValueError(f"--val-videos {count}: must be >= 0 and below the {num_videos} videos of the train split")
    order = np.random.default_rng(seed).permutation(-(-num_videos // chunk_videos))
    chosen = order[:-(-count // chunk_videos) + 1]  # one chunk more: the split's last chunk may be short
    rows = (chosen[:, None] * chunk_videos + np.arange(chunk_videos)).ravel()
    return Holdout(np.sort(rows[rows < num_videos][:count]).astype(np.int64), num_videos)


def _runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """Sorted ``rows`` as ``[start, stop)`` runs of consecutive indices (one read each)."""
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    return [(int(run[0]), int(run[-1]) + 1) for run in np.split(rows, breaks) if len(run)]


def _rows_source(store: FeatureStore, name: str, rows: np.ndarray) -> SplitSource:
    arrays = store.split("train")

    def read(start: int, stop: int) -> Block:
        runs = _runs(rows[start:stop])
        feats = np.concatenate([arrays.feats[lo:hi] for lo, hi in runs])
        labels = np.concatenate([arrays.labels[lo:hi] for lo, hi in runs])
        ids = np.concatenate([arrays.video_ids[lo:hi] for lo, hi in runs]).astype(object).astype(str)
        return Block(feats, labels, ids)

    return SplitSource(name, len(rows), f"{store.url} train rows", read)


def carve_validation_store(source_url: str, out_url: str, fraction: float = 0.1, seed: int = 0,
                           storage_options: dict[str, Any] | None = None) -> FeatureStore:
    """Write (or find, or resume) the validation store of ``source_url`` at ``out_url`` and return it opened."""
    check_apart({"the validation store": out_url}, {"its source": source_url})
    source = open_store(source_url, storage_options)
    info = source.info
    if not source.is_labelled("train"):
        raise StoreError(f"{source_url}: the train split is unlabelled, so no validation split can be carved from "
                         "it (a sweep needs labelled training videos to score trials without the test queries)")
    num_train = source.num_videos("train")
    held_out = held_out_rows(num_train, info.chunk_videos, fraction, seed)
    kept = np.setdiff1d(np.arange(num_train, dtype=np.int64), held_out, assume_unique=True)
    counts = {"train": len(kept), "query": len(held_out)}
    out_info = store_info(info.dataset, "database_is_train", info.max_frames, info.feature_dim, info.num_classes,
                          info.dtype, counts, chunk_videos=info.chunk_videos, shard_videos=info.shard_videos)
    carved = {"source": source_url, "source_sources": info.sources, "source_counts": info.counts,
              "fraction": fraction, "seed": seed}
    sources = {"kind": "validation", "carved_from": carved, "labelled": {"train": True, "query": True},
               "train_labelled": True}
    log.info("validation store %s: %d of %d training videos held out as queries", out_url, len(held_out), num_train)
    splits = [_rows_source(source, "train", kept), _rows_source(source, "query", held_out)]
    return write_store(out_url, out_info, splits, {"carved_from": carved}, sources, storage_options=storage_options)
