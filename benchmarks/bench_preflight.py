"""Wall time of the checks the main job (``jobs/train_fcvid.py``) runs before Ray starts, on its generated store.

    .venv/bin/python benchmarks/bench_preflight.py                 # 20 repeats in /tmp/bench-preflight

In ``--workdir`` (the job's relative defaults, ``runs/...``, land there) it generates the job's store once
(``runs/data/fcvid-synthetic``, 1,200 videos, excluded from the timings), parses the job's options with its
parser (``--summary-json`` set, so the parser's output check runs) and times, in this process:

* ``parse``: the job's option parsing, which checks every output option's destination;
* ``run options``: :func:`cluster.preflight.check_run_options` (names, tracking URI, counts, summary file);
* ``resumed run``: :func:`cluster.preflight.check_resumed_run` against a SQLite tracking store holding the run
  (only a resumed run pays it), first call (MLflow's store set-up in this process; MLflow itself is imported
  before, as the job's own checks import it) and later calls;
* ``all pre-start checks``: :func:`cluster.train.prepare_run`, every check before Ray starts (the new ones and
  the store, config, shard and label checks that were there before), its first call in this process and later
  calls.

Each line prints the median and the minimum over ``--repeat`` calls, in milliseconds.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cluster import tracking, train  # noqa: E402, F401  (tracking: MLflow imported, as prepare_run does)
from cluster.cli import job_parser  # noqa: E402
from cluster.preflight import check_resumed_run, check_run_options  # noqa: E402

CREATE_RUN = """import sys
from mlflow.tracking import MlflowClient
client = MlflowClient(sys.argv[1])
found = client.get_experiment_by_name("bench-preflight")
print(client.create_run(found.experiment_id if found else client.create_experiment("bench-preflight")).info.run_id)
"""


def timed(what: str, call: Callable[[], object], repeat: int) -> None:
    seconds = []
    for _ in range(repeat):
        tic = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - tic)
    print(f"{what:<24} median {statistics.median(seconds) * 1e3:8.1f} ms   min {min(seconds) * 1e3:8.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-preflight"))
    parser.add_argument("--repeat", type=int, default=20)
    options = parser.parse_args()
    options.workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(options.workdir)
    logging.basicConfig(level=logging.WARNING)  # the job's own INFO lines (the preset, ...) would repeat
    train.synthetic_store("fcvid")  # generated once, as the job's first run does; not timed
    job = job_parser(train.__doc__)
    train.add_arguments(job)
    argv = ["--summary-json", "runs/summary.json"]
    args = job.parse_args(argv)

    uri = f"sqlite:///{options.workdir.resolve()}/runs/mlflow.db"
    run_id = subprocess.run(  # another process, so that the first check below pays MLflow's set-up as a job does
        [sys.executable, "-c", CREATE_RUN, uri], check=True, capture_output=True, text=True).stdout.split()[-1]

    print(f"jobs/train_fcvid.py {' '.join(argv)} in {options.workdir} ({os.cpu_count()} CPUs), {options.repeat} "
          "repeats")
    timed("parse", lambda: job.parse_args(argv), options.repeat)
    timed("run options", lambda: check_run_options(args), options.repeat)
    timed("resumed run (first)", lambda: check_resumed_run(uri, run_id, "r", "runs/ray"), 1)
    timed("resumed run", lambda: check_resumed_run(uri, run_id, "r", "runs/ray"), options.repeat)
    timed("all pre-start (first)", lambda: train.prepare_run("fcvid", args), 1)
    timed("all pre-start checks", lambda: train.prepare_run("fcvid", args), options.repeat)


if __name__ == "__main__":
    main()
