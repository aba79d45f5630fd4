"""The figures: PR curves by Hamming radius (several models in one), mAP@K by K, training curves with weighted loss
parts, the sampler's deciles, and the result files that bundle them."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from autossvh.diagnostics import SamplerDiagnostics
from autossvh.engine import EpochStats, evaluate_codes
from autossvh.trainer import EpochRecord
from cluster import plots
from cluster.results import write_result_files
from tests.conftest import tiny_config


def _retrieval(seed: int, nbits: int = 16):
    rng = np.random.default_rng(seed)
    labels = np.eye(4, dtype=np.uint8)[rng.integers(0, 4, 200)]
    codes = np.where(rng.random((200, nbits)) < 0.5, -1, 1).astype(np.int8)
    codes[:, :4] = np.where(labels > 0, 1, -1)  # the class shows in four bits
    return evaluate_codes(codes[:60], labels[:60], codes, labels, with_pr=True)


def _history(evaluated: tuple[int, ...] = (1, 3)) -> list[EpochRecord]:
    records = []
    for epoch in range(4):
        stats = EpochStats(loss=10.0 - epoch, rec=8.0 - epoch, vc=2.0, p2set=1.5 if epoch >= 2 else 0.0, steps=5,
                           skipped_steps=0, videos=320, seconds=1.0)
        sampler = SamplerDiagnostics(0.1 * epoch, 0.5, 0.0, list(np.linspace(0.3, 0.6, 10)), 0.2, 0.25,
                                     0.2 + 0.1 * epoch)
        records.append(EpochRecord(epoch, 1e-3, stats, retrieval=_retrieval(epoch) if epoch in evaluated else None,
                                   sampler=sampler))
    return records


def _png(path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_pr_curves_draw_one_curve_per_model_and_refuse_missing_pr(tmp_path):
    curves = [plots.Curve("16 bits", _retrieval(0)), plots.Curve("32 bits", _retrieval(1, 32))]
    width, height = _png(plots.pr_curves(curves, tmp_path / "pr.png", "toy"))
    assert width >= 800 and height >= 600  # labels readable at 120 dpi
    no_pr = evaluate_codes(np.ones((3, 8), np.int8), np.eye(3), np.ones((100, 8), np.int8), np.ones((100, 3)))
    with pytest.raises(ValueError, match="has no precision/recall"):
        plots.pr_curves([plots.Curve("x", no_pr)], tmp_path / "x.png", "toy")


def test_map_by_k_training_curves_and_deciles_are_written(tmp_path):
    _png(plots.map_by_k([plots.Curve("a", _retrieval(0))], tmp_path / "k.png", "toy"))
    _png(plots.training_curves(_history(), tiny_config(), tmp_path / "t.png", "toy"))
    _png(plots.sampler_deciles(_history(), 0.5, tmp_path / "d.png"))
    random_sampler = [EpochRecord(r.epoch, r.lr, r.stats, sampler=SamplerDiagnostics(np.nan, 0.0, np.nan,
                                                                                   [np.nan] * 10))
                      for r in _history()]
    assert plots.sampler_deciles(random_sampler, 0.5, tmp_path / "none.png") is None
    _png(plots.informative_precision(_history(), tmp_path / "p.png"))
    assert plots.informative_precision(random_sampler, tmp_path / "none.png") is None  # no class frames recorded


def test_result_files_hold_tables_and_figures(tmp_path):
    paths = write_result_files(tiny_config(), _retrieval(0), _history(), tmp_path, "toy (synthetic)")
    assert set(paths) == {"config", "map_json", "map_csv", "map_txt", "map_by_k", "pr_curve", "training_curve",
                          "sampler_deciles", "informative_precision"}
    assert (tmp_path / "map_table.txt").read_text().startswith("toy (synthetic)")
    without_history = write_result_files(tiny_config(), _retrieval(0), [], tmp_path / "eval", "toy")
    assert "training_curve" not in without_history and "pr_curve" in without_history
