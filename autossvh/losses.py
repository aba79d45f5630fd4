"""AutoSSVH losses: L = L_FR + a * L_VC + b * L_P2Set (paper Eq. 17), each term switchable, + L_rank beyond it.

* Frame reconstruction (REFERENCE §6.2): MSE on the hidden frames of each view, summed over the two views.
  With the adversarial sampler each hidden frame's error is weighted by its selection (value 1, gradient to
  the sampler), so the sampler is pushed towards frames that are hard to reconstruct.
* View contrastive (§6.3): the debiased contrastive loss of Chuang et al. with ``tau_plus`` on the two views'
  L2-normalised codes.
* P2Set (§6.4-6.6), from the first post-warm-up clustering on; averaged over granularities and views:
  - ``centers = "voted"`` (paper): each view's code is pulled towards its cluster's component-voted binary
    centre c (bitwise majority of the members' codes) against every other distinct centre of that
    granularity: cross-entropy over cos(z, c) / ``loss.p2set_temperature``. Clusters whose votes coincide
    share one centre and empty clusters have none (``autossvh.voting.merge_centers``), so no centre is ever a
    negative of itself. This is the paper's reading of Eq. 16 with one global temperature; the released
    code has no vote.
  - ``centers = "prototype"`` (released): PCL's ProtoNCE against the L2-normalised continuous centroids with
    per-cluster density temperatures; B positives (with duplicates) plus min(B, #other clusters) sampled
    negative prototypes.
* Frame ranking (``sampler.kind=predicted``, not in the paper): Grade-Net's pairwise ranking loss on each view's
  hidden frames against their reconstruction error (minus the reference error with ``sampler.target=reducible``),
  detached; it trains Grade-Net alone, whose parameters no other term reaches, so it needs no weight.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from autossvh.clustering import ClusteringResult
from autossvh.config import Config
from autossvh.model import NeighbourSupport, TrainOutput


@dataclass
class ClusterTargets:
    """A clustering result as tensors on the training device, built once per epoch."""

    im2cluster: list[Tensor]
    centers: list[Tensor]  # distinct voted +-1 centres, float
    centroids: list[Tensor]
    density: list[Tensor]
    im2center: list[Tensor]

    @classmethod
    def from_result(cls, result: ClusteringResult, device: torch.device | str) -> ClusterTargets:
        def to(arrays: list[np.ndarray], dtype: torch.dtype) -> list[Tensor]:
            return [torch.tensor(np.asarray(a), dtype=dtype, device=device) for a in arrays]  # copies: never shares

        return cls(
            im2cluster=to(result.im2cluster, torch.long),
            centers=to(result.centers, torch.float32),
            centroids=to(result.centroids, torch.float32),
            density=to(result.density, torch.float32),
            im2center=to(result.im2center, torch.long),
        )


def frame_errors(recon: Tensor, target: Tensor) -> Tensor:
    """Each hidden frame's reconstruction MSE over the feature dim: (N, n_hidden, F) → (N, n_hidden)."""
    return (recon.float() - target.float()).pow(2).mean(dim=-1)


def reconstruction_loss(recon: Tensor, target: Tensor, frame_weight: Tensor | None) -> Tensor:
    """Sum over the two views of the MSE over (B, n_hidden, F); rows are view-major (2B, ...)."""
    err = frame_errors(recon, target)
    if frame_weight is not None:
        err = err * frame_weight
    return err.view(2, -1).mean(dim=1).sum()


def ranking_loss(scores: Tensor, target: Tensor) -> Tensor:
    """Pairwise logistic ranking loss within each row (N, n): for every pair whose targets differ, softplus of
    minus the score difference in the target's order, averaged over those pairs (HPM's loss predictor: only the
    order of the frames' losses is learnt, not their scale, which falls as training goes on)."""
    above = target.unsqueeze(-1) > target.unsqueeze(-2)  # (N, n, n): frame i's target above frame j's
    margin = scores.unsqueeze(-1) - scores.unsqueeze(-2)
    return (F.softplus(-margin) * above).sum() / above.sum().clamp(min=1)


def debiased_contrastive_loss(z1: Tensor, z2: Tensor, temperature: float, tau_plus: float) -> Tensor:
    """Debiased contrastive loss (Chuang et al. 2020) between two views (B, d) of the same B videos.

    For each of the 2B rows r with partner r': pos = exp(o_r.o_r'/t), neg = sum over the 2B-2 other rows of
    exp(o_r.o_k/t), Ng = max((neg - tau_plus*N*pos) / (1 - tau_plus), N*exp(-1/t)) with N = 2B-2,
    loss = mean(-log(pos / (pos + Ng))).
    """
    b = z1.shape[0]
    if b < 2:
        raise ValueError(f"debiased contrastive loss needs at least 2 videos in the batch, got {b}")
    o = F.normalize(torch.cat([z1, z2]).float(), dim=-1)
    sim = torch.exp(o @ o.T / temperature)
    idx = torch.arange(2 * b, device=o.device)
    partner = (idx + b) % (2 * b)
    pos = sim[idx, partner]
    keep = torch.ones_like(sim, dtype=torch.bool)
    keep[idx, idx] = False
    keep[idx, partner] = False
    neg = (sim * keep).sum(dim=1)
    n = 2 * b - 2
    ng = torch.clamp((neg - tau_plus * n * pos) / (1.0 - tau_plus), min=n * math.exp(-1.0 / temperature))
    return -torch.log(pos / (pos + ng)).mean()


def voted_p2set_loss(codes: Tensor, index: Tensor, targets: ClusterTargets, temperature: float) -> Tensor:
    """Point-to-set loss against the distinct component-voted binary centres for one view's codes (B, nbits)."""
    z = F.normalize(codes.float(), dim=-1)
    losses = []
    for im2center, centers in zip(targets.im2center, targets.centers, strict=True):
        logits = z @ (centers / math.sqrt(centers.shape[1])).T / temperature
        losses.append(F.cross_entropy(logits, im2center[index]))
    return torch.stack(losses).mean()


def prototype_loss(codes: Tensor, index: Tensor, targets: ClusterTargets) -> Tensor:
    """The released PCL ProtoNCE loss for one view's codes (B, nbits) (REFERENCE §6.5)."""
    z = F.normalize(codes.float(), dim=-1)
    b = z.shape[0]
    losses = []
    for im2cluster, centroids, density in zip(targets.im2cluster, targets.centroids, targets.density, strict=True):
        pos = im2cluster[index]
        candidates = torch.ones(int(im2cluster.max()) + 1, dtype=torch.bool, device=z.device)
        candidates[pos] = False
        candidates = candidates.nonzero().squeeze(1)
        r = min(b, candidates.numel())
        neg = candidates[torch.randperm(candidates.numel(), device=z.device)[:r]]
        cols = torch.cat([pos, neg])
        logits = z @ centroids[cols].T / density[cols]
        losses.append(F.cross_entropy(logits, torch.arange(b, device=z.device)))
    return torch.stack(losses).mean()


def autossvh_loss(
    out: TrainOutput,
    index: Tensor,
    cfg: Config,
    targets: ClusterTargets | None,
    gather: Callable[[Tensor], Tensor] | None = None,
    support: NeighbourSupport | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Total loss and its unweighted parts (``rec``, ``vc``, ``p2set``, ``rank``, still in the graph) for one
    training forward.

    ``gather`` (data-parallel training) concatenates a per-rank tensor over all ranks, keeping the gradient
    of the local rows: the view-contrastive and P2Set terms then see the global batch, so the loss does not
    depend on the number of workers. Reconstruction is a per-video mean and stays local.

    ``support`` (``loss.positives=nearest``): each view's positive is the other view's nearest support code
    (symmetrised, as NNCLR); the global batch's first views are then enqueued, the same on every rank.
    """
    lo = cfg.loss
    zero = out.codes.new_zeros(())
    z1, z2 = out.codes.chunk(2)
    if gather is not None:
        z1, z2, index = gather(z1), gather(z2), gather(index)
    rec = reconstruction_loss(out.recon, out.target, out.frame_weight) if lo.reconstruction else zero
    vc = zero
    if lo.view_contrastive and support is not None:
        vc = (debiased_contrastive_loss(support.nearest(z1, index), z2, lo.temperature, lo.tau_plus)
              + debiased_contrastive_loss(support.nearest(z2, index), z1, lo.temperature, lo.tau_plus)) / 2
        support.push(z1.detach(), index)
    elif lo.view_contrastive:
        vc = debiased_contrastive_loss(z1, z2, lo.temperature, lo.tau_plus)
    p2set = zero
    if lo.p2set and targets is not None:
        if lo.centers in ("voted", "input"):
            temp = lo.p2set_temperature
            p2set = (voted_p2set_loss(z1, index, targets, temp) + voted_p2set_loss(z2, index, targets, temp)) / 2
        else:
            p2set = (prototype_loss(z1, index, targets) + prototype_loss(z2, index, targets)) / 2
    rank = zero
    if out.hidden_scores is not None:
        target = frame_errors(out.recon, out.target).detach()
        if out.reference_error is not None:
            target = target - out.reference_error
        rank = ranking_loss(out.hidden_scores, target)
    total = rec + lo.a * vc + lo.b * p2set + rank
    return total, {"rec": rec, "vc": vc, "p2set": p2set, "rank": rank}
