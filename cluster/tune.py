"""Hyperparameter sweeps: Ray Tune over the Ray Train entry (``jobs/tune.py``).

Each trial is a Tune function that builds and fits its own ``TorchTrainer`` (the Ray Train V2 pattern) with
``cluster.train.make_trainer``; ``TuneReportCallback`` forwards rank 0's per-epoch reports to Tune. ASHA stops
weak trials early on the validation ``map_at_5`` (``time_attr="epoch"``, ``--grace-period``, reduction factor 2);
Optuna's TPE sampler (seeded by ``--seed``) proposes the configurations.

Search space (the rest of the config is the preset with ``--recipe``/``--config``/``--set``)::

    train.lr                     log-uniform [1e-5, 1e-3]
    loss.a                       uniform [0.1, 2.0]      view-contrastive weight
    loss.b                       uniform [0.05, 1.0]     P2Set weight
    sampler.mask_prob            uniform [0.3, 0.8]      share of frames each view hides (mask ratio)
    loss.p2set_temperature       log-uniform [0.05, 1.0]  (paper recipe: voted centres)
    sampler.tau                  log-uniform [0.1, 10]    (paper recipe: the sampler's Gumbel noise level)
    cluster.kmeans_temperature   log-uniform [0.05, 1.0]  (released recipe: mean prototype density)
    cluster_scale                one of 0.5, 1, 1.5, 2: cluster.num_cluster = the preset's counts x scale

Validation, never the test queries: trials train and are scored on a store carved once from the training split
(``storage.validation``; ``--val-fraction`` of the training chunks become the queries, the rest is both the
training set and the database), stored under ``<--storage>/validation/``. The test split is not read by a sweep.

Resources: each trial runs ``--workers`` Train workers of ``--cpus-per-worker`` CPUs and ``--gpus-per-worker``
GPUs (default: 1 when the cluster has GPUs, else 0), plus its Tune function (``cluster.runtime.TRIAL_DRIVER_CPUS``).
``--max-concurrent`` defaults to as many trials as the cluster's GPUs (or CPUs) hold; more than the local Ray
holds is refused before Ray starts (``cluster.runtime.trials_at_once``).

MLflow: one parent run for the sweep (its config, search space and the best trial's scores) with one child run
per trial (params, per-epoch metrics, result files). The best finished trial's selected model is logged to its
child run and registered under ``--register`` (default ``autossvh-<dataset>-sweep``) with alias ``candidate``.
Every run ends FINISHED, FAILED or KILLED (a trial ASHA stops, with the reason; the parent when the job is
stopped) and the console has a line per trial: :mod:`cluster.trials`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from autossvh.config import Config, config_from_dict, set_value
from cluster import tracking
from cluster.preflight import check_count, check_destinations, check_run_options, check_training_inputs
from cluster.runtime import (
    TRIAL_DRIVER_CPUS,
    absolute_path,
    configure_logging,
    init_ray,
    local_resources,
    mlflow_locations,
    trial_resources,
    trials_at_once,
)
from cluster.train import add_arguments as add_train_arguments
from cluster.train import (
    fit_trial,
    log_and_register,
    read_final_checkpoint,
    resolve_run,
)
from storage.validation import carve_validation_store

log = logging.getLogger(__name__)

METRIC = "map_at_5"
CLUSTER_SCALES = (0.5, 1.0, 1.5, 2.0)


def search_space(recipe: str) -> dict[str, Any]:
    """The sampled keys; the temperature and sampler keys are those that act under ``recipe``."""
    from ray import tune

    space = {
        "train.lr": tune.loguniform(1e-5, 1e-3),
        "loss.a": tune.uniform(0.1, 2.0),
        "loss.b": tune.uniform(0.05, 1.0),
        "sampler.mask_prob": tune.uniform(0.3, 0.8),
        "cluster_scale": tune.choice(list(CLUSTER_SCALES)),
    }
    if recipe == "paper":
        return space | {"loss.p2set_temperature": tune.loguniform(0.05, 1.0), "sampler.tau": tune.loguniform(0.1, 10.0)}
    return space | {"cluster.kmeans_temperature": tune.loguniform(0.05, 1.0)}


def trial_config(base: dict[str, Any], params: dict[str, Any]) -> Config:
    """The base config with one trial's sampled values; ``cluster_scale`` scales every granularity."""
    cfg = config_from_dict(base)
    for key, value in params.items():
        if key == "cluster_scale":
            set_value(cfg, "cluster.num_cluster", [max(2, round(k * value)) for k in cfg.cluster.num_cluster])
        else:
            set_value(cfg, key, value)
    return cfg.validate()


def _trial(params: dict[str, Any], sweep: dict[str, Any]) -> None:
    """One trial: a TorchTrainer on the validation store, its epochs forwarded to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    configure_logging(force=True)
    cfg = trial_config(sweep["config"], params)
    args = argparse.Namespace(**sweep["args"])
    name = f"{sweep['name']}-{tune.get_context().get_trial_id()}"
    title = f"{sweep['label']} (validation), {cfg.model.nbits} bits, trial {name}"
    fit_trial(cfg, args, sweep, name, [TuneReportCallback()], title)


def sweep_tuner(cfg: Config, sweep: dict[str, Any], args: argparse.Namespace, concurrent: int) -> Any:
    """The Tuner of a sweep: Optuna's TPE (seeded) proposes, ASHA stops weak trials on the validation mAP@5; a
    line per trial and the trials' MLflow runs ended as they end (:class:`cluster.trials.TrialTrail`)."""
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from cluster.trials import TrialTrail, tune_run_options

    epochs = cfg.train.num_epochs
    grace = min(args.grace_period, epochs)
    trail = TrialTrail(args.mlflow_uri, sweep["parent_run_id"], args.trials,
                       lambda trial: f"{sweep['name']}-{trial.trial_id}", epochs,
                       stopper=f"ASHA on the validation {METRIC} (grace period {grace} epochs, reduction factor 2)")
    return tune.Tuner(
        tune.with_resources(tune.with_parameters(_trial, sweep=sweep), {"CPU": TRIAL_DRIVER_CPUS}),
        param_space=search_space(cfg.recipe),
        tune_config=tune.TuneConfig(
            metric=METRIC, mode="max", num_samples=args.trials, max_concurrent_trials=concurrent,
            search_alg=OptunaSearch(sampler=optuna.samplers.TPESampler(seed=args.seed)),
            scheduler=ASHAScheduler(time_attr="epoch", max_t=epochs, grace_period=grace, reduction_factor=2),
        ),
        run_config=tune.RunConfig(storage_path=args.storage, name=sweep["name"], callbacks=[trail],
                                  **tune_run_options(args.verbose)),
    )


def register_best(best: Any, best_cfg: Config, best_params: dict[str, Any], args: argparse.Namespace,
                  default_name: str, parent_run_id: str, label: str, data: str) -> tuple[Any, str]:
    """Log the best trial's selected model to its child run, register it (alias candidate) and record the best
    scores and parameters on the parent run; returns the finished run and the model URI."""
    import mlflow
    from ray.train import Checkpoint

    done = read_final_checkpoint(Checkpoint(best.metrics["checkpoint_path"]), best_cfg)
    card = tracking.model_card(f"{label} (validation)", data, best_cfg, done.retrieval, done.selected_epoch + 1,
                               "last")
    model_uri = log_and_register(done, args.mlflow_uri, args.experiment, args.register or default_name, card)
    with tracking.start_run(args.mlflow_uri, args.experiment, run_id=parent_run_id):
        mlflow.log_metrics({f"best_{k}": v for k, v in best.metrics.items() if k.startswith("map_at_")})
        mlflow.set_tags({"best_trial_run_id": done.mlflow_run_id, "best_model_uri": model_uri})
        mlflow.log_dict(best_params, "best_params.json")
    return done, model_uri


def min_cpus(args: argparse.Namespace) -> int:
    """The CPUs a local Ray needs for one trial: its Train workers, its Tune function and one to spare."""
    return int(args.workers * args.cpus_per_worker) + 2


def run_sweep(dataset: str, args: argparse.Namespace) -> int:
    """The sweep per ``args`` (see :func:`add_arguments`); returns the exit code."""
    import ray

    configure_logging(args.verbose)
    name = args.name or f"{dataset}-sweep"
    try:
        check_run_options(args)
        check_count(args.max_concurrent, "--max-concurrent", 1)
        local = local_resources(min_cpus(args), args.num_cpus)
        if local is not None:  # the local Ray's resources are known before it starts
            trials_at_once(args, local, args.trials)
        args.overrides = [*args.overrides, "train.eval_every=1"]  # ASHA reads the validation mAP every epoch
        cfg, url, options, source = resolve_run(dataset, args)
        label = source.label
        storage = absolute_path(args.storage)
        mlflow_uri, artifacts = mlflow_locations(args.mlflow_uri, args.mlflow_artifacts)
        check_destinations(storage, name, mlflow_uri, artifacts)
        tracking.check_reachable(mlflow_uri)
        val_url = f"{storage.rstrip('/')}/validation/{dataset}-{name}-f{args.val_fraction}-s{args.seed}"
        store = carve_validation_store(url, val_url, args.val_fraction, args.seed, options)
        check_training_inputs(cfg, store, args.workers, args.val_videos)
    except (ValueError, tracking.TrackingError) as err:
        log.error("%s", err)
        return 2
    from cluster.trials import JobStopped, stopping_ends_runs

    init_ray(min_cpus(args), args.num_cpus, args.verbose)
    args.gpus_per_worker, _ = trial_resources(args, ray.cluster_resources())
    concurrent = trials_at_once(args, ray.cluster_resources(), args.trials)
    parent_run_id = tracking.create_run(
        mlflow_uri, args.experiment, name, artifact_location=artifacts, tags=tracking.run_tags(sys.argv[0], label, cfg),
        params=tracking.config_params(cfg, {"data": url, "validation_data": val_url, "storage_options": options,
                                            "trials": args.trials, "max_concurrent": concurrent, "sweep": True}))
    # Trials run in their own working folders: every path they get is absolute.
    args.storage, args.mlflow_uri, args.mlflow_artifacts = storage, mlflow_uri, artifacts
    trial_args = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    sweep = {"config": cfg.to_dict(), "args": trial_args, "url": val_url, "options": options, "name": name,
             "label": label, "script": sys.argv[0], "parent_run_id": parent_run_id}
    log.info("sweep %r: %d trials, %d at a time, %d worker(s) x %.3g GPU each, validation store %s; Ray's own "
             "output is in its session logs%s", name, args.trials, concurrent, args.workers, args.gpus_per_worker,
             val_url, "" if args.verbose else " (--verbose shows it)")
    try:
        with stopping_ends_runs(mlflow_uri, parent_run_id):
            return finish_sweep(sweep_tuner(cfg, sweep, args, concurrent).fit(), cfg, args, dataset, sweep, concurrent)
    except JobStopped as stopped:
        log.error("stopped by %s: the MLflow parent run and the trials that were running are marked KILLED",
                  stopped)
        return 128 + stopped.signum


def finish_sweep(grid: Any, cfg: Config, args: argparse.Namespace, dataset: str, sweep: dict[str, Any],
                 concurrent: int) -> int:
    """Register the best finished trial of ``grid``, print and write the summary, and end the parent run (FAILED
    when no trial finished); returns the exit code."""
    name, parent_run_id, val_url, label = sweep["name"], sweep["parent_run_id"], sweep["url"], sweep["label"]
    storage, mlflow_uri = args.storage, args.mlflow_uri
    finished = [r for r in grid if r.error is None and r.metrics and r.metrics.get("selected_epoch") is not None]
    if not finished:
        log.error("no trial finished (%d errored); see the trial logs under %s/%s", grid.num_errors, storage, name)
        tracking.end_run(mlflow_uri, parent_run_id, "FAILED", f"no trial finished ({grid.num_errors} errored)")
        return 1
    best = max(finished, key=lambda r: r.metrics[METRIC])
    best_params = {k: best.config[k] for k in search_space(cfg.recipe)}
    done, model_uri = register_best(best, trial_config(cfg.to_dict(), best_params), best_params, args,
                                    f"autossvh-{dataset}-sweep", parent_run_id, label, val_url)
    print(done.retrieval.table(f"sweep {name}: best of {len(finished)} finished trials (validation queries)"))
    print(f"best params: {json.dumps(best_params)}")
    print(f"model: {model_uri}\nMLflow parent run {parent_run_id}\n{tracking.ui_hint(mlflow_uri, parent_run_id)}")
    if args.summary_json is not None:
        summary = {"dataset": dataset, "trials": args.trials, "finished": len(finished), "errored": grid.num_errors,
                   "max_concurrent": concurrent, "best_params": best_params,
                   "best_map_at_k": {str(k): v for k, v in done.retrieval.map_at_k.items()},
                   "parent_run_id": parent_run_id, "best_run_id": done.mlflow_run_id, "model_uri": model_uri,
                   "validation_data": val_url}
        args.summary_json.parent.mkdir(parents=True, exist_ok=True)
        args.summary_json.write_text(json.dumps(summary, indent=2))
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_train_arguments(parser)
    parser.add_argument("--dataset", required=True, choices=["activitynet", "fcvid", "ucf101", "hmdb51"],
                        help="the preset (and, without --data, the kind of generated store) to sweep")
    parser.add_argument("--trials", type=int, default=8, help="configurations to try")
    parser.add_argument("--max-concurrent", type=int, help="trials at once (default: what the cluster holds)")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="share of training chunks held out")
    parser.add_argument("--grace-period", type=int, default=2, help="ASHA: epochs before a trial can be stopped")
    parser.add_argument("--seed", type=int, default=0, help="Optuna sampler and validation split seed")
    parser.set_defaults(workers=1, name=None)
