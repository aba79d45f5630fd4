"""The global-batch loss: 1 and 2 gloo workers give the same loss and gradients on the same global batch, with
same-video positives and with nearest-neighbour positives (whose support set stays the same on every rank)."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from autossvh.losses import ClusterTargets, autossvh_loss
from autossvh.model import NeighbourSupport, TrainOutput
from cluster.distributed import gather_with_grad
from tests.conftest import random_clustering, tiny_config

BATCH, NBITS, HIDDEN, FEATS = 8, 16, 3, 5


def _inputs() -> tuple[TrainOutput, torch.Tensor, ClusterTargets]:
    g = torch.Generator().manual_seed(0)
    out = TrainOutput(codes=torch.randn(2 * BATCH, NBITS, generator=g), recon=torch.randn(2 * BATCH, HIDDEN, FEATS,
                      generator=g), target=torch.randn(2 * BATCH, HIDDEN, FEATS, generator=g), frame_weight=None,
                      hidden=torch.zeros(2 * BATCH, 6, dtype=torch.bool))
    targets = ClusterTargets.from_result(random_clustering(20, NBITS, [3, 5]), "cpu")
    return out, torch.arange(BATCH) * 2, targets


def _support(positives: str) -> NeighbourSupport | None:
    """A support set of 12 other videos' codes, the same in every process (``loss.positives=nearest``)."""
    if positives != "nearest":
        return None
    support = NeighbourSupport(12, NBITS)
    support.push(torch.randn(12, NBITS, generator=torch.Generator().manual_seed(1)), torch.arange(100, 112))
    return support


def _rows(rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s rows of a view-major (2B, ...) output: its videos in both views."""
    per = BATCH // world
    videos = torch.arange(rank * per, (rank + 1) * per)
    return torch.cat([videos, BATCH + videos])


def _rank_rows(out: TrainOutput, rank: int, world: int) -> TrainOutput:
    rows = _rows(rank, world)
    return TrainOutput(out.codes[rows].clone().requires_grad_(), out.recon[rows].clone().requires_grad_(),
                       out.target[rows], None, out.hidden[rows])


def _worker(rank: int, world: int, port: int, positives: str, queue: mp.Queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = tiny_config("loss.b=0.5", f"loss.positives={positives}")
    out, index, targets = _inputs()
    local = _rank_rows(out, rank, world)
    per = BATCH // world
    support = _support(positives)
    loss, parts = autossvh_loss(local, index[rank * per:(rank + 1) * per], cfg, targets, gather_with_grad, support)
    loss.backward()
    # Each rank's rows get W times their single-process gradient; DDP's mean over W ranks of the parameter
    # gradients that these rows produce restores the single-process gradient.
    grads = [t.grad / world for t in (local.codes, local.recon)]
    reduced = torch.stack([loss.detach(), parts["vc"].detach(), parts["p2set"].detach()])
    rec = parts["rec"].detach().clone()
    dist.all_reduce(rec)
    queue.put((rank, reduced.tolist(), float(rec) / world, [g.tolist() for g in grads],
               None if support is None else support.videos.tolist()))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("positives", ["views", "nearest"])
def test_one_and_two_workers_give_the_same_loss_and_gradient(positives):
    cfg = tiny_config("loss.b=0.5", f"loss.positives={positives}")
    out, index, targets = _inputs()
    single = _rank_rows(out, 0, 1)
    support = _support(positives)
    loss, parts = autossvh_loss(single, index, cfg, targets, None, support)
    loss.backward()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, positives, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for rank, (_, vc, p2set), rec, grads, videos in results:
        assert videos == (None if support is None else support.videos.tolist())  # every rank enqueued the same
        assert abs(vc - float(parts["vc"])) < 1e-5 and abs(p2set - float(parts["p2set"])) < 1e-5
        assert abs(rec - float(parts["rec"])) < 1e-5
        rows = _rows(rank, 2)
        torch.testing.assert_close(torch.tensor(grads[0]), single.codes.grad[rows], atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(torch.tensor(grads[1]), single.recon.grad[rows], atol=1e-6, rtol=1e-4)
