"""Synthetic video-feature datasets shaped like FCVID, ActivityNet, UCF101 and HMDB51.

They let every layer be exercised and tested without the released features: same array shapes
(N videos, T frames, F dims), float32 non-negative activations, multi-hot labels and the same
retrieval protocol as the real dataset, with a class structure that is learnable but not trivial.

Model of the data. Everything lives in a latent space of ``LATENT_DIM`` dims and is mapped to the F
feature dims by one fixed random Gaussian basis, then through a sharp softplus so that the features
look like ReLU activations of a CNN (many near-zero entries, no normalisation):

    x[t] = log(1 + exp(k * (basis . z[t] + bias + eps[t]))),   eps[t]: per-element feature noise

where eps is a triangular (sum of two uniform bytes) noise, much cheaper to draw than Gaussian.

* Classes. Each class is a smooth trajectory through ``ANCHORS`` anchor points placed at normalised
  times 0, 0.5 and 1 and blended with Gaussian radial weights. An anchor mixes a class direction
  (shared by the class's anchors, plus an anchor-specific deviation), a direction shared by the
  class's group (about sqrt(C) groups) and a direction common to all classes. Classes of a group
  therefore overlap: mean-pooled features carry the class but do not separate it perfectly.
* Time. Each video reads its trajectory at tau[t] = phase + speed * (t / (T - 1)) ** gamma, with a
  random phase, speed and warp exponent per video.
* Frames of unequal information. Each frame is a soft mixture of three roles whose logits follow a
  per-video random walk over time: signal (the video's own trajectory), background (one of
  ``BACKGROUNDS`` patterns shared by all classes) and transition (half own trajectory, half the
  trajectory of a random distractor class). ``Split.frame_signal`` records the weight of the
  video's own class signal in every frame (signal + half of transition).
* Per-video variation. An amplitude jitter scales the whole mixture and a latent offset specific to
  the video is added to every frame, along with latent per-frame noise.
* Frames that matter (``informative_share``, ``distractor_share``). When ``informative_share`` is given,
  roles are exact instead of soft: round(informative_share * T) frames (at least one), one contiguous run
  at a random start, show the video's class (``frame_signal`` 1); round(distractor_share * T) of the
  other frames, at random positions, each show a random other class (a distractor); the rest show the
  video's background. Mean pooling then dilutes the class by 1 / informative_share, which is where a
  model that chooses frames should beat one that pools them.
* Multi-label. A ``multilabel_fraction`` of videos blends the trajectory of a second class into its
  own (weight 0.3-0.5); their label rows hold two ones.

Determinism and streaming. Classes are dealt in rounds: the i-th round of ``C`` videos of a split is
a permutation of all classes, so splits are balanced and every class is in train as soon as the
split has ``C`` videos. Every other random draw is made per chunk of ``chunk_videos`` consecutive
videos from a generator seeded by (seed, split, chunk). A video's features therefore depend only on
the dataset parameters, its split and its index, never on how the split is cut into blocks, which
lets ingest stream a large synthetic split with ``SyntheticGenerator.iter_blocks``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np

from storage.schema import Protocol, stored_split, stored_splits

LATENT_DIM = 64
ANCHORS = 3
BACKGROUNDS = 4
MIN_SPLIT_VIDEOS = 8
MIN_VIDEOS_PER_CLASS = 4

_SPLIT_CODES = {"train": 1, "query": 2, "database": 3}
_CHUNK_ELEMENTS = 1 << 20
_STREAM_LABELS = 1
_STREAM_CHUNK = 2
_STREAM_MODEL = 3

# Strength of each part of the model; calibrated so that 64-bit random-projection codes of
# mean-pooled features give a mAP@5 well above chance and well below 1 (see tests).
_OWN_WEIGHT = 1.0
_GROUP_WEIGHT = 0.9
_COMMON_WEIGHT = 0.6
_ANCHOR_DEVIATION = 0.7
_BACKGROUND_NORM = 1.3
ROLE_CLASS, ROLE_BACKGROUND, ROLE_DISTRACTOR = 0, 1, 2  # exact frame roles (Split.frame_role)
_ROLE_BASE = (0.6, 0.0, -0.4)
_ROLE_BASE_JITTER = 0.6
_ROLE_STEP = 0.45
_ROLE_SHARPNESS = 2.0
_VIDEO_OFFSET = 0.9
_FRAME_LATENT_NOISE = 0.35
_FEATURE_NOISE = 0.6
_AMPLITUDE_JITTER = 0.25
_SOFTPLUS_SHARPNESS = 3.0
_BIAS_MEAN = -0.6
_BIAS_STD = 0.3
# Standard deviation of the sum of two independent uniform int8 values.
_TRIANGULAR_STD = math.sqrt(2 * (256**2 - 1) / 12)


@dataclass(frozen=True)
class DatasetShape:
    """Array shape, label space and retrieval protocol of one dataset."""

    name: str
    max_frames: int
    feature_dim: int
    num_classes: int
    protocol: Protocol


SHAPES: dict[str, DatasetShape] = {
    "fcvid": DatasetShape("fcvid", 25, 4096, 239, "query_is_database"),
    "activitynet": DatasetShape("activitynet", 30, 2048, 200, "separate"),
    "ucf101": DatasetShape("ucf101", 25, 4096, 101, "database_is_train"),
    "hmdb51": DatasetShape("hmdb51", 25, 4096, 51, "database_is_train"),
}

# Sizes of the stored splits of the real datasets (REFERENCE.md §2.1); synthetic splits keep the
# same ratios to the train split.
REAL_SPLIT_SIZES: dict[str, dict[str, int]] = {
    "fcvid": {"train": 45585, "database": 45600},
    "activitynet": {"train": 9722, "query": 1000, "database": 3758},
    "ucf101": {"train": 9537, "query": 3783},
    "hmdb51": {"train": 3570, "query": 1530},
}

@dataclass(frozen=True, eq=False)
class Split:
    """Videos of one split: features, multi-hot labels, ids, the true per-frame signal weight and, with exact
    frame roles (``informative_share``), each frame's role (:data:`ROLE_CLASS`, :data:`ROLE_BACKGROUND`,
    :data:`ROLE_DISTRACTOR`; in memory only, not stored)."""

    feats: np.ndarray
    labels: np.ndarray
    video_ids: np.ndarray
    frame_signal: np.ndarray | None = None
    frame_role: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.feats.shape[0])

    def rows(self, start: int, stop: int) -> Split:
        """Videos ``start:stop`` of this split, as views."""
        signal = None if self.frame_signal is None else self.frame_signal[start:stop]
        role = None if self.frame_role is None else self.frame_role[start:stop]
        return Split(self.feats[start:stop], self.labels[start:stop], self.video_ids[start:stop], signal, role)


@dataclass(frozen=True, eq=False)
class SyntheticDataset:
    """A materialised synthetic dataset.

    ``splits`` always has ``train``, ``query`` and ``database``. Aliased splits are the same
    ``Split`` object: under ``database_is_train`` the database is the train split (UCF101, HMDB51),
    under ``query_is_database`` the query is the database split (FCVID, self-match counted).
    """

    shape: DatasetShape
    splits: dict[str, Split]
    seed: int
    multilabel_fraction: float = 0.0

    @property
    def protocol(self) -> Protocol:
        return self.shape.protocol

    @property
    def stored_splits(self) -> tuple[str, ...]:
        """The distinct splits, without aliases: what an ingest has to write."""
        return stored_splits(self.protocol)


class SyntheticGenerator:
    """Deterministic generator of a synthetic dataset, able to produce any slice of any split.

    ``videos`` is the train size; the other stored splits keep the real dataset's ratio to train
    (at least ``MIN_SPLIT_VIDEOS``). ``num_classes`` defaults to the real count capped so that each
    class has at least ``MIN_VIDEOS_PER_CLASS`` train videos.
    """

    def __init__(
        self,
        like: str,
        videos: int,
        feature_dim: int | None = None,
        max_frames: int | None = None,
        num_classes: int | None = None,
        multilabel_fraction: float = 0.0,
        seed: int = 0,
        informative_share: float | None = None,
        distractor_share: float = 0.0,
    ) -> None:
        if like not in SHAPES:
            raise ValueError(f"unknown dataset {like!r}; expected one of {sorted(SHAPES)}")
        if not 0.0 <= multilabel_fraction <= 1.0:
            raise ValueError("multilabel_fraction must be in [0, 1]")
        if informative_share is None and distractor_share:
            raise ValueError("distractor_share needs informative_share (exact frame roles)")
        if informative_share is not None and not (
                0.0 < informative_share <= 1.0 and 0.0 <= distractor_share and informative_share + distractor_share
                <= 1.0):
            raise ValueError(f"informative_share must be in (0, 1] and distractor_share >= 0 with a sum <= 1, got "
                             f"{informative_share} and {distractor_share}")
        real = SHAPES[like]
        if num_classes is None:
            num_classes = max(2, min(real.num_classes, videos // MIN_VIDEOS_PER_CLASS))
        if num_classes < 1 or videos < num_classes:
            raise ValueError(f"need at least one train video per class: {videos=} {num_classes=}")
        self.shape = replace(
            real,
            feature_dim=real.feature_dim if feature_dim is None else feature_dim,
            max_frames=real.max_frames if max_frames is None else max_frames,
            num_classes=num_classes,
        )
        if self.shape.feature_dim < 1 or self.shape.max_frames < 1:
            raise ValueError(f"feature_dim and max_frames must be positive: {self.shape}")
        self.like = like
        self.multilabel_fraction = float(multilabel_fraction)
        self.informative_share = None if informative_share is None else float(informative_share)
        self.distractor_share = float(distractor_share)
        self.seed = int(seed)
        real_sizes = REAL_SPLIT_SIZES[like]
        self.split_sizes: dict[str, int] = {
            name: videos if name == "train" else max(MIN_SPLIT_VIDEOS, round(videos * size / real_sizes["train"]))
            for name, size in real_sizes.items()
        }
        # Videos per chunk, the unit of random draws: a power of two near _CHUNK_ELEMENTS values
        # (feature and latent) per chunk, so a chunk stays cache-sized and cheap to recompute.
        per_video = self.shape.max_frames * (self.shape.feature_dim + LATENT_DIM)
        self.chunk_videos = min(256, max(8, 2 ** round(math.log2(_CHUNK_ELEMENTS / per_video))))
        self._build_model()

    @property
    def protocol(self) -> Protocol:
        return self.shape.protocol

    def size(self, split: str) -> int:
        """Number of videos in ``split`` (aliases resolved)."""
        return self.split_sizes[stored_split(self.protocol, split)]

    def _build_model(self) -> None:
        """Draw the dataset-wide parts: basis, bias, class anchors, groups and backgrounds."""
        rng = np.random.default_rng([self.seed, _STREAM_MODEL])
        c, f = self.shape.num_classes, self.shape.feature_dim
        groups = max(1, round(math.sqrt(c)))
        latent = rng.standard_normal

        def unit(*shape: int) -> np.ndarray:
            v = latent((*shape, LATENT_DIM))
            return v / np.linalg.norm(v, axis=-1, keepdims=True)

        own = unit(c, 1) + _ANCHOR_DEVIATION * unit(c, ANCHORS)
        own /= np.linalg.norm(own, axis=-1, keepdims=True)
        group_of = rng.permutation(c) % groups
        anchors = (
            _OWN_WEIGHT * own + _GROUP_WEIGHT * unit(groups, ANCHORS)[group_of] + _COMMON_WEIGHT * unit(ANCHORS)[None]
        )
        self.anchors = anchors.astype(np.float32)
        self.backgrounds = (_BACKGROUND_NORM * unit(BACKGROUNDS)).astype(np.float32)
        basis = latent((LATENT_DIM, f))
        bias = _BIAS_MEAN + _BIAS_STD * latent(f)
        # Basis with the bias as a last row (latent vectors carry a constant 1), in noise units.
        projection = np.vstack([basis, bias]) * (_TRIANGULAR_STD / _FEATURE_NOISE)
        self._projection = projection.astype(np.float32)

    def _classes(self, split: str, index: np.ndarray) -> np.ndarray:
        """Primary class per video: each round of C consecutive videos permutes all classes."""
        c = self.shape.num_classes
        rounds, pos = np.divmod(index, c)
        out = np.empty(index.shape, dtype=np.int64)
        for r in np.unique(rounds):
            key = [self.seed, _SPLIT_CODES[split], _STREAM_LABELS, int(r)]
            perm = np.random.default_rng(key).permutation(c)
            sel = rounds == r
            out[sel] = perm[pos[sel]]
        return out

    def _trajectory(self, cls: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Latent class signal (n, T, L) from anchor weights (n, T, A)."""
        return np.einsum("nta,nal->ntl", weights, self.anchors[cls])

    def _chunk(self, split: str, chunk: int, feats: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Write the whole chunk ``chunk`` of ``split`` into ``feats`` (chunk_videos, T, F).

        Returns its labels, frame-signal weights and frame roles (-1 with soft roles). The chunk is always
        computed whole, with the same draws and array shapes, so floating-point results cannot depend on the
        block asked for.
        """
        t_len, f = self.shape.max_frames, self.shape.feature_dim
        c = self.shape.num_classes
        n = self.chunk_videos
        rng = np.random.default_rng([self.seed, _SPLIT_CODES[split], _STREAM_CHUNK, chunk])
        u = rng.random((n, 7))
        g = rng.standard_normal((n, 2))
        role_base = rng.standard_normal((n, 3))
        role_steps = rng.standard_normal((n, t_len, 3))
        offset = rng.standard_normal((n, LATENT_DIM))
        frame_latent = rng.standard_normal((n, t_len, LATENT_DIM))
        noise_bits = rng.integers(0, 2**32, size=(n, -(-t_len * f // 2)), dtype=np.uint32)

        index = chunk * n + np.arange(n)
        cls = self._classes(split, index)
        multi = (u[:, 0] < self.multilabel_fraction) & (c > 1)
        second = (cls + 1 + np.floor(u[:, 1] * (c - 1)).astype(np.int64)) % c
        mix = np.where(multi, 0.3 + 0.2 * u[:, 2], 0.0)
        distractor = (cls + 1 + np.floor(u[:, 3] * (c - 1)).astype(np.int64)) % c
        background = np.floor(u[:, 4] * BACKGROUNDS).astype(np.int64)

        phase = 0.3 * (u[:, 5] - 0.5)
        speed = 0.6 + 0.6 * u[:, 6]
        gamma = np.exp(0.35 * g[:, 0])
        amplitude = np.exp(_AMPLITUDE_JITTER * g[:, 1])
        clock = np.linspace(0.0, 1.0, t_len) if t_len > 1 else np.zeros(1)
        tau = phase[:, None] + speed[:, None] * clock[None, :] ** gamma[:, None]
        centres = np.linspace(0.0, 1.0, ANCHORS)
        width = 0.6 / (ANCHORS - 1)
        anchor_w = np.exp(-0.5 * ((tau[..., None] - centres) / width) ** 2)
        anchor_w /= anchor_w.sum(-1, keepdims=True)

        own = self._trajectory(cls, anchor_w)
        labelled = own + mix[:, None, None] * (self._trajectory(second, anchor_w) - own)
        bg = self.backgrounds[background][:, None, :]
        if self.informative_share is None:
            w_sig, w_bg, w_tr = self._soft_roles(role_base, role_steps)
            other = self._trajectory(distractor, anchor_w)
            mixture = w_sig * labelled + w_bg * bg + 0.5 * w_tr * (own + other)
            signal = (w_sig + 0.5 * w_tr)[..., 0]
            roles = np.full((n, t_len), -1, np.int8)
        else:
            roles, others = self._exact_roles(rng, n, cls)
            others_traj = np.einsum("nta,ntal->ntl", anchor_w, self.anchors[others])
            mixture = np.where(roles[..., None] == ROLE_CLASS, labelled,
                               np.where(roles[..., None] == ROLE_BACKGROUND, bg, others_traj))
            signal = (roles == ROLE_CLASS).astype(np.float32)
        z = np.ones((n, t_len, LATENT_DIM + 1), dtype=np.float32)
        z[..., :LATENT_DIM] = (
            amplitude[:, None, None] * mixture
            + (_VIDEO_OFFSET / math.sqrt(LATENT_DIM)) * offset[:, None, :]
            + (_FRAME_LATENT_NOISE / math.sqrt(LATENT_DIM)) * frame_latent
        )

        # Pre-activations in units of the integer noise, so the noise bytes are added unscaled.
        pre = feats.reshape(n * t_len, f)
        np.matmul(z.reshape(n * t_len, LATENT_DIM + 1), self._projection, out=pre)
        noise = noise_bits.view(np.int8)[:, : 2 * t_len * f].reshape(n, t_len, 2 * f)
        feats += noise[..., 0::2]
        feats += noise[..., 1::2]
        pre *= np.float32(_SOFTPLUS_SHARPNESS * _FEATURE_NOISE / _TRIANGULAR_STD)
        _softplus_inplace(pre)

        labels = np.zeros((n, c), dtype=np.uint8)
        rows = np.arange(n)
        labels[rows, cls] = 1
        labels[rows[multi], second[multi]] = 1
        return labels, signal.astype(np.float32), roles.astype(np.int8)

    @staticmethod
    def _soft_roles(role_base: np.ndarray, role_steps: np.ndarray) -> tuple[np.ndarray, ...]:
        """Per-frame weights (n, T, 1) of signal, background and transition: a softmax over roles whose logits
        follow a per-video random walk over time."""
        logits = (
            np.asarray(_ROLE_BASE)
            + _ROLE_BASE_JITTER * role_base[:, None, :]
            + _ROLE_STEP * np.cumsum(role_steps, axis=1)
        )
        logits *= _ROLE_SHARPNESS
        logits -= logits.max(-1, keepdims=True)
        roles = np.exp(logits)
        roles /= roles.sum(-1, keepdims=True)
        return roles[..., 0:1], roles[..., 1:2], roles[..., 2:3]

    def _exact_roles(self, rng: np.random.Generator, n: int, cls: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact frame roles (n, T): 0 = the video's class (one contiguous run), 1 = background, 2 = a distractor
        frame of the random other class given in the second array (n, T)."""
        t_len, c = self.shape.max_frames, self.shape.num_classes
        n_sig = max(1, round(self.informative_share * t_len))
        n_dis = min(round(self.distractor_share * t_len), t_len - n_sig)
        start = rng.integers(0, t_len - n_sig + 1, size=n)
        frames = np.arange(t_len)[None, :]
        informative = (frames >= start[:, None]) & (frames < start[:, None] + n_sig)
        order = np.argsort(np.where(informative, np.inf, rng.random((n, t_len))), axis=1, kind="stable")
        roles = np.where(informative, ROLE_CLASS, ROLE_BACKGROUND)
        np.put_along_axis(roles, order[:, :n_dis], ROLE_DISTRACTOR, axis=1)
        others = (cls[:, None] + 1 + np.floor(rng.random((n, t_len)) * max(c - 1, 1)).astype(np.int64)) % c
        return roles, others

    def _fill(self, split: str, start: int, stop: int, pool: ThreadPoolExecutor | None = None) -> Split:
        """Videos ``start:stop`` of stored split ``split``, written chunk by chunk in place."""
        t_len, f, c = self.shape.max_frames, self.shape.feature_dim, self.shape.num_classes
        n = stop - start
        feats = np.empty((n, t_len, f), np.float32)
        labels = np.empty((n, c), np.uint8)
        signal = np.empty((n, t_len), np.float32)
        roles = np.empty((n, t_len), np.int8)
        n_chunk = self.chunk_videos

        def fill(chunk: int) -> None:
            first = chunk * n_chunk
            lo, hi = max(start - first, 0), min(stop - first, n_chunk)
            rows = slice(first + lo - start, first + hi - start)
            if lo == 0 and hi == n_chunk:
                labels[rows], signal[rows], roles[rows] = self._chunk(split, chunk, feats[rows])
                return
            whole = np.empty((n_chunk, t_len, f), np.float32)
            chunk_labels, chunk_signal, chunk_roles = self._chunk(split, chunk, whole)
            feats[rows] = whole[lo:hi]
            labels[rows] = chunk_labels[lo:hi]
            signal[rows] = chunk_signal[lo:hi]
            roles[rows] = chunk_roles[lo:hi]

        chunks = range(start // n_chunk, -(-stop // n_chunk))
        list(pool.map(fill, chunks) if pool is not None else map(fill, chunks))
        exact = self.informative_share is not None
        return Split(feats, labels, _video_ids(split, np.arange(start, stop)), signal, roles if exact else None)

    def generate(self, split: str, start: int = 0, stop: int | None = None) -> Split:
        """Videos ``start:stop`` of ``split`` (aliases resolved), the same however it is cut."""
        name = stored_split(self.protocol, split)
        size = self.split_sizes[name]
        stop = size if stop is None else stop
        if not 0 <= start <= stop <= size:
            raise ValueError(f"invalid range {start}:{stop} for split {name!r} of {size} videos")
        return self._fill(name, start, stop)

    def iter_blocks(self, split: str, block_size: int | None = None) -> Iterator[tuple[int, Split]]:
        """Yield ``(start, block)`` over ``split`` in order, ``block_size`` videos at a time.

        Blocks are generated a whole number of chunks at a time and yielded as views of that span,
        so any block size costs about the same; the default is one chunk.
        """
        if block_size is not None and block_size < 1:
            raise ValueError("block_size must be positive")
        name = stored_split(self.protocol, split)
        size = self.split_sizes[name]
        step = block_size or self.chunk_videos
        n_chunk = self.chunk_videos
        span_start, span = 0, self._fill(name, 0, 0)
        for start in range(0, size, step):
            stop = min(start + step, size)
            if stop > span_start + len(span):
                span_start = start // n_chunk * n_chunk
                span = self._fill(name, span_start, min(-(-stop // n_chunk) * n_chunk, size))
            yield start, span.rows(start - span_start, stop - span_start)

    def materialise(self, workers: int | None = None) -> SyntheticDataset:
        """Generate every stored split into memory, chunks in parallel on ``workers`` threads."""
        with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
            stored = {name: self._fill(name, 0, n, pool) for name, n in self.split_sizes.items()}
        return SyntheticDataset(
            shape=self.shape,
            splits={name: stored[stored_split(self.protocol, name)] for name in _SPLIT_CODES},
            seed=self.seed,
            multilabel_fraction=self.multilabel_fraction,
        )


def make_synthetic(
    like: str,
    videos: int,
    feature_dim: int | None = None,
    max_frames: int | None = None,
    num_classes: int | None = None,
    multilabel_fraction: float = 0.0,
    seed: int = 0,
    informative_share: float | None = None,
    distractor_share: float = 0.0,
) -> SyntheticDataset:
    """A synthetic dataset shaped like ``like`` with ``videos`` train videos, fully in memory."""
    return SyntheticGenerator(
        like,
        videos,
        feature_dim=feature_dim,
        max_frames=max_frames,
        num_classes=num_classes,
        multilabel_fraction=multilabel_fraction,
        seed=seed,
        informative_share=informative_share,
        distractor_share=distractor_share,
    ).materialise()


def _softplus_inplace(x: np.ndarray) -> np.ndarray:
    """log(1 + exp(x)) in place on float32 ``x``: a smooth ReLU, non-negative.

    The direct form is exact enough in float32 once ``x`` is clipped below exp's overflow, and
    is several times faster than the branch-free stable form.
    """
    np.minimum(x, np.float32(80.0), out=x)
    np.exp(x, out=x)
    x += np.float32(1.0)
    np.log(x, out=x)
    return x


def _video_ids(split: str, index: np.ndarray) -> np.ndarray:
    """Ids such as ``train_000123``."""
    return np.array([f"{split}_{i:06d}" for i in index.tolist()], dtype=np.str_)
