"""MLflow tracking of a training run: params, per-epoch metrics, result artifacts and the model registry.

One MLflow run per training run, written only by rank 0 or the driver (the caller decides; nothing here
checks the rank). Secrets never reach MLflow: :func:`redact` masks every value whose key names a key,
secret, token, password or credential, and credentials inside URLs, before params are logged or errors are
raised. The model is logged as a pyfunc over our own state dict (:func:`autossvh.engine.save_model`), which
maps frame features (N, T, F) float32 to packed uint8 codes (N, nbits / 8), so no torch.export or pickled
``nn.Module`` is involved; ``autossvh/`` and ``cluster/`` travel with it as code paths.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import re
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import numpy as np
import yaml
from mlflow.tracking import MlflowClient

import autossvh
from autossvh.config import Config
from autossvh.engine import Retrieval, array_batches, encode, load_model, save_model
from autossvh.metrics import plot_pr_curve
from autossvh.model import AutoSSVH
from autossvh.trainer import EpochRecord

log = logging.getLogger(__name__)

REDACTED = "***"
SECRET_WORDS = ("key", "secret", "token", "password", "credential")
CANDIDATE_ALIAS = "candidate"
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
    timeout: float = 5.0,
) -> mlflow.ActiveRun:
    """Start (or, with ``run_id``, resume) the run of a training run and return it (a context manager).

    The experiment is created when missing, with ``artifact_location`` if given. Resuming keeps the same run
    id, so a restarted job continues its metric history; store the id in the checkpoint to resume. A new run
    with ``parent_run_id`` is that run's child (a sweep's trial).
    """
    check_reachable(tracking_uri, timeout)
    mlflow.set_tracking_uri(tracking_uri)
    if run_id is not None:
        active = mlflow.start_run(run_id=run_id)
        log.info("MLflow: resumed run %s in %s", run_id, redact_url(tracking_uri))
        return active
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = (
        found.experiment_id if found is not None
        else client.create_experiment(experiment, artifact_location=artifact_location)
    )
    active = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, parent_run_id=parent_run_id)
    log.info("MLflow: run %s (%s) in experiment %r at %s", active.info.run_id, run_name, experiment,
             redact_url(tracking_uri))
    return active


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


def epoch_metrics(record: EpochRecord, num_cluster: Sequence[int] | None = None) -> dict[str, float]:
    """Metric name → value for one epoch. The k-means objective and the number of distinct voted centres are
    named ``kmeans_objective_k{k}`` and ``distinct_centers_k{k}`` by the granularity k (``num_cluster``, in the
    order the clustering ran), or ``..._{i}`` without it; the sampler's diagnostics ``sampler/...``."""
    s = record.stats
    metrics = {
        "loss": s.loss, "loss_rec": s.rec, "loss_vc": s.vc, "loss_p2set": s.p2set, "lr": record.lr,
        "videos_per_s": s.videos_per_s, "skipped_steps": float(s.skipped_steps),
        "cluster_seconds": record.cluster_seconds, "train_seconds": s.seconds, "eval_seconds": record.eval_seconds,
    }
    for prefix, values in (("kmeans_objective", record.kmeans_objective),
                           ("distinct_centers", record.distinct_centers)):
        for i, value in enumerate(values):
            suffix = f"k{num_cluster[i]}" if num_cluster and i < len(num_cluster) else str(i)
            metrics[f"{prefix}_{suffix}"] = value
    if record.sampler is not None:
        metrics.update(record.sampler.metrics())
    if record.retrieval is not None:
        metrics.update({f"map_at_{k}": v for k, v in record.retrieval.map_at_k.items()})
        metrics["gmap_l2"] = record.retrieval.gmap_l2
    return {key: float(value) for key, value in metrics.items()}


def log_epoch(record: EpochRecord, step: int | None = None, num_cluster: Sequence[int] | None = None) -> None:
    """Log one epoch's metrics to the active run at ``step`` (default: the epoch number)."""
    mlflow.log_metrics(epoch_metrics(record, num_cluster), step=record.epoch if step is None else step)


def map_table_dict(retrieval: Retrieval) -> dict[str, Any]:
    return {"map_at_k": {str(k): retrieval.map_at_k[k] for k in sorted(retrieval.map_at_k)},
            "gmap_l2": retrieval.gmap_l2}


def map_table_csv(retrieval: Retrieval) -> str:
    """The published table layout: one header row ``mAP@5,...,GMAP(L2)`` and one row of values."""
    ks = sorted(retrieval.map_at_k)
    header = ",".join([*(f"mAP@{k}" for k in ks), "GMAP(L2)"])
    row = ",".join([*(f"{retrieval.map_at_k[k]:.6f}" for k in ks), f"{retrieval.gmap_l2:.6f}"])
    return f"{header}\n{row}\n"


def plot_training_curve(history: Sequence[EpochRecord], path: str | Path) -> Path:
    """Losses (left axis) and mAP@5 (right axis; the smallest K if 5 is absent) against the epoch, as PNG.
    Uses ``matplotlib.figure.Figure`` directly, so the pyplot backend is neither needed nor changed."""
    from matplotlib.figure import Figure

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(6.0, 4.0), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    epochs = [r.epoch for r in history]
    for attr, label in (("loss", "loss"), ("rec", "rec"), ("vc", "vc"), ("p2set", "p2set")):
        ax.plot(epochs, [getattr(r.stats, attr) for r in history], label=label, linewidth=1.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    evaluated = [r for r in history if r.retrieval is not None and r.retrieval.map_at_k]
    if evaluated:
        ks = evaluated[-1].retrieval.map_at_k
        k = 5 if 5 in ks else min(ks)
        points = [(r.epoch, r.retrieval.map_at_k[k]) for r in evaluated if k in r.retrieval.map_at_k]
        ax2 = ax.twinx()
        ax2.plot([p[0] for p in points], [p[1] for p in points], color="black", marker="o", linestyle="--",
                 label=f"mAP@{k}")
        ax2.set_ylabel(f"mAP@{k}")
        ax2.legend(loc="upper right", fontsize=8)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, format="png")
    return out


def plot_sampler_deciles(history: Sequence[EpochRecord], uniform: float, path: str | Path) -> Path | None:
    """P(hidden) of the frames in each tenth of their video's Grade-Net ranking, at up to five epochs spread
    over the run, as PNG; None when the run has no adversarial sampler."""
    from matplotlib.figure import Figure

    records = [r for r in history if r.sampler is not None and not np.isnan(r.sampler.hidden_by_decile).all()]
    if not records:
        return None
    shown = [records[i] for i in sorted({round(j * (len(records) - 1) / 4) for j in range(5)})]
    fig = Figure(figsize=(6.4, 4.2), dpi=120)
    ax = fig.add_subplot(1, 1, 1)
    deciles = np.arange(1, 11)
    for record in shown:
        ax.plot(deciles, record.sampler.hidden_by_decile, marker="o", linewidth=1.4,
                label=f"epoch {record.epoch + 1} (selectivity {record.sampler.selectivity:.2f})")
    ax.axhline(uniform, color="grey", linestyle="--", linewidth=1.0, label=f"uniform K/T = {uniform:.2f}")
    ax.set_xticks(deciles)
    ax.set_xlabel("Grade-Net logit decile within the video (1 = lowest scored frames)")
    ax.set_ylabel("P(frame hidden by a view)")
    ax.set_ylim(0, 1)
    ax.set_title("Which frames the sampler hides (probe videos, 8 draws)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, format="png")
    return out


def write_final_artifacts(cfg: Config, retrieval: Retrieval, history: Sequence[EpochRecord],
                          out_dir: str | Path) -> dict[str, Path]:
    """Write the result files into ``out_dir``: ``config.yaml`` (resolved config), ``map_table.json``,
    ``map_table.csv``, ``map_table.txt``, ``training_curve.png``, with the adversarial sampler
    ``sampler_deciles.png`` and, when the retrieval has precision/recall, ``pr_curve.png``. Returns name → path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "config": out / "config.yaml", "map_json": out / "map_table.json", "map_csv": out / "map_table.csv",
        "map_txt": out / "map_table.txt",
    }
    paths["config"].write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    paths["map_json"].write_text(json.dumps(map_table_dict(retrieval), indent=2) + "\n")
    paths["map_csv"].write_text(map_table_csv(retrieval))
    paths["map_txt"].write_text(retrieval.table(f"{cfg.dataset} {cfg.model.nbits} bits") + "\n")
    paths["training_curve"] = plot_training_curve(history, out / "training_curve.png")
    deciles = plot_sampler_deciles(history, cfg.num_hidden / cfg.data.max_frames, out / "sampler_deciles.png")
    if deciles is not None:
        paths["sampler_deciles"] = deciles
    if retrieval.pr_by_radius is not None:
        radii, precision, recall = retrieval.pr_by_radius
        paths["pr_curve"] = plot_pr_curve(radii, precision, recall, out / "pr_curve.png",
                                          title=f"{cfg.dataset} {cfg.model.nbits} bits")
    else:
        log.warning("no precision/recall in the final retrieval: pr_curve.png not written")
    return paths


def log_final_artifacts(cfg: Config, retrieval: Retrieval, history: Sequence[EpochRecord],
                        out_dir: str | Path) -> dict[str, Path]:
    """Write the result files (see :func:`write_final_artifacts`) and log them to the active run's root."""
    paths = write_final_artifacts(cfg, retrieval, history, out_dir)
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

    def predict(self, context, model_input, params=None):
        """Packed codes of ``model_input`` (N, T, F); left without type hints, since MLflow 3 would otherwise
        derive (and warn about) a schema from them instead of using the logged tensor signature."""
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


def log_model(model: AutoSSVH, name: str = "model", register: str | None = None) -> str:
    """Log ``model`` to the active run as a pyfunc named ``name``; with ``register``, register a version of
    that registered model and point its alias ``candidate`` at it.

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
        )
    log.info("MLflow: logged model %s", info.model_uri)
    if register is None:
        return info.model_uri
    version = mlflow.register_model(info.model_uri, register)
    MlflowClient().set_registered_model_alias(register, CANDIDATE_ALIAS, version.version)
    uri = f"models:/{register}@{CANDIDATE_ALIAS}"
    log.info("MLflow: registered %s version %s as %s", register, version.version, uri)
    return uri
