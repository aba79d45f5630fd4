"""Fault-injecting stand-ins imported by Ray workers in the reliability tests (importable as ``tests.chaos``, since
the workers' PYTHONPATH is the repository root and pytest's own module names are not)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from cluster.clustering_actor import ClusteringActor

SLOW_SUBMIT_S = 3.0


class SlowClusteringActor(ClusteringActor):
    """The clustering actor with rank 1's submission held back, so that a round stays open long enough for a test
    to kill the actor in the middle of it (rank 0 submitted and waiting, rank 1 not yet)."""

    def submit(self, epoch: int, rank: int, indices, features, codes) -> int:
        if rank == 1:
            time.sleep(SLOW_SUBMIT_S)
        return super().submit(epoch, rank, indices, features, codes)


def process_cmdlines() -> list[tuple[int, str]]:
    """(pid, full command line) of every process, read from /proc (``ps`` truncates long lines)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                found.append((int(entry.name), (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()))
            except OSError:  # exited meanwhile
                pass
    return found


def processes_using(folder: str) -> list[int]:
    """Processes whose command line names ``folder`` or that hold a file under it open (Ray agents overwrite their
    command line and environment with a process title, but keep their log files in the session folder open)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if folder in (entry / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(entry.name))
                continue
            for fd in (entry / "fd").iterdir():
                if os.readlink(fd).startswith(folder):
                    found.append(int(entry.name))
                    break
        except OSError:  # exited meanwhile, or not ours to read
            pass
    return found
