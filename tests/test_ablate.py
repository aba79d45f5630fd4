"""The ablation job: rows x seeds as one Ray Tune grid of Train runs through real Ray, Zarr and MLflow; its table;
and a re-run after a kill that runs only the unfinished trials."""

from __future__ import annotations

import json
import math
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

KEYS = ("IX-s0", "IX-s1", "II-s0", "II-s1")  # the trials of _job: rows IX and II, two seeds


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
    summaries = summarise(trials, ["IX", "II"])
    full, random_sampler = summaries
    assert full.gmap_mean == pytest.approx(1.1) and full.gmap_std == pytest.approx(0.1)
    assert full.epochs_to_target == pytest.approx(2.5)  # 0.99 = 90 % of 1.1: epoch 3 (seed 0) and 2 (seed 1)
    assert random_sampler.epochs_to_target is None  # never reaches 0.99
    assert full.gmap_by_epoch[1] == pytest.approx((0.35, 0.15))
    text = table_text(summaries, "title")
    assert "-54.5%" in text and "never" in text and "1.1000±0.1000" in text


def test_table_holds_the_best_epoch_of_rows_that_peak_before_the_end():
    trials = {"IX-s0": _trial("IX", 0, [0.2, 0.9, 0.5]), "IX-s1": _trial("IX", 1, [0.7, 0.6, 0.4])}
    (full,) = summarise(trials, ["IX"])
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
    trials, deadline = tmp_path / "ray" / "abl" / "trials", time.monotonic() + 900  # a loaded machine is slow
    while time.monotonic() < deadline and not list(trials.glob("*.json")):
        assert proc.poll() is None, "".join(output)[-4000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {p.stem: (p.stat().st_mtime_ns, p.read_text()) for p in trials.glob("*.json")}
    assert 1 <= len(before) < 4, before.keys()  # the kill hit the grid: some trials finished, not all
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("ablate-tests").experiment_id
    running = client.search_runs([experiment], "attributes.status = 'RUNNING'")
    orphans = {run.info.run_name: run.info.run_id for run in running if run.info.run_name != "abl"}

    again = subprocess.run(_job(tmp_path, tiny_store_url), cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=600)
    output = again.stdout + again.stderr
    assert again.returncode == 0, output[-4000:]
    assert f"{len(before)} trials done, {4 - len(before)} to run" in output
    for noise in ("Trial status", "View detailed results", "tensorboard", "Trial _trial", "(raylet)", "╭"):
        assert noise not in output, noise  # as quiet as a training job: Ray Tune's reporter stays off
    for key in set(KEYS) - set(before):
        assert sum(f"trial abl-{key} finished" in line for line in output.splitlines()) == 1, output[-4000:]
    after = {p.stem: (p.stat().st_mtime_ns, p.read_text()) for p in trials.glob("*.json")}
    assert set(after) == set(KEYS)
    assert all(after[key] == before[key] for key in before)  # finished trials were not run again
    summary = json.loads((tmp_path / "summary.json").read_text())
    references = ["ITQ", "ITQ-salience", "ITQ-informative"]  # the generated store records the class frames
    assert [r["row"] for r in summary["rows"]] == ["IX", "II", *references] and summary["missing"] == []
    assert [r["seeds"] for r in summary["rows"]] == [2, 2, 1, 1, 1]
    for line in ("IX ", "II ", *(f"{row} " for row in references)):
        assert any(row.startswith(line) for row in again.stdout.splitlines()), again.stdout
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{summary['parent_run_id']}'")
    names = sorted(run.info.run_name for run in children)
    assert names == sorted(f"abl-{key}" for key in KEYS)  # one child per trial: none trained twice, none
    # duplicated by the re-run; the ones the kill left RUNNING were continued, and every run ended honestly
    assert {run.info.run_name: run.info.run_id for run in children if run.info.run_name in orphans} == orphans
    assert {run.info.status for run in children} == {"FINISHED"}
    assert not any("autossvh.end_reason" in run.data.tags for run in children)  # a continued run drops its reason
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["mlflow.user"]  # finished when its trials were
    artifacts = {a.path for a in client.list_artifacts(summary["parent_run_id"])}
    assert {"ablation_table.txt", "gmap_by_epoch.png", "ablation.json"} <= artifacts
    for key, (_, text) in after.items():
        trial = TrialResult.from_json(text)
        assert trial.row == key.split("-")[0] and set(trial.gmap_by_epoch) == {1, 2}


def test_a_stopped_ablation_ends_its_parent_and_running_trial_killed(ray_session, tiny_store_url, tmp_path):
    """SIGTERM (or Ctrl-C's SIGINT) in the job's driver while a trial trains: the parent run and the trial's child
    run end KILLED with the reason, nothing is left RUNNING, and the job exits 128 + 15 saying what to do."""
    env = {**os.environ, "RAY_ADDRESS": ray_session, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(_job(tmp_path, tiny_store_url, "--rows", "IX", "--seeds", "1"), cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    output: list[str] = []
    threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True).start()
    client, deadline, child = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db"), time.monotonic() + 300, None
    while child is None and time.monotonic() < deadline:
        assert proc.poll() is None, "".join(output)[-4000:]
        time.sleep(0.5)
        experiment = client.get_experiment_by_name("ablate-tests") if (tmp_path / "mlflow.db").exists() else None
        if experiment is not None:
            child = next(iter(client.search_runs([experiment.experiment_id], "attributes.run_name = 'abl-IX-s0'")),
                         None)
    assert child is not None and child.info.status == "RUNNING", "".join(output)[-4000:]
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM, "".join(output)[-4000:]
    assert "stopped by SIGTERM" in "".join(output) and "Traceback" not in "".join(output), "".join(output)[-4000:]
    runs = client.search_runs([child.info.experiment_id])
    assert {run.info.run_name: run.info.status for run in runs} == {"abl": "KILLED", "abl-IX-s0": "KILLED"}
    assert all("SIGTERM" in run.data.tags["autossvh.end_reason"] for run in runs)


def test_the_rows_beyond_the_paper_run_through_the_job(ray_session, tiny_store_url, tmp_path):
    rows = ["II-indep", "sampler-salience", "sampler-hpm", "sampler-reducible", "pool-salience", "positives-nearest",
            "centers-input", "focused"]
    env = {**os.environ, "RAY_ADDRESS": ray_session, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([*_job(tmp_path, tiny_store_url, "--rows", *rows, "--seeds", "1", "--epochs", "1"),
                           "--set", "salience.bank_videos=32"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    by_row = {r["row"]: r for r in summary["rows"]}
    assert set(rows) <= set(by_row)
    assert by_row["II-indep"]["sampler"]["sampler/view_overlap"] > 0.2  # random masks that overlap
    assert by_row["focused"]["sampler"]["sampler/pooling_precision"] != pytest.approx(
        by_row["II-indep"]["sampler"]["sampler/pooling_precision"])  # salience pooling, not the mean
    assert "salience.bank_videos is set but does nothing" in proc.stderr  # rows without salience: named only
    assert math.isfinite(by_row["sampler-reducible"]["sampler"]["sampler/selectivity"])  # Grade-Net's scores
