"""Fault-injecting stand-ins imported by Ray workers in the reliability tests (importable as ``tests.chaos``, since
the workers' PYTHONPATH is the repository root and pytest's own module names are not)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import ray

from autossvh.config import ClusterConfig
from cluster.clustering_actor import ClusteringActor


class RoundGate:
    """A Ray actor that holds the first clustering round open until the test releases it: rank 1's submission
    waits at the gate, and the test learns (without polling) when rank 0 is in and rank 1 is held."""

    def __init__(self) -> None:
        self.rank0_in = asyncio.Event()
        self.rank1_held = asyncio.Event()
        self.released = asyncio.Event()

    def arrived(self, rank: int) -> None:
        (self.rank0_in if rank == 0 else self.rank1_held).set()

    async def hold(self) -> None:
        await self.released.wait()

    async def wait_round_open(self) -> None:
        await self.rank0_in.wait()
        await self.rank1_held.wait()

    def release(self) -> None:
        self.released.set()


class HeldClusteringActor(ClusteringActor):
    """The clustering actor with rank 1's submission held at a :class:`RoundGate` (a named actor) until the test
    releases it, so that the test can kill the actor in the middle of a round: rank 0 submitted and waiting, rank 1
    not yet. Once released, the gate lets every later submission through (the restarted actor's too)."""

    def __init__(self, cfg: ClusterConfig, gate: str) -> None:
        super().__init__(cfg)
        self.gate = gate

    def submit(self, epoch: int, rank: int, indices, features, codes, previous=None) -> int:
        gate = ray.get_actor(self.gate)
        if rank == 1:
            ray.get(gate.arrived.remote(1))
            ray.get(gate.hold.remote())
        received = super().submit(epoch, rank, indices, features, codes, previous)
        if rank == 0:
            ray.get(gate.arrived.remote(0))
        return received


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
