"""Bad input to a training run: every case fails with an error naming the key, split or file, before Ray starts.

Covered elsewhere and only referenced here: NaN/Inf and float16 overflow in ingested files
(``test_ingest.py::test_bad_input_is_refused_and_never_looks_complete[nan|inf|overflow]``,
``test_ingest.py::test_the_job_exits_with_2_on_bad_input``), ``model.nbits`` not a multiple of 8
(``test_config.py::test_bad_values_name_the_key[model.nbits=12]``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest
import torch
import zarr

import storage.synthetic as synthetic
from autossvh.config import Config, build_config
from cluster.preflight import (
    PreflightError,
    check_count,
    check_device,
    check_name,
    check_output_file,
    check_output_folder,
    check_resumed_run,
    check_run_name,
    check_store_shape,
    check_tracking_uri,
    check_training_inputs,
    requested_data_shape,
)
from storage.reader import EvalReader, TrainReader
from storage.store import (
    IncompleteStoreError,
    MissingChunkError,
    PathError,
    StoreError,
    bad_label_rows,
    check_apart,
    check_replaceable,
    duplicate_ids,
    not_a_regular_file,
    open_store,
    verify_shards,
)
from storage.synthetic_store import write_synthetic
from storage.validation import validation_holdout
from storage.writer import SourceError

ROOT = Path(__file__).resolve().parents[1]
TRAIN_VIDEOS = 104  # ucf101-like: train 104 (also the database: at least K = 100), query 41
QUERY_VIDEOS = 41
SHAPE = ["data.feature_size=16", "data.max_frames=8", "model.encoder_depth=1", "train.batch_size=8",
         "cluster.num_cluster=[3, 5]", "cluster.warmup_epoch=0", "train.num_epochs=2"]


def _write(url: Path, like: str) -> None:
    write_synthetic(str(url), like, TRAIN_VIDEOS, feature_dim=16, max_frames=8, num_classes=8, seed=1,
                    chunk_videos=4, shard_videos=8)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pristine")
    for like in ("ucf101", "fcvid"):
        _write(root / like, like)
    return {"ucf101": root / "ucf101", "fcvid": root / "fcvid"}


@pytest.fixture
def store_path(tmp_path: Path, pristine: dict[str, Path]) -> Path:
    """A fresh copy of the ucf101-like store (13 train shard files of 8 videos, 2 chunks each) to tamper with."""
    path = tmp_path / "store"
    shutil.copytree(pristine["ucf101"], path)
    return path


def config(*overrides: str) -> Config:
    return build_config("ucf101", overrides=[*SHAPE, *overrides])


def set_attrs(path: Path, **changes: Any) -> None:
    group = zarr.open_group(str(path), mode="r+")
    group.attrs["autossvh"] = {**dict(group.attrs["autossvh"]), **changes}


def preflight(path: Path, *overrides: str, world_size: int = 2) -> None:
    check_training_inputs(config(*overrides), open_store(str(path)), world_size)


def test_a_pristine_store_passes(store_path: Path) -> None:
    preflight(store_path)


# ----- frames / features of the store against the config --------------------------------------------------------


def _args(*overrides: str, config_file: Path | None = None) -> argparse.Namespace:
    return argparse.Namespace(config=config_file, overrides=list(overrides))


def test_explicit_feature_size_or_frames_differing_from_the_store_are_refused(store_path: Path,
                                                                             tmp_path: Path) -> None:
    info = open_store(str(store_path)).info
    with pytest.raises(PreflightError) as err:
        check_store_shape(requested_data_shape(_args("data.feature_size=512")), info, str(store_path))
    assert "data.feature_size=512 from the config" in str(err.value) and "F=16" in str(err.value)
    assert str(store_path) in str(err.value)
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("data:\n  max_frames: 25\n")
    with pytest.raises(PreflightError, match=r"data.max_frames=25 from the config.*T=8 frames"):
        check_store_shape(requested_data_shape(_args(config_file=yaml_file)), info, str(store_path))
    # Not set, or set to the store's values: the store's values are used.
    check_store_shape(requested_data_shape(_args("train.lr=1e-3")), info, str(store_path))
    check_store_shape(requested_data_shape(_args("data.feature_size=16", "data.max_frames=8")), info,
                      str(store_path))
    # The final config is compared too (a --set applied after the store's values).
    with pytest.raises(PreflightError, match="data.feature_size=32"):
        preflight(store_path, "data.feature_size=32")


# ----- empty splits, array shapes ---------------------------------------------------------------------------------


def test_an_empty_split_is_refused(store_path: Path) -> None:
    set_attrs(store_path, counts={"train": TRAIN_VIDEOS, "query": 0})
    with pytest.raises(StoreError, match="split 'query' is empty"):
        open_store(str(store_path))


def test_a_split_whose_arrays_hold_no_videos_is_refused(store_path: Path) -> None:
    zarr.open_array(str(store_path / "query" / "feats"), mode="r+").resize((0, 8, 16))
    with pytest.raises(StoreError, match=r"split 'query': feats has shape \(0, 8, 16\), expected \(41, 8, 16\)"):
        preflight(store_path)


@pytest.mark.parametrize(("array", "shape", "fragment"), [
    ("labels", (40, 8), r"split 'query': labels has shape \(40, 8\), expected \(41, 8\)"),
    ("video_ids", (42,), r"split 'query': video_ids has shape \(42,\), expected \(41,\)"),
    ("feats", (40, 8, 16), r"split 'query': feats has shape \(40, 8, 16\), expected \(41, 8, 16\)"),
])
def test_row_counts_that_disagree_are_refused(store_path: Path, array: str, shape: tuple[int, ...],
                                              fragment: str) -> None:
    zarr.open_array(str(store_path / "query" / array), mode="r+").resize(shape)
    with pytest.raises(StoreError, match=fragment):
        preflight(store_path)
    with pytest.raises(StoreError, match=fragment):
        EvalReader(str(store_path), "query").__iter__().__next__()


# ----- labels evaluation needs ------------------------------------------------------------------------------------


def test_eval_labels_missing_or_empty_are_refused(store_path: Path) -> None:
    labels = zarr.open_array(str(store_path / "query" / "labels"), mode="r+")
    labels[3] = 0
    labels[11] = 0
    with pytest.raises(StoreError) as err:
        preflight(store_path)
    message = str(err.value)
    assert f"2 of {QUERY_VIDEOS} videos of the query split have no label" in message
    assert "video 3, id 'query_000003'" in message and str(store_path) in message
    shutil.rmtree(store_path / "query" / "labels")
    with pytest.raises(StoreError, match="split 'query' lacks query/labels"):
        preflight(store_path)


def test_an_unlabelled_train_split_is_refused_only_where_it_is_the_database(store_path: Path,
                                                                            pristine: dict[str, Path],
                                                                            tmp_path: Path) -> None:
    info = open_store(str(store_path)).info
    unlabelled = {**info.sources, "labelled": {"train": False, "query": True}, "train_labelled": False}
    set_attrs(store_path, sources=unlabelled)
    with pytest.raises(StoreError, match=r"the database split \('train'\) was stored without labels"):
        preflight(store_path)
    fcvid = tmp_path / "fcvid"  # query_is_database: the train split is never evaluated
    shutil.copytree(pristine["fcvid"], fcvid)
    shutil.rmtree(fcvid / "train" / "labels" / "c")  # zeros, as an unlabelled ingest stores them
    info = open_store(str(fcvid)).info
    set_attrs(fcvid, sources={**info.sources, "labelled": {"train": False, "database": True},
                              "train_labelled": False})
    check_training_inputs(build_config("fcvid", overrides=SHAPE), open_store(str(fcvid)), 2)


def test_held_out_videos_need_a_labelled_train_split_and_more_than_one_label(store_path: Path) -> None:
    check_training_inputs(config(), open_store(str(store_path)), 2, val_videos=8)
    held = validation_holdout(TRAIN_VIDEOS, 4, 8).rows
    labels = zarr.open_array(str(store_path / "train" / "labels"), mode="r+")
    labels[held] = np.eye(labels.shape[1], dtype=labels.dtype)[np.zeros(len(held), int)]
    with pytest.raises(PreflightError, match="--val-videos 8: the held-out videos .* all have the same labels"):
        check_training_inputs(config(), open_store(str(store_path)), 2, val_videos=8)
    check_training_inputs(config(), open_store(str(store_path)), 2, val_videos=12)  # other chunks, other labels
    info = open_store(str(store_path)).info
    set_attrs(store_path, sources={**info.sources, "labelled": {"train": False, "query": True}})
    with pytest.raises(PreflightError, match="--val-videos 8: the train split .* was stored without labels"):
        check_training_inputs(config(), open_store(str(store_path)), 2, val_videos=8)


# ----- config against the size of the train split ----------------------------------------------------------------


def test_a_batch_larger_than_the_train_split_is_refused(store_path: Path) -> None:
    with pytest.raises(PreflightError) as err:
        preflight(store_path, "train.batch_size=128", world_size=2)
    message = str(err.value)
    assert "train.batch_size=128" in message and f"has {TRAIN_VIDEOS} videos" in message
    assert "2 worker(s)" in message and f"use train.batch_size <= {TRAIN_VIDEOS}" in message
    preflight(store_path, f"train.batch_size={TRAIN_VIDEOS}", world_size=2)  # half per worker: one step per epoch
    with pytest.raises(PreflightError, match="128 worker"):
        preflight(store_path, "train.batch_size=256", world_size=128)  # more workers than videos


def test_more_clusters_than_train_videos_are_refused(store_path: Path) -> None:
    with pytest.raises(PreflightError) as err:
        preflight(store_path, "cluster.num_cluster=[8, 150]")
    assert "cluster.num_cluster=[8, 150]" in str(err.value) and f"has {TRAIN_VIDEOS} videos" in str(err.value)
    preflight(store_path, "cluster.num_cluster=[8, 150]", "loss.p2set=false")  # no clustering
    preflight(store_path, "cluster.num_cluster=[8, 150]", "cluster.warmup_epoch=2")  # never reached in 2 epochs


# ----- NaN / Inf features -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_the_synthetic_writer_refuses_non_finite_features(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          bad: float) -> None:
    real = synthetic.SyntheticGenerator.generate

    def poisoned(self: synthetic.SyntheticGenerator, split: str, start: int = 0, stop: int | None = None) -> Any:
        out = real(self, split, start, stop)
        if split == "train" and start <= 13 < (stop or TRAIN_VIDEOS):
            out.feats[13 - start, 2, 5] = bad
        return out

    monkeypatch.setattr(synthetic.SyntheticGenerator, "generate", poisoned)
    url = tmp_path / "store"
    with pytest.raises(SourceError, match=r"video 13 \(split 'train'\) has NaN or Inf features.*left incomplete"):
        _write(url, "ucf101")
    with pytest.raises(IncompleteStoreError):
        open_store(str(url))


# ----- missing or truncated shard files ---------------------------------------------------------------------------


SHARD = Path("train", "feats", "c", "2", "0", "0")  # videos 16:24


def test_a_missing_shard_file_is_refused_instead_of_read_as_zeros(store_path: Path) -> None:
    (store_path / SHARD).unlink()
    store = open_store(str(store_path))
    with pytest.raises(MissingChunkError, match="the file train/feats/c/2/0/0 is missing"):  # not zeros, as zarr
        store.split("train").feats[16:24]
    with pytest.raises(StoreError) as err:
        preflight(store_path)
    message = str(err.value)
    assert str(store_path) in message and "split 'train'" in message
    assert "1 of 39 chunk/shard files" in message and "feats/c/2/0/0 (missing)" in message


def test_empty_or_missing_files_of_every_array_are_named(store_path: Path) -> None:
    (store_path / SHARD).write_bytes(b"")
    (store_path / "train" / "video_ids" / "c" / "4").unlink()
    (store_path / "query" / "labels" / "c" / "1" / "0").unlink()
    store = open_store(str(store_path))
    with pytest.raises(StoreError, match=r"feats/c/2/0/0 \(0 bytes, expected at least 32\).*video_ids/c/4 \(missing"):
        verify_shards(store, "train")
    with pytest.raises(StoreError, match=r"split 'train' \(read as 'database'\)"):
        verify_shards(store, "database")
    with pytest.raises(StoreError, match=r"split 'query'.*labels/c/1/0 \(missing\)"):
        verify_shards(store, "query")


def test_a_missing_shard_on_an_fsspec_url_is_refused() -> None:
    url = f"memory://bad-input-{os.getpid()}"
    store = write_synthetic(url, "ucf101", TRAIN_VIDEOS, feature_dim=16, max_frames=8, num_classes=8, seed=1,
                            chunk_videos=4, shard_videos=8)
    verify_shards(store, "train")
    fs = fsspec.filesystem("memory")
    root = url.removeprefix("memory:/")
    try:
        fs.rm(f"{root}/train/feats/c/3/0/0")
        with pytest.raises(StoreError, match=r"feats/c/3/0/0 \(missing\)"):
            verify_shards(open_store(url), "train")
    finally:
        fs.rm(root, recursive=True)


def test_a_truncated_shard_file_fails_its_read_naming_store_split_and_file(store_path: Path) -> None:
    size = (store_path / SHARD).stat().st_size
    os.truncate(store_path / SHARD, size // 2)
    store = open_store(str(store_path))
    with pytest.raises(StoreError, match=r"feats/c/2/0/0 \(shard index checksum mismatch"):
        verify_shards(store, "train")  # the index at the end of the file no longer matches its checksum
    fragments = [str(store_path), "split 'train'", "the file train/feats/c/2/0/0", "damaged or truncated"]
    with pytest.raises(StoreError) as err:
        list(EvalReader(str(store_path), "train", batch_size=8))
    assert all(f in str(err.value) for f in fragments) and "videos 16:20" in str(err.value)  # its first chunk
    reader = TrainReader(str(store_path), "train", batch_size=8, world_size=1, seed=0)
    with pytest.raises(StoreError) as err:
        list(reader)
    assert all(f in str(err.value) for f in fragments)
    with pytest.raises(StoreError, match="videos 16:20: the file train/feats/c/2/0/0 is damaged"):
        store.load("train")
    os.truncate(store_path / SHARD, 10)  # shorter than its own index: the listing finds it
    with pytest.raises(StoreError, match=r"feats/c/2/0/0 \(10 bytes"):
        preflight(store_path)


def test_a_truncated_labels_file_is_named(store_path: Path) -> None:
    os.truncate(store_path / "query" / "labels" / "c" / "1" / "0", 5)
    with pytest.raises(StoreError, match=r"split 'query': cannot read labels.*query/labels/c/1/0"):
        preflight(store_path)


# ----- incomplete ingest ------------------------------------------------------------------------------------------


def test_an_incomplete_store_is_refused(store_path: Path) -> None:
    set_attrs(store_path, complete=False)
    with pytest.raises(IncompleteStoreError, match="incomplete.*re-run the same ingest command"):
        open_store(str(store_path))


# ----- the job: exit status 2, the message, nothing started -------------------------------------------------------


def run_job(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    tic = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "train_ucf101.py"), "--storage", str(tmp_path / "ray"),
         "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--mlflow-artifacts", str(tmp_path / "mlartifacts"),
         "--summary-json", str(tmp_path / "summary.json"), *args],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    return proc, time.perf_counter() - tic


def assert_refused(tmp_path: Path, proc: subprocess.CompletedProcess, seconds: float, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in proc.stderr
    assert "Ray" not in proc.stderr  # refused before Ray starts
    for output in ("ray", "mlflow.db", "mlartifacts", "summary.json"):
        assert not (tmp_path / output).exists()


def test_the_job_refuses_an_incomplete_store(store_path: Path, tmp_path: Path) -> None:
    set_attrs(store_path, complete=False)
    proc, seconds = run_job(tmp_path, "--data", str(store_path))
    assert_refused(tmp_path, proc, seconds, f"{store_path}: the store is incomplete")


def test_the_job_refuses_bits_not_a_multiple_of_8(store_path: Path, tmp_path: Path) -> None:
    proc, seconds = run_job(tmp_path, "--data", str(store_path), "--bits", "12")
    assert_refused(tmp_path, proc, seconds, "model.nbits: 12", "multiple of 8")


@pytest.mark.parametrize(("tamper", "args", "fragments"), [
    (None, ["--set", "data.feature_size=512"], ["data.feature_size=512 from the config", "F=16"]),
    (None, ["--set", "train.batch_size=512"], ["train.batch_size=512", f"{TRAIN_VIDEOS} videos"]),
    (None, ["--set", "cluster.num_cluster=[8, 150]", "--set", "cluster.warmup_epoch=0"], ["cluster.num_cluster"]),
    ("delete", [], ["split 'train'", "feats/c/2/0/0 (missing)"]),
    ("labels", [], ["videos of the query split have no label"]),
    (None, ["--mlflow-uri", "http://127.0.0.1:9"], ["MLflow tracking server http://127.0.0.1:9 is unreachable"]),
    (None, ["--selection", "best-val-map5"], ["--selection best-val-map5", "add --val-videos N"]),
    (None, ["--val-videos", "3"], ["--val-videos 3: hold out at least 6 videos"]),
    (None, ["--val-videos", str(TRAIN_VIDEOS), "--selection", "best-val-map5"],
     [f"--val-videos {TRAIN_VIDEOS}: the train split", f"has {TRAIN_VIDEOS} videos"]),
    (None, ["--val-videos", "100"], ["train.batch_size=8", "has 4 videos once --val-videos holds out 100"]),
], ids=["feature-size", "batch-size", "clusters", "missing-shard", "unlabelled-queries", "mlflow-unreachable",
        "val-selection-without-val-videos", "val-videos-too-few", "val-videos-all", "val-videos-leave-no-batch"])
def test_the_job_refuses_bad_input_before_ray(store_path: Path, tmp_path: Path, tamper: str | None,
                                              args: list[str], fragments: list[str]) -> None:
    if tamper == "delete":
        (store_path / SHARD).unlink()
    elif tamper == "labels":
        zarr.open_array(str(store_path / "query" / "labels"), mode="r+")[0] = 0
    fits = ["--set", "train.batch_size=8", "--set", "cluster.num_cluster=[3, 5]"]  # the store's size
    proc, seconds = run_job(tmp_path, "--data", str(store_path), "--workers", "2", *fits, *args)
    assert_refused(tmp_path, proc, seconds, *fragments)



# ----- inputs are read-only, only regular files are opened, labels and ids are checked (issue 22) -------------------
def test_an_output_over_inside_or_around_an_input_is_refused_in_any_spelling(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (tmp_path / "link").symlink_to(data)
    monkeypatch.chdir(tmp_path)
    for out, relation in ((str(data), "is"), (f"file://{data}", "is"), ("data/../data/", "is"),
                          (str(tmp_path / "link"), "is"), ("link/codes", "lies inside"), (str(tmp_path), "contains")):
        with pytest.raises(PathError, match=f"--out {out} {relation} --data data"):
            check_apart({"--out": out}, {"--data": "data"})
    with pytest.raises(PathError, match="lies inside --data s3://bucket/stores/x"):
        check_apart({"--out": "S3://bucket//stores/x/codes"}, {"--data": "s3://bucket/stores/x"})
    check_apart({"--out": "data-codes", "--json": None}, {"--data": "data", "--model": None})  # a sibling
    check_apart({"--out": "s3://bucket/data"}, {"--data": str(data)})  # another filesystem
    check_apart({"--out": str(tmp_path / "data2")}, {"--data": "data"})  # a name that only begins the same


def test_only_regular_files_count_as_files(tmp_path: Path) -> None:
    import socket

    (tmp_path / "file.npy").write_bytes(b"x")
    (tmp_path / "link.npy").symlink_to(tmp_path / "file.npy")
    (tmp_path / "folder.npy").mkdir()
    os.mkfifo(tmp_path / "fifo.npy")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(tmp_path / "socket.npy"))
        found = {name: not_a_regular_file(tmp_path / name) for name in
                 ("file.npy", "link.npy", "folder.npy", "fifo.npy", "socket.npy", "missing.npy")}
    assert found == {"file.npy": None, "link.npy": None, "folder.npy": "a folder, not a regular file",
                     "fifo.npy": "a FIFO (named pipe), not a regular file",
                     "socket.npy": "a socket, not a regular file", "missing.npy": "no such file"}
    assert not_a_regular_file("/dev/null") == "a character device, not a regular file"
    assert not_a_regular_file(f"file://{tmp_path}/fifo.npy") == "a FIFO (named pipe), not a regular file"
    fs = fsspec.filesystem("memory")
    fs.pipe("/hostile/a.npy", b"x")
    assert not_a_regular_file("memory:///hostile/a.npy") is None
    assert not_a_regular_file("memory:///hostile") == "a folder, not a regular file"


def test_overwrite_replaces_only_what_the_same_writer_wrote(tmp_path: Path, pristine: dict[str, Path],
                                                            caplog: pytest.LogCaptureFixture) -> None:
    check_replaceable(str(tmp_path / "nothing"), None, "autossvh_ingest")
    (tmp_path / "empty").mkdir()
    check_replaceable(str(tmp_path / "empty"), None, "autossvh_ingest")
    zarr.open_group(str(tmp_path / "aborted"), mode="w", zarr_format=3).create_group("train")
    check_replaceable(str(tmp_path / "aborted"), None, "autossvh_ingest")
    check_replaceable(str(pristine["ucf101"]), None, "autossvh_ingest")
    assert "removing a complete feature store ('ucf101': train 104, query 41 videos)" in caplog.text
    with pytest.raises(PathError, match="only a store written by jobs/encode.py, but a complete feature store"):
        check_replaceable(str(pristine["ucf101"]), None, "autossvh_codes")
    with pytest.raises(PathError, match="only a store written by jobs/extract.py"):
        check_replaceable(str(pristine["ucf101"]), None, "autossvh_extract")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    with pytest.raises(PathError, match="a folder of 1 entries that is not a store"):
        check_replaceable(str(tmp_path / "notes"), None, "autossvh_ingest")
    with pytest.raises(PathError, match="but a file is there"):
        check_replaceable(str(tmp_path / "notes" / "a.txt"), None, "autossvh_ingest")
    zarr.open_group(str(tmp_path / "foreign"), mode="w", zarr_format=3).attrs["mine"] = 1
    with pytest.raises(PathError, match="a Zarr group or array of another kind"):
        check_replaceable(str(tmp_path / "foreign"), None, "autossvh_ingest")


def test_label_values_and_repeated_ids_are_found_by_row() -> None:
    labels = np.array([[0, 1, 0], [255, 0, 0], [0, 0, 0], [7, 7, 7], [1, 1, 0]], np.uint8)
    assert bad_label_rows(labels).tolist() == [1, 3]
    assert duplicate_ids(np.array(["a", "b", "a", "c", "b", "a"])) == {"a": [0, 2, 5], "b": [1, 4]}
    assert duplicate_ids(np.array(["a", "b"], dtype=object)) == {}


def test_bad_labels_and_repeated_ids_are_refused_before_training(store_path: Path) -> None:
    zarr.open_array(str(store_path / "query" / "labels"), mode="r+")[3, 0] = 255
    with pytest.raises(StoreError, match=r"split 'query': 1 video\(s\) have label values other than 0 and 1 .*"
                                         r"3 \('query_000003'\) holds \[255\]"):
        preflight(store_path)
    zarr.open_array(str(store_path / "query" / "labels"), mode="r+")[3, 0] = 1
    ids = zarr.open_array(str(store_path / "train" / "video_ids"), mode="r+")
    ids[9] = ids[4]
    with pytest.raises(StoreError, match="split 'train': 1 video id.s. occur more than once: 'train_000004' at rows "
                                         "4, 9"):
        preflight(store_path)


@pytest.mark.parametrize(("file", "text", "fragment"), [
    ("zarr.json", '{"zarr_format": 3,', "zarr.json: not valid JSON"),
    ("zarr.json", "[1, 2]", "zarr.json: not Zarr v3 metadata (expected an object with zarr_format 3 and node_type "
                            "group or array, found a JSON list)"),
    ("train/zarr.json", '{"zarr_format": 2, "node_type": "group"}', "train/zarr.json: not Zarr v3 metadata"),
    ("query/feats/zarr.json", "\xff\xfe", "query/feats/zarr.json: not valid JSON"),
], ids=["truncated", "a-list", "zarr-v2", "not-utf8"])
def test_damaged_metadata_is_named_by_file(store_path: Path, file: str, text: str, fragment: str) -> None:
    (store_path / file).write_text(text, encoding="latin-1")
    with pytest.raises(StoreError, match=re.escape(f"{store_path}/{fragment}")):
        preflight(store_path)


def test_damaged_store_attributes_are_named(store_path: Path) -> None:
    set_attrs(store_path, max_frames="8")
    with pytest.raises(StoreError, match=f"{store_path}/zarr.json: attribute autossvh.max_frames is '8', expected "
                                         "an integer"):
        open_store(str(store_path))
    group = zarr.open_group(str(store_path), mode="r+")
    group.attrs["autossvh"] = "a string"
    with pytest.raises(StoreError, match="attribute autossvh is 'a string', expected an object"):
        open_store(str(store_path))


# ----- names, tracking URIs, destinations, devices and counts (issue 22, items 8 to 12) ---------------------------

@pytest.mark.parametrize(("value", "fragment"), [
    ("", "--name '': a run name is one folder name inside --storage: use 1 to 100 characters"),
    ("run\nlog", "--name 'run\\nlog'"),
    ("r" * 101, "--name 'rrrr"),
    ("../up", "--name '../up'"),
    (".hidden", "--name '.hidden'"),
    ("a/b", "--name 'a/b'"),
    ("café", "--name 'café'"),
])
def test_a_run_name_outside_the_documented_rule_is_refused(value: str, fragment: str) -> None:
    with pytest.raises(PreflightError, match=re.escape(fragment)):
        check_run_name(value)


def test_names_inside_the_rule_pass_and_experiments_may_hold_slashes() -> None:
    for name in ("ucf101-synthetic-64bits-paper", "run_2.b", "r" * 100):
        check_run_name(name)
    check_name("/Users/me/autossvh", "--experiment", "an MLflow experiment name", slashes=True)
    with pytest.raises(PreflightError, match="--register 'a/b': a registered model name"):
        check_name("a/b", "--register", "a registered model name")
    with pytest.raises(PreflightError, match=r"\(300 characters\)"):
        check_name("e" * 300, "--experiment", "an MLflow experiment name", slashes=True)


def test_tracking_uris_that_mlflow_cannot_use_are_refused(tmp_path: Path) -> None:
    import sqlite3

    (tmp_path / "notes.txt").write_text("not a database\n")
    (tmp_path / "empty.db").touch()
    sqlite3.connect(tmp_path / "real.db").execute("create table t (x)").connection.close()
    for uri in (f"sqlite:///{tmp_path}/new.db", f"sqlite:///{tmp_path}/empty.db", f"sqlite:///{tmp_path}/real.db",
                "sqlite:///runs/mlflow.db", "http://127.0.0.1:5000", "postgresql+psycopg2://u@h/db", "databricks",
                f"file://{tmp_path}"):
        check_tracking_uri(uri)
    refused = {f"sqlite:///{tmp_path}": f"{tmp_path} is a folder, not a SQLite file",
               f"sqlite:///{tmp_path}/notes.txt": "notes.txt is not a SQLite database",
               "sqlite://": "name the database file",
               "ftp://host/mlflow": "unknown scheme 'ftp'",
               "runs/mlflow.db": "not a URI",
               f"file://{tmp_path}/notes.txt": "is not a folder"}
    for uri, fragment in refused.items():
        with pytest.raises(PreflightError, match=re.escape(fragment)):
            check_tracking_uri(uri)
    assert (tmp_path / "notes.txt").read_text() == "not a database\n" and not (tmp_path / "new.db").exists()


def test_outputs_under_a_file_or_onto_a_folder_are_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(PreflightError, match=re.escape(f"--summary-json {tmp_path}/file/a/s.json: {tmp_path}/file "
                                                       "is a file, not a folder")):
        check_output_file(tmp_path / "file" / "a" / "s.json", "--summary-json")
    with pytest.raises(PreflightError, match="is a folder; name a file"):
        check_output_file(tmp_path, "--json")
    with pytest.raises(PreflightError, match=re.escape(f"--out {tmp_path}/file: is a file, not a folder")):
        check_output_folder(tmp_path / "file", "--out")
    with pytest.raises(PreflightError, match="cannot write in /proc"):
        check_output_folder("/proc/autossvh-eval", "--out")
    check_output_file(None, "--summary-json")
    check_output_folder("s3://bucket/eval", "--out")
    check_output_folder(tmp_path / "new" / "eval", "--out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_devices_and_counts_the_machine_cannot_give_are_refused() -> None:
    import torch

    check_device("cpu")
    missing = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(PreflightError, match=f"--device {missing}: "):
        check_device(missing)
    with pytest.raises(PreflightError, match="--device 'gpu0': not a torch device"):
        check_device("gpu0")
    with pytest.raises(PreflightError, match="--device meta: not supported"):
        check_device("meta")
    check_count(0, "--workers", 0)
    check_count(None, "--num-cpus", 1)
    with pytest.raises(PreflightError, match="--workers -1: must be >= 0"):
        check_count(-1, "--workers", 0)
    with pytest.raises(PreflightError, match="--cpus-per-worker 0: must be > 0"):
        check_count(0.0, "--cpus-per-worker", 0, strict=True)


def test_resuming_needs_the_recorded_mlflow_run_in_the_given_store(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    check_resumed_run(uri, run_id, "r", "runs/ray")
    with pytest.raises(PreflightError, match=f"run 'r' in runs/ray resumes MLflow run {'f' * 32}, which --mlflow-uri "
                                             f"{re.escape(uri)} does not hold"):
        check_resumed_run(uri, "f" * 32, "r", "runs/ray")
    other = f"sqlite:///{tmp_path}/other.db"
    with pytest.raises(PreflightError, match=r"does not hold; .* \(no such file\)"):
        check_resumed_run(other, run_id, "r", "runs/ray")
    assert not (tmp_path / "other.db").exists()


def test_resuming_needs_the_same_held_out_videos(tmp_path: Path) -> None:
    """A checkpoint that held out --val-videos 16 resumes with 16 only: with fewer, videos it trained on would be
    validated on."""
    from cluster.checkpoint import CHECKPOINT_FILE, CHECKPOINT_SNAPSHOT, check_resume_compatible

    cfg = config()
    folder = tmp_path / "ray" / "r" / "checkpoint_000000"
    folder.mkdir(parents=True)
    torch.save({"config": cfg.to_dict(), "mlflow_run_id": "f" * 32, "val_videos": 16}, folder / CHECKPOINT_FILE)
    (folder.parent / CHECKPOINT_SNAPSHOT).write_text(json.dumps(
        {"latest_checkpoint_result": {"checkpoint_dir_name": folder.name}}))
    assert check_resume_compatible(str(tmp_path / "ray"), "r", cfg, 16) == "f" * 32
    with pytest.raises(ValueError, match="holds out --val-videos 16 \\(now 0\\); resume it with --val-videos 16"):
        check_resume_compatible(str(tmp_path / "ray"), "r", cfg, 0)


def test_evaluation_results_appear_all_at_once_or_not_at_all(tmp_path: Path) -> None:
    from cluster.results import staged_folder

    out = tmp_path / "eval"
    with pytest.raises(RuntimeError, match="plot failed"), staged_folder(out) as stage:
        (stage / "map_table.json").write_text("{}")
        raise RuntimeError("plot failed")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a staged file
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with staged_folder(out) as stage:
        (stage / "map_table.json").write_text("{}")
        assert not (out / "map_table.json").exists()
    assert sorted(p.name for p in out.iterdir()) == ["map_table.json", "notes.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["eval"]
