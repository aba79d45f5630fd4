"""A training job as a user runs it: a quiet console (the header, a line per epoch, the table, the model and the
way into the UI; none of Ray's or MLflow's chatter), and an MLflow run, model and version that say where they came
from and what they achieved."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from mlflow.tracking import MlflowClient

from tests.conftest import ROOT, TINY

EPOCHS = 3
NOISE = ["PlacementGroupCleaner", "Reporting training result", "Checkpoint successfully created", "Add type hints",
         "not writable", "find_unused_parameters", "Token authentication", "core_worker", "PreemptionWatcher",
         "resumed run", "Downloading artifacts", "font cache", "RayTrainWorker", "Successfully registered",
         "Validating input example", "\x1b["]


def test_a_job_prints_a_clean_log_and_its_run_says_where_it_came_from(ray_session, tiny_store_url, tmp_path):
    argv = [sys.executable, "jobs/train_ucf101.py", "--data", tiny_store_url, "--epochs", str(EPOCHS),
            "--storage", str(tmp_path / "ray"), "--name", "console", "--mlflow-uri", f"sqlite:///{tmp_path}/m.db",
            "--mlflow-artifacts", str(tmp_path / "art"), "--experiment", "console", "--register", "tiny-console",
            "--summary-json", str(tmp_path / "summary.json"), "--max-failures", "0"]
    for item in [*TINY, "cluster.warmup_epoch=1", "train.eval_every=2", "train.test_batch_size=64"]:
        argv += ["--set", item]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "RAY_ADDRESS": ray_session, "PYTHONPATH": str(ROOT)})
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    for pattern in NOISE:
        assert pattern not in output, pattern
    lines = output.splitlines()
    assert [line.split(" INFO ")[1].split(" loss")[0] for line in lines if " INFO epoch " in line] == \
        [f"epoch {e}/{EPOCHS}" for e in range(1, EPOCHS + 1)]
    assert len(lines) <= 9 + EPOCHS, output  # header, workers ready, epochs, table (4), model, UI (2)
    assert "training ucf101 (synthetic), paper recipe, 16 bits" in output
    assert ".venv/bin/mlflow ui --backend-store-uri" in output or "/mlflow ui --backend-store-uri" in output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert f"#/experiments/1/runs/{summary['mlflow_run_id']}" in output

    client = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    run = client.get_run(summary["mlflow_run_id"])
    tags = run.data.tags
    assert tags["mlflow.source.name"] == "jobs/train_ucf101.py"
    assert (tags["dataset"], tags["recipe"], tags["nbits"]) == ("ucf101 (synthetic)", "paper", "16")
    if (ROOT / ".git").exists():
        assert len(tags["mlflow.source.git.commit"]) == 40
    assert "test GMAP" in tags["mlflow.note.content"]
    assert all("/" in key for key in run.data.metrics)  # grouped: loss/, map/, train/, time/, cluster/, sampler/
    (data_input,) = run.inputs.dataset_inputs
    assert data_input.dataset.name == "ucf101 (synthetic)" and tiny_store_url in data_input.dataset.source
    assert {t.key: t.value for t in data_input.tags}["train_videos"] == "160"

    selected = summary["selected_epoch"]  # counted from 1, as the MLflow steps
    (model,) = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    linked = {m.key: (m.step, m.value) for m in model.metrics}
    assert linked["map/at_5"] == (selected, summary["map_at_k"]["5"])
    assert linked["loss/total"][0] == selected
    registered = client.get_registered_model("tiny-console")
    assert "AutoSSVH video hashing model" in registered.description
    assert registered.tags["dataset"] == "ucf101 (synthetic)"
    version = client.get_model_version_by_alias("tiny-console", "candidate")
    assert f"epoch {selected} of {EPOCHS}" in version.description
    assert version.tags["selected_epoch"] == str(selected) and version.tags["recipe"] == "paper"
    assert float(version.tags["gmap_l2"]) == round(summary["gmap_l2"], 4)


def test_losing_the_console_queue_never_fails_the_run(ray_session):
    """The queue is an actor: if it dies (its node lost), workers keep training and the driver returns the fit's
    result, saying once that the console was lost."""
    import logging
    import threading

    import ray

    from cluster.console import WorkerConsole, fit_showing_progress, new_console_queue

    queue = new_console_queue()
    worker = WorkerConsole(queue, logging.getLogger("test.worker"))
    worker.info("before")
    released = threading.Event()

    class Trainer:
        def fit(self) -> str:
            released.wait(timeout=60)
            return "result"

    def kill_queue() -> None:
        ray.kill(queue.actor)
        released.set()

    threading.Timer(1.0, kill_queue).start()
    assert fit_showing_progress(Trainer(), queue) == "result"
    worker.info("after")  # logged locally; the dead queue is dropped rather than raised
    assert worker.queue is None
