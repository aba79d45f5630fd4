"""The ``jobs/evaluate.py`` job: trained models' mAP@K tables, GMAP, PR curves and mAP@K-by-K on a feature store.

Several ``--model`` options evaluate each on the same data and draw them as one curve each in the same figures
(for example one model per code length)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from cluster import plots
from cluster.cli import add_model_arguments
from cluster.preflight import check_evaluation_inputs
from cluster.results import map_table_dict, write_result_files
from cluster.retrieval import evaluate_on_store, load_model_ref
from cluster.runtime import absolute_uri, configure_logging, init_ray
from storage.store import open_store
from storage.writer import storage_options_from

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, several=True)
    parser.add_argument("--out", type=Path, default=Path("runs/eval"),
                        help="folder for the figures (pr_curve.png, map_by_k.png) and the mAP tables")
    parser.add_argument("--summary-json", type=Path, help="write every model's mAP@K and GMAP here")


def main(args: argparse.Namespace) -> int:
    """Evaluate every ``--model`` on ``--data``; exit status 2 on a bad model reference, store or argument."""
    configure_logging(args.verbose)
    curves = []
    try:
        options = storage_options_from(args.storage_options)
        store = open_store(args.data, options)
        check_evaluation_inputs(store)
        label = store.label
        if args.workers > 0:
            init_ray(args.workers + 1, args.num_cpus, args.verbose)
        for ref in args.model:
            model = load_model_ref(ref, absolute_uri(args.mlflow_uri))
            retrieval = evaluate_on_store(model, args.data, options, args.workers, args.batch_size,
                                          args.gpus_per_worker)
            curves.append((ref, model, retrieval))
    except ValueError as err:
        log.error("%s", err)
        return 2
    for ref, model, retrieval in curves:
        print(retrieval.table(f"{ref}: {model.cfg.model.nbits} bits, {model.cfg.recipe} recipe, on {label}"))
    title = f"{label} ({args.data})"
    if len(curves) == 1:
        ref, model, retrieval = curves[0]
        paths = write_result_files(model.cfg, retrieval, [], args.out, f"{title}, {ref}")
    else:
        labelled = [plots.Curve(f"{ref} ({model.cfg.model.nbits} bits)", retrieval) for ref, model, retrieval in curves]
        paths = {"pr_curve": plots.pr_curves(labelled, args.out / "pr_curve.png", title),
                 "map_by_k": plots.map_by_k(labelled, args.out / "map_by_k.png", title)}
    print(f"figures: {paths['pr_curve']}, {paths['map_by_k']}")
    if args.summary_json is not None:
        args.summary_json.parent.mkdir(parents=True, exist_ok=True)
        results = [{"model": ref, "nbits": model.cfg.model.nbits, **map_table_dict(retrieval)}
                   for ref, model, retrieval in curves]
        args.summary_json.write_text(json.dumps({"data": args.data, "results": results}, indent=2))
    return 0
