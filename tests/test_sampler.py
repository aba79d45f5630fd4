"""The adversarial sampler chooses: on videos where a few designated frames are hard to reconstruct it learns to
hide them (gradient reversal) or to keep them visible (no reversal), while the random sampler hides K/T of every
frame; and its diagnostics say so."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from autossvh.diagnostics import sampler_diagnostics
from autossvh.engine import build_optimizer, train_one_epoch
from autossvh.model import AutoSSVH
from tests.conftest import tiny_config

HARD = [1, 5]  # of T = 8 frames; K = 4 hidden per view


def videos(n: int = 256, seed: int = 0) -> torch.Tensor:
    """One constant frame per video (easy to reconstruct from any visible frame) except at HARD, which hold
    fresh noise of three times the scale (impossible to reconstruct)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 16, generator=g).expand(n, 8, 16).clone()
    x[:, HARD] = 3 * torch.randn(n, len(HARD), 16, generator=g)
    return x


def trained(*overrides: str, epochs: int = 20) -> AutoSSVH:
    torch.manual_seed(0)
    cfg = tiny_config("train.lr=1e-3", "sampler.tau=0.5", *overrides)
    model = AutoSSVH(cfg)
    optimizer = build_optimizer(model, cfg)
    x = videos()
    for _ in range(epochs):
        batches = [(x[i], i) for i in torch.randperm(len(x)).split(32)]
        train_one_epoch(model, batches, optimizer, cfg, torch.device("cpu"))
    return model


def p_hidden(model: AutoSSVH, x: torch.Tensor, draws: int = 20) -> torch.Tensor:
    with torch.no_grad():
        embedded = model.encoder.embed(x) + model.encoder.pos
        scores = model.salience_scores(x)
        return torch.stack([model.sample_views(embedded, scores)[0] for _ in range(draws)]).float().mean(dim=(0, 1))


@pytest.fixture(scope="module")
def signal() -> np.ndarray:
    designated = np.zeros((256, 8), dtype=np.float32)
    designated[:, HARD] = 1.0
    return designated


def test_with_gradient_reversal_the_sampler_hides_the_hard_frames(signal):
    model = trained()
    x = videos(seed=1)
    assert p_hidden(model, x)[HARD].min() >= 0.8
    diagnostics = sampler_diagnostics(model, x, signal)
    assert diagnostics.selectivity > 0.5 and diagnostics.signal_correlation > 0.3
    assert diagnostics.hidden_by_decile[-1] > diagnostics.hidden_by_decile[0]


def test_without_gradient_reversal_it_keeps_them_visible(signal):
    model = trained("sampler.grl=false")
    x = videos(seed=1)
    assert p_hidden(model, x)[HARD].max() <= 0.2
    assert sampler_diagnostics(model, x, signal).signal_correlation < -0.3


def test_the_random_sampler_hides_k_of_t_of_every_frame(signal):
    model = trained("sampler.kind=random", epochs=1)
    x = videos(seed=1)
    assert torch.allclose(p_hidden(model, x, draws=50), torch.full((8,), 4 / 8), atol=0.03)
    diagnostics = sampler_diagnostics(model, x, signal)
    assert math.isnan(diagnostics.selectivity) and abs(diagnostics.signal_correlation) < 0.05
    assert diagnostics.view_overlap == 0.0  # complementary masks: 4 of 8 hidden, disjoint
    assert "sampler/selectivity" not in diagnostics.metrics()


def test_diagnostics_leave_the_training_random_stream_alone():
    model = AutoSSVH(tiny_config())
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    sampler_diagnostics(model, videos(16))
    assert torch.equal(torch.rand(3), expected)
