"""Damaged data and bad destinations, as a red team met them (README, Reliability): each case is refused by name or
its damage detected, by every entry that reads the data, and nothing is left looking complete.

Table 1 damages a copy of a UCF101-like store (13 train shard files of 8 videos in chunks of 4; the train split is
also the database) and runs each entry on it in this process: ``train_local``, ``evaluate`` and ``encode`` exit 2
with one line naming the file or the videos, and ``verify`` exits 1 listing them. Table 2 gives the Ray training
job bad destinations and bad values, which it refuses with exit status 2 before Ray starts. The Ray cases that
need a run (a shard deleted after the checks) follow; the search job's bad query files are in ``test_search.py``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zarr
from mlflow.tracking import MlflowClient

from autossvh.engine import save_model
from autossvh.model import AutoSSVH
from storage.codes import open_code_store
from storage.store import StoreError
from storage.synthetic_store import write_synthetic
from tests.conftest import TINY, tiny_config
from tests.test_ray_train import parse as parse_train

SHARD = Path("train", "feats", "c", "2", "0", "0")  # train videos 16:24, chunks 16:20 and 20:24


def _flip_bytes(store: Path) -> None:
    """4 bytes flipped every 37 bytes in the data part of a shard (its index at the end stays intact)."""
    path = store / SHARD
    data = bytearray(path.read_bytes())
    for i in range(8, len(data) // 2, 37):
        data[i:i + 4] = bytes(b ^ 0xFF for b in data[i:i + 4])
    path.write_bytes(bytes(data))


def _delete_shard(store: Path) -> None:
    (store / SHARD).unlink()


def _truncate_shard(store: Path) -> None:
    os.truncate(store / SHARD, (store / SHARD).stat().st_size // 2)


def _nan_in_train(store: Path) -> None:
    feats = zarr.open_array(str(store / "train" / "feats"), mode="r+")  # past the writer, which refuses NaN
    feats[13, 2, 5] = np.nan


def _inf_in_query(store: Path) -> None:
    feats = zarr.open_array(str(store / "query" / "feats"), mode="r+")
    feats[5, 0, 0] = np.inf


def _delete_ids(store: Path) -> None:
    (store / "query" / "video_ids" / "c" / "1").unlink()


FILE_DAMAGED = "the file train/feats/c/2/0/0 is damaged or truncated"
# damage -> (what it does, split to encode, fragments per entry: train_local / evaluate / encode / verify)
DAMAGES: dict[str, tuple[Callable[[Path], None], str, dict[str, list[str]]]] = {
    "bit-flips": (_flip_bytes, "train", {
        "train_local": ["videos 16:20", FILE_DAMAGED, "checksum mismatch"],
        "evaluate": [FILE_DAMAGED], "encode": [FILE_DAMAGED],
        "verify": ["damaged", "train/feats/c/2/0/0", "train_000016", "crc32c checksum mismatch"]}),
    "deleted-shard": (_delete_shard, "train", {
        "train_local": ["split 'train'", "feats/c/2/0/0 (missing)"], "evaluate": ["feats/c/2/0/0 (missing)"],
        "encode": ["the file train/feats/c/2/0/0 is missing"],
        "verify": ["missing", "train/feats/c/2/0/0", "rows 16:24", "train_000023"]}),
    "truncated-shard": (_truncate_shard, "train", {
        "train_local": ["feats/c/2/0/0 (shard index checksum mismatch"],
        "evaluate": ["feats/c/2/0/0 (shard index checksum mismatch"], "encode": [FILE_DAMAGED],
        "verify": ["damaged", "train/feats/c/2/0/0", "train_000016"]}),
    "nan-features": (_nan_in_train, "train", {
        "train_local": ["split 'train'", "NaN or Inf features", "13 ('train_000013')", "jobs/verify.py"],
        "evaluate": ["13 ('train_000013')"], "encode": ["13 ('train_000013')"],
        "verify": ["non-finite", "train_000013"]}),
    "inf-features": (_inf_in_query, "query", {
        "train_local": ["split 'query'", "5 ('query_000005')"], "evaluate": ["5 ('query_000005')"],
        "encode": ["5 ('query_000005')"], "verify": ["non-finite", "query_000005"]}),
    "deleted-ids": (_delete_ids, "query", {
        "train_local": ["video_ids/c/1 (missing)"], "evaluate": ["video_ids/c/1 (missing)"],
        "encode": ["the file query/video_ids/c/1 is missing"], "verify": ["missing", "query/video_ids/c/1"]}),
}
ENTRIES = ("train_local", "evaluate", "encode", "verify")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The store (104 train videos, 41 queries, T=8, F=16) and an untrained model of its shape."""
    root = tmp_path_factory.mktemp("damage")
    write_synthetic(str(root / "store"), "ucf101", 104, feature_dim=16, max_frames=8, num_classes=8, seed=1,
                    chunk_videos=4, shard_videos=8)
    save_model(root / "model.pt", AutoSSVH(tiny_config()))
    return {"store": root / "store", "model": root / "model.pt"}


def _parse(add_arguments: Callable[[argparse.ArgumentParser], None], argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def run_entry(entry: str, store: Path, model: Path, split: str, out: Path) -> int:
    """Run one entry in this process, as its job would; returns its exit status."""
    if entry == "train_local":
        from cluster import single_process

        argv = ["--data", str(store), "--out", str(out), "--device", "cpu"]
        for item in [*TINY, "train.num_epochs=1"]:
            argv += ["--set", item]
        return single_process.run("ucf101", _parse(single_process.add_arguments, argv))
    if entry == "evaluate":
        from cluster import evaluate

        argv = ["--model", str(model), "--data", str(store), "--workers", "0", "--out", str(out),
                "--summary-json", str(out / "summary.json")]
        return evaluate.main(_parse(evaluate.add_arguments, argv))
    if entry == "encode":
        from cluster import encode

        argv = ["--model", str(model), "--data", str(store), "--workers", "0", "--split", split, "--out",
                str(out / "codes")]
        return encode.main(_parse(encode.add_arguments, argv))
    from storage import verify

    return verify.main(_parse(verify.add_arguments, [str(store), "--json", str(out / "verify.json")]))


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_data_is_refused_by_name_and_nothing_looks_complete(pristine, tmp_path, caplog, capsys,
                                                                   damage, entry):
    store, out = tmp_path / "store", tmp_path / "out"
    shutil.copytree(pristine["store"], store)
    tamper, split, fragments = DAMAGES[damage]
    tamper(store)
    caplog.set_level(logging.INFO)
    status = run_entry(entry, store, pristine["model"], split, out)
    said = caplog.text + capsys.readouterr().out
    assert status == (1 if entry == "verify" else 2), said[-3000:]
    for fragment in fragments[entry]:
        assert fragment in said, (fragment, said[-3000:])
    assert "Traceback" not in said
    assert not (out / "model.pt").exists() and not (out / "metrics.json").exists()  # train_local wrote nothing
    assert not (out / "summary.json").exists()  # evaluate reported nothing
    if (out / "codes").exists():
        with pytest.raises(StoreError, match="incomplete"):
            open_code_store(str(out / "codes"))
    if entry == "verify":
        report = json.loads((out / "verify.json").read_text())
        assert report["problems"] and all(p["rows"] for p in report["problems"])


def test_an_intact_store_passes_every_entry(pristine, tmp_path):
    for entry in ENTRIES:
        assert run_entry(entry, pristine["store"], pristine["model"], "query", tmp_path / entry) == 0, entry


def test_a_store_written_before_chunk_checksums_still_opens_and_verify_says_so(tmp_path, monkeypatch, capsys):
    from zarr.codecs import ZstdCodec

    import storage.store as store_module

    monkeypatch.setattr(store_module, "CHUNK_CODECS", (ZstdCodec(),))  # the writer before checksums
    monkeypatch.setattr(store_module, "WRITE_EVERY_CHUNK", {})
    url = str(tmp_path / "old")
    old = write_synthetic(url, "ucf101", 104, feature_dim=16, max_frames=8, num_classes=8, seed=1)
    monkeypatch.undo()
    assert not old.has_chunk_checksums and old.load("train")[0].shape == (104, 8, 16)
    from storage import verify

    assert verify.main(_parse(verify.add_arguments, [url])) == 0
    assert "written without chunk checksums" in capsys.readouterr().out


# ----- Table 2: the Ray training job refuses bad destinations and values before Ray starts ------------------------

def _storage_is_a_file(tmp: Path) -> list[str]:
    (tmp / "file").write_text("x")
    return ["--storage", str(tmp / "file")]


BEFORE_RAY: dict[str, tuple[Callable[[Path], list[str]], list[str]]] = {
    "name-escapes-storage": (lambda tmp: ["--name", "../escape"], ["--name '../escape'", "inside --storage"]),
    "name-is-absolute": (lambda tmp: ["--name", str(tmp / "abs")], ["a run name is one folder name"]),
    "storage-is-a-file": (_storage_is_a_file, ["--storage", "is a file, not a folder"]),
    "storage-unwritable": (lambda tmp: ["--storage", "/proc/autossvh-runs"], ["--storage /proc/autossvh-runs",
                                                                                 "cannot write in /proc"]),
    "mlflow-folder-unwritable": (lambda tmp: ["--mlflow-uri", "sqlite:////proc/mlflow.db"],
                                 ["the SQLite folder /proc", "cannot write"]),
    "lr-inf": (lambda tmp: ["--set", "train.lr=inf"], ["train.lr: inf is not allowed; must be a finite number"]),
    "temperature-inf": (lambda tmp: ["--set", "loss.p2set_temperature=inf"], ["loss.p2set_temperature: inf"]),
}


@pytest.mark.parametrize("case", list(BEFORE_RAY))
def test_bad_destinations_and_values_are_refused_before_ray(pristine, tmp_path, caplog, monkeypatch, case):
    import cluster.train as train

    monkeypatch.setattr(train, "init_ray", lambda *a, **k: pytest.fail("Ray was started"))
    make_args, fragments = BEFORE_RAY[case]
    base = ["--data", str(pristine["store"]), "--workers", "1", "--storage", str(tmp_path / "ray"), "--name", "ok",
            "--mlflow-uri", f"sqlite:///{tmp_path}/mlflow.db", "--mlflow-artifacts", str(tmp_path / "art")]
    for item in TINY:
        base += ["--set", item]
    assert train.run("ucf101", parse_train([*base, *make_args(tmp_path)])) == 2
    for fragment in fragments:
        assert fragment in caplog.text, (fragment, caplog.text)
    assert not (tmp_path.parent / "escape").exists() and not (tmp_path / "abs").exists()
    assert not (tmp_path / "ray").exists() and not (tmp_path / "mlflow.db").exists()


def test_a_database_smaller_than_the_largest_k_is_refused(tmp_path, caplog):
    from cluster import single_process

    url = str(tmp_path / "small")
    write_synthetic(url, "fcvid", 60, feature_dim=16, max_frames=8, num_classes=8, seed=1)
    argv = ["--data", url, "--out", str(tmp_path / "out")]
    for item in TINY:
        argv += ["--set", item]
    assert single_process.run("fcvid", _parse(single_process.add_arguments, argv)) == 2
    assert "the database (split 'database') holds 60 videos" in caplog.text and "K = 100" in caplog.text


# ----- Ray runs: damage after the checks; an honest trail -----------------------------------------------------------

def test_a_shard_deleted_after_the_checks_fails_the_run_by_name_and_marks_it_failed(ray_session, pristine, tmp_path,
                                                                                    caplog, monkeypatch):
    import cluster.train as train

    store = tmp_path / "store"
    shutil.copytree(pristine["store"], store)
    checked = train.prepare_run

    def delete_after_the_checks(*args, **kwargs):
        prepared = checked(*args, **kwargs)
        (store / SHARD).unlink()  # after every check, before any worker reads
        return prepared

    monkeypatch.setattr(train, "prepare_run", delete_after_the_checks)
    argv = ["--data", str(store), "--workers", "2", "--epochs", "2", "--storage", str(tmp_path / "ray"), "--name",
            "lost-shard", "--mlflow-uri", f"sqlite:///{tmp_path}/mlflow.db", "--mlflow-artifacts",
            str(tmp_path / "art"), "--experiment", "damage", "--max-failures", "1"]
    for item in [*TINY, "train.test_batch_size=64"]:
        argv += ["--set", item]
    assert train.run("ucf101", parse_train(argv)) == 1
    assert "training failed" in caplog.text and "train/feats/c/2/0/0 is missing" in caplog.text
    assert "no checkpoint was written" in caplog.text and "checkpoint is kept" not in caplog.text
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("damage").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]  # one run for both attempts, not left RUNNING


def test_a_whole_split_is_checked_for_nan_block_by_block_and_every_bad_video_named(pristine, monkeypatch):
    import storage.store as store_module

    monkeypatch.setattr(store_module, "FINITE_CHECK_VIDEOS", 32)  # blocks of 32 of the 104 train videos
    store = store_module.open_store(str(pristine["store"]))
    feats = np.ones((100, 8, 16), np.float32)
    feats[3, 0, 0], feats[70, 1, 2] = np.nan, -np.inf  # in the first and the third block
    with pytest.raises(StoreError, match=r"2 video\(s\) have NaN or Inf features: row \(id\) 3 \('train_000003'\), "
                                         r"70 \('train_000070'\)"):
        store.check_finite("train", 0, feats)
    store.check_finite("train", 4, feats[4:70])  # finite
