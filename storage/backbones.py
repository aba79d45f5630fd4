"""Frame feature extractors from torchvision, their preprocessing and where their weights come from (no Ray).

=============  ======  ==========================================================  ==============================
name           F       output                                                      torchvision weights (default)
=============  ======  ==========================================================  ==============================
vgg16-fc7      4,096   fc7 after its ReLU (``classifier[:5]``), the paper's         ``VGG16_Weights.IMAGENET1K_V1``
                       features (SSVH's VGG-16 fc7); the default
resnet50       2,048   global average pool before ``fc``                           ``ResNet50_Weights.IMAGENET1K_V1``
vit_b_16       768     the CLS token after the encoder's final LayerNorm           ``ViT_B_16_Weights.IMAGENET1K_V1``
=============  ======  ==========================================================  ==============================

Preprocessing is each weight's own (``weights.transforms()``): shorter side 256, centre crop 224, RGB scaled to
[0, 1] and normalised with the ImageNet mean and std. The resize and crop happen while decoding
(:mod:`storage.video`, libswscale bilinear; torchvision resizes with antialiased bilinear, so features are close to
but not bitwise those of a PIL pipeline); normalisation happens here, in :class:`FrameEncoder`.

Weights, in this order:

* ``weights`` (``--weights PATH``): a state dict of the torchvision model (any fsspec URL), read with
  ``torch.load(weights_only=True)`` and loaded strictly.
* ``random_seed`` (``--random-weights``): torchvision's random initialisation under that seed, for tests and
  benchmarks only: the features carry no meaning and the store says so (``weights: random``). Only then may
  ``image_size`` differ from the weights' 224 (small frames for fast tests).
* otherwise torchvision's file, downloaded once into torch hub's cache (``$TORCH_HOME/hub/checkpoints``) where the
  network allows; where it does not, :func:`resolve_weights` raises an error naming the file to put there (or to
  pass with ``--weights``).

PyPI's torchvision wheel is built against CUDA torch; beside a CPU build of torch its C++ operators (detection
ops such as ``nms``) cannot load, and importing torchvision then fails while registering them. The backbones here
use none of those operators, so :func:`torchvision_module` declares the two operator schemas torchvision's import
needs (only when its extension failed to load); the operators themselves stay unavailable and raise
torchvision's own error if anything calls them.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import fsspec
import numpy as np
import torch
from torch import nn

from storage.store import not_a_regular_file

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MISSING_OPERATORS = ("nms", "qnms")  # registered by torchvision's import, defined by its C++ extension
_schemas: list[torch.library.Library] = []  # kept alive: a Library's definitions go away with it


class BackboneError(ValueError):
    """An unknown backbone, unusable options, or weights that cannot be found or loaded; the message names it."""


@dataclass(frozen=True)
class BackboneSpec:
    """One feature extractor: the torchvision builder and weights, the output and its preprocessing."""

    name: str
    builder: str
    weights: str
    feature_dim: int
    output: str
    resize: int = 256
    crop: int = 224


BACKBONES: dict[str, BackboneSpec] = {
    "vgg16-fc7": BackboneSpec("vgg16-fc7", "vgg16", "VGG16_Weights.IMAGENET1K_V1", 4096,
                              "fc7 after ReLU (classifier[:5])"),
    "resnet50": BackboneSpec("resnet50", "resnet50", "ResNet50_Weights.IMAGENET1K_V1", 2048,
                             "global average pool (fc removed)"),
    "vit_b_16": BackboneSpec("vit_b_16", "vit_b_16", "ViT_B_16_Weights.IMAGENET1K_V1", 768,
                             "CLS token after the final LayerNorm (heads removed)"),
}
DEFAULT_BACKBONE = "vgg16-fc7"


@dataclass(frozen=True)
class ExtractorSettings:
    """Everything that determines a frame's features; stored in the store's attributes (``extraction``), so a new
    video can be encoded exactly like the stored ones.

    ``weights``: a state-dict path or URL, ``None`` for torchvision's file (or for random weights);
    ``random_seed``: random initialisation under this seed (tests and benchmarks only);
    ``image_size``: the crop (the resize keeps the backbone's ratio 256/224), only with random weights.
    """

    backbone: str = DEFAULT_BACKBONE
    frames: int = 25
    weights: str | None = None
    random_seed: int | None = None
    image_size: int | None = None

    @property
    def spec(self) -> BackboneSpec:
        if self.backbone not in BACKBONES:
            raise BackboneError(f"unknown backbone {self.backbone!r}; choose one of {', '.join(BACKBONES)}")
        return BACKBONES[self.backbone]

    @property
    def crop(self) -> int:
        return self.image_size or self.spec.crop

    @property
    def resize(self) -> int:
        return round(self.crop * self.spec.resize / self.spec.crop)

    def check(self) -> None:
        """Refuse combinations that would give features unlike the named backbone's."""
        spec = self.spec
        if self.frames < 1:
            raise BackboneError(f"--frames must be >= 1, got {self.frames}")
        if self.random_seed is not None and self.weights is not None:
            raise BackboneError("--random-weights and --weights exclude each other")
        if self.image_size is not None:
            if self.random_seed is None:
                raise BackboneError(f"--image-size {self.image_size}: the pretrained {spec.name} weights take "
                                    f"{spec.crop} x {spec.crop} frames; another size is for --random-weights only")
            if self.image_size < 16 or (spec.builder.startswith("vit") and self.image_size % 16):
                raise BackboneError(f"--image-size {self.image_size}: at least 16 (and a multiple of 16 for "
                                    f"{spec.name})")

    def describe(self) -> dict[str, Any]:
        """The store attribute ``extraction``: these settings and what they mean."""
        spec = self.spec
        if self.random_seed is not None:
            weights = f"random (torchvision initialisation, seed {self.random_seed}; for tests and benchmarks only)"
        elif self.weights is not None:
            weights = f"state dict {self.weights}"
        else:
            weights = f"torchvision {spec.weights}"
        return {"backbone": spec.name, "torchvision_model": spec.builder, "output": spec.output,
                "feature_dim": spec.feature_dim, "weights": weights, "frames": self.frames,
                "preprocessing": f"shorter side {self.resize} (libswscale bilinear), centre crop {self.crop}, RGB "
                                 f"/ 255, mean {list(IMAGENET_MEAN)}, std {list(IMAGENET_STD)}",
                "settings": {"backbone": self.backbone, "frames": self.frames, "weights": self.weights,
                             "random_seed": self.random_seed, "image_size": self.image_size}}

    @classmethod
    def from_description(cls, described: dict[str, Any]) -> ExtractorSettings:
        return cls(**described["settings"])


def torchvision_module() -> ModuleType:
    """``torchvision``, imported also beside a CPU torch whose build its C++ extension does not match (module
    docstring): the operator schemas its import registers against are declared when the extension failed. Where
    it cannot be imported even so, a :class:`BackboneError` says so in one line."""
    try:
        import torchvision
    except RuntimeError as err:
        if "torchvision::" not in str(err):
            raise _torchvision_error(err) from None
        library = torch.library.Library("torchvision", "FRAGMENT")
        for name in _MISSING_OPERATORS:
            library.define(f"{name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _schemas.append(library)
        try:
            import torchvision
        except (ImportError, RuntimeError, OSError) as again:
            raise _torchvision_error(again) from None
    except (ImportError, OSError) as err:
        raise _torchvision_error(err) from None
    return torchvision


def _torchvision_error(err: BaseException) -> BackboneError:
    """One line: which torchvision failed to import beside which torch, why, and where the README says what to do."""
    import importlib.metadata

    try:
        installed = f"torchvision {importlib.metadata.version('torchvision')}"
    except importlib.metadata.PackageNotFoundError:
        installed = "torchvision (not installed)"
    reason = (str(err).strip().splitlines() or [""])[-1][:200]
    return BackboneError(f"{installed} cannot be imported beside torch {torch.__version__} ({type(err).__name__}: "
                         f"{reason}); README.md, \"torchvision in the project's environment\", says how to get "
                         "one that works")


def weights_enum(spec: BackboneSpec) -> Any:
    enum_name, member = spec.weights.split(".")
    return getattr(getattr(torchvision_module().models, enum_name), member)


def cached_weights_file(spec: BackboneSpec) -> Path:
    """Where torchvision keeps the downloaded weights of ``spec`` (torch hub's checkpoint folder)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights_enum(spec).url)


def resolve_weights(settings: ExtractorSettings) -> None:
    """Make sure the weights of ``settings`` can be loaded, before any work starts: torchvision imports; a given
    file exists; the torchvision file is in the cache or is downloaded now; otherwise a :class:`BackboneError`
    names the file."""
    settings.check()
    torchvision_module()
    if settings.random_seed is not None:
        return
    if settings.weights is not None:
        problem = not_a_regular_file(settings.weights)
        if problem:
            raise BackboneError(f"--weights {settings.weights}: {problem}")
        return
    spec = settings.spec
    target = cached_weights_file(spec)
    if target.is_file():
        return
    url = weights_enum(spec).url
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(target), progress=False)
    except (OSError, RuntimeError) as err:  # URLError is an OSError; a hash mismatch a RuntimeError
        raise BackboneError(
            f"the {spec.name} weights ({spec.weights}) are not in the cache and cannot be downloaded from {url} "
            f"({type(err).__name__}: {err}); download that file elsewhere and put it at {target}, or pass it with "
            "--weights FILE") from None


def build_backbone(settings: ExtractorSettings) -> nn.Module:
    """The torchvision model of ``settings`` cut at its feature output, with its weights loaded, in eval mode."""
    settings.check()
    spec = settings.spec
    models = torchvision_module().models
    kwargs = {"image_size": settings.crop} if spec.builder.startswith("vit") else {}
    if settings.random_seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.random_seed)
            model = getattr(models, spec.builder)(weights=None, **kwargs)
    else:
        model = getattr(models, spec.builder)(weights=None, **kwargs)
        model.load_state_dict(_load_state_dict(settings))
    if spec.builder == "vgg16":
        model.classifier = model.classifier[:5]
    elif spec.builder == "resnet50":
        model.fc = nn.Identity()
    else:
        model.heads = nn.Identity()
    return model.eval()


def _load_state_dict(settings: ExtractorSettings) -> dict[str, torch.Tensor]:
    source = settings.weights or str(cached_weights_file(settings.spec))
    try:
        with fsspec.open(source, "rb") as f:
            state = torch.load(f, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise BackboneError(f"{source}: the {settings.spec.name} weights file is missing") from None
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError) as err:  # weights_only refuses pickled code
        raise BackboneError(f"{source}: cannot load it as a state dict ({type(err).__name__}: {err})"[:400]) from None
    if not isinstance(state, dict):
        raise BackboneError(f"{source}: holds a {type(state).__name__}, not a state dict")
    return state


class FrameEncoder(nn.Module):
    """uint8 RGB frames (N, H, W, 3) → features (N, F) float32: scaling, ImageNet normalisation and the backbone."""

    def __init__(self, settings: ExtractorSettings) -> None:
        super().__init__()
        self.backbone = build_backbone(settings)
        self.feature_dim = settings.spec.feature_dim
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255)

    @torch.no_grad()
    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = frames.permute(0, 3, 1, 2).float()
        return self.backbone((x - self.mean) / self.std).float()


def encode_frames(encoder: FrameEncoder, frames: np.ndarray, device: torch.device, batch_frames: int
                  ) -> np.ndarray:
    """Features (N, F) float32 of uint8 frames (N, H, W, 3), ``batch_frames`` at a time on ``device``."""
    out = []
    for start in range(0, len(frames), batch_frames):
        chunk = torch.from_numpy(np.ascontiguousarray(frames[start:start + batch_frames])).to(device)
        out.append(encoder(chunk).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, encoder.feature_dim), np.float32)
