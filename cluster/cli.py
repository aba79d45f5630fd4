"""Command-line options shared by the training entries: the run's configuration and its data source."""

from __future__ import annotations

import argparse
from pathlib import Path

from autossvh.config import Config, build_config

# The reduced preset for generated data on a small machine (both training entries apply it when they train on
# generated data): the released model and loss settings, a shallower encoder and fewer epochs and clusters,
# so a run takes minutes on 2 CPU cores.
REDUCED_PRESET = [
    "model.encoder_depth=2",
    "train.batch_size=64",
    "train.num_epochs=8",
    "train.eval_every=4",
    "train.lr=5e-4",
    "train.test_batch_size=256",
    "cluster.warmup_epoch=2",
    "cluster.num_cluster=[16, 32, 48]",
    "cluster.nredo=2",
]


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """A job's ``--help``: its module docstring as written, and every option's default after its help text."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        shown = action.option_strings and default not in (None, False, [], argparse.SUPPRESS)
        if shown and "%(default)" not in text and "default:" not in text:
            text += " (default: %(default)s)"
        return text


def job_parser(doc: str | None) -> argparse.ArgumentParser:
    """The argument parser of a ``jobs/`` script, described by its docstring."""
    return argparse.ArgumentParser(description=doc, formatter_class=HelpFormatter)


def add_config_arguments(parser: argparse.ArgumentParser, data_help: str) -> None:
    """--data, --storage-option, --recipe, --bits, --epochs, --set, --config."""
    parser.add_argument("--data", help=data_help)
    parser.add_argument("--storage-option", dest="storage_options", action="append", default=[],
                        metavar="KEY=VALUE", help="fsspec option for --data, repeatable")
    parser.add_argument("--recipe", choices=["paper", "released"], default="paper",
                        help="paper: the adversarial sampler and voted centres; released: what the authors' code runs")
    parser.add_argument("--bits", type=int, help="code length (model.nbits)")
    parser.add_argument("--epochs", type=int, help="train.num_epochs")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, repeatable (e.g. --set train.lr=2e-4)")
    parser.add_argument("--config", type=Path, help="YAML config file applied before --set")


def config_from_args(dataset: str, args: argparse.Namespace, base_overrides: list[str]) -> Config:
    """Preset, recipe, ``base_overrides`` (reduced preset, the data's shape), --bits/--epochs, --config, --set."""
    overrides = list(base_overrides)
    if args.bits is not None:
        overrides.append(f"model.nbits={args.bits}")
    if args.epochs is not None:
        overrides.append(f"train.num_epochs={args.epochs}")
    return build_config(dataset, args.recipe, args.config, [*overrides, *args.overrides])


def add_model_arguments(parser: argparse.ArgumentParser, several: bool = False) -> None:
    """--model (repeatable with ``several``) and :func:`add_evaluation_arguments`: what the jobs that use trained
    models share."""
    parser.add_argument("--model", required=True, action="append" if several else "store",
                        help="models:/NAME@ALIAS (or another MLflow model URI), a checkpoint or run folder, or a "
                        "model file" + ("; repeat it to compare models in one table and figure" if several else ""))
    add_evaluation_arguments(parser, default_workers=2)


def add_evaluation_arguments(parser: argparse.ArgumentParser, default_workers: int) -> None:
    """--data, --storage-option, --workers, --gpus-per-worker, --batch-size, --mlflow-uri, --num-cpus: encoding
    a feature store with a registered model (cluster.retrieval)."""
    parser.add_argument("--data", required=True, help="feature store URL")
    parser.add_argument("--storage-option", dest="storage_options", action="append", default=[],
                        metavar="KEY=VALUE", help="fsspec option for --data, repeatable")
    parser.add_argument("--workers", type=int, default=default_workers,
                        help="Ray tasks that encode in parallel; 0: in this process")
    parser.add_argument("--gpus-per-worker", type=float, default=0.0,
                        help="GPUs per encoding task; > 0 encodes on CUDA")
    parser.add_argument("--batch-size", type=int, default=256, help="videos per encoding batch")
    parser.add_argument("--mlflow-uri", default="sqlite:///runs/mlflow.db", help="MLflow tracking URI (registry)")
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local Ray started without RAY_ADDRESS "
                        "(default: the machine's cores)")
    add_verbose_argument(parser)


def add_verbose_argument(parser: argparse.ArgumentParser) -> None:
    """--verbose: Ray's own output (its workers', actors' and controller's) on the console too."""
    parser.add_argument("--verbose", action="store_true",
                        help="also show Ray's own output (workers, actors, Ray Train), which by default stays in "
                        "Ray's session logs")
