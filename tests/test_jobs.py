"""The single-process job (jobs/train_local.py) end to end, as a user runs it (tiny settings)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_job(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "jobs" / "train_local.py"), *args], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)


def test_train_local_job_trains_and_prints_the_map_table(tmp_path):
    proc = run_job("--videos", "240", "--feature-dim", "32", "--epochs", "3", "--bits", "16", "--out", str(tmp_path),
                   "--set", "model.encoder_depth=1", "--set", "cluster.warmup_epoch=1",
                   "--set", "cluster.num_cluster=[8, 12]")
    assert proc.returncode == 0, proc.stderr
    assert "mAP@5" in proc.stdout and "GMAP(L2)" in proc.stdout
    assert "epoch 3/3" in proc.stderr and "clustering" in proc.stderr
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["nbits"] == 16 and 0 < summary["map_at_k"]["5"] <= 1
    assert (tmp_path / "model.pt").stat().st_size > 0 and (tmp_path / "pr_curve.png").stat().st_size > 0


def test_train_local_job_rejects_bad_config(tmp_path):
    proc = run_job("--bits", "12", "--out", str(tmp_path))
    assert proc.returncode == 2
    assert "model.nbits" in proc.stderr and "multiple of 8" in proc.stderr
    assert not (tmp_path / "metrics.json").exists()


def test_train_job_on_a_store_and_refusing_an_incomplete_one(tmp_path):
    from storage.store import open_store
    from storage.synthetic_store import write_synthetic

    url = str(tmp_path / "store")
    write_synthetic(url, "fcvid", 160, feature_dim=24, num_classes=8, seed=1)
    proc = run_job("--data", url, "--epochs", "1", "--bits", "16", "--out", str(tmp_path / "run"),
                   "--set", "model.encoder_depth=1", "--set", "loss.p2set=false")
    assert proc.returncode == 0, proc.stderr
    assert "query_is_database protocol" in proc.stderr and "mAP@5" in proc.stdout
    store = open_store(url, mode="r+")
    attrs = dict(store.group.attrs["autossvh"])
    store.group.attrs["autossvh"] = {**attrs, "complete": False}
    proc = run_job("--data", url, "--out", str(tmp_path / "run2"))
    assert proc.returncode == 2 and "incomplete" in proc.stderr
