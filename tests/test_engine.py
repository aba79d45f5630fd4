"""Engine: learning on generated data, encoding, schedule, non-finite steps, save/load safety."""


import pathlib

import numpy as np
import pytest
import torch

from autossvh.baselines import ITQ, mean_pool, random_projection_codes
from autossvh.config import build_config
from autossvh.engine import (
    EpochStats,
    NonFiniteGuard,
    NonFiniteLossError,
    UnsafeFileError,
    array_batches,
    build_optimizer,
    build_scheduler,
    encode,
    evaluate_codes,
    load_model,
    save_model,
    train_one_epoch,
)
from autossvh.model import AutoSSVH
from autossvh.trainer import DivergenceError, RetrievalData, check_divergence, evaluate_arrays, fit, shuffled_batches
from storage.synthetic import make_synthetic
from tests.conftest import tiny_config

LEARNING_MARGIN = 0.08  # mAP@5 of the trained model must beat random codes by this much (measured: 0.158 vs 0.035)


def test_paper_recipe_learns_beyond_random_codes():
    """200 steps of the paper recipe (with P2Set from epoch 5 on) on class-structured generated data."""
    ds = make_synthetic("ucf101", 320, feature_dim=32, max_frames=8, num_classes=16, seed=3)
    train, query = ds.splits["train"], ds.splits["query"]
    data = RetrievalData(train.feats, query.feats, query.labels, train.feats, train.labels)
    cfg = tiny_config("data.feature_size=32", "train.batch_size=32", "train.num_epochs=20", "train.eval_every=20",
                      "train.lr=1e-3", "cluster.warmup_epoch=5", "cluster.num_cluster=[16, 24]", "cluster.nredo=1")
    result = fit(cfg, data)
    assert sum(r.stats.steps for r in result.history) == 200
    assert any(r.stats.p2set > 0 for r in result.history[5:]) and result.history[0].stats.p2set == 0
    rng = np.random.default_rng(0)
    random = evaluate_codes(np.where(rng.random((len(query), 16)) < 0.5, -1, 1), query.labels,
                            np.where(rng.random((len(train), 16)) < 0.5, -1, 1), train.labels)
    trained = result.retrieval.map_at_k[5]
    assert trained > random.map_at_k[5] + LEARNING_MARGIN, (trained, random.map_at_k[5])
    center = train.feats.mean(axis=(0, 1))
    projection = evaluate_codes(random_projection_codes(query.feats, 16, center=center)[0], query.labels,
                                random_projection_codes(train.feats, 16, center=center)[0], train.labels)
    assert trained > projection.map_at_k[5], (trained, projection.map_at_k[5])  # measured: 0.152 vs 0.106


def test_random_projection_codes_are_deterministic_sign_codes():
    feats = np.random.default_rng(0).normal(size=(50, 4, 12)).astype(np.float32)
    codes, center = random_projection_codes(feats, 24, seed=1)
    again, _ = random_projection_codes(feats, 24, seed=1, center=center)
    assert codes.shape == (50, 24) and codes.dtype == np.int8 and set(np.unique(codes)) <= {-1, 1}
    np.testing.assert_array_equal(codes, again)
    np.testing.assert_allclose(center, feats.mean(axis=(0, 1)), atol=1e-6)
    np.testing.assert_allclose(mean_pool(feats, block=7), feats.mean(axis=1), atol=1e-6)


def test_itq_codes_beat_a_random_projection_and_its_rotation_is_orthogonal():
    ds = make_synthetic("ucf101", 400, feature_dim=64, num_classes=8, seed=3)
    train, query = ds.splits["train"], ds.splits["query"]
    itq = ITQ.fit(train.feats, 16)
    pca = np.linalg.svd(mean_pool(train.feats) - itq.mean, full_matrices=False)[2][:16].T
    rotation = pca.T @ itq.projection
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(16), atol=1e-8)
    np.testing.assert_array_equal(itq.codes(query.feats), ITQ.fit(train.feats, 16).codes(query.feats))
    learned = evaluate_codes(itq.codes(query.feats), query.labels, itq.codes(train.feats), train.labels)
    center = train.feats.mean(axis=(0, 1))
    projection = evaluate_codes(random_projection_codes(query.feats, 16, center=center)[0], query.labels,
                                random_projection_codes(train.feats, 16, center=center)[0], train.labels)
    assert learned.gmap_l2 > projection.gmap_l2
    with pytest.raises(ValueError, match="ITQ: 16 bits need at least 16 training videos"):
        ITQ.fit(train.feats[:10], 16)


def test_encode_keeps_order_and_batching_does_not_matter():
    model = AutoSSVH(tiny_config())
    feats = np.random.default_rng(0).normal(size=(37, 8, 16)).astype(np.float32)
    a = encode(model, array_batches(feats, 5))
    b = encode(model, ((torch.from_numpy(feats), torch.arange(37)),))
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_allclose(a.features, b.features, atol=1e-6)
    assert a.codes.dtype == np.int8 and a.codes.shape == (37, 16)


def test_learning_rate_follows_the_released_schedule():
    cfg = tiny_config("train.num_epochs=350")
    optimizer = build_optimizer(AutoSSVH(cfg), cfg)
    scheduler = build_scheduler(optimizer, cfg)
    lrs = []
    for _ in range(350):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == 1e-4 and lrs[19] == 1e-4 and lrs[20] == pytest.approx(9e-5)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1.668e-5, rel=1e-3)  # after 350 steps [log]
    cfg = tiny_config("train.num_epochs=800", "train.min_lr=1e-5")
    optimizer = build_optimizer(AutoSSVH(cfg), cfg)
    scheduler = build_scheduler(optimizer, cfg)
    for _ in range(440):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-5)  # FCVID floor from epoch 440 on


def test_non_finite_batches_are_skipped_and_counted():
    cfg = tiny_config()
    model = AutoSSVH(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = torch.full((8, 8, 16), float("nan"))
    stats = train_one_epoch(model, [(bad, torch.arange(8))], build_optimizer(model, cfg), cfg, torch.device("cpu"))
    assert stats.skipped_steps == 1 and stats.steps == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_consecutive_non_finite_losses_stop_the_run_across_epochs():
    cfg = tiny_config("train.max_nonfinite_steps=3")
    model = AutoSSVH(cfg)
    optimizer = build_optimizer(model, cfg)
    good, bad = torch.randn(8, 8, 16), torch.full((8, 8, 16), float("inf"))
    index = torch.arange(8)
    guard = NonFiniteGuard(cfg.train.max_nonfinite_steps)
    stats = train_one_epoch(model, [(bad, index), (bad, index), (good, index)], optimizer, cfg, torch.device("cpu"),
                            guard=guard)
    assert (stats.skipped_steps, stats.steps, guard.streak) == (2, 1, 0)  # a finite step resets the streak
    train_one_epoch(model, [(bad, index), (bad, index)], optimizer, cfg, torch.device("cpu"), guard=guard)
    with pytest.raises(NonFiniteLossError, match=r"3 consecutive .*train.max_nonfinite_steps=3; 5 skipped"):
        train_one_epoch(model, [(bad, index)], optimizer, cfg, torch.device("cpu"), guard=guard)


def _epoch(loss: float, steps: int = 13, skipped: int = 0) -> EpochStats:
    return EpochStats(loss=loss, rec=loss, vc=0.0, p2set=0.0, steps=steps, skipped_steps=skipped, videos=8 * steps,
                      seconds=1.0)


def test_a_diverging_epoch_stops_the_run_naming_epoch_step_and_value():
    cfg = tiny_config("train.max_loss=100", "train.max_weight_norm=1e4")
    model = AutoSSVH(cfg)
    check_divergence(cfg, 0, _epoch(12.5), model)  # a sane epoch passes
    with pytest.raises(DivergenceError, match=r"epoch 3, step 13 .*mean loss 250 > train.max_loss=100"):
        check_divergence(cfg, 2, _epoch(250.0), model)
    with pytest.raises(DivergenceError, match=r"epoch 1, step 4 .*all 4 steps of the epoch had a non-finite loss"):
        check_divergence(cfg, 0, _epoch(0.0, steps=0, skipped=4), model)
    with torch.no_grad():
        next(model.parameters()).mul_(1e30)  # what train.lr=1e30 did in one step
    with pytest.raises(DivergenceError,
                       match=r"epoch 2, step 13 .*weight norm \d\.\d+e\+\d\d > train.max_weight_norm=10000"):
        check_divergence(cfg, 1, _epoch(12.5), model)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    with pytest.raises(DivergenceError, match=r"weight norm nan"):
        check_divergence(cfg, 1, _epoch(12.5), model)


def test_fit_stops_at_the_first_epoch_past_the_bound():
    ds = make_synthetic("ucf101", 64, feature_dim=16, max_frames=8, num_classes=8, seed=1)
    train, query = ds.splits["train"], ds.splits["query"]
    data = RetrievalData(train.feats, query.feats, query.labels, train.feats, train.labels)
    cfg = tiny_config("train.num_epochs=3", "loss.p2set=false", "train.max_weight_norm=10")
    with pytest.raises(DivergenceError, match=r"the run diverged at epoch 1, step \d+ .*weight norm"):
        fit(cfg, data)


def test_shuffled_batches_cover_every_video_once_and_never_leave_one():
    g = torch.Generator().manual_seed(0)
    batches = shuffled_batches(17, 8, g)
    assert [len(b) for b in batches] == [8, 8]  # a trailing batch of one is dropped
    batches = shuffled_batches(19, 8, g)
    assert sorted(torch.cat(batches).tolist()) == list(range(19))


def test_save_and_load_round_trip(tmp_path):
    cfg = tiny_config("model.nbits=24", recipe="released")
    model = AutoSSVH(cfg)
    save_model(tmp_path / "m.pt", model)
    loaded = load_model(tmp_path / "m.pt")
    assert loaded.cfg == cfg
    x = torch.randn(3, 8, 16)
    assert torch.equal(model.eval().encode_frames(x), loaded.eval().encode_frames(x))
    assert not (tmp_path / "m.pt.tmp").exists()


class _Payload:
    """Pickles to a call that would create ``marker``: what a malicious file carries."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_load_refuses_pickled_payload(tmp_path):
    path = tmp_path / "evil.pt"
    marker = tmp_path / "payload-ran"
    torch.save({"config": {"dataset": "ucf101"}, "model": _Payload(marker)}, path)
    with pytest.raises(UnsafeFileError, match=r"evil.pt: cannot be loaded safely \(UnpicklingError: WeightsUnpickler "
                       r"error: Unsupported global"):
        load_model(path)
    assert not marker.exists()


def test_load_rejects_a_foreign_file(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="not an AutoSSVH model file"):
        load_model(path)


def test_fit_rejects_mismatched_features():
    cfg = tiny_config()
    feats = np.zeros((10, 9, 16), np.float32)
    labels = np.eye(2, dtype=np.uint8)[np.arange(10) % 2]
    with pytest.raises(ValueError, match=r"expects \(N, 8, 16\)"):
        fit(cfg, RetrievalData(feats, feats, labels, feats, labels))


def test_evaluate_arrays_encodes_a_shared_split_once():
    cfg = tiny_config()
    model = AutoSSVH(cfg)
    feats = np.random.default_rng(1).normal(size=(120, 8, 16)).astype(np.float32)
    labels = np.eye(3, dtype=np.uint8)[np.arange(120) % 3]
    shared = evaluate_arrays(model, RetrievalData(feats, feats, labels, feats, labels), torch.device("cpu"))
    copied = evaluate_arrays(model, RetrievalData(feats, feats, labels, feats.copy(), labels), torch.device("cpu"))
    assert shared.map_at_k == copied.map_at_k and shared.map_at_k[5] > 0


def test_autocast_is_bf16_where_the_hardware_has_it():
    from autossvh.engine import autocast, cpu_has_fast_bf16

    with autocast(torch.device("cpu"), enabled=True):
        assert torch.is_autocast_enabled("cpu") == cpu_has_fast_bf16()
    with autocast(torch.device("cpu"), enabled=False):
        assert not torch.is_autocast_enabled("cpu")
    if torch.cuda.is_available():
        with autocast(torch.device("cuda"), enabled=True):
            assert torch.get_autocast_dtype("cuda") == torch.bfloat16


def _encode_as_before(model: AutoSSVH, batches: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """The encoding before it ran as inference: float32 batches, no_grad, one autocast region per batch."""
    from autossvh.engine import autocast
    from autossvh.model import video_codes

    codes, features = [], []
    model.eval()
    with torch.no_grad():
        for feats in batches:
            with autocast(torch.device("cpu"), model.cfg.train.amp):
                frame_codes = model.encode_frames(feats.float())
            code, feature = video_codes(frame_codes.float())
            codes.append(code.to(torch.int8))
            features.append(feature)
    return torch.cat(codes).numpy(), torch.cat(features).numpy()


@pytest.mark.parametrize("amp", [False, True])
def test_encode_of_stored_float16_equals_the_previous_float32_encoding(amp: bool):
    """Float16 batches (as stored) encode bit for bit like the float32 batches the readers used to produce: in
    fp32, and under bf16 autocast where the CPU has it (float16 -> bf16 rounds as float16 -> float32 -> bf16)."""
    cfg = tiny_config(f"train.amp={str(amp).lower()}", "model.encoder_depth=3")
    model = AutoSSVH(cfg)
    feats = torch.from_numpy(np.random.default_rng(1).normal(size=(45, 8, 16)).astype(np.float16))
    batches = list(feats.split(16))
    codes, features = _encode_as_before(model, [b.float() for b in batches])
    model.train()
    encoded = encode(model, batches)
    assert model.training  # the mode is restored
    np.testing.assert_array_equal(encoded.codes, codes)
    np.testing.assert_array_equal(encoded.features, features)
    assert encoded.features.dtype == np.float32 and encoded.codes.dtype == np.int8


def test_encode_batch_size_fits_its_budget_in_whole_chunks(monkeypatch: pytest.MonkeyPatch):
    from autossvh import engine

    cfg = build_config("ucf101")
    cpu = torch.device("cpu")
    assert engine.encode_batch_size(cfg, cpu, 2, 16) == 128  # the CPU budget holds about the measured best
    monkeypatch.setitem(engine.ENCODE_BUDGET_BYTES, "cpu", 1 << 30)
    batch = engine.encode_batch_size(cfg, cpu, stored_itemsize=2, multiple_of=16)
    features = 25 * 4096 * (2 + 4)  # a video's features as stored and in fp32; activations add less than that
    assert batch % 16 == 0 and batch * features <= 1 << 30 < (batch + 16) * 2 * features
    assert engine.encode_batch_size(cfg, torch.device("cuda"), 2, 16) > 128  # a larger budget on a GPU
    monkeypatch.setitem(engine.ENCODE_BUDGET_BYTES, "cpu", 1 << 20)  # less than one video: the floor applies
    assert engine.encode_batch_size(cfg, cpu, 2, 16) == cfg.train.test_batch_size
