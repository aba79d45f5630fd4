"""Faults the Ray training survives and unsafe input it refuses, each through real Ray, Zarr, faiss and MLflow:
a Train worker killed mid-run, the clustering actor killed during a round, a run that diverges (non-finite
losses), a checkpoint carrying pickled code, and the local Ray bound to 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from mlflow.tracking import MlflowClient

from tests.chaos import HeldClusteringActor, RoundGate, process_cmdlines
from tests.conftest import ROOT, TINY
from tests.test_ray_train import epoch_steps, parse, registered_checkpoints, warm_starts


def job_args(tmp: Path, store: str, name: str, epochs: int, *overrides: str) -> list[str]:
    args = ["--data", store, "--epochs", str(epochs), "--workers", "2", "--storage", str(tmp / "ray"),
            "--name", name, "--mlflow-uri", f"sqlite:///{tmp}/mlflow.db", "--mlflow-artifacts", str(tmp / "art"),
            "--experiment", "reliability", "--summary-json", str(tmp / "summary.json"), "--max-failures", "0"]
    for item in [*TINY, "train.test_batch_size=64", *overrides]:
        args += ["--set", item]
    return args


def train_worker_pids() -> list[int]:
    """Processes of live Ray Train workers (their process title names the actor class)."""
    return [pid for pid, cmdline in process_cmdlines() if "RayTrainWorker" in cmdline]


def test_a_killed_train_worker_is_replaced_from_the_last_checkpoint(ray_session, tiny_store_url, tmp_path):
    argv = [sys.executable, str(ROOT / "jobs" / "train_ucf101.py"),
            *job_args(tmp_path, tiny_store_url, "worker-kill", 6, "cluster.warmup_epoch=1"), "--max-failures", "2"]
    env = {**os.environ, "RAY_ADDRESS": ray_session, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()
    run_dir, deadline = tmp_path / "ray" / "worker-kill", time.monotonic() + 120
    while time.monotonic() < deadline and not registered_checkpoints(run_dir):
        assert proc.poll() is None, "".join(output)[-3000:]
        time.sleep(0.02)
    pids = train_worker_pids()
    assert len(pids) == 2, pids
    os.kill(pids[-1], signal.SIGKILL)  # mid-run: the first checkpoint is registered, epoch 2 of 6 is training
    try:
        assert proc.wait(timeout=300) == 0, "".join(output)[-4000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    reader.join(timeout=10)
    log = "".join(output)
    assert "resumed from the checkpoint" in log
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["epochs_run"] == 6
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert epoch_steps(client, summary["mlflow_run_id"], "loss/total") == list(range(1, 7))
    assert epoch_steps(client, summary["mlflow_run_id"], "cluster/kmeans_objective_k5") == list(range(2, 7))


def test_the_clustering_actor_killed_during_a_round_is_restarted_and_the_round_redone(
        ray_session, tiny_store_url, tmp_path, monkeypatch, capfd):
    import ray

    from cluster import train

    gate = ray.remote(RoundGate).options(name="round-gate", num_cpus=0, max_concurrency=8).remote()

    def held_actor(cfg, args, name):
        return ray.remote(HeldClusteringActor).options(
            name=f"clustering-{name}", num_cpus=0, max_concurrency=64, max_restarts=3).remote(cfg.cluster,
                                                                                              "round-gate")

    monkeypatch.setattr(train, "start_actor", held_actor)
    killed: list[int] = []

    def kill_during_round() -> None:
        try:
            ray.get(gate.wait_round_open.remote(), timeout=900)  # epoch 2's round: rank 0 in, rank 1 held
            ray.kill(ray.get_actor("clustering-actor-kill"), no_restart=False)
            killed.append(1)
        finally:  # never leave rank 1 held: a round caught late must fail the test, not hang it
            ray.get(gate.release.remote())

    killer = threading.Thread(target=kill_during_round, daemon=True)
    killer.start()
    args = parse(job_args(tmp_path, tiny_store_url, "actor-kill", 3, "cluster.warmup_epoch=1"))
    assert train.run("ucf101", args) == 0
    killer.join(timeout=60)
    assert killed, "the round was never caught open"
    assert "clustering round of epoch 2 failed (attempt 1 of 3)" in capfd.readouterr().err
    summary = json.loads((tmp_path / "summary.json").read_text())
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert epoch_steps(client, summary["mlflow_run_id"], "cluster/kmeans_objective_k5") == [2, 3]
    warm = warm_starts(client, summary["mlflow_run_id"], "k5")
    assert warm == {2: 0.0, 3: 1.0}  # the redone first round is cold; the restarted actor starts the next from it


def test_data_that_turns_non_finite_stops_the_run_naming_the_videos_with_its_last_good_checkpoint(
        ray_session, tmp_path, caplog):
    from cluster.train import run
    from storage.synthetic_store import write_synthetic

    url = str(tmp_path / "store")
    write_synthetic(url, "ucf101", 160, feature_dim=16, max_frames=8, num_classes=8, seed=4)
    base = job_args(tmp_path, url, "diverge", 1, "cluster.warmup_epoch=5", "train.max_nonfinite_steps=3")
    assert run("ucf101", parse(base)) == 0
    feats = zarr.open_group(url, mode="r+")["train/feats"]
    feats[:] = np.full(feats.shape, np.nan, dtype=feats.dtype)  # the data goes bad after a good epoch
    caplog.clear()
    assert run("ucf101", parse([*base, "--epochs", "3"])) == 1
    message = caplog.text
    assert "split 'train'" in message and "have NaN or Inf features" in message and "('train_000" in message
    assert "re-run the same command to resume" in message
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("reliability").experiment_id])
    assert run.info.status == "FAILED"  # the resumed attempt continued the first run, and failed it
    run_dir = tmp_path / "ray" / "diverge"
    latest = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())["latest_checkpoint_result"]
    state = torch.load(run_dir / latest["checkpoint_dir_name"] / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 0 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert state["best_model"] is None  # --selection last: no second copy of the weights


class _Payload:
    """Pickles to a call that would create a file: what a malicious checkpoint carries."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_of_another_model_or_carrying_pickled_code_is_refused(ray_session, tiny_store_url, tmp_path,
                                                                          caplog):
    from autossvh.engine import UnsafeFileError
    from cluster.retrieval import load_model_ref
    from cluster.train import run

    base = job_args(tmp_path, tiny_store_url, "pickled", 1, "cluster.warmup_epoch=5")
    assert run("ucf101", parse(base)) == 0
    caplog.clear()
    assert run("ucf101", parse([*base, "--set", "model.nbits=32"])) == 2  # resuming it with other bits
    assert "has a checkpoint of another model: model.nbits=16 (now 32)" in caplog.text
    run_dir = tmp_path / "ray" / "pickled"
    latest = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())["latest_checkpoint_result"]
    checkpoint = run_dir / latest["checkpoint_dir_name"] / "checkpoint.pt"
    state = torch.load(checkpoint, weights_only=True)
    marker = tmp_path / "payload-ran"
    torch.save({**state, "history": _Payload(marker)}, checkpoint)
    with pytest.raises(UnsafeFileError, match="cannot be loaded safely"):
        load_model_ref(str(run_dir))
    evaluate = subprocess.run([sys.executable, str(ROOT / "jobs" / "evaluate.py"), "--model", str(run_dir),
                               "--data", tiny_store_url, "--workers", "0"], cwd=ROOT, capture_output=True, text=True,
                              timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert evaluate.returncode == 2 and "cannot be loaded safely" in evaluate.stderr
    caplog.clear()
    assert run("ucf101", parse([*base, "--epochs", "2"])) == 2  # resuming reads it with weights_only too
    assert "checkpoint.pt: cannot be loaded safely (UnpicklingError" in caplog.text
    assert not marker.exists()


def test_the_local_ray_of_a_job_binds_to_localhost_without_a_dashboard():
    code = ("import ray; from cluster.runtime import init_ray; init_ray(1, 1); "
            "ctx = ray.get_runtime_context(); info = ray._private.worker.global_worker.node.address_info; "
            "import json; print(json.dumps([info['node_ip_address'], info['webui_url'], ctx.gcs_address])); "
            "ray.shutdown()")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    ip, webui, gcs = json.loads(done.stdout.strip().splitlines()[-1])
    assert ip == "127.0.0.1" and not webui and gcs.startswith("127.0.0.1:")
