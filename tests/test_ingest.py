"""Ingest of the released file layouts and of custom files: equality with the source, resume after SIGKILL,
refusal of bad input, verification."""

import argparse
import hashlib
import logging
import os
import random
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
import zarr

import storage.writer as writer
from storage.ingest import ArraySpec, add_arguments, load_labels, main
from storage.schema import DATASET_PROTOCOLS, SPLITS, stored_split
from storage.store import IncompleteStoreError, StoreError, create_store, open_store
from storage.writer import storage_options_from
from tests.conftest import bound_arguments

ROOT = Path(__file__).resolve().parents[1]
FEATURE_DIM = 16
CLASSES = 5
SIZES = {"train": 150, "query": 40, "database": 70}
CHUNKING = ["--chunk-videos", "8", "--shard-videos", "32"]  # 32-video blocks: several per split

# The released names (REFERENCE.md §2.1): split -> (features file, labels file or None, labels key).
LAYOUTS = {
    "fcvid": {"train": ("fcv_train_feats.h5", None, None),
              "database": ("fcv_test_feats.h5", "fcv_test_labels.mat", "labels")},
    "activitynet": {"train": ("train_feats.h5", None, None),
                    "query": ("query_feats.h5", "q_label.mat", "q_label"),
                    "database": ("test_feats.h5", "re_label.mat", "re_label")},
    "ucf101": {"train": ("ucf_train_feats.h5", "ucf_train_labels.mat", "labels"),
               "query": ("ucf_test_feats.h5", "ucf_test_labels.mat", "labels")},
    "hmdb51": {"train": ("hmdb_train_feats.h5", "hmdb_train_labels.mat", "labels"),
               "query": ("hmdb_test_feats.h5", "hmdb_test_labels.mat", "labels")},
}
FRAMES = {"fcvid": 25, "activitynet": 30, "ucf101": 25, "hmdb51": 25}


def write_h5(path: Path, array: np.ndarray, key: str = "feats") -> None:
    with h5py.File(path, "w") as f:
        f.create_dataset(key, data=array)


def write_mat(path: Path, key: str, array: np.ndarray, version: str) -> None:
    """A MATLAB file as MATLAB writes it: v5 through scipy, v7.3 as HDF5 with a 512-byte MATLAB header and the
    matrix stored transposed (column-major)."""
    if version == "v5":
        scipy.io.savemat(path, {key: array})
        return
    with h5py.File(path, "w", userblock_size=512) as f:
        f.create_dataset(key, data=np.asarray(array, dtype=np.float64).T)
        f[key].attrs["MATLAB_class"] = np.bytes_("double")
    with open(path, "r+b") as f:
        f.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."
                .ljust(116) + bytes(8) + b"\x00\x02IM")


def random_labels(rng: np.random.Generator, n: int) -> np.ndarray:
    labels = np.zeros((n, CLASSES))
    labels[np.arange(n), rng.integers(0, CLASSES, n)] = 1
    labels[rng.random((n, CLASSES)) < 0.1] = 1
    return labels


def make_release(root: Path, dataset: str, mat: str = "v5", seed: int = 0) -> dict:
    """Tiny released-format files under their released names; returns {stored split: (feats, labels)}."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    data = {}
    for split, (feats_file, labels_file, key) in LAYOUTS[dataset].items():
        # Spread over several binades so float16 rounding is exercised.
        feats = (rng.random((SIZES[split], FRAMES[dataset], FEATURE_DIM), dtype=np.float32) * 8) ** 2
        write_h5(root / feats_file, feats)
        labels = None
        if labels_file is not None:
            labels = random_labels(rng, SIZES[split])
            write_mat(root / labels_file, key, labels, mat)
        data[split] = (feats, labels)
    return data


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def run_main(*argv: str) -> int:
    return main(parse(*argv))


def assert_store_equals(url: str, data: dict, dtype: str, protocol: str) -> None:
    store = open_store(url)
    for name in SPLITS:
        stored = stored_split(protocol, name)
        feats, labels = data[stored]
        arrays = store.split(name)
        assert arrays.stored_as == stored
        got = arrays.feats[:]
        assert got.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(got, feats.astype(dtype))
        expected = np.zeros((len(feats), CLASSES), np.uint8) if labels is None else labels.astype(np.uint8)
        np.testing.assert_array_equal(arrays.labels[:], expected)
        assert list(arrays.video_ids[:]) == [f"{stored}_{i:06d}" for i in range(len(feats))]


@pytest.mark.parametrize(("dataset", "dtype", "mat"), [
    ("fcvid", "float16", "v5"), ("fcvid", "float32", "v7.3"),
    ("activitynet", "float16", "v7.3"), ("activitynet", "float32", "v5"),
    ("ucf101", "float16", "v5"), ("ucf101", "float32", "v7.3"),
    ("hmdb51", "float16", "v7.3"), ("hmdb51", "float32", "v5"),
])
def test_released_layout_ingests_equal_to_the_source(tmp_path, dataset, dtype, mat):
    data = make_release(tmp_path / "src", dataset, mat)
    url = str(tmp_path / "store")
    assert run_main("--dataset", dataset, "--source", str(tmp_path / "src"), "--out", url, "--dtype", dtype,
                    *CHUNKING) == 0
    protocol = DATASET_PROTOCOLS[dataset]
    assert_store_equals(url, data, dtype, protocol)
    info = open_store(url).info
    assert (info.dataset, info.protocol, info.dtype, info.complete) == (dataset, protocol, dtype, True)
    assert (info.max_frames, info.feature_dim, info.num_classes) == (FRAMES[dataset], FEATURE_DIM, CLASSES)
    assert info.counts == {s: SIZES[s] for s in LAYOUTS[dataset]}
    sources = info.sources
    assert sources["kind"] == "released" and sources["dataset"] == dataset
    assert sources["train_labelled"] is (dataset in ("ucf101", "hmdb51"))
    assert sources["labelled"] == {s: f[1] is not None for s, f in LAYOUTS[dataset].items()}
    files = sorted(tmp_path.glob("src/*"))
    assert sorted(sources["checksums"]) == [str(p.resolve()) for p in files]
    for p in files:
        assert sources["checksums"][str(p.resolve())] == {
            "sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "size": p.stat().st_size}


def test_custom_files_with_keys_npy_and_both_mat_versions(tmp_path):
    rng = np.random.default_rng(1)
    train = rng.random((70, 7, FEATURE_DIM), dtype=np.float32)
    query = rng.random((20, 7, FEATURE_DIM), dtype=np.float32)
    database = rng.random((45, 7, FEATURE_DIM), dtype=np.float32)
    q_labels, db_labels = random_labels(rng, 20), random_labels(rng, 45)
    write_h5(tmp_path / "train.h5", train, key="group/x")
    np.save(tmp_path / "query.npy", query)
    write_h5(tmp_path / "db.h5", database)
    write_mat(tmp_path / "q.mat", "ql", q_labels, "v7.3")
    np.save(tmp_path / "db_labels.npy", db_labels.astype(np.uint8))
    url = str(tmp_path / "store")
    assert run_main("--dataset", "custom", "--protocol", "separate", "--train", f"{tmp_path}/train.h5:group/x",
                    "--query", f"{tmp_path}/query.npy", "--query-labels", f"{tmp_path}/q.mat:ql",
                    "--database", f"{tmp_path}/db.h5", "--database-labels", f"{tmp_path}/db_labels.npy",
                    "--out", url, "--dtype", "float32", *CHUNKING, "--block-videos", "40") == 0
    data = {"train": (train, None), "query": (query, q_labels), "database": (database, db_labels)}
    assert_store_equals(url, data, "float32", "separate")
    info = open_store(url).info
    assert (info.dataset, info.max_frames, info.sources["kind"], info.sources["train_labelled"]) == (
        "custom", 7, "custom", False)
    assert info.sources["splits"]["train"]["feats"]["key"] == "group/x"
    assert open_store(url).group.attrs[writer.STATE_ATTR]["block_videos"] == 64  # 40 rounded up to whole shards


def test_custom_needs_a_protocol_and_no_aliased_split(tmp_path, caplog):
    write_h5(tmp_path / "a.h5", np.ones((4, 3, 2), np.float32))
    np.save(tmp_path / "l.npy", np.eye(4, 2))
    assert run_main("--dataset", "custom", "--train", str(tmp_path / "a.h5"), "--out", str(tmp_path / "s")) == 2
    assert "needs a protocol" in caplog.text
    assert run_main("--dataset", "custom", "--protocol", "database_is_train", "--train", str(tmp_path / "a.h5"),
                    "--train-labels", str(tmp_path / "l.npy"), "--database", str(tmp_path / "a.h5"),
                    "--out", str(tmp_path / "s")) == 2
    assert "not stored twice" in caplog.text
    with pytest.raises(StoreError):
        open_store(str(tmp_path / "s"), require_complete=False)


def test_mat_v5_and_v73_give_the_same_labels(tmp_path):
    labels = random_labels(np.random.default_rng(2), 9)  # 9 x 5: a transposition would show
    write_mat(tmp_path / "a.mat", "labels", labels, "v5")
    write_mat(tmp_path / "b.mat", "labels", labels, "v7.3")
    for name in ("a.mat", "b.mat"):
        got = load_labels(ArraySpec(tmp_path / name, "labels"))
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, labels)


# Runs the real job in a child process that SIGKILLs itself right after the N-th call of a writer step:
# `_write_block` (the block's arrays are written but not yet recorded) or `_record_block` (recorded).
KILL_SCRIPT = """
import os, runpy, signal, sys
import storage.writer as w
step, n = sys.argv[1], int(sys.argv[2])
real, calls = getattr(w, step), []
def killing(*args, **kwargs):
    real(*args, **kwargs)
    calls.append(1)
    if len(calls) == n:
        os.kill(os.getpid(), signal.SIGKILL)
setattr(w, step, killing)
sys.argv = ["jobs/ingest.py", *sys.argv[3:]]
runpy.run_path("jobs/ingest.py", run_name="__main__")
"""


@pytest.mark.parametrize(("step", "seed"), [("_write_block", 0), ("_record_block", 1)])
def test_resume_after_sigkill_finishes_without_rewriting_finished_blocks(tmp_path, monkeypatch, step, seed):
    data = make_release(tmp_path / "src", "activitynet", seed=seed)
    url = str(tmp_path / "store")
    args = ["--dataset", "activitynet", "--source", str(tmp_path / "src"), "--out", url, *CHUNKING]
    total = sum(-(-SIZES[s] // 32) for s in LAYOUTS["activitynet"])  # 5 + 2 + 3 blocks
    kill_after = random.Random(seed).randint(1, total - 1)
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, step, str(kill_after), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    with pytest.raises(IncompleteStoreError, match="incomplete"):
        open_store(url)
    recorded = kill_after if step == "_record_block" else kill_after - 1

    writes = []
    real = writer._write_block
    monkeypatch.setattr(writer, "_write_block",
                        lambda *a, **k: (writes.append(bound_arguments(real, a, k)["split"].name), real(*a, **k)))
    assert run_main(*args) == 0
    assert len(writes) == total - recorded
    assert_store_equals(url, data, "float16", "separate")
    assert run_main(*args, "--verify") == 0
    assert len(writes) == total - recorded  # a complete store is not rewritten


def _nan(root: Path) -> None:
    with h5py.File(root / "ucf_train_feats.h5", "r+") as f:
        f["feats"][77, 3, 5] = np.nan


def _inf(root: Path) -> None:
    with h5py.File(root / "ucf_test_feats.h5", "r+") as f:
        f["feats"][33, 0, 0] = -np.inf


def _overflow(root: Path) -> None:
    with h5py.File(root / "ucf_train_feats.h5", "r+") as f:
        f["feats"][100, 1, 1] = 1e6


def _rank(root: Path) -> None:
    write_h5(root / "ucf_test_feats.h5", np.ones((40, 25 * FEATURE_DIM), np.float32))


def _frames(root: Path) -> None:
    write_h5(root / "ucf_test_feats.h5", np.ones((40, 24, FEATURE_DIM), np.float32))


def _dim(root: Path) -> None:
    write_h5(root / "ucf_test_feats.h5", np.ones((40, 25, FEATURE_DIM + 1), np.float32))


def _rows(root: Path) -> None:
    write_mat(root / "ucf_test_labels.mat", "labels", np.eye(39, CLASSES), "v5")


def _feats_key(root: Path) -> None:
    write_h5(root / "ucf_test_feats.h5", np.ones((40, 25, FEATURE_DIM), np.float32), key="features")


def _labels_key(root: Path) -> None:
    write_mat(root / "ucf_test_labels.mat", "label", np.eye(40, CLASSES), "v7.3")


def _missing(root: Path) -> None:
    (root / "ucf_test_labels.mat").unlink()


def _unreadable(root: Path) -> None:
    (root / "ucf_test_feats.h5").write_bytes(b"not an hdf5 file" * 10)


def _empty(root: Path) -> None:
    write_h5(root / "ucf_test_feats.h5", np.ones((0, 25, FEATURE_DIM), np.float32))
    write_mat(root / "ucf_test_labels.mat", "labels", np.zeros((0, CLASSES)), "v7.3")


def _not_2d(root: Path) -> None:
    with h5py.File(root / "ucf_test_labels.mat", "w") as f:
        f.create_dataset("labels", data=np.zeros((2, CLASSES, 40)))


def _not_binary(root: Path) -> None:
    labels = np.eye(40, CLASSES)
    labels[12, 3] = 2
    write_mat(root / "ucf_test_labels.mat", "labels", labels, "v5")


def _classes(root: Path) -> None:
    write_mat(root / "ucf_test_labels.mat", "labels", np.eye(40, CLASSES + 1), "v5")


# (mutation, expected fragments of the error, whether the store was created before the error)
BAD_INPUTS = [
    (_nan, ["ucf_train_feats.h5:feats", "video 77", "NaN or Inf", "incomplete"], True),
    (_inf, ["ucf_test_feats.h5:feats", "video 33", "NaN or Inf", "incomplete"], True),
    (_overflow, ["ucf_train_feats.h5:feats", "video 100", "float16 range", "--dtype float32"], True),
    (_rank, ["ucf_test_feats.h5:feats", "rank 2"], False),
    (_frames, ["ucf_test_feats.h5:feats", "24 frames", "has 25"], False),
    (_dim, ["ucf_test_feats.h5:feats", f"feature dim {FEATURE_DIM + 1}", "ucf_train_feats.h5:feats"], False),
    (_rows, ["ucf_test_labels.mat:labels", "39 label rows", "40 videos"], False),
    (_feats_key, ["ucf_test_feats.h5", "no dataset 'feats'", "features"], False),
    (_labels_key, ["ucf_test_labels.mat", "no variable 'labels'", "label"], False),
    (_missing, ["ucf_test_labels.mat", "no such file"], False),
    (_unreadable, ["ucf_test_feats.h5", "cannot read"], False),
    (_empty, ["ucf_test_feats.h5:feats", "empty split"], False),
    (_not_2d, ["ucf_test_labels.mat:labels", "2-D"], False),
    (_not_binary, ["ucf_test_labels.mat:labels", "0/1", "row 12", "holds 2"], False),
    (_classes, ["disagree on the number of classes", "ucf_test_labels.mat:labels has 6"], False),
]


@pytest.mark.parametrize(("mutate", "fragments", "created"), BAD_INPUTS, ids=[b[0].__name__[1:] for b in BAD_INPUTS])
def test_bad_input_is_refused_and_never_looks_complete(tmp_path, caplog, mutate, fragments, created):
    make_release(tmp_path / "src", "ucf101")
    mutate(tmp_path / "src")
    url = str(tmp_path / "store")
    with caplog.at_level(logging.ERROR):
        assert run_main("--dataset", "ucf101", "--source", str(tmp_path / "src"), "--out", url, *CHUNKING) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    for fragment in fragments:
        assert fragment in errors[0]
    with pytest.raises(IncompleteStoreError if created else StoreError):
        open_store(url)
    if not created:
        assert not Path(url).exists()  # validated before anything was written


def test_the_job_exits_with_2_on_bad_input(tmp_path):
    make_release(tmp_path / "src", "fcvid")
    _feats = tmp_path / "src" / "fcv_train_feats.h5"
    with h5py.File(_feats, "r+") as f:
        f["feats"][140, 0, 0] = np.nan
    proc = subprocess.run([sys.executable, "jobs/ingest.py", "--dataset", "fcvid", "--source", str(tmp_path / "src"),
                           "--out", str(tmp_path / "store"), *CHUNKING], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "fcv_train_feats.h5:feats: video 140" in proc.stderr and "left incomplete" in proc.stderr
    with pytest.raises(IncompleteStoreError):
        open_store(str(tmp_path / "store"))


def test_a_rerun_with_other_sources_or_arguments_is_refused(tmp_path, caplog):
    make_release(tmp_path / "src", "ucf101")
    _nan(tmp_path / "src")
    url = str(tmp_path / "store")
    args = ["--dataset", "ucf101", "--source", str(tmp_path / "src"), "--out", url, *CHUNKING]
    assert run_main(*args) == 2  # leaves an incomplete store
    data = make_release(tmp_path / "src", "ucf101", seed=3)  # fixed sources: new contents
    caplog.clear()
    assert run_main(*args) == 2
    assert "incomplete store from other arguments or sources" in caplog.text
    assert "splits.train.feats" in caplog.text and "--overwrite" in caplog.text
    with pytest.raises(IncompleteStoreError):
        open_store(url)
    assert run_main(*args, "--overwrite") == 0
    assert_store_equals(url, data, "float16", "database_is_train")
    caplog.clear()
    assert run_main(*args, "--dtype", "float32") == 2  # a complete store is not replaced silently
    assert "complete store from other arguments" in caplog.text and "store.dtype" in caplog.text
    assert open_store(url).info.dtype == "float16"


def test_verify_detects_a_corrupted_chunk(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    data = make_release(tmp_path / "src", "fcvid", seed=4)
    url = str(tmp_path / "store")
    args = ["--dataset", "fcvid", "--source", str(tmp_path / "src"), "--out", url, *CHUNKING]
    assert run_main(*args, "--verify") == 0
    assert "verified" in caplog.text
    feats = zarr.open_array(str(tmp_path / "store" / "train" / "feats"), mode="r+")
    feats[91, 4, 2] = feats[91, 4, 2] + 1
    caplog.clear()
    assert run_main(*args, "--verify") == 2
    assert "split 'train' video 91" in caplog.text and "fcv_train_feats.h5:feats" in caplog.text
    feats[91, 4, 2] = data["train"][0][91, 4, 2].astype(np.float16)
    labels = zarr.open_array(str(tmp_path / "store" / "database" / "labels"), mode="r+")
    labels[60, 0] = 1 - labels[60, 0]
    caplog.clear()
    assert run_main(*args, "--verify") == 2
    assert "split 'database' video 60: stored labels differ" in caplog.text
    labels[60, 0] = 1 - labels[60, 0]
    os.utime(tmp_path / "src" / "fcv_test_feats.h5", ns=(1, 1))  # same contents, another identity (a copy)
    caplog.clear()
    assert run_main(*args) == 2
    assert "complete store from other arguments or sources" in caplog.text
    assert run_main(*args, "--verify") == 0
    assert "splits.database.feats.mtime_ns" in caplog.text and "verified" in caplog.text


def test_an_aborted_creation_is_replaced_but_foreign_data_is_not(tmp_path, caplog):
    make_release(tmp_path / "src", "hmdb51")
    url = tmp_path / "store"
    group = zarr.open_group(str(url), mode="w", zarr_format=3)
    group.create_group("train")  # create_store killed before it wrote the attributes
    assert run_main("--dataset", "hmdb51", "--source", str(tmp_path / "src"), "--out", str(url), *CHUNKING) == 0
    assert open_store(str(url)).info.complete
    info = open_store(str(url)).info
    create_store(str(url), info, overwrite=True)  # killed after create_store, before the first record
    assert run_main("--dataset", "hmdb51", "--source", str(tmp_path / "src"), "--out", str(url), *CHUNKING) == 0
    assert open_store(str(url)).info.complete
    foreign = tmp_path / "foreign"
    zarr.open_group(str(foreign), mode="w", zarr_format=3).attrs["mine"] = 1
    assert run_main("--dataset", "hmdb51", "--source", str(tmp_path / "src"), "--out", str(foreign)) == 2
    assert "already exists" in caplog.text
    assert dict(zarr.open_group(str(foreign), mode="r").attrs) == {"mine": 1}


def test_option_parsing(tmp_path):
    assert storage_options_from(["anon=true", "n=3", "endpoint_url=http://x:9000", 'kw={"a": 1}']) == {
        "anon": True, "n": 3, "endpoint_url": "http://x:9000", "kw": {"a": 1}}
    assert ArraySpec.parse("/d/x.h5:feats2", "feats") == ArraySpec(Path("/d/x.h5"), "feats2")
    assert ArraySpec.parse("/d/x.h5", "feats") == ArraySpec(Path("/d/x.h5"), "feats")
    odd = tmp_path / "a:b.h5"
    odd.touch()
    assert ArraySpec.parse(str(odd), "feats") == ArraySpec(odd, "feats")


def _source(name: str, labels: np.ndarray, ids: list[str]) -> writer.SplitSource:
    feats = np.zeros((len(ids), 2, 4), np.float32)
    return writer.SplitSource(name, len(ids), f"test {name}", lambda a, b: writer.Block(
        feats[a:b], labels[a:b], np.array(ids[a:b])))


@pytest.mark.parametrize(("labels", "ids", "fragment"), [
    (np.array([[1, 0, 0]] * 7 + [[255, 0, 0]]), None, "test database: video 7 (split 'database') has label values "
                                                       "[255]; labels are 0/1 over the store's 3 classes"),
    (np.array([[0, 0, 0, 1]] * 8), None, "videos 0:4 have labels of shape (4, 4), expected (4, 3)"),
    (np.eye(3, dtype=np.uint8)[np.arange(8) % 3], [f"v{i}" for i in range(7)] + ["v2"],
     "test database: video id 'v2' occurs at rows 2, 7 of split 'database'"),
], ids=["label-255", "a-class-outside-the-width", "repeated-id"])
def test_the_writer_refuses_bad_labels_and_repeated_ids(tmp_path, labels, ids, fragment):
    ids = ids or [f"v{i}" for i in range(8)]
    info = writer.store_info("custom", "query_is_database", 2, 4, 3, "float32", {"train": 8, "database": 8},
                             chunk_videos=4, shard_videos=4)
    train = _source("train", np.eye(3, dtype=np.uint8)[np.arange(8) % 3], [f"t{i}" for i in range(8)])
    with pytest.raises(writer.SourceError) as err:
        writer.write_store(str(tmp_path / "s"), info, [train, _source("database", labels, ids)], {}, {})
    assert fragment in str(err.value)
    with pytest.raises(IncompleteStoreError):
        open_store(str(tmp_path / "s"))
