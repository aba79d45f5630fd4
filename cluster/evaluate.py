"""The ``jobs/evaluate.py`` job: a trained model's mAP@K table, GMAP and PR curve on a feature store."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from cluster.cli import add_model_arguments
from cluster.retrieval import evaluate_on_store, load_model_ref
from cluster.runtime import LOG_FORMAT, absolute_uri, init_ray
from cluster.tracking import map_table_dict, write_final_artifacts
from storage.writer import storage_options_from

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--out", type=Path, default=Path("runs/eval"),
                        help="folder for pr_curve.png and the mAP table (json, csv, txt)")
    parser.add_argument("--summary-json", type=Path, help="write the mAP@K and GMAP here")


def main(args: argparse.Namespace) -> int:
    """Evaluate ``--model`` on ``--data``; exit status 2 on a bad model reference, store or argument."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    try:
        options = storage_options_from(args.storage_options)
        model = load_model_ref(args.model, absolute_uri(args.mlflow_uri))
        if args.workers > 0:
            init_ray(args.workers + 1, args.num_cpus)
        retrieval = evaluate_on_store(model, args.data, options, args.workers, args.batch_size, args.gpus_per_worker)
    except ValueError as err:
        log.error("%s", err)
        return 2
    paths = write_final_artifacts(model.cfg, retrieval, [], args.out)
    print(retrieval.table(f"{args.model} on {args.data}"))
    print(f"PR curve: {paths['pr_curve']}")
    if args.summary_json is not None:
        args.summary_json.parent.mkdir(parents=True, exist_ok=True)
        args.summary_json.write_text(json.dumps({"model": args.model, "data": args.data,
                                                 **map_table_dict(retrieval)}, indent=2))
    return 0
