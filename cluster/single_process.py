"""Single-process training of a dataset preset, on generated data or on a feature store loaded into memory,
for one machine without Ray.

It applies the reduced preset of ``cluster.cli`` (on generated data, as the Ray entry does, and also to a
``--data`` store), unless ``--full-preset``; a key the user sets (``--config``, ``--set``, ``--bits``,
``--epochs``) keeps the user's value, and the log names the preset values applied and the user's kept.
Outputs go to ``--out`` all at once when the run succeeds (``cluster.results.staged_folder``).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from autossvh.baselines import random_projection_codes
from autossvh.config import Config
from autossvh.engine import NonFiniteLossError, Retrieval, evaluate_codes, save_model
from autossvh.trainer import DivergenceError, FitResult, RetrievalData, fit
from cluster.cli import REDUCED_PRESET, add_config_arguments, config_from_args, log_reduced_preset
from cluster.preflight import check_device, check_output_folder, check_training_inputs
from cluster.results import staged_folder, write_result_files
from cluster.runtime import configure_logging
from storage.schema import stored_split
from storage.store import FeatureStore, check_apart, open_store
from storage.synthetic import make_synthetic
from storage.writer import storage_options_from

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "URL of a feature store (jobs/ingest.py, jobs/make_synthetic.py) to train on, "
                         "loaded into memory; default: generate a dataset")
    parser.add_argument("--videos", type=int, default=1200, help="generated training videos")
    parser.add_argument("--feature-dim", type=int, default=512, help="generated per-frame feature size")
    parser.add_argument("--classes", type=int, default=40, help="classes of the generated dataset")
    parser.add_argument("--full-preset", action="store_true", help="do not apply the reduced preset")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device to train on")
    parser.add_argument("--out", type=Path, default=Path("runs/local"), help="where model.pt and metrics.json go")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated dataset")


def projection_baseline(data: RetrievalData, nbits: int) -> Retrieval:
    """mAP@K of random-projection sign codes of mean-pooled features, centred on the training mean."""
    center = data.train.mean(axis=(0, 1), dtype=np.float64)
    query, _ = random_projection_codes(data.query, nbits, center=center)
    db = query if data.database is data.query else random_projection_codes(data.database, nbits, center=center)[0]
    return evaluate_codes(query, data.query_labels, db, data.database_labels)


def store_data(store: FeatureStore) -> RetrievalData:
    """A complete store's splits in memory (float32), aliased splits shared as the protocol says."""
    train, train_labels = store.load("train")
    loaded = {"train": (train, train_labels)}
    for name in ("query", "database"):
        stored = stored_split(store.info.protocol, name)
        if stored not in loaded:
            loaded[stored] = store.load(stored)
    (query, query_labels), (database, database_labels) = (loaded[stored_split(store.info.protocol, n)]
                                                          for n in ("query", "database"))
    signal = store.frame_signal("train", len(train))
    return RetrievalData(train, query, query_labels, database, database_labels, signal)


def synthetic_data(dataset: str, args: argparse.Namespace, feature_size: int, max_frames: int) -> RetrievalData:
    log.info("generating a %s-like dataset: %d train videos of %d classes, %d frames x %d dims", dataset,
             args.videos, args.classes, max_frames, feature_size)
    splits = make_synthetic(dataset, args.videos, feature_dim=feature_size, max_frames=max_frames,
                            num_classes=args.classes, seed=args.seed).splits
    return RetrievalData(train=splits["train"].feats, query=splits["query"].feats,
                         query_labels=splits["query"].labels, database=splits["database"].feats,
                         database_labels=splits["database"].labels, train_signal=splits["train"].frame_signal)


def run(dataset: str, args: argparse.Namespace) -> int:
    configure_logging()
    overrides = [] if args.full_preset else list(REDUCED_PRESET)
    store = None
    try:
        check_device(args.device)
        check_output_folder(args.out, "--out")
        check_apart({"--out": args.out}, {"--data": args.data, "--config": args.config})
        if args.data:
            store = open_store(args.data, storage_options_from(args.storage_options))
            overrides += [f"data.feature_size={store.info.feature_dim}", f"data.max_frames={store.info.max_frames}"]
        else:
            overrides.append(f"data.feature_size={args.feature_dim}")
        cfg = config_from_args(dataset, args, overrides)
        if not args.full_preset:
            log_reduced_preset(args, "without --full-preset")
        if store is not None:
            check_training_inputs(cfg, store, world_size=1)
            log.info("loading %s (%s protocol) into memory", args.data, store.info.protocol)
            data = store_data(store)
        else:
            data = synthetic_data(dataset, args, cfg.data.feature_size, cfg.data.max_frames)
    except ValueError as err:  # ConfigError, StoreError (damaged, missing, NaN), PreflightError, --storage-option
        log.error("%s", err)
        return 2
    baseline = projection_baseline(data, cfg.model.nbits)
    log.info("training %s recipe, %d bits, %d epochs on %s", cfg.recipe, cfg.model.nbits, cfg.train.num_epochs,
             args.device)
    start = time.perf_counter()
    try:
        result = fit(cfg, data, args.device)
    except (DivergenceError, NonFiniteLossError) as err:
        log.error("training failed: %s", err)
        return 1
    label = f"{dataset} (synthetic)" if store is None else store.label
    title = f"{label}, {cfg.model.nbits} bits, {cfg.recipe} recipe, epoch {cfg.train.num_epochs}"
    with staged_folder(args.out) as stage:
        paths = write_outputs(stage, dataset, cfg, result, baseline, time.perf_counter() - start, title)
    print(result.retrieval.table(title))
    print(baseline.table("baseline: sign of a random projection of mean-pooled features"))
    figures = ", ".join(p.name for p in paths.values() if p.suffix == ".png")
    print(f"model.pt, metrics.json, the mAP tables and {figures} in {args.out}/")
    return 0


def write_outputs(out: Path, dataset: str, cfg: Config, result: FitResult, baseline: Retrieval, wall: float,
                  title: str) -> dict[str, Path]:
    """model.pt, metrics.json and the result files of a finished run, written into ``out``; name → path."""
    save_model(out / "model.pt", result.model)
    summary = {
        "dataset": dataset, "recipe": cfg.recipe, "nbits": cfg.model.nbits, "epochs": cfg.train.num_epochs,
        "map_at_k": {str(k): v for k, v in result.retrieval.map_at_k.items()},
        "gmap_l2": result.retrieval.gmap_l2, "wall_seconds": wall,
        "baseline_random_projection": {str(k): v for k, v in baseline.map_at_k.items()},
    }
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    return write_result_files(cfg, result.retrieval, result.history, out, title)
