"""The Ray Train entry end to end: 2 CPU workers through real Ray, a Zarr store on disk, faiss clustering
and a SQLite MLflow store (tiny model; about a minute or two on 2 cores)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from cluster.retrieval import evaluate_on_store, load_model_ref
from tests.conftest import ROOT, TINY

EPOCHS = 3
OVERRIDES = [*TINY, "cluster.warmup_epoch=1", "train.eval_every=2", "train.test_batch_size=64"]


def job_args(tmp: Path, store: str, name: str) -> list[str]:
    args = ["--data", store, "--epochs", str(EPOCHS), "--workers", "2", "--storage", str(tmp / "ray"),
            "--name", name, "--mlflow-uri", f"sqlite:///{tmp}/mlflow.db", "--mlflow-artifacts", str(tmp / "art"),
            "--experiment", "tests", "--register", "tiny-ucf", "--summary-json", str(tmp / "summary.json"),
            "--max-failures", "0"]
    for item in OVERRIDES:
        args += ["--set", item]
    return args


def parse(argv: list[str]) -> argparse.Namespace:
    from cluster.train import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def epoch_steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def warm_starts(client: MlflowClient, run_id: str, granularity: str) -> dict[int, float]:
    """Epoch (from 1) → whether that epoch's k-means of ``granularity`` (``k5``) started warm, from the run's
    ``clustering_rounds.csv``."""
    import csv
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        with open(client.download_artifacts(run_id, "clustering_rounds.csv", folder)) as table:
            return {int(row["epoch"]): float(row["warm_start"]) for row in csv.DictReader(table)
                    if row["granularity"] == granularity}


def test_two_worker_run_logs_checkpoints_and_registers(ray_session, tiny_store_url, tmp_path, capsys):
    from cluster.train import run

    assert run("ucf101", parse([*job_args(tmp_path, tiny_store_url, "tiny"), "--selection", "best-map5"])) == 0
    out = capsys.readouterr().out
    assert "mAP@5" in out and "GMAP(L2)" in out and "models:/tiny-ucf@candidate" in out and "mlflow ui" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["epochs_run"] == EPOCHS and summary["workers"] == 2 and summary["nbits"] == 16
    assert 0 < summary["map_at_k"]["5"] <= 1 and summary["gmap_l2"] > 0
    assert summary["model_uri"] == "models:/tiny-ucf@candidate"
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run_id = summary["mlflow_run_id"]
    assert epoch_steps(client, run_id, "loss/total") == [1, 2, 3]  # MLflow steps count epochs from 1
    assert epoch_steps(client, run_id, "map/at_5") == [2, 3]  # eval_every=2 and the last epoch
    map5 = {m.step: m.value for m in client.get_metric_history(run_id, "map/at_5")}
    assert summary["selected_epoch"] == max(map5, key=lambda step: (map5[step], -step))  # first best on a tie
    assert summary["map_at_k"]["5"] == pytest.approx(map5[summary["selected_epoch"]], abs=1e-12)
    state = torch.load(Path(summary["checkpoint"]) / "checkpoint.pt", weights_only=True)
    assert state["best_model"] is not None and state["best_epoch"] + 1 == summary["selected_epoch"]  # 0-based
    selected = load_model_ref(summary["checkpoint"])  # the checkpoint's selected model, as jobs/evaluate.py loads it
    assert evaluate_on_store(selected, tiny_store_url).map_at_k[5] == pytest.approx(summary["map_at_k"]["5"], abs=1e-12)
    assert epoch_steps(client, run_id, "cluster/kmeans_objective_k5") == [2, 3]  # clustering from the 2nd epoch
    assert warm_starts(client, run_id, "k5") == {2: 0.0, 3: 1.0}  # the first round is cold, the next starts from it
    params = client.get_run(run_id).data.params
    assert params["world_size"] == "2" and params["model.nbits"] == "16"
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"map_table.json", "training_curve.png", "pr_curve.png", "config.yaml"} <= names
    version = client.get_model_version_by_alias("tiny-ucf", "candidate")
    assert version.run_id == run_id
    assert (tmp_path / "ray" / "tiny").is_dir()
    agreement = {m.step: m.value for m in client.get_metric_history(run_id, "map/knn_agreement")}
    assert sorted(agreement) == [2, 3] and all(0 < v <= 1 for v in agreement.values())


def test_the_label_free_selection_picks_the_epoch_of_best_knn_agreement(ray_session, tiny_store_url, tmp_path):
    from cluster.train import run

    argv = [*job_args(tmp_path, tiny_store_url, "select"), "--selection", "knn-agreement", "--set",
            "train.eval_every=1"]
    assert run("ucf101", parse(argv)) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    agreement = {m.step: m.value for m in client.get_metric_history(summary["mlflow_run_id"], "map/knn_agreement")}
    assert sorted(agreement) == [1, 2, 3]
    assert summary["selected_epoch"] == max(agreement, key=lambda step: (agreement[step], -step))


def test_the_validation_selection_picks_the_epoch_of_best_val_map5_and_never_clusters_held_out_videos(
        ray_session, tiny_store_url, tmp_path, capsys):
    """``--val-videos 24``: the held-out videos' leave-one-out mAP@5 is logged at every evaluation and selects the
    epoch; the clustering numbers only the other 136 videos (the reader's exclusion: ``test_reader.py``)."""
    from cluster.train import run

    argv = [*job_args(tmp_path, tiny_store_url, "val"), "--selection", "best-val-map5", "--val-videos", "24",
            "--set", "train.eval_every=1"]
    assert run("ucf101", parse(argv)) == 0
    assert "val mAP@5" in capsys.readouterr().err  # the epoch lines
    summary = json.loads((tmp_path / "summary.json").read_text())
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run_id = summary["mlflow_run_id"]
    val_map5 = {m.step: m.value for m in client.get_metric_history(run_id, "map/val_map5")}
    assert sorted(val_map5) == [1, 2, 3] and all(0 <= v <= 1 for v in val_map5.values())
    assert summary["selected_epoch"] == max(val_map5, key=lambda step: (val_map5[step], -step))  # first best
    params = client.get_run(run_id).data.params
    assert params["selection"] == "best-val-map5" and params["val_videos"] == "24"
    state = torch.load(Path(summary["checkpoint"]) / "checkpoint.pt", weights_only=True)
    assert state["val_videos"] == 24 and state["best_epoch"] + 1 == summary["selected_epoch"]
    assert state["best_map5"] == pytest.approx(val_map5[summary["selected_epoch"]], abs=1e-12)
    assert {len(a) for a in state["clustering"]["im2cluster"]} == {160 - 24}


def registered_checkpoints(run_dir: Path) -> set[str]:
    """Checkpoint folders Ray Train registered as complete (its snapshot file; absent before the first)."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    if not snapshot.exists():
        return set()
    try:
        return {c["checkpoint_dir_name"] for c in json.loads(snapshot.read_text())["checkpoint_results"]}
    except json.JSONDecodeError:  # being rewritten
        return set()


def test_job_killed_during_a_checkpoint_upload_resumes_cleanly(ray_session, tiny_store_url, tmp_path):
    """The job process is killed as soon as a checkpoint folder appears that Ray has not registered yet (the
    upload or its registration in progress), and a half-written newer checkpoint is left behind: re-running the
    same name resumes from the last registered checkpoint and continues the same MLflow run, every epoch logged
    exactly once. Sharded k-means (cluster.num_shards=2) runs through Ray here too."""
    argv = [sys.executable, str(ROOT / "jobs" / "train_ucf101.py"), *job_args(tmp_path, tiny_store_url, "resume"),
            "--set", "train.eval_every=1", "--set", "cluster.num_shards=2"]
    env = {**os.environ, "RAY_ADDRESS": ray_session, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    run_dir = tmp_path / "ray" / "resume"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not registered_checkpoints(run_dir):
        assert proc.poll() is None, "the job ended before registering a checkpoint"
        time.sleep(0.02)
    caught = False
    while time.monotonic() < deadline and proc.poll() is None and not caught:
        caught = bool({p.name for p in run_dir.glob("checkpoint_*")} - registered_checkpoints(run_dir))
        if not caught:
            time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert caught, "the kill missed: no unregistered checkpoint folder was seen while the job ran"
    registered = registered_checkpoints(run_dir)
    assert registered, "no checkpoint within 120 s"
    assert not (tmp_path / "summary.json").exists()  # the kill hit the run before it finished
    latest = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())["latest_checkpoint_result"]
    state = torch.load(run_dir / latest["checkpoint_dir_name"] / "checkpoint.pt", weights_only=True)
    assert state["final"] is None  # the resume below has training (or the final evaluation) left to do
    partial = run_dir / "checkpoint_9999-12-31_23-59-59.999999"  # newer than any real one: an interrupted copy
    partial.mkdir()
    (partial / "checkpoint.pt").write_bytes(b"PK\x03\x04 truncated")
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "resumed from the checkpoint" in done.stderr + done.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert epoch_steps(client, summary["mlflow_run_id"], "loss/total") == [1, 2, 3]
    assert epoch_steps(client, summary["mlflow_run_id"], "map/at_5") == [1, 2, 3]
    assert len(client.search_runs([client.get_experiment_by_name("tests").experiment_id])) == 1
    assert load_model_ref(str(run_dir)).cfg.model.nbits == 16  # the run folder resolves to a registered checkpoint
