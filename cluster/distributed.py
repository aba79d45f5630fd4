"""Collectives for data-parallel AutoSSVH training (torch.distributed: NCCL on GPU, gloo on CPU)."""

from __future__ import annotations

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
