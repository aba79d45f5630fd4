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
from mlflow.tracking import MlflowClient

from cluster.retrieval import evaluate_model, load_model_ref
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ray = pytest.importorskip("ray")

EPOCHS = 3
OVERRIDES = [*TINY, "cluster.warmup_epoch=1", "train.eval_every=2", "train.test_batch_size=64"]


@pytest.fixture(scope="module")
def ray_session() -> str:
    """One local Ray instance for the module (4 logical CPUs: 2 workers, controller, driver-side tasks)."""
    ray.init(num_cpus=4, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}})
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def store_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    from storage.synthetic_store import write_synthetic

    url = str(tmp_path_factory.mktemp("data") / "ucf101-tiny")
    write_synthetic(url, "ucf101", 160, feature_dim=16, max_frames=8, num_classes=8, seed=1)
    return url


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


def test_two_worker_run_logs_checkpoints_and_registers(ray_session, store_url, tmp_path, capsys):
    from cluster.train import run

    assert run("ucf101", parse([*job_args(tmp_path, store_url, "tiny"), "--selection", "best-map5"])) == 0
    out = capsys.readouterr().out
    assert "mAP@5" in out and "GMAP(L2)" in out and "models:/tiny-ucf@candidate" in out and "mlflow ui" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["epochs_run"] == EPOCHS and summary["workers"] == 2 and summary["nbits"] == 16
    assert 0 < summary["map_at_k"]["5"] <= 1 and summary["gmap_l2"] > 0
    assert summary["model_uri"] == "models:/tiny-ucf@candidate"
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run_id = summary["mlflow_run_id"]
    assert epoch_steps(client, run_id, "loss") == [0, 1, 2]
    assert epoch_steps(client, run_id, "map_at_5") == [1, 2]  # eval_every=2 and the last epoch
    map5 = {m.step: m.value for m in client.get_metric_history(run_id, "map_at_5")}
    assert summary["selected_epoch"] == max(map5, key=lambda step: (map5[step], -step))  # first best on a tie
    assert summary["map_at_k"]["5"] == pytest.approx(map5[summary["selected_epoch"]], abs=1e-12)
    selected = load_model_ref(summary["checkpoint"])  # the checkpoint's selected model, as jobs/evaluate.py loads it
    assert evaluate_model(selected, store_url).map_at_k[5] == pytest.approx(summary["map_at_k"]["5"], abs=1e-12)
    assert epoch_steps(client, run_id, "kmeans_objective_k5") == [1, 2]  # clustering from epoch 1
    params = client.get_run(run_id).data.params
    assert params["world_size"] == "2" and params["model.nbits"] == "16"
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"map_table.json", "training_curve.png", "pr_curve.png", "config.yaml"} <= names
    version = client.get_model_version_by_alias("tiny-ucf", "candidate")
    assert version.run_id == run_id
    assert (tmp_path / "ray" / "tiny").is_dir()


def test_killed_run_resumes_from_its_checkpoint_and_mlflow_run(ray_session, store_url, tmp_path):
    argv = [sys.executable, str(ROOT / "jobs" / "train_ucf101.py"), *job_args(tmp_path, store_url, "resume"),
            "--set", "train.eval_every=1", "--set", "cluster.num_shards=2"]  # sharded k-means through Ray too
    env = {**os.environ, "RAY_ADDRESS": ray_session, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    run_dir = tmp_path / "ray" / "resume"
    snapshot = run_dir / "checkpoint_manager_snapshot.json"  # written once a reported checkpoint is registered
    while time.monotonic() < deadline and not snapshot.exists():
        assert proc.poll() is None, "the job ended before registering a checkpoint"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert snapshot.exists(), "no checkpoint within 120 s"
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "resumed from the checkpoint" in done.stderr + done.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert epoch_steps(client, summary["mlflow_run_id"], "loss") == [0, 1, 2]
    assert len(client.search_runs([client.get_experiment_by_name("tests").experiment_id])) == 1
