"""One typed, validated configuration per run.

A config is built in this order, each step overriding the previous one:

1. the dataset preset (``activitynet``, ``fcvid``, ``ucf101``, ``hmdb51``), holding the values of the released
   configs ``configs/AutoSSVH_{act,fcv,ucf,hmdb}.py`` (REFERENCE.md §5);
2. the recipe: ``paper`` (default: adversarial sampler, P2Set against component-voted binary centres),
   ``released`` (random complementary masks, prototype loss against continuous centroids, cold k-means every
   round, as coded upstream) or ``focused`` (beyond the paper: salience pooling, centres fixed from the pooled
   input with P2Set at b = 1, nearest-neighbour positives, independent random masks, the learning rate halved
   every 10 epochs; :mod:`autossvh.salience`, :mod:`autossvh.anchors`);
3. a YAML file of nested sections or dotted keys;
4. ``key=value`` overrides (``train.lr=5e-4``, ``cluster.num_cluster=[250,400,600]``).

Keys keep the upstream names (``nbits``, ``max_frames``, ``mask_prob``, ``num_cluster``, ``warmup_epoch``,
``kmeans_temperature``, ``a``, ``b``, ``tau_plus``) so results map across. Every ablation of the paper's
Table 3 is a switch: ``sampler.grl=false`` (I), ``sampler.kind=random`` (II), ``loss.reconstruction=false``
(VI), ``loss.view_contrastive=false`` (VII), ``loss.p2set=false`` (VIII).

A key set explicitly (YAML or override) that does nothing under the rest of the config (``sampler.tau`` with
the random sampler, ``loss.b`` without P2Set, ...) is named in a warning (:func:`inert_keys`); for the switches
beyond the paper (``salience.*``, ``sampler.kind=independent|salience|predicted``, ``loss.centers=input``,
``loss.positives=nearest``) it is refused.

Where the paper and the released config disagree, the presets keep the released value (FCVID: ``a = 1.0``
and ``num_cluster = [250, 500, 1000]``; the paper states ``a = 0.2`` and ``[250, 400, 600]``; ActivityNet:
12/2 layers where the paper states 6/1).

Learning rates and other scales have sane ranges (:data:`SANE_RANGES`, inclusive); a value outside is refused
by name, since it trains to nothing or to overflow rather than to a model: ``train.lr`` in [1e-8, 0.1] (and
``train.lr * sampler.lr_scale`` too), ``train.weight_decay`` in [0, 1], ``sampler.lr_scale`` in [1e-3, 1e3],
``sampler.tau`` in [0.01, 1000], ``loss.a`` and ``loss.b`` in [0, 100], every temperature
(``loss.temperature``, ``loss.p2set_temperature``, ``cluster.kmeans_temperature``, ``salience.temperature``)
in [0.01, 10]. A run that diverges all the same is stopped (``autossvh.trainer.check_divergence``) when an
epoch's mean loss exceeds ``train.max_loss`` (default 1e6; the loss is a feature-space MSE plus bounded terms,
so features of a much larger scale need more), when the L2 norm of all weights exceeds
``train.max_weight_norm`` (default 1e5; the released model starts near 170) or is not finite, or when
every step of an epoch had a non-finite loss.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

log = logging.getLogger(__name__)

Recipe = Literal["paper", "released", "focused"]
SamplerKind = Literal["adversarial", "random", "independent", "salience", "predicted"]
PredictedTarget = Literal["loss", "reducible"]
CenterKind = Literal["voted", "prototype", "input"]
Positives = Literal["views", "nearest"]
HashLayer = Literal["paper", "released"]
Pooling = Literal["mean", "salience"]

DATASETS = ("activitynet", "fcvid", "ucf101", "hmdb51")
RECIPES = ("paper", "released", "focused")


class ConfigError(ValueError):
    """A config key or value that is not allowed; the message names the key."""


@dataclass
class DataConfig:
    """Input features: every video has exactly ``max_frames`` frames of ``feature_size`` dims."""

    feature_size: int = 4096
    max_frames: int = 25
    data_drop_rate: float = 0.0  # inverted dropout on the encoder input in training: 0, or above 0.01 (released)


@dataclass
class ModelConfig:
    """Transformer sizes; the defaults are the released 'small' model (REFERENCE.md §3.1).

    ``hash_layer``: ``released`` binarises every frame (LayerNorm, sign with a hard-tanh straight-through
    gradient) and a view's training code is the mean of its binary frame codes; ``paper`` (Eq. 6-7) keeps
    soft per-frame codes tanh(LayerNorm(.)) and a view's training code is sign(mean) with a straight-through
    gradient. Retrieval codes are sign(mean over all frames) of the per-frame codes in both.

    ``pooling`` (not in the paper): ``mean`` pools frame codes uniformly, as the paper does; ``salience``
    weights them by :mod:`autossvh.salience` (``salience.*``), in the views' training codes and in the
    retrieval codes alike.
    """

    nbits: int = 64
    hash_layer: HashLayer = "released"
    hidden_size: int = 256
    encoder_depth: int = 12
    encoder_heads: int = 6
    decoder_dim: int = 192
    decoder_depth: int = 2
    decoder_heads: int = 3
    mlp_ratio: float = 4.0
    pooling: Pooling = "mean"


@dataclass
class SalienceConfig:
    """The label-free frame score of :mod:`autossvh.salience` (not in the paper): recurrence within the video
    minus ``rarity_weight`` times commonness across a bank of ``bank_videos`` training videos, on cosines after
    a projection to ``dim`` dims; ``within_neighbours`` / ``cross_neighbours`` nearest frames average into
    each part. Pooling weights are softmax(standardised score / ``temperature``) over a video's frames. Used by
    ``model.pooling=salience`` and ``sampler.kind=salience``."""

    within_neighbours: int = 2
    cross_neighbours: int = 30
    rarity_weight: float = 1.0
    temperature: float = 0.15
    bank_videos: int = 256
    dim: int = 256


@dataclass
class SamplerConfig:
    """Which frames each view hides (and the decoder reconstructs).

    ``adversarial``: Grade-Net logits, Gumbel top-K with a straight-through estimator, K = int(mask_prob *
    max_frames) hidden frames per view, gradient reversal between sampler and hashing network (``grl``).
    ``tau`` is the paper's noise level: each view hides the top K of logits / tau + Gumbel(0, 1) noise, the
    logits standardised per video.
    ``reconstruction_weight`` weights each hidden frame's reconstruction error by its selection (the path by
    which the sampler hears L_FR directly); the token gate on visible frames carries all three losses.
    ``lr_scale`` multiplies ``train.lr`` for Grade-Net's parameters.
    ``random``: the released complementary random masks (REFERENCE.md §2.2).
    ``independent`` (not in the paper): each view hides K frames drawn uniformly and independently of the other
    view, so the views share about K^2 / T hidden frames as the adversarial sampler's draws do; the random
    sampler with the full row's view overlap, to separate choosing frames from how the views overlap.
    ``salience`` (not in the paper): each view hides the top K of salience / tau + Gumbel noise, the
    :mod:`autossvh.salience` scores standardised per video, two independent draws; no learned scorer.
    ``predicted`` (not in the paper; after HPM, CVPR 2023): Grade-Net learns, with a pairwise ranking loss on
    each view's hidden frames, to rank frames by ``target``: ``loss``, their reconstruction error (HPM), or
    ``reducible``, that error minus the error of a reference predictor that copies the view's nearest visible
    frame (after RHO-LOSS, ICML 2022: a frame nothing in its video resembles stays unpredictable and scores
    low). Each view hides the ``hard_share`` x K frames of highest predicted score, the same in both views, and
    K minus those drawn uniformly and independently per view; the share rises linearly from 0 at the first
    epoch to ``hard_share`` at the last (HPM's easy-to-hard curriculum). No gradient reversal.
    """

    kind: SamplerKind = "adversarial"
    mask_prob: float = 0.5
    grl: bool = True
    tau: float = 10.0  # chosen on a validation store (README: the sampler choosing less scored higher)
    reconstruction_weight: bool = True
    lr_scale: float = 1.0
    target: PredictedTarget = "reducible"
    hard_share: float = 0.5


@dataclass
class LossConfig:
    """L = L_FR + a * L_VC + b * L_P2Set (paper Eq. 17); each term can be switched off (Table 3).

    ``positives`` (L_VC): ``views``, a video's two views are each other's positive (paper); ``nearest`` (not in
    the paper; NNCLR, ICCV 2021), each view's positive is the other view's nearest neighbour, by cosine, among
    the view codes of the last ``support_size`` training videos of other videos, so that L_VC pulls similar
    videos together instead of only telling every video from every other.
    """

    reconstruction: bool = True
    view_contrastive: bool = True
    p2set: bool = True
    centers: CenterKind = "voted"
    a: float = 1.0
    b: float = 0.2
    temperature: float = 0.5  # debiased contrastive loss tau
    tau_plus: float = 0.1  # debiased contrastive loss class prior
    p2set_temperature: float = 0.2  # P2Set against voted centres: one temperature (paper Eq. 16)
    positives: Positives = "views"
    support_size: int = 4096


@dataclass
class ClusterConfig:
    """Multi-granularity k-means on the training codes, every epoch from ``warmup_epoch`` on (REFERENCE §7.2).

    ``kmeans_temperature`` is the mean of the per-cluster density temperatures of the prototype loss (PCL).
    ``warm_start`` (not in the released code): a round after the first starts from the previous round's
    centroids and stops when the objective improves by less than ``warm_tolerance`` (relative) per iteration
    (:mod:`autossvh.clustering`). ``num_cpus``: CPUs the Ray clustering actor (and each k-means shard) reserves
    and uses as faiss threads; 0 reserves none and runs one thread; with more than one, granularities run in
    parallel.
    """

    num_cluster: list[int] = field(default_factory=lambda: [250, 400, 600])
    warmup_epoch: int = 50
    kmeans_temperature: float = 0.2
    niter: int = 20
    nredo: int = 5
    max_points_per_centroid: int = 200
    min_points_per_centroid: int = 2
    num_shards: int = 1  # >1: the assignment step of k-means is sharded across that many actors (Ray runs)
    warm_start: bool = True
    warm_tolerance: float = 1e-4
    num_cpus: int = 0


@dataclass
class TrainConfig:
    """Adam with StepLR (``lr_step`` epochs, ``lr_gamma``) floored at ``min_lr``; seeds; evaluation cadence."""

    batch_size: int = 128
    num_epochs: int = 350
    lr: float = 1e-4
    weight_decay: float = 0.0
    lr_step: int = 20
    lr_gamma: float = 0.9
    min_lr: float = 1e-6
    seed: int = 1
    eval_every: int = 1
    test_batch_size: int = 128
    amp: bool = True  # bf16 autocast on CUDA and on CPUs with native bf16 (AMX / AVX512-BF16)
    max_nonfinite_steps: int = 20  # consecutive non-finite losses (each step skipped) before the run stops
    max_loss: float = 1e6  # an epoch's mean loss above this stops the run as diverged
    max_weight_norm: float = 1e5  # the L2 norm of all weights above this stops the run as diverged


@dataclass
class Config:
    """A whole run's configuration."""

    dataset: str = "ucf101"
    recipe: Recipe = "paper"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    salience: SalienceConfig = field(default_factory=SalienceConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def num_hidden(self) -> int:
        """Frames each view hides: int(mask_prob * max_frames), as the released mask generator truncates."""
        return int(self.sampler.mask_prob * self.data.max_frames)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted keys to values, e.g. ``{"train.lr": 1e-4, ...}`` (for logging as params)."""
        return _flatten(self.to_dict())

    def validate(self) -> Config:
        _validate(self)
        return self


PRESETS: dict[str, dict[str, Any]] = {
    "activitynet": {
        "data.feature_size": 2048, "data.max_frames": 30, "data.data_drop_rate": 0.2,
        "model.nbits": 64, "sampler.mask_prob": 0.5,
        "loss.a": 0.2, "loss.b": 0.01, "loss.temperature": 0.5, "loss.tau_plus": 0.05,
        "cluster.num_cluster": [250, 400, 600], "cluster.warmup_epoch": 100, "cluster.kmeans_temperature": 0.2,
        "train.batch_size": 128, "train.num_epochs": 800, "train.min_lr": 1e-6, "train.eval_every": 1,
    },
    "fcvid": {
        "data.feature_size": 4096, "data.max_frames": 25, "data.data_drop_rate": 0.0,
        "model.nbits": 64, "sampler.mask_prob": 0.75,
        "loss.a": 1.0, "loss.b": 0.01, "loss.temperature": 0.5, "loss.tau_plus": 0.1,
        "cluster.num_cluster": [250, 500, 1000], "cluster.warmup_epoch": 100, "cluster.kmeans_temperature": 0.2,
        "train.batch_size": 512, "train.num_epochs": 805, "train.min_lr": 1e-5, "train.eval_every": 10,
    },
    "ucf101": {
        "data.feature_size": 4096, "data.max_frames": 25, "data.data_drop_rate": 0.0,
        "model.nbits": 64, "sampler.mask_prob": 0.5,
        "loss.a": 1.0, "loss.b": 0.2, "loss.temperature": 0.5, "loss.tau_plus": 0.1,
        "cluster.num_cluster": [250, 400, 600], "cluster.warmup_epoch": 50, "cluster.kmeans_temperature": 0.2,
        "train.batch_size": 128, "train.num_epochs": 350, "train.min_lr": 1e-6, "train.eval_every": 1,
    },
    "hmdb51": {
        "data.feature_size": 4096, "data.max_frames": 25, "data.data_drop_rate": 0.0,
        "model.nbits": 16, "sampler.mask_prob": 0.7,
        "loss.a": 1.0, "loss.b": 0.2, "loss.temperature": 0.5, "loss.tau_plus": 0.1,
        "cluster.num_cluster": [250, 400, 600], "cluster.warmup_epoch": 50, "cluster.kmeans_temperature": 0.2,
        "train.batch_size": 128, "train.num_epochs": 350, "train.min_lr": 1e-6, "train.eval_every": 1,
    },
}

RECIPE_DEFAULTS: dict[str, dict[str, Any]] = {
    "paper": {"sampler.kind": "adversarial", "loss.centers": "voted", "model.hash_layer": "released"},
    "released": {"sampler.kind": "random", "loss.centers": "prototype", "model.hash_layer": "released",
                 "cluster.warm_start": False},
    "focused": {"sampler.kind": "independent", "loss.centers": "input", "model.pooling": "salience",
                "model.hash_layer": "released", "cluster.warmup_epoch": 0, "loss.b": 1.0,
                "loss.positives": "nearest", "train.lr_step": 10, "train.lr_gamma": 0.5},
}
# Keys of earlier versions that saved configs may still hold; loading a saved config skips them.
RETIRED_KEYS = frozenset({"sampler.gumbel_noise_scale", "sampler.gumbel_temperature"})
# Values a saved config that lacks the key was trained with (the key did not exist yet).
LEGACY_VALUES = {"model.hash_layer": "released", "cluster.warm_start": False}


def build_config(
    dataset: str | None = None,
    recipe: str | None = None,
    config_file: str | Path | None = None,
    overrides: typing.Sequence[str] = (),
    strict: bool = True,
) -> Config:
    """Preset, then recipe, then YAML file, then ``key=value`` overrides; validated.

    A key set in the file or the overrides that does nothing under the rest of the config is named in a
    warning, and refused (:class:`ConfigError`) for the switches beyond the paper when ``strict``; an ablation,
    whose ``--set`` applies to every row, passes ``strict=False``.

    ``dataset`` and ``recipe`` may also come from the YAML file or the overrides, which take precedence
    over the arguments.
    """
    updates: dict[str, Any] = {}
    if config_file is not None:
        updates.update(load_yaml(config_file))
    updates.update(parse_overrides(overrides))
    dataset = updates.pop("dataset", dataset) or "ucf101"
    recipe = updates.pop("recipe", recipe) or "paper"
    if dataset not in DATASETS:
        raise ConfigError(f"dataset: unknown dataset {dataset!r}; allowed: {', '.join(DATASETS)}")
    if recipe not in RECIPES:
        raise ConfigError(f"recipe: unknown recipe {recipe!r}; allowed: {', '.join(RECIPES)}")
    cfg = Config(dataset=dataset, recipe=recipe)
    for values in (PRESETS[dataset], RECIPE_DEFAULTS[recipe], updates):
        for key, value in values.items():
            set_value(cfg, key, value)
    cfg.validate()
    for key, reason, refused in inert_keys(cfg, updates):
        if refused and strict:
            raise ConfigError(f"{key} is set but does nothing: {reason}; remove it or set the switch it belongs to")
        log.warning("%s is set but does nothing: %s", key, reason)
    return cfg


def config_from_dict(data: dict) -> Config:
    """Rebuild a validated :class:`Config` from :meth:`Config.to_dict` output (retired keys are skipped)."""
    cfg = build_config(data["dataset"], data["recipe"])
    saved = {f"{section}.{key}": value for section, values in data.items() if isinstance(values, dict)
             for key, value in values.items()}
    for key, value in (LEGACY_VALUES | saved).items():
        if key not in RETIRED_KEYS:
            set_value(cfg, key, value)
    return cfg.validate()


SALIENCE_KEYS = tuple(f"salience.{f.name}" for f in dataclasses.fields(SalienceConfig))


def inert_keys(cfg: Config, keys: typing.Iterable[str]) -> list[tuple[str, str, bool]]:
    """Those of ``keys`` (dotted) that have no effect under ``cfg``, each with the reason and whether it is
    refused (keys of the switches beyond the paper) rather than only named."""
    s, lo = cfg.sampler, cfg.loss
    no_grade_net = ("sampler.grl", "sampler.reconstruction_weight", "sampler.lr_scale")
    refused_rules: list[tuple[bool, tuple[str, ...], str]] = [
        (lo.positives != "nearest", ("loss.support_size",), "only loss.positives=nearest keeps a support set"),
        (not lo.view_contrastive, ("loss.positives",), "loss.view_contrastive=false"),
        (s.kind != "predicted", ("sampler.target", "sampler.hard_share"), "only sampler.kind=predicted uses them"),
        (s.kind == "predicted", ("sampler.grl", "sampler.reconstruction_weight", "sampler.tau"),
         "sampler.kind=predicted ranks frames by a learned score, without gradient reversal or noise"),
        (cfg.model.pooling != "salience" and s.kind != "salience", SALIENCE_KEYS,
         "no frame salience without model.pooling=salience or sampler.kind=salience"),
        (s.kind in ("independent", "salience"), no_grade_net,
         f"sampler.kind={s.kind} draws the masks without Grade-Net"),
        (s.kind == "independent", ("sampler.tau",), "sampler.kind=independent draws uniformly"),
        (lo.p2set and lo.centers == "input", ("cluster.warm_start", "cluster.warm_tolerance",
                                              "cluster.kmeans_temperature", "cluster.num_shards"),
         "loss.centers=input clusters the pooled input once, in the training process"),
    ]
    rules: list[tuple[bool, tuple[str, ...], str]] = [
        (s.kind == "random", ("sampler.grl", "sampler.tau", "sampler.reconstruction_weight", "sampler.lr_scale"),
         "sampler.kind=random draws the masks without Grade-Net"),
        (not lo.reconstruction, ("sampler.reconstruction_weight",), "loss.reconstruction=false"),
        (not lo.view_contrastive, ("loss.a", "loss.temperature", "loss.tau_plus"), "loss.view_contrastive=false"),
        (not lo.p2set, ("loss.b", "loss.centers", "loss.p2set_temperature", "cluster.num_cluster",
                        "cluster.warmup_epoch", "cluster.kmeans_temperature", "cluster.niter", "cluster.nredo",
                        "cluster.max_points_per_centroid", "cluster.min_points_per_centroid",
                        "cluster.num_shards", "cluster.warm_start", "cluster.warm_tolerance", "cluster.num_cpus"),
         "loss.p2set=false (no clustering runs)"),
        (not cfg.cluster.warm_start, ("cluster.warm_tolerance",), "cluster.warm_start=false"),
        (lo.p2set and lo.centers == "voted", ("cluster.kmeans_temperature",),
         "loss.centers=voted uses loss.p2set_temperature, not the prototype densities"),
        (lo.p2set and lo.centers == "prototype", ("loss.p2set_temperature",),
         "loss.centers=prototype uses per-cluster densities of mean cluster.kmeans_temperature"),
    ]
    wanted = set(keys)
    found: dict[str, tuple[str, bool]] = {}
    for refused, group in ((True, refused_rules), (False, rules)):
        for applies, names, reason in group:
            if applies:
                for name in names:
                    if name in wanted:
                        found.setdefault(name, (reason, refused))
    return [(name, reason, refused) for name, (reason, refused) in sorted(found.items())]


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML file of nested sections and/or dotted keys into dotted keys."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ConfigError(f"config file {path}: cannot read ({err.strerror})") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path}: not valid YAML ({err})") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of keys to values, got {type(data).__name__}")
    return _flatten(data)


def parse_overrides(overrides: typing.Iterable[str]) -> dict[str, Any]:
    """``["train.lr=5e-4", "loss.p2set=false"]`` → dotted keys to values parsed as YAML scalars/lists."""
    parsed: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.lr=5e-4")
        try:
            parsed[key.strip()] = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"{key.strip()}: cannot parse value {text!r} ({err})") from err
    return parsed


def set_value(cfg: Config, key: str, value: Any) -> None:
    """Set a dotted key, checking that it exists and coercing the value to the declared type."""
    section_name, _, name = key.rpartition(".")
    target: Any = cfg
    if section_name:
        if section_name not in _sections():
            raise ConfigError(f"{key}: unknown section {section_name!r}; allowed: {', '.join(_sections())}")
        target = getattr(cfg, section_name)
    hints = typing.get_type_hints(type(target))
    allowed = [f.name for f in dataclasses.fields(target) if not _is_section(hints[f.name])]
    if name not in allowed:
        where = f"section {section_name!r}" if section_name else "the top level"
        raise ConfigError(f"{key}: unknown key in {where}; allowed: {', '.join(allowed)}")
    setattr(target, name, _coerce(key, value, hints[name]))


def _sections() -> list[str]:
    hints = typing.get_type_hints(Config)
    return [f.name for f in dataclasses.fields(Config) if _is_section(hints[f.name])]


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not allowed; allowed: {', '.join(map(str, choices))}")
        return value
    if origin is list:
        (item_type,) = typing.get_args(tp)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list of {item_type.__name__}, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item_type) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{key}: union types are not supported in the config")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "5e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _require(ok: bool, key: str, allowed: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: {value!r} is not allowed; {allowed}")


def _validate(cfg: Config) -> None:
    for section in _sections():
        for f in dataclasses.fields(getattr(cfg, section)):
            value = getattr(getattr(cfg, section), f.name)
            _require(not isinstance(value, float) or math.isfinite(value), f"{section}.{f.name}",
                     "must be a finite number", value)
    d, m, s, lo, c, t = cfg.data, cfg.model, cfg.sampler, cfg.loss, cfg.cluster, cfg.train
    _require(d.feature_size >= 1, "data.feature_size", "must be >= 1", d.feature_size)
    _require(d.max_frames >= 2, "data.max_frames", "must be >= 2", d.max_frames)
    _require(d.data_drop_rate == 0.0 or 0.01 < d.data_drop_rate < 1.0, "data.data_drop_rate",
             "must be 0 or in (0.01, 1): the released code applies input dropout only above 0.01", d.data_drop_rate)
    _require(m.nbits > 0 and m.nbits % 8 == 0, "model.nbits", "must be a positive multiple of 8", m.nbits)
    for key in ("hidden_size", "encoder_depth", "encoder_heads", "decoder_dim", "decoder_depth", "decoder_heads"):
        _require(getattr(m, key) >= 1, f"model.{key}", "must be >= 1", getattr(m, key))
    _require(m.encoder_heads <= m.hidden_size, "model.encoder_heads", "must be <= model.hidden_size",
             m.encoder_heads)
    _require(m.decoder_heads <= m.decoder_dim, "model.decoder_heads", "must be <= model.decoder_dim",
             m.decoder_heads)
    _require(m.mlp_ratio > 0, "model.mlp_ratio", "must be > 0", m.mlp_ratio)
    _require(0.0 < s.mask_prob < 1.0, "sampler.mask_prob", "must be strictly between 0 and 1", s.mask_prob)
    k = cfg.num_hidden
    _require(1 <= k < d.max_frames, "sampler.mask_prob",
             f"hides K = int(mask_prob * max_frames) = {k} frames; K must be >= 1 and smaller than "
             f"data.max_frames = {d.max_frames}", s.mask_prob)
    _require(s.tau > 0, "sampler.tau", "must be > 0", s.tau)
    sa = cfg.salience
    for key in ("within_neighbours", "cross_neighbours", "dim"):
        _require(getattr(sa, key) >= 1, f"salience.{key}", "must be >= 1", getattr(sa, key))
    _require(sa.bank_videos >= 2, "salience.bank_videos", "must be >= 2", sa.bank_videos)
    _require(sa.rarity_weight >= 0, "salience.rarity_weight", "must be >= 0", sa.rarity_weight)
    _require(sa.temperature > 0, "salience.temperature", "must be > 0", sa.temperature)
    _require(s.lr_scale > 0, "sampler.lr_scale", "must be > 0", s.lr_scale)
    _require(lo.support_size >= 1, "loss.support_size", "must be >= 1", lo.support_size)
    _require(0.0 <= s.hard_share <= 1.0, "sampler.hard_share", "must be in [0, 1]", s.hard_share)
    _require(s.kind != "predicted" or lo.reconstruction, "sampler.kind",
             "predicted ranks frames by their reconstruction error, so it needs loss.reconstruction=true", s.kind)
    _require(lo.reconstruction or lo.view_contrastive or lo.p2set, "loss",
             "at least one of reconstruction, view_contrastive, p2set must be on", "all off")
    _require(lo.a >= 0, "loss.a", "must be >= 0", lo.a)
    _require(lo.b >= 0, "loss.b", "must be >= 0", lo.b)
    _require(lo.temperature > 0, "loss.temperature", "must be > 0", lo.temperature)
    _require(0 <= lo.tau_plus < 1, "loss.tau_plus", "must be in [0, 1)", lo.tau_plus)
    _require(lo.p2set_temperature > 0, "loss.p2set_temperature", "must be > 0", lo.p2set_temperature)
    _require(len(c.num_cluster) >= 1 and all(n >= 2 for n in c.num_cluster), "cluster.num_cluster",
             "must be a non-empty list of integers >= 2", c.num_cluster)
    _require(c.warmup_epoch >= 0, "cluster.warmup_epoch", "must be >= 0", c.warmup_epoch)
    _require(c.kmeans_temperature > 0, "cluster.kmeans_temperature", "must be > 0", c.kmeans_temperature)
    _require(c.niter >= 1, "cluster.niter", "must be >= 1", c.niter)
    _require(c.nredo >= 1, "cluster.nredo", "must be >= 1", c.nredo)
    _require(c.max_points_per_centroid >= 1, "cluster.max_points_per_centroid", "must be >= 1",
             c.max_points_per_centroid)
    _require(c.min_points_per_centroid >= 1, "cluster.min_points_per_centroid", "must be >= 1",
             c.min_points_per_centroid)
    _require(c.num_shards >= 1, "cluster.num_shards", "must be >= 1", c.num_shards)
    _require(0 <= c.warm_tolerance < 1, "cluster.warm_tolerance", "must be in [0, 1)", c.warm_tolerance)
    _require(c.num_cpus >= 0, "cluster.num_cpus", "must be >= 0", c.num_cpus)
    _require(t.batch_size >= 2, "train.batch_size", "must be >= 2 (the contrastive loss needs negatives)",
             t.batch_size)
    _require(t.num_epochs >= 1, "train.num_epochs", "must be >= 1", t.num_epochs)
    _require(t.lr > 0, "train.lr", "must be > 0", t.lr)
    _require(t.weight_decay >= 0, "train.weight_decay", "must be >= 0", t.weight_decay)
    _require(t.lr_step >= 1, "train.lr_step", "must be >= 1", t.lr_step)
    _require(0 < t.lr_gamma <= 1, "train.lr_gamma", "must be in (0, 1]", t.lr_gamma)
    _require(0 <= t.min_lr <= t.lr, "train.min_lr", "must be in [0, train.lr]", t.min_lr)
    _require(t.eval_every >= 1, "train.eval_every", "must be >= 1", t.eval_every)
    _require(t.test_batch_size >= 1, "train.test_batch_size", "must be >= 1", t.test_batch_size)
    _require(t.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", "must be >= 1", t.max_nonfinite_steps)
    _require(t.max_loss > 0, "train.max_loss", "must be > 0", t.max_loss)
    _require(t.max_weight_norm > 0, "train.max_weight_norm", "must be > 0", t.max_weight_norm)
    _validate_ranges(cfg)


# Sane ranges (inclusive) of learning rates and other scales, documented in the module docstring.
SANE_RANGES: dict[str, tuple[float, float]] = {
    "train.lr": (1e-8, 0.1),
    "train.weight_decay": (0.0, 1.0),
    "sampler.lr_scale": (1e-3, 1e3),
    "sampler.tau": (0.01, 1000.0),
    "loss.a": (0.0, 100.0),
    "loss.b": (0.0, 100.0),
    "loss.temperature": (0.01, 10.0),
    "loss.p2set_temperature": (0.01, 10.0),
    "cluster.kmeans_temperature": (0.01, 10.0),
    "salience.temperature": (0.01, 10.0),
}


def _validate_ranges(cfg: Config) -> None:
    """Refuse a scale outside :data:`SANE_RANGES`, and a sampler learning rate (lr * lr_scale) outside lr's."""
    flat = cfg.flat()
    for key, (low, high) in SANE_RANGES.items():
        _require(low <= flat[key] <= high, key, f"must be in [{low:g}, {high:g}] (autossvh.config.SANE_RANGES)",
                 flat[key])
    low, high = SANE_RANGES["train.lr"]
    sampler_lr = cfg.train.lr * cfg.sampler.lr_scale
    _require(low <= sampler_lr <= high, "sampler.lr_scale", f"gives Grade-Net a learning rate train.lr * "
             f"sampler.lr_scale = {sampler_lr:g}; it must be in [{low:g}, {high:g}] like train.lr",
             cfg.sampler.lr_scale)
