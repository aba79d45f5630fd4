"""The feature store: one Zarr v3 group per dataset at any fsspec URL.

Layout (schema version 1)::

    <url>/zarr.json               group; attributes["autossvh"] = the StoreInfo below
    <url>/<split>/feats           (N, T, F) float16 (or float32), chunks of ``chunk_videos`` whole videos,
                                  sharded ``shard_videos`` videos per shard file, zstd
    <url>/<split>/labels          (N, C) uint8 multi-hot (absent for an unlabelled train split)
    <url>/<split>/video_ids       (N,) strings
    <url>/<split>/frame_signal    (N, T) float16, generated stores only: the true class signal of every frame

Only the splits the protocol stores are present (``storage.schema``): FCVID holds ``train`` and ``database``
(the queries are the database), UCF101/HMDB51 ``train`` and ``query`` (the database is train), ActivityNet
all three. The protocol is part of the attributes, so evaluation reads it instead of guessing.

A store is created with ``complete = false`` and marked complete only after its last byte is written;
:func:`open_store` refuses an incomplete store unless asked not to (ingest resumes through that).
:meth:`FeatureStore.split` checks every array's shape against the attributes.

Damage is an error wherever data is read. Every inner chunk ends in a crc32c of its compressed bytes (as the
shard index always did), so a flipped bit fails its read with a checksum error that :meth:`FeatureStore.read_error`
turns into one naming the array, the shard file and the videos. Zarr reads a missing chunk or shard file as fill
values, silently; a store opened for reading is wrapped in :class:`StrictStore`, which raises
:class:`MissingChunkError` instead for every array that must be there. :func:`verify_shards` checks a split's
files up front (presence, size, the shard indexes' checksums) without reading their data. Stores written before
chunk checksums (``FeatureStore.has_chunk_checksums`` false) still open and read; ``jobs/verify.py`` checks them
and ``jobs/ingest.py --overwrite`` rewrites them with checksums.

Chunking: a chunk holds whole videos (readers never need part of a video) and is the unit a reader fetches;
shards bundle chunks into files large enough for object stores. The defaults aim at ~4 MiB chunks and
~64 MiB shards (FCVID float16: 16 videos = 3.2 MiB per chunk, 256 videos = 51 MiB per shard); see the
README's storage section for the measurements behind them.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
import posixpath
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import google_crc32c
import numpy as np
import torch
import zarr
from zarr.abc.store import ByteRequest
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import FsspecStore, LocalStore, WrapperStore

from storage.schema import PROTOCOLS, SPLITS, Protocol, stored_split, stored_splits

SCHEMA_VERSION = 1
ATTRIBUTE = "autossvh"
FEATURE_DTYPES = ("float16", "float32")
TARGET_CHUNK_BYTES = 4 << 20
MAX_CHUNK_VIDEOS = 64  # keeps shuffling granularity fine when videos are small
CHUNKS_PER_SHARD = 16
SHARD_INDEX_ENTRY_BYTES = 16  # offset and length (two uint64) per inner chunk at the end of every shard file
FINITE_RECORD = "features_finite"  # sources key: the writer checked every video's features finite
SHARD_INDEX_CRC_BYTES = 4  # the crc32c that follows the shard index
CHUNK_CODECS = (ZstdCodec(), Crc32cCodec())  # every inner chunk: zstd, then a crc32c of the compressed bytes
WRITE_EVERY_CHUNK = {"write_empty_chunks": True}  # an all-zero chunk is written too, so a missing one is damage
FINITE_CHECK_VIDEOS = 256  # videos checked for NaN/Inf at a time (bounds the check's temporary copy)
LABEL_BLOCK_ROWS = 1 << 16  # rows of labels read at a time when checking them
READ_ERRORS = (ValueError, RuntimeError)  # what zarr's codecs raise on damaged bytes (checksum, zstd frame)
METADATA_FILE = "zarr.json"  # every group's and array's metadata (Zarr v3)
ZARR_NODE_TYPES = ("group", "array")


class StoreError(ValueError):
    """A store that is missing, malformed, of another schema, or inconsistent; the message names it."""


class IncompleteStoreError(StoreError):
    """The store's writer has not finished (ingest interrupted or still running)."""


class MissingChunkError(StoreError):
    """A chunk or shard file that must be there is not (zarr would have read it as zeros)."""


class PathError(ValueError):
    """A path or URL a job refuses before it starts: an output that is, lies inside or contains one of the job's
    inputs, or something ``--overwrite`` may not replace; the message names both and what is there."""


class _PendingReadsAtExit(logging.Filter):
    """Drops asyncio's reports on zarr's sibling reads of a failed read (its ``concurrent_map`` fan-out): they
    are still queued on zarr's I/O loop when a job exits right after the error, which is harmless, and would
    otherwise print a traceback under the job's one-line error."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not ("concurrent_map" in message and message.startswith(
            ("Task was destroyed but it is pending", "Task exception was never retrieved")))


log = logging.getLogger(__name__)
logging.getLogger("asyncio").addFilter(_PendingReadsAtExit())


class StrictStore(WrapperStore):
    """A Zarr store in which a missing chunk of a required array is an error, not fill values, and a damaged
    ``zarr.json`` is an error naming the file (:func:`check_metadata`), not a bare JSONDecodeError.

    ``required`` holds array paths (``train/feats``); it is shared by the copies zarr makes of the store and is
    filled by :func:`open_store` once the store's attributes say which arrays must be complete.
    """

    def __init__(self, store: Any, url: str, required: set[str] | None = None) -> None:
        super().__init__(store)
        self.url = url
        self.required = set() if required is None else required

    def _with_store(self, store: Any) -> StrictStore:
        return type(self)(store, self.url, self.required)

    async def get(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None,
                  ) -> Buffer | None:
        value = await self._store.get(key, prototype, byte_range)
        if value is None and "/c/" in key and key.split("/c/", 1)[0] in self.required:
            raise MissingChunkError(f"{self.url}: the file {key} is missing (zarr would read it as zeros); restore "
                                    "it or re-run the ingest with --overwrite")
        if value is not None and key.rsplit("/", 1)[-1] == METADATA_FILE:
            check_metadata(value.to_bytes(), f"{self.url.rstrip('/')}/{key}")
        return value


@dataclass
class StoreInfo:
    """The group attributes that describe a dataset store."""

    dataset: str
    protocol: Protocol
    max_frames: int
    feature_dim: int
    num_classes: int
    dtype: str
    counts: dict[str, int]
    chunk_videos: int
    shard_videos: int
    sources: dict[str, Any] = field(default_factory=dict)
    complete: bool = False
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], url: str) -> StoreInfo:
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise StoreError(f"{url}: schema version {version!r}, this code reads version {SCHEMA_VERSION}")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = names - set(data) - {"sources", "complete"}
        if missing:
            raise StoreError(f"{url}: store attributes lack {', '.join(sorted(missing))}")
        for key, (fits, expected) in _ATTRIBUTE_TYPES.items():
            if key in data and not fits(data[key]):
                raise StoreError(f"{url}/{METADATA_FILE}: attribute {ATTRIBUTE}.{key} is {data[key]!r}, expected "
                                 f"{expected}; the store's metadata is damaged")
        return cls(**{k: v for k, v in data.items() if k in names})


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_STRING = (lambda value: isinstance(value, str), "a string")
_INTEGER = (_is_int, "an integer")
_ATTRIBUTE_TYPES: dict[str, tuple[Any, str]] = {  # the type each StoreInfo attribute must have: test, in words
    "dataset": _STRING, "protocol": _STRING, "dtype": _STRING, "max_frames": _INTEGER, "feature_dim": _INTEGER,
    "num_classes": _INTEGER, "chunk_videos": _INTEGER, "shard_videos": _INTEGER,
    "counts": (lambda value: isinstance(value, dict) and all(map(_is_int, value.values())),
               "an object of video counts (integers)"),
    "sources": (lambda value: isinstance(value, dict), "an object"),
    "complete": (lambda value: isinstance(value, bool), "true or false")}


def check_metadata(data: bytes, where: str) -> None:
    """Refuse a ``zarr.json`` that is not Zarr v3 metadata, naming the file and what is wrong (zarr itself fails
    with a bare JSONDecodeError or KeyError that names neither)."""
    try:
        meta = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StoreError(f"{where}: not valid JSON ({err}); the store's metadata is damaged: restore the file or "
                         "re-write the store with --overwrite") from None
    if not isinstance(meta, dict) or meta.get("zarr_format") != 3 or meta.get("node_type") not in ZARR_NODE_TYPES:
        found = (f"zarr_format {meta.get('zarr_format')!r}, node_type {meta.get('node_type')!r}"
                 if isinstance(meta, dict) else f"a JSON {type(meta).__name__}")
        raise StoreError(f"{where}: not Zarr v3 metadata (expected an object with zarr_format 3 and node_type group "
                         f"or array, found {found}); restore the file or re-write the store with --overwrite")


def checksummed() -> dict[str, Any]:
    """``create_array`` options of every array this project writes: :data:`CHUNK_CODECS`, every chunk written."""
    return {"compressors": CHUNK_CODECS, "config": WRITE_EVERY_CHUNK}


def nonfinite_rows(feats: np.ndarray) -> np.ndarray:
    """Indices of the videos (first axis) of ``feats`` that hold any NaN or Inf. The common case is one reduction
    (the largest magnitude is NaN or Inf exactly when some value is): about 0.15 ms per FCVID chunk of 16 videos,
    against 2 ms for numpy's isfinite over float16."""
    if feats.size == 0 or bool(torch.from_numpy(np.ascontiguousarray(feats)).abs().max().isfinite()):
        return np.zeros(0, np.int64)
    return np.flatnonzero(~np.isfinite(feats.reshape(len(feats), -1)).all(axis=1))


def bad_label_rows(labels: np.ndarray) -> np.ndarray:
    """Rows of a (n, C) label block that hold a value other than 0 or 1. Labels are multi-hot over the store's C
    classes: a class outside them has no column, and any other value (255, 7) is no label but would count as
    one in evaluation."""
    return np.flatnonzero(((labels != 0) & (labels != 1)).reshape(len(labels), -1).any(axis=1))


def duplicate_ids(ids: np.ndarray) -> dict[str, list[int]]:
    """Every video id that occurs more than once in ``ids``, with its rows in order."""
    ids = np.asarray(ids)
    if ids.dtype == object:
        ids = ids.astype(str)
    order = np.argsort(ids, kind="stable")
    ordered = ids[order]
    repeats = np.flatnonzero(ordered[1:] == ordered[:-1])
    found: dict[str, list[int]] = {}
    for i in repeats:
        found.setdefault(str(ordered[i]), [int(order[i])]).append(int(order[i + 1]))
    return found


def default_chunking(max_frames: int, feature_dim: int, dtype: str) -> tuple[int, int]:
    """(chunk_videos, shard_videos): a power of two of videos up to TARGET_CHUNK_BYTES per chunk (at most
    MAX_CHUNK_VIDEOS), and CHUNKS_PER_SHARD chunks per shard."""
    video_bytes = max_frames * feature_dim * np.dtype(dtype).itemsize
    chunk = 1 << max(0, int(np.floor(np.log2(max(1, TARGET_CHUNK_BYTES // video_bytes)))))
    chunk = min(chunk, MAX_CHUNK_VIDEOS)
    return chunk, chunk * CHUNKS_PER_SHARD


def is_local(url: str) -> bool:
    """A plain path or a ``file://`` URL: read from this machine, without fsspec storage options."""
    return "://" not in url or url.startswith("file://")


def url_filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """The fsspec filesystem and path of ``url``; storage options apply to remote URLs only."""
    if is_local(url):
        return fsspec.core.url_to_fs(url.removeprefix("file://"))
    return fsspec.core.url_to_fs(url, **(storage_options or {}))


def resolved_url(url: str | Path) -> str:
    """One spelling per place, to compare locations: a local path (plain, relative, ``~``, ``file://``, through
    symlinks) as its absolute resolved path; any other URL as its scheme and normalised path."""
    url = str(url)
    if is_local(url):
        return str(Path(url.removeprefix("file://")).expanduser().resolve())
    scheme, path = url.split("://", 1)
    return f"{scheme.lower()}://{posixpath.normpath('/' + path).lstrip('/')}"


def _within(inner: str, outer: str) -> bool:
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def check_apart(outputs: Mapping[str, str | Path | None], inputs: Mapping[str, str | Path | None]) -> None:
    """Inputs are read-only to every job: refuse an output that is, lies inside or contains one of the inputs
    (compared as :func:`resolved_url`, so ``file://``, relative paths and symlinks are seen through). Keys name
    the options (``--out``, ``--data``); None values (options not given) are skipped."""
    for out_name, out in outputs.items():
        if out is None:
            continue
        where = resolved_url(out)
        for in_name, source in inputs.items():
            if source is None:
                continue
            read = resolved_url(source)
            relation = ("is" if where == read else "lies inside" if _within(where, read) else
                        "contains" if _within(read, where) else None)
            if relation is not None:
                shown = "" if str(out) == where and str(source) == read else f" ({where} and {read})"
                raise PathError(f"{out_name} {out} {relation} {in_name} {source}{shown}: a job never writes over, "
                                f"into or around what it reads; choose another {out_name}")


def not_a_regular_file(url: str | Path, storage_options: dict[str, Any] | None = None) -> str | None:
    """None when ``url`` is a regular file (through symlinks), else what it is in words (``no such file``, ``a
    FIFO (named pipe), not a regular file``, ...). Only regular files are opened as media or arrays: opening a
    FIFO or a device can block forever, a folder fails obscurely. Nothing is opened here (a stat, or the remote
    listing's type)."""
    url = str(url)
    if is_local(url):
        try:
            mode = os.stat(Path(url.removeprefix("file://")).expanduser()).st_mode
        except FileNotFoundError:
            return "no such file"
        except OSError as err:
            return f"cannot be read ({err.strerror or err})"
        kinds = ((stat.S_ISREG, None), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                 (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
        kind = next((name for test, name in kinds if test(mode)), "a special file")
    else:
        fs, path = url_filesystem(url, storage_options)
        try:
            found = fs.info(path).get("type")
        except FileNotFoundError:
            return "no such file"
        kind = None if found == "file" else "a folder" if found == "directory" else f"of type {found!r}"
    return None if kind is None else f"{kind}, not a regular file"


WRITERS = {"autossvh_ingest": "jobs/ingest.py or jobs/make_synthetic.py", "autossvh_extract": "jobs/extract.py",
           "autossvh_codes": "jobs/encode.py"}  # the record each writer keeps in its store's attributes


def _describe(attributes: dict[str, Any]) -> str:
    """A store by its attributes, in words: kind, writer, contents, completeness."""
    writer = next((job for marker, job in WRITERS.items() if marker in attributes), "an unknown writer")
    if "autossvh_codes" in attributes:
        info = attributes["autossvh_codes"]
        contents = (f"{info.get('count')} codes of {info.get('nbits')} bits of {info.get('dataset')!r} split "
                    f"{info.get('split')!r}")
        return f"a {'complete' if info.get('complete') else 'incomplete'} code store ({contents}) written by {writer}"
    info = attributes.get(ATTRIBUTE) or {}
    counts = ", ".join(f"{k} {v}" for k, v in (info.get("counts") or {}).items())
    return (f"a {'complete' if info.get('complete') else 'incomplete'} feature store ({info.get('dataset')!r}: "
            f"{counts} videos) written by {writer}")


def is_aborted_creation(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether ``url`` holds a group that ``create_store`` began and never described (killed in between): no
    attributes and nothing but split groups, so it is safe to replace."""
    try:
        group = zarr.open_group(store=zarr_store(url, storage_options, read_only=True), mode="r", zarr_format=3)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError):
        return False
    return not dict(group.attrs) and set(group.keys()) <= set(SPLITS)


def check_replaceable(url: str, storage_options: dict[str, Any] | None, marker: str) -> None:
    """``--overwrite`` replaces only what this job writes: a store whose attributes hold ``marker`` (the record
    its writer keeps, a key of :data:`WRITERS`), a store creation that was killed before its attributes (a group
    of nothing but split groups), or nothing (an empty folder). Anything else is refused by name; what is
    replaced is logged."""
    fs, path = url_filesystem(url, storage_options)
    root = path.rstrip("/")
    if not fs.exists(root):
        return
    if not fs.isdir(root):
        found = "a file"
    else:
        entries = set(fs.ls(root, detail=False))
        if not entries:
            return
        try:
            meta = json.loads(fs.cat_file(f"{root}/{METADATA_FILE}"))
        except FileNotFoundError:
            meta = None
        except (UnicodeDecodeError, json.JSONDecodeError):
            meta = {}
        attributes = (meta.get("attributes") or {}) if isinstance(meta, dict) else {}
        if marker in attributes:
            log.warning("%s: --overwrite: removing %s", url, _describe(attributes))
            return
        if is_aborted_creation(url, storage_options):
            return
        found = (f"a folder of {len(entries)} entries that is not a store" if meta is None else
                 _describe(attributes) if ATTRIBUTE in attributes or "autossvh_codes" in attributes else
                 "a Zarr group or array of another kind" if meta else f"a folder whose {METADATA_FILE} is damaged")
    raise PathError(f"{url}: --overwrite replaces only a store written by {WRITERS[marker]}, but {found} is there; "
                    "remove it yourself if it is meant to go, or choose another output")


def zarr_store(url: str, storage_options: dict[str, Any] | None = None, read_only: bool = False) -> Any:
    """A Zarr store for a plain path, ``file://`` URL or any fsspec URL (``s3://``, ``gs://``, ``memory://``)."""
    if is_local(url):
        return LocalStore(url.removeprefix("file://"), read_only=read_only)
    return FsspecStore.from_url(url, storage_options=storage_options or {}, read_only=read_only)


def create_store(
    url: str,
    info: StoreInfo,
    storage_options: dict[str, Any] | None = None,
    overwrite: bool = False,
    frame_signal: bool = False,
) -> zarr.Group:
    """Create the group and its empty arrays, marked incomplete (with ``frame_signal``, a (N, T) array of the
    generator's per-frame class signal too). Refuses to replace an existing store unless ``overwrite``."""
    _check_info(info, url)
    store = zarr_store(url, storage_options)
    try:
        group = zarr.open_group(store=store, mode="w" if overwrite else "w-", zarr_format=3)
    except zarr.errors.ContainsGroupError as err:
        raise StoreError(f"{url}: a store already exists there (use overwrite to replace it)") from err
    except FileExistsError as err:
        raise StoreError(f"{url}: something already exists there (use overwrite to replace it)") from err
    info = dataclasses.replace(info, complete=False)
    for split in stored_splits(info.protocol):
        n = info.counts[split]
        sub = group.create_group(split)
        sub.create_array(
            "feats", shape=(n, info.max_frames, info.feature_dim), dtype=info.dtype,
            chunks=(info.chunk_videos, info.max_frames, info.feature_dim),
            shards=(info.shard_videos, info.max_frames, info.feature_dim), fill_value=0, **checksummed(),
        )
        # Labels and ids are chunked like the feature shards, so a writer's block never rewrites another
        # block's rows (an interrupted write cannot damage finished blocks).
        sub.create_array("labels", shape=(n, info.num_classes), dtype="uint8",
                         chunks=(info.shard_videos, info.num_classes), fill_value=0, **checksummed())
        sub.create_array("video_ids", shape=(n,), dtype=str, chunks=(info.shard_videos,), **checksummed())
        if frame_signal:
            sub.create_array("frame_signal", shape=(n, info.max_frames), dtype="float16",
                             chunks=(info.shard_videos, info.max_frames), fill_value=0, **checksummed())
    group.attrs[ATTRIBUTE] = info.to_dict()
    return group


def mark_complete(group: zarr.Group, sources: dict[str, Any] | None = None) -> None:
    """Record the sources and mark the store complete: the last write of any writer."""
    info = dict(group.attrs[ATTRIBUTE])
    if sources is not None:
        info["sources"] = sources
    info["complete"] = True
    group.attrs[ATTRIBUTE] = info


@dataclass
class SplitArrays:
    """The arrays of one split (aliases resolved): lazy Zarr arrays, read in whole chunks."""

    name: str
    stored_as: str
    feats: zarr.Array
    labels: zarr.Array
    video_ids: zarr.Array

    def __len__(self) -> int:
        return int(self.feats.shape[0])


class FeatureStore:
    """An opened, validated dataset store."""

    def __init__(self, url: str, group: zarr.Group, info: StoreInfo,
                 storage_options: dict[str, Any] | None = None) -> None:
        self.url = url
        self.group = group
        self.info = info
        self.storage_options = storage_options

    def split(self, name: str) -> SplitArrays:
        """The arrays of split ``name``, their shapes checked against the store's attributes."""
        stored = stored_split(self.info.protocol, name)
        found: dict[str, zarr.Array] = {}
        path = stored
        try:
            sub = self.group[stored]
            for key in ("feats", "labels", "video_ids"):
                path = f"{stored}/{key}"
                found[key] = sub[key]
        except KeyError:
            raise StoreError(f"{self.url}: split {stored!r} lacks {path} (no {path}/{METADATA_FILE}); restore it or "
                             "re-write the store with --overwrite") from None
        arrays = SplitArrays(name, stored, **found)
        info, n = self.info, self.info.counts[stored]
        expected = {"feats": (n, info.max_frames, info.feature_dim), "labels": (n, info.num_classes),
                    "video_ids": (n,)}
        for key, shape in expected.items():
            found = tuple(getattr(arrays, key).shape)
            if found != shape:
                raise StoreError(f"{self.url}: split {stored!r}: {key} has shape {found}, expected {shape} (from the "
                                 f"store's counts[{stored!r}] = {n}, max_frames, feature_dim, num_classes)")
        return arrays

    def is_labelled(self, name: str) -> bool:
        """Whether split ``name`` was stored with labels (``sources.labelled``; an unlabelled train split holds
        zeros, ``sources.train_labelled = false``)."""
        stored = stored_split(self.info.protocol, name)
        labelled = self.info.sources.get("labelled")
        if isinstance(labelled, dict) and stored in labelled:
            return bool(labelled[stored])
        return bool(self.info.sources.get("train_labelled", False)) if stored == "train" else True

    def read_error(self, name: str, what: str, start: int, stop: int, err: Exception) -> StoreError:
        """The error for a failed read of rows ``start:stop`` of ``what`` (feats, labels, video_ids) of split
        ``name``: damaged bytes in the file that holds them."""
        stored = stored_split(self.info.protocol, name)
        array = self.group[stored][what]
        start, stop, err = next(unreadable_chunks(array, start, stop), (start, stop, err))  # the first bad chunk
        rows = array.metadata.chunk_grid.chunk_shape[0]
        files = [f"{stored}/{what}/" + array.metadata.encode_chunk_key((i,) + (0,) * (array.ndim - 1))
                 for i in range(start // rows, max(start, stop - 1) // rows + 1)]
        where = f"the file {files[0]} is" if len(files) == 1 else (
            f"one of the files {', '.join(files)} is" if len(files) <= 3 else
            f"one of the {len(files)} files {files[0]} ... {files[-1]} is")
        cause = ("missing (zarr would read it as zeros)" if isinstance(err, MissingChunkError) else
                 f"damaged or truncated ({read_failure(err)})")
        return StoreError(f"{self.url}: split {stored!r}: cannot read {what} of videos {start}:{stop}: {where} "
                          f"{cause}; restore it or re-run the ingest with --overwrite")

    def nonfinite_error(self, name: str, rows: np.ndarray) -> StoreError:
        """The error for videos (row numbers ``rows`` of split ``name``) whose features hold NaN or Inf, naming
        them by row and id."""
        stored = stored_split(self.info.protocol, name)
        ids = self.group[stored]["video_ids"]
        shown = ", ".join(f"{int(r)} ({str(ids[int(r)])!r})" for r in rows[:5])
        more = f" and {len(rows) - 5} more" if len(rows) > 5 else ""
        return StoreError(f"{self.url}: split {stored!r}: {len(rows)} video(s) have NaN or Inf features: row (id) "
                          f"{shown}{more}; list every one with jobs/verify.py {self.url}, then fix the source and "
                          "re-run the ingest with --overwrite")

    def check_finite(self, name: str, start: int, feats: np.ndarray) -> None:
        """Raise :meth:`nonfinite_error` if any of the videos ``feats`` (rows ``start`` on) holds NaN or Inf; a
        whole split is checked :data:`FINITE_CHECK_VIDEOS` at a time."""
        rows = np.concatenate([lo + nonfinite_rows(feats[lo:lo + FINITE_CHECK_VIDEOS])
                               for lo in range(0, len(feats), FINITE_CHECK_VIDEOS)] or [np.zeros(0, np.int64)])
        if rows.size:
            raise self.nonfinite_error(name, start + rows)

    def label_blocks(self, name: str) -> Iterator[tuple[int, np.ndarray]]:
        """The labels of split ``name``, ``LABEL_BLOCK_ROWS`` rows at a time, each block with its first row; a
        damaged chunk raises the error of :meth:`read_error`, naming the rows."""
        labels = self.split(name).labels
        for start in range(0, labels.shape[0], LABEL_BLOCK_ROWS):
            stop = min(start + LABEL_BLOCK_ROWS, labels.shape[0])
            try:
                block = np.asarray(labels[start:stop])
            except READ_ERRORS as err:
                raise self.read_error(name, "labels", start, stop, err) from err
            yield start, block

    def check_labels(self, name: str) -> None:
        """Refuse label values other than 0 and 1 in split ``name`` (:func:`bad_label_rows`), naming the videos;
        an unlabelled split holds zeros and passes."""
        if not self.is_labelled(name):
            return
        stored = stored_split(self.info.protocol, name)
        labels = self.split(name).labels
        bad: list[int] = []
        for start, block in self.label_blocks(name):
            bad += (start + bad_label_rows(block)).tolist()
        if bad:
            ids = self.group[stored]["video_ids"]
            shown = ", ".join(f"{r} ({str(ids[r])!r}) holds {sorted(set(np.asarray(labels[r]).tolist()) - {0, 1})}"
                              for r in bad[:5])
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            raise StoreError(f"{self.url}: split {stored!r}: {len(bad)} video(s) have label values other than 0 and "
                             f"1 (labels are multi-hot over the store's {self.info.num_classes} classes): row (id) "
                             f"{shown}{more}; list every one with jobs/verify.py {self.url}, then fix the labels "
                             "and re-write the store")

    def check_unique_ids(self, name: str) -> None:
        """Refuse a split ``name`` in which a video id occurs more than once, naming the ids and their rows."""
        stored = stored_split(self.info.protocol, name)
        ids = self.split(name).video_ids
        try:
            found = duplicate_ids(np.asarray(ids[:]))
        except READ_ERRORS as err:
            raise self.read_error(name, "video_ids", 0, ids.shape[0], err) from err
        if found:
            shown = "; ".join(f"{video!r} at rows {', '.join(map(str, rows))}" for video, rows in
                              list(found.items())[:5])
            more = f" and {len(found) - 5} more" if len(found) > 5 else ""
            raise StoreError(f"{self.url}: split {stored!r}: {len(found)} video id(s) occur more than once: "
                             f"{shown}{more}; video ids must be unique (fix the source and re-write the store)")

    @property
    def has_chunk_checksums(self) -> bool:
        """Whether the features' inner chunks carry a crc32c (stores written since checksums were added)."""
        return has_chunk_checksums(self.split("train").feats)

    def required_arrays(self) -> set[str]:
        """The array paths whose every chunk must be present: features and ids of each stored split, labels of a
        labelled one (an unlabelled split's all-zero label chunks may be absent)."""
        required = set()
        for split in stored_splits(self.info.protocol):
            required |= {f"{split}/feats", f"{split}/video_ids"}
            if self.is_labelled(split):
                required.add(f"{split}/labels")
        return required

    @property
    def is_synthetic(self) -> bool:
        """Written by the synthetic generator (``storage.synthetic_store``), not from real features."""
        return self.info.sources.get("kind") == "synthetic"

    @property
    def label(self) -> str:
        """The dataset's name as a reader should see it: ``fcvid``, or ``fcvid (synthetic)`` for generated data."""
        return f"{self.info.dataset} (synthetic)" if self.is_synthetic else self.info.dataset

    def eval_labels(self) -> dict[str, np.ndarray]:
        """The query and database labels evaluation compares (as the store's protocol maps them)."""
        return {name: np.asarray(self.split(name).labels[:]) for name in ("query", "database")}

    def frame_signal(self, name: str, stop: int) -> np.ndarray | None:
        """The true per-frame class signal (stop, T) float32 of the first ``stop`` videos of split ``name``;
        None for a store without one (only generated stores have it)."""
        sub = self.group[stored_split(self.info.protocol, name)]
        if "frame_signal" not in sub:
            return None
        return np.asarray(sub["frame_signal"][:stop], dtype=np.float32)

    def num_videos(self, name: str) -> int:
        return self.info.counts[stored_split(self.info.protocol, name)]

    def load(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """A whole split in memory: features as float32 (N, T, F) and labels (N, C). For small datasets and
        tests; training and evaluation at scale stream through ``storage.reader``."""
        arrays = self.split(name)
        try:
            feats = np.asarray(arrays.feats[:], dtype=np.float32)
        except READ_ERRORS as err:
            raise self.read_error(name, "feats", 0, len(arrays), err) from err
        self.check_finite(name, 0, feats)
        try:
            labels = np.asarray(arrays.labels[:])
        except READ_ERRORS as err:
            raise self.read_error(name, "labels", 0, len(arrays), err) from err
        return feats, labels


def verify_shards(store: FeatureStore, name: str) -> None:
    """Check that every chunk or shard file of split ``name`` is there, at least as long as a shard index, and
    that every shard's index matches its checksum (a truncated or overwritten tail fails it).

    This lists the split's files (one listing per array) and reads only the shard indexes (16 bytes per inner
    chunk), so it is cheap before a run; it raises :class:`StoreError` naming the store, the split and the files.
    Labels are checked only for a labelled split (an unlabelled one may lack its all-zero chunks). Damage inside
    a chunk is found when the chunk is read (its checksum), or by ``jobs/verify.py``.
    """
    arrays = store.split(name)
    fs, root = url_filesystem(store.url, store.storage_options)
    keys = ["feats", "video_ids"] + (["labels"] if store.is_labelled(name) else [])
    problems: list[str] = []
    total = 0
    for key in keys:
        array: zarr.Array = getattr(arrays, key)
        folder = f"{root.rstrip('/')}/{arrays.stored_as}/{key}"
        try:
            found = fs.find(folder, detail=True)
        except FileNotFoundError:
            found = {}
        sizes = {path[len(folder):].lstrip("/"): info.get("size") for path, info in found.items()
                 if path.startswith(folder)}
        outer = array.metadata.chunk_grid.chunk_shape
        min_bytes = 1
        if array.shards is not None:
            min_bytes = SHARD_INDEX_ENTRY_BYTES * math.prod(s // c for s, c in zip(array.shards, array.chunks,
                                                                                      strict=True))
        grid = [math.ceil(s / c) for s, c in zip(array.shape, outer, strict=True)]
        for coords in itertools.product(*map(range, grid)):
            total += 1
            file_key = array.metadata.encode_chunk_key(coords)
            size = sizes.get(file_key)
            if size is None:
                problems.append(f"{key}/{file_key} (missing)")
            elif size < min_bytes + (SHARD_INDEX_CRC_BYTES if array.shards is not None else 0):
                problems.append(f"{key}/{file_key} ({size} bytes, expected at least {min_bytes})")
            elif array.shards is not None and not _shard_index_intact(fs, f"{folder}/{file_key}", size, min_bytes):
                problems.append(f"{key}/{file_key} (shard index checksum mismatch: truncated or overwritten)")
    if problems:
        alias = f" (read as {name!r})" if name != arrays.stored_as else ""
        shown = ", ".join(problems[:5]) + (f" and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise StoreError(f"{store.url}: split {arrays.stored_as!r}{alias}: {len(problems)} of {total} chunk/shard "
                         f"files are missing or truncated: {shown}; zarr would read them as zeros. Restore them or "
                         "re-run the ingest with --overwrite")


def read_failure(err: Exception) -> str:
    """A failed chunk read in a few words: a missing file, a checksum mismatch, or the codec's error."""
    if isinstance(err, MissingChunkError):
        return "file missing"
    if "checksum" in str(err):
        return "crc32c checksum mismatch"
    return f"{type(err).__name__}: {err}"[:200]


def has_chunk_checksums(array: zarr.Array) -> bool:
    """Whether ``array``'s (inner) chunks end in a crc32c: written with :data:`CHUNK_CODECS`, every chunk
    written."""
    inner = getattr(array.metadata.codecs[0], "codecs", array.metadata.codecs)
    return any(isinstance(codec, Crc32cCodec) for codec in inner)


def unreadable_chunks(array: zarr.Array, start: int, stop: int) -> Iterator[tuple[int, int, Exception]]:
    """``(first row, end row, error)`` of every inner chunk overlapping rows ``start:stop`` of ``array`` that fails
    to read, clipped to the range: narrows a failed read down to the chunks (and videos) that are damaged."""
    rows = array.chunks[0]
    for lo in range(start - start % rows, stop, rows):
        try:
            array[lo:min(lo + rows, array.shape[0])]
        except READ_ERRORS as err:
            yield max(lo, start), min(lo + rows, stop), err


def _shard_index_intact(fs: fsspec.AbstractFileSystem, path: str, size: int, index_bytes: int) -> bool:
    """Whether the shard index at the end of the file ``path`` matches the crc32c stored after it."""
    tail = fs.cat_file(path, start=size - index_bytes - SHARD_INDEX_CRC_BYTES, end=size)
    index, stored = tail[:index_bytes], tail[index_bytes:]
    return np.uint32(google_crc32c.value(index)).tobytes() == stored


def open_store(url: str, storage_options: dict[str, Any] | None = None, require_complete: bool = True,
               mode: str = "r") -> FeatureStore:
    """Open and validate a store; an incomplete one raises :class:`IncompleteStoreError` unless
    ``require_complete`` is False. Opened for reading (``mode="r"``), a missing chunk of a required array raises
    :class:`MissingChunkError` when it is read (:class:`StrictStore`); in any mode a damaged ``zarr.json`` raises
    :class:`StoreError` naming it."""
    strict = StrictStore(zarr_store(url, storage_options, read_only=mode == "r"), url)
    try:
        group = zarr.open_group(store=strict, mode=mode, zarr_format=3)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as err:
        raise StoreError(f"{url}: no feature store there") from err
    if ATTRIBUTE not in group.attrs:
        raise StoreError(f"{url}: a Zarr group but not an AutoSSVH feature store (no '{ATTRIBUTE}' attribute)")
    attributes = group.attrs[ATTRIBUTE]
    if not isinstance(attributes, dict):
        raise StoreError(f"{url}/{METADATA_FILE}: attribute {ATTRIBUTE} is {str(attributes)[:100]!r}, expected an "
                         "object; the store's metadata is damaged")
    info = StoreInfo.from_dict(dict(attributes), url)
    if require_complete and not info.complete:
        raise IncompleteStoreError(
            f"{url}: the store is incomplete (its ingest did not finish); re-run the same ingest command to "
            "resume it")
    _check_info(info, url)
    opened = FeatureStore(url, group, info, storage_options)
    if mode == "r":
        strict.required |= opened.required_arrays()
    return opened


def _check_info(info: StoreInfo, url: str) -> None:
    if info.protocol not in PROTOCOLS:
        raise StoreError(f"{url}: unknown protocol {info.protocol!r}; expected one of {', '.join(PROTOCOLS)}")
    if info.dtype not in FEATURE_DTYPES:
        raise StoreError(f"{url}: feature dtype {info.dtype!r}; allowed: {', '.join(FEATURE_DTYPES)}")
    for key in ("max_frames", "feature_dim", "num_classes", "chunk_videos", "shard_videos"):
        if getattr(info, key) < 1:
            raise StoreError(f"{url}: {key} must be >= 1, got {getattr(info, key)}")
    if info.shard_videos % info.chunk_videos:
        raise StoreError(f"{url}: shard_videos {info.shard_videos} is not a multiple of chunk_videos "
                         f"{info.chunk_videos}")
    for split in stored_splits(info.protocol):
        if info.counts.get(split, 0) < 1:
            raise StoreError(f"{url}: split {split!r} is empty or missing from the counts")
    extra = set(info.counts) - set(SPLITS)
    if extra:
        raise StoreError(f"{url}: unknown splits {', '.join(sorted(extra))}")
