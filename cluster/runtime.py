"""Where a job runs: Ray start-up, the log format, absolute paths for Ray workers, and the MLflow locations."""

from __future__ import annotations

import argparse
import logging
import math
import os
from pathlib import Path

LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"
# What a sweep's or an ablation's Tune function reserves: it only drives its Train run (whose workers reserve
# their own CPUs) and logs the results, so not Tune's default of a whole CPU, which on 2 cores kept a second
# trial's Train worker waiting for a CPU the first trial's idle function held.
TRIAL_DRIVER_CPUS = 0.25
log = logging.getLogger(__name__)


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
    if not verbose:
        _log_raylet_messages()
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **quiet)
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    ray.init(num_cpus=local_cpus(min_cpus, num_cpus), include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}}, **quiet)


def _log_raylet_messages() -> None:
    """Ray's driver prints what the raylet pushes to it (worker-pool size warnings, worker deaths) to stdout,
    ``log_to_driver`` or not; send those lines to the ``ray.raylet`` logger instead, so that warnings show with
    ``--verbose`` only (they are in the raylet's session log as well) and errors always."""
    import ray._private.worker as ray_worker

    printer = ray_worker.print_to_stdstream
    if getattr(printer, "routes_raylet_messages", False):
        return
    raylet = logging.getLogger("ray.raylet")

    def route(data: dict, ignore_prefix: bool) -> None:
        if data.get("pid") != "raylet":
            printer(data, ignore_prefix)
            return
        for line in data.get("lines", []):
            raylet.log(logging.WARNING if line.lstrip().startswith("WARNING") else logging.ERROR, "%s", line)

    route.routes_raylet_messages = True
    ray_worker.print_to_stdstream = route


def local_cpus(min_cpus: int, num_cpus: int | None = None) -> int:
    """The logical CPUs of the local Ray :func:`init_ray` starts: ``num_cpus``, else the cores (at least
    ``min_cpus``)."""
    return num_cpus or max(os.cpu_count() or 1, min_cpus)


def trial_resources(args: argparse.Namespace, cluster: dict[str, float]) -> tuple[float, int]:
    """GPUs per worker (given, or 1 on a cluster with GPUs) and the trials the cluster runs at once (0 when not
    even one fits): each takes its Train workers' GPUs, or its :func:`trial_cpus`."""
    gpus = args.gpus_per_worker if args.gpus_per_worker > 0 else (1.0 if cluster.get("GPU", 0) >= 1 else 0.0)
    if gpus > 0:
        return gpus, math.floor(cluster.get("GPU", 0) / (gpus * args.workers))
    return gpus, math.floor(cluster.get("CPU", 0) / trial_cpus(args))


def trial_cpus(args: argparse.Namespace) -> float:
    """The CPUs one trial reserves: its Tune function's (:data:`TRIAL_DRIVER_CPUS`) and its Train workers'."""
    return TRIAL_DRIVER_CPUS + args.workers * args.cpus_per_worker


def trials_at_once(args: argparse.Namespace, cluster: dict[str, float], trials: int) -> int:
    """The trials a sweep or an ablation runs at once: ``--max-concurrent``, else as many as ``cluster`` holds
    (at least 1, at most ``trials``). Asking for more than the cluster holds (``--max-concurrent``, or one trial
    bigger than the cluster) would keep Train workers waiting for resources a running trial holds, or forever: on
    the local Ray a job starts, whose resources are known, it is refused (ValueError naming the options); on a
    cluster (``RAY_ADDRESS``, where an autoscaler may add nodes) it is said in a warning."""
    gpus, fits = trial_resources(args, cluster)
    wanted = args.max_concurrent or 1
    if wanted <= fits:
        return min(args.max_concurrent or fits, trials)
    if gpus > 0:
        need = f"{cluster.get('GPU', 0):g} GPUs; a trial takes {args.workers} worker(s) x {gpus:g}"
    else:
        need = (f"{cluster.get('CPU', 0):g} CPUs; a trial takes {trial_cpus(args):g}: {TRIAL_DRIVER_CPUS:g} for its "
                f"Tune function + {args.workers} worker(s) x {args.cpus_per_worker:g}")
    where = "the cluster at RAY_ADDRESS" if os.environ.get("RAY_ADDRESS") else "the local Ray this job starts"
    asked = f"--max-concurrent {args.max_concurrent}" if args.max_concurrent else "one trial"
    message = f"{asked}: {where} holds {fits} trial(s) at once ({need})"
    if os.environ.get("RAY_ADDRESS"):
        log.warning("%s; the other trials wait for resources unless the autoscaler adds nodes", message)
        return min(wanted, trials)
    per_worker = "--gpus-per-worker" if gpus > 0 else "--cpus-per-worker"
    if fits:
        raise ValueError(f"{message}; the other trials' Train workers would wait for a running trial's resources for "
                         f"all of it. Use --max-concurrent {fits}, or fewer --workers or {per_worker}")
    raise ValueError(f"{message}; its Train workers would wait for resources that are never free. Use fewer "
                     f"--workers or {per_worker}{'' if gpus > 0 else ', or more --num-cpus'}")


def local_resources(min_cpus: int, num_cpus: int | None) -> dict[str, float] | None:
    """The resources of the local Ray a job would start (None when it connects to ``RAY_ADDRESS`` instead), to
    check a request against before Ray starts."""
    if os.environ.get("RAY_ADDRESS"):
        return None
    import torch

    return {"CPU": float(local_cpus(min_cpus, num_cpus)), "GPU": float(torch.cuda.device_count())}
