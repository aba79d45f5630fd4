"""Two Ray nodes on one machine, started with ``ray start`` as separate processes on 127.0.0.1 (a head and a
second node, each with its own temp folder), and the train job sent with ``ray job submit --working-dir .``.

The workers are placed one per node (``--placement-strategy STRICT_SPREAD``). The second test kills the second
node mid-run: the job fails with a clear error (``--max-failures 0``: a strict spread cannot be placed on the one
node left), and re-submitting it after the node is back resumes from the last checkpoint. The fixture stops only
the processes it started (those using its temp folders), never other Ray instances.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.chaos import processes_using
from tests.conftest import ROOT, TINY
from tests.test_ray_train import epoch_steps, registered_checkpoints

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    """A head and a second node started with ``ray start``, token authentication on, bound to 127.0.0.1."""

    def __init__(self) -> None:
        self.head_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths have a length limit
        self.node_dir = tempfile.mkdtemp(prefix="rn", dir="/tmp")
        self.port, self.dashboard_port = free_port(), free_port()
        self.env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
        self.env.pop("RAY_ADDRESS", None)

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([RAY, *args], env=self.env, capture_output=True, text=True, timeout=timeout)

    def start_head(self) -> None:
        done = self.ray("start", "--head", "--node-ip-address=127.0.0.1", f"--port={self.port}",
                        "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                        f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
                        "--num-cpus=2", f"--temp-dir={self.head_dir}", "--disable-usage-stats")
        assert done.returncode == 0, done.stderr[-3000:]

    def start_node(self) -> None:
        done = self.ray("start", f"--address=127.0.0.1:{self.port}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
                        "--dashboard-agent-listen-port=0", f"--temp-dir={self.node_dir}", "--disable-usage-stats")
        assert done.returncode == 0, done.stderr[-3000:]
        self.wait_for_nodes(2)

    def alive_nodes(self) -> int:
        done = self.ray("list", "nodes", f"--address={self.dashboard}", "--format=json", "--filter", "state=ALIVE")
        return len(json.loads(done.stdout)) if done.returncode == 0 else 0

    def wait_for_nodes(self, count: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.alive_nodes() != count:
            assert time.monotonic() < deadline, f"the cluster did not reach {count} alive nodes"
            time.sleep(0.5)

    def wait_for_job_agent(self, timeout: float = 60) -> None:
        """The head's dashboard agent registers a little after ``ray start`` returns; jobs need it."""
        deadline = time.monotonic() + timeout
        while True:
            probe = self.ray("job", "submit", f"--address={self.dashboard}", "--no-wait", "--", "true")
            if probe.returncode == 0:
                return
            assert "No available agent" in probe.stderr and time.monotonic() < deadline, probe.stderr[-3000:]
            time.sleep(0.5)

    def kill(self, node: str) -> None:
        """SIGKILL every process of one node ("head" or "node": GCS, raylet, agents, workers)."""
        for _ in range(5):
            pids = processes_using(self.head_dir if node == "head" else self.node_dir)
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)

    def stop(self) -> None:
        self.kill("node")
        self.kill("head")
        shutil.rmtree(self.head_dir, ignore_errors=True)
        shutil.rmtree(self.node_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster() -> LocalCluster:
    local = LocalCluster()
    try:
        local.start_head()
        local.start_node()
        yield local
    finally:
        local.stop()


def submit(cluster: LocalCluster, tmp: Path, store: str, name: str, epochs: int, wait: bool = True
           ) -> subprocess.CompletedProcess | subprocess.Popen:
    """``ray job submit --working-dir .`` of the UCF101 train job, 2 workers spread over the nodes."""
    job = [sys.executable, "jobs/train_ucf101.py", "--data", store, "--epochs", str(epochs), "--workers", "2",
           "--placement-strategy", "STRICT_SPREAD", "--storage", str(tmp / "ray"), "--name", name,
           "--mlflow-uri", f"sqlite:///{tmp}/mlflow.db", "--mlflow-artifacts", str(tmp / "art"),
           "--experiment", "multinode", "--summary-json", str(tmp / f"{name}.json"), "--max-failures", "0"]
    for item in [*TINY, "cluster.warmup_epoch=1", "train.test_batch_size=64"]:
        job += ["--set", item]
    argv = [RAY, "job", "submit", f"--address={cluster.dashboard}", "--working-dir", ".", "--", *job]
    cluster.wait_for_job_agent()
    if wait:
        return subprocess.run(argv, cwd=ROOT, env=cluster.env, capture_output=True, text=True, timeout=300)
    return subprocess.Popen(argv, cwd=ROOT, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def test_ray_job_submit_trains_with_workers_on_both_nodes(cluster, tiny_store_url, tmp_path):
    done = submit(cluster, tmp_path, tiny_store_url, "spread", 2)
    assert done.returncode == 0 and "succeeded" in done.stdout + done.stderr, (done.stdout + done.stderr)[-4000:]
    summary = json.loads((tmp_path / "spread.json").read_text())
    nodes = json.loads(cluster.ray("list", "nodes", f"--address={cluster.dashboard}", "--format=json").stdout)
    assert len(set(summary["worker_nodes"])) == 2
    assert set(summary["worker_nodes"]) <= {node["node_id"] for node in nodes}
    assert summary["epochs_run"] == 2 and summary["map_at_k"]["5"] > 0


def test_a_lost_node_fails_the_job_clearly_and_resubmission_resumes(cluster, tiny_store_url, tmp_path):
    proc = submit(cluster, tmp_path, tiny_store_url, "node-loss", 8, wait=False)
    run_dir, deadline = tmp_path / "ray" / "node-loss", time.monotonic() + 180
    try:
        while time.monotonic() < deadline and not registered_checkpoints(run_dir):
            assert proc.poll() is None, proc.stdout.read()[-4000:]
            time.sleep(0.1)
        assert registered_checkpoints(run_dir), "no checkpoint within 180 s"
        cluster.kill("node")  # the second node dies mid-run
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0 and "training failed" in out, out[-4000:]
    assert "re-run the same command to resume" in out
    cluster.wait_for_nodes(1)
    cluster.start_node()
    done = submit(cluster, tmp_path, tiny_store_url, "node-loss", 8)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "resumed from the checkpoint" in output
    summary = json.loads((tmp_path / "node-loss.json").read_text())
    assert summary["epochs_run"] == 8 and len(set(summary["worker_nodes"])) == 2
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert epoch_steps(client, summary["mlflow_run_id"], "loss/total") == list(range(1, 9))
