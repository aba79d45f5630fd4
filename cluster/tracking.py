"""MLflow tracking of a training run: params, per-epoch metrics, result artifacts and the model registry.

One MLflow run per training run, written only by rank 0 or the driver (the caller decides; nothing here
checks the rank). Secrets never reach MLflow: :func:`redact` masks every value whose key names a key,
secret, token, password or credential, and credentials inside URLs, before params are logged or errors are
raised. The model is logged as a pyfunc over our own state dict (:func:`autossvh.engine.save_model`), which
maps frame features (N, T, F) float32 to packed uint8 codes (N, nbits / 8), so no torch.export or pickled
``nn.Module`` is involved; ``autossvh/`` and ``cluster/`` travel with it as code paths.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import importlib.metadata
import io
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# MLflow's artifact progress bars (model logging downloads its own artifacts to check them) are not progress a
# user waits for; set before MLflow reads it.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import mlflow  # noqa: E402
import mlflow.pyfunc  # noqa: E402
import numpy as np
from mlflow.entities import Param
from mlflow.tracking import MlflowClient

import autossvh
from autossvh.config import Config
from autossvh.engine import Retrieval, array_batches, encode, load_model, save_model
from autossvh.model import AutoSSVH
from autossvh.trainer import EpochRecord
from cluster.results import write_result_files
from storage.store import FeatureStore

log = logging.getLogger(__name__)

REDACTED = "***"
SECRET_WORDS = ("key", "secret", "token", "password", "credential")
CANDIDATE_ALIAS = "candidate"
NOTE_TAG = "mlflow.note.content"  # what the MLflow UI shows as a run's or a logged model's description
END_REASON_TAG = "autossvh.end_reason"  # why a run ended FAILED or KILLED (a trial stopped early, a stopped job)
END_REASON_LENGTH = 500
EPOCH_CLUSTER_METRIC = "kmeans_objective"  # the one clustering metric charted per epoch (epoch_metrics)
REGISTERED_MODEL_DESCRIPTION = (
    "AutoSSVH video hashing model (CVPR 2025): frame features (N, T, F) float32 in, packed binary codes "
    "(N, nbits / 8) uint8 out. Each version's description and tags give its data, recipe, bits, selected epoch "
    "and test scores; load it with mlflow.pyfunc.load_model or jobs/evaluate.py --model models:/NAME@ALIAS.")
MODEL_ARTIFACT = "model"
MODEL_STATE_FILE = "autossvh_model.pt"  # the state dict inside the logged pyfunc's artifacts
PREDICT_BATCH = 1024
# Models from code: MLflow stores this script instead of a cloudpickle of the model object, so loading the
# model runs no pickled code; it imports HashCodeModel from the code paths logged with the model.
MODEL_CODE = """import mlflow

from cluster.tracking import HashCodeModel

mlflow.models.set_model(HashCodeModel())
"""
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")


class TrackingError(RuntimeError):
    """The MLflow tracking store cannot be used (unreachable server, missing folder); the message names it."""


def is_secret_key(key: object) -> bool:
    """True when a mapping key names a secret (key/secret/token/password/credential, any case)."""
    lowered = str(key).lower()
    return any(word in lowered for word in SECRET_WORDS)


def redact_url(text: str) -> str:
    """Mask the ``user:password@`` part of every URL in ``text`` (``s3://AKIA:x@host`` → ``s3://***@host``)."""
    return _URL_USERINFO.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", text)


def redact(mapping: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``mapping`` with secret-named values replaced by ``"***"``, recursively through nested
    mappings and lists; credentials in URL strings are masked too. The input is not modified."""
    return {key: REDACTED if is_secret_key(key) else _redact_value(value) for key, value in mapping.items()}


def _redact_value(value: Any) -> Any:
    if isinstance(value, Mapping):
        return redact(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_redact_value(v) for v in value)
    if isinstance(value, str):
        return redact_url(value)
    return value


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _param_value(value: Any) -> str:
    """Params are strings: lists and tuples as ``[250, 400, 600]``, everything else through ``str``."""
    if isinstance(value, tuple):
        value = list(value)
    return str(value)


def check_reachable(tracking_uri: str, timeout: float = 5.0) -> None:
    """Fail fast with a clear error when an http(s) tracking server does not answer, instead of MLflow's
    minutes of retries; for a ``sqlite:///`` URI, check that the database's folder exists."""
    if tracking_uri.startswith(("http://", "https://")):
        url = tracking_uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout):  # noqa: S310 (http(s) only, checked above)
                pass
        except urllib.error.HTTPError:
            return  # the server answered; an error status still means it is reachable
        except (urllib.error.URLError, OSError, ValueError) as err:
            reason = getattr(err, "reason", err)
            raise TrackingError(
                f"MLflow tracking server {redact_url(tracking_uri)} is unreachable within {timeout:g} s "
                f"({reason}); start it, fix --mlflow-uri, or use a local "
                f"sqlite:///path/mlflow.db"
            ) from None
    elif tracking_uri.startswith("sqlite:///"):
        folder = Path(tracking_uri.removeprefix("sqlite:///")).parent
        if not folder.is_dir():
            raise TrackingError(f"MLflow tracking URI {tracking_uri}: folder {folder} does not exist")


def start_run(
    tracking_uri: str,
    experiment: str,
    run_name: str | None = None,
    run_id: str | None = None,
    *,
    artifact_location: str | None = None,
    parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
    timeout: float = 5.0,
) -> mlflow.ActiveRun:
    """Start (or, with ``run_id``, continue) a run and return it (a context manager).

    The experiment is created when missing, with ``artifact_location`` if given. Continuing keeps the same run
    id, so a restarted job continues its metric history; store the id in the checkpoint to resume. A new run
    with ``parent_run_id`` is that run's child (a sweep's trial); ``tags`` are set on a new run (MLflow's
    ``mlflow.source.name`` among them replaces the process's own script, a Ray worker's).
    """
    if run_id is not None:
        return continue_run(tracking_uri, run_id, timeout)
    check_reachable(tracking_uri, timeout)
    mlflow.set_tracking_uri(tracking_uri)
    experiment_id = _experiment_id(MlflowClient(tracking_uri), experiment, artifact_location)
    active = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, parent_run_id=parent_run_id,
                              tags=dict(tags or {}))
    log.debug("MLflow: run %s (%s) in experiment %r at %s", active.info.run_id, run_name, experiment,
              redact_url(tracking_uri))
    return active


def continue_run(tracking_uri: str, run_id: str, timeout: float = 5.0) -> mlflow.ActiveRun:
    """Make run ``run_id`` the active run again (its metric history continues); a context manager."""
    check_reachable(tracking_uri, timeout)
    mlflow.set_tracking_uri(tracking_uri)
    log.debug("MLflow: continuing run %s in %s", run_id, redact_url(tracking_uri))
    return mlflow.start_run(run_id=run_id)


def create_run(tracking_uri: str, experiment: str, run_name: str, *, artifact_location: str | None = None,
               parent_run_id: str | None = None, tags: Mapping[str, str] | None = None,
               params: Mapping[str, str] | None = None) -> str:
    """A new run, left RUNNING and not active in this process: the driver creates it, so that every attempt of
    a Train run (Ray's retries) logs to the same run, and the driver can mark it FAILED. It records the user
    (``mlflow.user``, as MLflow's own ``start_run`` does) and ``params``."""
    check_reachable(tracking_uri)
    client = MlflowClient(tracking_uri)
    tags = {"mlflow.user": current_user(), **(tags or {}),
            **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})}
    run_id = client.create_run(_experiment_id(client, experiment, artifact_location), tags=tags,
                               run_name=run_name).info.run_id
    if params:
        client.log_batch(run_id, params=[Param(key, value) for key, value in params.items()])
    return run_id


def current_user() -> str:
    """The user a run records (the MLflow UI's "Created by"): the login name, else ``unknown``."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name and no passwd entry for the uid (some containers)
        return "unknown"


def child_run(tracking_uri: str, experiment: str, run_name: str, parent_run_id: str, params: Mapping[str, str],
              *, artifact_location: str | None = None, tags: Mapping[str, str] | None = None) -> str:
    """The child run of ``parent_run_id`` named ``run_name``: an earlier attempt's (a trial re-run after its job
    was stopped) when one exists and logged no other ``params``, else a new one. A re-run thus never leaves two
    children of one name; an earlier child with other params (the trial's settings changed) stays as it ended."""
    for run in children(tracking_uri, parent_run_id, run_name):
        if all(run.data.params.get(key, value) == value for key, value in params.items()):
            return run.info.run_id
    return create_run(tracking_uri, experiment, run_name, artifact_location=artifact_location,
                      parent_run_id=parent_run_id, tags=tags)


def children(tracking_uri: str, parent_run_id: str, run_name: str | None = None,
             status: str | None = None) -> list[Any]:
    """The child runs of ``parent_run_id`` (of that name, in that status, where given), the newest first."""
    client = MlflowClient(tracking_uri)
    clauses = [f"tags.mlflow.parentRunId = '{parent_run_id}'"]
    if run_name is not None:
        clauses.append(f"attributes.run_name = '{run_name}'")
    if status is not None:
        clauses.append(f"attributes.status = '{status}'")
    return client.search_runs([client.get_run(parent_run_id).info.experiment_id], " and ".join(clauses),
                              order_by=["attributes.start_time DESC"])


def end_run(tracking_uri: str, run_id: str, status: str, reason: str | None = None) -> None:
    """End run ``run_id`` as ``status`` (FINISHED, FAILED or KILLED), with ``reason`` in :data:`END_REASON_TAG`."""
    client = MlflowClient(tracking_uri)
    if reason is not None:
        client.set_tag(run_id, END_REASON_TAG, reason[:END_REASON_LENGTH])
    client.set_terminated(run_id, status)


def end_open_children(tracking_uri: str, parent_run_id: str, status: str, reason: str) -> list[str]:
    """End every child of ``parent_run_id`` still RUNNING as ``status`` with ``reason``; returns their names."""
    running = children(tracking_uri, parent_run_id, status="RUNNING")
    for run in running:
        end_run(tracking_uri, run.info.run_id, status, reason)
    return [run.info.run_name for run in running]


def reopen_run(tracking_uri: str, run_id: str) -> None:
    """Mark run ``run_id`` RUNNING again without its end reason: a parent whose remaining trials a re-run runs,
    the child run a re-run trial continues."""
    client = MlflowClient(tracking_uri)
    client.update_run(run_id, status="RUNNING")
    if END_REASON_TAG in client.get_run(run_id).data.tags:
        client.delete_tag(run_id, END_REASON_TAG)


def _experiment_id(client: MlflowClient, experiment: str, artifact_location: str | None) -> str:
    """The id of ``experiment``, created (with ``artifact_location``) when missing."""
    found = client.get_experiment_by_name(experiment)
    return found.experiment_id if found is not None else client.create_experiment(
        experiment, artifact_location=artifact_location)


def mark_failed(tracking_uri: str, run_id: str) -> None:
    """End run ``run_id`` as FAILED (a run whose training failed must not look finished or still running)."""
    MlflowClient(tracking_uri).set_terminated(run_id, "FAILED")


def git_commit(root: Path) -> str | None:
    """The checkout's commit, or None outside a git checkout (a job's uploaded working directory has none)."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def run_tags(job: str, data_label: str, cfg: Config) -> dict[str, str]:
    """Tags of a new training run: its source (the job script, not the Ray worker that creates the run), the
    code's commit where known, and what was trained."""
    root = Path(__file__).resolve().parents[1]
    script = Path(job).resolve()
    tags = {"mlflow.source.name": str(script.relative_to(root)) if script.is_relative_to(root) else job,
            "mlflow.source.type": "LOCAL", "dataset": data_label, "recipe": cfg.recipe,
            "nbits": str(cfg.model.nbits)}
    commit = git_commit(root)
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def log_store_input(store: FeatureStore) -> None:
    """Log the feature store as the active run's training input: its URL, a digest of its sources, the feature
    schema, and the split sizes and protocol as tags."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.types import Schema, TensorSpec

    info = store.info
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "can be interpreted in multiple ways": the URL says which
        source = resolve_dataset_source(redact_url(store.url))
    digest = hashlib.sha256(json.dumps(info.sources, sort_keys=True, default=str).encode()).hexdigest()[:16]
    schema = Schema([TensorSpec(np.dtype(info.dtype), (-1, info.max_frames, info.feature_dim), "feats")])
    dataset = MetaDataset(source, name=store.label, digest=digest, schema=schema)
    tags = {f"{split}_videos": str(n) for split, n in info.counts.items()} | {"protocol": info.protocol}
    mlflow.log_input(dataset, context="training", tags=tags)


def model_card(data_label: str, data_url: str, cfg: Config, retrieval: Retrieval, selected_epoch: int,
               selection: str) -> ModelCard:
    """The registry's description and tags of a trained model version (``selected_epoch`` counted from 1)."""
    tags = {"dataset": data_label, "data": redact_url(data_url), "recipe": cfg.recipe, "nbits": str(cfg.model.nbits),
            "selected_epoch": str(selected_epoch), "selection": selection,
            "gmap_l2": f"{retrieval.gmap_l2:.4f}", "map_at_5": f"{retrieval.map_at_k[5]:.4f}"}
    description = (f"AutoSSVH, {cfg.model.nbits} bits, {cfg.recipe} recipe, trained on {data_label} "
                   f"({redact_url(data_url)}); epoch {selected_epoch} of {cfg.train.num_epochs} ({selection}); test "
                   f"GMAP {retrieval.gmap_l2:.4f}, mAP@5 {retrieval.map_at_k[5]:.4f}.")
    return ModelCard(description, tags)


def ui_command(tracking_uri: str) -> str:
    """The command that serves a local tracking store's UI on 127.0.0.1:5000 and stops on Ctrl-C: one uvicorn
    worker and no job runner (MLflow's defaults, 4 workers and a job runner with its consumers, kept restarting
    and served no page for minutes on a loaded 2-core machine)."""
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    try:
        mlflow_bin = mlflow_bin.relative_to(Path.cwd())
    except ValueError:
        pass
    return (f"MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false {mlflow_bin} ui --backend-store-uri {tracking_uri} "
            "--port 5000 --workers 1")


def ui_hint(tracking_uri: str, run_id: str) -> str:
    """How to look at a run: the command that serves a local store's UI (:func:`ui_command`) and the run's page."""
    experiment = MlflowClient(tracking_uri).get_run(run_id).info.experiment_id
    page = f"#/experiments/{experiment}/runs/{run_id}"
    if tracking_uri.startswith(("http://", "https://")):
        return f"MLflow run: {redact_url(tracking_uri).rstrip('/')}/{page}"
    return f"MLflow UI: {ui_command(tracking_uri)}\nthen open http://127.0.0.1:5000/{page}"


def config_params(cfg: Config, extra_params: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The flattened config (``train.lr``, ...) plus flattened ``extra_params``, redacted, as strings."""
    params = {**cfg.flat(), **_flatten(redact(extra_params or {}))}
    return {key: _param_value(value) for key, value in redact(params).items()}


def log_config(cfg: Config, extra_params: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Log the config and extra params (e.g. ``{"storage_options": {...}, "world_size": 4}``) as params of
    the active run; secrets are redacted first. Returns what was logged.

    On a resumed run the values must be the same as before (MLflow refuses to change a param)."""
    params = config_params(cfg, extra_params)
    mlflow.log_params(params)
    return params


def epoch_step(epoch: int) -> int:
    """The MLflow step of 0-based epoch ``epoch``: epochs are counted from 1 wherever a user reads them."""
    return epoch + 1


def epoch_metrics(record: EpochRecord, num_cluster: Sequence[int] | None = None) -> dict[str, float]:
    """Metric name → value for one epoch, grouped by prefix so that the MLflow UI groups the charts:
    ``loss/`` (total and unweighted parts; ``rank`` with the predicted sampler), ``map/`` (mAP@K and GMAP),
    ``train/``, ``time/`` (seconds), ``cluster/`` (the k-means objective by granularity k,
    ``kmeans_objective_k{k}``, or ``..._{i}`` without ``num_cluster``) and ``sampler/`` (the sampler's
    diagnostics). The rest of a clustering round's report (iterations, seconds, empty and merged clusters,
    distinct centres, warm start: mostly constant charts that would come before loss and mAP in the UI) goes to
    the ``clustering_rounds.csv`` table at the end (:func:`clustering_rounds_csv`)."""
    s = record.stats
    metrics = {
        "loss/total": s.loss, "loss/rec": s.rec, "loss/vc": s.vc, "loss/p2set": s.p2set,
        "train/lr": record.lr, "train/videos_per_s": s.videos_per_s, "train/skipped_steps": float(s.skipped_steps),
        "time/train_s": s.seconds, "time/cluster_s": record.cluster_seconds, "time/eval_s": record.eval_seconds,
    }
    if s.rank:  # Grade-Net's ranking loss, sampler.kind=predicted only
        metrics["loss/rank"] = s.rank
    objectives = [] if record.clustering is None else record.clustering.metrics()[EPOCH_CLUSTER_METRIC]
    for i, value in enumerate(objectives):
        metrics[f"cluster/{EPOCH_CLUSTER_METRIC}_{_granularity(i, num_cluster)}"] = value
    if record.sampler is not None:
        metrics.update(record.sampler.metrics())
    if record.retrieval is not None:
        metrics.update(retrieval_metrics(record.retrieval))
    return {key: float(value) for key, value in metrics.items()}


def _granularity(index: int, num_cluster: Sequence[int] | None) -> str:
    """``k{k}`` of the ``index``-th granularity, or the index without ``num_cluster``."""
    return f"k{num_cluster[index]}" if num_cluster and index < len(num_cluster) else str(index)


def clustering_rounds_csv(history: Sequence[EpochRecord], num_cluster: Sequence[int] | None = None) -> str:
    """Every clustering round's report as a table: one row per epoch (counted from 1) and granularity."""
    rows = [(record.epoch, record.clustering.metrics()) for record in history if record.clustering is not None]
    if not rows:
        return ""
    names = list(rows[0][1])
    lines = [",".join(["epoch", "granularity", *names])]
    for epoch, report in rows:
        for i in range(len(report[names[0]])):
            values = [f"{report[name][i]:g}" for name in names]
            lines.append(",".join([str(epoch_step(epoch)), _granularity(i, num_cluster), *values]))
    return "\n".join(lines) + "\n"


def retrieval_metrics(retrieval: Retrieval) -> dict[str, float]:
    """``map/at_{K}`` and ``map/gmap_l2``."""
    return {f"map/at_{k}": v for k, v in retrieval.map_at_k.items()} | {"map/gmap_l2": retrieval.gmap_l2}


def log_epoch(record: EpochRecord, num_cluster: Sequence[int] | None = None) -> None:
    """Log one epoch's metrics to the active run at its step (:func:`epoch_step`)."""
    mlflow.log_metrics(epoch_metrics(record, num_cluster), step=epoch_step(record.epoch))


def log_final_artifacts(cfg: Config, retrieval: Retrieval, history: Sequence[EpochRecord],
                        out_dir: str | Path, title: str) -> dict[str, Path]:
    """Write the result files (:func:`cluster.results.write_result_files`) and the clustering rounds' table
    (``clustering_rounds.csv``) and log them to the active run."""
    paths = write_result_files(cfg, retrieval, history, out_dir, title)
    rounds = clustering_rounds_csv(history, cfg.cluster.num_cluster)
    if rounds:
        paths["clustering_rounds"] = Path(out_dir) / "clustering_rounds.csv"
        paths["clustering_rounds"].write_text(rounds)
    for path in paths.values():
        mlflow.log_artifact(str(path))
    return paths


class HashCodeModel(mlflow.pyfunc.PythonModel):
    """Pyfunc over a saved AutoSSVH state dict: frame features (N, T, F) float32 → packed codes (N, nbits/8).

    Bit j of a video is 1 where its code is +1 and 0 where it is -1 **or 0**: a tie in the sign of the
    mean frame code (code 0) packs as 0, so the packed form loses the distinction between -1 and 0 that the
    int8 codes of :func:`autossvh.engine.encode` keep. Bits are packed big-endian per byte (``np.packbits``).
    """

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.model = load_model(context.artifacts[MODEL_ARTIFACT], map_location="cpu").eval()  # weights_only

    def predict(self, context, model_input: np.ndarray, params=None):
        """Packed codes of ``model_input`` (N, T, F). The ``np.ndarray`` hint is one MLflow derives no schema
        from, so it keeps the logged tensor signature (and does not warn that hints are missing)."""
        return packed_codes(self.model, np.asarray(model_input, dtype=np.float32))


def packed_codes(model: AutoSSVH, feats: np.ndarray, batch_size: int = PREDICT_BATCH) -> np.ndarray:
    """Eval-mode codes of (N, T, F) features packed as uint8 (N, nbits / 8); a 0 (tie) bit packs as 0."""
    if feats.ndim != 3:
        raise ValueError(f"expected frame features of shape (N, T, F), got shape {feats.shape}")
    codes = encode(model, array_batches(feats, batch_size)).codes
    return np.packbits(codes > 0, axis=1)  # as autossvh.search.pack_codes, which imports faiss: the pyfunc must not


def pip_requirements() -> list[str]:
    """Exact pins of what loading the pyfunc needs, from the installed versions (local tags such as
    ``+cpu`` dropped, so the same pin resolves on CPU and GPU machines)."""
    names = ("torch", "numpy", "PyYAML")
    return [f"{name}=={importlib.metadata.version(name).split('+')[0]}" for name in names]


@dataclass
class ModelCard:
    """What the registry shows of a model: a description and tags, for the registered model and its version."""

    description: str
    tags: dict[str, str]


def log_model(model: AutoSSVH, *, step: int, register: str | None = None, card: ModelCard | None = None,
              name: str = "model") -> str:
    """Log ``model`` to the active run as a pyfunc named ``name``, linked to the run's metrics at ``step`` (the
    selected epoch's); with ``register``, register a version of that registered model, point its alias
    ``candidate`` at it, and give the model and the version ``card``'s description and tags.

    Returns the URI to load it with ``mlflow.pyfunc.load_model``: ``models:/REGISTER@candidate`` when
    registered, else the logged model's own URI.
    """
    cfg = model.cfg
    example = np.random.default_rng(0).standard_normal(
        (2, cfg.data.max_frames, cfg.data.feature_size)).astype(np.float32)
    signature = mlflow.models.infer_signature(example, packed_codes(model, example))
    package_dir = Path(autossvh.__file__).resolve().parent
    code_paths = [str(package_dir), str(Path(__file__).resolve().parent)]
    with tempfile.TemporaryDirectory() as tmp:
        state_path = Path(tmp) / MODEL_STATE_FILE
        save_model(state_path, model)
        model_code = Path(tmp) / "hash_code_model.py"
        model_code.write_text(MODEL_CODE)
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=str(model_code),
            artifacts={MODEL_ARTIFACT: str(state_path)},
            signature=signature,
            input_example=example,
            pip_requirements=pip_requirements(),
            code_paths=code_paths,
            step=step,
            tags=None if card is None else card.tags | {NOTE_TAG: card.description},
        )
    log.debug("MLflow: logged model %s", info.model_uri)
    if register is None:
        return info.model_uri
    client = MlflowClient()
    with contextlib.redirect_stderr(io.StringIO()):  # MLflow prints "Successfully registered ..." there
        version = mlflow.register_model(info.model_uri, register, tags=None if card is None else card.tags)
    client.set_registered_model_alias(register, CANDIDATE_ALIAS, version.version)
    if card is not None:
        client.update_registered_model(register, description=REGISTERED_MODEL_DESCRIPTION)
        client.set_registered_model_tag(register, "dataset", card.tags["dataset"])
        client.update_model_version(register, version.version, description=card.description)
    uri = f"models:/{register}@{CANDIDATE_ALIAS}"
    log.debug("MLflow: registered %s version %s as %s", register, version.version, uri)
    return uri
