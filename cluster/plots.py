"""The figures a run or an evaluation writes: precision-recall by Hamming radius, mAP@K against K, the training
curves (weighted loss parts, mAP@5 and GMAP by epoch) and which frames the sampler hides.

Every figure is drawn on ``matplotlib.figure.Figure`` directly, so the global pyplot backend is neither needed
nor changed. Epochs are counted from 1, as everywhere a user reads them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autossvh.config import Config
from autossvh.engine import Retrieval
from autossvh.trainer import EpochRecord

DPI = 120


@dataclass
class Curve:
    """One model's (or code length's) evaluation, labelled for a legend."""

    label: str
    retrieval: Retrieval


def _save(fig: object, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, format="png")
    return out


def pr_curves(curves: Sequence[Curve], path: str | Path, title: str) -> Path:
    """Precision against recall as the Hamming radius r grows (an item is retrieved when its distance to the
    query is at most r), one curve per model; markers label r = 0, nbits/4, nbits/2 and 3·nbits/4."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 5.2), dpi=DPI)
    ax = fig.add_subplot(1, 1, 1)
    for index, curve in enumerate(curves):
        if curve.retrieval.pr_by_radius is None:
            raise ValueError(f"pr_curves: {curve.label} has no precision/recall by radius")
        radii, precision, recall = (np.asarray(a, dtype=np.float64) for a in curve.retrieval.pr_by_radius)
        if not (radii.size == precision.size == recall.size) or radii.size == 0:
            raise ValueError(f"pr_curves: {curve.label}: radii, precision and recall must be non-empty and equally "
                             f"long, got {radii.size}, {precision.size}, {recall.size}")
        (line,) = ax.plot(recall, precision, linewidth=1.6, label=curve.label)
        nbits = int(radii.max())
        for r in sorted({0, nbits // 4, nbits // 2, 3 * nbits // 4}):
            i = int(np.searchsorted(radii, r))
            if i < radii.size and np.isfinite(precision[i]) and np.isfinite(recall[i]):
                ax.plot(recall[i], precision[i], "o", color=line.get_color(), markersize=4)
                ax.annotate(f"r={r}", (recall[i], precision[i]), textcoords="offset points",
                            xytext=(5, 3 - 11 * index), fontsize=8, color=line.get_color())
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0.0, 1.02)
    ax.set_ylim(0.0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.set_title(f"{title}\nprecision-recall by Hamming radius r (retrieve every item within distance r)",
                 fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    return _save(fig, path)


def map_by_k(curves: Sequence[Curve], path: str | Path, title: str) -> Path:
    """mAP@K against K (the published cut-offs), one line per model."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4), dpi=DPI)
    ax = fig.add_subplot(1, 1, 1)
    for curve in curves:
        ks = sorted(curve.retrieval.map_at_k)
        ax.plot(ks, [curve.retrieval.map_at_k[k] for k in ks], marker="o", linewidth=1.6,
                label=f"{curve.label} (GMAP {curve.retrieval.gmap_l2:.3f})")
        ax.set_xticks(ks)
    ax.set_xlabel("K (top-K retrieved)")
    ax.set_ylabel("mAP@K")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.set_title(f"{title}\nmAP@K", fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)


def training_curves(history: Sequence[EpochRecord], cfg: Config, path: str | Path, title: str) -> Path:
    """The loss and its weighted parts (what each adds to the total) by epoch, and mAP@5 and GMAP at the
    evaluated epochs; both axes start at 0."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = [r.epoch + 1 for r in history]
    lo = cfg.loss
    parts = [("total", "loss", 1.0), ("L_FR", "rec", 1.0 if lo.reconstruction else 0.0),
             (f"{lo.a:g} x L_VC", "vc", lo.a if lo.view_contrastive else 0.0),
             (f"{lo.b:g} x L_P2Set", "p2set", lo.b if lo.p2set else 0.0)]
    fig = Figure(figsize=(7.0, 6.4), dpi=DPI)
    top, bottom = fig.add_subplot(2, 1, 1), fig.add_subplot(2, 1, 2)
    for label, attr, weight in parts:
        if weight:
            top.plot(epochs, [weight * getattr(r.stats, attr) for r in history], linewidth=1.6, label=label)
    top.set_ylabel("loss (weighted parts)")
    top.set_ylim(bottom=0)
    top.grid(True, alpha=0.3)
    top.legend(fontsize=8)
    top.set_title(f"{title}\ntraining loss and retrieval by epoch", fontsize=10)
    evaluated = [r for r in history if r.retrieval is not None]
    if evaluated:
        x = [r.epoch + 1 for r in evaluated]
        bottom.plot(x, [r.retrieval.map_at_k.get(5, np.nan) for r in evaluated], marker="o", label="mAP@5")
        bottom.plot(x, [r.retrieval.gmap_l2 for r in evaluated], marker="s", label="GMAP")
        bottom.legend(fontsize=8)
    for ax in (top, bottom):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    bottom.set_xlabel("epoch")
    bottom.set_ylabel("test retrieval")
    bottom.set_ylim(bottom=0)
    bottom.set_xlim(top.get_xlim())
    bottom.grid(True, alpha=0.3)
    return _save(fig, path)


def sampler_deciles(history: Sequence[EpochRecord], uniform: float, path: str | Path) -> Path | None:
    """P(hidden) of the frames in each tenth of their video's Grade-Net ranking, at up to five epochs spread
    over the run; None when the run has no adversarial sampler."""
    from matplotlib.figure import Figure

    records = [r for r in history if r.sampler is not None and not np.isnan(r.sampler.hidden_by_decile).all()]
    if not records:
        return None
    shown = [records[i] for i in sorted({round(j * (len(records) - 1) / 4) for j in range(5)})]
    fig = Figure(figsize=(6.4, 4.2), dpi=DPI)
    ax = fig.add_subplot(1, 1, 1)
    deciles = np.arange(1, 11)
    for record in shown:
        ax.plot(deciles, record.sampler.hidden_by_decile, marker="o", linewidth=1.4,
                label=f"epoch {record.epoch + 1} (selectivity {record.sampler.selectivity:.2f})")
    ax.axhline(uniform, color="grey", linestyle="--", linewidth=1.0, label=f"uniform K/T = {uniform:.2f}")
    ax.set_xticks(deciles)
    ax.set_xlabel("Grade-Net logit decile within the video (1 = lowest scored frames)")
    ax.set_ylabel("P(frame hidden by a view)")
    ax.set_ylim(0, 1)
    ax.set_title("Which frames the sampler hides (probe videos, 8 draws)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def informative_precision(history: Sequence[EpochRecord], path: str | Path) -> Path | None:
    """By epoch: the share of the hidden frames and of the pooling weight on frames that show the class, against
    their base rate (generated stores only); None when the data records no class frames."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    records = [r for r in history if r.sampler is not None and not np.isnan(r.sampler.informative_rate)]
    if not records:
        return None
    epochs = [r.epoch + 1 for r in records]
    fig = Figure(figsize=(6.4, 4.2), dpi=DPI)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(epochs, [r.sampler.pooling_precision for r in records], marker="o", linewidth=1.6,
            label="pooling weight on class frames")
    ax.plot(epochs, [r.sampler.hidden_precision for r in records], marker="s", linewidth=1.2,
            label="hidden frames that show the class")
    ax.plot(epochs, [r.sampler.informative_rate for r in records], color="grey", linestyle="--", linewidth=1.0,
            label="base rate (share of class frames)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("informative-frame precision")
    ax.set_ylim(0, 1)
    ax.set_title("Does the model choose the frames that show the class? (probe videos)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
