"""Synthetic datasets: shapes, determinism, block independence, protocols, labels and difficulty."""

import functools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storage.schema import PROTOCOLS, stored_split
from storage.synthetic import (
    REAL_SPLIT_SIZES,
    SHAPES,
    DatasetShape,
    Split,
    SyntheticDataset,
    SyntheticGenerator,
    make_synthetic,
)

LIKES = ["fcvid", "activitynet", "ucf101", "hmdb51"]


def _map_at_k(query: np.ndarray, database: np.ndarray, q_labels: np.ndarray, db_labels: np.ndarray, k: int) -> float:
    """Dense mAP@K: rank by Hamming distance (stable), AP@K = (1/K) sum rel(i) * prec(i)."""
    dist = (query[:, None, :] != database[None, :, :]).sum(-1)
    top = np.argsort(dist, axis=1, kind="stable")[:, :k]
    relevant = (q_labels.astype(np.int64) @ db_labels.T.astype(np.int64)) > 0
    rel = np.take_along_axis(relevant, top, axis=1).astype(np.float64)
    precision = np.cumsum(rel, axis=1) / np.arange(1, k + 1)
    return float(((rel * precision).sum(axis=1) / k).mean())


def _random_projection_map5(ds: SyntheticDataset, bits: int = 64, seed: int = 0, oracle: bool = False) -> float:
    """mAP@5 of sign codes of a Gaussian projection of pooled, train-mean-centred features.

    Pooling is the frame mean, or with ``oracle`` the mean weighted by the true per-frame signal.
    """
    centre = ds.splits["train"].feats.mean(axis=(0, 1))
    projection = np.random.default_rng(seed).standard_normal((ds.shape.feature_dim, bits))

    def codes(split: str) -> np.ndarray:
        x = ds.splits[split]
        assert x.frame_signal is not None
        weight = x.frame_signal if oracle else np.ones_like(x.frame_signal)
        pooled = (x.feats * weight[..., None]).sum(axis=1) / weight.sum(axis=1, keepdims=True)
        return (pooled - centre) @ projection > 0

    q, db = ds.splits["query"], ds.splits["database"]
    return _map_at_k(codes("query"), codes("database"), q.labels, db.labels, k=5)


def test_real_shapes() -> None:
    assert SHAPES["fcvid"] == DatasetShape("fcvid", 25, 4096, 239, "query_is_database")
    assert SHAPES["activitynet"] == DatasetShape("activitynet", 30, 2048, 200, "separate")
    assert SHAPES["ucf101"] == DatasetShape("ucf101", 25, 4096, 101, "database_is_train")
    assert SHAPES["hmdb51"] == DatasetShape("hmdb51", 25, 4096, 51, "database_is_train")
    assert {s.protocol for s in SHAPES.values()} == set(PROTOCOLS)


@pytest.mark.parametrize("like", LIKES)
def test_shapes_dtypes_labels(like: str) -> None:
    ds = make_synthetic(like, 48, feature_dim=16, seed=3)
    real = SHAPES[like]
    assert ds.shape == DatasetShape(like, real.max_frames, 16, 12, real.protocol)
    assert ds.protocol == real.protocol
    assert set(ds.splits) == {"train", "query", "database"}
    for name, split in ds.splits.items():
        n = len(split)
        assert n >= 8
        assert split.feats.shape == (n, real.max_frames, 16) and split.feats.dtype == np.float32
        assert np.isfinite(split.feats).all() and (split.feats >= 0).all()
        assert split.labels.shape == (n, 12) and split.labels.dtype == np.uint8
        assert (split.labels.sum(axis=1) == 1).all()
        assert split.frame_signal is not None and split.frame_signal.shape == (n, real.max_frames)
        stored = stored_split(ds.protocol, name)
        assert split.video_ids.shape == (n,)
        assert split.video_ids[0] == f"{stored}_000000" and split.video_ids[-1] == f"{stored}_{n - 1:06d}"
    assert len(ds.splits["train"]) == 48


def test_default_dims_and_class_cap() -> None:
    ds = make_synthetic("activitynet", 40)
    assert ds.shape == DatasetShape("activitynet", 30, 2048, 10, "separate")
    assert ds.splits["train"].feats.shape == (40, 30, 2048)
    big = SyntheticGenerator("fcvid", 10_000)
    assert big.shape.num_classes == 239 and big.shape.feature_dim == 4096
    assert SyntheticGenerator("hmdb51", 30, num_classes=30).shape.num_classes == 30


@pytest.mark.parametrize("like", LIKES)
def test_split_sizes_follow_real_ratios(like: str) -> None:
    gen = SyntheticGenerator(like, 1000, feature_dim=8)
    real = REAL_SPLIT_SIZES[like]
    assert set(gen.split_sizes) == set(real)
    for name, size in gen.split_sizes.items():
        assert size == round(1000 * real[name] / real["train"])
    assert SyntheticGenerator(like, 10, feature_dim=8).size("query") >= 8


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        make_synthetic("kinetics", 10)
    with pytest.raises(ValueError):
        make_synthetic("ucf101", 10, num_classes=11)
    with pytest.raises(ValueError):
        make_synthetic("ucf101", 10, multilabel_fraction=1.5)
    with pytest.raises(ValueError):
        SyntheticGenerator("ucf101", 10, feature_dim=8).generate("train", 5, 11)


def test_deterministic_per_seed() -> None:
    a = make_synthetic("hmdb51", 40, feature_dim=32, multilabel_fraction=0.3, seed=7)
    b = make_synthetic("hmdb51", 40, feature_dim=32, multilabel_fraction=0.3, seed=7)
    c = make_synthetic("hmdb51", 40, feature_dim=32, multilabel_fraction=0.3, seed=8)
    for name in ("train", "query"):
        np.testing.assert_array_equal(a.splits[name].feats, b.splits[name].feats)
        np.testing.assert_array_equal(a.splits[name].labels, b.splits[name].labels)
        np.testing.assert_array_equal(a.splits[name].video_ids, b.splits[name].video_ids)
        assert not np.allclose(a.splits[name].feats, c.splits[name].feats)
    assert not np.array_equal(a.splits["train"].feats[:8], a.splits["query"].feats[:8])


@pytest.mark.parametrize(("like", "feature_dim"), [("activitynet", None), ("ucf101", 15)])
def test_block_size_independent(like: str, feature_dim: int | None) -> None:
    gen = SyntheticGenerator(like, 40, feature_dim=feature_dim, multilabel_fraction=0.2, seed=1)
    whole = gen.materialise(workers=2)
    for split in whole.stored_splits:
        ref = whole.splits[split]
        for block in (1, 7, gen.chunk_videos, 1000):
            parts = [b for _, b in gen.iter_blocks(split, block)]
            np.testing.assert_array_equal(np.concatenate([p.feats for p in parts]), ref.feats)
            np.testing.assert_array_equal(np.concatenate([p.labels for p in parts]), ref.labels)
            np.testing.assert_array_equal(np.concatenate([p.video_ids for p in parts]), ref.video_ids)
        stop = min(len(ref), 23)
        sub = gen.generate(split, 5, stop)
        np.testing.assert_array_equal(sub.feats, ref.feats[5:stop])
        np.testing.assert_array_equal(sub.frame_signal, ref.frame_signal[5:stop])


@functools.cache
def _reference_split() -> tuple[SyntheticGenerator, Split]:
    """A generator with 16-video chunks, so ranges cross chunk boundaries, and its whole train split."""
    gen = SyntheticGenerator("activitynet", 70, multilabel_fraction=0.5, seed=5)
    return gen, gen.generate("train")


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 70), st.integers(0, 70))
def test_any_range_matches_whole_split(a: int, b: int) -> None:
    gen, whole = _reference_split()
    assert gen.chunk_videos < 70
    start, stop = min(a, b), max(a, b)
    part = gen.generate("train", start, stop)
    np.testing.assert_array_equal(part.feats, whole.feats[start:stop])
    np.testing.assert_array_equal(part.labels, whole.labels[start:stop])
    np.testing.assert_array_equal(part.video_ids, whole.video_ids[start:stop])


def test_protocol_wiring() -> None:
    fcvid = make_synthetic("fcvid", 24, feature_dim=8)
    assert fcvid.splits["query"] is fcvid.splits["database"]
    assert fcvid.splits["train"] is not fcvid.splits["database"]
    assert fcvid.stored_splits == ("train", "database")
    for like in ("ucf101", "hmdb51"):
        ds = make_synthetic(like, 24, feature_dim=8)
        assert ds.splits["database"] is ds.splits["train"]
        assert ds.splits["query"] is not ds.splits["train"]
        assert ds.stored_splits == ("train", "query")
    act = make_synthetic("activitynet", 24, feature_dim=8)
    assert len({id(s) for s in act.splits.values()}) == 3
    assert act.stored_splits == ("train", "query", "database")


@pytest.mark.parametrize(("like", "videos", "num_classes"), [("fcvid", 239, 239), ("ucf101", 37, None)])
def test_every_class_in_train(like: str, videos: int, num_classes: int | None) -> None:
    ds = make_synthetic(like, videos, feature_dim=4, num_classes=num_classes)
    counts = ds.splits["train"].labels.sum(axis=0)
    assert (counts >= 1).all()
    assert counts.max() - counts.min() <= 1


def test_multilabel_fraction() -> None:
    ds = make_synthetic("ucf101", 2000, feature_dim=4, max_frames=4, num_classes=20, multilabel_fraction=0.3)
    per_row = ds.splits["train"].labels.sum(axis=1)
    assert set(np.unique(per_row)) == {1, 2}
    assert abs((per_row == 2).mean() - 0.3) < 0.04
    single = make_synthetic("ucf101", 200, feature_dim=4, max_frames=4, num_classes=20)
    assert (single.splits["train"].labels.sum(axis=1) == 1).all()


def test_map_helper_on_perfect_codes() -> None:
    labels = np.eye(4, dtype=np.uint8)[np.arange(12) % 4]
    codes = np.eye(4, dtype=bool)[np.arange(12) % 4]
    assert _map_at_k(codes, codes, labels, labels, k=3) == pytest.approx(1.0)


def test_difficulty_calibration() -> None:
    ds = make_synthetic("ucf101", 600, feature_dim=128, num_classes=20, seed=0)
    chance = 1 / 20
    score = np.mean([_random_projection_map5(ds, seed=s) for s in range(3)])
    assert 2 * chance < score < 0.7
    # Knowing which frames carry the class helps: room for a learned frame sampler.
    oracle = np.mean([_random_projection_map5(ds, seed=s, oracle=True) for s in range(3)])
    assert oracle > score + 0.03


def test_frames_carry_unequal_information() -> None:
    ds = make_synthetic("ucf101", 400, feature_dim=64, num_classes=20, seed=2)
    train = ds.splits["train"]
    assert train.frame_signal is not None
    centre = train.feats.mean(axis=(0, 1))
    frames = train.feats - centre
    cls = train.labels.argmax(axis=1)
    prototypes = np.stack([frames[cls == c].mean(axis=(0, 1)) for c in range(20)])
    prototypes /= np.linalg.norm(prototypes, axis=1, keepdims=True)
    cosine = (frames / np.linalg.norm(frames, axis=2, keepdims=True)) @ prototypes.T
    own = np.take_along_axis(cosine, cls[:, None, None], axis=2)[..., 0]
    evidence = own - cosine.mean(axis=2)
    # The true per-frame signal weight varies within videos ...
    assert train.frame_signal.std(axis=1).mean() > 0.1
    assert ((train.frame_signal < 0.3).any(axis=1) & (train.frame_signal > 0.7).any(axis=1)).mean() > 0.3
    # ... and so does the class evidence visible in the features, following it.
    assert evidence.std(axis=1).mean() > 0.2 * abs(evidence.mean())
    assert np.corrcoef(evidence.ravel(), train.frame_signal.ravel())[0, 1] > 0.3
    strong, weak = train.frame_signal > 0.7, train.frame_signal < 0.3
    assert evidence[strong].mean() > 2 * evidence[weak].mean()


def test_exact_frame_roles_show_the_class_in_one_run_and_distractors_elsewhere() -> None:
    gen = SyntheticGenerator("ucf101", 300, feature_dim=32, num_classes=10, seed=4, informative_share=0.2,
                             distractor_share=0.4)
    split = gen.generate("train")
    signal = split.frame_signal
    assert set(np.unique(signal)) == {0.0, 1.0} and (signal.sum(1) == 5).all()
    starts = np.argmax(signal, axis=1)
    assert all(signal[i, s:s + 5].all() for i, s in enumerate(starts))  # one contiguous run
    assert len(set(starts.tolist())) > 10  # at random places
    again = SyntheticGenerator("ucf101", 300, feature_dim=32, num_classes=10, seed=4, informative_share=0.2,
                               distractor_share=0.4).generate("train", 40, 80)
    np.testing.assert_array_equal(again.feats, split.feats[40:80])  # block-independent, as the soft roles
    default = SyntheticGenerator("ucf101", 300, feature_dim=32, num_classes=10, seed=4).generate("train")
    assert not np.array_equal(default.feats, split.feats)
    with pytest.raises(ValueError, match="informative_share must be in"):
        SyntheticGenerator("ucf101", 30, informative_share=0.8, distractor_share=0.4)
    with pytest.raises(ValueError, match="distractor_share needs informative_share"):
        SyntheticGenerator("ucf101", 30, distractor_share=0.4)
