"""The block writer shared by ingest and synthetic data: streaming, validated, resumable, with progress.

A writer gets a :class:`~storage.store.StoreInfo` and, for every stored split, a :class:`SplitSource` that
can read any range of that split's videos. It writes each split in blocks of whole shards (so no shard file
is ever rewritten, and a kill can damage only the block in flight), checks every block for NaN/Inf (and
float16 overflow) as it goes, and records progress in the group attributes::

    attrs["autossvh_ingest"] = {
        "fingerprint": sha256 of the store layout and the caller's params (source identities, arguments),
        "params": those params, to say what differs when a re-run does not match,
        "block_videos": videos per block, fixed when the store is created,
        "done": {split: [block ids written and recorded]},
        "checksums": {file: {"sha256": ..., "size": ...}},   # computed once, before the first block
    }

The record of a block is written after all of its arrays, so a re-run with the same arguments skips exactly
the blocks that are whole. The store is marked complete (``storage.store.mark_complete``) only after the last
block and, with ``verify``, after a full comparison with the sources; readers refuse it until then.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import hashlib
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from storage.schema import Protocol
from storage.store import (
    CHUNKS_PER_SHARD,
    FEATURE_DTYPES,
    FINITE_RECORD,
    FeatureStore,
    PathError,
    StoreError,
    StoreInfo,
    bad_label_rows,
    check_replaceable,
    create_store,
    default_chunking,
    duplicate_ids,
    is_aborted_creation,
    mark_complete,
    open_store,
)

log = logging.getLogger(__name__)

STATE_ATTR = "autossvh_ingest"
HASH_BUFFER_BYTES = 8 << 20


def _find_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where there is none (macOS, musl)."""
    name = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
    return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None


_MALLOC_TRIM = _find_malloc_trim()


class SourceError(ValueError):
    """Bad input data; the message names the file, the key and the problem."""


class VerifyError(StoreError):
    """The store does not hold what its sources hold; the message names the split and the video."""


@dataclass(frozen=True)
class Block:
    """Videos ``start:stop`` of a split as read from its source."""

    feats: np.ndarray  # (n, T, F), any floating dtype
    labels: np.ndarray | None  # (n, C) 0/1, or None for an unlabelled split (stored as zeros)
    video_ids: np.ndarray  # (n,) str
    frame_signal: np.ndarray | None = None  # (n, T) true per-frame class signal (generated data only)


@dataclass(frozen=True)
class SplitSource:
    """Where one stored split's videos come from: ``read(start, stop)`` returns any range of them."""

    name: str
    videos: int
    origin: str  # "file:key" or a description, for error messages
    read: Callable[[int, int], Block]


def store_info(dataset: str, protocol: Protocol, max_frames: int, feature_dim: int, num_classes: int,
               dtype: str, counts: dict[str, int], chunk_videos: int | None = None,
               shard_videos: int | None = None) -> StoreInfo:
    """The description of a store to write; chunking defaults to ``default_chunking`` and a shard to
    CHUNKS_PER_SHARD chunks."""
    if dtype not in FEATURE_DTYPES:
        raise StoreError(f"feature dtype {dtype!r}; allowed: {', '.join(FEATURE_DTYPES)}")
    chunk = chunk_videos or default_chunking(max_frames, feature_dim, dtype)[0]
    return StoreInfo(dataset=dataset, protocol=protocol, max_frames=max_frames, feature_dim=feature_dim,
                     num_classes=num_classes, dtype=dtype, counts=counts, chunk_videos=chunk,
                     shard_videos=shard_videos or chunk * CHUNKS_PER_SHARD)


def block_videos_for(info: StoreInfo, requested: int | None) -> int:
    """Videos per block: ``requested`` rounded up to whole shards (default one shard)."""
    if requested is None:
        return info.shard_videos
    if requested < 1:
        raise ValueError(f"block_videos must be positive, got {requested}")
    rounded = -(-requested // info.shard_videos) * info.shard_videos
    if rounded != requested:
        log.info("block of %d videos rounded up to %d (whole shards of %d videos)", requested, rounded,
                 info.shard_videos)
    return rounded


def write_store(
    url: str,
    info: StoreInfo,
    splits: Sequence[SplitSource],
    params: dict[str, Any],
    sources: dict[str, Any],
    *,
    storage_options: dict[str, Any] | None = None,
    block_videos: int | None = None,
    checksum_files: Sequence[Path] = (),
    overwrite: bool = False,
    verify: bool = False,
    frame_signal: bool = False,
) -> FeatureStore:
    """Write (or resume, or just verify) the store at ``url`` and return it opened, complete.

    ``params`` identifies the input (source files with size and mtime, generator parameters); together with
    the store layout in ``info`` it is the fingerprint a re-run must match to resume an incomplete store or to
    find a complete one already done. ``sources`` becomes the store's ``sources`` attribute, with the
    sha256 and size of every file of ``checksum_files`` added under ``"checksums"``. ``frame_signal``: the
    splits also store the sources' per-frame class signal (generated data).
    """
    core = {k: v for k, v in info.to_dict().items() if k not in ("sources", "complete")}
    params = {"store": core, **params}
    fingerprint = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()
    if overwrite:
        check_replaceable(url, storage_options, STATE_ATTR)
    previous = None if overwrite else _open_previous(url, storage_options)
    if previous is not None and previous.info.complete:
        return _already_complete(previous, splits, fingerprint, params, verify)
    state = None if previous is None else previous.group.attrs.get(STATE_ATTR)
    if state is not None and state.get("fingerprint") != fingerprint:
        raise StoreError(
            f"{url}: an incomplete store from other arguments or sources is there (differs in: "
            f"{', '.join(_differences(state.get('params', {}), params)) or 'fingerprint'}); re-run the command "
            "that started it to resume, or pass --overwrite to start again")
    if state is None:
        replace = overwrite or previous is not None or is_aborted_creation(url, storage_options)
        if previous is not None:
            log.info("%s: incomplete store with no recorded progress; starting it again", url)
        group = create_store(url, info, storage_options, overwrite=replace, frame_signal=frame_signal)
        state = {"fingerprint": fingerprint, "params": params, "block_videos": block_videos_for(info, block_videos),
                 "done": {s.name: [] for s in splits}, "checksums": {}}
        group.attrs[STATE_ATTR] = state
    else:
        group = previous.group
        done = sum(len(v) for v in state["done"].values())
        log.info("%s: resuming an incomplete store, %d blocks already written", url, done)
        if block_videos is not None and block_videos_for(info, block_videos) != state["block_videos"]:
            log.info("keeping the store's block size of %d videos", state["block_videos"])
    with logging_redirect_tqdm():
        for path in checksum_files:
            if str(path) not in state["checksums"]:
                state["checksums"][str(path)] = {"sha256": sha256_file(path), "size": path.stat().st_size}
                group.attrs[STATE_ATTR] = state
        for split in splits:
            _write_split(url, group, info, split, state)
            _check_unique_ids(url, group, split)
        if verify:
            verify_store(FeatureStore(url, group, info, storage_options), splits, state["block_videos"])
    mark_complete(group, {**sources, "checksums": state["checksums"], FINITE_RECORD: True})
    log.info("%s: complete (%s)", url, ", ".join(f"{s.name} {s.videos} videos" for s in splits))
    return open_store(url, storage_options)


def verify_store(store: FeatureStore, splits: Sequence[SplitSource], block_videos: int | None = None) -> None:
    """Re-read every stored split and compare it with its source: features exactly after rounding the source
    to the store's dtype (numpy's rounding, independent of the writer's), labels and video ids exactly.
    Raises :class:`VerifyError` naming the split and the first video that differs."""
    url, info = store.url, store.info
    step = block_videos or info.shard_videos
    with logging_redirect_tqdm():
        for split in splits:
            arrays = store.split(split.name)
            if len(arrays) != split.videos:
                raise VerifyError(f"{url}: split {split.name!r} holds {len(arrays)} videos, {split.origin} has "
                                  f"{split.videos}")
            with _progress(split.videos, 0, f"verify {split.name}") as bar:
                for start in range(0, split.videos, step):
                    stop = min(start + step, split.videos)
                    block = split.read(start, stop)
                    expected = np.asarray(block.feats).astype(info.dtype)
                    _compare(url, split, start, "features", arrays.feats[start:stop], expected)
                    labels = (np.zeros((stop - start, info.num_classes), np.uint8) if block.labels is None
                              else np.asarray(block.labels).astype(np.uint8))
                    _compare(url, split, start, "labels", arrays.labels[start:stop], labels)
                    _compare(url, split, start, "video ids", np.asarray(arrays.video_ids[start:stop]),
                             np.asarray(block.video_ids))
                    _return_freed_memory()
                    bar.update(stop - start)
    log.info("%s: verified against the sources, every video equal", url)


def sha256_file(path: Path) -> str:
    """The sha256 of a file, streamed (about 1 s per GB from the page cache on one core)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True,
                                     desc=f"sha256 {path.name}", file=sys.stderr) as bar:
        while chunk := f.read(HASH_BUFFER_BYTES):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _write_split(url: str, group: zarr.Group, info: StoreInfo, split: SplitSource, state: dict[str, Any]) -> None:
    step = state["block_videos"]
    done = set(state["done"][split.name])
    blocks = range(-(-split.videos // step))
    done_videos = sum(min(step, split.videos - i * step) for i in done)
    began = time.perf_counter()
    with _progress(split.videos, done_videos, split.name) as bar:
        for index in blocks:
            if index in done:
                continue
            start, stop = index * step, min((index + 1) * step, split.videos)
            _write_block(url, group[split.name], info, split, start, stop)
            _record_block(group, state, split.name, index)
            _return_freed_memory()
            bar.update(stop - start)
    if done_videos < split.videos:
        seconds = time.perf_counter() - began
        written = split.videos - done_videos
        mb = written * info.max_frames * info.feature_dim * np.dtype(info.dtype).itemsize / 1e6
        log.info("%s: wrote %d videos in %.1f s (%.0f videos/s, %.0f MB/s stored)", split.name, written, seconds,
                 written / seconds, mb / seconds)


def _write_block(url: str, arrays: zarr.Group, info: StoreInfo, split: SplitSource, start: int, stop: int) -> None:
    """Read videos ``start:stop`` of ``split``, check them and write all of their arrays."""
    block = split.read(start, stop)
    shape = (stop - start, info.max_frames, info.feature_dim)
    if block.feats.shape != shape:
        raise SourceError(f"{split.origin}: videos {start}:{stop} read with shape {block.feats.shape}, "
                          f"expected {shape}")
    labels = None if block.labels is None else _checked_labels(url, np.asarray(block.labels), info, split, start)
    arrays["feats"][start:stop] = _to_store_dtype(url, block.feats, info.dtype, split, start)
    if labels is not None:
        arrays["labels"][start:stop] = labels
    arrays["video_ids"][start:stop] = block.video_ids
    if "frame_signal" in arrays and block.frame_signal is not None:
        arrays["frame_signal"][start:stop] = np.asarray(block.frame_signal, dtype=np.float16)
    log.debug("wrote %s videos %d:%d", split.name, start, stop)


def _checked_labels(url: str, labels: np.ndarray, info: StoreInfo, split: SplitSource, start: int) -> np.ndarray:
    """The block's labels as uint8, refusing any that are not 0/1 rows over the store's classes (a value such as
    255 would pass as a label in evaluation), naming the first bad video."""
    n = len(labels)
    if labels.shape != (n, info.num_classes):
        raise SourceError(f"{split.origin}: videos {start}:{start + n} have labels of shape {labels.shape}, expected "
                          f"({n}, {info.num_classes}): 0/1 rows over the store's {info.num_classes} classes")
    bad = bad_label_rows(labels)
    if bad.size:
        row = int(bad[0])
        values = sorted(set(labels[row].tolist()) - {0, 1})
        raise SourceError(f"{split.origin}: video {start + row} (split {split.name!r}) has label values {values}; "
                          f"labels are 0/1 over the store's {info.num_classes} classes; the store at {url} is left "
                          "incomplete (fix the source, then re-run with --overwrite)")
    return labels.astype(np.uint8)


def _check_unique_ids(url: str, group: zarr.Group, split: SplitSource) -> None:
    """Refuse a written split in which a video id occurs twice (the store stays incomplete)."""
    found = duplicate_ids(np.asarray(group[split.name]["video_ids"][:]))
    if found:
        video, rows = next(iter(found.items()))
        raise SourceError(f"{split.origin}: video id {video!r} occurs at rows {', '.join(map(str, rows))} of split "
                          f"{split.name!r} ({len(found)} repeated id(s)); ids must be unique; the store at {url} is "
                          "left incomplete")


def _return_freed_memory() -> None:
    """Give freed heap memory back to the OS after a block (glibc only). The codec threads allocate chunk-sized
    buffers in per-thread arenas that glibc otherwise keeps and fragments: without this the resident size of an
    ingest creeps up block after block (~+40 MB per 1,000 FCVID videos); with it it levels off."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _record_block(group: zarr.Group, state: dict[str, Any], split: str, index: int) -> None:
    state["done"][split].append(index)
    group.attrs[STATE_ATTR] = state


def _to_store_dtype(url: str, feats: np.ndarray, dtype: str, split: SplitSource, start: int) -> np.ndarray:
    """Cast to the store's dtype, refusing NaN/Inf and values the cast would turn into Inf, and naming the first
    bad video. The cast is torch's vectorised round-to-nearest-even (~10x numpy's float16 cast, same result);
    the checks use the source's min and max (NaN propagates), so the common case costs one pass."""
    native = np.require(feats, dtype=feats.dtype.newbyteorder("="), requirements=["C", "W"])
    hi, lo = float(native.max()), float(native.min())
    out = torch.from_numpy(native).to(getattr(torch, dtype)).numpy()
    if math.isfinite(hi) and math.isfinite(lo) and (
            max(hi, -lo) <= float(np.finfo(dtype).max) or bool(torch.isfinite(torch.from_numpy(out)).all())):
        return out
    per_video = np.isfinite(native.reshape(len(native), -1)).all(axis=1)
    where = f"the store at {url} is left incomplete"
    if not per_video.all():
        bad = int(np.flatnonzero(~per_video)[0])
        raise SourceError(f"{split.origin}: video {start + bad} (split {split.name!r}) has NaN or Inf features; "
                          f"{where} (fix the source, then re-run with --overwrite)")
    bad = int(np.flatnonzero(~np.isfinite(out.reshape(len(out), -1)).all(axis=1))[0])
    raise SourceError(f"{split.origin}: video {start + bad} (split {split.name!r}) has values up to "
                      f"{np.abs(native[bad]).max():g}, beyond the {dtype} range; {where} (use --dtype float32)")


def _compare(url: str, split: SplitSource, start: int, what: str, stored: np.ndarray, expected: np.ndarray) -> None:
    if stored.shape == expected.shape and np.array_equal(stored, expected):
        return
    if stored.shape != expected.shape:
        raise VerifyError(f"{url}: split {split.name!r} videos {start}:{start + len(expected)}: stored {what} "
                          f"have shape {stored.shape}, {split.origin} gives {expected.shape}")
    video = start + int(np.flatnonzero((stored != expected).reshape(len(stored), -1).any(axis=1))[0])
    raise VerifyError(f"{url}: split {split.name!r} video {video}: stored {what} differ from {split.origin}")


def _open_previous(url: str, storage_options: dict[str, Any] | None) -> FeatureStore | None:
    try:
        return open_store(url, storage_options, require_complete=False, mode="r+")
    except StoreError:
        return None


def _already_complete(store: FeatureStore, splits: Sequence[SplitSource], fingerprint: str, params: dict[str, Any],
                      verify: bool) -> FeatureStore:
    state = store.group.attrs.get(STATE_ATTR) or {}
    if state.get("fingerprint") == fingerprint:
        log.info("%s: already complete, nothing to write", store.url)
    elif verify:
        log.warning("%s: the store was written from other arguments or sources (differs in: %s); comparing its "
                    "contents with these sources", store.url,
                    ", ".join(_differences(state.get("params", {}), params)) or "fingerprint")
    else:
        raise StoreError(f"{store.url}: a complete store from other arguments or sources is already there (differs "
                         f"in: {', '.join(_differences(state.get('params', {}), params)) or 'fingerprint'}); "
                         "pass --overwrite to replace it or --verify to compare it with these sources")
    if verify:
        verify_store(store, splits, state.get("block_videos"))
    return open_store(store.url, store.storage_options)


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys where two JSON-like values differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for key in sorted(set(old) | set(new), key=str)
                for d in _differences(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if old == new else [prefix.rstrip(".") or "(all)"]


def _progress(total: int, initial: int, desc: str) -> tqdm:
    return tqdm(total=total, initial=initial, unit="video", desc=desc, file=sys.stderr, disable=None)  # TTY only


def add_store_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every store-writing job shares."""
    parser.add_argument("--out", required=True, help="store URL: a path, file://, s3://, gs://, memory://")
    parser.add_argument("--dtype", choices=FEATURE_DTYPES, default="float16", help="stored feature dtype")
    parser.add_argument("--storage-option", dest="storage_options", action="append", default=[],
                        metavar="KEY=VALUE", help="fsspec storage option, repeatable; VALUE is parsed as JSON "
                        "when it can be (true, 3, {...}), else kept as a string")
    parser.add_argument("--block-videos", type=int, help="videos per block, rounded up to whole shards "
                        "(default: one shard); bounds the memory used")
    parser.add_argument("--chunk-videos", type=int, help="videos per chunk (default: ~4 MiB chunks)")
    parser.add_argument("--shard-videos", type=int, help="videos per shard, a multiple of --chunk-videos "
                        "(default: 16 chunks)")
    parser.add_argument("--overwrite", action="store_true", help="replace the store at --out that this job wrote "
                        "(another kind of store, or anything else, is refused)")


def storage_options_from(pairs: Sequence[str]) -> dict[str, Any]:
    """``["anon=true", "endpoint=x"]`` -> ``{"anon": True, "endpoint": "x"}``."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SourceError(f"--storage-option {pair!r}: expected KEY=VALUE")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def run_job(action: Callable[[], object]) -> int:
    """Run a store-writing job: INFO logging to stderr; bad input or a store error is logged and gives exit
    status 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        action()
    except (SourceError, StoreError, PathError) as err:
        log.error("%s", err)
        return 2
    return 0
