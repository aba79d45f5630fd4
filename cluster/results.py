"""The result files of a training run or an evaluation: the resolved config, the mAP@K table (json, csv, txt)
and the figures of :mod:`cluster.plots`; :func:`staged_folder` puts a job's files in place all at once."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from autossvh.config import Config
from autossvh.engine import Retrieval
from autossvh.trainer import EpochRecord
from cluster import plots


def map_table_dict(retrieval: Retrieval) -> dict[str, Any]:
    return {"map_at_k": {str(k): retrieval.map_at_k[k] for k in sorted(retrieval.map_at_k)},
            "gmap_l2": retrieval.gmap_l2}


def map_table_csv(retrieval: Retrieval) -> str:
    """The published table layout: one header row ``mAP@5,...,GMAP(L2)`` and one row of values."""
    ks = sorted(retrieval.map_at_k)
    header = ",".join([*(f"mAP@{k}" for k in ks), "GMAP(L2)"])
    row = ",".join([*(f"{retrieval.map_at_k[k]:.6f}" for k in ks), f"{retrieval.gmap_l2:.6f}"])
    return f"{header}\n{row}\n"


def write_result_files(cfg: Config, retrieval: Retrieval, history: Sequence[EpochRecord],
                       out_dir: str | Path, title: str) -> dict[str, Path]:
    """Write the result files into ``out_dir``: ``config.yaml`` (resolved config), ``map_table.json``,
    ``map_table.csv``, ``map_table.txt``, ``map_by_k.png``, ``pr_curve.png`` when the retrieval has
    precision/recall, and with a history ``training_curve.png``, (adversarial sampler) ``sampler_deciles.png``
    and (generated data, which records the class frames) ``informative_precision.png``. ``title`` names the data
    and model in the figures. Returns name → path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "config": out / "config.yaml", "map_json": out / "map_table.json", "map_csv": out / "map_table.csv",
        "map_txt": out / "map_table.txt",
    }
    paths["config"].write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    paths["map_json"].write_text(json.dumps(map_table_dict(retrieval), indent=2) + "\n")
    paths["map_csv"].write_text(map_table_csv(retrieval))
    paths["map_txt"].write_text(retrieval.table(title) + "\n")
    curve = [plots.Curve(f"{cfg.model.nbits} bits, {cfg.recipe} recipe", retrieval)]
    paths["map_by_k"] = plots.map_by_k(curve, out / "map_by_k.png", title)
    if retrieval.pr_by_radius is not None:
        paths["pr_curve"] = plots.pr_curves(curve, out / "pr_curve.png", title)
    if history:
        paths["training_curve"] = plots.training_curves(history, cfg, out / "training_curve.png", title)
        deciles = plots.sampler_deciles(history, cfg.num_hidden / cfg.data.max_frames, out / "sampler_deciles.png")
        if deciles is not None:
            paths["sampler_deciles"] = deciles
        precision = plots.informative_precision(history, out / "informative_precision.png")
        if precision is not None:
            paths["informative_precision"] = precision
    return paths


@contextlib.contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """A hidden temporary folder next to ``out`` to write a job's result files into. When the block succeeds its
    files move into ``out`` (created if missing; files of the same name replaced, others kept); when it fails
    they are removed, so ``out`` never holds a partial set of one run's files."""
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield stage
        out.mkdir(exist_ok=True)
        for item in sorted(stage.iterdir()):
            os.replace(item, out / item.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def write_text_atomically(path: Path, text: str) -> None:
    """Write ``path`` through a temporary file in its folder, so that it is never seen half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
