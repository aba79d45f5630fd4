"""benchmarks/gpu_check.py keeps working without a GPU: in tiny mode every part runs on CPU (gloo for NCCL) with
the packages a GPU machine lacks, and the wheels do not bring, made unimportable; in full mode the GPU parts
are reported as skipped for want of CUDA."""

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
PARTS = {"train", "nccl", "cluster", "map", "extract", "reader"}
# Installed here, but neither on the GPU machine (Python, torch, torchvision, numpy) nor among the wheels of
# tools/fetch_gpu_wheels.sh: the check must not need them.
ABSENT_THERE = ("ray", "mlflow", "h5py", "scipy", "sklearn", "av", "matplotlib", "s3fs", "optuna", "tqdm", "pandas",
                "boto3", "moto", "hypothesis")


def run_check(tmp_path: Path, *args: str) -> dict[str, Any]:
    """Run the script in a fresh interpreter where ``ABSENT_THERE`` cannot be imported; its JSON report."""
    out = tmp_path / "gpu_check.json"
    argv = [str(SCRIPT), *args, "--json", str(out)]
    code = (f"import runpy, sys; sys.modules.update(dict.fromkeys({ABSENT_THERE!r})); sys.argv = {argv!r}; "
            f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(out.read_text())


def test_tiny_mode_runs_every_part_on_cpu(tmp_path: Path) -> None:
    report = run_check(tmp_path, "--tiny")
    assert report["complete"] and report["mode"] == "tiny"
    assert set(report["parts"]) == PARTS
    for name, part in report["parts"].items():
        assert part["status"] == "ok", (name, part["reason"], part["traceback"])
        assert part["rows"], name
        for row in part["rows"]:
            assert math.isfinite(row["value"]), (name, row)
            assert row["ratio"] is None or (math.isfinite(row["ratio"]) and row["ratio"] > 0), (name, row)
    rows = {part: {row["name"]: row for row in report["parts"][part]["rows"]} for part in PARTS}
    # 10 variants per batch size: the re-creation and ours in fp32 / bf16, before warm-up and with P2Set
    assert len(rows["train"]) == 20
    # the global-batch loss through the process group equals the local loss, gradient included
    nccl = [row["value"] for name, row in rows["nccl"].items() if name.startswith(("|loss", "max |codes"))]
    assert nccl == [0.0, 0.0]
    # the torch ranking reproduces map_at_k exactly (ties included); the torch k-means is as good as faiss's
    assert rows["map"]["max |mAP@K torch - map_at_k| over K"]["value"] == 0.0
    objectives = [row["ratio"] for name, row in rows["cluster"].items() if name.startswith("torch objective")]
    assert len(objectives) == 3 and all(0.9 < ratio < 1.1 for ratio in objectives)
    assert len(rows["extract"]) == 6
    assert any(row["ratio"] is not None for row in rows["reader"].values())  # compared with the training step


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_full_mode_without_cuda_skips_the_gpu_parts(tmp_path: Path) -> None:
    report = run_check(tmp_path, "--parts", "train", "nccl", "extract")
    assert report["complete"] and set(report["parts"]) == {"train", "nccl", "extract"}
    for part in report["parts"].values():
        assert part["status"] == "skipped" and part["reason"].startswith("no CUDA"), part
