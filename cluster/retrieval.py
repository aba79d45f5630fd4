"""Using a trained model: load it from the registry or a checkpoint, encode a split with Ray workers, evaluate
it on a feature store under the store's protocol, and write a split's packed codes to a code store.

A model reference is ``models:/NAME@ALIAS`` (or any MLflow model URI: ``models:/NAME/VERSION``, ``runs:/...``),
a checkpoint folder of a training run (``checkpoint.pt``: the selected model of its final evaluation), a run
folder (its latest checkpoint that Ray Train registered as complete; a half-copied one is never read), or a
file written by ``autossvh.engine.save_model``. Every file is read with ``torch.load(weights_only=True)``.

Encoding splits the split into contiguous row ranges, one Ray task each (``workers``; 0 encodes in this
process); codes come back in split order, or are written by the tasks straight into a code store.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autossvh.config import config_from_dict
from autossvh.engine import Retrieval, encode, evaluate_codes, load_state
from autossvh.model import AutoSSVH
from autossvh.search import pack_codes
from cluster.checkpoint import CHECKPOINT_FILE, CHECKPOINT_SNAPSHOT, TrainState, latest_checkpoint_file
from cluster.tracking import MODEL_STATE_FILE
from storage.codes import DEFAULT_CHUNK_ROWS, CodeStore, CodeStoreWriter, create_code_store
from storage.reader import EvalReader, make_loader
from storage.schema import queries_are_database
from storage.store import FeatureStore, StoreInfo, check_apart, open_store

log = logging.getLogger(__name__)

MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


class ModelRefError(ValueError):
    """A model reference that cannot be resolved or loaded; the message names it."""


def _state_weights(state: Any, where: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config dict, weights) of a saved model or a training checkpoint (its selected model when final)."""
    if not isinstance(state, dict) or "config" not in state or "model" not in state:
        raise ModelRefError(f"{where}: not an AutoSSVH model or checkpoint (expected keys 'config' and 'model')")
    if "optimizer" not in state:  # a model file (autossvh.engine.save_model)
        return state["config"], state["model"]
    return state["config"], TrainState.from_state(state).selected_weights()


def _model_file(path: Path) -> Path:
    if path.is_file():
        return path
    for name in (CHECKPOINT_FILE, "model.pt", MODEL_STATE_FILE):
        if (path / name).is_file():
            return path / name
    checkpoint = latest_checkpoint_file(str(path))  # a run folder: its latest registered (complete) checkpoint
    if checkpoint is not None:
        return Path(checkpoint)
    found = sorted(path.rglob(MODEL_STATE_FILE))
    if found:
        return found[0]
    raise ModelRefError(f"{path}: no {CHECKPOINT_FILE}, model.pt, {CHECKPOINT_SNAPSHOT} or logged model in this folder")


def model_path(ref: str) -> str | None:
    """The local file or folder a model reference reads (an input of the job), None for an MLflow URI."""
    return None if ref.startswith(MLFLOW_SCHEMES) else ref


def load_model_ref(ref: str, tracking_uri: str | None = None) -> AutoSSVH:
    """The eval-mode model that ``ref`` names (see the module docstring)."""
    if ref.startswith(MLFLOW_SCHEMES):
        import mlflow

        if tracking_uri is not None:
            mlflow.set_tracking_uri(tracking_uri)  # the registry of models:/ URIs follows the tracking URI
        try:
            with tempfile.TemporaryDirectory() as folder:
                local = mlflow.artifacts.download_artifacts(artifact_uri=ref, dst_path=folder)
                return _load_file(_model_file(Path(local)), ref)
        except mlflow.exceptions.MlflowException as err:
            raise ModelRefError(f"model {ref}: cannot be loaded from MLflow at {tracking_uri} ({err.message})") \
                from err
    path = Path(ref)
    if not path.exists():
        raise ModelRefError(f"model {ref}: no such file or folder, and not an MLflow URI ({', '.join(MLFLOW_SCHEMES)})")
    return _load_file(_model_file(path), ref)


def _load_file(path: Path, ref: str) -> AutoSSVH:
    state = load_state(path, f"model {ref} ({path.name})")
    config, weights = _state_weights(state, f"model {ref} ({path.name})")
    model = AutoSSVH(config_from_dict(config))
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise ModelRefError(f"model {ref}: its weights do not match its own config ({err})") from err
    return model.eval()


def check_model_fits(model: AutoSSVH, info: StoreInfo, url: str) -> None:
    """The model must read the store's frames: same frames per video T and feature size F."""
    data = model.cfg.data
    if (data.max_frames, data.feature_size) != (info.max_frames, info.feature_dim):
        raise ModelRefError(f"the model reads videos of T={data.max_frames} frames x F={data.feature_size} features, "
                            f"but the store {url} holds T={info.max_frames} x F={info.feature_dim}")


def _encode_rows(model: AutoSSVH | tuple[dict[str, Any], dict[str, torch.Tensor]], url: str, split: str,
                 rows: tuple[int, int], options: dict[str, Any] | None, batch_size: int,
                 writer: CodeStoreWriter | None) -> np.ndarray | None:
    """Codes (int8 {-1, 0, +1}) of videos ``rows`` of ``split``; with ``writer``, packed into the code store."""
    if isinstance(model, tuple):  # in a Ray task: rebuild the model from its config and weights
        config, weights = model
        model = AutoSSVH(config_from_dict(config))
        model.load_state_dict(weights)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device).eval()
    reader = EvalReader(url, split, batch_size, storage_options=options, rows=rows)
    codes = encode(model, make_loader(reader), device).codes
    if writer is None:
        return codes
    arrays = open_store(url, options).split(split)
    labels = None if writer.info.num_classes is None else np.asarray(arrays.labels[rows[0]:rows[1]])
    writer.write(rows[0], pack_codes(codes), np.asarray(arrays.video_ids[rows[0]:rows[1]]), labels)
    return None


def _row_ranges(num_videos: int, parts: int) -> list[tuple[int, int]]:
    return [(i * num_videos // parts, (i + 1) * num_videos // parts) for i in range(parts)]


def encode_split(model: AutoSSVH, url: str, split: str, options: dict[str, Any] | None = None, workers: int = 0,
                 batch_size: int = 256, gpus_per_worker: float = 0.0,
                 writer: CodeStoreWriter | None = None) -> np.ndarray | None:
    """Codes of every video of ``split`` in order, encoded by ``workers`` Ray tasks (0: in this process). With
    ``writer``, each task writes its chunk-aligned rows to the code store instead and None is returned."""
    num_videos = open_store(url, options).num_videos(split)
    parts = max(workers, 1)
    ranges = [(r.start, r.stop) for r in writer.row_ranges(parts)] if writer else _row_ranges(num_videos, parts)
    if workers == 0:
        results = [_encode_rows(model, url, split, rows, options, batch_size, writer) for rows in ranges]
    else:
        import ray

        task = ray.remote(_encode_rows).options(num_cpus=1, num_gpus=gpus_per_worker)
        weights = ray.put((model.cfg.to_dict(), {k: v.cpu() for k, v in model.state_dict().items()}))
        results = ray.get([task.remote(weights, url, split, rows, options, batch_size, writer) for rows in ranges])
    return None if writer else np.concatenate(results)


def evaluate_on_store(model: AutoSSVH, url: str, options: dict[str, Any] | None = None, workers: int = 0,
                   batch_size: int = 256, gpus_per_worker: float = 0.0) -> Retrieval:
    """mAP@K, GMAP and precision/recall by radius of ``model`` on the store's queries and database, under the
    protocol the store records."""
    store = open_store(url, options)
    check_model_fits(model, store.info, url)
    labels = store.eval_labels()
    query = encode_split(model, url, "query", options, workers, batch_size, gpus_per_worker)
    database = query if queries_are_database(store.info.protocol) else encode_split(
        model, url, "database", options, workers, batch_size, gpus_per_worker)
    return evaluate_codes(query, labels["query"], database, labels["database"], with_pr=True)


def encode_to_code_store(model: AutoSSVH, model_ref: str, url: str, split: str, out: str,
                         options: dict[str, Any] | None = None, out_options: dict[str, Any] | None = None,
                         workers: int = 0, batch_size: int = 256, gpus_per_worker: float = 0.0,
                         overwrite: bool = False, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> CodeStore:
    """Encode ``split`` of the store at ``url`` into a new code store at ``out`` (packed codes, video ids and,
    for a labelled split, labels), marked complete only when every row is written. Each task writes whole
    chunks of ``chunk_rows`` codes, so there are at most as many tasks as chunks."""
    check_apart({"--out": out}, {"--data": url})
    store: FeatureStore = open_store(url, options)
    check_model_fits(model, store.info, url)
    store.check_unique_ids(split)
    store.check_labels(split)
    labelled = store.is_labelled(split)
    writer = create_code_store(out, model.cfg.model.nbits, store.num_videos(split), dataset=store.info.dataset,
                               split=split, source=url, model=model_ref,
                               num_classes=store.info.num_classes if labelled else None,
                               chunk_rows=chunk_rows, storage_options=out_options, overwrite=overwrite)
    encode_split(model, url, split, options, workers, batch_size, gpus_per_worker, writer)
    return writer.mark_complete()
