"""Synthetic datasets written as feature stores: equal to make_synthetic, on any fsspec URL, resumable."""

import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

import storage.writer as writer
from storage.schema import SPLITS
from storage.store import IncompleteStoreError, open_store
from storage.synthetic import make_synthetic
from storage.synthetic_store import write_synthetic
from tests.conftest import bound_arguments

ROOT = Path(__file__).resolve().parents[1]
KW = {"feature_dim": 16, "num_classes": 6, "multilabel_fraction": 0.3, "seed": 5}


def assert_equals_make_synthetic(store, like: str, videos: int, dtype: str) -> None:
    expected = make_synthetic(like, videos, **KW)
    assert store.info.protocol == expected.protocol
    for name in SPLITS:
        split, arrays = expected.splits[name], store.split(name)
        np.testing.assert_array_equal(arrays.feats[:], split.feats.astype(dtype))
        np.testing.assert_array_equal(arrays.labels[:], split.labels)
        assert list(arrays.video_ids[:]) == list(split.video_ids)
        np.testing.assert_array_equal(store.frame_signal(name, 10), split.frame_signal[:10].astype(np.float16))


@pytest.mark.parametrize("like", ["fcvid", "activitynet", "ucf101"])
def test_store_equals_make_synthetic_rounded_to_float16(tmp_path, like):
    store = write_synthetic(str(tmp_path / "s"), like, 200, **KW, chunk_videos=8, shard_videos=32)
    assert_equals_make_synthetic(store, like, 200, "float16")
    info = store.info
    assert info.complete and info.dataset == like and info.dtype == "float16"
    assert info.sources["kind"] == "synthetic" and info.sources["train_labelled"] is True
    assert info.sources["generator"] == {"like": like, "videos": 200, "feature_dim": 16,
                                         "max_frames": 30 if like == "activitynet" else 25, "num_classes": 6,
                                         "multilabel_fraction": 0.3, "seed": 5}


def test_memory_url_float32_exact():
    url = f"memory://synthetic-{uuid.uuid4().hex}"
    store = write_synthetic(url, "hmdb51", 120, **KW, dtype="float32")
    assert_equals_make_synthetic(open_store(url), "hmdb51", 120, "float32")
    assert store.info.counts == {"train": 120, "query": 51}


def test_interrupted_write_resumes_without_rewriting(tmp_path, monkeypatch):
    url = str(tmp_path / "s")
    real_record = writer._record_block

    def failing(*args, **kwargs):
        real_record(*args, **kwargs)
        if sum(len(v) for v in bound_arguments(real_record, args, kwargs)["state"]["done"].values()) == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(writer, "_record_block", failing)
    with pytest.raises(KeyboardInterrupt):
        write_synthetic(url, "ucf101", 200, **KW, chunk_videos=8, shard_videos=32)
    with pytest.raises(IncompleteStoreError):
        open_store(url)
    monkeypatch.setattr(writer, "_record_block", real_record)
    writes = []
    real_write = writer._write_block

    def spy(*args, **kwargs):
        writes.append(bound_arguments(real_write, args, kwargs)["start"])
        return real_write(*args, **kwargs)

    monkeypatch.setattr(writer, "_write_block", spy)
    store = write_synthetic(url, "ucf101", 200, **KW, chunk_videos=8, shard_videos=32)
    assert len(writes) == (7 + 3) - 5  # train 200 and query 79 videos in blocks of 32
    assert_equals_make_synthetic(store, "ucf101", 200, "float16")


def test_the_job_writes_a_store_and_refuses_bad_arguments(tmp_path):
    def job(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "jobs/make_synthetic.py", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)

    out = str(tmp_path / "s")
    proc = job("--like", "fcvid", "--videos", "64", "--feature-dim", "8", "--classes", "4", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "complete" in proc.stderr and "database" in proc.stderr
    store = open_store(out)
    assert store.info.feature_dim == 8 and store.info.num_classes == 4 and store.info.protocol == "query_is_database"
    proc = job("--like", "fcvid", "--videos", "3", "--classes", "4", "--out", str(tmp_path / "t"))
    assert proc.returncode == 2 and "at least one train video per class" in proc.stderr


def test_frames_that_matter_are_recorded_and_their_knob_is_in_the_generator(tmp_path):
    store = write_synthetic(str(tmp_path / "s"), "ucf101", 120, feature_dim=16, num_classes=6, seed=1,
                            informative_share=0.2, distractor_share=0.4)
    signal = store.frame_signal("train", 120)
    assert signal.shape == (120, 25) and (signal.sum(1) == 5).all()  # round(0.2 * 25) frames show the class
    assert store.info.sources["generator"]["informative_share"] == 0.2
    assert store.info.sources["generator"]["distractor_share"] == 0.4
