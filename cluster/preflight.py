"""Checks the driver runs before Ray starts: bad input fails in seconds with an error naming the key, split or file.

Each check raises a ``ValueError`` subclass (:class:`PreflightError` for a config that cannot train on this store
or a destination that cannot be written, :class:`~storage.store.StoreError` for a damaged or inconsistent store),
which the training entry turns into exit status 2 before anything is started or written. Besides the config and
the store: what the options name, point at or request (:func:`check_run_options`, :func:`check_evaluation_options`):
names by ``NAME_RULE``, tracking URIs (``TRACKING_SCHEMES``; a SQLite path that is a folder or not SQLite), every
output's destination (also checked by ``cluster.cli.JobParser`` as the options are parsed), ``--device``, worker
and resource counts, and on resume that the checkpoint's MLflow run is in the given store. What is already refused
elsewhere: an incomplete or missing store and an empty split (``storage.store.open_store``), ``model.nbits`` not
a multiple of 8, non-finite numbers and other bad values (``autossvh.config``), NaN/Inf features (the store
writer, while ingesting or generating; every reader, where they were written past it), damage inside a chunk
(its checksum, where it is read).
"""

from __future__ import annotations

import argparse
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from autossvh.config import Config, load_yaml, parse_overrides
from autossvh.metrics import DEFAULT_KS
from storage.reader import videos_per_rank
from storage.schema import stored_split
from storage.store import FeatureStore, StoreError, StoreInfo, verify_shards
from storage.validation import validation_holdout

SHAPE_KEYS = ("data.feature_size", "data.max_frames")
# Names a user gives (--name, --register; --experiment also with '/'): the documented rule.
MAX_NAME_LENGTH = 100
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
EXPERIMENT_NAME = re.compile(r"[A-Za-z0-9/][A-Za-z0-9._/-]*")
NAME_RULE = (f"use 1 to {MAX_NAME_LENGTH} characters: letters, digits, '.', '_' and '-', starting with a letter or "
             "digit, without '..'")
EXPERIMENT_RULE = (f"use 1 to {MAX_NAME_LENGTH} characters: letters, digits, '.', '_', '-' and '/', starting with a "
                   "letter, digit or '/', without '..'")
# MLflow tracking URI schemes a job accepts (a "+driver" suffix allowed, e.g. postgresql+psycopg2), and "databricks".
TRACKING_SCHEMES = ("sqlite", "file", "http", "https", "postgresql", "mysql", "mssql", "databricks")
SQLITE_HEADER = b"SQLite format 3\x00"
VAL_MAP_K = 5  # --selection best-val-map5: mAP@5 of the held-out videos, each ranked against the others
MIN_VAL_VIDEOS = VAL_MAP_K + 1


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


def check_training_inputs(cfg: Config, store: FeatureStore, world_size: int, val_videos: int = 0) -> None:
    """Everything a training run on ``store`` with ``world_size`` workers and ``val_videos`` training videos held
    out (``--val-videos``) needs, checked up front (driver side).

    Config against store (frames, feature size, the held-out videos, batch per worker, clusters), then each stored
    split's arrays (shapes, every shard file present), then the labels evaluation reads (present, one row per
    video, no video without a label).
    """
    if world_size < 1:
        raise PreflightError(f"workers: {world_size}; need at least 1")
    check_store_shape(cfg, store.info, store.url)
    check_validation_split(store, val_videos)
    check_batch_size(cfg, store, world_size, val_videos)
    check_num_clusters(cfg, store, val_videos)
    check_evaluation_inputs(store)


def check_validation_split(store: FeatureStore, val_videos: int) -> None:
    """``--val-videos``: fewer videos than the train split holds, from a labelled train split, and not all of
    one label (the mAP among them would be 1 whatever the codes). Reads the held-out videos' labels only."""
    if not val_videos:
        return
    n = store.num_videos("train")
    if val_videos >= n:
        raise PreflightError(f"--val-videos {val_videos}: the train split of {store.url} has {n} videos; hold out "
                             "fewer, so that some are left to train on")
    if not store.is_labelled("train"):
        raise PreflightError(f"--val-videos {val_videos}: the train split of {store.url} was stored without labels, "
                             "so held-out videos cannot be scored; drop --val-videos (--selection knn-agreement "
                             "selects without labels)")
    rows = validation_holdout(n, store.info.chunk_videos, val_videos).rows
    labels = np.asarray(store.split("train").labels[rows]) != 0
    if len(np.unique(labels, axis=0)) < 2:
        raise PreflightError(f"--val-videos {val_videos}: the held-out videos of {store.url} all have the same "
                             "labels, so their mAP is 1 whatever the codes; hold out more videos")


def check_evaluation_inputs(store: FeatureStore) -> None:
    """What evaluating on ``store`` needs: every shard file of every stored split present with an intact index,
    unique video ids and 0/1 labels in each split, a database at least as large as the largest K of mAP@K, and a
    label for every query and database video."""
    for split in dict.fromkeys(stored_split(store.info.protocol, s) for s in ("train", "query", "database")):
        verify_shards(store, split)
        store.check_unique_ids(split)
        store.check_labels(split)
    check_database_size(store)
    check_eval_labels(store)


def check_database_size(store: FeatureStore) -> None:
    """The published protocol ranks the top K in {5, ..., 100} of the database: refuse a smaller database."""
    n, k = store.num_videos("database"), max(DEFAULT_KS)
    if n < k:
        stored = stored_split(store.info.protocol, "database")
        raise StoreError(f"{store.url}: the database (split {stored!r}) holds {n} videos, but the protocol's mAP@K "
                         f"needs at least K = {k}; add videos to the database split")


def check_name(value: str, option: str, what: str, *, slashes: bool = False) -> None:
    """A name by ``NAME_RULE`` (``EXPERIMENT_RULE`` with ``slashes``: MLflow experiments such as Databricks'
    workspace paths), refused by ``option`` and ``what`` it names; a long value is shown shortened."""
    pattern = EXPERIMENT_NAME if slashes else NAME
    if len(value) <= MAX_NAME_LENGTH and pattern.fullmatch(value) and ".." not in value:
        return
    shown = repr(value) if len(value) <= 60 else f"{value[:40]!r}... ({len(value)} characters)"
    raise PreflightError(f"{option} {shown}: {what}: {EXPERIMENT_RULE if slashes else NAME_RULE}")


def check_run_name(name: str) -> None:
    """A run name is one folder inside --storage (``NAME_RULE``: no separators, no '..', not hidden or empty)."""
    check_name(name, "--name", "a run name is one folder name inside --storage")


def check_tracking_uri(uri: str, option: str = "--mlflow-uri") -> None:
    """An MLflow tracking URI of a known scheme (``TRACKING_SCHEMES``); a ``sqlite:///`` path that is a SQLite
    file, or not there yet; a ``file://`` store that is a folder. Reads at most the file's first 16 bytes."""
    scheme, sep, rest = uri.partition("://")
    if uri == "databricks" or scheme == "databricks":
        return
    if not sep:
        raise PreflightError(f"{option} {uri!r}: not a URI; use sqlite:///PATH/mlflow.db (a local SQLite file), "
                             "file:///PATH (a folder) or http(s)://HOST:PORT (a tracking server)")
    if scheme.split("+")[0].lower() not in TRACKING_SCHEMES:
        raise PreflightError(f"{option} {uri}: unknown scheme {scheme!r}; allowed: {', '.join(TRACKING_SCHEMES)}")
    if scheme == "file":
        folder = Path(rest)
        if folder.exists() and not folder.is_dir():
            raise PreflightError(f"{option} {uri}: {folder} is not a folder (a file:// store is one)")
    if scheme != "sqlite":
        return
    if not rest.startswith("/") or rest == "/":
        raise PreflightError(f"{option} {uri}: name the database file, sqlite:///PATH/mlflow.db")
    path = Path(rest[1:])
    if path.is_dir():
        raise PreflightError(f"{option} {uri}: {path} is a folder, not a SQLite file; name a file in it, e.g. "
                             f"sqlite:///{path / 'mlflow.db'}")
    if path.exists() and not path.is_file():
        raise PreflightError(f"{option} {uri}: {path} is not a regular file")
    if path.is_file() and path.stat().st_size > 0:
        with path.open("rb") as f:
            header = f.read(len(SQLITE_HEADER))
        if header != SQLITE_HEADER:
            raise PreflightError(f"{option} {uri}: {path} is not a SQLite database (it does not start with "
                                 f"{SQLITE_HEADER!r}); name another file or a new one")


def check_count(value: float | None, option: str, minimum: float, *, strict: bool = False) -> None:
    """A worker count or another resource request: ``value >= minimum`` (``> minimum`` when ``strict``); None
    (the option's default) passes."""
    if value is not None and not (value > minimum if strict else value >= minimum):
        raise PreflightError(f"{option} {value:g}: must be {'>' if strict else '>='} {minimum:g}")


def check_device(device: str) -> None:
    """A torch device this machine has: ``cpu``, ``cuda`` / ``cuda:N`` where CUDA is available, ``mps`` on
    Apple silicon."""
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise PreflightError(f"--device {device!r}: not a torch device; use cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", a build without CUDA")
            raise PreflightError(f"--device {device}: CUDA is not available on this machine ({build}); use "
                                 "--device cpu")
        if parsed.index is not None and parsed.index >= count:
            raise PreflightError(f"--device {device}: this machine has {count} CUDA device(s), cuda:0 to "
                                 f"cuda:{count - 1}")
    elif parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise PreflightError(f"--device {device}: MPS is not available on this machine; use --device cpu")
    elif parsed.type != "cpu":
        raise PreflightError(f"--device {device}: not supported; use cpu, cuda, cuda:N or mps")


def check_output_file(path: str | Path | None, option: str) -> None:
    """A file a job writes when it is done (``--summary-json``, ``--json``): not a folder, in a folder that can
    be written or created. None (not asked for) passes."""
    if path is None:
        return
    file = Path(path).absolute()
    if file.is_dir():
        raise PreflightError(f"{option} {file}: is a folder; name a file")
    if file.exists() and not file.is_file():
        raise PreflightError(f"{option} {file}: is not a regular file")
    check_writable_folder(file.parent, option, file)


def check_output_folder(path: str | Path, option: str) -> None:
    """A local folder a job writes its results into (``--out``): a folder or nothing yet, creatable and
    writable. URLs (``s3://...``) pass: their writability is found by the first write."""
    if "://" in str(path) and not str(path).startswith("file://"):
        return
    folder = Path(str(path).removeprefix("file://")).absolute()
    if folder.exists() and not folder.is_dir():
        raise PreflightError(f"{option} {folder}: is a file, not a folder")
    check_writable_folder(folder, option)


def check_resumed_run(mlflow_uri: str, run_id: str, name: str, storage: str) -> None:
    """On resume: the MLflow run that the checkpoint of run ``name`` continues must be in the tracking store
    ``mlflow_uri`` (a missing SQLite file is not created to find that out)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    where = (f"run {name!r} in {storage} resumes MLflow run {run_id}, which --mlflow-uri {mlflow_uri} does not "
             "hold; pass the --mlflow-uri the run was started with, or another --name to start a new run")
    if mlflow_uri.startswith("sqlite:///") and not Path(mlflow_uri.removeprefix("sqlite:///")).is_file():
        raise PreflightError(f"{where} (no such file)")
    try:
        MlflowClient(mlflow_uri).get_run(run_id)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise PreflightError(where) from None
        raise


def check_writable_folder(path: str | Path, what: str, file: Path | None = None) -> None:
    """That the local folder ``path`` (of ``file``, named in the error instead, when given) can be written, or
    created where it is missing: a file is written (then deleted) in it or in its nearest existing parent;
    nothing is left behind."""
    folder = Path(path).absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise PreflightError(f"{what} {file or folder}: {existing} is a file, not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".write-check-"):
            pass
    except OSError as err:
        raise PreflightError(f"{what} {file or folder}: cannot write in {existing} ({err.strerror or err})") from None


def check_run_options(args: argparse.Namespace) -> None:
    """The options of a Ray training job (``cluster.train.add_arguments``, which the sweep and the ablation
    share) that name, point at or request something, before anything is read, generated or started: the names,
    the tracking URI, the worker and resource counts, the summary file."""
    if args.name is not None:
        check_run_name(args.name)
    check_name(args.experiment, "--experiment", "an MLflow experiment name", slashes=True)
    if args.register is not None:
        check_name(args.register, "--register", "a registered model name")
    check_tracking_uri(args.mlflow_uri)
    check_count(args.workers, "--workers", 1)
    check_count(args.cpus_per_worker, "--cpus-per-worker", 0, strict=True)
    check_count(args.gpus_per_worker, "--gpus-per-worker", 0)
    check_count(args.loader_workers, "--loader-workers", 0)
    check_count(args.max_failures, "--max-failures", -1)
    check_count(args.num_cpus, "--num-cpus", 1)
    check_output_file(args.summary_json, "--summary-json")
    check_val_videos_option(args.selection, args.val_videos)


def check_val_videos_option(selection: str, val_videos: int) -> None:
    """``--selection best-val-map5`` needs ``--val-videos N``; N is 0 (none held out) or at least
    ``MIN_VAL_VIDEOS``, so that each held-out video is ranked against ``VAL_MAP_K`` others."""
    check_count(val_videos, "--val-videos", 0)
    if selection == "best-val-map5" and not val_videos:
        raise PreflightError(f"--selection best-val-map5 selects on videos held out of training, but --val-videos "
                             f"is 0; add --val-videos N (N >= {MIN_VAL_VIDEOS} videos of the train split)")
    if 0 < val_videos < MIN_VAL_VIDEOS:
        raise PreflightError(f"--val-videos {val_videos}: hold out at least {MIN_VAL_VIDEOS} videos (mAP@{VAL_MAP_K} "
                             f"ranks each held-out video against {VAL_MAP_K} others), or 0")


def check_evaluation_options(args: argparse.Namespace) -> None:
    """The options of ``cluster.cli.add_evaluation_arguments`` (jobs that encode a store with a model): the
    tracking URI, the worker count (0: in the job's process), GPUs, the batch size and the CPUs."""
    check_tracking_uri(args.mlflow_uri)
    check_count(args.workers, "--workers", 0)
    check_count(args.gpus_per_worker, "--gpus-per-worker", 0)
    check_count(args.batch_size, "--batch-size", 1)
    check_count(args.num_cpus, "--num-cpus", 1)


def check_destinations(storage: str, name: str, mlflow_uri: str, artifacts: str) -> None:
    """Where a run writes, checked before Ray starts: its name stays inside ``storage``; the tracking URI is one
    MLflow can use; ``storage``, the MLflow SQLite file's folder and the artifact folder (the local ones) can be
    written."""
    check_run_name(name)
    check_tracking_uri(mlflow_uri)
    if "://" not in storage:
        check_writable_folder(storage, "--storage")
    if mlflow_uri.startswith("sqlite:///"):
        check_writable_folder(Path(mlflow_uri.removeprefix("sqlite:///")).parent, "--mlflow-uri: the SQLite folder")
    if artifacts.startswith("file://"):
        check_writable_folder(artifacts.removeprefix("file://"), "--mlflow-artifacts")


def per_rank_batch_size(batch_size: int, world_size: int) -> int:
    """Videos per worker and step, as ``cluster.train`` computes it (at least 2: the contrastive loss)."""
    return max(batch_size // world_size, 2)


def training_videos(store: FeatureStore, val_videos: int) -> tuple[int, str]:
    """The videos a run trains on (the train split less ``val_videos`` held out) and how a message says so."""
    n = store.num_videos("train") - val_videos
    held = f" once --val-videos holds out {val_videos}" if val_videos else ""
    return n, f"the train split of {store.url} has {n} videos{held}"


def check_batch_size(cfg: Config, store: FeatureStore, world_size: int, val_videos: int = 0) -> None:
    """Refuse a batch that no worker can fill: with ``drop_last`` an epoch would take no step at all."""
    n, has = training_videos(store, val_videos)
    per_rank_videos = videos_per_rank(n, world_size)
    batch = per_rank_batch_size(cfg.train.batch_size, world_size)
    if batch > per_rank_videos:
        raise PreflightError(
            f"train.batch_size={cfg.train.batch_size}: {batch} videos per worker and step over {world_size} "
            f"worker(s), but {has} ({per_rank_videos} per worker), so no worker fills one batch and an epoch "
            f"would take no step; use train.batch_size <= {per_rank_videos * world_size} (and >= 2 per worker) or "
            f"fewer workers{' or fewer --val-videos' if val_videos else ''}")


def check_num_clusters(cfg: Config, store: FeatureStore, val_videos: int = 0) -> None:
    """Refuse more k-means clusters than training videos when clustering will run (P2Set on, warm-up reached)."""
    if not cfg.loss.p2set or cfg.cluster.warmup_epoch >= cfg.train.num_epochs:
        return
    n, has = training_videos(store, val_videos)
    too_many = [k for k in cfg.cluster.num_cluster if k > n]
    if too_many:
        raise PreflightError(
            f"cluster.num_cluster={cfg.cluster.num_cluster}: {max(too_many)} clusters but {has}; use at most {n} "
            "clusters per granularity (or loss.p2set=false)")


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
        for start, block in store.label_blocks(role):
            empty = ~block.any(axis=1)
            if first < 0 and empty.any():
                first = start + int(np.flatnonzero(empty)[0])
            unlabelled += int(empty.sum())
        if unlabelled:
            video = str(store.split(role).video_ids[first])
            raise StoreError(f"{store.url}: {unlabelled} of {labels.shape[0]} videos of the {as_role} have no label "
                             f"(all-zero label rows; the first is video {first}, id {video!r}), so they can never be "
                             "relevant in evaluation; fix the label file and re-ingest")
