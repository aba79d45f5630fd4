"""Ingest the released feature files (or any h5/npy arrays) into a feature store.

The authors' released files are read under their released names from one folder:

=============  ==========================  =============================  ==============================
dataset        train (unlabelled: zeros)    query                          database
=============  ==========================  =============================  ==============================
fcvid          fcv_train_feats.h5 (no       = database                     fcv_test_feats.h5 +
               labels)                                                     fcv_test_labels.mat:labels
activitynet    train_feats.h5 (no labels)  query_feats.h5 + q_label.mat    test_feats.h5 + re_label.mat
ucf101         ucf_train_feats.h5 +        ucf_test_feats.h5 +            = train
               ucf_train_labels.mat        ucf_test_labels.mat
hmdb51         hmdb_ ... likewise          hmdb_ ...                      = train
=============  ==========================  =============================  ==============================

Features are ``feats`` (N, T, F) in HDF5; ``custom`` also takes ``.npy`` (memory-mapped). Labels are ``.mat``
v5 (scipy) or v7.3 (HDF5, whose arrays MATLAB stores transposed: an N x C matrix is an HDF5 (C, N) dataset),
or ``.npy``. Everything cheap is validated before the store is created (files, keys, ranks, frames, feature
dims, label shapes and values); NaN/Inf is found block by block while streaming, which leaves the store
incomplete. Writing, resume, progress and verification are :mod:`storage.writer`'s.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import scipy.io
import scipy.sparse

from storage.schema import DATASET_PROTOCOLS, PROTOCOLS, SPLITS, Protocol, stored_splits
from storage.store import FeatureStore, check_apart, not_a_regular_file
from storage.synthetic import SHAPES
from storage.writer import (
    Block,
    SourceError,
    SplitSource,
    add_store_arguments,
    run_job,
    storage_options_from,
    store_info,
    write_store,
)

log = logging.getLogger(__name__)

FEATS_KEY = "feats"
LABELS_KEY = "labels"
CUSTOM = "custom"


@dataclass(frozen=True)
class ArraySpec:
    """One array in a file: an HDF5 dataset or .mat variable by key (ignored for .npy)."""

    path: Path
    key: str

    @classmethod
    def parse(cls, text: str, default_key: str) -> ArraySpec:
        """``FILE`` or ``FILE:KEY``; a colon in the name of an existing file is part of the name."""
        head, sep, key = text.rpartition(":")
        if sep and head and key and not Path(text).exists():
            return cls(Path(head), key)
        return cls(Path(text), default_key)

    def __str__(self) -> str:
        return str(self.path) if self.path.suffix == ".npy" else f"{self.path}:{self.key}"


@dataclass(frozen=True)
class SplitFiles:
    """The features of one stored split and its labels (None: unlabelled, stored as zeros)."""

    feats: ArraySpec
    labels: ArraySpec | None = None


_RELEASED: dict[str, dict[str, tuple[str, tuple[str, str] | None]]] = {
    "fcvid": {"train": ("fcv_train_feats.h5", None),
              "database": ("fcv_test_feats.h5", ("fcv_test_labels.mat", "labels"))},
    "activitynet": {"train": ("train_feats.h5", None), "query": ("query_feats.h5", ("q_label.mat", "q_label")),
                    "database": ("test_feats.h5", ("re_label.mat", "re_label"))},
    "ucf101": {"train": ("ucf_train_feats.h5", ("ucf_train_labels.mat", "labels")),
               "query": ("ucf_test_feats.h5", ("ucf_test_labels.mat", "labels"))},
    "hmdb51": {"train": ("hmdb_train_feats.h5", ("hmdb_train_labels.mat", "labels")),
               "query": ("hmdb_test_feats.h5", ("hmdb_test_labels.mat", "labels"))},
}


def released_files(dataset: str, source: Path) -> dict[str, SplitFiles]:
    """The released files of ``dataset`` in folder ``source``, per stored split."""
    if dataset not in _RELEASED:
        raise SourceError(f"unknown dataset {dataset!r}; expected one of {', '.join(_RELEASED)}")
    return {split: SplitFiles(ArraySpec(source / feats, FEATS_KEY),
                              None if labels is None else ArraySpec(source / labels[0], labels[1]))
            for split, (feats, labels) in _RELEASED[dataset].items()}


def ingest(
    url: str,
    dataset: str,
    files: Mapping[str, SplitFiles],
    *,
    protocol: Protocol | None = None,
    dtype: str = "float16",
    storage_options: dict[str, Any] | None = None,
    block_videos: int | None = None,
    chunk_videos: int | None = None,
    shard_videos: int | None = None,
    overwrite: bool = False,
    verify: bool = False,
) -> FeatureStore:
    """Validate ``files`` and write (or resume, or verify) the store at ``url``; returns it opened, complete.

    ``dataset`` is one of the released datasets (its protocol and frame count are checked) or ``custom``, which
    needs ``protocol`` and takes any frame count that all splits share. Sources are hashed once (sha256,
    ~1 s/GB) and recorded with their sizes in the store's ``sources`` attribute.
    """
    protocol = _protocol(dataset, protocol)
    check_apart({"--out": url}, {f"the {split} {part}": spec.path for split, f in files.items()
                                 for part, spec in (("features", f.feats), ("labels", f.labels)) if spec is not None})
    with contextlib.ExitStack() as stack:
        splits, info_args, sources, params = _plan(dataset, protocol, files, stack)
        info = store_info(dataset, protocol, dtype=dtype, chunk_videos=chunk_videos, shard_videos=shard_videos,
                          **info_args)
        paths = {f.feats.path.resolve() for f in files.values()}
        paths |= {f.labels.path.resolve() for f in files.values() if f.labels is not None}
        return write_store(url, info, splits, params, sources, storage_options=storage_options,
                           block_videos=block_videos, checksum_files=sorted(paths),
                           overwrite=overwrite, verify=verify)


def load_labels(spec: ArraySpec) -> np.ndarray:
    """A 0/1 (N, C) label matrix as uint8 from .mat (v5 or v7.3) or .npy; SourceError names what is wrong."""
    path = spec.path
    problem = not_a_regular_file(path)
    if problem:
        raise SourceError(f"{path}: {problem}")
    try:
        if path.suffix == ".npy":
            labels = np.load(path, allow_pickle=False)
        elif h5py.is_hdf5(path):
            labels = _read_mat73(spec)
        else:
            labels = _read_mat5(spec)
    except SourceError:
        raise
    except (OSError, ValueError, NotImplementedError, TypeError) as err:
        raise SourceError(f"{spec}: cannot read labels ({err})") from err
    if scipy.sparse.issparse(labels):
        labels = labels.toarray()
    if labels.ndim != 2:
        raise SourceError(f"{spec}: labels must be a 2-D (videos, classes) matrix, got shape {labels.shape}")
    if labels.dtype.kind not in "biuf":
        raise SourceError(f"{spec}: labels have dtype {labels.dtype}, expected a numeric 0/1 matrix")
    ok = (labels == 0) | (labels == 1)
    if not ok.all():
        row, col = np.argwhere(~ok)[0]
        raise SourceError(f"{spec}: labels must be 0/1; row {row} column {col} holds {labels[row, col]}")
    return labels.astype(np.uint8)


def _read_mat5(spec: ArraySpec) -> np.ndarray:
    names = [name for name, _, _ in scipy.io.whosmat(spec.path)]
    if spec.key not in names:
        raise SourceError(f"{spec.path}: no variable {spec.key!r} (it holds: {', '.join(names) or 'nothing'})")
    return scipy.io.loadmat(spec.path, variable_names=[spec.key])[spec.key]


def _read_mat73(spec: ArraySpec) -> np.ndarray:
    """A v7.3 variable: MATLAB writes column-major, so the HDF5 dataset has the axes reversed."""
    with h5py.File(spec.path, "r") as f:
        names = [k for k in f if not k.startswith("#")]
        if spec.key not in names:
            raise SourceError(f"{spec.path}: no variable {spec.key!r} (it holds: {', '.join(names) or 'nothing'})")
        item = f[spec.key]
        if not isinstance(item, h5py.Dataset):
            raise SourceError(f"{spec}: not a dense matrix (a sparse or struct variable)")
        return item[()].T


class _Features:
    """An open (N, T, F) feature array: an HDF5 dataset or a memory-mapped .npy."""

    def __init__(self, spec: ArraySpec, stack: contextlib.ExitStack) -> None:
        self.spec = spec
        problem = not_a_regular_file(spec.path)
        if problem:
            raise SourceError(f"{spec.path}: {problem}")
        try:
            if spec.path.suffix == ".npy":
                self.array: Any = np.load(spec.path, mmap_mode="r", allow_pickle=False)
            else:
                f = stack.enter_context(h5py.File(spec.path, "r"))
                if spec.key not in f:
                    raise SourceError(f"{spec.path}: no dataset {spec.key!r} (it holds: {', '.join(f) or 'nothing'})")
                self.array = f[spec.key]
                if not isinstance(self.array, h5py.Dataset):
                    raise SourceError(f"{spec}: a group, not a dataset")
        except SourceError:
            raise
        except (OSError, ValueError) as err:
            raise SourceError(f"{spec.path}: cannot read ({err})") from err
        if self.array.ndim != 3:
            raise SourceError(f"{spec}: shape {self.array.shape} has rank {self.array.ndim}, expected "
                              "(videos, frames, features)")
        if self.array.dtype.kind != "f":
            raise SourceError(f"{spec}: dtype {self.array.dtype}, expected floating-point features")
        if self.array.shape[0] == 0:
            raise SourceError(f"{spec}: no videos (an empty split)")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)

    def read(self, start: int, stop: int) -> np.ndarray:
        try:
            return np.asarray(self.array[start:stop])
        except OSError as err:
            raise SourceError(f"{self.spec}: cannot read videos {start}:{stop} ({err})") from err


def _protocol(dataset: str, protocol: Protocol | None) -> Protocol:
    if dataset == CUSTOM:
        if protocol not in PROTOCOLS:
            raise SourceError(f"a custom dataset needs a protocol, one of {', '.join(PROTOCOLS)}; got {protocol!r}")
        return protocol
    if dataset not in DATASET_PROTOCOLS:
        raise SourceError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASET_PROTOCOLS)} or custom")
    if protocol not in (None, DATASET_PROTOCOLS[dataset]):
        raise SourceError(f"{dataset} uses protocol {DATASET_PROTOCOLS[dataset]}, not {protocol}")
    return DATASET_PROTOCOLS[dataset]


def _plan(dataset: str, protocol: Protocol, files: Mapping[str, SplitFiles], stack: contextlib.ExitStack
          ) -> tuple[list[SplitSource], dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Open and validate every source; returns the split sources, the store's shape, its ``sources`` attribute
    and the fingerprint params."""
    wanted = stored_splits(protocol)
    extra = set(files) - set(wanted)
    if extra:
        raise SourceError(f"protocol {protocol} stores the splits {', '.join(wanted)}; got files for "
                          f"{', '.join(sorted(extra))} too (an aliased split is not stored twice)")
    missing = [s for s in wanted if s not in files]
    if missing:
        raise SourceError(f"protocol {protocol} needs files for the splits {', '.join(missing)}")
    frames = SHAPES[dataset].max_frames if dataset in SHAPES else None
    feats: dict[str, _Features] = {}
    labels: dict[str, np.ndarray | None] = {}
    first: _Features | None = None
    for split in wanted:
        spec = files[split]
        f = feats[split] = _Features(spec.feats, stack)
        n, t, dim = f.shape
        if frames is not None and t != frames:
            raise SourceError(f"{spec.feats}: {t} frames per video, {dataset} has {frames}")
        if first is not None and t != first.shape[1]:
            raise SourceError(f"{spec.feats}: {t} frames per video, {first.spec} has {first.shape[1]}")
        if first is not None and dim != first.shape[2]:
            raise SourceError(f"{spec.feats}: feature dim {dim} differs from {first.spec}'s {first.shape[2]}")
        first = first or f
        if spec.labels is None:
            if split != "train" or protocol == "database_is_train":
                raise SourceError(f"split {split!r} ({spec.feats}) has no labels; the query and database splits "
                                  "need labels for evaluation")
            labels[split] = None
            continue
        lab = labels[split] = load_labels(spec.labels)
        if lab.shape[0] != n:
            raise SourceError(f"{spec.labels}: {lab.shape[0]} label rows, but {spec.feats} has {n} videos")
    classes = {split: lab.shape[1] for split, lab in labels.items() if lab is not None}
    if len(set(classes.values())) > 1:
        raise SourceError("label files disagree on the number of classes: " + ", ".join(
            f"{files[s].labels} has {c}" for s, c in classes.items()))
    assert first is not None
    splits = [_split_source(split, feats[split], labels[split]) for split in wanted]
    info_args = {"max_frames": first.shape[1], "feature_dim": first.shape[2],
                 "num_classes": next(iter(classes.values())), "counts": {s: feats[s].shape[0] for s in wanted}}
    described = {split: {"feats": {"path": str(files[split].feats.path.resolve()), "key": files[split].feats.key,
                                   "shape": list(feats[split].shape), "dtype": str(feats[split].array.dtype)},
                         "labels": None if files[split].labels is None else {
                             "path": str(files[split].labels.path.resolve()), "key": files[split].labels.key,
                             "shape": list(labels[split].shape)}}
                 for split in wanted}
    labelled = {split: labels[split] is not None for split in wanted}
    sources = {"kind": "custom" if dataset == CUSTOM else "released", "dataset": dataset, "splits": described,
               "labelled": labelled, "train_labelled": labelled["train"]}
    params = {"dataset": dataset, "splits": {split: {part: _identity(spec) for part, spec in
                                                    (("feats", f.feats), ("labels", f.labels))}
                                             for split, f in files.items()}}
    return splits, info_args, sources, params


def _identity(spec: ArraySpec | None) -> dict[str, Any] | None:
    """What identifies a source for resuming: resolved path, key, size and modification time."""
    if spec is None:
        return None
    stat = spec.path.stat()
    return {"path": str(spec.path.resolve()), "key": spec.key, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _split_source(split: str, feats: _Features, labels: np.ndarray | None) -> SplitSource:
    def read(start: int, stop: int) -> Block:
        return Block(feats.read(start, stop), None if labels is None else labels[start:stop],
                     video_ids(split, start, stop))

    return SplitSource(split, feats.shape[0], str(feats.spec), read)


def video_ids(split: str, start: int, stop: int) -> np.ndarray:
    """Ids such as ``train_000123``: the split and the row of the released file (which has no ids)."""
    return np.array([f"{split}_{i:06d}" for i in range(start, stop)], dtype=np.str_)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, choices=[*DATASET_PROTOCOLS, CUSTOM],
                        help="a released dataset read from --source under its released file names, or custom "
                        "(--train/--query/--database files and --protocol)")
    parser.add_argument("--source", type=Path, help="folder of the released files (not for custom)")
    parser.add_argument("--protocol", choices=PROTOCOLS, help="custom only: which splits are stored")
    for split in SPLITS:
        parser.add_argument(f"--{split}", metavar="FEATS[:KEY]",
                            help=f"custom only: {split} features, .h5 (default key {FEATS_KEY}) or .npy")
        parser.add_argument(f"--{split}-labels", metavar="LABELS[:KEY]",
                            help=f"custom only: {split} labels, .mat v5/v7.3 (default key {LABELS_KEY}) or .npy")
    add_store_arguments(parser)
    parser.add_argument("--verify", action="store_true",
                        help="re-read the store and compare it with the sources (also on a complete store)")


def main(args: argparse.Namespace) -> int:
    """The ``jobs/ingest.py`` job; exit status 2 on bad input or a store error."""
    return run_job(lambda: ingest(
        args.out, args.dataset, _files_from(args), protocol=args.protocol, dtype=args.dtype,
        storage_options=storage_options_from(args.storage_options), block_videos=args.block_videos,
        chunk_videos=args.chunk_videos, shard_videos=args.shard_videos, overwrite=args.overwrite,
        verify=args.verify))


def _files_from(args: argparse.Namespace) -> dict[str, SplitFiles]:
    given = {split: (getattr(args, split), getattr(args, f"{split}_labels")) for split in SPLITS}
    if args.dataset != CUSTOM:
        if args.source is None or any(f or lab for f, lab in given.values()):
            raise SourceError(f"--dataset {args.dataset} reads the released files from --source DIR "
                              "(--train/--query/--database are for custom)")
        return released_files(args.dataset, args.source)
    if args.source is not None:
        raise SourceError("--dataset custom takes --train/--query/--database files, not --source")
    files = {}
    for split, (feats, lab) in given.items():
        if feats is None and lab is not None:
            raise SourceError(f"--{split}-labels given without --{split}")
        if feats is not None:
            files[split] = SplitFiles(ArraySpec.parse(feats, FEATS_KEY),
                                      None if lab is None else ArraySpec.parse(lab, LABELS_KEY))
    return files
