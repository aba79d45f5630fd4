"""Video files to a feature store: the frame rule, decoding, backbones, and jobs/extract.py through real Ray Data
(tiny mp4 files written here with PyAV, a randomly initialised ViT at 16 x 16 pixels), then training on the store
and searching it with a new video."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from storage.backbones import BackboneError, ExtractorSettings, FrameEncoder, encode_frames, resolve_weights
from storage.extraction import LabelFile, decode_one, list_videos
from storage.store import open_store
from storage.video import VideoError, decode_video, sample_indices, write_synthetic_video
from storage.writer import SourceError
from tests.conftest import ROOT, TINY
from tests.test_search import registered_code_store

EXTRACT = ["--backbone", "vit_b_16", "--random-weights", "--image-size", "16", "--frames", "8",
           "--shard-videos", "8", "--chunk-videos", "4", "--batch-size", "8"]
TRAIN_VIDEOS, QUERY_VIDEOS, CLASSES = 104, 10, 8


def test_frame_rule_takes_the_centres_of_equal_segments_and_repeats_short_videos(tmp_path):
    assert sample_indices(30, 8).tolist() == [1, 5, 9, 13, 16, 20, 24, 28]
    assert sample_indices(5, 8).tolist() == [0, 0, 1, 2, 2, 3, 4, 4]
    assert sample_indices(25, 25).tolist() == list(range(25))
    path = str(tmp_path / "v.mp4")
    write_synthetic_video(path, 30, fps=10)  # 3 s
    video = decode_video(path, 8, 56, 48)
    expected_times = np.floor((np.arange(8) + 0.5) * 3.0 / 8 * 10) / 10  # the frame shown at (i + 0.5) * D / T
    assert video.source_frames == 30 and video.frames.shape == (8, 48, 48, 3) and video.frames.dtype == np.uint8
    np.testing.assert_allclose(video.times, expected_times, atol=1e-6)


@pytest.mark.parametrize("gop", [1, 4, 250])
def test_seeking_decodes_the_same_frames_as_decoding_every_frame(tmp_path, gop):
    path = str(tmp_path / "v.mp4")
    write_synthetic_video(path, 37, fps=12, width=80, height=60, gop=gop, seed=gop)
    every = decode_video(path, 37, 60, 60)  # T = n: every frame, in order
    assert every.indices.tolist() == list(range(37)) and len(np.unique(every.frames.reshape(37, -1), axis=0)) == 37
    for frames in (5, 25, 60):
        video = decode_video(path, frames, 60, 60)
        np.testing.assert_array_equal(video.frames, every.frames[sample_indices(37, frames)])


def test_unreadable_videos_raise_an_error_naming_the_file(tmp_path):
    good = tmp_path / "good.mp4"
    write_synthetic_video(str(good), 40)
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
    (tmp_path / "truncated.mp4").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    for name in ("empty.mp4", "corrupt.mp4", "truncated.mp4"):
        with pytest.raises(VideoError, match=str(tmp_path / name)):
            decode_video(str(tmp_path / name), 8, 56, 48)


def test_a_video_that_is_no_regular_file_or_never_ends_is_refused_by_name(tmp_path):
    settings = ExtractorSettings("vit_b_16", 4, random_seed=0, image_size=16)
    os.mkfifo(tmp_path / "clip.mp4")
    (tmp_path / "dir.mp4").mkdir()
    for name, problem in (("clip.mp4", "a FIFO (named pipe)"), ("dir.mp4", "a folder")):
        with pytest.raises(VideoError, match=f"{tmp_path / name}: {re.escape(problem)}, not a regular file"):
            decode_one(str(tmp_path / name), settings)
    # Through fsspec's local:// the FIFO is opened (as a remote file would be) and blocks: the timeout names it.
    stalled = f"local://{tmp_path / 'clip.mp4'}"
    with pytest.raises(VideoError, match=f"{stalled}: decoding did not finish within 0.5 s"):
        decode_one(stalled, settings, timeout=0.5)
    os.close(os.open(tmp_path / "clip.mp4", os.O_WRONLY | os.O_NONBLOCK))  # lets the abandoned open return


def test_backbones_weights_and_their_errors(tmp_path, monkeypatch):
    frames = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    for name, dim in [("vgg16-fc7", 4096), ("resnet50", 2048), ("vit_b_16", 768)]:
        encoder = FrameEncoder(ExtractorSettings(name, random_seed=1, image_size=32))
        feats = encode_frames(encoder, frames, torch.device("cpu"), 2)
        assert feats.shape == (3, dim) and feats.dtype == np.float32 and np.isfinite(feats).all()
        if name == "vgg16-fc7":
            assert (feats >= 0).all()  # fc7 after its ReLU
    # --weights: a state dict of the torchvision model gives the same features as the model it was saved from
    from storage.backbones import torchvision_module

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        full = torchvision_module().models.vit_b_16(weights=None, image_size=224)
    torch.save(full.state_dict(), tmp_path / "vit.pt")
    big = np.random.default_rng(1).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    from_file = encode_frames(FrameEncoder(ExtractorSettings("vit_b_16", weights=str(tmp_path / "vit.pt"))), big,
                              torch.device("cpu"), 2)
    seeded = encode_frames(FrameEncoder(ExtractorSettings("vit_b_16", random_seed=7)), big, torch.device("cpu"), 2)
    np.testing.assert_array_equal(from_file, seeded)
    torch.save(full, tmp_path / "pickled.pt")  # a whole pickled module, not a state dict: refused by weights_only
    with pytest.raises(BackboneError, match="cannot load it as a state dict"):
        FrameEncoder(ExtractorSettings("vit_b_16", weights=str(tmp_path / "pickled.pt")))
    with pytest.raises(BackboneError, match="no such file"):
        resolve_weights(ExtractorSettings("resnet50", weights=str(tmp_path / "missing.pt")))
    with pytest.raises(BackboneError, match="random-weights only"):
        ExtractorSettings("resnet50", image_size=32).check()

    def unreachable(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", unreachable)
    expected = tmp_path / "torch-home" / "hub" / "checkpoints" / "vgg16-397923af.pth"
    with pytest.raises(BackboneError, match=f"put it at {expected}, or pass it with --weights"):
        resolve_weights(ExtractorSettings())


def test_labels_csv_maps_relative_and_listed_paths_and_refuses_missing_rows(tmp_path):
    for name in ("a.mp4", "sub/b.mp4", "c.mp4"):
        (tmp_path / "v" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "v" / name).write_bytes(b"x")
    listing = list_videos(str(tmp_path / "v"))
    assert listing.ids == [str(tmp_path / "v" / n) for n in ("a.mp4", "c.mp4", "sub/b.mp4")]
    (tmp_path / "labels.csv").write_text(f"path,classes\na.mp4,run\nsub/b.mp4,jump;run\n{tmp_path}/v/c.mp4,sit\n")
    labels = LabelFile.read(str(tmp_path / "labels.csv"))
    assert labels.classes == ["jump", "run", "sit"]
    assert labels.multi_hot(listing).tolist() == [[0, 1, 0], [0, 0, 1], [1, 1, 0]]
    (tmp_path / "partial.csv").write_text("path,classes\na.mp4,run\n")
    with pytest.raises(SourceError, match="2 listed video"):
        LabelFile.read(str(tmp_path / "partial.csv")).multi_hot(listing)
    assert list_videos(str(tmp_path / "v" / "*.mp4")).ids == listing.ids[:2]


def parse_extract(argv: list[str]) -> argparse.Namespace:
    from cluster.cli import job_parser
    from cluster.extract import add_arguments

    parser = job_parser(None)
    add_arguments(parser)
    return parser.parse_args(argv)


def extraction_state(store: Path) -> dict:
    try:
        return json.loads((store / "zarr.json").read_text())["attributes"].get("autossvh_extract", {})
    except (FileNotFoundError, json.JSONDecodeError, KeyError):  # not created yet, or being rewritten
        return {}


@pytest.fixture(scope="module")
def extracted(ray_session, tmp_path_factory):
    """A store extracted from generated videos: train (104 videos of 6-14 frames, one of 3 frames, one corrupt and
    one empty file) killed after its first shards and resumed, then query (10 videos)."""
    from cluster.extract import run_extract

    root = tmp_path_factory.mktemp("extract")
    rng = np.random.default_rng(0)
    rows = ["path,classes"]
    for split, count in (("train", TRAIN_VIDEOS), ("query", QUERY_VIDEOS)):
        for i in range(count):
            name = f"{split}/{split}{i:03d}.mp4"
            (root / split).mkdir(exist_ok=True)
            write_synthetic_video(str(root / name), int(rng.integers(6, 15)), fps=10, seed=i + 1000 * len(split))
            rows.append(f"{name.split('/', 1)[1]},class{i % CLASSES}")
    write_synthetic_video(str(root / "train" / "short.mp4"), 3, fps=10)
    (root / "train" / "empty.mp4").write_bytes(b"")
    (root / "train" / "corrupt.mp4").write_bytes(rng.bytes(3000))
    rows += ["short.mp4,class0", "empty.mp4,class1", "corrupt.mp4,class2"]
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    store = root / "store"
    train = ["--videos", str(root / "train"), "--split", "train", "--labels", str(root / "labels.csv"),
             "--out", str(store), *EXTRACT]
    env = {**os.environ, "RAY_ADDRESS": ray_session, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "extract.py"), *train], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if extraction_state(store).get("splits", {}).get("train", {}).get("rows", 0) >= 8:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"the first run ended before it could be interrupted: {proc.stderr.read()[-3000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    interrupted = extraction_state(store)["splits"]["train"]
    resumed = run_extract(parse_extract([*train, "--summary-json", str(root / "train.json")]))
    query = run_extract(parse_extract(["--videos", str(root / "query"), "--split", "query", "--labels",
                                       str(root / "labels.csv"), "--out", str(store), *EXTRACT]))
    return {"root": root, "store": str(store), "interrupted": interrupted, "resumed": resumed, "query": query}


def test_extraction_resumes_lists_failures_and_writes_an_ordinary_store(extracted):
    root, interrupted, resumed = extracted["root"], extracted["interrupted"], extracted["resumed"]
    good = TRAIN_VIDEOS + 1  # and the short one
    assert not interrupted["finished"] and 8 <= interrupted["rows"] < good and interrupted["rows"] % 8 == 0
    # the re-run wrote only the rest: every written row once, nothing rewritten
    assert resumed.already == interrupted["rows"] + len(interrupted["failed"])
    assert resumed.written == good - interrupted["rows"]
    assert {f["path"] for f in interrupted["failed"] + resumed.failed} == {str(root / "train" / "corrupt.mp4"),
                                                                           str(root / "train" / "empty.mp4")}
    assert extracted["query"].complete and extracted["query"].written == QUERY_VIDEOS
    store = open_store(extracted["store"])
    info = store.info
    assert info.counts == {"train": good, "query": QUERY_VIDEOS} and info.protocol == "database_is_train"
    assert (info.max_frames, info.feature_dim, info.dtype, info.num_classes) == (8, 768, "float16", CLASSES)
    assert {f["path"] for f in info.sources["failed"]["train"]} == {str(root / "train" / n)
                                                                    for n in ("corrupt.mp4", "empty.mp4")}
    assert info.sources["failed"]["query"] == [] and info.sources["labelled"] == {"train": True, "query": True}
    assert info.sources["extraction"]["backbone"] == "vit_b_16" and "random" in info.sources["extraction"]["weights"]
    assert "floor((i + 0.5) * n / T)" in info.sources["frame_rule"]
    train = store.split("train")
    ids = np.asarray(train.video_ids[:]).tolist()
    listed = sorted(str(p) for p in (root / "train").glob("*.mp4") if p.name not in ("corrupt.mp4", "empty.mp4"))
    assert ids == listed  # listing order, failed videos without a row
    feats, labels = store.load("train")
    assert feats.shape == (good, 8, 768) and np.isfinite(feats).all() and (np.abs(feats).sum(axis=(1, 2)) > 0).all()
    assert labels.sum(axis=1).tolist() == [1] * good
    assert labels[ids.index(str(root / "train" / "short.mp4"))].argmax() == 0  # class0, the sorted class index
    frames = np.asarray(store.group["train"]["source_frames"][:])
    short = ids.index(str(root / "train" / "short.mp4"))
    assert frames[short] == 3 and (np.delete(frames, short) >= 6).all()
    again = subprocess.run([sys.executable, str(ROOT / "jobs" / "extract.py"), "--videos", str(root / "query"),
                            "--split", "query", "--labels", str(root / "labels.csv"), "--out", extracted["store"],
                            *EXTRACT], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "already extracted" in again.stderr, again.stderr[-2000:]
    other = subprocess.run([sys.executable, str(ROOT / "jobs" / "extract.py"), "--videos", str(root / "query"),
                            "--split", "query", "--labels", str(root / "labels.csv"), "--out", extracted["store"],
                            *EXTRACT[:-2], "--batch-size", "2", "--frames", "9"], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
    assert other.returncode == 2 and "extraction.frames" in other.stderr, other.stderr[-2000:]


def test_the_extracted_store_trains_through_the_ucf101_job(extracted, tmp_path):
    from cluster.train import add_arguments, run

    overrides = [o for o in TINY if not o.startswith(("data.feature_size", "data.max_frames"))]
    argv = ["--data", extracted["store"], "--epochs", "1", "--workers", "2", "--storage", str(tmp_path / "ray"),
            "--name", "extracted", "--mlflow-uri", f"sqlite:///{tmp_path}/mlflow.db", "--mlflow-artifacts",
            str(tmp_path / "art"), "--experiment", "tests", "--summary-json", str(tmp_path / "summary.json"),
            "--max-failures", "0"]
    for item in overrides:
        argv += ["--set", item]
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert run("ucf101", parser.parse_args(argv)) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["epochs_run"] == 1 and 0 <= summary["map_at_k"]["5"] <= 1


def test_a_new_video_searches_the_codes_of_the_extracted_videos(extracted, tmp_path):
    from autossvh.config import build_config
    from autossvh.model import AutoSSVH
    from storage.extraction import extract_videos, extraction_settings

    store = open_store(extracted["store"])
    feats = store.load("train")[0]
    ids = np.asarray(store.split("train").video_ids[:]).tolist()
    query = ids[5]
    settings, dtype = extraction_settings(extracted["store"])
    np.testing.assert_allclose(extract_videos([query], settings, dtype)[0], feats[5], rtol=1e-2, atol=1e-2)
    overrides = [o for o in TINY if not o.startswith(("data.feature_size", "data.max_frames"))]
    cfg = build_config("ucf101", "paper", overrides=[*overrides, "data.feature_size=768", "data.max_frames=8"])
    model = AutoSSVH(cfg).eval()
    tracking_uri, uri, url, _ = registered_code_store(tmp_path, model, feats, ids, "videos", extracted["store"],
                                                      "autossvh-extract-test")
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "search.py"), "--codes", url, "--video", query,
                           "--model", uri, "--mlflow-uri", tracking_uri, "--top-k", "5", "--json"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [result] = json.loads(proc.stdout)
    assert result["query"] == query
    assert {"video_id": query, "distance": 0} in [{k: h[k] for k in ("video_id", "distance")} for h in result["hits"]]
    bad = subprocess.run([sys.executable, str(ROOT / "jobs" / "search.py"), "--codes", url, "--video",
                          str(extracted["root"] / "train" / "corrupt.mp4"), "--model", uri, "--mlflow-uri",
                          tracking_uri], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "corrupt.mp4: cannot open it as a video" in bad.stderr, bad.stderr[-2000:]
