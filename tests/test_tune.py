"""A tiny sweep end to end: Ray Tune trials that each fit a TorchTrainer on a validation store carved from the
training split, ASHA + Optuna, MLflow parent and child runs, the best model registered as candidate."""

from __future__ import annotations

import argparse
import json
import logging

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from storage.store import open_store
from storage.synthetic_store import write_synthetic
from storage.validation import carve_validation_store, held_out_rows
from tests.conftest import TINY


@pytest.fixture(scope="module")
def store_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = str(tmp_path_factory.mktemp("tune") / "ucf101-tiny")
    write_synthetic(url, "ucf101", 160, feature_dim=16, max_frames=8, num_classes=8, seed=2, chunk_videos=8)
    return url


def test_validation_store_holds_out_whole_chunks_of_train_only(store_url, tmp_path):
    source = open_store(store_url)
    carved = carve_validation_store(store_url, str(tmp_path / "val"), fraction=0.25, seed=1)
    held = held_out_rows(160, 8, 0.25, 1)
    assert carved.info.protocol == "database_is_train" and len(held) == 40 and len(held) % 8 == 0
    assert carved.num_videos("query") == 40 and carved.num_videos("train") == 120
    train_ids = np.asarray(source.split("train").video_ids[:]).astype(object).astype(str)
    query_ids = set(np.asarray(carved.split("query").video_ids[:]).astype(object).astype(str))
    kept_ids = set(np.asarray(carved.split("train").video_ids[:]).astype(object).astype(str))
    assert query_ids == set(train_ids[held]) and not query_ids & kept_ids
    assert query_ids | kept_ids == set(train_ids)  # nothing from the test queries
    feats, labels = carved.load("query")
    src_feats, src_labels = source.load("train")
    assert np.array_equal(feats, src_feats[held]) and np.array_equal(labels, src_labels[held])
    again = carve_validation_store(store_url, str(tmp_path / "val"), fraction=0.25, seed=1)  # found, not rewritten
    assert again.info.sources == carved.info.sources


def test_sweep_runs_trials_logs_children_and_registers_the_best(ray_session, store_url, tmp_path, monkeypatch,
                                                                capfd, caplog):
    from cluster.tune import add_arguments, run_sweep

    caplog.set_level(logging.INFO, logger="cluster.trials")

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    monkeypatch.chdir(tmp_path)  # relative paths, as the README's command uses: trials run in other folders
    argv = ["--dataset", "ucf101", "--data", store_url, "--trials", "3", "--max-concurrent", "1", "--epochs", "3",
            "--grace-period", "1", "--storage", "ray", "--name", "sweep", "--mlflow-uri", "sqlite:///mlflow.db",
            "--mlflow-artifacts", "art", "--experiment", "tune-tests", "--register", "tiny-sweep",
            "--summary-json", "sweep.json", "--max-failures", "0", "--val-fraction", "0.25"]
    for item in [*TINY, "cluster.warmup_epoch=1", "train.test_batch_size=64"]:
        argv += ["--set", item]
    assert run_sweep("ucf101", parser.parse_args(argv)) == 0
    output = "".join(capfd.readouterr())
    for noise in ("Trial status", "View detailed results", "tensorboard", "Trial _trial", "(raylet)", "╭"):
        assert noise not in output, noise  # as quiet as a training job: Ray Tune's reporter stays off
    trial_lines = [line for line in caplog.messages if line.startswith("trial sweep-")]
    assert len(trial_lines) == 3, caplog.messages  # one line per trial, finished or stopped early
    summary = json.loads((tmp_path / "sweep.json").read_text())
    assert summary["finished"] >= 1 and summary["model_uri"] == "models:/tiny-sweep@candidate"
    assert set(summary["best_params"]) >= {"train.lr", "loss.a", "loss.b", "sampler.mask_prob",
                                           "loss.p2set_temperature", "sampler.tau"}
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("tune-tests").experiment_id
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{summary['parent_run_id']}'")
    assert len(children) == 3
    statuses = {run.info.run_name: run.info.status for run in children}
    assert set(statuses.values()) <= {"FINISHED", "KILLED"}, statuses  # none left RUNNING
    for run in children:  # a trial ASHA stopped says so in its run and on the console
        stopped = run.info.status == "KILLED"
        assert stopped == ("stopped after epoch" in run.data.tags.get("autossvh.end_reason", "")), run.data.tags
        assert stopped == any(f"trial {run.info.run_name} stopped after epoch" in line for line in trial_lines)
    lrs = {float(run.data.params["train.lr"]) for run in children}
    assert len(lrs) == 3  # each trial ran its own sampled configuration
    assert all(client.get_metric_history(run.info.run_id, "map/at_5") for run in children)
    version = client.get_model_version_by_alias("tiny-sweep", "candidate")
    assert version.run_id == summary["best_run_id"] in {run.info.run_id for run in children}
    parent = client.get_run(summary["parent_run_id"])
    assert parent.data.metrics["best_map_at_5"] == pytest.approx(max(
        run.data.metrics["map/at_5"] for run in children if run.info.status == "FINISHED"), abs=1e-9)


def test_trials_that_asha_stops_end_killed_with_the_reason(ray_session, tmp_path, caplog):
    """Real Ray Tune under ASHA with a tiny function trial that keeps its own MLflow child run (as a sweep's Train
    run does): the trials ASHA stops end KILLED, saying when and at what score; the one that runs out ends
    FINISHED; each says so in one line."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from cluster import tracking
    from cluster.trials import TrialTrail, tune_run_options

    caplog.set_level(logging.INFO, logger="cluster.trials")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    parent = tracking.create_run(uri, "asha", "sweep", artifact_location=(tmp_path / "art").as_uri())

    def trial(config: dict) -> None:
        run_id = tracking.child_run(uri, "asha", f"sweep-{tune.get_context().get_trial_id()}", parent, {})
        for epoch in range(4):
            tune.report({"epoch": epoch, "map_at_5": config["quality"] * (epoch + 1)})
        tracking.end_run(uri, run_id, "FINISHED")  # as a Train run that ran all its epochs

    trail = TrialTrail(uri, parent, 3, lambda t: f"sweep-{t.trial_id}", 4, stopper="ASHA")
    grid = tune.Tuner(
        tune.with_resources(trial, {"CPU": 0.25}),
        param_space={"quality": tune.grid_search([0.5, 0.1, 0.05])},  # the first sets the bar the others miss
        tune_config=tune.TuneConfig(metric="map_at_5", mode="max", max_concurrent_trials=1,
                                    scheduler=ASHAScheduler(time_attr="epoch", max_t=4, grace_period=1,
                                                            reduction_factor=2)),
        run_config=tune.RunConfig(storage_path=str(tmp_path / "ray"), name="asha", callbacks=[trail],
                                  **tune_run_options(False)),
    ).fit()
    assert grid.num_errors == 0
    runs = {run.info.run_name: run for run in tracking.children(uri, parent)}
    status = {name: run.info.status for name, run in runs.items()}
    assert sorted(status.values()) == ["FINISHED", "KILLED", "KILLED"], status
    for name, run in runs.items():
        reason = run.data.tags.get(tracking.END_REASON_TAG, "")
        if run.info.status == "KILLED":
            assert reason.startswith("stopped after epoch 2 of 4 by ASHA: mAP@5 "), reason
            assert any(line.startswith(f"trial {name} {reason}") for line in caplog.messages), caplog.messages
        else:
            assert not reason and any(line.startswith(f"trial {name} finished") for line in caplog.messages)
