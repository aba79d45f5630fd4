"""Model shapes, released sizes, sampler (exact K, two views, Gumbel top-K on logits, STE, GRL), hash layers and
encoding."""

import pytest
import torch

from autossvh.config import DATASETS, build_config
from autossvh.losses import ClusterTargets, autossvh_loss
from autossvh.model import (
    AutoSSVH,
    binarize,
    gumbel_topk,
    leaves_parameters_unused,
    random_complementary_masks,
    relaxed_topk,
    sign_ste,
    sinusoid_table,
    video_codes,
)
from tests.conftest import random_clustering, tiny_config


@pytest.mark.parametrize("recipe", ["paper", "released"])
@pytest.mark.parametrize("dataset", DATASETS)
def test_forward_at_preset_sizes(dataset, recipe):
    cfg = build_config(dataset, recipe)
    model = AutoSSVH(cfg)
    x = torch.randn(2, cfg.data.max_frames, cfg.data.feature_size)
    out = model(x)
    k, nbits = cfg.num_hidden, cfg.model.nbits
    assert out.codes.shape == (4, nbits)
    assert out.recon.shape == out.target.shape == (4, k, cfg.data.feature_size)
    assert (out.hidden.sum(1) == k).all()
    assert (out.frame_weight is not None) == (recipe == "paper")
    frame_codes = model.encode_frames(x)
    assert frame_codes.shape == (2, cfg.data.max_frames, nbits)
    if cfg.model.hash_layer == "released":
        assert set(frame_codes.unique().tolist()) <= {-1.0, 1.0}
    else:
        assert frame_codes.abs().max() < 1 and set(out.codes.unique().tolist()) <= {-1.0, 1.0}


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(("dataset", "encoder", "decoder", "total"),
                         [("fcvid", 10_672_290, 1_680_256, 12_386_402),
                          ("activitynet", 10_148_002, 1_284_992, 11_467_810)])
def test_parameter_counts_match_released_model(dataset, encoder, decoder, total):
    # REFERENCE §3.5 counts include SampleNet's unused scalar `temperature`, which this model does not carry.
    cfg = build_config(dataset, overrides=["model.nbits=64"])
    model = AutoSSVH(cfg)
    assert _count(model.encoder) == encoder - 1
    assert _count(model.decoder) == decoder
    assert _count(model) == total - 1


def test_attention_inner_width_is_252():
    attn = AutoSSVH(build_config("ucf101")).encoder.blocks[0].attn
    assert attn.qkv.weight.shape == (756, 256) and attn.proj.weight.shape == (256, 252)


def test_sinusoid_table():
    table = sinusoid_table(25, 256)
    assert torch.allclose(table[3, 0], torch.sin(torch.tensor(3.0)))
    assert torch.allclose(table[3, 1], torch.cos(torch.tensor(3.0)))
    assert torch.allclose(table[5, 10], torch.sin(torch.tensor(5 / 10000 ** (10 / 256))), atol=1e-6)


def test_binarize_forward_and_straight_through_gradient():
    u = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.3, 1.0, 1.5], requires_grad=True)
    h = binarize(u)
    assert h.tolist() == [-1, -1, -1, -1, 1, 1, 1]
    h.sum().backward()
    assert u.grad.tolist() == [0, 0, 1, 1, 1, 0, 0]


def test_gumbel_topk_selects_exactly_k_and_passes_gradient():
    logits = torch.randn(6, 25, requires_grad=True)
    hard, selection = gumbel_topk(logits, 7, tau=1.0)
    assert (hard.sum(1) == 7).all() and set(hard.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(selection.detach(), hard)
    (selection * torch.randn_like(selection)).sum().backward()
    assert logits.grad.abs().sum() > 0


@pytest.mark.parametrize("tau", [0.5, 2.0])
def test_gumbel_top1_draws_follow_the_softmax_of_logits_over_tau(tau):
    logits = torch.tensor([0.0, 1.0, -1.0, 2.0])
    hard, _ = gumbel_topk(logits.expand(40_000, 4), 1, tau)
    expected = torch.softmax(logits / tau, dim=0)
    assert torch.allclose(hard.mean(0), expected, atol=0.01)


def test_small_tau_hides_the_top_scored_frames_and_large_tau_is_uniform():
    logits = torch.arange(10.0).expand(4000, 10)
    sharp, _ = gumbel_topk(logits, 3, tau=0.05)
    assert (sharp[:, 7:] == 1).all()
    flat, _ = gumbel_topk(logits, 3, tau=1000.0)
    assert torch.allclose(flat.mean(0), torch.full((10,), 0.3), atol=0.03)


def test_relaxed_topk_sums_to_k_ranks_like_top_k_and_approaches_the_hard_top_k():
    keys = torch.randn(5, 12, requires_grad=True)
    soft = relaxed_topk(keys, 4)
    hard = torch.zeros(5, 12).scatter_(1, keys.topk(4, dim=1).indices, 1.0)
    assert torch.allclose(soft.sum(1), torch.full((5,), 4.0))
    assert torch.equal(torch.zeros(5, 12).scatter_(1, soft.topk(4, dim=1).indices, 1.0), hard)
    soft[:, 0].sum().backward()
    assert (keys.grad[:, 0] > 0).all() and (keys.grad[:, 1:] < 0).all()  # frames compete for the K places
    assert torch.allclose(relaxed_topk(keys.detach() * 2000, 4), hard, atol=1e-3)


def test_sign_ste_forward_is_the_sign_and_backward_the_identity():
    x = torch.tensor([-0.4, 0.0, 0.2], requires_grad=True)
    y = sign_ste(x)
    assert y.tolist() == [-1.0, -1.0, 1.0]
    (y * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert x.grad.tolist() == [1.0, 2.0, 3.0]


def test_grade_net_starts_with_zero_logits_so_the_first_draws_are_uniform():
    model = AutoSSVH(tiny_config())
    assert torch.equal(model.frame_logits(torch.randn(3, 8, 16)), torch.zeros(3, 8))


def test_paper_hash_layer_gives_soft_frame_codes_and_signed_view_codes():
    model = AutoSSVH(tiny_config("model.hash_layer=paper"))
    x = torch.randn(4, 8, 16)
    out = model(x)
    assert set(out.codes.unique().tolist()) <= {-1.0, 1.0}
    frames = model.encode_frames(x)
    assert frames.abs().max() < 1 and frames.unique().numel() > 2
    codes, _ = video_codes(frames)
    assert torch.equal(codes, torch.where(frames.mean(1) > 0, 1.0, -1.0))
    out.codes.sum().backward()
    assert model.hash.weight.grad.abs().sum() > 0  # the sign passes the gradient straight through


def test_random_complementary_masks():
    hidden = random_complementary_masks(64, 25, 12, torch.device("cpu")).view(2, 64, 25)
    assert (hidden.sum(-1) == 12).all()
    visible = ~hidden
    assert ((visible[0] & visible[1]).sum(-1) == 1).all()  # UCF101: 13 visible of 25 overlap by one frame
    hidden = random_complementary_masks(64, 25, 18, torch.device("cpu")).view(2, 64, 25)
    assert ((~hidden[0] & ~hidden[1]).sum(-1) == 0).all()  # FCVID: disjoint visible sets


def test_views_differ_and_hide_exactly_k():
    cfg = tiny_config()
    model = AutoSSVH(cfg)
    out = model(torch.randn(32, 8, 16))
    view1, view2 = out.hidden.chunk(2)
    assert (out.hidden.sum(1) == cfg.num_hidden).all()
    assert (view1 != view2).any(dim=1).float().mean() > 0.8


def test_eval_encoding_is_deterministic_and_ignores_dropout():
    cfg = tiny_config("data.data_drop_rate=0.5")
    model = AutoSSVH(cfg).eval()
    x = torch.randn(5, 8, 16)
    assert torch.equal(model.encode_frames(x), model.encode_frames(x))
    codes, features = video_codes(model.encode_frames(x))
    assert set(codes.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert torch.allclose(features.norm(dim=1), torch.ones(5))


def test_video_codes_tie_gives_zero():
    frame_codes = torch.tensor([[[1.0, -1.0], [-1.0, -1.0]]])
    codes, _ = video_codes(frame_codes)
    assert codes.tolist() == [[0.0, -1.0]]


def _scorer_grad(cfg, x, targets, index, seed=0):
    model_seed = 123
    torch.manual_seed(model_seed)
    model = AutoSSVH(cfg)
    torch.nn.init.normal_(model.encoder.grade_net.out.weight, std=0.1)  # a scorer past its zero start
    torch.manual_seed(seed)
    out = model(x)
    loss, _ = autossvh_loss(out, index, cfg, targets)
    loss.backward()
    return {name: p.grad.clone() for name, p in model.encoder.grade_net.named_parameters()}


def test_grl_exactly_negates_the_scorer_gradient():
    x = torch.randn(8, 8, 16)
    index = torch.arange(8)
    targets = ClusterTargets.from_result(random_clustering(8, 16, [3, 5]), "cpu")
    with_grl = _scorer_grad(tiny_config(), x, targets, index)
    without = _scorer_grad(tiny_config("sampler.grl=false"), x, targets, index)
    for name in with_grl:
        assert with_grl[name].abs().sum() > 0
        assert torch.equal(with_grl[name], -without[name]), name


@pytest.mark.parametrize("term", ["reconstruction", "view_contrastive", "p2set"])
def test_scorer_gets_gradient_from_each_loss(term):
    others = {"reconstruction", "view_contrastive", "p2set"} - {term}
    cfg = tiny_config(*[f"loss.{t}=false" for t in others], "loss.a=1.0", "loss.b=1.0")
    x = torch.randn(8, 8, 16)
    targets = ClusterTargets.from_result(random_clustering(8, 16, [3, 5]), "cpu")
    grads = _scorer_grad(cfg, x, targets, torch.arange(8))
    assert sum(g.abs().sum() for g in grads.values()) > 0


def test_without_the_reconstruction_weight_path_the_scorer_still_hears_reconstruction_through_the_gate():
    cfg = tiny_config("loss.view_contrastive=false", "loss.p2set=false", "sampler.reconstruction_weight=false")
    assert AutoSSVH(cfg)(torch.randn(4, 8, 16)).frame_weight is None
    grads = _scorer_grad(cfg, torch.randn(8, 8, 16), None, torch.arange(8))
    assert sum(g.abs().sum() for g in grads.values()) > 0


def test_released_recipe_has_no_sampler_parameters():
    model = AutoSSVH(tiny_config(recipe="released"))
    assert model.encoder.grade_net is None
    out = model(torch.randn(4, 8, 16))
    assert out.frame_weight is None


def test_decoder_receives_true_frame_positions():
    cfg = tiny_config()
    model = AutoSSVH(cfg)
    with torch.no_grad():
        model.to_decoder.weight.zero_()
        model.mask_token.zero_()
        model.decoder_pos.copy_(torch.randn_like(model.decoder_pos))
    order = torch.stack([torch.randperm(8) for _ in range(5)])
    visible_idx, hidden_idx = order[:, :4].sort(1).values, order[:, 4:].sort(1).values
    tokens = model.decoder_tokens(torch.randn(5, 4, 16), visible_idx, hidden_idx)
    expected = model.decoder_pos[0][torch.cat([visible_idx, hidden_idx], 1)]
    assert torch.equal(tokens, expected)


def test_training_forward_targets_are_the_hidden_frames_in_order():
    cfg = tiny_config("data.data_drop_rate=0.5")
    model = AutoSSVH(cfg)
    x = torch.randn(4, 8, 16)
    out = model(x)
    video = torch.arange(8) % 4
    for row in range(8):
        frames = out.hidden[row].nonzero().squeeze(1)
        assert torch.equal(out.target[row], x[video[row], frames])  # raw, un-dropped targets


@pytest.mark.parametrize("overrides", [
    (), ("recipe=released",), ("loss.reconstruction=false",), ("loss.view_contrastive=false",),
    ("loss.p2set=false",), ("model.hash_layer=paper",), ("sampler.reconstruction_weight=false",),
    ("loss.reconstruction=false", "loss.p2set=false"), ("sampler.grl=false",), ("sampler.kind=random",),
])
def test_only_configs_that_leave_parameters_out_of_the_backward_search_for_them(overrides):
    cfg = tiny_config(*overrides)
    model = AutoSSVH(cfg)
    targets = ClusterTargets.from_result(random_clustering(8, 16, [3, 5]), "cpu")
    loss, _ = autossvh_loss(model(torch.randn(8, 8, 16)), torch.arange(8), cfg, targets)
    loss.backward()
    unused = [name for name, p in model.named_parameters() if p.grad is None]
    assert bool(unused) == leaves_parameters_unused(cfg), unused
