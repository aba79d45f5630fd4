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
from cluster.preflight import check_evaluation_inputs, check_evaluation_options, check_output_file, check_output_folder
from cluster.results import map_table_dict, staged_folder, write_result_files, write_text_atomically
from cluster.retrieval import evaluate_on_store, load_model_ref, model_path
from cluster.runtime import absolute_uri, configure_logging, init_ray
from storage.store import check_apart, open_store
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
        check_evaluation_options(args)
        check_output_folder(args.out, "--out")
        check_output_file(args.summary_json, "--summary-json")
        models = {f"--model{'' if len(args.model) == 1 else f' #{i}'}": model_path(ref)
                  for i, ref in enumerate(args.model, start=1)}
        check_apart({"--out": args.out, "--summary-json": args.summary_json}, {"--data": args.data, **models})
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
    with staged_folder(args.out) as stage:  # the figures, tables and summary appear together or not at all
        if len(curves) == 1:
            ref, model, retrieval = curves[0]
            paths = write_result_files(model.cfg, retrieval, [], stage, f"{title}, {ref}")
        else:
            labelled = [plots.Curve(f"{ref} ({model.cfg.model.nbits} bits)", retrieval)
                        for ref, model, retrieval in curves]
            paths = {"pr_curve": plots.pr_curves(labelled, stage / "pr_curve.png", title),
                     "map_by_k": plots.map_by_k(labelled, stage / "map_by_k.png", title)}
        if args.summary_json is not None:
            results = [{"model": ref, "nbits": model.cfg.model.nbits, **map_table_dict(retrieval)}
                       for ref, model, retrieval in curves]
            write_text_atomically(args.summary_json, json.dumps({"data": args.data, "results": results}, indent=2))
    print(f"figures: {args.out / paths['pr_curve'].name}, {args.out / paths['map_by_k'].name}")
    return 0
