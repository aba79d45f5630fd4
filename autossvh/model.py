"""AutoSSVH: Transformer encoder/decoder over per-frame features, binary hash layer, adversarial frame sampler.

Sizes and layout follow the released 'small' model (REFERENCE.md §3): encoder 256-d, 12 blocks, 6 heads
(head_dim 42, so the attention's inner width is 252), decoder 192-d, 2 blocks, 3 heads; pre-norm blocks with
BEiT-style q/v biases; a fixed sinusoidal encoder position table and a learnable, zero-initialised decoder
position table; Xavier-uniform init inside encoder and decoder, PyTorch defaults for the hash layer.

A training forward builds two views of every video and runs them through the encoder as ONE batch of 2B
sequences (view-major: rows 0..B-1 are view 1, rows B..2B-1 view 2):

* ``sampler.kind = "adversarial"`` (paper §3.2, §3.6): Grade-Net gives every frame a logit (the pre-sigmoid
  score, so no sigmoid saturation stops it), standardised per video (zero mean, unit deviation over its
  frames; never over the batch, so a video's views do not depend on its batch-mates). Each view hides the top
  K of logits / tau + Gumbel(0, 1): two independent draws on the same logits give the two views, so
  ``sampler.tau`` is the paper's noise level "ensuring different frame sets for the two views". The
  standardisation is what keeps tau meaningful: a scorer can lift one frame up to sqrt(T - 1) deviations above
  the others (hidden in every draw at tau = 1), but not all K at once, so the views keep differing; without
  it the logits grow until both views hide the same frames (measured: view overlap 0.87, README). The forward
  value of the selection is exactly K-hot; its backward is a relaxed top-K of the same perturbed logits (a
  sigmoid around the K-th largest, normalised to sum to K), a straight-through estimator. A gradient
  reversal layer sits between sampler and hashing network, so one backward pass descends the hashing
  network and ascends the sampler.
  Grade-Net reads the embedded frames detached, so the sampler's and the hashing network's parameters are
  disjoint (paper Eq. 18); its output layer starts at zero, so the first draws are uniformly random.
  The selection reaches the loss on three paths, documented design choices (their shares of the scorer's
  gradient: ``benchmarks/bench_sampler.py``):
  - the token gate: every visible token is scaled by (1 - selection) (value 1), so the sampler hears all
    three losses through the encoder; the encoder's LayerNorms make it nearly scale-invariant, so this path
    is weak;
  - the pooling gate: a view's code is the mean of its visible frames' codes weighted by (1 - selection)
    (value 1), so the sampler hears L_VC and L_P2Set directly: which frames pull the view's code towards
    the other view and towards its centre;
  - ``sampler.reconstruction_weight``: each hidden frame's reconstruction error is scaled by its selection
    (value 1), so the sampler hears directly which hidden frames are hard to reconstruct; switching it off
    is an ablation.
* ``sampler.kind = "predicted"`` (not in the paper; HPM, CVPR 2023): Grade-Net, on the detached embedded frames,
  learns to rank frames by their reconstruction error (``sampler.target=loss``) or by that error minus the
  error of copying the view's nearest visible frame (``reducible``, after RHO-LOSS): a pairwise ranking loss on
  each view's hidden frames (:func:`autossvh.losses.ranking_loss`), its own term of the total loss. Both views
  hide the same top ``hard_share`` x K frames by score (the share rising from 0 over the epochs,
  :meth:`AutoSSVH.start_epoch`) and K minus those drawn uniformly and independently per view.
* ``sampler.kind = "random"``: the released complementary random masks (REFERENCE.md §2.2).
* ``sampler.kind = "independent"`` / ``"salience"`` (not in the paper): two independent draws of K hidden
  frames, uniform or by Gumbel top-K on the standardised frame salience (:mod:`autossvh.salience`); no
  gradient reaches the masks.

Pooling (``model.pooling``, not in the paper): with ``salience`` a view's training code and a video's
retrieval code weight the frame codes by the salience weights (renormalised over the visible frames of a view),
so the frames that carry the video make its code; ``mean`` pools uniformly, as the paper does.

Hash layer (``model.hash_layer``): ``released`` binarises every frame, u -> sign(u) with the hard-tanh
straight-through gradient, after Linear + LayerNorm, and a view's training code is the mean of its visible
frames' binary codes; ``paper`` (Eq. 6-7) keeps soft frame codes tanh(u) and a view's training code is
sign(mean) with a straight-through gradient. The decoder reads the per-frame codes in both, with the true
frame positions of visible and hidden frames.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autossvh.config import Config
from autossvh.salience import FrameSalience


def sinusoid_table(length: int, dim: int) -> Tensor:
    """The fixed 'Attention is all you need' position table (length, dim): sin on even, cos on odd dims."""
    position = torch.arange(length, dtype=torch.float64)[:, None]
    exponent = 2 * (torch.arange(dim) // 2).to(torch.float64) / dim
    angle = position / torch.pow(10000.0, exponent)[None, :]
    table = torch.where(torch.arange(dim) % 2 == 0, torch.sin(angle), torch.cos(angle))
    return table.to(torch.float32)


def trunc_normal_(tensor: Tensor, std: float) -> Tensor:
    """Normal(0, std) truncated at +-std, the released init of the mask token."""
    return nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-std, b=std)


class Attention(nn.Module):
    """Multi-head self-attention with separate q and v biases (k bias fixed at 0), via SDPA."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        inner = self.head_dim * heads
        self.qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(inner))
        self.v_bias = nn.Parameter(torch.zeros(inner))
        self.proj = nn.Linear(inner, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias).view(b, n, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))


class Block(nn.Module):
    """Pre-norm Transformer block: x + Attn(LN(x)), then x + MLP(LN(x)) with exact GELU."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class GradeNet(nn.Module):
    """Per-frame logit Linear(e + LN(Linear(GELU(Linear(e))))) (paper Eq. 1 before its sigmoid): the score is
    sigmoid(logit); sampling works on the logit so that no saturation bounds it."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, 1)

    def forward(self, e: Tensor) -> Tensor:
        return self.out(e + self.norm(self.fc2(F.gelu(self.fc1(e))))).squeeze(-1)


class ContextGradeNet(GradeNet):
    """Grade-Net over frames that see their video: one Transformer block across the video's frames, then the
    per-frame logit. Whether a frame recurs in its video or is a one-off is a property of the video, not of the
    frame, so a per-frame scorer cannot learn it (``sampler.kind=predicted``)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__(dim)
        self.context = Block(dim, heads, mlp_ratio)

    def forward(self, e: Tensor) -> Tensor:
        return super().forward(self.context(e))


class GradientReversal(torch.autograd.Function):
    """Identity forward; gradient multiplied by -1 backward (Ganin & Lempitsky)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> Tensor:
        return -grad


def binarize(u: Tensor) -> Tensor:
    """+1 where u > 0 else -1; straight-through gradient 1 on (-1, 1), 0 outside (the released hard-sigmoid/round)."""
    hard = torch.where(u > 0, 1.0, -1.0).to(u.dtype)
    soft = F.hardtanh(u)
    return soft + (hard - soft).detach()


def sign_ste(x: Tensor) -> Tensor:
    """+1 where x > 0 else -1, with the identity gradient (straight-through, Bengio et al. 2013)."""
    return x + (torch.where(x > 0, 1.0, -1.0).to(x.dtype) - x).detach()


def relaxed_topk(keys: Tensor, k: int) -> Tensor:
    """Continuous K-hot relaxation of top-K over the last dim, for the straight-through backward.

    sigmoid(key - threshold), the threshold being the midpoint of the K-th and (K+1)-th largest keys (held
    constant), rescaled to sum to K. Above the others exactly at the top K and the hard top-K as the keys
    separate. Like the inclusion probabilities of Gumbel top-K sampling it sums to K, so its gradient is
    zero-sum: raising one frame's key lowers the others' share, and frames compete for the K places.
    (The successive-softmax relaxation of Xie & Ermon 2019 lets a far-ahead frame be counted twice at any
    finite temperature.)"""
    top = keys.detach().topk(min(k + 1, keys.shape[-1]), dim=-1).values
    soft = torch.sigmoid(keys - top[..., k - 1:].mean(dim=-1, keepdim=True))
    return k * soft / soft.sum(dim=-1, keepdim=True)


def standardize(logits: Tensor) -> Tensor:
    """Per video: zero mean and unit standard deviation over the frames (all-equal logits stay at 0)."""
    centred = logits - logits.mean(-1, keepdim=True)
    return centred / (centred.std(-1, keepdim=True) + 1e-6)


def gumbel_topk(logits: Tensor, k: int, tau: float) -> tuple[Tensor, Tensor]:
    """Gumbel top-K with a straight-through estimator over the last dim of ``logits`` (N, T).

    Draws the top K of logits / tau + Gumbel(0, 1), which samples K frames without replacement with
    probabilities proportional to exp(logit / tau). Returns (hard, selection): ``hard`` is the multi-hot
    top-K (exactly k ones per row) and ``selection`` equals ``hard`` in value with the gradient of the
    relaxed top-K (:func:`relaxed_topk`) of the same perturbed logits.
    """
    uniform = torch.rand_like(logits)
    keys = logits / tau - torch.log(-torch.log(uniform.clamp(1e-20, 1.0)) + 1e-20)
    hard = torch.zeros_like(keys).scatter_(-1, keys.topk(k, dim=-1).indices, 1.0)
    soft = relaxed_topk(keys, k)
    return hard, hard - soft.detach() + soft


def independent_masks(scores: Tensor, k: int, tau: float) -> Tensor:
    """Two independent Gumbel top-K draws of K hidden frames per video on ``scores`` (B, T) at noise level
    ``tau`` (zeros: uniform draws): hidden masks (2B, T), True = hidden, view-major."""
    keys = scores.float().repeat(2, 1) / tau
    keys = keys - torch.log(-torch.log(torch.rand_like(keys).clamp(1e-20, 1.0)) + 1e-20)
    return torch.zeros_like(keys, dtype=torch.bool).scatter_(-1, keys.topk(k, dim=-1).indices, True)


def predicted_masks(scores: Tensor, k: int, num_hard: int) -> Tensor:
    """Hidden masks (2B, T), view-major, from predicted scores (B, T): both views hide the ``num_hard`` frames of
    highest score; each view draws its other ``k - num_hard`` hidden frames uniformly from the rest."""
    keys = torch.rand(2, *scores.shape, device=scores.device)
    if num_hard:
        hard = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(num_hard, dim=-1).indices, True)
        keys = keys.masked_fill(hard, 2.0)  # above every uniform key
    keys = keys.reshape(2 * scores.shape[0], -1)
    return torch.zeros_like(keys, dtype=torch.bool).scatter_(-1, keys.topk(k, dim=-1).indices, True)


def nearest_copy_errors(target: Tensor, visible: Tensor) -> Tensor:
    """Per hidden frame (N, n_hidden), the MSE of the best copy of one of its view's visible frames (N, n_visible,
    F): the reference error of ``sampler.target=reducible``, small where the video repeats the frame's content."""
    return torch.cdist(target.float(), visible.float()).pow(2).amin(dim=-1) / target.shape[-1]


def random_complementary_masks(batch: int, frames: int, num_hidden: int, device: torch.device) -> Tensor:
    """The released masks (REFERENCE §2.2): one permutation per video; view 1 shows its first n_vis frames,
    view 2 its last n_vis. Returns hidden masks (2 * batch, frames), True = hidden, view-major."""
    num_visible = frames - num_hidden
    order = torch.rand(batch, frames, device=device).argsort(dim=1)
    hidden = torch.ones(2, batch, frames, dtype=torch.bool, device=device)
    hidden[0].scatter_(1, order[:, :num_visible], False)
    hidden[1].scatter_(1, order[:, frames - num_visible:], False)
    return hidden.reshape(2 * batch, frames)


class NeighbourSupport(nn.Module):
    """NNCLR's support set (``loss.positives=nearest``): a FIFO queue of the last ``size`` videos' view codes,
    L2-normalised and detached, with their video indices. Buffers, not saved with the weights: a resumed run
    fills it again within ``size`` videos."""

    def __init__(self, size: int, nbits: int) -> None:
        super().__init__()
        self.register_buffer("codes", torch.zeros(size, nbits), persistent=False)
        self.register_buffer("videos", torch.full((size,), -1, dtype=torch.long), persistent=False)
        self.next = 0

    @torch.no_grad()
    def nearest(self, z: Tensor, index: Tensor) -> Tensor:
        """Each row of ``z`` (B, nbits) replaced by its nearest support code (cosine) of another video than its
        own (``index``, B); the row itself, normalised, where the support holds no other video yet."""
        zn = F.normalize(z.float(), dim=-1)
        sim = (zn @ self.codes.T).masked_fill((self.videos < 0) | (self.videos == index[:, None]), -math.inf)
        best = sim.max(dim=1)
        return torch.where(torch.isfinite(best.values)[:, None], self.codes[best.indices], zn)

    @torch.no_grad()
    def push(self, z: Tensor, index: Tensor) -> None:
        """Enqueue view codes (B, nbits) of videos ``index``, overwriting the oldest."""
        n = min(z.shape[0], self.codes.shape[0])
        rows = (self.next + torch.arange(n, device=z.device)) % self.codes.shape[0]
        self.codes[rows] = F.normalize(z[-n:].float(), dim=-1)
        self.videos[rows] = index[-n:]
        self.next = int(rows[-1] + 1) % self.codes.shape[0]


@dataclass
class TrainOutput:
    """What the losses need from one training forward (2B rows, view-major)."""

    codes: Tensor  # (2B, nbits) view codes: mean of the visible frames' codes (released) or its sign (paper)
    recon: Tensor  # (2B, n_hidden, F) predictions of the hidden frames, temporal order
    target: Tensor  # (2B, n_hidden, F) the raw (un-dropped) hidden frames
    frame_weight: Tensor | None  # (2B, n_hidden) sampler selection at hidden frames (value 1), adversarial only
    hidden: Tensor  # (2B, T) bool, True = hidden
    hidden_scores: Tensor | None = None  # (2B, n_hidden) Grade-Net logits at the hidden frames, predicted only
    reference_error: Tensor | None = None  # (2B, n_hidden) nearest-visible-copy MSE, sampler.target=reducible


class Encoder(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        m = cfg.model
        self.embed = nn.Linear(cfg.data.feature_size, m.hidden_size)
        self.register_buffer("pos", sinusoid_table(cfg.data.max_frames, m.hidden_size), persistent=False)
        self.grade_net: nn.Module | None = None
        if cfg.sampler.kind == "adversarial":
            self.grade_net = GradeNet(m.hidden_size)
        elif cfg.sampler.kind == "predicted":
            self.grade_net = ContextGradeNet(m.hidden_size, m.encoder_heads, m.mlp_ratio)
        self.blocks = nn.Sequential(*[Block(m.hidden_size, m.encoder_heads, m.mlp_ratio)
                                      for _ in range(m.encoder_depth)])
        self.norm = nn.LayerNorm(m.hidden_size, eps=1e-6)
        self.head = nn.Linear(m.hidden_size, m.hidden_size)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.norm(self.blocks(tokens)))


class Decoder(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        m = cfg.model
        self.blocks = nn.Sequential(*[Block(m.decoder_dim, m.decoder_heads, m.mlp_ratio)
                                      for _ in range(m.decoder_depth)])
        self.norm = nn.LayerNorm(m.decoder_dim, eps=1e-6)
        self.head = nn.Linear(m.decoder_dim, cfg.data.feature_size)

    def forward(self, tokens: Tensor, num_hidden: int) -> Tensor:
        return self.head(self.norm(self.blocks(tokens)[:, -num_hidden:]))


def _init_xavier(module: nn.Module) -> None:
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            nn.init.xavier_uniform_(sub.weight)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.LayerNorm):
            nn.init.ones_(sub.weight)
            nn.init.zeros_(sub.bias)


class AutoSSVH(nn.Module):
    """Encoder, hash layer and decoder of AutoSSVH; see the module docstring for the training forward.

    Hyperparameters (``cfg.model``, ``cfg.data``, ``cfg.sampler``):
        feature_size, max_frames: input (B, T, F) frame features.
        nbits: code length; hidden_size / encoder_depth / encoder_heads: encoder; decoder_*: decoder.
        data_drop_rate: inverted dropout on the input in training (targets stay un-dropped).
        hash_layer: ``released`` (binary frames, mean) or ``paper`` (tanh frames, sign of the mean).
        sampler.kind, mask_prob (K = int(mask_prob * T) hidden frames per view), grl, tau (Gumbel noise level),
        reconstruction_weight (selection-weighted reconstruction errors).
        pooling: ``mean`` or ``salience`` (frame-salience weights, ``cfg.salience``; the bank is filled by
        ``model.salience.fit`` before training and saved with the weights).
    """

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        m = cfg.model
        self.encoder = Encoder(cfg)
        self.hash = nn.Linear(m.hidden_size, m.nbits)
        self.hash_norm = nn.LayerNorm(m.nbits)
        self.to_decoder = nn.Linear(m.nbits, m.decoder_dim, bias=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, m.decoder_dim))
        self.decoder_pos = nn.Parameter(torch.zeros(1, cfg.data.max_frames, m.decoder_dim))
        self.decoder = Decoder(cfg)
        self.salience = FrameSalience(cfg.salience, cfg.data.feature_size, cfg.data.max_frames) \
            if uses_salience(cfg) else None
        self.support = NeighbourSupport(cfg.loss.support_size, m.nbits) if cfg.loss.positives == "nearest" else None
        self.hard_share = 0.0  # sampler.kind=predicted: the curriculum's share of K, set by start_epoch
        _init_xavier(self.encoder)
        _init_xavier(self.decoder)
        trunc_normal_(self.mask_token, std=0.02)
        if self.encoder.grade_net is not None:  # uniformly random draws until the scorer has learned something
            nn.init.zeros_(self.encoder.grade_net.out.weight)

    def start_epoch(self, epoch: int) -> None:
        """Set the epoch's curriculum: under ``sampler.kind=predicted`` the share of the K hidden frames chosen by
        predicted score rises linearly from 0 at epoch 0 to ``sampler.hard_share`` at the last epoch."""
        last = max(self.cfg.train.num_epochs - 1, 1)
        self.hard_share = self.cfg.sampler.hard_share * min(epoch / last, 1.0)

    def frame_codes(self, tokens: Tensor) -> Tensor:
        """Per-frame codes of embedded tokens (N, n, hidden) → (N, n, nbits): +-1 (released) or tanh (paper)."""
        u = self.hash_norm(self.hash(self.encoder(tokens)))
        return torch.tanh(u) if self.cfg.model.hash_layer == "paper" else binarize(u)

    @torch.no_grad()
    def salience_scores(self, x: Tensor) -> Tensor | None:
        """Frame salience (B, T) of raw features (B, T, F) where the model uses it (:func:`uses_salience`)."""
        return None if self.salience is None else self.salience.scores(x)

    @torch.no_grad()
    def pooling_weights(self, x: Tensor, scores: Tensor | None = None) -> Tensor | None:
        """Salience pooling weights (B, T) of raw features (B, T, F) under ``model.pooling=salience``, from their
        ``scores`` when already computed; None for the uniform mean."""
        if self.cfg.model.pooling != "salience":
            return None
        return self.salience.weights(self.salience.scores(x) if scores is None else scores)

    def view_codes(self, frame_codes: Tensor, weights: Tensor | None = None) -> Tensor:
        """A view's training code from its frame codes (N, n, nbits): the mean (released) or its sign (paper).
        ``weights`` (N, n), of value 1, carry the sampler's pooling gate into the mean."""
        if weights is None:
            mean = frame_codes.mean(dim=1)
        else:
            mean = (frame_codes * weights.unsqueeze(-1)).sum(dim=1) / weights.sum(dim=1, keepdim=True)
        return sign_ste(mean) if self.cfg.model.hash_layer == "paper" else mean

    @torch.no_grad()
    def encode_frames(self, x: Tensor) -> Tensor:
        """Per-frame codes over ALL frames, no sampler, no dropout: (B, T, F) → (B, T, nbits)."""
        return self.frame_codes(self.encoder.embed(x) + self.encoder.pos)

    @torch.no_grad()
    def frame_logits(self, x: Tensor) -> Tensor:
        """Grade-Net's logit of every frame (B, T, F) → (B, T); the adversarial sampler only."""
        if self.encoder.grade_net is None:
            raise ValueError(f"frame_logits: this model has no Grade-Net (sampler.kind={self.cfg.sampler.kind})")
        return self.encoder.grade_net(self.encoder.embed(x) + self.encoder.pos).float()

    def sample_views(self, embedded: Tensor, scores: Tensor | None,
                     predicted: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Hidden masks (2B, T) for the two views of embedded frames (B, T, hidden), given the frames' salience
        ``scores`` (:meth:`salience_scores`), and, for the adversarial sampler, the STE selection (2B, T).
        ``predicted``: Grade-Net's logits (B, T) under ``sampler.kind=predicted`` where the caller has them (the
        training forward, which needs their gradient too); computed here otherwise."""
        b, t, _ = embedded.shape
        k = self.cfg.num_hidden
        s = self.cfg.sampler
        if s.kind == "random":
            return random_complementary_masks(b, t, k, embedded.device), None
        if s.kind == "independent":
            return independent_masks(embedded.new_zeros(b, t), k, 1.0), None
        if s.kind == "salience":
            return independent_masks(standardize(scores), k, s.tau), None
        if s.kind == "predicted":
            if predicted is None:
                predicted = self.encoder.grade_net(embedded.detach()).float()
            return predicted_masks(predicted.detach(), k, round(self.hard_share * k)), None
        logits = standardize(self.encoder.grade_net(embedded.detach()).float()).repeat(2, 1)  # fp32 under autocast
        hard, selection = gumbel_topk(logits, k, s.tau)
        if s.grl:
            selection = GradientReversal.apply(selection)
        return hard.bool(), selection

    def decoder_tokens(self, h: Tensor, visible_idx: Tensor, hidden_idx: Tensor) -> Tensor:
        """[codes + P_dec at the visible frames ; mask token + P_dec at the hidden frames], each group in
        temporal order, with the true frame positions: (N, T, decoder_dim)."""
        pos = self.decoder_pos.expand(h.shape[0], -1, -1)
        rows = torch.arange(h.shape[0], device=h.device)[:, None]
        return torch.cat([self.to_decoder(h) + pos[rows, visible_idx], self.mask_token + pos[rows, hidden_idx]], 1)

    def forward(self, x: Tensor) -> TrainOutput:
        """Training forward on (B, T, F) features: two views, one batched encoder pass."""
        b, t, _ = x.shape
        k = self.cfg.num_hidden
        source = x
        if self.training and self.cfg.data.data_drop_rate > 0.01:
            source = F.dropout(x, self.cfg.data.data_drop_rate)
        embedded = self.encoder.embed(source) + self.encoder.pos
        scores = self.salience_scores(x)  # once per batch, for the sampler and the pooling
        predicted = self.encoder.grade_net(embedded.detach()).float() if self.cfg.sampler.kind == "predicted" \
            else None  # once per batch, for the masks and the ranking loss
        hidden, selection = self.sample_views(embedded, scores, predicted)
        order = hidden.to(torch.uint8).argsort(dim=1, stable=True)  # visible frames first, each in time order
        visible_idx, hidden_idx = order[:, : t - k], order[:, t - k:]
        rows = torch.arange(2 * b, device=x.device)[:, None]
        video = rows % b
        tokens = embedded[video, visible_idx]
        frame_weight = gate = None
        if selection is not None:
            gate = 1.0 - selection[rows, visible_idx]
            tokens = tokens * gate.unsqueeze(-1)
            if self.cfg.sampler.reconstruction_weight:
                frame_weight = selection[rows, hidden_idx]
        pooling = self.pooling_weights(x, scores)
        if pooling is not None:
            pooling = pooling.repeat(2, 1)[rows, visible_idx]
            gate = pooling if gate is None else gate * pooling
        h = self.frame_codes(tokens)
        target = x[video, hidden_idx]
        hidden_scores = reference_error = None
        if predicted is not None:
            hidden_scores = predicted[video, hidden_idx]
            if self.cfg.sampler.target == "reducible":
                reference_error = nearest_copy_errors(target, x[video, visible_idx])
        return TrainOutput(
            codes=self.view_codes(h, gate),
            recon=self.decoder(self.decoder_tokens(h, visible_idx, hidden_idx), k),
            target=target,
            frame_weight=frame_weight,
            hidden=hidden,
            hidden_scores=hidden_scores,
            reference_error=reference_error,
        )


def uses_salience(cfg: Config) -> bool:
    """Whether the model holds a :class:`FrameSalience` (to fit on training videos before training)."""
    return cfg.model.pooling == "salience" or cfg.sampler.kind == "salience"


def leaves_parameters_unused(cfg: Config) -> bool:
    """Whether a training step leaves some parameters out of the backward graph, so that data-parallel training
    must search for them every step (DDP's ``find_unused_parameters``, an extra autograd traversal): only the
    decoder, which feeds nothing but the reconstruction loss, when that loss is off."""
    return not cfg.loss.reconstruction


def video_codes(frame_codes: Tensor, weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Retrieval codes sign(mean over frames) in {-1, 0, +1} (0 on a tie, REFERENCE §3.4) and the
    L2-normalised mean codes that k-means clusters; ``weights`` (B, T) summing to 1 per video make it a
    weighted mean (``model.pooling=salience``)."""
    mean = frame_codes.mean(dim=1) if weights is None else (frame_codes * weights.unsqueeze(-1)).sum(dim=1)
    return torch.sign(mean), F.normalize(mean, dim=-1)
