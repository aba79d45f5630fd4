"""Distributed training of a dataset preset with Ray Train: the driver every ``jobs/train_<dataset>.py`` calls.

The driver builds the config and checks the inputs and destinations before Ray starts (:func:`prepare_run`),
creates the run's MLflow run (every attempt of the Train run logs to it; a failed run is marked FAILED), starts
(or connects to) Ray, creates the run's clustering actor and fits a ``TorchTrainer`` whose workers run
``cluster.worker.TrainWorker``. Re-running with the same ``--name`` and ``--storage`` resumes from the latest
checkpoint and continues the same MLflow run.
When the workers are done, the driver reads the final checkpoint (:func:`read_final_checkpoint`), logs the
result files and the pyfunc model to the run's MLflow run, registers it, and prints the mAP@K table.

Module layout of a training run::

    cluster/train.py       the driver: options, config, trainer, final checkpoint, model logging
    cluster/worker.py      one Train worker: setup, the epoch loop, evaluation, final evaluation
    cluster/checkpoint.py  TrainState (what a checkpoint holds), resume checks
    cluster/runtime.py     Ray start-up, log format, paths, MLflow locations
    autossvh/trainer.py    the epoch skeleton the worker and the single-process trainer share
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autossvh.config import Config
from autossvh.engine import Retrieval
from autossvh.model import AutoSSVH
from autossvh.trainer import EpochRecord
from cluster.checkpoint import CHECKPOINT_FILE, TrainState, check_resume_compatible, latest_checkpoint_file
from cluster.cli import (
    REDUCED_PRESET,
    add_config_arguments,
    add_verbose_argument,
    config_from_args,
    log_reduced_preset,
)
from cluster.preflight import (
    check_destinations,
    check_resumed_run,
    check_run_options,
    check_store_shape,
    check_training_inputs,
    requested_data_shape,
)
from cluster.runtime import absolute_path, configure_logging, init_ray, mlflow_locations
from cluster.worker import SELECTIONS, WorkerConfig, train_loop_per_worker
from storage.store import FeatureStore, check_apart, open_store
from storage.synthetic_store import write_synthetic
from storage.writer import storage_options_from

log = logging.getLogger(__name__)

SYNTHETIC = {"videos": 1200, "feature_dim": 256, "num_classes": 40, "seed": 0}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "URL of a feature store (jobs/ingest.py, jobs/make_synthetic.py); default: a small "
                         "generated store cached under runs/data/<dataset>-synthetic, with a reduced preset")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers (DDP ranks)")
    parser.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per worker; > 0 trains on CUDA")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs reserved per Train worker")
    parser.add_argument("--loader-workers", type=int, default=0, help="DataLoader processes per Train worker")
    parser.add_argument("--placement-strategy", choices=["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"],
                        default="PACK", help="how Ray places the workers on nodes (SPREAD: one per node if possible)")
    parser.add_argument("--storage", default="runs/ray", help="checkpoint storage path or URL (RunConfig)")
    parser.add_argument("--name", help="run name; re-running the same name resumes it "
                        "(default: <dataset>-<bits>bits-<recipe>)")
    parser.add_argument("--max-failures", type=int, default=1,
                        help="worker-group restarts from the last checkpoint (-1: without limit)")
    parser.add_argument("--selection", choices=SELECTIONS, default="last",
                        help="model to evaluate and log at the end: the last epoch's; best-map5: the best mAP@5 on "
                        "the TEST queries (as the published numbers select); knn-agreement: label-free, the epoch "
                        "whose codes best keep the pooled inputs' 10 nearest neighbours on 256 training videos; "
                        "best-val-map5: the best mAP@5 on a labelled validation split held out of training "
                        "(--val-videos)")
    parser.add_argument("--val-videos", type=int, default=0, metavar="N",
                        help="hold N videos of the train split out of training (whole chunks, the same for every "
                        "seed) as a labelled validation split: their leave-one-out mAP@5 is logged as map/val_map5 "
                        "at every evaluation, and --selection best-val-map5 selects by it (default 0: none)")
    parser.add_argument("--mlflow-uri", default="sqlite:///runs/mlflow.db", help="MLflow tracking URI")
    parser.add_argument("--mlflow-artifacts", default="runs/mlartifacts",
                        help="artifact folder of a newly created experiment (local tracking)")
    parser.add_argument("--experiment", default="autossvh", help="MLflow experiment")
    parser.add_argument("--register", metavar="NAME", help="register the model under NAME with alias 'candidate' "
                        "(default without --data: autossvh-<dataset>-synthetic; with --data: not registered)")
    parser.add_argument("--summary-json", type=Path, help="write the final metrics and URIs here")
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local Ray started without RAY_ADDRESS "
                        "(default: the machine's cores)")
    add_verbose_argument(parser)


def synthetic_store(dataset: str) -> str:
    """The cached generated store of ``dataset`` under runs/data, written on first use."""
    url = str(Path("runs/data", f"{dataset}-synthetic").resolve())
    try:
        open_store(url)
    except ValueError:
        log.info("generating a %s-like store at %s (%s)", dataset, url, SYNTHETIC)
        write_synthetic(url, dataset, SYNTHETIC["videos"], feature_dim=SYNTHETIC["feature_dim"],
                        num_classes=SYNTHETIC["num_classes"], seed=SYNTHETIC["seed"])
    return url


def resolve_data(dataset: str, args: argparse.Namespace) -> tuple[str, dict[str, Any], list[str], FeatureStore]:
    """The data URL (a generated store without --data), its storage options, the overrides it implies (its
    frames and feature size; the reduced preset on generated data) and the opened store, checked against
    the T and F the options ask for; the run's outputs are kept apart from its inputs."""
    check_apart({"--storage": args.storage, "--summary-json": args.summary_json,
                 "--mlflow-artifacts": args.mlflow_artifacts}, {"--data": args.data, "--config": args.config})
    options = storage_options_from(args.storage_options)
    overrides: list[str] = []
    if args.data:
        url = absolute_path(args.data)
    else:
        url = synthetic_store(dataset)
        overrides += REDUCED_PRESET
        log_reduced_preset(args, "generated data, no --data")
    store = open_store(url, options)
    check_store_shape(requested_data_shape(args), store.info, url)
    overrides += [f"data.feature_size={store.info.feature_dim}", f"data.max_frames={store.info.max_frames}"]
    return url, options, overrides, store


def resolve_run(dataset: str, args: argparse.Namespace) -> tuple[Config, str, dict[str, Any], FeatureStore]:
    """The run's config, data URL, storage options and opened store, checked before anything starts."""
    url, options, overrides, store = resolve_data(dataset, args)
    cfg = config_from_args(dataset, args, overrides)
    check_training_inputs(cfg, store, args.workers, args.val_videos)
    return cfg, url, options, store


def make_trainer(cfg: Config, url: str, options: dict[str, Any], args: argparse.Namespace, name: str, actor: Any,
                 mlflow_run_id: str, *, callbacks: list[Any] | None = None, console: Any = None) -> Any:
    """The TorchTrainer of one training run (``args``: the options of :func:`add_arguments`): every attempt logs
    to the MLflow run ``mlflow_run_id``; ``console``: the queue the driver prints the workers' messages from
    (``cluster.console``)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    mlflow_uri, _ = mlflow_locations(args.mlflow_uri, args.mlflow_artifacts)
    worker = WorkerConfig(config=cfg.to_dict(), data=url, storage_options=options, actor=actor,
                          loader_workers=args.loader_workers, mlflow_uri=mlflow_uri, mlflow_run_id=mlflow_run_id,
                          selection=args.selection, console=console, val_videos=args.val_videos)
    use_gpu = args.gpus_per_worker > 0
    resources = {"CPU": args.cpus_per_worker} | ({"GPU": args.gpus_per_worker} if use_gpu else {})
    return TorchTrainer(
        train_loop_per_worker, train_loop_config=worker.__dict__,
        scaling_config=ScalingConfig(num_workers=args.workers, use_gpu=use_gpu, resources_per_worker=resources,
                                     placement_strategy=args.placement_strategy),
        run_config=RunConfig(storage_path=absolute_path(args.storage), name=name,
                             failure_config=FailureConfig(max_failures=args.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2), callbacks=callbacks,
                             logging_config=LoggingConfig(log_level="INFO" if args.verbose else "WARNING")),
    )


def start_actor(cfg: Config, args: argparse.Namespace, name: str) -> Any:
    """The run's clustering actor, named ``clustering-<run name>`` (restarted by Ray if it dies)."""
    from cluster.clustering_actor import create_clustering_actor

    return create_clustering_actor(cfg.cluster, num_shards=cfg.cluster.num_shards,
                                   num_gpus=min(args.gpus_per_worker, 1.0), name=f"clustering-{name}")


@dataclass
class FinishedRun:
    """What a finished training run produced: the selected model and its evaluation, from the last checkpoint."""

    model: AutoSSVH
    retrieval: Retrieval
    selected_epoch: int
    epochs_run: int
    mlflow_run_id: str
    checkpoint_path: str
    history: list[EpochRecord]


def read_final_checkpoint(checkpoint: Any, cfg: Config) -> FinishedRun:
    """The selected model and its final evaluation from the run's last (final) Ray Train checkpoint."""
    with checkpoint.as_directory() as folder:
        state = TrainState.load(Path(folder) / CHECKPOINT_FILE, checkpoint.path)
    if state.final is None:
        raise ValueError(f"{checkpoint.path}: the run's last checkpoint has no final evaluation")
    model = AutoSSVH(cfg)
    model.load_state_dict(state.selected_weights())
    return FinishedRun(model.eval(), state.final.retrieval, state.final.selected_epoch, state.epoch + 1,
                       state.mlflow_run_id, checkpoint.path, state.history)


def fit_trial(cfg: Config, args: argparse.Namespace, data: dict[str, Any], name: str, callbacks: list[Any],
              title: str) -> FinishedRun:
    """One Tune trial's Train run (a sweep's or an ablation's): its MLflow run, the checkpoint's when the trial
    resumes, else the child of ``data["parent_run_id"]`` of that name (an earlier attempt's, or one created here),
    marked FAILED if the fit fails; the fit; the result files. ``data``: the store URL, options, label and job
    script under "url", "options", "label" and "script"."""
    import ray

    from cluster import tracking

    mlflow_uri, artifacts = mlflow_locations(args.mlflow_uri, args.mlflow_artifacts)
    run_id = check_resume_compatible(args.storage, name, cfg, args.val_videos) or tracking.child_run(
        mlflow_uri, args.experiment, name, data["parent_run_id"], tracking.config_params(cfg),
        artifact_location=artifacts, tags=tracking.run_tags(data["script"], data["label"], cfg))
    tracking.reopen_run(mlflow_uri, run_id)  # an earlier attempt's run, ended KILLED with a reason, runs again
    actor = start_actor(cfg, args, name)
    try:
        trainer = make_trainer(cfg, data["url"], data["options"], args, name, actor, run_id, callbacks=callbacks)
        result = trainer.fit()
    except Exception:
        tracking.mark_failed(mlflow_uri, run_id)
        raise
    finally:
        ray.kill(actor)
    done = read_final_checkpoint(result.checkpoint, cfg)
    log_result_files(done, cfg, mlflow_uri, args.experiment, title)
    return done


def log_result_files(done: FinishedRun, cfg: Config, mlflow_uri: str, experiment: str, title: str) -> None:
    """The mAP table, PR and training curves and the sampler figure, logged to the run's MLflow run."""
    from cluster import tracking

    with tracking.start_run(mlflow_uri, experiment, run_id=done.mlflow_run_id), \
            tempfile.TemporaryDirectory() as out:
        tracking.log_final_artifacts(cfg, done.retrieval, done.history, out, title)


def log_and_register(done: FinishedRun, mlflow_uri: str, experiment: str, register: str | None,
                     card: Any = None) -> str:
    """Log the selected model as a pyfunc to its run, linked to the selected epoch's metrics (and register it
    with alias candidate and ``card``'s description and tags, which also describe the run); returns its URI."""
    import mlflow

    from cluster import tracking

    with tracking.start_run(mlflow_uri, experiment, run_id=done.mlflow_run_id):
        if card is not None:
            mlflow.set_tag(tracking.NOTE_TAG, card.description)
        return tracking.log_model(done.model, step=tracking.epoch_step(done.selected_epoch), register=register,
                                  card=card)


def _write_summary(path: Path, dataset: str, cfg: Config, done: FinishedRun, model_uri: str, wall: float,
                   args: argparse.Namespace, result: Any) -> None:
    summary = {"dataset": dataset, "recipe": cfg.recipe, "nbits": cfg.model.nbits, "epochs": cfg.train.num_epochs,
               "epochs_run": done.epochs_run, "selected_epoch": done.selected_epoch + 1,
               "map_at_k": {str(k): v for k, v in done.retrieval.map_at_k.items()},
               "gmap_l2": done.retrieval.gmap_l2, "wall_seconds": wall, "mlflow_run_id": done.mlflow_run_id,
               "model_uri": model_uri, "workers": args.workers, "worker_nodes": result.metrics.get("worker_nodes"),
               "checkpoint": done.checkpoint_path}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2))


@dataclass
class PreparedRun:
    """A training run checked before Ray starts: config, data, name and where it writes."""

    cfg: Config
    url: str
    options: dict[str, Any]
    label: str  # the dataset as a reader should see it
    name: str
    mlflow_uri: str
    artifacts: str
    resumed_mlflow_run: str | None  # the MLflow run of the checkpoint to resume, None for a new run


def prepare_run(dataset: str, args: argparse.Namespace) -> PreparedRun:
    """Every check of inputs and destinations (raises ValueError or TrackingError naming the problem)."""
    from cluster import tracking

    check_run_options(args)
    cfg, url, options, store = resolve_run(dataset, args)
    name = args.name or f"{dataset}{'-synthetic' if store.is_synthetic else ''}-{cfg.model.nbits}bits-{cfg.recipe}"
    mlflow_uri, artifacts = mlflow_locations(args.mlflow_uri, args.mlflow_artifacts)
    check_destinations(args.storage, name, mlflow_uri, artifacts)
    tracking.check_reachable(mlflow_uri)
    resumed = check_resume_compatible(args.storage, name, cfg, args.val_videos)
    if resumed is not None:
        check_resumed_run(mlflow_uri, resumed, name, args.storage)
    return PreparedRun(cfg, url, options, store.label, name, mlflow_uri, artifacts, resumed)


def failure_hint(storage: str, name: str) -> str:
    """What a failed run leaves: its last checkpoint (to resume from) or none."""
    run_dir = f"{absolute_path(storage).rstrip('/')}/{name}"
    if latest_checkpoint_file(run_dir) is None:
        return f"no checkpoint was written under {run_dir}; re-running the same command starts the run again"
    return f"the last checkpoint is kept under {run_dir}; re-run the same command to resume from it"


def run(dataset: str, args: argparse.Namespace) -> int:
    """Train ``dataset`` with Ray Train per ``args`` (see :func:`add_arguments`); returns the exit code."""
    from cluster import tracking

    configure_logging(args.verbose)
    try:
        prepared = prepare_run(dataset, args)
    except (ValueError, tracking.TrackingError) as err:  # bad config, store, option, name, checkpoint; MLflow down
        log.error("%s", err)
        return 2
    cfg = prepared.cfg
    log.info("training %s, %s recipe, %d bits, %d epochs, on %d worker(s); run %r in %s", prepared.label, cfg.recipe,
             cfg.model.nbits, cfg.train.num_epochs, args.workers, prepared.name, args.storage)
    run_id = prepared.resumed_mlflow_run or tracking.create_run(
        prepared.mlflow_uri, args.experiment, prepared.name, artifact_location=prepared.artifacts,
        tags=tracking.run_tags(sys.argv[0], prepared.label, cfg))
    try:
        return fit_and_log(dataset, args, prepared, run_id)
    except Exception:  # whatever fails after the MLflow run exists leaves it FAILED, not RUNNING
        tracking.mark_failed(prepared.mlflow_uri, run_id)
        raise


def fit_and_log(dataset: str, args: argparse.Namespace, prepared: PreparedRun, run_id: str) -> int:
    """Start Ray, fit the run that logs to MLflow run ``run_id``, log and register its model; the exit code."""
    import ray
    from ray.train import TrainingFailedError

    from cluster import tracking
    from cluster.console import fit_showing_progress, new_console_queue

    cfg, name, mlflow_uri = prepared.cfg, prepared.name, prepared.mlflow_uri
    init_ray(int(args.workers * args.cpus_per_worker) + 1, args.num_cpus, args.verbose)
    actor, console = start_actor(cfg, args, name), new_console_queue()
    trainer = make_trainer(cfg, prepared.url, prepared.options, args, name, actor, run_id, console=console)
    start = time.perf_counter()
    try:
        result = fit_showing_progress(trainer, console)
    except TrainingFailedError as err:
        tracking.mark_failed(mlflow_uri, run_id)
        log.error("training failed: %s", err)
        log.error("%s", failure_hint(args.storage, name))
        return 1
    finally:
        ray.kill(actor)
    wall = time.perf_counter() - start
    if result.checkpoint is None:
        tracking.mark_failed(mlflow_uri, run_id)
        log.error("the run ended without a checkpoint")
        return 1
    done = read_final_checkpoint(result.checkpoint, cfg)
    label, url = prepared.label, prepared.url
    title = f"{label}, {cfg.model.nbits} bits, {cfg.recipe} recipe, epoch {done.selected_epoch + 1} ({args.selection})"
    log_result_files(done, cfg, mlflow_uri, args.experiment, title)
    register = args.register or (None if args.data else f"autossvh-{dataset}-synthetic")
    card = tracking.model_card(label, url, cfg, done.retrieval, done.selected_epoch + 1, args.selection)
    model_uri = log_and_register(done, mlflow_uri, args.experiment, register, card)
    print(done.retrieval.table(title))
    print(f"model: {model_uri}\n{tracking.ui_hint(mlflow_uri, done.mlflow_run_id)}")
    if args.summary_json is not None:
        _write_summary(args.summary_json, dataset, cfg, done, model_uri, wall, args, result)
    return 0
