"""The code store: the packed binary codes of one split, one Zarr v3 group at any fsspec URL, for search.

Layout (schema version 1)::

    <url>/zarr.json      group; attributes["autossvh_codes"] = the CodeStoreInfo below
    <url>/codes          (N, nbits / 8) uint8, packed as the model's pyfunc packs them (bit = code > 0,
                         big-endian per byte, ``autossvh.search.pack_codes``), chunks of ``chunk_rows`` rows
    <url>/video_ids      (N,) strings, same chunks
    <url>/labels         (N, C) uint8 multi-hot, same chunks; only when the codes were stored with labels

Writing: :func:`create_code_store` makes the arrays with ``complete = false`` and returns a
:class:`CodeStoreWriter`. It holds only the URL, the options and the description, so it pickles: a driver can
hand it to Ray workers and each one writes its own row range (:meth:`CodeStoreWriter.row_ranges` gives ranges
on chunk boundaries, so no two writers ever rewrite the same chunk). :meth:`CodeStoreWriter.mark_complete` is
the last write. It checks first that every row has a video id, so no range was left unwritten, and that the
ids are unique. :func:`open_code_store` refuses an incomplete store.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import zarr

from storage.store import ATTRIBUTE as FEATURE_ATTRIBUTE
from storage.store import (
    READ_ERRORS,
    IncompleteStoreError,
    StoreError,
    StrictStore,
    check_replaceable,
    checksummed,
    has_chunk_checksums,
    read_failure,
    zarr_store,
)

log = logging.getLogger(__name__)

CODE_SCHEMA_VERSION = 1
CODE_ATTRIBUTE = "autossvh_codes"
DEFAULT_CHUNK_ROWS = 1 << 16  # 512 KiB of 64-bit codes per chunk


class UnknownVideoError(StoreError):
    """A video id that the code store does not hold; the message names the id and the store."""


@dataclass
class CodeStoreInfo:
    """The group attributes that describe a code store. ``source`` is the URL of the feature store the codes
    were computed from and ``model`` the model's URI ("" when there is none, e.g. baseline codes);
    ``num_classes`` is None when no labels are stored."""

    nbits: int
    count: int
    dataset: str
    split: str
    source: str
    model: str
    num_classes: int | None
    chunk_rows: int
    complete: bool = False
    schema_version: int = CODE_SCHEMA_VERSION

    @property
    def nbytes(self) -> int:
        return self.nbits // 8

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], url: str) -> CodeStoreInfo:
        version = data.get("schema_version")
        if version != CODE_SCHEMA_VERSION:
            raise StoreError(f"{url}: code store schema version {version!r}, this code reads version "
                             f"{CODE_SCHEMA_VERSION}")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = names - set(data)
        if missing:
            raise StoreError(f"{url}: code store attributes lack {', '.join(sorted(missing))}")
        return cls(**{key: value for key, value in data.items() if key in names})


def create_code_store(
    url: str,
    nbits: int,
    num_videos: int,
    *,
    dataset: str,
    split: str,
    source: str,
    model: str,
    num_classes: int | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    storage_options: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> CodeStoreWriter:
    """Create an empty, incomplete code store for ``num_videos`` codes of ``nbits`` bits (with (N,
    ``num_classes``) labels when given) and return its writer.

    An incomplete code store already at ``url`` (a writer that never finished) is replaced. A complete code
    store is replaced only with ``overwrite``, and nothing else ever is."""
    if isinstance(nbits, bool) or nbits < 8 or nbits % 8:
        raise ValueError(f"nbits must be a positive multiple of 8, got {nbits}")
    for name, value in (("num_videos", num_videos), ("chunk_rows", chunk_rows)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"num_classes must be >= 1 or None (no labels), got {num_classes}")
    info = CodeStoreInfo(nbits=nbits, count=num_videos, dataset=dataset, split=split, source=source, model=model,
                         num_classes=num_classes, chunk_rows=chunk_rows)
    if overwrite:
        check_replaceable(url, storage_options, CODE_ATTRIBUTE)
    replace = overwrite or _holds_incomplete_code_store(url, storage_options)
    try:
        group = zarr.open_group(store=zarr_store(url, storage_options), mode="w" if replace else "w-",
                                zarr_format=3)
    except (zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError, FileExistsError) as err:
        raise StoreError(f"{url}: something that is not a code store is already there (pass overwrite to replace "
                         "it)") from err
    rows = min(chunk_rows, num_videos)
    group.create_array("codes", shape=(num_videos, info.nbytes), dtype="uint8", chunks=(rows, info.nbytes),
                       fill_value=0, **checksummed())
    group.create_array("video_ids", shape=(num_videos,), dtype=str, chunks=(rows,), **checksummed())
    if num_classes is not None:
        group.create_array("labels", shape=(num_videos, num_classes), dtype="uint8", chunks=(rows, num_classes),
                           fill_value=0, **checksummed())
    group.attrs[CODE_ATTRIBUTE] = info.to_dict()
    return CodeStoreWriter(url, info, storage_options)


def _holds_incomplete_code_store(url: str, storage_options: dict[str, Any] | None) -> bool:
    """Whether ``url`` holds a code store whose writer never marked it complete (safe to replace). A complete
    one raises StoreError."""
    try:
        group = zarr.open_group(store=zarr_store(url, storage_options, read_only=True), mode="r", zarr_format=3)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.ContainsArrayError):
        return False
    attrs = group.attrs.get(CODE_ATTRIBUTE)
    if attrs is None:
        return False
    if attrs.get("complete"):
        raise StoreError(f"{url}: a complete code store is already there (pass overwrite to replace it)")
    log.info("%s: replacing an incomplete code store", url)
    return True


class CodeStoreWriter:
    """Writes row ranges of an incomplete code store, then marks it complete. Holds only the URL, options and
    description (the group is opened per call), so it pickles to other processes, e.g. Ray workers."""

    def __init__(self, url: str, info: CodeStoreInfo, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url
        self.info = info
        self.storage_options = storage_options

    def _group(self) -> zarr.Group:
        return zarr.open_group(store=zarr_store(self.url, self.storage_options), mode="r+", zarr_format=3)

    def row_ranges(self, parts: int) -> list[range]:
        """Up to ``parts`` contiguous row ranges covering the store, cut on chunk boundaries so that
        concurrent writers never share a chunk (fewer than ``parts`` when there are fewer chunks)."""
        if parts < 1:
            raise ValueError(f"parts must be >= 1, got {parts}")
        rows = min(self.info.chunk_rows, self.info.count)
        chunks = -(-self.info.count // rows)
        per_part = -(-chunks // parts) * rows
        return [range(start, min(start + per_part, self.info.count))
                for start in range(0, self.info.count, per_part)]

    def write(self, start: int, codes: np.ndarray, video_ids: np.ndarray | list[str],
              labels: np.ndarray | None = None) -> None:
        """Write rows ``start:start + len(codes)``: packed codes (n, nbits / 8) uint8, non-empty video ids and,
        when the store has labels, (n, C) 0/1 labels. The ids are written last: a row with an id is whole."""
        codes = np.asarray(codes)
        if codes.dtype != np.uint8 or codes.ndim != 2 or codes.shape[1] != self.info.nbytes:
            raise ValueError(f"codes must be packed uint8 of shape (n, {self.info.nbytes}) for {self.info.nbits} "
                             f"bits, got {codes.dtype} {codes.shape}")
        ids = np.asarray(video_ids, dtype=object).astype(str)
        if ids.shape != (len(codes),):
            raise ValueError(f"expected {len(codes)} video ids (one per code), got shape {ids.shape}")
        if (ids == "").any():
            raise ValueError(f"video ids must be non-empty; row {start + int(np.flatnonzero(ids == '')[0])} is empty")
        if start < 0 or start + len(codes) > self.info.count:
            raise ValueError(f"rows {start}:{start + len(codes)} are outside the store's {self.info.count} rows")
        if (labels is None) != (self.info.num_classes is None):
            raise ValueError("the store has labels: pass them" if labels is None else
                             "the store was created without labels (num_classes=None)")
        if labels is not None:
            labels = np.asarray(labels)
            if labels.shape != (len(codes), self.info.num_classes) or not np.isin(labels, (0, 1)).all():
                raise ValueError(f"labels must be 0/1 of shape ({len(codes)}, {self.info.num_classes}), got "
                                 f"shape {labels.shape}")
        group = self._group()
        stop = start + len(codes)
        group["codes"][start:stop] = codes
        if labels is not None:
            group["labels"][start:stop] = labels.astype(np.uint8)
        group["video_ids"][start:stop] = ids
        log.debug("%s: wrote codes %d:%d", self.url, start, stop)

    def mark_complete(self) -> CodeStore:
        """Check that every row was written (has a video id) and that the ids are unique, mark the store complete
        and return it opened."""
        group = self._group()
        ids = np.asarray(group["video_ids"][:])
        empty = np.flatnonzero(ids == "")
        if len(empty):
            raise StoreError(f"{self.url}: {len(empty)} rows were never written (the first is row {empty[0]}); "
                             "write every row range before marking the store complete")
        unique, counts = np.unique(ids, return_counts=True)
        if len(unique) != len(ids):
            raise StoreError(f"{self.url}: video id {str(unique[np.argmax(counts)])!r} is stored "
                             f"{counts.max()} times; video ids must be unique")
        group.attrs[CODE_ATTRIBUTE] = {**dict(group.attrs[CODE_ATTRIBUTE]), "complete": True}
        log.info("%s: code store complete (%d codes of %d bits)", self.url, self.info.count, self.info.nbits)
        return open_code_store(self.url, self.storage_options)


class CodeStore:
    """An opened, complete code store; the arrays load whole into memory on first use."""

    def __init__(self, url: str, group: zarr.Group, info: CodeStoreInfo) -> None:
        self.url = url
        self.group = group
        self.info = info

    def __len__(self) -> int:
        return self.info.count

    def _read(self, name: str) -> np.ndarray:
        """The whole array ``name``; a damaged or missing chunk raises StoreError naming it."""
        try:
            return np.asarray(self.group[name][:])
        except READ_ERRORS as err:
            raise StoreError(f"{self.url}: cannot read its {name} ({read_failure(err)}): the code store is damaged; "
                             "re-run jobs/encode.py to write it again") from None

    @cached_property
    def codes(self) -> np.ndarray:
        """(N, nbits / 8) uint8 packed codes."""
        return self._read("codes").astype(np.uint8, copy=False)

    @cached_property
    def video_ids(self) -> np.ndarray:
        """(N,) video ids, as strings."""
        return self._read("video_ids")

    @cached_property
    def labels(self) -> np.ndarray | None:
        """(N, C) uint8 multi-hot labels, or None when the store has none."""
        return None if self.info.num_classes is None else self._read("labels").astype(np.uint8, copy=False)

    @cached_property
    def _rows(self) -> dict[str, int]:
        return {str(video_id): row for row, video_id in enumerate(self.video_ids)}

    def index_of(self, video_id: str) -> int:
        """The row of ``video_id``; :class:`UnknownVideoError` when the store does not hold it."""
        try:
            return self._rows[video_id]
        except KeyError:
            raise UnknownVideoError(f"video id {video_id!r} is not in the code store {self.url}") from None


def open_code_store(url: str, storage_options: dict[str, Any] | None = None) -> CodeStore:
    """Open and validate a complete code store; an incomplete one raises :class:`IncompleteStoreError`."""
    strict = StrictStore(zarr_store(url, storage_options, read_only=True), url)
    try:
        group = zarr.open_group(store=strict, mode="r", zarr_format=3)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.ContainsArrayError) as err:
        raise StoreError(f"{url}: no code store there") from err
    if CODE_ATTRIBUTE not in group.attrs:
        what = "a feature store" if FEATURE_ATTRIBUTE in group.attrs else "a Zarr group"
        raise StoreError(f"{url}: {what}, not a code store (no '{CODE_ATTRIBUTE}' attribute)")
    info = CodeStoreInfo.from_dict(dict(group.attrs[CODE_ATTRIBUTE]), url)
    if not info.complete:
        raise IncompleteStoreError(f"{url}: the code store is incomplete (its writer did not finish); re-run the "
                                   "job that writes it")
    expected = {"codes": (info.count, info.nbytes), "video_ids": (info.count,)}
    if info.num_classes is not None:
        expected["labels"] = (info.count, info.num_classes)
    for name, shape in expected.items():
        try:
            actual = group[name].shape
        except KeyError:
            raise StoreError(f"{url}: the code store lacks its '{name}' array") from None
        if actual != shape:
            raise StoreError(f"{url}: '{name}' has shape {actual}, the attributes say {shape}")
    # Ids are never empty, so their chunks are always written; the other arrays' all-zero chunks are written only
    # by code stores made since chunk checksums.
    strict.required |= {"video_ids", *(name for name in expected if has_chunk_checksums(group[name]))}
    return CodeStore(url, group, info)
