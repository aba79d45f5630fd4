"""Distributed training of a dataset preset with Ray Train: the entry every ``jobs/train_<dataset>.py`` calls.

The driver builds the config, starts (or connects to) Ray, creates the clustering actor and runs a
``TorchTrainer`` whose workers each read their partition of a Zarr feature store; rank 0 logs every epoch to
MLflow and reports a checkpoint (model, optimizer, scheduler, epoch, RNG, last clustering result, MLflow run
id, history) through ``ray.train.report``. Re-running with the same ``--name`` and ``--storage`` resumes from
the latest checkpoint and continues the same MLflow run. After the last epoch the workers evaluate the selected
model (``--selection``) with precision/recall by radius and report it in a final checkpoint; the driver logs
the result files and the pyfunc model and prints the mAP@K table.

Per worker and epoch: a clustering round when ``should_cluster`` (encode this rank's block of the train split,
submit it to the actor, read the shared result), one epoch of DDP training over the global batch
(``gather_with_grad``; each rank takes ``train.batch_size / world_size`` videos per step), a scheduler step,
and every ``train.eval_every`` epochs (and after the last) an evaluation whose codes are gathered to rank 0.
A step whose loss is not finite on any rank is skipped by all ranks; ``train.max_nonfinite_steps`` in a row
stop the run with an error, keeping the last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from autossvh.clustering import ClusteringResult
from autossvh.config import Config, config_from_dict
from autossvh.diagnostics import PROBE_VIDEOS, SamplerDiagnostics, sampler_diagnostics
from autossvh.engine import (
    EpochStats,
    NonFiniteGuard,
    Retrieval,
    build_optimizer,
    build_scheduler,
    encode,
    evaluate_codes,
    is_distributed,
    load_state,
    should_cluster,
    train_one_epoch,
)
from autossvh.losses import ClusterTargets
from autossvh.model import AutoSSVH
from autossvh.trainer import EpochRecord, epoch_line
from autossvh.voting import merge_centers
from cluster.cli import add_config_arguments, config_from_args
from cluster.preflight import check_store_shape, check_training_inputs, per_rank_batch_size, requested_data_shape
from storage.reader import EvalReader, TrainReader, make_loader
from storage.schema import queries_are_database
from storage.store import FeatureStore, open_store
from storage.synthetic_store import write_synthetic
from storage.writer import storage_options_from

log = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"
CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's list of registered (complete) checkpoints
CLUSTER_ATTEMPTS = 3  # clustering rounds tried per epoch when the actor dies
SELECTIONS = ("last", "best-map5")
RESULT_ARRAYS = ("im2cluster", "centers", "centroids", "density", "im2center")
# The reduced preset for generated data on a small machine (as in cluster.single_process), in minutes on 2 CPUs.
REDUCED_PRESET = [
    "model.encoder_depth=2",
    "train.batch_size=64",
    "train.num_epochs=8",
    "train.eval_every=4",
    "train.lr=5e-4",
    "train.test_batch_size=256",
    "cluster.warmup_epoch=2",
    "cluster.num_cluster=[16, 32, 48]",
    "cluster.nredo=2",
]
SYNTHETIC = {"videos": 1200, "feature_dim": 256, "num_classes": 40, "seed": 0}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "URL of a feature store (jobs/ingest.py, jobs/make_synthetic.py); default: a small "
                         "generated store cached under runs/data/<dataset>-synthetic, with a reduced preset")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers (DDP ranks)")
    parser.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per worker; > 0 trains on CUDA")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--loader-workers", type=int, default=0, help="DataLoader processes per Train worker")
    parser.add_argument("--placement-strategy", choices=["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"],
                        default="PACK", help="how Ray places the workers on nodes (SPREAD: one per node if possible)")
    parser.add_argument("--storage", default="runs/ray", help="checkpoint storage path or URL (RunConfig)")
    parser.add_argument("--name", help="run name; re-running the same name resumes it (default: <dataset>-<bits>)")
    parser.add_argument("--max-failures", type=int, default=1, help="worker-group restarts from the last checkpoint")
    parser.add_argument("--selection", choices=SELECTIONS, default="last",
                        help="model to evaluate and log at the end: the last epoch's or the best mAP@5 evaluated")
    parser.add_argument("--mlflow-uri", default="sqlite:///runs/mlflow.db", help="MLflow tracking URI")
    parser.add_argument("--mlflow-artifacts", default="runs/mlartifacts",
                        help="artifact folder of a newly created experiment (local tracking)")
    parser.add_argument("--experiment", default="autossvh", help="MLflow experiment")
    parser.add_argument("--register", metavar="NAME", help="register the model under NAME with alias 'candidate' "
                        "(default without --data: autossvh-<dataset>-synthetic; with --data: not registered)")
    parser.add_argument("--summary-json", type=Path, help="write the final metrics and URIs here")
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local Ray started without RAY_ADDRESS")


def absolute_uri(uri: str) -> str:
    """``sqlite:///relative.db`` → absolute path (Ray workers do not share the driver's working directory)."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    return uri


def absolute_path(url: str) -> str:
    return url if "://" in url else str(Path(url).resolve())


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


def init_ray(min_cpus: int, num_cpus: int | None = None) -> None:
    """Connect to the cluster at RAY_ADDRESS (``ray job submit`` sets it), else start a local Ray on 127.0.0.1
    without the dashboard, with ``num_cpus`` logical CPUs (default: the cores, at least ``min_cpus``)."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    ray.init(num_cpus=num_cpus or max(os.cpu_count() or 1, min_cpus), include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}})


# ----- worker side --------------------------------------------------------------------------------------------


def _result_state(result: ClusteringResult | None) -> dict[str, Any] | None:
    if result is None:
        return None
    return {key: [torch.as_tensor(np.asarray(a)) for a in getattr(result, key)]
            for key in RESULT_ARRAYS} | {"objective": list(result.objective)}


def _result_from_state(state: dict[str, Any] | None) -> ClusteringResult | None:
    if state is None:
        return None
    arrays = {key: [t.numpy() for t in state[key]] for key in RESULT_ARRAYS if key in state}
    if "im2center" not in arrays:  # a checkpoint of an earlier version, with the unmerged votes of k clusters
        merged = [merge_centers(c, a) for c, a in zip(arrays["centers"], arrays["im2cluster"], strict=True)]
        arrays["centers"], arrays["im2center"] = [m[0] for m in merged], [m[1] for m in merged]
    return ClusteringResult(**arrays, objective=list(state["objective"]))


def _record_to_dict(record: EpochRecord) -> dict[str, Any]:
    retrieval = None
    if record.retrieval is not None:
        retrieval = {"map_at_k": dict(record.retrieval.map_at_k), "gmap_l2": record.retrieval.gmap_l2}
    return {"epoch": record.epoch, "lr": record.lr, "stats": asdict(record.stats),
            "cluster_seconds": record.cluster_seconds, "kmeans_objective": list(record.kmeans_objective),
            "retrieval": retrieval, "distinct_centers": list(record.distinct_centers),
            "sampler": None if record.sampler is None else asdict(record.sampler)}


def _record_from_dict(data: dict[str, Any]) -> EpochRecord:
    retrieval, sampler = data["retrieval"], data.get("sampler")
    return EpochRecord(data["epoch"], data["lr"], EpochStats(**data["stats"]), data["cluster_seconds"],
                       list(data["kmeans_objective"]),
                       None if retrieval is None else Retrieval(dict(retrieval["map_at_k"]), retrieval["gmap_l2"]),
                       list(data.get("distinct_centers", [])),
                       None if sampler is None else SamplerDiagnostics(**sampler))


def _gather_objects(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` in rank order on rank 0 (None elsewhere); ``[obj]`` on one process."""
    if not is_distributed():
        return [obj]
    parts: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, parts, dst=0)
    return parts


def _gather_to_rank0(array: np.ndarray) -> np.ndarray | None:
    """Rank-ordered concatenation of every rank's rows on rank 0 (None elsewhere)."""
    parts = _gather_objects(array)
    return None if parts is None else np.concatenate(parts)


def _rng_state() -> dict[str, torch.Tensor | None]:
    """This process's torch RNG states (the sampler's Gumbel noise draws from them)."""
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict[str, torch.Tensor | None]) -> None:
    torch.set_rng_state(state["cpu"].cpu())
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


def _retrieval_state(retrieval: Retrieval) -> dict[str, Any]:
    """A Retrieval as tensors and floats (loadable with ``weights_only=True``)."""
    pr = None if retrieval.pr_by_radius is None else [torch.as_tensor(a) for a in retrieval.pr_by_radius]
    return {"map_at_k": dict(retrieval.map_at_k), "gmap_l2": retrieval.gmap_l2, "pr_by_radius": pr}


def _retrieval_from_state(state: dict[str, Any]) -> Retrieval:
    pr = None if state["pr_by_radius"] is None else tuple(t.numpy() for t in state["pr_by_radius"])
    return Retrieval(dict(state["map_at_k"]), state["gmap_l2"], pr)


def _encode_split(model: AutoSSVH, url: str, split: str, cfg: Config, rank: int, world: int,
                  options: dict[str, Any], device: torch.device, loader_workers: int) -> tuple[Any, int]:
    reader = EvalReader(url, split, cfg.train.test_batch_size, rank, world, options)
    return encode(model, make_loader(reader, loader_workers), device), reader.start


def _evaluate(model: AutoSSVH, url: str, protocol: str, cfg: Config, rank: int, world: int,
              options: dict[str, Any], device: torch.device, loader_workers: int,
              labels: dict[str, np.ndarray] | None, with_pr: bool = False) -> Retrieval | None:
    """Every rank encodes its block of query (and database, unless aliased); rank 0 gets the mAP@K."""
    query = _gather_to_rank0(_encode_split(model, url, "query", cfg, rank, world, options, device,
                                           loader_workers)[0].codes)
    db = query if queries_are_database(protocol) else _gather_to_rank0(
        _encode_split(model, url, "database", cfg, rank, world, options, device, loader_workers)[0].codes)
    if query is None or labels is None:
        return None
    return evaluate_codes(query, labels["query"], db, labels["database"], with_pr)


def _probe_videos(store: FeatureStore) -> tuple[torch.Tensor, np.ndarray | None]:
    """The first training videos and their true frame signal (generated stores): the sampler's probe set."""
    n = min(PROBE_VIDEOS, store.num_videos("train"))
    feats = torch.from_numpy(np.asarray(store.split("train").feats[:n], dtype=np.float32))
    return feats, store.frame_signal("train", n)


def eval_labels(store: FeatureStore) -> dict[str, np.ndarray]:
    """The query and database labels evaluation compares (as the store's protocol maps them)."""
    return {name: np.asarray(store.split(name).labels[:]) for name in ("query", "database")}


def _start_mlflow(loop: dict[str, Any], cfg: Config, run_id: str | None, world: int) -> str:
    from cluster import tracking

    active = tracking.start_run(loop["mlflow_uri"], loop["experiment"], run_name=loop["name"], run_id=run_id,
                                artifact_location=loop["mlflow_artifacts"], parent_run_id=loop["mlflow_parent"])
    if run_id is None:
        tracking.log_config(cfg, {"data": loop["data"], "storage_options": loop["storage_options"],
                                  "world_size": world, "selection": loop["selection"]})
    return active.info.run_id


def _backfill(history: list[dict[str, Any]], run_id: str, cfg: Config) -> set[int]:
    """Log the checkpointed epochs that the MLflow run lacks (the job died between checkpoint and logging);
    returns every epoch the run now holds. An epoch logged whose checkpoint Ray never registered (the job died
    in between) is in the set too: its retrained values are not logged a second time."""
    from mlflow.tracking import MlflowClient

    from cluster import tracking

    logged = {m.step for m in MlflowClient().get_metric_history(run_id, "loss")}
    for data in history:
        if data["epoch"] not in logged:
            tracking.log_epoch(_record_from_dict(data), num_cluster=cfg.cluster.num_cluster)
            logged.add(data["epoch"])
    return logged


def _clustering_round(actor: Any, epoch: int, rank: int, world: int, num_train: int, indices: np.ndarray,
                      encoded: Any) -> ClusteringResult:
    """Submit this rank's codes and read the epoch's clustering. If the actor died on any rank's call (it is
    restarted empty), every rank agrees on that through a collective and all redo the round."""
    import ray
    from ray.exceptions import ActorUnavailableError, RayActorError

    for attempt in range(1, CLUSTER_ATTEMPTS + 1):
        result, ok = None, 1
        try:
            ray.get(actor.submit.remote(epoch, rank, indices, encoded.features, encoded.codes))
            result = ray.get(actor.result.remote(epoch, world, num_train))
        except (RayActorError, ActorUnavailableError) as err:
            ok = 0
            log.warning("rank %d: clustering round of epoch %d failed (attempt %d of %d): %s", rank, epoch + 1,
                        attempt, CLUSTER_ATTEMPTS, str(err).splitlines()[0])
        if is_distributed():
            flag = torch.tensor([ok], dtype=torch.int32)
            if dist.get_backend() == "nccl":
                flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            ok = int(flag.item())
        if ok:
            return result
    raise RuntimeError(f"the clustering actor failed {CLUSTER_ATTEMPTS} rounds of epoch {epoch + 1} in a row")


def train_loop_per_worker(loop: dict[str, Any]) -> None:
    """One Ray Train worker: the epoch loop (see the module docstring); ``loop`` is the driver's config dict."""
    import mlflow
    import ray.train
    import ray.train.torch

    from cluster import tracking
    from cluster.distributed import gather_with_grad

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, force=True)  # Ray configures the worker's root
    logging.getLogger("ray").setLevel(logging.WARNING)  # keep Ray's per-report INFO lines out of the job log
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = config_from_dict(loop["config"])
    url, options, actor = loop["data"], loop["storage_options"], loop["actor"]
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.train.seed + rank)
    np.random.seed(cfg.train.seed + rank)
    model = AutoSSVH(cfg).to(device)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    start_epoch, run_id, history, last_result = 0, None, [], None
    best: dict[str, Any] = {"map5": -1.0, "epoch": -1, "model": None}
    guard = NonFiniteGuard(cfg.train.max_nonfinite_steps)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = load_state(Path(folder) / CHECKPOINT_FILE, checkpoint.path, device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, run_id, history = state["epoch"] + 1, state["mlflow_run_id"], list(state["history"])
        best = state["best"]
        last_result = _result_from_state(state["clustering"])
        if len(state["rng"]) == world:  # same world size: every rank continues its own random stream
            _set_rng_state(state["rng"][rank])
        if rank == 0:
            log.info("resumed from the checkpoint of epoch %d (MLflow run %s)", state["epoch"] + 1, run_id)
    ddp = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
    store = open_store(url, options)
    protocol, num_train = store.info.protocol, store.num_videos("train")
    labels = eval_labels(store) if rank == 0 else None
    probe = _probe_videos(store) if rank == 0 else None
    if rank == 0:
        run_id = _start_mlflow(loop, cfg, run_id, world)
        logged = _backfill(history, run_id, cfg)
    per_rank_batch = per_rank_batch_size(cfg.train.batch_size, world)
    reader = TrainReader(url, "train", per_rank_batch, rank, world, cfg.train.seed, options, drop_last=True)
    epochs = cfg.train.num_epochs
    start = time.perf_counter()
    for epoch in range(start_epoch, epochs):
        lr = optimizer.param_groups[0]["lr"]
        targets, cluster_seconds, objective, distinct = None, 0.0, [], []
        if should_cluster(cfg, epoch):
            tic = time.perf_counter()
            encoded, first = _encode_split(model, url, "train", cfg, rank, world, options, device,
                                           loop["loader_workers"])
            indices = np.arange(first, first + len(encoded.codes), dtype=np.int64)
            last_result = _clustering_round(actor, epoch, rank, world, num_train, indices, encoded)
            targets = ClusterTargets.from_result(last_result, device)
            cluster_seconds, objective = time.perf_counter() - tic, list(last_result.objective)
            distinct = last_result.num_distinct
        reader.set_epoch(epoch)
        stats = train_one_epoch(ddp, make_loader(reader, loop["loader_workers"]), optimizer, cfg, device, targets,
                                gather=gather_with_grad, guard=guard)
        scheduler.step()
        retrieval, eval_seconds = None, 0.0
        if (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == epochs:
            tic = time.perf_counter()
            retrieval = _evaluate(model, url, protocol, cfg, rank, world, options, device, loop["loader_workers"],
                                  labels)
            eval_seconds = time.perf_counter() - tic
        diagnostics = None if probe is None else sampler_diagnostics(model, *probe)
        record = EpochRecord(epoch, lr, stats, cluster_seconds, objective, retrieval, distinct, diagnostics)
        metrics = {"epoch": epoch, "loss": stats.loss, "train_seconds": stats.seconds,
                   "cluster_seconds": cluster_seconds, "eval_seconds": eval_seconds}
        rng = _gather_objects(_rng_state())
        if rank != 0:
            ray.train.report(metrics)
            continue
        history.append(_record_to_dict(record))
        if retrieval is not None and retrieval.map_at_k[5] > best["map5"]:
            best = {"map5": retrieval.map_at_k[5], "epoch": epoch,
                    "model": {k: v.detach().clone() for k, v in model.state_dict().items()}}
        if retrieval is not None:
            metrics.update({f"map_at_{k}": v for k, v in retrieval.map_at_k.items()} | {"gmap_l2": retrieval.gmap_l2})
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "epoch": epoch, "rng": rng,
                 "clustering": _result_state(last_result), "mlflow_run_id": run_id, "history": history,
                 "best": best, "config": cfg.to_dict(), "final": None}
        _report_checkpoint(metrics, state)
        # MLflow after the checkpoint: a crash in between leaves a gap that the resumed run back-fills.
        if epoch in logged:
            log.warning("epoch %d was logged to MLflow by an attempt whose checkpoint was lost; keeping those "
                        "metrics", epoch + 1)
        else:
            tracking.log_epoch(record, num_cluster=cfg.cluster.num_cluster)
            mlflow.log_metrics({"eval_seconds": eval_seconds, "train_seconds": stats.seconds}, step=epoch)
        done = epoch + 1 - start_epoch
        log.info(epoch_line(record, epochs, (time.perf_counter() - start) / done * (epochs - epoch - 1), eval_seconds))
    if rank == 0:
        mlflow.end_run()
    _final_evaluation(model, loop["selection"], best, state if rank == 0 else None, url, protocol, cfg, rank, world,
                      options, device, loop["loader_workers"], labels)


def _report_checkpoint(metrics: dict[str, Any], state: dict[str, Any]) -> None:
    import ray.train
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory() as folder:
        torch.save(state, Path(folder) / CHECKPOINT_FILE)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder))


def _final_evaluation(model: AutoSSVH, selection: str, best: dict[str, Any], state: dict[str, Any] | None,
                      url: str, protocol: str, cfg: Config, rank: int, world: int, options: dict[str, Any],
                      device: torch.device, loader_workers: int, labels: dict[str, np.ndarray] | None) -> None:
    """All ranks encode the selected model's codes; rank 0 adds mAP@K, GMAP and precision/recall by radius to
    a last checkpoint (``final``), which the driver reads instead of evaluating in its own process."""
    import ray
    import ray.train

    chosen = [best["model"] if rank == 0 and selection == "best-map5" else None]
    if is_distributed():
        dist.broadcast_object_list(chosen, src=0)
    if chosen[0] is not None:  # a separate model: the final checkpoint keeps the last epoch's weights to resume
        model = AutoSSVH(cfg).to(device)
        model.load_state_dict(chosen[0])
    retrieval = _evaluate(model, url, protocol, cfg, rank, world, options, device, loader_workers, labels,
                          with_pr=True)
    nodes = _gather_objects(ray.get_runtime_context().get_node_id())
    if rank != 0:
        ray.train.report({})
        return
    selected = best["epoch"] if chosen[0] is not None else state["epoch"]
    state["final"] = {"selected_epoch": selected, "retrieval": _retrieval_state(retrieval)}
    metrics = {"epoch": state["epoch"], "selected_epoch": selected, "worker_nodes": nodes,
               "gmap_l2": retrieval.gmap_l2} | {f"map_at_{k}": v for k, v in retrieval.map_at_k.items()}
    _report_checkpoint(metrics, state)


# ----- driver side --------------------------------------------------------------------------------------------


def resolve_data(dataset: str, args: argparse.Namespace) -> tuple[str, dict[str, Any], list[str], FeatureStore]:
    """The data URL (a generated store without --data), its storage options, the overrides it implies (its
    frames and feature size; the reduced preset on generated data) and the opened store, checked against
    the T and F the options ask for."""
    options = storage_options_from(args.storage_options)
    overrides: list[str] = []
    if args.data:
        url = absolute_path(args.data)
    else:
        url = synthetic_store(dataset)
        overrides += REDUCED_PRESET
    store = open_store(url, options)
    check_store_shape(requested_data_shape(args), store.info, url)
    overrides += [f"data.feature_size={store.info.feature_dim}", f"data.max_frames={store.info.max_frames}"]
    return url, options, overrides, store


def resolve_run(dataset: str, args: argparse.Namespace) -> tuple[Config, str, dict[str, Any]]:
    """The run's config, data URL and storage options, checked against the store before anything starts."""
    url, options, overrides, store = resolve_data(dataset, args)
    cfg = config_from_args(dataset, args, overrides)
    check_training_inputs(cfg, store, args.workers)
    return cfg, url, options


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


def mlflow_locations(args: argparse.Namespace) -> tuple[str, str]:
    """The tracking URI (a relative SQLite path made absolute, its folder created) and the artifact location."""
    mlflow_uri = absolute_uri(args.mlflow_uri)
    if mlflow_uri.startswith("sqlite:///"):
        Path(mlflow_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    artifacts = args.mlflow_artifacts if "://" in args.mlflow_artifacts else \
        Path(args.mlflow_artifacts).resolve().as_uri()
    return mlflow_uri, artifacts


def make_trainer(cfg: Config, url: str, options: dict[str, Any], args: argparse.Namespace, name: str, actor: Any,
                 *, callbacks: list[Any] | None = None, mlflow_parent: str | None = None) -> Any:
    """The TorchTrainer of one training run (``args``: the options of :func:`add_arguments`)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    mlflow_uri, artifacts = mlflow_locations(args)
    loop = {"config": cfg.to_dict(), "data": url, "storage_options": options, "actor": actor,
            "loader_workers": args.loader_workers, "mlflow_uri": mlflow_uri, "mlflow_artifacts": artifacts,
            "experiment": args.experiment, "name": name, "selection": args.selection, "mlflow_parent": mlflow_parent}
    use_gpu = args.gpus_per_worker > 0
    resources = {"CPU": args.cpus_per_worker} | ({"GPU": args.gpus_per_worker} if use_gpu else {})
    return TorchTrainer(
        train_loop_per_worker, train_loop_config=loop,
        scaling_config=ScalingConfig(num_workers=args.workers, use_gpu=use_gpu, resources_per_worker=resources,
                                     placement_strategy=args.placement_strategy),
        run_config=RunConfig(storage_path=absolute_path(args.storage), name=name,
                             failure_config=FailureConfig(max_failures=args.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2), callbacks=callbacks),
    )


def start_actor(cfg: Config, args: argparse.Namespace, name: str) -> Any:
    """The run's clustering actor, named ``clustering-<run name>`` (restarted by Ray if it dies)."""
    from cluster.clustering_actor import create_clustering_actor

    return create_clustering_actor(cfg.cluster, num_shards=cfg.cluster.num_shards,
                                   num_gpus=min(args.gpus_per_worker, 1.0), name=f"clustering-{name}")


def selected_weights(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights a checkpoint stands for: the selected epoch's after the final evaluation, else the last."""
    final = state.get("final")
    if final is not None and final["selected_epoch"] != state["epoch"]:
        return state["best"]["model"]
    return state["model"]


def latest_checkpoint_file(run_dir: str) -> str | None:
    """``checkpoint.pt`` of the latest checkpoint Ray Train registered as complete in the run folder ``run_dir``
    (any fsspec URL); None without one. A folder being copied is not registered yet, so it is never read."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(run_dir)
    if not fs.exists(f"{path}/{CHECKPOINT_SNAPSHOT}"):
        return None
    latest = json.loads(fs.cat_file(f"{path}/{CHECKPOINT_SNAPSHOT}"))["latest_checkpoint_result"]
    return f"{run_dir.rstrip('/')}/{latest['checkpoint_dir_name']}/{CHECKPOINT_FILE}"


def finish(checkpoint: Any, cfg: Config, mlflow_uri: str, experiment: str) -> FinishedRun:
    """Read the final checkpoint and log the result files (mAP table, PR and training curves) to its MLflow run."""
    from cluster import tracking

    with checkpoint.as_directory() as folder:
        state = load_state(Path(folder) / CHECKPOINT_FILE, checkpoint.path)
    selected_epoch = state["final"]["selected_epoch"]
    model = AutoSSVH(cfg)
    model.load_state_dict(selected_weights(state))
    done = FinishedRun(model.eval(), _retrieval_from_state(state["final"]["retrieval"]), selected_epoch,
                       state["epoch"] + 1, state["mlflow_run_id"], checkpoint.path,
                       [_record_from_dict(d) for d in state["history"]])
    with tracking.start_run(mlflow_uri, experiment, run_id=done.mlflow_run_id), \
            tempfile.TemporaryDirectory() as out:
        tracking.log_final_artifacts(cfg, done.retrieval, done.history, out)
    return done


def log_and_register(done: FinishedRun, mlflow_uri: str, experiment: str, register: str | None) -> str:
    """Log the selected model as a pyfunc to its run (and register it with alias candidate); returns its URI."""
    from cluster import tracking

    with tracking.start_run(mlflow_uri, experiment, run_id=done.mlflow_run_id):
        return tracking.log_model(done.model, register=register)


def check_resume_compatible(storage: str, name: str, cfg: Config) -> None:
    """Refuse to resume run ``name`` with a model or data shape other than its checkpoint's (bits, sizes, frames):
    the weights would not load. Other settings (epochs, learning rate, ...) may change between attempts."""
    import fsspec

    checkpoint = latest_checkpoint_file(f"{absolute_path(storage).rstrip('/')}/{name}")
    if checkpoint is None:
        return
    with fsspec.open(checkpoint, "rb") as f:
        saved = load_state(f, checkpoint)["config"]
    now = cfg.to_dict()
    differs = [f"{section}.{key}={saved[section][key]!r} (now {now[section][key]!r})"
               for section in ("data", "model") for key in now[section] if saved[section].get(key) != now[section][key]]
    if differs:
        raise ValueError(f"run {name!r} in {storage} has a checkpoint of another model: {', '.join(differs)}; use "
                         "another --name (or --storage) to start a new run, or the same settings to resume it")


def run(dataset: str, args: argparse.Namespace) -> int:
    """Train ``dataset`` with Ray Train per ``args`` (see :func:`add_arguments`); returns the exit code."""
    from cluster import tracking

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    try:
        cfg, url, options = resolve_run(dataset, args)
        name = args.name or f"{dataset}-{cfg.model.nbits}bits-{cfg.recipe}"
        check_resume_compatible(args.storage, name, cfg)
        mlflow_uri, _ = mlflow_locations(args)
        tracking.check_reachable(mlflow_uri)
    except (ValueError, tracking.TrackingError) as err:  # bad config, store, option, checkpoint; MLflow down
        log.error("%s", err)
        return 2
    import ray
    from ray.train import TrainingFailedError

    init_ray(int(args.workers * args.cpus_per_worker) + 1, args.num_cpus)
    actor = start_actor(cfg, args, name)
    trainer = make_trainer(cfg, url, options, args, name, actor)
    log.info("training %s (%s recipe, %d bits, %d epochs) on %d worker(s), run %r in %s", dataset, cfg.recipe,
             cfg.model.nbits, cfg.train.num_epochs, args.workers, name, args.storage)
    start = time.perf_counter()
    try:
        result = trainer.fit()
    except TrainingFailedError as err:
        log.error("training failed: %s", err)
        log.error("the last checkpoint is kept under %s/%s; re-run the same command to resume from it",
                  args.storage, name)
        return 1
    finally:
        ray.kill(actor)
    wall = time.perf_counter() - start
    if result.checkpoint is None:
        log.error("the run ended without a checkpoint")
        return 1
    done = finish(result.checkpoint, cfg, mlflow_uri, args.experiment)
    register = args.register or (None if args.data else f"autossvh-{dataset}-synthetic")
    model_uri = log_and_register(done, mlflow_uri, args.experiment, register)
    title = (f"{dataset}, {cfg.model.nbits} bits, recipe {cfg.recipe}, epoch {done.selected_epoch + 1} "
             f"({args.selection})")
    print(done.retrieval.table(title))
    print(f"model: {model_uri}\nMLflow run {done.mlflow_run_id}: mlflow ui --backend-store-uri {mlflow_uri}")
    if args.summary_json is not None:
        summary = {"dataset": dataset, "recipe": cfg.recipe, "nbits": cfg.model.nbits,
                   "epochs": cfg.train.num_epochs, "epochs_run": done.epochs_run, "selected_epoch": done.selected_epoch,
                   "map_at_k": {str(k): v for k, v in done.retrieval.map_at_k.items()},
                   "gmap_l2": done.retrieval.gmap_l2, "wall_seconds": wall, "mlflow_run_id": done.mlflow_run_id,
                   "model_uri": model_uri, "workers": args.workers, "worker_nodes": result.metrics.get("worker_nodes"),
                   "checkpoint": done.checkpoint_path}
        args.summary_json.parent.mkdir(parents=True, exist_ok=True)
        args.summary_json.write_text(json.dumps(summary, indent=2))
    return 0
