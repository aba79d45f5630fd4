"""What a training checkpoint holds (:class:`TrainState`), where it is, and whether a run can resume from it.

A checkpoint is one ``checkpoint.pt`` in a folder that rank 0 reports to Ray Train every epoch; Ray Train keeps
the latest ones under ``<storage>/<run name>/`` and lists those it registered as complete in
``checkpoint_manager_snapshot.json``. The file holds only tensors, containers and plain values, so it loads with
``torch.load(weights_only=True)`` (:func:`autossvh.engine.load_state`).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autossvh.clustering import ClusteringResult, RoundReport
from autossvh.config import Config
from autossvh.diagnostics import SamplerDiagnostics
from autossvh.engine import EpochStats, Retrieval, load_state
from autossvh.trainer import EpochRecord
from autossvh.voting import merge_centers
from cluster.runtime import absolute_path

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's list of registered (complete) checkpoints
RESULT_ARRAYS = ("im2cluster", "centers", "centroids", "density", "im2center", "kmeans_centroids")
RESULT_LISTS = ("objective", "iterations", "seconds", "warm")


@dataclass
class FinalEvaluation:
    """The selected model's evaluation after the last epoch (with precision/recall by radius)."""

    selected_epoch: int
    retrieval: Retrieval


@dataclass
class TrainState:
    """Everything a run needs to resume, and, after its last epoch, what it produced.

    ``model``/``optimizer``/``scheduler`` are state dicts; ``rng`` holds every rank's torch RNG states (rank
    order); ``clustering`` the last clustering result (reused by the epoch after a resume); ``history`` every
    epoch's record; ``best_*`` the first evaluated epoch with the best score of the run's ``--selection`` (the
    test mAP@5 for ``last`` and ``best-map5``) and, unless it selects the last epoch, its weights; ``val_videos``
    the training videos held out as a validation split (``--val-videos``: a resumed run must hold out the same);
    ``final`` the selected model's evaluation once the run ends.
    """

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    epoch: int
    config: dict[str, Any]
    mlflow_run_id: str
    rng: list[dict[str, torch.Tensor | None]] = field(default_factory=list)
    clustering: ClusteringResult | None = None
    history: list[EpochRecord] = field(default_factory=list)
    best_epoch: int = -1
    best_map5: float = -1.0
    best_model: dict[str, torch.Tensor] | None = None
    val_videos: int = 0
    final: FinalEvaluation | None = None

    def selected_weights(self) -> dict[str, torch.Tensor]:
        """The weights this checkpoint stands for: the selected epoch's after the final evaluation, else the
        last epoch's."""
        if self.final is not None and self.final.selected_epoch != self.epoch:
            assert self.best_model is not None, "a run that selects an earlier epoch keeps its weights"
            return self.best_model
        return self.model

    def to_state(self) -> dict[str, Any]:
        """Plain tensors, containers and values (loadable with ``weights_only=True``)."""
        final = None
        if self.final is not None:
            final = {"selected_epoch": self.final.selected_epoch, "retrieval": _retrieval_state(self.final.retrieval)}
        return {"model": self.model, "optimizer": self.optimizer, "scheduler": self.scheduler, "epoch": self.epoch,
                "config": self.config, "mlflow_run_id": self.mlflow_run_id, "rng": self.rng,
                "clustering": _result_state(self.clustering), "history": [_record_state(r) for r in self.history],
                "best_epoch": self.best_epoch, "best_map5": self.best_map5, "best_model": self.best_model,
                "val_videos": self.val_videos, "final": final}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> TrainState:
        best = state.get("best")  # checkpoints of earlier versions kept {"map5", "epoch", "model"}
        final = state["final"]
        return cls(
            model=state["model"], optimizer=state["optimizer"], scheduler=state["scheduler"], epoch=state["epoch"],
            config=state["config"], mlflow_run_id=state["mlflow_run_id"], rng=list(state["rng"]),
            clustering=_result_from_state(state["clustering"]),
            history=[_record_from_state(r) for r in state["history"]],
            best_epoch=best["epoch"] if best else state["best_epoch"],
            best_map5=best["map5"] if best else state["best_map5"],
            best_model=best["model"] if best else state["best_model"],
            val_videos=state.get("val_videos", 0),
            final=None if final is None else FinalEvaluation(final["selected_epoch"],
                                                             _retrieval_from_state(final["retrieval"])))

    def save(self, folder: Path) -> Path:
        path = folder / CHECKPOINT_FILE
        torch.save(self.to_state(), path)
        return path

    @classmethod
    def load(cls, file: Any, where: str, map_location: str | torch.device = "cpu") -> TrainState:
        """Read a checkpoint file (a path or an open binary file) safely; ``where`` names it in errors."""
        return cls.from_state(load_state(file, where, map_location))


def report_checkpoint(metrics: dict[str, Any], state: TrainState) -> None:
    """Report ``metrics`` with ``state`` as this epoch's checkpoint to Ray Train (rank 0)."""
    import ray.train
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory() as folder:
        state.save(Path(folder))
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder))


def latest_checkpoint_file(run_dir: str) -> str | None:
    """``checkpoint.pt`` of the latest checkpoint Ray Train registered as complete in the run folder ``run_dir``
    (any fsspec URL); None without one. A folder being copied is not registered yet, so it is never read."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(run_dir)
    if not fs.exists(f"{path}/{CHECKPOINT_SNAPSHOT}"):
        return None
    latest = json.loads(fs.cat_file(f"{path}/{CHECKPOINT_SNAPSHOT}"))["latest_checkpoint_result"]
    return f"{run_dir.rstrip('/')}/{latest['checkpoint_dir_name']}/{CHECKPOINT_FILE}"


def check_resume_compatible(storage: str, name: str, cfg: Config, val_videos: int) -> str | None:
    """Refuse to resume run ``name`` with a model or data shape other than its checkpoint's (bits, sizes, frames):
    the weights would not load; or with other ``--val-videos``: videos trained on would be validated on. Other
    settings (epochs, learning rate, ...) may change between attempts. Returns the checkpoint's MLflow run id, None
    when the run has no checkpoint yet."""
    import fsspec

    checkpoint = latest_checkpoint_file(f"{absolute_path(storage).rstrip('/')}/{name}")
    if checkpoint is None:
        return None
    with fsspec.open(checkpoint, "rb") as f:
        state = load_state(f, checkpoint)
    saved, now = state["config"], cfg.to_dict()
    differs = [f"{section}.{key}={saved[section].get(key)!r} (now {now[section][key]!r})"
               for section in ("data", "model") for key in now[section] if saved[section].get(key) != now[section][key]]
    if differs:
        raise ValueError(f"run {name!r} in {storage} has a checkpoint of another model: {', '.join(differs)}; use "
                         "another --name (or --storage) to start a new run, or the same settings to resume it")
    held = state.get("val_videos", 0)
    if held != val_videos:
        raise ValueError(f"run {name!r} in {storage} holds out --val-videos {held} (now {val_videos}); resume it with "
                         f"--val-videos {held}, or use another --name (or --storage) to start a new run")
    return state["mlflow_run_id"]


def _result_state(result: ClusteringResult | None) -> dict[str, Any] | None:
    if result is None:
        return None
    return {key: [torch.as_tensor(np.asarray(a)) for a in getattr(result, key)] for key in RESULT_ARRAYS} | {
        key: list(getattr(result, key)) for key in RESULT_LISTS}


def _result_from_state(state: dict[str, Any] | None) -> ClusteringResult | None:
    if state is None:
        return None
    arrays = {key: [t.numpy() for t in state[key]] for key in RESULT_ARRAYS if key in state}
    if "im2center" not in arrays:  # a checkpoint of an earlier version, with the unmerged votes of k clusters
        merged = [merge_centers(c, a) for c, a in zip(arrays["centers"], arrays["im2cluster"], strict=True)]
        arrays["centers"], arrays["im2center"] = [m[0] for m in merged], [m[1] for m in merged]
    return ClusteringResult(**arrays, **{key: list(state.get(key, [])) for key in RESULT_LISTS})


def _retrieval_state(retrieval: Retrieval) -> dict[str, Any]:
    pr = None if retrieval.pr_by_radius is None else [torch.as_tensor(a) for a in retrieval.pr_by_radius]
    return {"map_at_k": dict(retrieval.map_at_k), "gmap_l2": retrieval.gmap_l2, "pr_by_radius": pr}


def _retrieval_from_state(state: dict[str, Any] | None) -> Retrieval | None:
    if state is None:
        return None
    pr = state.get("pr_by_radius")
    return Retrieval(dict(state["map_at_k"]), state["gmap_l2"], None if pr is None else tuple(t.numpy() for t in pr))


def _record_state(record: EpochRecord) -> dict[str, Any]:
    retrieval = None if record.retrieval is None else {"map_at_k": dict(record.retrieval.map_at_k),
                                                       "gmap_l2": record.retrieval.gmap_l2}
    return {"epoch": record.epoch, "lr": record.lr, "stats": asdict(record.stats),
            "cluster_seconds": record.cluster_seconds,
            "clustering": None if record.clustering is None else asdict(record.clustering), "retrieval": retrieval,
            "sampler": None if record.sampler is None else asdict(record.sampler),
            "eval_seconds": record.eval_seconds}


def _report_from_state(data: dict[str, Any]) -> RoundReport | None:
    """The record's clustering report; a checkpoint of an earlier version kept only objective and distinct."""
    if "clustering" in data:
        return None if data["clustering"] is None else RoundReport(**data["clustering"])
    if not data.get("kmeans_objective"):
        return None
    known = {"objective": list(data["kmeans_objective"]), "distinct": list(data.get("distinct_centers", []))}
    return RoundReport(**{f.name: known.get(f.name, []) for f in fields(RoundReport)})


def _record_from_state(data: dict[str, Any]) -> EpochRecord:
    sampler = data.get("sampler")
    return EpochRecord(data["epoch"], data["lr"], EpochStats(**data["stats"]), data["cluster_seconds"],
                       _report_from_state(data), _retrieval_from_state(data["retrieval"]),
                       None if sampler is None else SamplerDiagnostics(**sampler), data.get("eval_seconds", 0.0))
