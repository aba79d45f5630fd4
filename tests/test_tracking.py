"""MLflow tracking against a real SQLite store in a temporary folder."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from autossvh.clustering import RoundReport
from autossvh.engine import EpochStats, Retrieval, encode
from autossvh.model import AutoSSVH
from autossvh.trainer import EpochRecord
from cluster import tracking
from tests.conftest import tiny_config

SECRETS = {"key": "AKIAEXAMPLEKEY123", "secret": "s3cr3t-value", "endpoint_url": "http://127.0.0.1:9000"}


@pytest.fixture
def store(tmp_path: Path) -> dict[str, str]:
    """A fresh SQLite tracking store; no run may leak out of a test."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    yield {"uri": uri, "artifacts": (tmp_path / "artifacts").as_uri()}
    while mlflow.active_run() is not None:
        mlflow.end_run()


def _start(store: dict[str, str], **kwargs) -> mlflow.ActiveRun:
    return tracking.start_run(store["uri"], "tests", run_name="unit", artifact_location=store["artifacts"],
                              **kwargs)


def _report(epoch: int) -> RoundReport:
    """A clustering round at two granularities, cold in epoch 1 and warm afterwards."""
    return RoundReport(objective=[10.0 - epoch, 20.0 - epoch], iterations=[40, 60] if epoch == 1 else [3, 4],
                       seconds=[0.2, 0.3], empty=[0, 1], merged=[0, 2], distinct=[3, 2], warm=[epoch > 1] * 2)


def _history(epochs: int = 3, with_pr: bool = True) -> list[EpochRecord]:
    history = []
    for epoch in range(epochs):
        stats = EpochStats(loss=3.0 - epoch, rec=1.0, vc=1.5 - 0.1 * epoch, p2set=0.5 * epoch, steps=10,
                           skipped_steps=epoch % 2, videos=80, seconds=2.0)
        maps = {5: 0.3 + 0.1 * epoch, 20: 0.25 + 0.1 * epoch}
        radii = np.arange(17)
        pr = (radii, np.linspace(1.0, 0.2, 17), np.linspace(0.0, 1.0, 17)) if with_pr else None
        retrieval = Retrieval(maps, float(np.linalg.norm(list(maps.values()))), pr)
        history.append(EpochRecord(epoch=epoch, lr=1e-4 * 0.9**epoch, stats=stats, cluster_seconds=0.5 * epoch,
                                   clustering=_report(epoch) if epoch else None, retrieval=retrieval))
    return history


def test_redact_is_recursive_and_case_insensitive() -> None:
    data = {"AWS_Secret_Access_Key": "x", "nested": {"Token": "t", "list": [{"password": "p", "ok": 1}]},
            "url": "s3://user:pw@host/bucket", "endpoint_url": "http://127.0.0.1:9000", "n": 3}
    out = tracking.redact(data)
    assert out == {"AWS_Secret_Access_Key": "***", "nested": {"Token": "***", "list": [{"password": "***", "ok": 1}]},
                   "url": "s3://***@host/bucket", "endpoint_url": "http://127.0.0.1:9000", "n": 3}
    assert data["nested"]["Token"] == "t"  # input untouched


def test_params_flattened_and_redacted(store: dict[str, str]) -> None:
    cfg = tiny_config()
    with _start(store) as run:
        tracking.log_config(cfg, {"storage_options": SECRETS, "world_size": 2})
    params = MlflowClient(store["uri"]).get_run(run.info.run_id).data.params
    assert params["train.lr"] == str(cfg.train.lr)
    assert params["cluster.num_cluster"] == "[3, 5]"
    assert params["world_size"] == "2"
    assert params["storage_options.endpoint_url"] == "http://127.0.0.1:9000"
    assert params["storage_options.key"] == "***" and params["storage_options.secret"] == "***"
    everything = " ".join(f"{k}={v}" for k, v in params.items())
    assert SECRETS["key"] not in everything and SECRETS["secret"] not in everything


def test_epoch_metrics_have_steps(store: dict[str, str]) -> None:
    history = _history()
    with _start(store) as run:
        for record in history:
            tracking.log_epoch(record, num_cluster=[3, 5])
    client = MlflowClient(store["uri"])
    metrics = client.get_run(run.info.run_id).data.metrics
    expected = {"loss/total", "loss/rec", "loss/vc", "loss/p2set", "train/lr", "train/videos_per_s",
                "train/skipped_steps", "time/train_s", "time/cluster_s", "time/eval_s", "map/at_5", "map/at_20",
                "map/gmap_l2", "cluster/kmeans_objective_k3", "cluster/kmeans_objective_k5"}
    assert set(metrics) == expected  # every name in a group the UI charts together; 2 clustering charts, not 14
    loss = client.get_metric_history(run.info.run_id, "loss/total")
    assert sorted((m.step, m.value) for m in loss) == [(1, 3.0), (2, 2.0), (3, 1.0)]  # epochs counted from 1
    assert [m.step for m in client.get_metric_history(run.info.run_id, "cluster/kmeans_objective_k5")] == [2, 3]
    assert metrics["train/videos_per_s"] == pytest.approx(40.0)


def test_the_clustering_rounds_table_holds_what_is_not_charted_per_epoch() -> None:
    table = tracking.clustering_rounds_csv(_history(), [3, 5]).splitlines()
    assert table[0] == ("epoch,granularity,kmeans_objective,kmeans_iterations,kmeans_seconds,empty_clusters,"
                        "merged_clusters,distinct_centers,warm_start")
    assert table[1:] == ["2,k3,9,40,0.2,0,0,3,0", "2,k5,19,60,0.3,1,2,2,0",
                         "3,k3,8,3,0.2,0,0,3,1", "3,k5,18,4,0.3,1,2,2,1"]  # epochs counted from 1
    assert tracking.clustering_rounds_csv(_history()[:1]) == ""  # no round before the warm-up epoch


def test_final_artifacts(store: dict[str, str], tmp_path: Path) -> None:
    cfg = tiny_config()
    history = _history()
    with _start(store) as run:
        tracking.log_final_artifacts(cfg, history[-1].retrieval, history, tmp_path / "out", "tiny (synthetic)")
    names = {a.path for a in MlflowClient(store["uri"]).list_artifacts(run.info.run_id)}
    assert {"config.yaml", "map_table.json", "map_table.csv", "pr_curve.png", "training_curve.png",
            "map_by_k.png", "clustering_rounds.csv"} <= names
    local = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, tracking_uri=store["uri"],
                                                     dst_path=str(tmp_path / "dl")))
    table = json.loads((local / "map_table.json").read_text())
    assert table["map_at_k"]["5"] == pytest.approx(0.5) and table["gmap_l2"] == history[-1].retrieval.gmap_l2
    assert (local / "map_table.csv").read_text().splitlines()[0] == "mAP@5,mAP@20,GMAP(L2)"
    for png in ("pr_curve.png", "training_curve.png"):
        assert (local / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "nbits: 16" in (local / "config.yaml").read_text()


def test_resume_continues_the_same_run(store: dict[str, str]) -> None:
    history = _history()
    with _start(store) as run:
        tracking.log_epoch(history[0])
    with _start(store, run_id=run.info.run_id) as resumed:
        tracking.log_epoch(history[1])
    assert resumed.info.run_id == run.info.run_id
    steps = [m.step for m in MlflowClient(store["uri"]).get_metric_history(run.info.run_id, "loss/total")]
    assert sorted(steps) == [1, 2]


def test_unreachable_http_uri_fails_after_its_timeout_not_after_mlflows_retries() -> None:
    with pytest.raises(tracking.TrackingError, match=r"http://127\.0\.0\.1:9 is unreachable within 1 s"):
        tracking.start_run("http://127.0.0.1:9", "tests", timeout=1.0)
    assert mlflow.active_run() is None


def test_unreachable_uri_error_hides_credentials() -> None:
    with pytest.raises(tracking.TrackingError) as info:
        tracking.start_run("http://alice:hunter2@127.0.0.1:9", "tests", timeout=1.0)
    assert "hunter2" not in str(info.value)


def test_logged_model_loads_registers_and_predicts_packed_codes(store: dict[str, str]) -> None:
    cfg = tiny_config()
    model = AutoSSVH(cfg).eval()
    feats = np.random.default_rng(1).standard_normal((5, cfg.data.max_frames, cfg.data.feature_size))
    feats = feats.astype(np.float32)
    expected = np.packbits(encode(model, [torch.from_numpy(feats)]).codes > 0, axis=1)
    with _start(store):
        uri = tracking.log_model(model, step=1, name="hasher", register="autossvh-test")
    assert uri == "models:/autossvh-test@candidate"
    client = MlflowClient(store["uri"])
    version = client.get_model_version_by_alias("autossvh-test", "candidate")
    assert int(version.version) == 1
    loaded = mlflow.pyfunc.load_model(uri)
    out = loaded.predict(feats)
    assert out.dtype == np.uint8 and out.shape == (5, cfg.model.nbits // 8)
    np.testing.assert_array_equal(out, expected)
    inputs = loaded.metadata.get_input_schema().inputs
    assert inputs[0].type == np.dtype(np.float32) and inputs[0].shape == (-1, cfg.data.max_frames,
                                                                          cfg.data.feature_size)
    requirements = Path(mlflow.pyfunc.get_model_dependencies(uri)).read_text()
    assert "torch==2." in requirements and "numpy==" in requirements and "PyYAML==" in requirements


def test_a_rerun_reuses_children_by_name_and_ends_the_stale_ones_killed(store: dict[str, str]) -> None:
    uri, client = store["uri"], MlflowClient(store["uri"])
    parent = tracking.create_run(uri, "tests", "abl", artifact_location=store["artifacts"], params={"seeds": "2"})
    params = {"train.lr": "0.001"}
    first = tracking.child_run(uri, "tests", "abl-IX-s0", parent, params)
    client.log_param(first, "train.lr", "0.001")  # what the trial's worker logs
    second = tracking.child_run(uri, "tests", "abl-II-s0", parent, params)
    assert second != first and client.get_run(parent).data.params == {"seeds": "2"}
    assert client.get_run(first).data.tags["mlflow.user"] == tracking.current_user()  # the UI's "Created by"
    # the job was killed: its children stay RUNNING until a re-run ends them, saying why
    assert sorted(tracking.end_open_children(uri, parent, "KILLED", "the job was stopped")) == ["abl-II-s0",
                                                                                              "abl-IX-s0"]
    killed = client.get_run(first)
    assert killed.info.status == "KILLED" and killed.data.tags[tracking.END_REASON_TAG] == "the job was stopped"
    assert client.get_run(parent).info.status == "RUNNING"  # a parent ends only when its trials have
    assert tracking.end_open_children(uri, parent, "KILLED", "again") == []
    # the re-run's trials continue their children, one per name; other settings make a new one
    assert tracking.child_run(uri, "tests", "abl-IX-s0", parent, params) == first
    assert tracking.child_run(uri, "tests", "abl-II-s0", parent, params) == second
    assert tracking.child_run(uri, "tests", "abl-IX-s0", parent, {"train.lr": "0.01"}) not in (first, second)
    tracking.end_run(uri, parent, "KILLED", "stopped")
    tracking.reopen_run(uri, parent)
    reopened = client.get_run(parent)
    assert reopened.info.status == "RUNNING" and tracking.END_REASON_TAG not in reopened.data.tags


def test_the_printed_ui_command_serves_a_page_and_stops_on_ctrl_c(store: dict[str, str]) -> None:
    """The command as :func:`tracking.ui_hint` prints it (on a free port instead of 5000), started from a shell
    in its own process group as a terminal would, serves the UI and ends, with all its processes, on SIGINT."""
    import os
    import signal
    import socket
    import subprocess
    import time
    import urllib.error
    import urllib.request

    tracking.create_run(store["uri"], "tests", "ui", artifact_location=store["artifacts"])
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = tracking.ui_command(store["uri"])
    assert "--workers 1" in command and "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false" in command
    proc = subprocess.Popen(["bash", "-c", command.replace("--port 5000", f"--port {port}")], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        page, deadline = "", time.monotonic() + 300
        while not page and time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as answer:  # noqa: S310
                    page = answer.read().decode()
            except (urllib.error.URLError, OSError):
                time.sleep(1)
        assert "<html" in page.lower(), proc.stderr.read() if proc.poll() is not None else "no page within 300 s"
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole foreground group
        try:
            proc.wait(timeout=60)
        finally:
            stopped = proc.poll() is not None
            if not stopped:
                os.killpg(proc.pid, signal.SIGKILL)
    assert stopped, "the UI did not stop within 60 s of SIGINT"
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)  # no uvicorn worker or job runner left behind
