"""Nearest-neighbour positives (``loss.positives=nearest``, NNCLR): the support set, the loss, the switch's keys."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from autossvh.config import ConfigError, build_config
from autossvh.losses import autossvh_loss, debiased_contrastive_loss
from autossvh.model import AutoSSVH, NeighbourSupport
from autossvh.trainer import RetrievalData, fit
from storage.synthetic import make_synthetic
from tests.conftest import tiny_config

NEAREST = ["loss.positives=nearest"]


def test_the_support_returns_the_nearest_code_of_another_video_and_forgets_the_oldest():
    support = NeighbourSupport(size=3, nbits=2)
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert torch.equal(support.nearest(z, torch.tensor([0, 1])), z)  # empty: the code itself
    support.push(torch.tensor([[2.0, 0.1], [0.0, 3.0], [-1.0, 0.0]]), torch.tensor([7, 8, 9]))
    near = support.nearest(z, torch.tensor([0, 8]))
    assert torch.allclose(near[0], F.normalize(torch.tensor([2.0, 0.1]), dim=0))  # video 7: the closest
    assert torch.allclose(near[1], F.normalize(torch.tensor([2.0, 0.1]), dim=0))  # its own video 8 is skipped
    support.push(torch.tensor([[0.0, -1.0]]), torch.tensor([10]))
    assert support.videos.tolist() == [10, 8, 9] and support.next == 1


def test_the_view_contrastive_loss_takes_the_neighbours_as_positives_and_fills_the_support():
    cfg = tiny_config(*NEAREST, "loss.support_size=16", "loss.p2set=false", "loss.reconstruction=false")
    model = AutoSSVH(cfg)
    first = model(torch.randn(8, 8, 16))
    _, parts = autossvh_loss(first, torch.arange(8), cfg, None, None, model.support)
    z1, z2 = first.codes.detach().chunk(2)
    assert float(parts["vc"].detach()) == pytest.approx(float(debiased_contrastive_loss(z1, z2, 0.5, 0.1)))  # empty
    assert sorted(model.support.videos.tolist()) == [-1] * 8 + list(range(8))
    second = model(torch.randn(8, 8, 16))
    _, parts = autossvh_loss(second, torch.arange(8, 16), cfg, None, None, model.support)
    z1, z2 = second.codes.detach().chunk(2)
    assert float(parts["vc"].detach()) != pytest.approx(float(debiased_contrastive_loss(z1, z2, 0.5, 0.1)))
    parts["vc"].backward()
    assert model.hash.weight.grad is not None and model.hash.weight.grad.abs().sum() > 0
    assert "support.codes" not in model.state_dict()  # rebuilt after a resume, not saved


def test_training_with_nearest_positives_runs_and_fills_the_support():
    splits = make_synthetic("ucf101", 120, feature_dim=16, max_frames=8, num_classes=4, seed=2).splits
    train, query = splits["train"], splits["query"]
    data = RetrievalData(train.feats, query.feats, query.labels, train.feats, train.labels)
    result = fit(tiny_config(*NEAREST, "loss.support_size=64", "train.num_epochs=2", "cluster.warmup_epoch=1"), data)
    assert int((result.model.support.videos >= 0).sum()) == 64
    assert result.history[-1].retrieval is not None


@pytest.mark.parametrize(("overrides", "key"), [
    (["loss.support_size=128"], "loss.support_size"),
    ([*NEAREST, "loss.view_contrastive=false"], "loss.positives"),
])
def test_the_switch_refuses_keys_that_do_nothing_under_it(overrides, key):
    with pytest.raises(ConfigError, match=f"{key} is set but does nothing"):
        build_config("ucf101", overrides=overrides)
