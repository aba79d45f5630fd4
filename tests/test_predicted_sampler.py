"""The learned loss-predictor sampler (``sampler.kind=predicted``, HPM with a RHO-LOSS-style target): its masks,
its curriculum, its ranking loss, and what its two targets say about the frames that carry the class."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from autossvh.config import ConfigError, build_config
from autossvh.losses import autossvh_loss, frame_errors, ranking_loss
from autossvh.model import AutoSSVH, nearest_copy_errors, predicted_masks
from autossvh.trainer import RetrievalData, fit
from storage.synthetic import ROLE_BACKGROUND, ROLE_CLASS, make_synthetic
from tests.conftest import tiny_config
from tests.test_salience import SHAPE, F, T, ranking_auc

PREDICTED = ["sampler.kind=predicted"]


def test_both_views_hide_the_predicted_hardest_frames_and_draw_the_rest_independently():
    torch.manual_seed(0)
    scores = torch.randn(64, 12)
    hidden = predicted_masks(scores, k=6, num_hard=2)
    assert hidden.shape == (128, 12) and bool((hidden.sum(1) == 6).all())
    top = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.topk(2, dim=1).indices, True)
    views = hidden.view(2, 64, 12)
    assert bool((views[0] & top).sum(1).eq(2).all()) and bool((views[1] & top).sum(1).eq(2).all())
    rest = views & ~top  # 4 of the other 10 frames, drawn per view: the views share 4 * 4 / 10 of them on average
    shared = float((rest[0] & rest[1]).sum(1).float().mean())
    assert 1.0 < shared < 2.2, shared
    assert bool((predicted_masks(scores, 6, 0).view(2, 64, 12).sum(0) == 2).any())  # no hard frames: random


def test_the_curriculum_raises_the_share_of_predicted_frames_from_zero_to_hard_share():
    model = AutoSSVH(tiny_config(*PREDICTED, "sampler.hard_share=0.4", "train.num_epochs=11"))
    shares = []
    for epoch in (0, 5, 10, 20):
        model.start_epoch(epoch)
        shares.append(model.hard_share)
    assert shares == pytest.approx([0.0, 0.2, 0.4, 0.4])


def test_the_ranking_loss_learns_the_order_of_its_targets_and_only_trains_grade_net():
    target = torch.randn(32, 6)
    scores = torch.zeros(32, 6, requires_grad=True)
    optimizer = torch.optim.Adam([scores], lr=0.1)
    for _ in range(200):
        optimizer.zero_grad()
        ranking_loss(scores, target).backward()
        optimizer.step()
    assert bool((scores.argsort(1) == target.argsort(1)).all())
    assert float(ranking_loss(target, torch.zeros_like(target))) == 0.0  # ties carry no pair

    cfg = tiny_config(*PREDICTED)
    model = AutoSSVH(cfg)
    model.start_epoch(cfg.train.num_epochs)
    _, parts = autossvh_loss(model(torch.randn(8, 8, 16)), torch.arange(8), cfg, None)
    parts["rank"].backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all(name.startswith("encoder.grade_net.") for name in grads), sorted(grads)


def test_the_reference_error_is_the_best_copy_of_a_visible_frame():
    visible = torch.tensor([[[0.0, 0.0], [2.0, 0.0]]])
    target = torch.tensor([[[1.5, 0.0], [0.0, 1.0]]])
    assert nearest_copy_errors(target, visible)[0].tolist() == pytest.approx([0.125, 0.5])


@pytest.fixture(scope="module")
def scarce_with_roles() -> tuple[RetrievalData, np.ndarray]:
    train, query = (make_synthetic("ucf101", 200, feature_dim=F, max_frames=T, num_classes=8, seed=1,
                                   informative_share=0.25, distractor_share=0.35).splits[s] for s in ("train", "query"))
    data = RetrievalData(train.feats, query.feats, query.labels, train.feats, train.labels, train.frame_signal)
    return data, train.frame_role


def test_the_reducible_target_ranks_class_frames_above_distractors_and_the_reconstruction_loss_does_not(
        scarce_with_roles):
    """RHO-LOSS's point on frames: a distractor is as hard to reconstruct as a class frame, but nothing in its
    video resembles it, so its loss is irreducible; the class frames, which recur, carry the reducible loss."""
    data, roles = scarce_with_roles
    model = fit(tiny_config(*SHAPE, *PREDICTED, "train.num_epochs=3", "cluster.warmup_epoch=1"), data).model
    model.eval()
    with torch.no_grad():
        out = model(torch.from_numpy(data.train))
    k = model.cfg.num_hidden
    hidden_idx = out.hidden.to(torch.uint8).argsort(dim=1, stable=True)[:, T - k:]
    role = roles[np.arange(2 * len(roles))[:, None] % len(roles), hidden_idx.numpy()]
    loss = frame_errors(out.recon, out.target).numpy()
    reducible = loss - out.reference_error.numpy()
    pairs = role != ROLE_BACKGROUND
    by_loss = ranking_auc(loss[pairs], role[pairs] == ROLE_CLASS)
    by_reducible = ranking_auc(reducible[pairs], role[pairs] == ROLE_CLASS)
    assert by_reducible > 0.65 and by_loss < 0.6, (by_reducible, by_loss)


@pytest.mark.parametrize(("overrides", "key"), [
    (["sampler.target=loss"], "sampler.target"),
    (["sampler.kind=independent", "sampler.hard_share=0.3"], "sampler.hard_share"),
    ([*PREDICTED, "sampler.tau=1"], "sampler.tau"),
    ([*PREDICTED, "sampler.grl=false"], "sampler.grl"),
])
def test_the_predicted_sampler_refuses_keys_that_do_nothing_under_it(overrides, key):
    with pytest.raises(ConfigError, match=f"{key} is set but does nothing"):
        build_config("ucf101", overrides=overrides)


def test_the_predicted_sampler_needs_the_reconstruction_loss_and_a_share_in_range():
    with pytest.raises(ConfigError, match="loss.reconstruction=true"):
        build_config("ucf101", overrides=[*PREDICTED, "loss.reconstruction=false"])
    with pytest.raises(ConfigError, match="sampler.hard_share"):
        build_config("ucf101", overrides=[*PREDICTED, "sampler.hard_share=1.5"])
