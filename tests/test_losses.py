"""Losses against direct computations, and the clustering densities."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from autossvh.clustering import cluster_codes, cluster_density
from autossvh.config import build_config
from autossvh.losses import (
    ClusterTargets,
    autossvh_loss,
    debiased_contrastive_loss,
    prototype_loss,
    reconstruction_loss,
    voted_p2set_loss,
)
from autossvh.model import TrainOutput
from tests.conftest import random_clustering


def test_debiased_contrastive_loss_matches_direct_computation_on_3_samples():
    torch.manual_seed(1)
    z1, z2 = torch.randn(3, 16), torch.randn(3, 16)
    tau, tau_plus = 0.5, 0.1
    views = [F.normalize(v, dim=0) for v in [*z1, *z2]]
    n = 4  # 2B - 2
    total = 0.0
    for r in range(6):
        partner = (r + 3) % 6
        pos = math.exp(float(views[r] @ views[partner]) / tau)
        neg = sum(math.exp(float(views[r] @ views[k]) / tau) for k in range(6) if k not in (r, partner))
        ng = max((-tau_plus * n * pos + neg) / (1 - tau_plus), n * math.exp(-1 / tau))
        total += -math.log(pos / (pos + ng))
    expected = total / 6
    assert debiased_contrastive_loss(z1, z2, tau, tau_plus).item() == pytest.approx(expected, rel=1e-5)


def test_debiased_contrastive_loss_needs_two_videos():
    with pytest.raises(ValueError, match="at least 2 videos"):
        debiased_contrastive_loss(torch.randn(1, 8), torch.randn(1, 8), 0.5, 0.1)


def test_reconstruction_loss_is_sum_of_per_view_mse():
    recon, target = torch.randn(6, 4, 10), torch.randn(6, 4, 10)
    expected = F.mse_loss(recon[:3], target[:3]) + F.mse_loss(recon[3:], target[3:])
    assert torch.allclose(reconstruction_loss(recon, target, None), expected)
    assert torch.allclose(reconstruction_loss(recon, target, torch.ones(6, 4)), expected)


def test_prototype_loss_matches_direct_computation():
    torch.manual_seed(2)
    result = random_clustering(20, 8, [6])
    targets = ClusterTargets.from_result(result, "cpu")
    codes, index = torch.randn(4, 8), torch.tensor([3, 7, 11, 19])
    torch.manual_seed(5)
    loss = prototype_loss(codes, index, targets)
    # Direct: same negative draw, then an explicit softmax cross-entropy row by row.
    pos = targets.im2cluster[0][index]
    candidates = torch.tensor([c for c in range(int(targets.im2cluster[0].max()) + 1) if c not in set(pos.tolist())])
    torch.manual_seed(5)
    neg = candidates[torch.randperm(len(candidates))[: min(4, len(candidates))]]
    cols = torch.cat([pos, neg])
    z = F.normalize(codes, dim=1)
    total = 0.0
    for i in range(4):
        logits = [float(z[i] @ targets.centroids[0][c]) / float(targets.density[0][c]) for c in cols]
        total += -logits[i] + math.log(sum(math.exp(v) for v in logits))
    assert loss.item() == pytest.approx(total / 4, rel=1e-5)


def test_voted_p2set_loss_prefers_the_own_centre():
    centers = torch.tensor([[1.0] * 8, [-1.0] * 8, [1.0, -1.0] * 4])
    own = torch.tensor([0, 1, 2])
    targets = ClusterTargets([own], [centers], [centers], [torch.ones(3)], [own])
    index = torch.arange(3)
    at_centre = voted_p2set_loss(centers.clone(), index, targets, 0.2)
    away = voted_p2set_loss(centers[[1, 2, 0]].clone(), index, targets, 0.2)
    assert at_centre < 0.01 < away
    z = centers[0:1] * torch.tensor([1.0] * 7 + [-1.0])
    logits = F.normalize(z, dim=1) @ (centers / math.sqrt(8)).T / 0.2
    expected = F.cross_entropy(logits, torch.tensor([0]))
    one = ClusterTargets([torch.tensor([0])], [centers], [centers], [torch.ones(3)], [torch.tensor([0])])
    assert torch.allclose(voted_p2set_loss(z, torch.tensor([0]), one, 0.2), expected)


def test_total_loss_weights_and_switches():
    cfg = build_config("ucf101", overrides=["loss.a=0.5", "loss.b=2.0"])
    out = TrainOutput(codes=torch.randn(8, 16), recon=torch.randn(8, 3, 5), target=torch.randn(8, 3, 5),
                      frame_weight=None, hidden=torch.zeros(8, 6, dtype=torch.bool))
    targets = ClusterTargets.from_result(random_clustering(10, 16, [3, 4]), "cpu")
    index = torch.arange(4)
    total, parts = autossvh_loss(out, index, cfg, targets)
    assert torch.allclose(total, parts["rec"] + 0.5 * parts["vc"] + 2.0 * parts["p2set"])
    _, before_warmup = autossvh_loss(out, index, cfg, None)
    assert before_warmup["p2set"] == 0
    off = build_config("ucf101", overrides=["loss.reconstruction=false", "loss.view_contrastive=false"])
    _, parts = autossvh_loss(out, index, off, targets)
    assert parts["rec"] == 0 and parts["vc"] == 0 and parts["p2set"] > 0


def test_density_never_zero_even_when_every_cluster_collapses():
    assign = np.repeat(np.arange(10), 5)
    phi = cluster_density(np.zeros(50), assign, 10, 0.2)
    assert np.all(phi > 0) and np.all(np.isfinite(phi))
    assert phi.mean() == pytest.approx(0.2)
    # Mostly zero-spread clusters, a few spread ones, empty and singleton clusters.
    assign = np.concatenate([np.repeat(np.arange(8), 4), [8, 8, 9]])
    sq = np.zeros(len(assign))
    sq[-3:] = [0.5, 0.7, 0.0]
    phi = cluster_density(sq, assign, 12, 0.2)
    assert np.all(phi > 0) and phi.mean() == pytest.approx(0.2, rel=1e-5)


def test_density_follows_the_released_recipe():
    rng = np.random.default_rng(0)
    assign = rng.integers(0, 20, size=400)
    sq = rng.uniform(0.01, 1.0, size=400)
    phi = cluster_density(sq, assign, 20, 0.2)
    counts = np.bincount(assign, minlength=20)
    raw = np.array([np.sqrt(sq[assign == c]).mean() / np.log(counts[c] + 10) for c in range(20)])
    raw = np.clip(raw, np.percentile(raw, 10), np.percentile(raw, 90))
    np.testing.assert_allclose(phi, 0.2 * raw / raw.mean(), rtol=1e-5)


def test_cluster_codes_shapes_votes_and_errors():
    rng = np.random.default_rng(0)
    codes = np.where(rng.random((120, 16)) < 0.5, -1, 1).astype(np.int8)
    features = codes / np.sqrt(16)
    cfg = build_config("ucf101", overrides=["cluster.num_cluster=[4, 6]"]).cluster
    result = cluster_codes(features.astype(np.float32), codes, cfg)
    assert [c.shape[1] for c in result.centers] == [16, 16]
    assert result.num_distinct == [len(c) for c in result.centers] and all(n >= 2 for n in result.num_distinct)
    assert [a.shape for a in result.im2cluster] == [(120,), (120,)] == [a.shape for a in result.im2center]
    for assign, centers, im2center in zip(result.im2cluster, result.centers, result.im2center, strict=True):
        members = codes[assign == 0].sum(0)
        np.testing.assert_array_equal(centers[im2center[assign == 0][0]], np.where(members >= 0, 1, -1))
    assert all(np.allclose(np.linalg.norm(c, axis=1), 1) for c in result.centroids)
    assert all(np.isfinite(o) for o in result.objective)
    too_many = build_config("ucf101", overrides=["cluster.num_cluster=[200]"]).cluster
    with pytest.raises(ValueError, match="200 clusters requested but only 120 training videos"):
        cluster_codes(features.astype(np.float32), codes, too_many)


def test_gpu_requests_fall_back_to_cpu_faiss():
    from autossvh.clustering import faiss_has_gpu, kmeans

    if faiss_has_gpu():
        pytest.skip("faiss-gpu with a visible GPU: the fallback is not exercised here")
    x = np.random.default_rng(0).normal(size=(200, 8)).astype(np.float32)
    cfg = build_config("ucf101").cluster
    on_cpu = kmeans(x, 5, 0, cfg, use_gpu=False)
    asked_gpu = kmeans(x, 5, 0, cfg, use_gpu=True)
    np.testing.assert_array_equal(on_cpu.assign, asked_gpu.assign)
    np.testing.assert_allclose(on_cpu.centroids, asked_gpu.centroids)
