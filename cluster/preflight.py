"""Checks the driver runs before Ray starts: bad input fails in seconds with an error naming the key, split or file.

Each check raises a ``ValueError`` subclass (:class:`PreflightError` for a config that cannot train on this store
or a destination that cannot be written, :class:`~storage.store.StoreError` for a damaged or inconsistent store),
which the training entry turns into exit status 2 before anything is started or written. What is already refused
elsewhere: an incomplete or missing store and an empty split (``storage.store.open_store``), ``model.nbits`` not
a multiple of 8, non-finite numbers and other bad values (``autossvh.config``), NaN/Inf features (the store
writer, while ingesting or generating; every reader, where they were written past it), damage inside a chunk
(its checksum, where it is read).
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from autossvh.config import Config, load_yaml, parse_overrides
from autossvh.metrics import DEFAULT_KS
from storage.reader import videos_per_rank
from storage.schema import stored_split
from storage.store import READ_ERRORS, FeatureStore, StoreError, StoreInfo, verify_shards

SHAPE_KEYS = ("data.feature_size", "data.max_frames")
LABEL_BLOCK_ROWS = 1 << 16  # rows of labels read at a time when looking for videos without a label


class PreflightError(ValueError):
    """A configuration that cannot train on the given store; the message names the key and the store."""


def requested_data_shape(args: argparse.Namespace) -> dict[str, Any]:
    """The ``data.feature_size`` / ``data.max_frames`` the user set explicitly (``--config`` file, then ``--set``),
    to compare with the store before the store's values are put into the config."""
    requested: dict[str, Any] = {}
    if getattr(args, "config", None) is not None:
        requested.update(load_yaml(args.config))
    requested.update(parse_overrides(getattr(args, "overrides", []) or []))
    return {key: requested[key] for key in SHAPE_KEYS if key in requested}


def check_store_shape(requested: Mapping[str, Any] | Config, info: StoreInfo, url: str) -> None:
    """Refuse a frame count or feature size (explicit keys, or a whole config) that differs from the store's."""
    if isinstance(requested, Config):
        requested = {"data.feature_size": requested.data.feature_size, "data.max_frames": requested.data.max_frames}
    held = {"data.feature_size": (info.feature_dim, f"features of F={info.feature_dim} dims per frame"),
            "data.max_frames": (info.max_frames, f"T={info.max_frames} frames per video")}
    for key, (value, what) in held.items():
        if key in requested and requested[key] != value:
            raise PreflightError(f"{key}={requested[key]} from the config, but the store {url} holds {what}; drop "
                                 f"the setting (the store's value is used) or point --data at a store with "
                                 f"{key.split('.')[1]} {requested[key]}")


def check_training_inputs(cfg: Config, store: FeatureStore, world_size: int) -> None:
    """Everything a training run on ``store`` with ``world_size`` workers needs, checked up front (driver side).

    Config against store (frames, feature size, batch per worker, clusters), then each stored split's arrays
    (shapes, every shard file present), then the labels evaluation reads (present, one row per video, no
    video without a label).
    """
    if world_size < 1:
        raise PreflightError(f"workers: {world_size}; need at least 1")
    check_store_shape(cfg, store.info, store.url)
    check_batch_size(cfg, store, world_size)
    check_num_clusters(cfg, store)
    check_evaluation_inputs(store)


def check_evaluation_inputs(store: FeatureStore) -> None:
    """What evaluating on ``store`` needs: every shard file of every stored split present with an intact index,
    a database at least as large as the largest K of mAP@K, and a label for every query and database video."""
    for split in dict.fromkeys(stored_split(store.info.protocol, s) for s in ("train", "query", "database")):
        verify_shards(store, split)
    check_database_size(store)
    check_eval_labels(store)


def check_database_size(store: FeatureStore) -> None:
    """The published protocol ranks the top K in {5, ..., 100} of the database: refuse a smaller database."""
    n, k = store.num_videos("database"), max(DEFAULT_KS)
    if n < k:
        stored = stored_split(store.info.protocol, "database")
        raise StoreError(f"{store.url}: the database (split {stored!r}) holds {n} videos, but the protocol's mAP@K "
                         f"needs at least K = {k}; add videos to the database split")


def check_run_name(name: str) -> None:
    """A run name is one folder inside --storage: no path separators, no '..', not absolute, not empty."""
    if name in ("", ".") or ".." in name or "/" in name or "\\" in name or name.startswith("~"):
        raise PreflightError(f"--name {name!r}: a run name is one folder name inside --storage: use letters, digits, "
                             "'-', '_' and '.', without '/', '\\', '..' or a leading '~'")


def check_writable_folder(path: str | Path, what: str) -> None:
    """That the local folder ``path`` can be written, or created where it is missing: a file is written (then
    deleted) in it or in its nearest existing parent; nothing is left behind."""
    folder = Path(path).absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise PreflightError(f"{what} {folder}: {existing} is a file, not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".write-check-"):
            pass
    except OSError as err:
        raise PreflightError(f"{what} {folder}: cannot write in {existing} ({err.strerror or err})") from None


def check_destinations(storage: str, name: str, mlflow_uri: str, artifacts: str) -> None:
    """Where a run writes, checked before Ray starts: its name stays inside ``storage``; ``storage``, the MLflow
    SQLite file's folder and the artifact folder (the local ones) can be written."""
    check_run_name(name)
    if "://" not in storage:
        check_writable_folder(storage, "--storage")
    if mlflow_uri.startswith("sqlite:///"):
        check_writable_folder(Path(mlflow_uri.removeprefix("sqlite:///")).parent, "--mlflow-uri: the SQLite folder")
    if artifacts.startswith("file://"):
        check_writable_folder(artifacts.removeprefix("file://"), "--mlflow-artifacts")


def per_rank_batch_size(batch_size: int, world_size: int) -> int:
    """Videos per worker and step, as ``cluster.train`` computes it (at least 2: the contrastive loss)."""
    return max(batch_size // world_size, 2)


def check_batch_size(cfg: Config, store: FeatureStore, world_size: int) -> None:
    """Refuse a batch that no worker can fill: with ``drop_last`` an epoch would take no step at all."""
    n = store.num_videos("train")
    per_rank_videos = videos_per_rank(n, world_size)
    batch = per_rank_batch_size(cfg.train.batch_size, world_size)
    if batch > per_rank_videos:
        raise PreflightError(
            f"train.batch_size={cfg.train.batch_size}: {batch} videos per worker and step over {world_size} "
            f"worker(s), but the train split of {store.url} has {n} videos ({per_rank_videos} per worker), so no "
            f"worker fills one batch and an epoch would take no step; use train.batch_size <= "
            f"{per_rank_videos * world_size} (and >= 2 per worker) or fewer workers")


def check_num_clusters(cfg: Config, store: FeatureStore) -> None:
    """Refuse more k-means clusters than training videos when clustering will run (P2Set on, warm-up reached)."""
    if not cfg.loss.p2set or cfg.cluster.warmup_epoch >= cfg.train.num_epochs:
        return
    n = store.num_videos("train")
    too_many = [k for k in cfg.cluster.num_cluster if k > n]
    if too_many:
        raise PreflightError(
            f"cluster.num_cluster={cfg.cluster.num_cluster}: {max(too_many)} clusters but the train split of "
            f"{store.url} has {n} videos; use at most {n} clusters per granularity (or loss.p2set=false)")


def check_eval_labels(store: FeatureStore) -> None:
    """The query and database splits (as the protocol stores them) must be labelled, with a label for every
    video: a query without one has AP 0 and a database video without one is never relevant. An unlabelled train
    split is fine unless the protocol evaluates on it (``database_is_train``)."""
    roles = {stored_split(store.info.protocol, role): role for role in ("database", "query")}
    for stored, role in roles.items():
        as_role = f"{role} split ({stored!r})" if stored != role else f"{role} split"
        if not store.is_labelled(role):
            raise StoreError(f"{store.url}: the {as_role} was stored without labels (sources.labelled), but "
                             f"evaluation needs the {role} labels; re-ingest it with its label file")
        labels = store.split(role).labels
        unlabelled, first = 0, -1
        for start in range(0, labels.shape[0], LABEL_BLOCK_ROWS):
            stop = min(start + LABEL_BLOCK_ROWS, labels.shape[0])
            try:
                block = np.asarray(labels[start:stop])
            except READ_ERRORS as err:
                raise store.read_error(role, "labels", start, stop, err) from err
            empty = ~block.any(axis=1)
            if first < 0 and empty.any():
                first = start + int(np.flatnonzero(empty)[0])
            unlabelled += int(empty.sum())
        if unlabelled:
            video = str(store.split(role).video_ids[first])
            raise StoreError(f"{store.url}: {unlabelled} of {labels.shape[0]} videos of the {as_role} have no label "
                             f"(all-zero label rows; the first is video {first}, id {video!r}), so they can never be "
                             "relevant in evaluation; fix the label file and re-ingest")
