"""A feature store written from video files: listing, labels, the resumable split writer, and one-off extraction.

No Ray here: ``cluster/extract.py`` runs decoding and the backbone on Ray Data and hands each finished video to
:class:`SplitWriter`; :func:`extract_videos` does the same in one process for a few query videos.

**Splits.** One run extracts one split (``--split``) into the store; the protocol (``--protocol``) says which
splits the store holds (``database_is_train``, the default as for UCF101/HMDB51: ``train`` and ``query``;
``query_is_database``: ``train`` and ``database``; ``separate``: all three). The first run creates the store with
every split of the protocol; a split not yet extracted holds one placeholder row. The store is marked complete
when the last of its splits is finished, so a store with only ``train`` written is refused by every reader.

**Labels.** ``--labels FILE``: a CSV with a header and the columns ``path`` and ``classes`` (class names separated
by ``;``, several for a multi-label video). A ``path`` is a video id (below) or a path relative to the ``--videos``
folder. Class indices are the sorted class names of the whole file, so use one file for every split (the store
refuses a run whose class list differs). Every listed video of a labelled split must have a row.

**Rows.** A video's id is its source path: the absolute local path, or the URL (``s3://bucket/key``). Videos are
processed in listing order (sorted paths) and only those that decode get a row, in that order, so failed videos
never occupy rows. Rows are written in whole shards (a kill can damage only the shard in flight); the split's
arrays are sized to the listed count while it is written and cut to the written count when it is finished.

**Resume record** (group attribute ``autossvh_extract``): the store's parameters (protocol, extraction settings,
dtype, classes, chunking), and per split the listing's digest and count, whether it is labelled, the rows written
(whole shards), the failed videos (``path`` and ``error``) and whether it is finished. Re-running the same command
skips the written and the failed videos; other settings or another listing are refused, naming what differs
(``--overwrite`` starts again). A finished split is not extracted again.

**Failed record.** Videos that cannot be opened, are empty or truncated are listed per split in the store's
``sources.failed`` (and the resume record) with the decoder's error; they have no row.

Besides the usual arrays, every split stores ``source_frames`` (N,) int32: each video's decodable frame count,
so the videos whose frames repeat (fewer than T, :data:`storage.video.FRAME_RULE`) can be found.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import torch
import zarr

from storage.backbones import ExtractorSettings, FrameEncoder, encode_frames, resolve_weights
from storage.schema import Protocol, stored_split, stored_splits
from storage.store import (
    ATTRIBUTE,
    FINITE_RECORD,
    StoreError,
    check_replaceable,
    checksummed,
    create_store,
    is_aborted_creation,
    is_local,
    mark_complete,
    nonfinite_rows,
    not_a_regular_file,
    open_store,
    url_filesystem,
)
from storage.video import DECODE_TIMEOUT_S, FRAME_RULE, VIDEO_SUFFIXES, VideoError, decode_video
from storage.writer import SourceError, _differences, store_info

log = logging.getLogger(__name__)

STATE_ATTR = "autossvh_extract"
CLASS_SEPARATOR = ";"


@dataclass(frozen=True)
class Listing:
    """The videos of one run: ids (source paths, sorted), their sizes in bytes, and the root relative paths in
    the labels file are taken from."""

    ids: list[str]
    sizes: list[int]
    root: str

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps([self.ids, self.sizes]).encode()).hexdigest()


def list_videos(url: str, storage_options: dict[str, Any] | None = None) -> Listing:
    """The video files under ``url``: a folder (searched recursively for :data:`VIDEO_SUFFIXES`), a glob (every
    match), or one file; local paths or any fsspec URL. Ids are absolute local paths or full URLs."""
    local = is_local(url)
    fs, path = url_filesystem(url, storage_options)
    if local:
        path = str(Path(path).resolve())
    if fsspec.core.has_magic(path):
        found = {p: info for p, info in fs.glob(path, detail=True).items() if info.get("type") != "directory"}
        root = glob_root(path)
    elif fs.isdir(path):
        found = {p: info for p, info in fs.find(path, detail=True).items()
                 if p.lower().endswith(VIDEO_SUFFIXES)}
        root = path
    elif fs.exists(path):
        found, root = {path: fs.info(path)}, path.rsplit("/", 1)[0]
    else:
        raise SourceError(f"--videos {url}: no such file, folder or matching files")
    if not found:
        raise SourceError(f"--videos {url}: no video files there (looked for {', '.join(VIDEO_SUFFIXES)})")
    ids = sorted(found)
    refused = [(p, not_a_regular_file(p) if local else None if found[p].get("type") == "file" else
                f"of type {found[p].get('type')!r}, not a regular file") for p in ids]
    refused = [(p, problem) for p, problem in refused if problem]
    if refused:
        shown = "; ".join(f"{p}: {problem}" for p, problem in refused[:5])
        more = f" and {len(refused) - 5} more" if len(refused) > 5 else ""
        raise SourceError(f"--videos {url}: {len(refused)} listed entr{'y is' if len(refused) == 1 else 'ies are'} "
                          f"not a regular file ({shown}{more}); only regular files are decoded (a FIFO or device "
                          "would block forever): remove them or list the videos without them")
    prefix = "" if local else fs.unstrip_protocol("").split("://")[0] + "://"
    return Listing([_full(prefix, p) for p in ids], [int(found[p].get("size") or 0) for p in ids],
                   _full(prefix, root))


def glob_root(url: str) -> str:
    """The folder a glob searches (its path up to the folder of the first wildcard); ``url`` itself when it has
    none: the input that ``--videos`` reads."""
    if not fsspec.core.has_magic(url):
        return url
    return url[:min(url.find(c) for c in "*?[" if c in url)].rsplit("/", 1)[0]


def _full(prefix: str, path: str) -> str:
    return path if not prefix or path.startswith(prefix) else prefix + path


@dataclass(frozen=True)
class LabelFile:
    """Classes per video from a labels CSV (module docstring): ``classes`` sorted, ``rows`` path → class names."""

    path: str
    classes: list[str]
    rows: dict[str, list[str]]

    @classmethod
    def read(cls, path: str) -> LabelFile:
        problem = not_a_regular_file(path) if is_local(path) else None
        if problem:
            raise SourceError(f"--labels {path}: {problem}")
        try:
            with fsspec.open(path, "rt", newline="") as f:
                reader = csv.DictReader(f)
                if not reader.fieldnames or not {"path", "classes"} <= set(reader.fieldnames):
                    raise SourceError(f"--labels {path}: needs a header with the columns path and classes, got "
                                      f"{reader.fieldnames}")
                rows: dict[str, list[str]] = {}
                for line, row in enumerate(reader, start=2):
                    names = [c.strip() for c in (row["classes"] or "").split(CLASS_SEPARATOR) if c.strip()]
                    if not row["path"] or not names:
                        raise SourceError(f"--labels {path}: line {line} has no path or no class")
                    if row["path"] in rows:
                        raise SourceError(f"--labels {path}: line {line}: {row['path']} is listed twice")
                    rows[row["path"]] = names
        except FileNotFoundError:
            raise SourceError(f"--labels {path}: no such file") from None
        except (OSError, UnicodeDecodeError, csv.Error) as err:
            raise SourceError(f"--labels {path}: cannot read it as CSV ({err})") from None
        if not rows:
            raise SourceError(f"--labels {path}: no rows")
        return cls(path, sorted({c for names in rows.values() for c in names}), rows)

    def multi_hot(self, listing: Listing) -> np.ndarray:
        """(N, C) uint8 labels of the listed videos; refuses videos without a row, naming the first ones."""
        index = {name: i for i, name in enumerate(self.classes)}
        out = np.zeros((len(listing.ids), len(self.classes)), np.uint8)
        missing = []
        root = listing.root.rstrip("/") + "/"
        for row, video in enumerate(listing.ids):
            names = self.rows.get(video) or self.rows.get(video.removeprefix(root))
            if names is None:
                missing.append(video)
                continue
            out[row, [index[n] for n in names]] = 1
        if missing:
            raise SourceError(f"--labels {self.path}: {len(missing)} listed video(s) have no row (paths relative to "
                              f"{listing.root} or as listed), e.g. {', '.join(missing[:3])}")
        return out


@dataclass
class SplitState:
    """The resume record of one split (module docstring)."""

    listing: str
    videos: int
    labelled: bool
    rows: int = 0
    failed: list[dict[str, str]] = field(default_factory=list)
    finished: bool = False


class SplitWriter:
    """Writes one split's videos in listing order, in whole shards, recording progress for resume.

    Create it with :meth:`open`; :attr:`todo` lists the videos still to extract. Hand every one of them, in that
    order, to :meth:`add` (decoded) or :meth:`fail`; then :meth:`finish`.
    """

    def __init__(self, url: str, group: zarr.Group, split: str, state: dict[str, Any], listing: Listing,
                 labels: np.ndarray | None) -> None:
        self.url, self.group, self.split, self.state = url, group, split, state
        self.info = dict(group.attrs[ATTRIBUTE])
        self.arrays = group[split]
        self.shard = int(self.info["shard_videos"])
        self.split_state = SplitState(**state["splits"][split])
        self._labels = None if labels is None else dict(zip(listing.ids, labels, strict=True))
        done = set(np.asarray(self.arrays["video_ids"][:self.split_state.rows]).tolist())
        done |= {f["path"] for f in self.split_state.failed}
        self.todo = [] if self.split_state.finished else [v for v in listing.ids if v not in done]
        self.already = len(listing.ids) - len(self.todo)
        self._pending: list[tuple[str, np.ndarray, int]] = []
        self.written = 0
        self.failed_now: list[dict[str, str]] = []
        self.write_seconds = 0.0
        self.bytes_written = 0

    @classmethod
    def open(cls, url: str, split: str, listing: Listing, settings: ExtractorSettings, *, protocol: Protocol,
             dataset: str, dtype: str, labels: LabelFile | None, storage_options: dict[str, Any] | None = None,
             chunk_videos: int | None = None, shard_videos: int | None = None, overwrite: bool = False,
             ) -> SplitWriter:
        """Create the store (first run), or resume it, for extracting ``split`` from ``listing``."""
        if split not in stored_splits(protocol):
            raise SourceError(f"--split {split}: protocol {protocol} stores the splits "
                              f"{', '.join(stored_splits(protocol))} ({split} is another split's alias there)")
        roles = evaluated_roles(protocol, split)
        if labels is None and roles:
            raise SourceError(f"--split {split}: under protocol {protocol} this split is the {' and '.join(roles)} "
                              "that evaluation scores, so it needs --labels (a CSV with the columns path,classes); "
                              "nothing was written")
        spec = settings.spec
        info = store_info(dataset, protocol, settings.frames, spec.feature_dim,
                          len(labels.classes) if labels else 1, dtype, {s: 1 for s in stored_splits(protocol)},
                          chunk_videos, shard_videos)
        params = {"protocol": protocol, "dataset": dataset, "dtype": dtype, "extraction": settings.describe(),
                  "classes": labels.classes if labels else None, "chunk_videos": info.chunk_videos,
                  "shard_videos": info.shard_videos}
        multi_hot = labels.multi_hot(listing) if labels else None
        if overwrite:
            check_replaceable(url, storage_options, STATE_ATTR)
        group = None if overwrite else _open_existing(url, storage_options)
        if group is None:
            group = create_store(url, info, storage_options,
                                 overwrite=overwrite or is_aborted_creation(url, storage_options))
            for name in stored_splits(protocol):
                group[name].create_array("source_frames", shape=(1,), dtype="int32", chunks=(info.shard_videos,),
                                         fill_value=0, **checksummed())
            state: dict[str, Any] = {"params": params, "splits": {}}
        else:
            state = dict(group.attrs.get(STATE_ATTR) or {})
            if state.get("params") != params:
                raise StoreError(f"{url}: a store extracted with other settings is there (differs in: "
                                 f"{', '.join(_differences(state.get('params'), params)) or 'everything'}); use the "
                                 "same options for every split, or --overwrite to start again")
        previous = state["splits"].get(split)
        if previous is not None and previous["listing"] != listing.digest:
            raise StoreError(f"{url}: split {split!r} was {'extracted' if previous['finished'] else 'begun'} from "
                             f"another listing ({previous['videos']} videos, now {len(listing.ids)}, or other files "
                             "or sizes); run the same --videos again, or --overwrite to start again")
        if previous is None:
            fresh = SplitState(listing.digest, len(listing.ids), labelled=labels is not None)
            state["splits"][split] = dataclasses.asdict(fresh)
            _resize(group[split], len(listing.ids))
            group.attrs[STATE_ATTR] = state
            _set_count(group, split, len(listing.ids))
        return cls(url, group, split, state, listing, multi_hot)

    def add(self, video_id: str, features: np.ndarray, source_frames: int) -> None:
        """One decoded video's features (T, F); written when a whole shard is ready."""
        features = np.array(features)  # a copy: Ray's batches are read-only views of their blocks
        if nonfinite_rows(features[None]).size:
            self.fail(video_id, "the backbone gave NaN or Inf features")
            return
        self._pending.append((video_id, features, source_frames))
        if len(self._pending) >= self.shard:
            self._flush(self.shard)

    def fail(self, video_id: str, error: str) -> None:
        """A video that could not be decoded: listed in the failed record, no row."""
        self.failed_now.append({"path": video_id, "error": error})
        self.split_state.failed.append({"path": video_id, "error": error})

    def finish(self) -> bool:
        """Write the last partial shard, cut the arrays to the written rows, mark the split finished and the store
        complete when it was its last split; returns whether the store is complete."""
        self._flush(len(self._pending))
        rows = self.split_state.rows
        if rows == 0:
            self._save()
            raise SourceError(f"{self.url}: no video of split {self.split!r} could be decoded "
                              f"({len(self.split_state.failed)} failed); the store stays incomplete")
        _resize(self.arrays, rows)
        _set_count(self.group, self.split, rows)
        self.split_state.finished = True
        self._save()
        splits = self.state["splits"]
        protocol = self.info["protocol"]
        if not all(splits.get(s, {}).get("finished") for s in stored_splits(protocol)):
            return False
        labelled = {s: splits[s]["labelled"] for s in stored_splits(protocol)}
        unlabelled = [s for s, done in labelled.items() if not done and evaluated_roles(protocol, s)]
        if unlabelled:
            raise SourceError(f"{self.url}: split {unlabelled[0]!r} was extracted without labels, but evaluation "
                              f"scores it; the store stays incomplete: re-run that split with --labels and "
                              "--overwrite")
        mark_complete(self.group, {
            "kind": "videos", "dataset": self.info["dataset"], "extraction": self.state["params"]["extraction"],
            "frame_rule": FRAME_RULE, "classes": self.state["params"]["classes"], "labelled": labelled,
            "train_labelled": labelled["train"], "failed": {s: splits[s]["failed"] for s in labelled},
            FINITE_RECORD: True})
        return True

    def _flush(self, count: int) -> None:
        if count == 0:
            return
        began = time.perf_counter()
        batch, self._pending = self._pending[:count], self._pending[count:]
        start, stop = self.split_state.rows, self.split_state.rows + count
        ids = [video for video, _, _ in batch]
        feats = np.stack([f for _, f, _ in batch]).astype(self.info["dtype"])
        self.arrays["feats"][start:stop] = feats
        if self._labels is not None:
            self.arrays["labels"][start:stop] = np.stack([self._labels[v] for v in ids])
        self.arrays["video_ids"][start:stop] = np.array(ids, dtype=np.str_)
        self.arrays["source_frames"][start:stop] = np.array([n for _, _, n in batch], np.int32)
        self.split_state.rows = stop
        self._save()
        self.written += count
        self.bytes_written += feats.nbytes
        self.write_seconds += time.perf_counter() - began

    def _save(self) -> None:
        self.state["splits"][self.split] = dataclasses.asdict(self.split_state)
        self.group.attrs[STATE_ATTR] = self.state


def evaluated_roles(protocol: Protocol, split: str) -> list[str]:
    """The roles (query, database) that stored split ``split`` plays in evaluation under ``protocol``: a split
    with any of them must be labelled."""
    return [role for role in ("query", "database") if stored_split(protocol, role) == split]


def _open_existing(url: str, storage_options: dict[str, Any] | None) -> zarr.Group | None:
    """The group of an extracted store at ``url`` (complete or not), None where there is none; another kind of
    store there is refused."""
    try:
        store = open_store(url, storage_options, require_complete=False, mode="r+")
    except StoreError:
        return None
    if STATE_ATTR not in store.group.attrs:
        raise StoreError(f"{url}: a feature store that was not extracted from videos is there; choose another --out "
                         "or pass --overwrite to replace it")
    return store.group


def _resize(arrays: zarr.Group, rows: int) -> None:
    for name in ("feats", "labels", "video_ids", "source_frames"):
        array = arrays[name]
        array.resize((rows, *array.shape[1:]))


def _set_count(group: zarr.Group, split: str, rows: int) -> None:
    info = dict(group.attrs[ATTRIBUTE])
    info["counts"] = {**info["counts"], split: rows}
    group.attrs[ATTRIBUTE] = info


def open_video(video: str, storage_options: dict[str, Any] | None = None) -> Any:
    """What :func:`storage.video.decode_video` reads: a local path as is, a URL as an fsspec file object (the
    caller closes it)."""
    if is_local(video):
        return video.removeprefix("file://")
    return fsspec.open(video, "rb", **(storage_options or {})).open()


def decode_one(video: str, settings: ExtractorSettings, storage_options: dict[str, Any] | None = None,
               threads: int = 1, timeout: float = DECODE_TIMEOUT_S) -> tuple[np.ndarray, int]:
    """The T frames (T, S, S, 3) uint8 and the decodable frame count of one video; :class:`VideoError` when it
    cannot be read or decoded, is not a regular file (a local FIFO, socket, device or folder is never opened),
    or takes longer than ``timeout`` seconds (a stalled read: the decoding thread is abandoned, not waited for)."""
    problem = not_a_regular_file(video) if is_local(video) else None
    if problem:
        raise VideoError(f"{video}: {problem}")
    outcome: dict[str, Any] = {}

    def decode() -> None:
        try:
            outcome["frames"] = _open_and_decode(video, settings, storage_options, threads)
        except Exception as err:  # handed to the caller's thread below
            outcome["error"] = err

    worker = threading.Thread(target=decode, name=f"decode {video}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise VideoError(f"{video}: decoding did not finish within {timeout:g} s (a stalled read or a file that "
                         "never ends); skipped")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["frames"]


def _open_and_decode(video: str, settings: ExtractorSettings, storage_options: dict[str, Any] | None,
                     threads: int) -> tuple[np.ndarray, int]:
    try:
        source = open_video(video, storage_options)
    except OSError as err:
        raise VideoError(f"{video}: cannot open it ({type(err).__name__}: {err})") from None
    try:
        decoded = decode_video(source, settings.frames, settings.resize, settings.crop, name=video, threads=threads)
    finally:
        if not isinstance(source, str):
            source.close()
    return decoded.frames, decoded.source_frames


def check_video_files(videos: Sequence[str], storage_options: dict[str, Any] | None = None) -> None:
    """Refuse, by name, a video that is not a regular file (a folder, FIFO, socket or device; for a URL, what its
    listing says), before anything is loaded or opened."""
    for video in videos:
        problem = not_a_regular_file(video, storage_options)
        if problem:
            raise VideoError(f"{video}: {problem}")


def extract_videos(videos: Sequence[str], settings: ExtractorSettings, dtype: str = "float32",
                   storage_options: dict[str, Any] | None = None, device: str = "cpu",
                   timeout: float = DECODE_TIMEOUT_S) -> np.ndarray:
    """Features (N, T, F) of ``videos`` in this process, exactly as an extraction with ``settings`` stores them
    (rounded to the store's ``dtype``, returned as float32); for query videos. A bad video raises
    :class:`VideoError` naming it; every video is checked to be a regular file before the backbone loads."""
    check_video_files(videos, storage_options)
    resolve_weights(settings)
    encoder = FrameEncoder(settings).to(device)
    out = []
    for video in videos:
        frames, _ = decode_one(video, settings, storage_options, threads=0, timeout=timeout)
        feats = encode_frames(encoder, frames, torch.device(device), batch_frames=64)
        out.append(feats.astype(dtype).astype(np.float32))
    return np.stack(out)


def extraction_settings(store_url: str, storage_options: dict[str, Any] | None = None) -> tuple[ExtractorSettings,
                                                                                                  str]:
    """The extraction settings and feature dtype a store of extracted features was written with."""
    store = open_store(store_url, storage_options)
    described = store.info.sources.get("extraction")
    if not described:
        raise StoreError(f"{store_url}: not extracted from videos (no sources.extraction), so there is no extractor "
                         "to encode new videos with")
    return ExtractorSettings.from_description(described), store.info.dtype
