"""Where the frame sampler's gradient comes from, and how much its scores move the draws.

1. Gradient shares. On a generated UCF101-shaped batch (T = 25 frames, K = 12 hidden per view, informative
   share 0.3), after ``--epochs`` epochs of training so that the scorer has left its zero start, the gradient
   that reaches Grade-Net's parameters is split by loss and path: L_FR through the reconstruction-weight path
   (``sampler.reconstruction_weight``), L_FR through the token gate, a * L_VC and b * L_P2Set (through the token
   and pooling gates). Each part is the gradient of that weighted loss term alone, with the same Gumbel draws; the two
   L_FR paths are separated by running the step once with and once without the weight path. Shares are of the
   sum of the parts' L2 norms, averaged over ``--batches`` batches.
2. Draw probabilities. P(hidden) of a frame whose logit is +L or -L among T - 1 frames at logit 0, for tau in
   {0.3, 1, 3, 10} and L in {1, 2, 4}: how far the scorer must move a frame for the sampler to act on it.

Usage (repo root): python -m benchmarks.bench_sampler [--epochs 2] [--batches 8]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autossvh.clustering import cluster_codes  # noqa: E402
from autossvh.config import Config, build_config  # noqa: E402
from autossvh.engine import array_batches, build_optimizer, encode, train_one_epoch  # noqa: E402
from autossvh.losses import ClusterTargets, autossvh_loss  # noqa: E402
from autossvh.model import AutoSSVH, gumbel_topk  # noqa: E402
from storage.synthetic import make_synthetic  # noqa: E402

SETTINGS = ["model.encoder_depth=2", "data.feature_size=256", "train.batch_size=64", "train.lr=5e-4",
            "cluster.num_cluster=[20, 40, 60]", "cluster.nredo=1", "loss.a=1.0", "loss.b=0.2"]


def scorer_gradient(model: AutoSSVH, cfg: Config, x: torch.Tensor, index: torch.Tensor, targets: ClusterTargets,
                    term: str, seed: int) -> torch.Tensor:
    """Grade-Net's flattened gradient of one weighted loss term, with the Gumbel draws of ``seed``."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    _, parts = autossvh_loss(model(x), index, cfg, targets)
    weight = {"rec": 1.0, "vc": cfg.loss.a, "p2set": cfg.loss.b}[term]
    (weight * parts[term]).backward()
    return torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel())
                      for p in model.encoder.grade_net.parameters()])


def gradient_shares(epochs: int, batches: int, tau: float) -> dict[str, float]:
    ds = make_synthetic("ucf101", 640, feature_dim=256, num_classes=10, seed=0, informative_share=0.3,
                        distractor_share=0.3)
    feats = ds.splits["train"].feats
    settings = [*SETTINGS, f"sampler.tau={tau:g}"]
    cfg = build_config("ucf101", overrides=settings)
    torch.manual_seed(0)
    model = AutoSSVH(cfg)
    optimizer = build_optimizer(model, cfg)
    for _ in range(epochs):
        order = torch.randperm(len(feats)).split(cfg.train.batch_size)
        batch_iter = ((torch.from_numpy(feats[np.sort(i.numpy())]), torch.from_numpy(np.sort(i.numpy())))
                      for i in order)
        train_one_epoch(model, batch_iter, optimizer, cfg, torch.device("cpu"))
    encoded = encode(model, array_batches(feats, 256))
    targets = ClusterTargets.from_result(cluster_codes(encoded.features, encoded.codes, cfg.cluster), "cpu")
    gate_only = build_config("ucf101", overrides=[*settings, "sampler.reconstruction_weight=false"])
    gate_model = AutoSSVH(gate_only)
    gate_model.load_state_dict(model.state_dict())
    norms: dict[str, list[float]] = {"L_FR, weight path": [], "L_FR, gate": [], "a L_VC, gates": [],
                                     "b L_P2Set, gates": []}
    for b in range(batches):
        index = torch.arange(b * 64, (b + 1) * 64)
        x = torch.from_numpy(feats[index.numpy()])
        rec_both = scorer_gradient(model, cfg, x, index, targets, "rec", seed=b)
        rec_gate = scorer_gradient(gate_model, gate_only, x, index, targets, "rec", seed=b)
        norms["L_FR, weight path"].append(float((rec_both - rec_gate).norm()))
        norms["L_FR, gate"].append(float(rec_gate.norm()))
        norms["a L_VC, gates"].append(float(scorer_gradient(model, cfg, x, index, targets, "vc", b).norm()))
        norms["b L_P2Set, gates"].append(float(scorer_gradient(model, cfg, x, index, targets, "p2set", b).norm()))
    mean = {k: float(np.mean(v)) for k, v in norms.items()}
    total = sum(mean.values())
    print(f"Grade-Net gradient by loss and path at tau = {tau:g} (after {epochs} epochs, {batches} batches of 64; "
          "UCF101 shape, K = 12 of T = 25):")
    print(f"{'part':<20} {'mean L2 norm':>14} {'share':>8}")
    for key, value in mean.items():
        print(f"{key:<20} {value:>14.3e} {value / total:>8.1%}")
    return mean


def draw_probabilities(frames: int = 25, k: int = 12, draws: int = 20_000) -> None:
    print(f"\nP(hidden) of one frame at logit +L / -L among {frames - 1} frames at 0 (K = {k}; uniform "
          f"{k / frames:.2f}; standardised logits reach at most sqrt(T - 1) = {(frames - 1) ** 0.5:.1f}):")
    levels = (1, 2, 4)
    print(f"{'tau':>6} " + " ".join(f"{'L=' + str(level):>13}" for level in levels))
    for tau in (0.3, 1.0, 3.0, 10.0):
        cells = []
        for level in levels:
            logits = torch.zeros(draws, frames)
            logits[:, 0] = level
            logits[:, 1] = -level
            hard, _ = gumbel_topk(logits, k, tau)
            cells.append(f"{hard[:, 0].mean():.2f} / {hard[:, 1].mean():.2f}")
        print(f"{tau:>6} " + " ".join(f"{c:>13}" for c in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batches", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for tau in (1.0, 10.0):
        gradient_shares(args.epochs, args.batches, tau)
    draw_probabilities()


if __name__ == "__main__":
    main()
