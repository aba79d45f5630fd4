"""Every job explains itself: each option has help text and shows its default, and ``--help`` prints the usage
first, with no warnings before it."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from cluster.cli import job_parser
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
