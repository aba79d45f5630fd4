"""Command-line options shared by the training entries: the run's configuration and its data source."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, NoReturn

from autossvh.config import RECIPES, Config, build_config, load_yaml, parse_overrides

log = logging.getLogger(__name__)

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


class JobParser(argparse.ArgumentParser):
    """A job's parser: an error is one line and exit status 2, and the local destination of every output option a
    job has (``--out``: a folder; ``--summary-json``, ``--json``: a file) is checked as soon as the options are
    parsed, before the job reads or starts anything (:func:`cluster.preflight.check_output_folder`,
    :func:`~cluster.preflight.check_output_file`)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> tuple[argparse.Namespace, list[str]]:
        from cluster.preflight import PreflightError, check_output_file, check_output_folder

        parsed, extras = super().parse_known_args(args, namespace)
        outputs = {"--out": check_output_folder, "--summary-json": check_output_file, "--json": check_output_file}
        for option, check in outputs.items():
            value = getattr(parsed, option.lstrip("-").replace("-", "_"), None)
            if isinstance(value, (str, Path)):  # not search's --json, a switch
                try:
                    check(value, option)
                except PreflightError as err:
                    self.error(str(err))
        return parsed, extras


def job_parser(doc: str | None) -> argparse.ArgumentParser:
    """The argument parser of a ``jobs/`` script, described by its docstring (a :class:`JobParser`)."""
    return JobParser(description=doc, formatter_class=HelpFormatter)


def add_config_arguments(parser: argparse.ArgumentParser, data_help: str) -> None:
    """--data, --storage-option, --recipe, --bits, --epochs, --set, --config."""
    parser.add_argument("--data", help=data_help)
    parser.add_argument("--storage-option", dest="storage_options", action="append", default=[],
                        metavar="KEY=VALUE", help="fsspec option for --data, repeatable")
    parser.add_argument("--recipe", choices=list(RECIPES), default="paper",
                        help="paper: the adversarial sampler and voted centres; released: what the authors' code "
                        "runs; focused (beyond the paper): salience pooling, centres fixed from the input, "
                        "nearest-neighbour positives (README)")
    parser.add_argument("--bits", type=int, help="code length (model.nbits)")
    parser.add_argument("--epochs", type=int, help="train.num_epochs")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, repeatable (e.g. --set train.lr=2e-4)")
    parser.add_argument("--config", type=Path, help="YAML config file applied before --set")


def option_overrides(args: argparse.Namespace) -> list[str]:
    """--bits and --epochs as overrides."""
    named = {"model.nbits": args.bits, "train.num_epochs": args.epochs}
    return [f"{key}={value}" for key, value in named.items() if value is not None]


def user_settings(args: argparse.Namespace) -> dict[str, str]:
    """Every key the user set, with where it was set: ``--config FILE``, ``--bits``/``--epochs`` or ``--set``."""
    options = {"model.nbits": "--bits", "train.num_epochs": "--epochs"}
    settings = {key: f"--config {args.config}" for key in load_yaml(args.config)} if args.config is not None else {}
    settings |= {key: options[key] for key in parse_overrides(option_overrides(args))}
    return settings | {key: "--set" for key in parse_overrides(args.overrides)}


def config_from_args(dataset: str, args: argparse.Namespace, base_overrides: list[str], strict: bool = True) -> Config:
    """Preset, recipe, ``base_overrides`` (reduced preset, the data's shape), --config, --bits/--epochs, --set:
    a key the user set (:func:`user_settings`) keeps the user's value, whatever ``base_overrides`` hold.
    ``strict``: see :func:`autossvh.config.build_config`."""
    user = user_settings(args)
    kept = [item for item in base_overrides if item.partition("=")[0].strip() not in user]
    return build_config(dataset, args.recipe, args.config, [*kept, *option_overrides(args), *args.overrides],
                        strict=strict)


def log_reduced_preset(args: argparse.Namespace, why: str) -> None:
    """One line saying which values of :data:`REDUCED_PRESET` apply (``why``: when it applies) and which keys
    the user set instead, with where."""
    user = user_settings(args)
    applied = [item for item in REDUCED_PRESET if item.partition("=")[0] not in user]
    yours = [f"{key} from {user[key]}" for key in (item.partition("=")[0] for item in REDUCED_PRESET) if key in user]
    log.info("reduced preset (%s): %s%s", why, ", ".join(applied) or "nothing",
             f"; yours kept: {', '.join(yours)}" if yours else "")


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
