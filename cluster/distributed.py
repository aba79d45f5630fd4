"""Collectives for data-parallel AutoSSVH training (torch.distributed: NCCL on GPU, gloo on CPU)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from autossvh.engine import is_distributed


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward returns each rank the summed gradient of its own rows.

    Every rank computes the same global loss from the gathered rows; summing the gradients that all ranks
    send to a row gives W times the single-process gradient, which DDP's averaging over W ranks undoes.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor) -> Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = x.shape[0]
        ctx.rank = dist.get_rank()
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate equal-shaped per-rank tensors in rank order; gradient flows back to the local rows.
    Integer tensors (video indices) are gathered without autograd. Identity when not distributed."""
    if not is_distributed():
        return x
    if not x.is_floating_point():
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)
    return _GatherWithGrad.apply(x)


def gather_objects(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` in rank order on rank 0 (None elsewhere); ``[obj]`` on one process."""
    if not is_distributed():
        return [obj]
    parts: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, parts, dst=0)
    return parts


def gather_rows_to_rank0(array: np.ndarray) -> np.ndarray | None:
    """Rank-ordered concatenation of every rank's rows on rank 0 (None elsewhere)."""
    parts = gather_objects(array)
    return None if parts is None else np.concatenate(parts)


def broadcast_from_rank0(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    box = [obj]
    if is_distributed():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def all_ranks_agree(ok: bool) -> bool:
    """True on every rank when ``ok`` is true on every rank (a MIN all-reduce; the tensor on the GPU under NCCL)."""
    if not is_distributed():
        return ok
    flag = torch.tensor([int(ok)], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())
