"""The ablation job: rows x seeds as one Ray Tune grid of Train runs through real Ray, Zarr and MLflow; its table;
and a re-run after a kill that runs only the unfinished trials."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from cluster.ablate import (
    ROWS,
    TrialResult,
    row_definition,
    summarise,
    table_text,
    trial_config,
)
from tests.conftest import ROOT, TINY


def test_rows_name_their_overrides_and_tau_rows_parse():
    assert row_definition("I")[2] == ["sampler.grl=false"] and row_definition("released")[1] == "released"
    assert row_definition("tau0.3") == ("tau = 0.3", None, ["sampler.tau=0.3"])
    for bad in ("X", "tau", "tau-1", "taunan"):
        with pytest.raises(ValueError, match="unknown row"):
            row_definition(bad)
    assert set(ROWS) >= {"I", "II", "VI", "VII", "VIII", "IX", "released"}


def test_row_overrides_and_the_seed_come_after_the_users_settings():
    import argparse

    from cluster.ablate import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--dataset", "ucf101", "--set", "sampler.grl=true", "--set", "train.lr=3e-4"])
    cfg = trial_config("ucf101", args, ["model.encoder_depth=2"], "I", 4)
    assert cfg.sampler.grl is False and cfg.train.lr == 3e-4 and cfg.train.seed == 4
    assert cfg.model.encoder_depth == 2 and cfg.recipe == "paper"
    assert trial_config("ucf101", args, [], "released", 0).recipe == "released"


def _trial(row: str, seed: int, gmaps: list[float]) -> TrialResult:
    final = gmaps[-1]
    return TrialResult(row, seed, dict.fromkeys((5, 20, 40, 60, 80, 100), final / 2.45), final,
                       {e + 1: g for e, g in enumerate(gmaps)}, "run", {})


def test_table_holds_mean_and_std_the_change_against_ix_and_epochs_to_ninety_percent():
    trials = {"IX-s0": _trial("IX", 0, [0.2, 0.8, 1.0]), "IX-s1": _trial("IX", 1, [0.5, 1.0, 1.2]),
              "II-s0": _trial("II", 0, [0.2, 0.3, 0.55]), "II-s1": _trial("II", 1, [0.1, 0.4, 0.45])}
    summaries = summarise(trials, ["IX", "II"], None)
    full, random_sampler = summaries
    assert full.gmap_mean == pytest.approx(1.1) and full.gmap_std == pytest.approx(0.1)
    assert full.epochs_to_target == pytest.approx(2.5)  # 0.99 = 90 % of 1.1: epoch 3 (seed 0) and 2 (seed 1)
    assert random_sampler.epochs_to_target is None  # never reaches 0.99
    assert full.gmap_by_epoch[1] == pytest.approx((0.35, 0.15))
    text = table_text(summaries, "title")
    assert "-54.5%" in text and "never" in text and "1.1000±0.1000" in text


def test_table_holds_the_best_epoch_of_rows_that_peak_before_the_end():
    trials = {"IX-s0": _trial("IX", 0, [0.2, 0.9, 0.5]), "IX-s1": _trial("IX", 1, [0.7, 0.6, 0.4])}
    (full,) = summarise(trials, ["IX"], None)
    assert full.peak_gmap == pytest.approx((0.8, 0.1)) and full.peak_epoch == pytest.approx(1.5)
    assert "0.8000±0.1000    1.5" in table_text([full], "title")


def _job(tmp: Path, store: str, *extra: str) -> list[str]:
    args = [sys.executable, str(ROOT / "jobs" / "ablate.py"), "--dataset", "ucf101", "--data", store,
            "--rows", "IX", "II", "--seeds", "2", "--epochs", "2", "--max-concurrent", "2",
            "--storage", str(tmp / "ray"), "--name", "abl", "--mlflow-uri", f"sqlite:///{tmp}/mlflow.db",
            "--mlflow-artifacts", str(tmp / "art"), "--experiment", "ablate-tests", "--max-failures", "0",
            "--summary-json", str(tmp / "summary.json"), *extra]
    for item in [*TINY, "cluster.warmup_epoch=1", "train.test_batch_size=64"]:
        args += ["--set", item]
    return args


def test_ablation_runs_the_grid_and_a_rerun_after_a_kill_skips_finished_trials(ray_session, tiny_store_url,
                                                                                  tmp_path):
    env = {**os.environ, "RAY_ADDRESS": ray_session, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(_job(tmp_path, tiny_store_url), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    output: list[str] = []
    threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True).start()
    trials, deadline = tmp_path / "ray" / "abl" / "trials", time.monotonic() + 300
    while time.monotonic() < deadline and not list(trials.glob("*.json")):
        assert proc.poll() is None, "".join(output)[-4000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {p.stem: (p.stat().st_mtime_ns, p.read_text()) for p in trials.glob("*.json")}
    assert 1 <= len(before) < 4, before.keys()  # the kill hit the grid: some trials finished, not all

    again = subprocess.run(_job(tmp_path, tiny_store_url), cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert f"{len(before)} trials done, {4 - len(before)} to run" in again.stdout + again.stderr
    after = {p.stem: (p.stat().st_mtime_ns, p.read_text()) for p in trials.glob("*.json")}
    assert set(after) == {"IX-s0", "IX-s1", "II-s0", "II-s1"}
    assert all(after[key] == before[key] for key in before)  # finished trials were not run again
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["row"] for r in summary["rows"]] == ["IX", "II", "ITQ"] and summary["missing"] == []
    assert [r["seeds"] for r in summary["rows"]] == [2, 2, 1]
    for line in ("IX ", "II ", "ITQ "):
        assert any(row.startswith(line) for row in again.stdout.splitlines()), again.stdout
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("ablate-tests").experiment_id
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{summary['parent_run_id']}'")
    names = [run.info.run_name for run in children]
    for key in before:  # one child run per finished trial: it was not trained a second time
        assert names.count(f"abl-{key}") == 1, names
    artifacts = {a.path for a in client.list_artifacts(summary["parent_run_id"])}
    assert {"ablation_table.txt", "gmap_by_epoch.png", "ablation.json"} <= artifacts
    for key, (_, text) in after.items():
        trial = TrialResult.from_json(text)
        assert trial.row == key.split("-")[0] and set(trial.gmap_by_epoch) == {1, 2}
