"""The ``jobs/promote.py`` job: move a registered model's alias (``candidate`` → ``champion``) behind a gate.

Both versions are evaluated on the same feature store by the same code (:func:`cluster.retrieval.evaluate_on_store`);
the alias moves only if the candidate's score (``--metric``, default ``gmap_l2``) is not below the champion's,
or with ``--force``. Both versions get their scores on that data as tags (``eval.<metric>``, ``eval.data``), and
the candidate also gets the comparison (``promotion``), so the registry records why an alias moved or not.
With no version under ``--to`` yet, the candidate is promoted after its evaluation.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from autossvh.engine import Retrieval
from cluster.cli import add_evaluation_arguments
from cluster.retrieval import evaluate_on_store, load_model_ref
from cluster.runtime import absolute_uri, configure_logging, init_ray
from cluster.tracking import TrackingError, check_reachable, redact_url
from storage.writer import storage_options_from

log = logging.getLogger(__name__)

METRICS = ("gmap_l2", "map_at_5", "map_at_20", "map_at_40", "map_at_60", "map_at_80", "map_at_100")


def score(retrieval: Retrieval, metric: str) -> float:
    return retrieval.gmap_l2 if metric == "gmap_l2" else retrieval.map_at_k[int(metric.removeprefix("map_at_"))]


@dataclass
class Decision:
    promoted: bool
    candidate_version: str
    champion_version: str | None
    candidate_score: float
    champion_score: float | None


def _alias_version(client: MlflowClient, name: str, alias: str, required: bool) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as err:
        if required:
            raise ValueError(f"registered model {name!r} has no version with alias {alias!r} ({err.message})") from err
        return None


def _tag_scores(client: MlflowClient, name: str, version: str, retrieval: Retrieval, data: str) -> None:
    client.set_model_version_tag(name, version, "eval.data", redact_url(data))
    for metric in METRICS:
        client.set_model_version_tag(name, version, f"eval.{metric}", f"{score(retrieval, metric):.6f}")


def promote(name: str, source: str, target: str, data: str, tracking_uri: str, metric: str = "gmap_l2",
            force: bool = False, options: dict | None = None, workers: int = 0, batch_size: int = 256,
            gpus_per_worker: float = 0.0) -> Decision:
    """Evaluate ``name@source`` (and ``name@target`` if set) on ``data`` and move ``target`` to the source's
    version when it is not worse on ``metric`` (or ``force``)."""
    check_reachable(tracking_uri)
    client = MlflowClient(tracking_uri)
    candidate = _alias_version(client, name, source, required=True)
    champion = _alias_version(client, name, target, required=False)

    def evaluate(version: str) -> Retrieval:
        model = load_model_ref(f"models:/{name}/{version}", tracking_uri)
        retrieval = evaluate_on_store(model, data, options, workers, batch_size, gpus_per_worker)
        _tag_scores(client, name, version, retrieval, data)
        log.info("%s version %s: %s = %.4f", name, version, metric, score(retrieval, metric))
        return retrieval

    candidate_score = score(evaluate(candidate), metric)
    champion_score = None if champion is None or champion == candidate else score(evaluate(champion), metric)
    promoted = force or champion_score is None or candidate_score >= champion_score
    verdict = "promoted" if promoted else "refused"
    reason = (f"{verdict}: {metric} {candidate_score:.4f} vs {target} v{champion} "
              f"{'-' if champion_score is None else f'{champion_score:.4f}'}{' (forced)' if force else ''}")
    client.set_model_version_tag(name, candidate, "promotion", reason)
    if promoted:
        client.set_registered_model_alias(name, target, candidate)
    log.info("%s version %s %s", name, candidate, reason)
    return Decision(promoted, candidate, champion, candidate_score, champion_score)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="registered model name")
    parser.add_argument("--from", dest="source", default="candidate", help="alias of the version to promote")
    parser.add_argument("--to", dest="target", default="champion", help="alias to move")
    parser.add_argument("--metric", choices=METRICS, default="gmap_l2", help="score compared by the gate")
    parser.add_argument("--force", action="store_true", help="move the alias even if the candidate is worse")
    add_evaluation_arguments(parser, default_workers=0)  # --data: the store both versions are evaluated on


def main(args: argparse.Namespace) -> int:
    """Exit status 0 when the alias moved, 1 when the gate refused it, 2 on bad input."""
    configure_logging(args.verbose)
    try:
        if args.workers > 0:
            init_ray(args.workers + 1, args.num_cpus, args.verbose)
        decision = promote(args.name, args.source, args.target, args.data, absolute_uri(args.mlflow_uri),
                           args.metric, args.force, storage_options_from(args.storage_options), args.workers,
                           args.batch_size, args.gpus_per_worker)
    except (ValueError, TrackingError) as err:
        log.error("%s", err)
        return 2
    champion = "none" if decision.champion_score is None else f"{decision.champion_score:.4f}"
    print(f"{args.name}: {args.source} v{decision.candidate_version} {args.metric}={decision.candidate_score:.4f}, "
          f"{args.target} v{decision.champion_version or '-'} {args.metric}={champion}: "
          f"{'promoted' if decision.promoted else 'not promoted (use --force to override)'}")
    return 0 if decision.promoted else 1
