"""The ``jobs/encode.py`` job: a split's packed codes, video ids (and labels) written to a code store."""

from __future__ import annotations

import argparse
import logging

from cluster.cli import add_model_arguments
from cluster.preflight import check_evaluation_options
from cluster.retrieval import encode_to_code_store, load_model_ref, model_path
from cluster.runtime import absolute_uri, configure_logging, init_ray
from storage.schema import SPLITS
from storage.store import check_apart
from storage.writer import storage_options_from

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--split", choices=SPLITS, default="database", help="split of --data to encode")
    parser.add_argument("--out", required=True, help="code store URL to create (jobs/search.py --codes)")
    parser.add_argument("--out-storage-option", dest="out_storage_options", action="append", default=[],
                        metavar="KEY=VALUE", help="fsspec option for --out, repeatable")
    parser.add_argument("--overwrite", action="store_true", help="replace a complete code store at --out "
                        "(only a code store: a feature store or anything else there is refused)")


def main(args: argparse.Namespace) -> int:
    """Encode ``--split`` of ``--data`` into ``--out``; exit status 2 on bad input (nothing marked complete)."""
    configure_logging(args.verbose)
    try:
        check_evaluation_options(args)
        check_apart({"--out": args.out}, {"--data": args.data, "--model": model_path(args.model)})
        options = storage_options_from(args.storage_options)
        out_options = storage_options_from(args.out_storage_options)
        model = load_model_ref(args.model, absolute_uri(args.mlflow_uri))
        if args.workers > 0:
            init_ray(args.workers + 1, args.num_cpus, args.verbose)
        store = encode_to_code_store(model, args.model, args.data, args.split, args.out, options, out_options,
                                     args.workers, args.batch_size, args.gpus_per_worker, args.overwrite)
    except ValueError as err:
        log.error("%s", err)
        return 2
    print(f"{store.url}: {len(store)} codes of {store.info.nbits} bits from split {args.split!r} of {args.data}")
    return 0
