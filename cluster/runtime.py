"""Where a job runs: Ray start-up, the log format, absolute paths for Ray workers, and the MLflow locations."""

from __future__ import annotations

import argparse
import logging
import math
import os
from pathlib import Path

LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"


def configure_logging(verbose: bool = False, force: bool = False) -> None:
    """A job's console: our INFO lines with a timestamp; MLflow's and Ray's own only from WARNING and ERROR up
    (everything with ``verbose``). ``force`` replaces the handlers a Ray worker process starts with."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, force=force)
    logging.getLogger("mlflow").setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("ray").setLevel(logging.INFO if verbose else logging.ERROR)


def absolute_uri(uri: str) -> str:
    """``sqlite:///relative.db`` → absolute path (Ray workers do not share the driver's working directory)."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    return uri


def absolute_path(url: str) -> str:
    """A local path made absolute; URLs (``s3://...``) unchanged."""
    return url if "://" in url else str(Path(url).resolve())


def mlflow_locations(tracking_uri: str, artifacts: str) -> tuple[str, str]:
    """The tracking URI (a relative SQLite path made absolute, its folder created) and the artifact location of
    a new experiment (a local folder as a ``file://`` URI)."""
    uri = absolute_uri(tracking_uri)
    if uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(f"--mlflow-uri {tracking_uri}: cannot create the folder {folder} "
                             f"({err.strerror or err})") from None
    return uri, artifacts if "://" in artifacts else Path(artifacts).resolve().as_uri()


def init_ray(min_cpus: int, num_cpus: int | None = None, verbose: bool = False) -> None:
    """Connect to the cluster at RAY_ADDRESS (``ray job submit`` sets it), else start a local Ray on 127.0.0.1
    without the dashboard, with ``num_cpus`` logical CPUs (default: the cores, at least ``min_cpus``).

    Unless ``verbose``, Ray's own lines stay out of the job's console: its driver-side logger shows errors only,
    and the output of Ray's processes (workers, actors, Ray Train's controller) is not forwarded; it stays in
    Ray's session logs, and what the job has to say comes back through :mod:`cluster.console`."""
    import ray

    if ray.is_initialized():
        return
    quiet = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.ERROR}
    logging.getLogger("ray").setLevel(logging.INFO if verbose else logging.ERROR)  # also before init's own setup
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **quiet)
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    ray.init(num_cpus=num_cpus or max(os.cpu_count() or 1, min_cpus), include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}}, **quiet)


def trial_resources(args: argparse.Namespace, cluster: dict[str, float]) -> tuple[float, int]:
    """GPUs per worker (given, or 1 on a cluster with GPUs) and the trials the cluster runs at once."""
    gpus = args.gpus_per_worker if args.gpus_per_worker > 0 else (1.0 if cluster.get("GPU", 0) >= 1 else 0.0)
    if gpus > 0:
        fits = math.floor(cluster.get("GPU", 0) / (gpus * args.workers))
    else:
        fits = math.floor(cluster.get("CPU", 1) / (args.cpus_per_worker * args.workers + 1))
    return gpus, max(1, fits)
