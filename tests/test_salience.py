"""Frames that carry the video: the salience score, salience pooling, the samplers beyond the paper, centres fixed
from the input, the informative-frame diagnostics and the switches' inert keys."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import mannwhitneyu

from autossvh.config import ConfigError, SalienceConfig, build_config
from autossvh.diagnostics import sampler_diagnostics
from autossvh.engine import encode, load_model, save_model
from autossvh.model import AutoSSVH, independent_masks
from autossvh.salience import FrameSalience, bank_rows
from autossvh.trainer import ArraySteps, RetrievalData, fit
from storage.synthetic import make_synthetic
from tests.conftest import tiny_config

F, T = 64, 16  # 4 class frames in a run, 6 distractors of random other classes, 6 background frames
SHAPE = [f"data.feature_size={F}", f"data.max_frames={T}", "train.test_batch_size=64"]


@pytest.fixture(scope="module")
def scarce() -> RetrievalData:
    splits = make_synthetic("ucf101", 200, feature_dim=F, max_frames=T, num_classes=8, seed=1,
                            informative_share=0.25, distractor_share=0.35).splits
    tr, q = splits["train"], splits["query"]
    return RetrievalData(tr.feats, q.feats, q.labels, tr.feats, tr.labels, tr.frame_signal)


def fitted(data: RetrievalData, cfg: SalienceConfig | None = None, seed: int = 0) -> FrameSalience:
    cfg = cfg or SalienceConfig()
    salience = FrameSalience(cfg, F, T)
    salience.fit(data.train[bank_rows(len(data.train), cfg.bank_videos, seed)], seed)
    return salience


def ranking_auc(scores: np.ndarray, informative: np.ndarray) -> float:
    """P(an informative frame scores above a frame that is not), over all such pairs."""
    return float(mannwhitneyu(scores[informative], scores[~informative]).statistic
                 / (informative.sum() * (~informative).sum()))


def test_salience_ranks_informative_frames_above_distractors_and_the_adversarial_score_does_not(scarce):
    informative = scarce.train_signal >= 0.5
    salience = ranking_auc(fitted(scarce).scores(torch.from_numpy(scarce.train)).numpy(), informative)
    result = fit(tiny_config(*SHAPE, "train.num_epochs=3", "cluster.warmup_epoch=1", "sampler.tau=1"), scarce)
    adversarial = ranking_auc(result.model.frame_logits(torch.from_numpy(scarce.train)).numpy(), informative)
    assert salience > 0.7, salience
    assert adversarial < 0.6 and salience > adversarial + 0.15, (salience, adversarial)


def test_both_parts_of_the_score_are_needed(scarce):
    informative = scarce.train_signal >= 0.5
    x = torch.from_numpy(scarce.train)

    def auc(**changes: float) -> float:
        return ranking_auc(fitted(scarce, SalienceConfig(**changes)).scores(x).numpy(), informative)

    both, recurrence_only = auc(), auc(rarity_weight=0.0)
    assert both > recurrence_only + 0.03, (both, recurrence_only)  # recurrence alone also lifts the background


def test_a_bank_video_is_never_its_own_neighbour(scarce):
    cfg = SalienceConfig(bank_videos=64)
    rows = bank_rows(len(scarce.train), cfg.bank_videos, 0)
    salience = FrameSalience(cfg, F, T)
    salience.fit(scarce.train[rows])
    video = 5  # the bank's sixth video, scored by brute force over the other bank videos' frames
    z = torch.nn.functional.normalize((torch.from_numpy(scarce.train[rows[video]]) - salience.center)
                                      @ salience.projection, dim=-1)
    others = torch.cat([salience.bank[i * T:(i + 1) * T] for i in range(cfg.bank_videos) if i != video])
    own = z @ z.T - 3 * torch.eye(T)
    expected = (own.topk(cfg.within_neighbours, dim=-1).values.mean(-1)
                - (z @ others.T).topk(cfg.cross_neighbours, dim=-1).values.mean(-1))
    assert torch.allclose(salience.scores(torch.from_numpy(scarce.train[rows[video]][None]))[0], expected, atol=1e-5)
    weights = salience.weights(salience.scores(torch.from_numpy(scarce.train[:5])))
    assert torch.allclose(weights.sum(1), torch.ones(5)) and bool((weights >= 0).all())


def test_the_bank_never_holds_videos_held_out_of_training():
    held = np.arange(8, 20)  # chunks 2 to 4 of 4 videos
    rows = bank_rows(40, 16, seed=3, chunk=4, exclude=held)
    assert len(rows) == 16 and not np.isin(rows, held).any()
    np.testing.assert_array_equal(bank_rows(40, 16, seed=3, chunk=4, exclude=np.zeros(0, np.int64)),
                                  bank_rows(40, 16, seed=3, chunk=4))  # nothing held out: the same bank as before


def test_fewer_training_videos_than_the_bank_repeat_them_and_a_model_keeps_its_bank(tmp_path, scarce):
    rows = bank_rows(10, 25, seed=3, chunk=4)
    assert len(rows) == 25 and set(rows) == set(range(10))
    cfg = tiny_config(*SHAPE, "model.pooling=salience", "salience.bank_videos=32")
    model = AutoSSVH(cfg)
    with pytest.raises(RuntimeError, match="bank is empty"):
        model.pooling_weights(torch.from_numpy(scarce.train[:2]))
    model.salience.fit(scarce.train[bank_rows(len(scarce.train), 32, 0)])
    save_model(tmp_path / "model.pt", model)
    loaded = load_model(tmp_path / "model.pt")
    x = torch.from_numpy(scarce.query[:8])
    assert torch.equal(model.pooling_weights(x), loaded.pooling_weights(x))
    assert np.array_equal(encode(model, [x]).codes, encode(loaded, [x]).codes)


def test_independent_draws_overlap_as_two_uniform_draws_of_k_of_t():
    hidden = independent_masks(torch.zeros(4000, 25), 12, 1.0).view(2, 4000, 25)
    assert bool((hidden.sum(-1) == 12).all())
    overlap = float((hidden[0] & hidden[1]).sum(-1).float().mean() / 12)
    assert overlap == pytest.approx(12 / 25, abs=0.01)
    assert float(hidden.float().mean(dim=(0, 1)).std()) < 0.02  # no frame position preferred


def test_the_salience_sampler_hides_salient_frames_more_often(scarce):
    cfg = tiny_config(*SHAPE, "sampler.kind=salience", "sampler.tau=0.5")
    model = AutoSSVH(cfg)
    model.salience.fit(scarce.train[bank_rows(len(scarce.train), cfg.salience.bank_videos, 0)])
    diagnostics = sampler_diagnostics(model, torch.from_numpy(scarce.train[:128]), scarce.train_signal[:128])
    assert diagnostics.hidden_precision > 1.3 * diagnostics.informative_rate
    assert diagnostics.view_overlap > cfg.num_hidden / T + 0.05  # both views prefer the same frames


def test_salience_pooling_puts_its_weight_on_informative_frames_and_mean_pooling_does_not(scarce):
    probe, signal = torch.from_numpy(scarce.train[:128]), scarce.train_signal[:128]
    steps = ArraySteps(tiny_config(*SHAPE, "model.pooling=salience"), scarce, torch.device("cpu"))
    pooled = sampler_diagnostics(steps.model, probe, signal)
    mean = sampler_diagnostics(AutoSSVH(tiny_config(*SHAPE)), probe, signal)
    assert pooled.informative_rate == pytest.approx(0.25)
    assert pooled.pooling_precision >= 2 * pooled.informative_rate
    assert mean.pooling_precision == pytest.approx(mean.informative_rate)
    assert {"sampler/pooling_precision", "sampler/hidden_precision"} <= set(pooled.metrics())


def test_input_centres_are_computed_once_and_follow_the_classes_better_with_salience_pooling(scarce):
    from sklearn.metrics import normalized_mutual_info_score

    classes = scarce.database_labels.argmax(1)

    def centres(*pooling: str) -> float:
        cfg = tiny_config(*SHAPE, *pooling, "loss.centers=input", "cluster.num_cluster=[8, 16]")
        steps = ArraySteps(cfg, scarce, torch.device("cpu"))
        first = steps.cluster(0)
        assert steps.cluster(1) is first  # fixed: never re-derived from the codes
        assert all(len(c) >= 2 for c in first.centers)
        return normalized_mutual_info_score(classes, first.im2cluster[0])

    salience, mean = centres("model.pooling=salience"), centres()
    assert salience > mean + 0.05 and salience > 0.2, (salience, mean)


@pytest.mark.parametrize(("overrides", "key"), [
    (["salience.temperature=0.1"], "salience.temperature"),
    (["sampler.kind=independent", "sampler.tau=0.5"], "sampler.tau"),
    (["sampler.kind=salience", "sampler.grl=false"], "sampler.grl"),
    (["loss.centers=input", "cluster.warm_start=false"], "cluster.warm_start"),
])
def test_each_new_switch_refuses_keys_that_do_nothing_under_it(overrides, key, caplog):
    with pytest.raises(ConfigError, match=f"{key} is set but does nothing"):
        build_config("ucf101", overrides=overrides)
    with caplog.at_level("WARNING", logger="autossvh.config"):  # an ablation's --set applies to every row
        build_config("ucf101", overrides=overrides, strict=False)
    assert any(r.getMessage().startswith(key) for r in caplog.records)


def test_the_focused_recipe_holds_what_it_documents():
    cfg = build_config("ucf101", "focused")
    assert (cfg.model.pooling, cfg.loss.centers, cfg.sampler.kind) == ("salience", "input", "independent")
    assert cfg.cluster.warmup_epoch == 0 and cfg.loss.b == 1.0 and cfg.loss.positives == "nearest"
    assert (cfg.train.lr_step, cfg.train.lr_gamma) == (10, 0.5)
    assert build_config("ucf101", "focused", overrides=["salience.temperature=0.3"]).salience.temperature == 0.3
