"""Frame salience: which frames carry a video, scored without labels from the input features alone.

Not in the paper (README, "Beyond the paper"). A frame carries its video when its content *recurs within the
video* (the video's own theme, not a one-off distractor or a cut) and is *rare across the dataset* (not
background or generic content that every video shows). This is TF-IDF over frames, with nearest neighbours
in place of visual words (Sivic & Zisserman, Video Google, ICCV 2003)::

    within[t] = mean of the ``within_neighbours`` highest cosines between frame t and the video's other frames
    common[t] = mean of the ``cross_neighbours`` highest cosines between frame t and the frames of a bank of
                other training videos
    score[t]  = within[t] - rarity_weight * common[t]

Cosines are taken between frames centred on the bank's mean frame, after a fixed Gaussian projection to
``dim`` dimensions where the features are wider (Johnson-Lindenstrauss: cosines are kept to about
1/sqrt(dim)). A video of the bank never counts as its own neighbour: a bank video that holds a frame identical
to one of the scored video's frames (cosine above ``1 - 1e-4``) is left out of its ``common`` score, so a
training video is scored the same whether or not it is in the bank.

Both parts are needed: recurrence alone prefers background (it recurs too), rarity alone prefers distractors
(each shows something rare). The bank (``bank_videos`` training videos, fixed before training and saved with
the model as buffers) makes the score a function of the model, so a new video is scored the same way.

``weights`` turns scores into pooling weights per video: softmax over frames of the standardised score
divided by ``temperature``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autossvh.config import SalienceConfig

SAME_FRAME = 1.0 - 1e-4  # a bank video holding a frame at least this close is the scored video itself
SCORE_BLOCK = 64  # videos scored at once: bounds the (block, T, bank frames) similarity tensor


def bank_rows(num_videos: int, bank_videos: int, seed: int, chunk: int = 1,
              exclude: np.ndarray | None = None) -> np.ndarray:
    """Sorted rows of the ``bank_videos`` training videos of the bank: whole random chunks of ``chunk``
    consecutive videos (a store's chunk, so that reading them reads whole chunks), cut to ``bank_videos``; with
    fewer training videos, all of them, repeated in turn. Rows in ``exclude`` (videos held out of training) are
    never chosen."""
    rng = np.random.default_rng(seed)
    chunks = rng.permutation(-(-num_videos // chunk))
    rows = np.concatenate([np.arange(c * chunk, min((c + 1) * chunk, num_videos)) for c in chunks])
    if exclude is not None:
        rows = rows[~np.isin(rows, exclude)]
    return np.sort(np.resize(rows, bank_videos))


class FrameSalience(nn.Module):
    """The salience score of :mod:`autossvh.salience`; :meth:`fit` fills the bank before training."""

    def __init__(self, cfg: SalienceConfig, feature_size: int, max_frames: int) -> None:
        super().__init__()
        self.cfg = cfg
        dim = min(cfg.dim, feature_size)
        self.register_buffer("center", torch.zeros(feature_size))
        self.register_buffer("projection", torch.zeros(feature_size, dim))
        self.register_buffer("bank", torch.zeros(cfg.bank_videos * max_frames, dim))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def fit(self, videos: np.ndarray, seed: int = 0) -> None:
        """Fill the bank from ``videos`` (bank_videos, T, F), e.g. the rows :func:`bank_rows` picks: their frames,
        their mean frame as the centre, and a projection seeded with ``seed``."""
        n, t, f = videos.shape
        if n != self.cfg.bank_videos:
            raise ValueError(f"FrameSalience.fit: expected salience.bank_videos={self.cfg.bank_videos} videos, got {n}")
        frames = torch.from_numpy(np.asarray(videos, dtype=np.float32)).reshape(-1, f).to(self.center.device)
        dim = self.projection.shape[1]
        if dim == f:
            projection = torch.eye(f)
        else:
            projection = torch.randn(f, dim, generator=torch.Generator().manual_seed(seed)) / dim**0.5
        self.center.copy_(frames.mean(0))
        self.projection.copy_(projection)
        self.bank.copy_(self._embed(frames))
        self.fitted.fill_(True)

    def fit_from(self, videos: np.ndarray, seed: int, chunk: int = 1, exclude: np.ndarray | None = None) -> None:
        """:meth:`fit` on the rows of ``videos`` (N, T, F), any array that takes an index array (numpy, Zarr),
        that :func:`bank_rows` picks with ``seed`` in whole chunks of ``chunk`` videos, none of ``exclude``."""
        rows = bank_rows(videos.shape[0], self.cfg.bank_videos, seed, chunk, exclude)
        self.fit(np.asarray(videos[rows]), seed)

    def _embed(self, frames: Tensor) -> Tensor:
        return F.normalize((frames.float() - self.center) @ self.projection, dim=-1)

    @torch.no_grad()
    def scores(self, x: Tensor) -> Tensor:
        """Salience score of every frame of ``x`` (B, T, F) → (B, T), float32."""
        if not bool(self.fitted):
            raise RuntimeError("FrameSalience: the bank is empty; call fit() on training videos first")
        with torch.autocast(x.device.type, enabled=False):  # fp32: the same-frame test needs exact cosines
            return torch.cat([self._score_block(block) for block in x.float().split(SCORE_BLOCK)])

    def _score_block(self, block: Tensor) -> Tensor:
        b, t, _ = block.shape
        z = self._embed(block)  # (b, T, dim)
        own = z @ z.transpose(1, 2) - 3.0 * torch.eye(t, device=z.device)  # a frame is not its own neighbour
        within = own.topk(min(self.cfg.within_neighbours, t - 1), dim=-1).values.mean(-1)
        cross = (z @ self.bank.T).view(b, t, self.bank.shape[0] // t, t)  # (b, T, bank videos, T)
        same_video = cross.amax(dim=(1, 3)) > SAME_FRAME
        cross = cross.masked_fill(same_video[:, None, :, None], -2.0).flatten(2)
        common = cross.topk(min(self.cfg.cross_neighbours, cross.shape[-1]), dim=-1).values.mean(-1)
        return within - self.cfg.rarity_weight * common

    @torch.no_grad()
    def weights(self, scores: Tensor) -> Tensor:
        """Pooling weights (B, T) from :meth:`scores`, each row summing to 1: softmax of the standardised score
        divided by the temperature."""
        s = (scores - scores.mean(-1, keepdim=True)) / (scores.std(-1, keepdim=True) + 1e-6)
        return torch.softmax(s / self.cfg.temperature, dim=-1)
