"""Hostile inputs, one row each: the command, the exit status, the message, and what must be unchanged on disk.

Each row runs a job as a user would (a subprocess on a fresh copy of a tiny generated store) and checks that it
is refused by name or handled as documented, with nothing lost and nothing left looking complete. The README's
reliability table lists these rows.

Placeholders in a row's command and paths: ``{python}`` the interpreter, ``{store}`` a fresh ucf101-like feature
store (104 train videos, T=8, F=16, 8 classes), ``{tmp}`` the test's temporary folder, ``{mlflow}`` a SQLite
tracking URI under it. A row's ``setup`` runs before the command with the resolved placeholders.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from storage.synthetic_store import write_synthetic

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--set", "data.feature_size=16", "--set", "data.max_frames=8", "--set", "model.encoder_depth=1",
         "--set", "train.batch_size=8", "--set", "cluster.num_cluster=[3, 5]", "--set", "cluster.warmup_epoch=0",
         "--set", "train.num_epochs=1"]


@dataclass(frozen=True)
class Case:
    """One hostile input: ``command`` (job path relative to the checkout, then arguments), the expected exit status,
    fragments that must all appear in its output (stderr or stdout), paths whose content must be the same
    afterwards, and paths that must not exist afterwards (nothing half-written left looking complete)."""

    id: str
    command: list[str]
    exit: int
    message: list[str]
    unchanged: list[str] = field(default_factory=list)
    absent: list[str] = field(default_factory=list)
    setup: Callable[[dict[str, str]], None] | None = None
    timeout: float = 120.0


def digest(path: Path) -> str:
    """A digest of a file, or of every file under a folder (names and bytes), to tell that nothing changed."""
    h = hashlib.sha256()
    if path.is_file():
        h.update(path.read_bytes())
    elif path.is_dir():
        for p in sorted(path.rglob("*")):
            h.update(str(p.relative_to(path)).encode())
            if p.is_file():
                h.update(p.read_bytes())
    else:
        h.update(b"<absent>")
    return h.hexdigest()


# ----- data and inputs (issue 22, items 1, 2, 5, 6, 7, 13) -----------------------------------------------------
ENCODE = ["jobs/encode.py", "--model", "{tmp}/model.pt", "--workers", "0", "--split", "query"]
EXTRACT = ["--random-weights", "--backbone", "vit_b_16", "--frames", "4", "--image-size", "16"]
NOT_INTO_INPUTS = "a job never writes over, into or around what it reads"


def _model(places: dict[str, str]) -> None:
    """An untrained model of the store's shape (T=8, F=16) at {tmp}/model.pt."""
    from autossvh.engine import save_model
    from autossvh.model import AutoSSVH
    from tests.conftest import tiny_config

    save_model(Path(places["tmp"]) / "model.pt", AutoSSVH(tiny_config()))


def _model_and_store_copy(places: dict[str, str]) -> None:
    _model(places)
    shutil.copytree(places["store"], Path(places["tmp"]) / "other")


def _model_and_link(places: dict[str, str]) -> None:
    _model(places)
    (Path(places["tmp"]) / "link").symlink_to(places["store"])


def _code_store(places: dict[str, str]) -> None:
    """A complete code store of 3 codes at {tmp}/codes."""
    import numpy as np

    from storage.codes import create_code_store

    writer = create_code_store(f"{places['tmp']}/codes", 16, 3, dataset="d", split="s", source="", model="")
    writer.write(0, np.zeros((3, 2), np.uint8), ["a", "b", "c"])
    writer.mark_complete()


def _notes(places: dict[str, str]) -> None:
    (Path(places["tmp"]) / "notes").mkdir()
    (Path(places["tmp"]) / "notes" / "todo.txt").write_text("keep me\n")


def _custom_source(places: dict[str, str]) -> None:
    """Custom features and labels (.npy) under {tmp}/src."""
    import numpy as np

    src = Path(places["tmp"]) / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    np.save(src / "train.npy", rng.standard_normal((16, 4, 8)).astype(np.float32))
    np.save(src / "database.npy", rng.standard_normal((8, 4, 8)).astype(np.float32))
    np.save(src / "labels.npy", np.eye(4, dtype=np.uint8)[np.arange(8) % 4])


def _videos(places: dict[str, str]) -> Path:
    """One decodable video in {tmp}/videos."""
    from storage.video import write_synthetic_video

    folder = Path(places["tmp"]) / "videos"
    folder.mkdir(exist_ok=True)
    write_synthetic_video(str(folder / "a.mp4"), 6, fps=10)
    return folder


def _fifo_among_videos(places: dict[str, str]) -> None:
    os.mkfifo(_videos(places) / "clip.mp4")


def _fifo_labels(places: dict[str, str]) -> None:
    _videos(places)
    os.mkfifo(Path(places["tmp"]) / "labels.csv")


def _fifo_clip(places: dict[str, str]) -> None:
    os.mkfifo(Path(places["tmp"]) / "clip.mp4")


def _fifo_features(places: dict[str, str]) -> None:
    os.mkfifo(Path(places["tmp"]) / "clip.npy")


def _folder_clip(places: dict[str, str]) -> None:
    (Path(places["tmp"]) / "clip.mp4").mkdir()


def _edit_array(places: dict[str, str], array: str, edit: Callable[..., None]) -> None:
    import zarr

    edit(zarr.open_array(f"{places['store']}/{array}", mode="r+"))


def _label_255(places: dict[str, str]) -> None:
    _edit_array(places, "query/labels", lambda labels: labels.__setitem__((3, 0), 255))


def _label_7(places: dict[str, str]) -> None:
    _edit_array(places, "query/labels", lambda labels: labels.__setitem__(5, 7))  # every column of the row


def _duplicate_id(places: dict[str, str]) -> None:
    _edit_array(places, "query/video_ids", lambda ids: ids.__setitem__(7, ids[2]))


def _unlabelled_database(places: dict[str, str]) -> None:
    """The train split (the database of this ucf101-like store) recorded as stored without labels."""
    import zarr

    group = zarr.open_group(places["store"], mode="r+")
    info = dict(group.attrs["autossvh"])
    info["sources"] = {**info["sources"], "labelled": {"train": False, "query": True}, "train_labelled": False}
    group.attrs["autossvh"] = info


def _invalid_root_metadata(places: dict[str, str]) -> None:
    (Path(places["store"]) / "zarr.json").write_text('{"zarr_format": 3, "node_type": "gro')


def _invalid_labels_metadata(places: dict[str, str]) -> None:
    (Path(places["store"]) / "query" / "labels" / "zarr.json").write_text("not json\n")


def _without_video_ids(places: dict[str, str]) -> None:
    shutil.rmtree(Path(places["store"]) / "query" / "video_ids")


def _model_and_damaged_counts(places: dict[str, str]) -> None:
    import json

    _model(places)
    path = Path(places["store"]) / "zarr.json"
    meta = json.loads(path.read_text())
    meta["attributes"]["autossvh"]["counts"] = "104 and 41"
    path.write_text(json.dumps(meta))


DATA_CASES: list[Case] = [
    # 1. inputs are read-only: no output is, lies inside or contains an input; --overwrite replaces only its own kind
    Case("encode-over-its-own-input", [*ENCODE, "--data", "{store}", "--out", "{store}", "--overwrite"], 2,
         ["--out {store} is --data {store}", NOT_INTO_INPUTS], unchanged=["{store}"], setup=_model),
    Case("encode-over-its-input-as-file-url", [*ENCODE, "--data", "file://{store}", "--out", "{store}",
                                               "--overwrite"], 2, ["is --data file://{store}"],
         unchanged=["{store}"], setup=_model),
    Case("encode-over-its-input-through-a-symlink", [*ENCODE, "--data", "{store}", "--out", "{tmp}/link",
                                                     "--overwrite"], 2, ["--out {tmp}/link is --data {store}"],
         unchanged=["{store}"], setup=_model_and_link),
    Case("encode-into-its-input-by-a-relative-path", [*ENCODE, "--data", "store", "--out", "./store/codes"], 2,
         ["--out ./store/codes lies inside --data store"], unchanged=["{store}"], absent=["{store}/codes"],
         setup=_model),
    Case("encode-around-its-input", [*ENCODE, "--data", "{store}", "--out", "{tmp}", "--overwrite"], 2,
         ["--out {tmp} contains --data {store}"], unchanged=["{store}"], setup=_model),
    Case("encode-overwrite-over-a-feature-store", [*ENCODE, "--data", "{store}", "--out", "{tmp}/other",
                                                   "--overwrite"], 2,
         ["--overwrite replaces only a store written by jobs/encode.py", "complete feature store"],
         unchanged=["{store}", "{tmp}/other"], setup=_model_and_store_copy),
    Case("make-synthetic-overwrite-over-a-code-store",
         ["jobs/make_synthetic.py", "--like", "ucf101", "--videos", "104", "--out", "{tmp}/codes", "--overwrite"], 2,
         ["--overwrite replaces only a store written by jobs/ingest.py or jobs/make_synthetic.py",
          "complete code store"], unchanged=["{tmp}/codes"], setup=_code_store),
    Case("make-synthetic-overwrite-over-a-folder",
         ["jobs/make_synthetic.py", "--like", "ucf101", "--videos", "104", "--out", "{tmp}/notes", "--overwrite"], 2,
         ["a folder of 1 entries that is not a store"], unchanged=["{tmp}/notes"], setup=_notes),
    Case("ingest-over-its-own-source",
         ["jobs/ingest.py", "--dataset", "custom", "--protocol", "query_is_database", "--train", "{tmp}/src/train.npy",
          "--database", "{tmp}/src/database.npy", "--database-labels", "{tmp}/src/labels.npy", "--out", "{tmp}/src",
          "--overwrite"], 2, ["--out {tmp}/src contains the train features {tmp}/src/train.npy"],
         unchanged=["{tmp}/src"], setup=_custom_source),
    Case("extract-into-its-videos", ["jobs/extract.py", "--videos", "{tmp}/videos", "--out", "{tmp}/videos/store",
                                     "--protocol", "query_is_database", *EXTRACT], 2,
         ["--out {tmp}/videos/store lies inside --videos {tmp}/videos"], unchanged=["{tmp}/videos"],
         setup=_videos),
    Case("train-local-out-inside-its-data", ["jobs/train_local.py", "--data", "{store}", "--out", "{store}/local",
                                             *SMALL], 2, ["--out {store}/local lies inside --data {store}"],
         unchanged=["{store}"]),
    Case("evaluate-summary-inside-its-data", ["jobs/evaluate.py", "--model", "{tmp}/model.pt", "--data", "{store}",
                                              "--workers", "0", "--summary-json", "{store}/summary.json"], 2,
         ["--summary-json {store}/summary.json lies inside --data {store}"], unchanged=["{store}"], setup=_model),
    Case("verify-json-inside-its-store", ["jobs/verify.py", "{store}", "--json", "{store}/report.json"], 2,
         ["--json {store}/report.json lies inside the store {store}"], unchanged=["{store}"]),
    # 2. only regular files are opened as media or arrays: a FIFO or a folder is refused by name, never waited on
    Case("extract-a-fifo-among-the-videos", ["jobs/extract.py", "--videos", "{tmp}/videos", "--out", "{tmp}/out",
                                             "--protocol", "query_is_database", *EXTRACT], 2,
         ["{tmp}/videos/clip.mp4: a FIFO (named pipe), not a regular file"], absent=["{tmp}/out"],
         setup=_fifo_among_videos, timeout=60),
    Case("extract-a-fifo-named-as-the-video", ["jobs/extract.py", "--videos", "{tmp}/clip.mp4", "--out", "{tmp}/out",
                                               "--protocol", "query_is_database", *EXTRACT], 2,
         ["{tmp}/clip.mp4: a FIFO (named pipe), not a regular file"], absent=["{tmp}/out"], setup=_fifo_clip,
         timeout=60),
    Case("extract-a-fifo-as-labels", ["jobs/extract.py", "--videos", "{tmp}/videos", "--labels", "{tmp}/labels.csv",
                                      "--out", "{tmp}/out", *EXTRACT], 2,
         ["--labels {tmp}/labels.csv: a FIFO (named pipe), not a regular file"], absent=["{tmp}/out"],
         setup=_fifo_labels, timeout=60),
    Case("search-a-fifo-video", ["jobs/search.py", "--codes", "{tmp}/codes", "--model", "{tmp}/model.pt", "--video",
                                 "{tmp}/clip.mp4"], 2,
         ["--video {tmp}/clip.mp4: a FIFO (named pipe), not a regular file"], setup=_fifo_clip, timeout=60),
    Case("search-a-folder-named-as-a-video", ["jobs/search.py", "--codes", "{tmp}/codes", "--model", "{tmp}/model.pt",
                                              "--video", "{tmp}/clip.mp4"], 2,
         ["--video {tmp}/clip.mp4: a folder, not a regular file"], setup=_folder_clip, timeout=60),
    Case("search-fifo-features", ["jobs/search.py", "--codes", "{tmp}/codes", "--model", "{tmp}/model.pt",
                                  "--features", "{tmp}/clip.npy"], 2,
         ["--features {tmp}/clip.npy: a FIFO (named pipe), not a regular file"], setup=_fifo_features, timeout=60),
    # 5. labels are 0/1 over the store's classes; 6. video ids are unique: verify lists them, training refuses them
    Case("verify-a-query-labelled-255", ["jobs/verify.py", "{store}"], 1,
         ["bad-label", "query/labels", "query_000003", "label values [255]"], unchanged=["{store}"],
         setup=_label_255),
    Case("train-local-a-query-labelled-255", ["jobs/train_local.py", "--data", "{store}", "--out", "{tmp}/out",
                                              *SMALL], 2,
         ["split 'query'", "3 ('query_000003') holds [255]", "jobs/verify.py"], unchanged=["{store}"],
         absent=["{tmp}/out"], setup=_label_255),
    Case("train-local-a-query-labelled-7-of-8-classes", ["jobs/train_local.py", "--data", "{store}", "--out",
                                                         "{tmp}/out", *SMALL], 2,
         ["5 ('query_000005') holds [7]", "multi-hot over the store's 8 classes"], unchanged=["{store}"],
         absent=["{tmp}/out"], setup=_label_7),
    Case("verify-a-duplicate-video-id", ["jobs/verify.py", "{store}"], 1,
         ["duplicate", "id 'query_000002' at rows 2, 7"], unchanged=["{store}"], setup=_duplicate_id),
    Case("train-local-a-duplicate-video-id", ["jobs/train_local.py", "--data", "{store}", "--out", "{tmp}/out",
                                              *SMALL], 2,
         ["split 'query': 1 video id(s) occur more than once: 'query_000002' at rows 2, 7"], unchanged=["{store}"],
         absent=["{tmp}/out"], setup=_duplicate_id),
    # 7. a split the protocol evaluates is never written (or passed) without labels
    Case("extract-a-database-without-labels", ["jobs/extract.py", "--videos", "{tmp}/videos", "--split", "database",
                                               "--protocol", "query_is_database", "--out", "{tmp}/out", *EXTRACT], 2,
         ["--split database", "needs --labels", "nothing was written"], unchanged=["{tmp}/videos"],
         absent=["{tmp}/out"], setup=_videos),
    Case("verify-an-unlabelled-database", ["jobs/verify.py", "{store}"], 1,
         ["unlabelled", "train/labels", "evaluation needs them"], unchanged=["{store}"],
         setup=_unlabelled_database),
    # 13. damaged metadata is named: the file and what is wrong with it
    Case("train-local-an-invalid-zarr-json", ["jobs/train_local.py", "--data", "{store}", "--out", "{tmp}/out",
                                              *SMALL], 2, ["{store}/zarr.json: not valid JSON"],
         unchanged=["{store}"], absent=["{tmp}/out"], setup=_invalid_root_metadata),
    Case("verify-an-invalid-array-zarr-json", ["jobs/verify.py", "{store}"], 2,
         ["{store}/query/labels/zarr.json: not valid JSON"], unchanged=["{store}"], setup=_invalid_labels_metadata),
    Case("verify-a-store-without-video-ids", ["jobs/verify.py", "{store}"], 2,
         ["split 'query' lacks query/video_ids (no query/video_ids/zarr.json)"], unchanged=["{store}"],
         setup=_without_video_ids),
    Case("encode-damaged-store-attributes", [*ENCODE, "--data", "{store}", "--out", "{tmp}/codes"], 2,
         ["{store}/zarr.json: attribute autossvh.counts is '104 and 41'"], unchanged=["{store}"],
         absent=["{tmp}/codes"], setup=_model_and_damaged_counts),
]

# ----- runs, names, URIs and destinations (issue 22, items 3, 4, 8, 9, 10, 11, 12) ------------------------------
TRAIN = ["jobs/train_ucf101.py", "--data", "{store}", "--storage", "{tmp}/ray", "--mlflow-uri", "{mlflow}",
         "--mlflow-artifacts", "{tmp}/art", "--workers", "1", "--num-cpus", "2", *SMALL]
LOCAL = ["jobs/train_local.py", "--data", "{store}", "--out", "{tmp}/out", *SMALL]
EVALUATE = ["jobs/evaluate.py", "--model", "{tmp}/model.pt", "--data", "{store}", "--mlflow-uri", "{mlflow}"]
NOT_STARTED = ["{tmp}/ray", "{tmp}/mlflow.db", "{tmp}/art"]  # no run created: refused before Ray starts
NO_CUDA_HERE = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"


def _file(places: dict[str, str]) -> None:
    """A regular file at {tmp}/file, where a job would need a folder."""
    (Path(places["tmp"]) / "file").write_text("not a folder\n")


def _run_yaml(places: dict[str, str]) -> None:
    """A --config file setting two keys that the reduced preset also sets."""
    (Path(places["tmp"]) / "run.yaml").write_text("train:\n  lr: 0.002\n  num_epochs: 1\n")


def _checkpoint_of_another_store(places: dict[str, str]) -> None:
    """Run 'resumed' under {tmp}/ray with a checkpoint (of the model TRAIN builds) whose MLflow run is not in
    {mlflow}, a tracking store that exists and holds another experiment."""
    from mlflow.tracking import MlflowClient

    from autossvh.config import build_config
    from cluster.checkpoint import CHECKPOINT_FILE, CHECKPOINT_SNAPSHOT

    cfg = build_config("ucf101", "paper", overrides=[item for item in SMALL if item != "--set"])
    run = Path(places["tmp"]) / "ray" / "resumed"
    (run / "checkpoint_000000").mkdir(parents=True)
    torch.save({"config": cfg.to_dict(), "mlflow_run_id": "0123456789abcdef0123456789abcdef"},
               run / "checkpoint_000000" / CHECKPOINT_FILE)
    (run / CHECKPOINT_SNAPSHOT).write_text(json.dumps(
        {"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_000000"}}))
    MlflowClient(places["mlflow"]).create_experiment("another")


RUN_CASES: list[Case] = [
    Case("config-file-values-win-over-the-reduced-preset",
         ["jobs/train_local.py", "--config", "{tmp}/run.yaml", "--videos", "120", "--feature-dim", "16", "--classes",
          "8", "--out", "{tmp}/out", "--set", "data.max_frames=8", "--set", "model.encoder_depth=1",
          "--set", "train.batch_size=8"], 0,
         ["yours kept: model.encoder_depth from --set, train.batch_size from --set, train.num_epochs from --config "
          "{tmp}/run.yaml, train.lr from --config {tmp}/run.yaml", "epoch 1/1 ", " lr 2.00e-03 "],
         unchanged=["{tmp}/run.yaml"], setup=_run_yaml, timeout=300),
    Case("lr-1e30-refused-by-name", [*TRAIN, "--set", "train.lr=1e30"], 2,
         ["train.lr: 1e+30 is not allowed; must be in [1e-08, 0.1]"], absent=NOT_STARTED),
    Case("temperature-below-its-range", [*TRAIN, "--set", "loss.temperature=0.0001"], 2,
         ["loss.temperature: 0.0001 is not allowed; must be in [0.01, 10]"], absent=NOT_STARTED),
    Case("weights-past-the-bound-stop-a-local-run", [*LOCAL, "--set", "train.max_weight_norm=10"], 1,
         ["training failed: the run diverged at epoch 1, step 13 (the epoch's last): weight norm",
          "> train.max_weight_norm=10"], unchanged=["{store}"], absent=["{tmp}/out"], timeout=300),
    Case("weights-past-the-bound-fail-a-ray-run", [*TRAIN, "--max-failures", "0", "--set", "train.max_weight_norm=10"],
         1, ["training failed", "the run diverged at epoch 1, step 13", "no checkpoint was written"],
         unchanged=["{store}"], absent=["{tmp}/ray/ucf101-synthetic-64bits-paper/checkpoint_000000"], timeout=600),
    Case("name-empty", [*TRAIN, "--name", ""], 2, ["--name '': a run name is one folder name inside --storage"],
         absent=NOT_STARTED),
    Case("name-with-a-newline", [*TRAIN, "--name", "run\nlog"], 2, ["--name 'run\\nlog'", "letters, digits"],
         absent=NOT_STARTED),
    Case("name-of-300-characters", [*TRAIN, "--name", "r" * 300], 2, ["(300 characters)", "use 1 to 100 characters"],
         absent=NOT_STARTED),
    Case("experiment-with-a-space", [*TRAIN, "--experiment", "my runs"], 2,
         ["--experiment 'my runs': an MLflow experiment name"], absent=NOT_STARTED),
    Case("register-name-with-an-at", [*TRAIN, "--register", "model@candidate"], 2,
         ["--register 'model@candidate': a registered model name"], absent=NOT_STARTED),
    Case("mlflow-uri-a-folder", [*TRAIN, "--mlflow-uri", "sqlite:///{tmp}"], 2,
         ["--mlflow-uri sqlite:///{tmp}: {tmp} is a folder, not a SQLite file"], absent=NOT_STARTED, timeout=60),
    Case("mlflow-uri-a-text-file", [*TRAIN, "--mlflow-uri", "sqlite:///{tmp}/file"], 2,
         ["{tmp}/file is not a SQLite database"], unchanged=["{tmp}/file"], absent=NOT_STARTED, setup=_file),
    Case("mlflow-uri-an-unknown-scheme", [*TRAIN, "--mlflow-uri", "ftp://{tmp}/mlflow.db"], 2,
         ["unknown scheme 'ftp'"], absent=NOT_STARTED),
    Case("mlflow-uri-a-plain-path", [*TRAIN, "--mlflow-uri", "{tmp}/mlflow.db"], 2,
         ["--mlflow-uri '{tmp}/mlflow.db': not a URI; use sqlite:///PATH/mlflow.db"], absent=NOT_STARTED),
    Case("summary-json-under-a-file", [*TRAIN, "--summary-json", "{tmp}/file/summary.json"], 2,
         ["--summary-json {tmp}/file/summary.json: {tmp}/file is a file, not a folder"], unchanged=["{tmp}/file"],
         absent=NOT_STARTED, setup=_file),
    Case("train-local-out-under-a-file", [*LOCAL[:3], "--out", "{tmp}/file/out", *SMALL], 2,
         ["--out {tmp}/file/out: {tmp}/file is a file, not a folder"], unchanged=["{tmp}/file"], setup=_file),
    Case("evaluate-out-under-a-file", [*EVALUATE, "--out", "{tmp}/file/eval"], 2,
         ["--out {tmp}/file/eval: {tmp}/file is a file, not a folder"], unchanged=["{tmp}/file"],
         absent=["{tmp}/runs"], setup=_file),
    Case("evaluate-summary-json-under-a-file", [*EVALUATE, "--out", "{tmp}/eval", "--summary-json",
                                                "{tmp}/file/eval.json"], 2,
         ["--summary-json {tmp}/file/eval.json: {tmp}/file is a file, not a folder"], unchanged=["{tmp}/file"],
         absent=["{tmp}/eval"], setup=_file),
    Case("verify-json-under-a-file", ["jobs/verify.py", "{store}", "--json", "{tmp}/file/report.json"], 2,
         ["--json {tmp}/file/report.json: {tmp}/file is a file, not a folder"], unchanged=["{tmp}/file", "{store}"],
         setup=_file),
    Case("device-cuda-without-it", [*LOCAL, "--device", NO_CUDA_HERE], 2, [f"--device {NO_CUDA_HERE}: "],
         absent=["{tmp}/out"]),
    Case("evaluate-workers-negative", [*EVALUATE, "--workers", "-1"], 2, ["--workers -1: must be >= 0"],
         absent=["{tmp}/runs", "{tmp}/mlflow.db"]),
    Case("train-workers-negative", [*TRAIN, "--workers", "-1"], 2, ["--workers -1: must be >= 1"],
         absent=NOT_STARTED),
    Case("resume-with-another-mlflow-uri", [*TRAIN, "--name", "resumed"], 2,
         ["run 'resumed' in {tmp}/ray resumes MLflow run 0123456789abcdef0123456789abcdef, which --mlflow-uri "
          "{mlflow} does not hold"], unchanged=["{tmp}/ray"], setup=_checkpoint_of_another_store),
]

# ----- experiments, consoles and the environment (issue 22, items 14, 15, 16, 17) --------------------------------
SWEEP = ["--dataset", "ucf101", "--data", "{store}", "--storage", "{tmp}/ray", "--mlflow-uri", "{mlflow}",
         "--mlflow-artifacts", "{tmp}/art", *SMALL]
EXPERIMENT_CASES: list[Case] = [
    Case("ablate-max-concurrent-beyond-the-local-ray", ["jobs/ablate.py", *SWEEP, "--rows", "IX", "II", "--seeds",
                                                        "2", "--max-concurrent", "3", "--num-cpus", "3"], 2,
         ["--max-concurrent 3: the local Ray this job starts holds 2 trial(s) at once (3 CPUs; a trial takes 1.25: "
          "0.25 for its Tune function + 1 worker(s) x 1)"],
         unchanged=["{store}"], absent=["{tmp}/ray", "{tmp}/mlflow.db"]),
    Case("tune-max-concurrent-beyond-the-local-ray", ["jobs/tune.py", *SWEEP, "--trials", "4", "--max-concurrent",
                                                      "4", "--num-cpus", "4"], 2,
         ["--max-concurrent 4: the local Ray this job starts holds 3 trial(s) at once", "Use --max-concurrent 3"],
         unchanged=["{store}"], absent=["{tmp}/ray", "{tmp}/mlflow.db"]),
    Case("tune-trial-bigger-than-the-local-ray", ["jobs/tune.py", *SWEEP, "--num-cpus", "2", "--cpus-per-worker",
                                                  "2"], 2,
         ["one trial: the local Ray this job starts holds 0 trial(s) at once (2 CPUs; a trial takes 2.25",
          "wait for resources that are never free"], unchanged=["{store}"], absent=["{tmp}/ray", "{tmp}/mlflow.db"]),
    Case("tune-max-concurrent-zero", ["jobs/tune.py", *SWEEP, "--max-concurrent", "0"], 2,
         ["--max-concurrent 0: must be >= 1"], unchanged=["{store}"], absent=["{tmp}/ray", "{tmp}/mlflow.db"]),
    Case("torchvision-that-cannot-be-imported",  # as where it is missing: the extraction says so in one line
         ["{python}", "-c", "import runpy, sys; sys.modules['torchvision'] = None; sys.argv = sys.argv[1:]; "
          "runpy.run_path(sys.argv[0], run_name='__main__')", str(ROOT / "jobs" / "extract.py"), "--videos",
          "{tmp}/videos", "--out", "{tmp}/out", "--random-weights"], 2,
         ["cannot be imported beside torch", "ModuleNotFoundError",
          "README.md, \"torchvision in the project's environment\""],
         absent=["{tmp}/out"]),
]

CASES = [*DATA_CASES, *RUN_CASES, *EXPERIMENT_CASES]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    url = tmp_path_factory.mktemp("pristine") / "ucf101"
    write_synthetic(str(url), "ucf101", 104, feature_dim=16, max_frames=8, num_classes=8, seed=1,
                    chunk_videos=4, shard_videos=8)
    return url


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_a_hostile_input_is_refused_by_name(case: Case, pristine: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(pristine, store)
    places = {"python": sys.executable, "store": str(store), "tmp": str(tmp_path),
              "mlflow": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    if case.setup is not None:
        case.setup(places)
    unchanged = {p: digest(Path(p.format(**places))) for p in case.unchanged}
    command = [part.format(**places) for part in case.command]
    if command[0].endswith(".py"):
        command = [sys.executable, str(ROOT / command[0]), *command[1:]]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=case.timeout, cwd=tmp_path, env=env,
                          stdin=subprocess.DEVNULL)
    said = proc.stderr + proc.stdout  # errors go to stderr; a report (jobs/verify.py) to stdout
    assert proc.returncode == case.exit, said[-3000:]
    for fragment in case.message:
        assert fragment.format(**places) in said, said[-3000:]
    for p, before in unchanged.items():
        assert digest(Path(p.format(**places))) == before, f"{p} changed"
    for p in case.absent:
        assert not Path(p.format(**places)).exists(), f"{p} was left behind"
