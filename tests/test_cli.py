"""Every job explains itself: each option has help text and shows its default, and ``--help`` prints the usage
first, with no warnings before it."""

from __future__ import annotations

import argparse
import importlib
import logging
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cluster.cli import REDUCED_PRESET, add_config_arguments, config_from_args, job_parser, log_reduced_preset
from tests.conftest import ROOT

JOB_MODULES = ["cluster.train", "cluster.single_process", "cluster.tune", "cluster.ablate", "cluster.evaluate",
               "cluster.encode", "cluster.registry", "cluster.search", "storage.ingest", "storage.synthetic_store"]


@pytest.mark.parametrize("module", JOB_MODULES)
def test_every_option_has_help_and_shows_its_default(module):
    parser = job_parser("doc")
    importlib.import_module(module).add_arguments(parser)
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{action.option_strings or action.dest} has no help text"
        if action.option_strings and action.default not in (None, False, [], argparse.SUPPRESS):
            assert "default:" in formatter._get_help_string(action), action.option_strings
    parser.format_help()  # every help string formats


def test_every_job_prints_its_usage_first_and_nothing_else_on_stderr():
    jobs = sorted(p.name for p in (ROOT / "jobs").glob("*.py"))

    def help_of(job: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "jobs" / job), "--help"], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)

    with ThreadPoolExecutor(max_workers=4) as pool:
        for job, done in zip(jobs, pool.map(help_of, jobs), strict=True):
            assert done.returncode == 0, (job, done.stderr[-2000:])
            assert done.stdout.startswith("usage:"), (job, done.stdout[:300])
            assert done.stderr == "", (job, done.stderr[-2000:])


def _config_args(argv: list[str]) -> argparse.Namespace:
    parser = job_parser("doc")
    add_config_arguments(parser, "data")
    return parser.parse_args(argv)


def test_what_the_user_set_wins_over_the_reduced_preset_and_the_log_says_where(tmp_path, caplog):
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text("train:\n  lr: 0.002\n  num_epochs: 3\nmodel.encoder_depth: 4\n")
    args = _config_args(["--config", str(run_yaml), "--epochs", "5", "--set", "train.batch_size=16"])
    cfg = config_from_args("fcvid", args, [*REDUCED_PRESET, "data.feature_size=32"])
    assert (cfg.train.lr, cfg.model.encoder_depth, cfg.train.batch_size) == (0.002, 4, 16)  # file, file, --set
    assert cfg.train.num_epochs == 5  # --epochs over the file
    assert cfg.cluster.num_cluster == [16, 32, 48] and cfg.data.feature_size == 32  # the preset where nobody set it
    with caplog.at_level(logging.INFO):
        log_reduced_preset(args, "generated data")
    line = caplog.messages[-1]
    assert line.startswith("reduced preset (generated data): train.eval_every=4, train.test_batch_size=256")
    assert (f"yours kept: model.encoder_depth from --config {run_yaml}, train.batch_size from --set, "
            f"train.num_epochs from --epochs, train.lr from --config {run_yaml}") in line


def test_a_parse_error_is_one_line_with_exit_status_2(capsys):
    parser = job_parser("doc")
    parser.add_argument("--workers", type=int)
    with pytest.raises(SystemExit) as exited:
        parser.parse_args(["--workers", "many"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: argument --workers: invalid int value: 'many' (see --help)" in err


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--out", "{tmp}/file/out", "--out {tmp}/file/out: {tmp}/file is a file, not a folder"),
    ("--out", "{tmp}/file", "--out {tmp}/file: is a file, not a folder"),
    ("--summary-json", "{tmp}/file/s.json", "--summary-json {tmp}/file/s.json: {tmp}/file is a file, not a folder"),
    ("--summary-json", "{tmp}", "--summary-json {tmp}: is a folder; name a file"),
    ("--json", "{tmp}/file/report.json", "--json {tmp}/file/report.json: {tmp}/file is a file, not a folder"),
])
def test_every_jobs_output_options_are_checked_when_parsed(tmp_path, capsys, option, value, message):
    (tmp_path / "file").write_text("x")
    parser = job_parser("doc")
    parser.add_argument(option, type=Path)
    with pytest.raises(SystemExit) as exited:
        parser.parse_args([option, value.format(tmp=tmp_path)])
    assert exited.value.code == 2 and message.format(tmp=tmp_path) in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # the write check leaves nothing behind
    parser.parse_args([option, str(tmp_path / "new" / "place")])  # a destination that can be created passes
    assert not (tmp_path / "new").exists()
