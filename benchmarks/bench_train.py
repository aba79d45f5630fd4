"""Training throughput (videos/s) of the FCVID-sized AutoSSVH model: ours against a re-creation of the released
computation pattern.

One step = forward + loss + backward + Adam step on one synthetic batch (no data loading). Sizes are FCVID's:
T = 25 frames of F = 4096 features, 64 bits, encoder 256-d / 12 blocks / 6 heads, decoder 192-d / 2 blocks /
3 heads, mask_prob 0.75 (18 hidden / 7 visible frames per view).

Rows:

* ours, recipe ``paper`` (adversarial sampler) and ``released`` (random masks), each with P2Set off (the
  pre-warm-up epochs: no clustering result yet) and on (a random clustering of N training videos at the
  FCVID granularities [250, 500, 1000]), each in fp32 (``train.amp=false``) and with the default
  ``train.amp=true`` (bf16 autocast on CUDA and on CPUs with AMX / AVX512-BF16, else fp32). Each step is one
  call of ``autossvh.engine.train_one_epoch`` on a single batch, i.e. exactly the project's training step.
* the released pattern, re-created here from REFERENCE.md §3, §2.2 and §6 (not copied code): two model
  forwards per step (one per view), each embedding all T frames and selecting the visible tokens with boolean
  masking, attention written out (q @ k^T * scale, softmax, @ v) with the q / zero-k / v bias concatenation,
  the decoder on [visible ; mask tokens] with a learnable position table, the head on the last n_mask tokens;
  loss = MSE(view 1) + MSE(view 2) + a * debiased contrastive loss (2B x 2B similarity with a boolean
  negative mask) in fp32, plus, in the post-warm-up row, b * PCL ProtoNCE ("CVH") as the released loss does.
  The released model's SampleNet (132,354 parameters, never called with random masks) is left out. The masks
  are drawn before the timed step, as the released data loader does; dropout and drop-path are 0 there and
  are omitted.

The ratio columns divide each of our rows by the re-creation's pre-warm-up row and by the re-creation row of
the same phase (P2Set off or on).

Usage (repo root): python -m benchmarks.bench_train [--steps 10] [--warmup 3] [--batch 64] [--device cuda]
[--set KEY=VALUE ...]
(or ``python benchmarks/bench_train.py`` once the project is installed, tools/bootstrap.sh).
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autossvh.clustering import ClusteringResult
from autossvh.config import Config, build_config
from autossvh.engine import build_optimizer, cpu_has_fast_bf16, train_one_epoch
from autossvh.losses import ClusterTargets
from autossvh.model import AutoSSVH
from tests.conftest import random_clustering

FRAMES = 25
FEATURES = 4096


# ----------------------------------------------------------------------------------------------------------
# Re-creation of the released computation pattern
# ----------------------------------------------------------------------------------------------------------


def sinusoid_encoding(length: int, dim: int) -> Tensor:
    """Fixed sinusoidal table (1, length, dim): sin on even dims, cos on odd dims, base 10000."""
    pos = np.arange(length)[:, None]
    rates = np.power(10000.0, 2 * (np.arange(dim) // 2) / dim)[None, :]
    table = pos / rates
    table[:, 0::2] = np.sin(table[:, 0::2])
    table[:, 1::2] = np.cos(table[:, 1::2])
    return torch.tensor(table, dtype=torch.float32)[None]


class ReleasedAttention(nn.Module):
    """BEiT-style attention with explicit softmax(q k^T * scale) v; qkv bias = [q_bias, 0, v_bias]."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        head_dim = dim // heads
        inner = head_dim * heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(inner))
        self.v_bias = nn.Parameter(torch.zeros(inner))
        self.proj = nn.Linear(inner, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        qkv_bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias, requires_grad=False), self.v_bias))
        qkv = F.linear(input=x, weight=self.qkv.weight, bias=qkv_bias)
        qkv = qkv.reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q = q * self.scale
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(b, n, -1)
        return self.proj(x)


class ReleasedMlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ReleasedBlock(nn.Module):
    """Pre-norm block: x + Attn(LN(x)), x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = ReleasedAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = ReleasedMlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def xavier_init(module: nn.Module) -> None:
    """Xavier-uniform Linear weights with zero bias, unit LayerNorm (the released Encoder/Decoder init)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)


class ReleasedEncoder(nn.Module):
    """Embed all frames, add the fixed position table, keep the visible tokens with x[~mask], 12 blocks."""

    def __init__(self, features: int, dim: int, depth: int, heads: int, mlp_ratio: float, frames: int) -> None:
        super().__init__()
        self.patch_embed = nn.Linear(features, dim)
        self.register_buffer("pos_embed", sinusoid_encoding(frames, dim), persistent=False)
        self.blocks = nn.ModuleList([ReleasedBlock(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, dim)
        xavier_init(self)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = self.patch_embed(x)
        x = x + self.pos_embed.type_as(x).to(x.device).clone().detach()
        b, _, c = x.shape
        x_vis = x[~mask].reshape(b, -1, c)
        for blk in self.blocks:
            x_vis = blk(x_vis)
        return self.head(self.norm(x_vis))


class ReleasedDecoder(nn.Module):
    """Blocks over the whole sequence, then LN and the head on the last ``return_token_num`` tokens only."""

    def __init__(self, features: int, dim: int, depth: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([ReleasedBlock(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, features)
        xavier_init(self)

    def forward(self, x: Tensor, return_token_num: int) -> Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x[:, -return_token_num:]))


class Round3(torch.autograd.Function):
    """Round in the forward pass, straight-through gradient in the backward pass."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor) -> Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> Tensor:
        return grad


class ReleasedModel(nn.Module):
    """Encoder, LN + hard-sigmoid + round hash layer, decoder with a learnable zero-initialised position table."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        m = cfg.model
        t, f = cfg.data.max_frames, cfg.data.feature_size
        self.encoder = ReleasedEncoder(f, m.hidden_size, m.encoder_depth, m.encoder_heads, m.mlp_ratio, t)
        self.decoder = ReleasedDecoder(f, m.decoder_dim, m.decoder_depth, m.decoder_heads, m.mlp_ratio)
        self.encoder_to_decoder = nn.Linear(m.nbits, m.decoder_dim, bias=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, m.decoder_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, t, m.decoder_dim))
        self.binary = nn.Linear(m.hidden_size, m.nbits)
        self.ln = nn.LayerNorm(m.nbits)
        nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.02, b=0.02)

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """(B, T, F) features and a (B, T) bool mask (True = masked) → reconstruction of the masked frames
        (B, n_mask, F) and the visible frames' +-1 codes (B, n_vis, nbits)."""
        x_vis = self.encoder(x, mask)
        x_vis = self.ln(self.binary(x_vis))
        x_vis = torch.clamp((x_vis + 1) / 2, 0, 1)
        h = 2 * Round3.apply(x_vis) - 1
        x_vis = self.encoder_to_decoder(h)
        b, _, c = x_vis.shape
        expand_pos = self.pos_embed.expand(b, -1, -1).type_as(x_vis)
        pos_vis = expand_pos[~mask].reshape(b, -1, c)
        pos_mask = expand_pos[mask].reshape(b, -1, c)
        x_full = torch.cat([x_vis + pos_vis, self.mask_token + pos_mask], dim=1)
        return self.decoder(x_full, pos_mask.shape[1]), h


def negative_mask(batch: int, device: torch.device) -> Tensor:
    """(2B, 2B) bool: False on the diagonal and at each row's partner view, True elsewhere; built on the CPU
    with a Python loop every call and then moved, as the released loss does."""
    mask = torch.ones((batch, 2 * batch), dtype=torch.bool)
    for i in range(batch):
        mask[i, i] = False
        mask[i, i + batch] = False
    return torch.cat((mask, mask), 0).to(device)


def released_dcl(out_1: Tensor, out_2: Tensor, temperature: float, tau_plus: float) -> Tensor:
    """Debiased contrastive loss written as the released one: full 2B x 2B similarity, masked_select of the
    negatives, positives from the row-wise product of the two views."""
    batch = out_1.shape[0]
    out = torch.cat([out_1, out_2], dim=0)
    neg = torch.exp(torch.mm(out, out.t().contiguous()) / temperature)
    mask = negative_mask(batch, out.device)
    neg = neg.masked_select(mask).view(2 * batch, -1)
    pos = torch.exp(torch.sum(out_1 * out_2, dim=-1) / temperature)
    pos = torch.cat([pos, pos], dim=0)
    n = batch * 2 - 2
    ng = (-tau_plus * n * pos + neg.sum(dim=-1)) / (1 - tau_plus)
    ng = torch.clamp(ng, min=n * np.e ** (-1 / temperature))
    return (-torch.log(pos / (pos + ng))).mean()


def released_proto_nce(q: Tensor, index: Tensor, targets: ClusterTargets) -> Tensor:
    """PCL ProtoNCE as in the released CVH loss: Python-set negatives sampled with the global ``random``."""
    losses = []
    for im2cluster, prototypes, density in zip(targets.im2cluster, targets.centroids, targets.density, strict=True):
        pos_proto_id = im2cluster[index]
        pos_prototypes = prototypes[pos_proto_id]
        all_proto_id = list(range(int(im2cluster.max()) + 1))
        neg_proto_id = set(all_proto_id) - set(pos_proto_id.tolist())
        neg_proto_id = random.sample(sorted(neg_proto_id), min(q.shape[0], len(neg_proto_id)))
        neg_prototypes = prototypes[neg_proto_id]
        proto_selected = torch.cat([pos_prototypes, neg_prototypes], dim=0)
        logits_proto = torch.mm(q, proto_selected.t())
        labels_proto = torch.linspace(0, q.size(0) - 1, steps=q.size(0)).long().to(q.device)
        temp_proto = density[torch.cat([pos_proto_id, torch.LongTensor(neg_proto_id).to(q.device)], dim=0)]
        logits_proto = logits_proto / temp_proto
        losses.append(F.cross_entropy(logits_proto, labels_proto))
    return sum(losses) / len(losses)


def released_masks(batch: int, frames: int, num_mask: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Complementary random masks as the released data loader draws them: one permutation per video, view 1
    shows its first n_vis frames, view 2 its last n_vis. True = masked."""
    n_vis = frames - num_mask
    m1 = np.ones((batch, frames), dtype=bool)
    m2 = np.ones((batch, frames), dtype=bool)
    for i in range(batch):
        idx = list(range(frames))
        random.shuffle(idx)
        m1[i, idx[:n_vis]] = False
        m2[i, idx[-n_vis:]] = False
    return torch.from_numpy(m1).to(device), torch.from_numpy(m2).to(device)


def released_loss(model: ReleasedModel, x: Tensor, m1: Tensor, m2: Tensor, index: Tensor, cfg: Config,
                  targets: ClusterTargets | None) -> Tensor:
    """rec(view 1) + rec(view 2) + a * dcl (+ b * CVH after warm-up) with two fp32 model forwards."""
    b, _, f = x.shape
    rec1, h1 = model(x, m1)
    rec2, h2 = model(x, m2)
    rec = F.mse_loss(rec1.float(), x[m1].reshape(b, -1, f)) + F.mse_loss(rec2.float(), x[m2].reshape(b, -1, f))
    z1 = F.normalize(h1.float().mean(dim=1), dim=1)
    z2 = F.normalize(h2.float().mean(dim=1), dim=1)
    loss = rec + cfg.loss.a * released_dcl(z1, z2, cfg.loss.temperature, cfg.loss.tau_plus)
    if targets is not None:
        cvh = (released_proto_nce(z1, index, targets) + released_proto_nce(z2, index, targets)) / 2
        loss = loss + cfg.loss.b * cvh
    return loss


# ----------------------------------------------------------------------------------------------------------
# Benchmark harness
# ----------------------------------------------------------------------------------------------------------


def param_shapes(module: nn.Module) -> list[tuple[int, ...]]:
    return sorted(tuple(p.shape) for p in module.parameters())


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Bench:
    """One benchmarked variant: ``step(i)`` runs training step i; ``times`` collects timed step seconds."""

    name: str
    phase: str  # "off" (pre-warm-up) or "on" (P2Set / CVH)
    params: int
    step: Callable[[int], None]
    batch: int
    times: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def videos_per_s(self) -> float:
        return self.batch / self.median


def fcvid_config(recipe: str, args: argparse.Namespace, amp: bool = False) -> Config:
    """The FCVID preset of ``recipe`` at ``args.batch`` with ``amp``, then the ``--set`` overrides."""
    return build_config("fcvid", recipe, overrides=[f"train.batch_size={args.batch}",
                                                    f"train.amp={'true' if amp else 'false'}", *args.overrides])


def amp_label(device: torch.device, amp: bool) -> str:
    """What ``train.amp`` does on this device: bf16 autocast where the hardware has it, else fp32."""
    return "bf16" if amp and (device.type == "cuda" or cpu_has_fast_bf16()) else "fp32"


def bench_ours(recipe: str, p2set: bool, amp: bool, args: argparse.Namespace, device: torch.device, x: Tensor,
               index: Tensor, clustering: ClusteringResult) -> Bench:
    """Our step: ``train_one_epoch`` on one batch (the project's exact training step)."""
    torch.manual_seed(0)
    cfg = fcvid_config(recipe, args, amp)
    model = AutoSSVH(cfg).to(device)
    optimizer = build_optimizer(model, cfg)
    targets = ClusterTargets.from_result(clustering, device) if p2set else None
    batch = [(x, index)]

    def step(_: int) -> None:
        if train_one_epoch(model, batch, optimizer, cfg, device, targets).skipped_steps:
            sys.exit(f"ours ({recipe}): non-finite loss during the benchmark")

    extra = f", P2Set {cfg.loss.centers}" if p2set else ", pre-warm-up"
    return Bench(f"ours {recipe}, {amp_label(device, amp)}{extra}", "on" if p2set else "off", num_params(model), step,
                 x.shape[0])


def bench_released(cvh: bool, args: argparse.Namespace, device: torch.device, x: Tensor, index: Tensor,
                   clustering: ClusteringResult) -> Bench:
    """The re-created released step: two forwards, losses, backward, Adam."""
    torch.manual_seed(0)
    cfg = fcvid_config("released", args)
    model = ReleasedModel(cfg).to(device)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    targets = ClusterTargets.from_result(clustering, device) if cvh else None
    masks = [released_masks(x.shape[0], FRAMES, cfg.num_hidden, device) for _ in range(args.warmup + args.steps)]

    def step(i: int) -> None:
        m1, m2 = masks[i]
        loss = released_loss(model, x, m1, m2, index, cfg, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if not math.isfinite(float(loss.detach())):
            sys.exit("released re-creation: non-finite loss during the benchmark")

    name = "released re-creation, fp32" + (", CVH (ProtoNCE)" if cvh else ", pre-warm-up")
    return Bench(name, "on" if cvh else "off", num_params(model), step, x.shape[0])


def check_parity(device: torch.device, x: Tensor, index: Tensor, clustering: ClusteringResult,
                 args: argparse.Namespace) -> None:
    """Same parameter count and shapes (encoder + hash layer + decoder) for ours (random masks) and the
    re-creation; the re-creation's loss is finite, before and after one Adam step."""
    random.seed(0)
    torch.manual_seed(0)
    cfg = fcvid_config("released", args)
    ours, ours_paper, rel = AutoSSVH(cfg), AutoSSVH(fcvid_config("paper", args)), ReleasedModel(cfg)
    grade = num_params(ours_paper.encoder.grade_net)
    print(f"parameters: ours (released recipe) {num_params(ours):,} | re-creation {num_params(rel):,} | "
          f"ours (paper recipe) {num_params(ours_paper):,} = + Grade-Net {grade:,}\n"
          "  (the released model also holds an unused 132,354-parameter SampleNet; left out of the re-creation)")
    if num_params(ours) != num_params(rel) or param_shapes(ours) != param_shapes(rel):
        sys.exit("parameter layout differs between ours and the re-creation")
    if num_params(ours_paper) != num_params(ours) + grade:
        sys.exit("ours (paper recipe) has parameters beyond encoder + decoder + Grade-Net")
    rel = rel.to(device)
    optimizer = torch.optim.Adam(rel.parameters(), lr=cfg.train.lr)
    targets = ClusterTargets.from_result(clustering, device)
    losses = []
    for _ in range(2):
        m1, m2 = released_masks(x.shape[0], FRAMES, cfg.num_hidden, device)
        if (m1.sum(1) != cfg.num_hidden).any() or (~m1 & ~m2).any():
            sys.exit("re-creation masks are not complementary with the FCVID visible count")
        loss = released_loss(rel, x, m1, m2, index, cfg, targets)
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            sys.exit(f"re-creation loss is not finite: {losses[-1]}")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"re-creation loss (rec + a*dcl + b*CVH, random inputs) finite: {losses[0]:.4f}, "
          f"{losses[1]:.4f} after one Adam step")


def busy_cpu_seconds() -> float | None:
    """CPU seconds all processes on this machine have used since boot (Linux /proc/stat), else None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:8]]
    except (OSError, ValueError):
        return None
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def run_interleaved(benches: list[Bench], warmup: int, steps: int, device: torch.device,
                    max_seconds: float = math.inf) -> None:
    """Warm up every variant, then time one step of each variant per round, rotating the order every round,
    so that background load and thermal drift hit all variants alike; stop after the first round that ends
    past ``max_seconds`` of timing. Reports the CPU share that other processes used meanwhile (the timings
    are only trustworthy when it is near 0)."""
    for bench in benches:
        for i in range(warmup):
            bench.step(i)
    sync(device)
    busy0, own0, wall0 = busy_cpu_seconds(), sum(os.times()[:2]), time.perf_counter()
    for r in range(steps):
        for j in range(len(benches)):
            bench = benches[(r + j) % len(benches)]
            start = time.perf_counter()
            bench.step(warmup + r)
            sync(device)
            bench.times.append(time.perf_counter() - start)
        if time.perf_counter() - wall0 > max_seconds:
            break
    busy1, own1, wall1 = busy_cpu_seconds(), sum(os.times()[:2]), time.perf_counter()
    if busy0 is not None and busy1 is not None:
        other = max(0.0, (busy1 - busy0) - (own1 - own0)) / ((wall1 - wall0) * (os.cpu_count() or 1))
        print(f"other processes used {100 * other:.0f}% of the machine's CPU during the timed steps"
              + (" -- timings are disturbed, rerun on a quiet machine" if other > 0.1 else ""))


def print_table(benches: list[Bench]) -> None:
    base = {b.phase: b for b in benches if b.name.startswith("released")}
    header = (f"{'variant':<45} {'params':>11} {'median s/step':>14} {'min s/step':>11} {'videos/s':>9} "
              f"{'/ rel pre-wu':>13} {'/ rel same phase':>17}")
    print(header)
    print("-" * len(header))
    for b in benches:
        ratios = ("", "")
        if b not in base.values():
            ratios = (f"{b.videos_per_s / base['off'].videos_per_s:.2f}x",
                      f"{b.videos_per_s / base[b.phase].videos_per_s:.2f}x")
        print(f"{b.name:<45} {b.params:>11,} {b.median:>14.4f} {min(b.times):>11.4f} {b.videos_per_s:>9.1f} "
              f"{ratios[0]:>13} {ratios[1]:>17}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant before timing")
    parser.add_argument("--batch", type=int, default=64, help="videos per step")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--n-train", type=int, default=5000, help="training-set size of the random clustering")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override after the preset (repeatable), e.g. model.encoder_depth=2; "
                             "data.max_frames must stay 25")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0 or args.batch < 2:
        parser.error("need --steps >= 1, --warmup >= 0, --batch >= 2")
    return args


def main() -> None:
    args = parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: CUDA is not available (CPU-only PyTorch build or no GPU visible); "
                 "run without --device cuda")
    device = torch.device(args.device)
    torch.set_num_threads(os.cpu_count() or 1)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {where}, torch {torch.__version__}, torch threads {torch.get_num_threads()} "
          f"(os.cpu_count() {os.cpu_count()}), batch {args.batch}, {args.warmup} warm-up + {args.steps} timed "
          f"steps per variant (interleaved); ours with train.amp=true runs {amp_label(device, True)}")
    print(f"FCVID sizes: T={FRAMES}, F={FEATURES}, 64 bits, 18 hidden / 7 visible per view; P2Set / CVH rows "
          f"use a random clustering of N={args.n_train} videos at [250, 500, 1000] clusters")

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, FRAMES, FEATURES, generator=gen).to(device)
    index = torch.randint(0, args.n_train, (args.batch,), generator=gen).to(device)
    clustering = random_clustering(args.n_train, 64, [250, 500, 1000])
    check_parity(device, x, index, clustering, args)

    random.seed(0)
    benches = [bench_released(cvh, args, device, x, index, clustering) for cvh in (False, True)]
    benches += [bench_ours(recipe, p2set, amp, args, device, x, index, clustering)
                for amp in (False, True) for recipe in ("paper", "released") for p2set in (False, True)]
    run_interleaved(benches, args.warmup, args.steps, device)
    print()
    print_table(benches)


if __name__ == "__main__":
    main()
