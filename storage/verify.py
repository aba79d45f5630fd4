"""Read every chunk of a feature store and report what is damaged, missing or not finite, by video id
(``jobs/verify.py``).

Every array of every stored split is read shard by shard (features) or chunk by chunk (labels, ids, frame
signal). A read that fails is narrowed to its inner chunks, so a report names the file and the videos of each bad
chunk: a checksum or codec error (damaged or truncated bytes) or a missing file (which zarr alone would read as
zeros). Readable features are checked for NaN and Inf video by video, labels for values other than 0/1 (and, in a
split that evaluation scores, for videos without any label or a split stored unlabelled), ids for repeats. A
missing array or a damaged ``zarr.json`` means no report (exit 2, naming it). Stores written before chunk
checksums are read the same way; in them a flipped bit inside a chunk can go unnoticed (only the shard index has a
checksum), which the report says: rewrite such a store with ``jobs/ingest.py ... --overwrite`` to add them.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from tqdm import tqdm

from storage.schema import stored_split, stored_splits
from storage.store import (
    FINITE_RECORD,
    READ_ERRORS,
    FeatureStore,
    MissingChunkError,
    PathError,
    StoreError,
    bad_label_rows,
    check_apart,
    duplicate_ids,
    nonfinite_rows,
    open_store,
    read_failure,
    unreadable_chunks,
)
from storage.writer import storage_options_from

log = logging.getLogger(__name__)

SHOWN_IDS = 20  # video ids listed per problem in the text report (the JSON report lists all)


@dataclass
class Problem:
    """One bad chunk, or the non-finite videos of one read: where, what, and which videos."""

    split: str
    array: str
    kind: str  # "damaged", "missing", "non-finite", "bad-label", "no-label", "unlabelled" or "duplicate"
    file: str
    start: int
    stop: int
    detail: str
    rows: list[int] = field(default_factory=list)  # the affected videos (row numbers)
    ids: list[str] = field(default_factory=list)  # their ids, where the ids are readable

    def line(self) -> str:
        ids = ", ".join(self.ids[:SHOWN_IDS]) + (f" and {len(self.ids) - SHOWN_IDS} more" if len(self.ids) >
                                                 SHOWN_IDS else "")
        videos = f"{len(self.rows)} video(s)" + (f": {ids}" if ids else "")
        return (f"{self.kind:<10} {self.split}/{self.array} {self.file} rows {self.start}:{self.stop}, {videos} "
                f"({self.detail})")


@dataclass
class VerifyReport:
    """What ``verify_store_chunks`` found in a store."""

    url: str
    chunk_checksums: bool
    written_finite: bool  # the writer recorded that it checked every video's features finite
    videos: dict[str, int]
    problems: list[Problem]

    @property
    def ok(self) -> bool:
        return not self.problems

    def text(self) -> str:
        lines = [f"{self.url}: {sum(self.videos.values())} videos in {len(self.videos)} split(s) "
                 f"({', '.join(f'{k} {v}' for k, v in self.videos.items())}), every chunk read"]
        if not self.written_finite:
            lines.append("  the writer of this store did not record a check of the features for NaN/Inf")
        if not self.chunk_checksums:
            lines.append("  this store was written without chunk checksums: bit flips inside a chunk cannot be "
                         "detected; rewrite it with jobs/ingest.py ... --overwrite to add them")
        lines += [f"  {p.line()}" for p in self.problems]
        lines.append("  no damaged, missing or non-finite video, bad label or repeated id" if self.ok else
                     f"  {len(self.problems)} problem(s); restore the files, or fix the source and re-write the "
                     "store with --overwrite")
        return "\n".join(lines)


def _file_of(array: zarr.Array, row: int) -> str:
    """The chunk or shard file (relative to the store) holding row ``row`` of ``array``."""
    outer = array.metadata.chunk_grid.chunk_shape[0]
    return f"{array.path}/" + array.metadata.encode_chunk_key((row // outer,) + (0,) * (array.ndim - 1))


def _ids(ids: np.ndarray | None, rows: list[int]) -> list[str]:
    return [] if ids is None else [str(ids[r]) for r in rows]


def _check_array(store: FeatureStore, split: str, name: str, ids: np.ndarray | None, bar: tqdm) -> list[Problem]:
    """Read ``split/name`` in whole outer chunks (shards); narrow every failed read to its bad inner chunks; check
    the features for NaN/Inf."""
    array = store.group[split][name]
    step = array.metadata.chunk_grid.chunk_shape[0]
    problems = []
    for start in range(0, array.shape[0], step):
        stop = min(start + step, array.shape[0])
        try:
            data = np.asarray(array[start:stop])
        except READ_ERRORS:
            for lo, hi, err in unreadable_chunks(array, start, stop):
                kind, file = ("missing" if isinstance(err, MissingChunkError) else "damaged"), _file_of(array, lo)
                rows = list(range(lo, hi))
                last = problems[-1] if problems else None
                if last is not None and (last.kind, last.file, last.stop) == (kind, file, lo):  # one line per run
                    last.stop, last.rows, last.ids = hi, last.rows + rows, last.ids + _ids(ids, rows)
                    continue
                problems.append(Problem(split, name, kind, file, lo, hi, read_failure(err), rows,
                                        _ids(ids, rows)))
            data = None
        if name == "feats" and data is not None:
            rows = (start + nonfinite_rows(data)).tolist()
            if rows:
                problems.append(Problem(split, name, "non-finite", _file_of(array, start), start, stop,
                                        "NaN or Inf features", rows, _ids(ids, rows)))
        if name == "feats":
            bar.update(stop - start)
    return problems


def _read_ids(store: FeatureStore, split: str) -> tuple[np.ndarray | None, list[Problem]]:
    """The split's video ids, or None (with the problems found) when some of them cannot be read."""
    array = store.group[split]["video_ids"]
    try:
        return np.asarray(array[:]), []
    except READ_ERRORS:
        return None, _check_array(store, split, "video_ids", None, tqdm(disable=True))


def _check_labels(store: FeatureStore, split: str, ids: np.ndarray | None) -> list[Problem]:
    """Videos whose labels hold a value other than 0 and 1, one problem per chunk; in a split that evaluation
    reads (its queries or database), videos without any label, or the whole split when it was stored unlabelled."""
    array = store.group[split]["labels"]
    evaluated = split in {stored_split(store.info.protocol, role) for role in ("query", "database")}
    if not store.is_labelled(split):
        if not evaluated:
            return []
        rows = list(range(array.shape[0]))
        return [Problem(split, "labels", "unlabelled", f"{split}/labels", 0, array.shape[0],
                        "stored without labels, but evaluation needs them (the protocol's query or database split)",
                        rows, _ids(ids, rows))]
    problems = []
    step = array.metadata.chunk_grid.chunk_shape[0]
    for start in range(0, array.shape[0], step):
        stop = min(start + step, array.shape[0])
        try:
            block = np.asarray(array[start:stop])
        except READ_ERRORS:
            continue  # reported as damaged or missing by _check_array
        bad = (start + bad_label_rows(block)).tolist()
        if bad:
            values = sorted(set(np.asarray(block[np.asarray(bad) - start]).ravel().tolist()) - {0, 1})
            problems.append(Problem(split, "labels", "bad-label", _file_of(array, start), start, stop,
                                    f"label values {values}: labels are 0/1 over the store's "
                                    f"{store.info.num_classes} classes", bad, _ids(ids, bad)))
        empty = (start + np.flatnonzero(~block.any(axis=1))).tolist() if evaluated else []
        if empty:
            problems.append(Problem(split, "labels", "no-label", _file_of(array, start), start, stop,
                                    "no class set: never relevant in evaluation", empty, _ids(ids, empty)))
    return problems


def _check_ids(split: str, ids: np.ndarray | None) -> list[Problem]:
    """One problem per video id that occurs more than once in the split."""
    if ids is None:
        return []
    return [Problem(split, "video_ids", "duplicate", f"{split}/video_ids", rows[0], rows[-1] + 1,
                    f"id {video!r} at rows {', '.join(map(str, rows))}; ids must be unique", rows, [video] * len(rows))
            for video, rows in duplicate_ids(ids).items()]


def verify_store_chunks(url: str, storage_options: dict[str, Any] | None = None) -> VerifyReport:
    """Read every chunk of the store at ``url``; raises StoreError when it cannot be opened at all (its metadata,
    or an array of a split, missing or damaged)."""
    store = open_store(url, storage_options)
    required = store.required_arrays()
    problems: list[Problem] = []
    videos = {split: store.info.counts[split] for split in stored_splits(store.info.protocol)}
    for split in videos:
        store.split(split)  # every array there, of the shape the attributes say
    with tqdm(total=sum(videos.values()), unit="video", desc="verify", file=sys.stderr, disable=None) as bar:
        for split in videos:
            ids, id_problems = _read_ids(store, split)
            problems += id_problems + _check_ids(split, ids)
            for name in ("feats", "labels", "frame_signal"):
                if name in store.group[split] and (name != "labels" or f"{split}/labels" in required):
                    problems += _check_array(store, split, name, ids, bar)
            problems += _check_labels(store, split, ids)
    return VerifyReport(url, store.has_chunk_checksums, bool(store.info.sources.get(FINITE_RECORD)), videos, problems)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", help="feature store URL: a path, file://, s3://, gs://")
    parser.add_argument("--storage-option", dest="storage_options", action="append", default=[],
                        metavar="KEY=VALUE", help="fsspec storage option, repeatable")
    parser.add_argument("--json", type=Path, help="also write the report here (every affected video id)")


def main(args: argparse.Namespace) -> int:
    """Exit status 0: every chunk readable and finite, labels 0/1, ids unique; 1: problems found (listed); 2: no
    readable store there (or --json inside it)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        check_apart({"--json": args.json}, {"the store": args.store})
        report = verify_store_chunks(args.store, storage_options_from(args.storage_options))
    except (StoreError, PathError) as err:
        log.error("%s", err)
        return 2
    print(report.text())
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(asdict(report), indent=2))
    return 0 if report.ok else 1
