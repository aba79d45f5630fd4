"""The synthetic data is learnable but not trivial: across storage and autossvh, a model trained on a synthetic
store clearly beats sign codes of a random projection of mean-pooled features."""

from autossvh.baselines import random_projection_codes
from autossvh.engine import evaluate_codes
from autossvh.trainer import RetrievalData, fit
from storage.synthetic_store import write_synthetic
from tests.conftest import tiny_config

MIN_RATIO = 1.3  # trained mAP@5 / projection mAP@5; measured 0.156 / 0.106 = 1.48


def test_trained_model_clearly_beats_random_projection_on_a_synthetic_store():
    store = write_synthetic("memory://learnability/ucf", "ucf101", 320, feature_dim=32, max_frames=8, num_classes=16,
                            seed=3)
    train, train_labels = store.load("train")
    query, query_labels = store.load("query")
    assert store.info.protocol == "database_is_train"
    center = train.mean(axis=(0, 1))
    projection = evaluate_codes(random_projection_codes(query, 16, center=center)[0], query_labels,
                                random_projection_codes(train, 16, center=center)[0], train_labels)
    chance = 1 / 16
    assert projection.map_at_k[5] > 1.3 * chance  # the features carry the class: not noise
    cfg = tiny_config("data.feature_size=32", "train.batch_size=32", "train.num_epochs=30", "train.eval_every=100",
                      "train.lr=1e-3", "cluster.warmup_epoch=5", "cluster.num_cluster=[16, 24]", "cluster.nredo=1")
    trained = fit(cfg, RetrievalData(train, query, query_labels, train, train_labels)).retrieval
    assert trained.map_at_k[5] > MIN_RATIO * projection.map_at_k[5], (trained.map_at_k, projection.map_at_k)
    assert trained.map_at_k[5] < 0.9  # and not trivial
