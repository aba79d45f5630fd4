"""What the frame sampler does, measured on a fixed probe set of training videos after every epoch.

``sampler_diagnostics`` draws the two views of every probe video ``draws`` times with the model's own sampling
(:meth:`AutoSSVH.sample_views`, no gradient, no input dropout) and reports:

* ``selectivity``: P(hidden | the frame is in the top quarter of its video's Grade-Net logits) minus
  P(hidden | bottom quarter). 0 for a sampler that ignores its scores, 1 for one that always hides the top
  quarter and never the bottom one. Adversarial sampler only (NaN for the random one).
* ``view_overlap``: the share of a view's hidden frames that the other view hides too (random masks: 0 when
  2K <= T, the released complementary masks' construction).
* ``signal_correlation``: the Pearson correlation between a frame being hidden and its true class signal,
  on generated stores (which record it): positive when the sampler hides the frames that show the class,
  negative when it hides the distractors and background. NaN without the signal.
* ``hidden_by_decile``: P(hidden) of the frames in each tenth of their video's logit ranking, lowest first.
* ``informative_rate``, ``hidden_precision``, ``pooling_precision`` (generated stores): the share of frames
  that show the video's class (``frame_signal`` >= 0.5, the base rate), the share of the hidden frames that do,
  and the share of the pooling weight on them (``model.pooling``: the base rate under uniform mean pooling).
  A choice of frames that finds the class lifts its precision above the base rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from autossvh.model import AutoSSVH

PROBE_VIDEOS = 256
DRAWS = 8


@dataclass
class SamplerDiagnostics:
    selectivity: float
    view_overlap: float
    signal_correlation: float
    hidden_by_decile: list[float]
    informative_rate: float = math.nan
    hidden_precision: float = math.nan
    pooling_precision: float = math.nan

    def metrics(self) -> dict[str, float]:
        """MLflow metric name → value (NaN values left out)."""
        values = {"sampler/selectivity": self.selectivity, "sampler/view_overlap": self.view_overlap,
                  "sampler/signal_correlation": self.signal_correlation,
                  "sampler/informative_rate": self.informative_rate,
                  "sampler/hidden_precision": self.hidden_precision,
                  "sampler/pooling_precision": self.pooling_precision}
        return {key: value for key, value in values.items() if math.isfinite(value)}


@torch.no_grad()
def sampler_diagnostics(model: AutoSSVH, feats: Tensor, frame_signal: np.ndarray | None = None,
                        draws: int = DRAWS) -> SamplerDiagnostics:
    """Diagnostics of ``model``'s sampler on probe videos ``feats`` (B, T, F); ``frame_signal`` (B, T) is the
    true per-frame class signal where the data has one."""
    device = next(model.parameters()).device
    x = feats.to(device).float()
    b, t, _ = x.shape
    embedded = model.encoder.embed(x) + model.encoder.pos
    scores = model.salience_scores(x)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # training's stream untouched
        torch.manual_seed(0)
        hidden = torch.stack([model.sample_views(embedded, scores)[0].view(2, b, t)
                              for _ in range(draws)]).float().cpu()
    k = model.cfg.num_hidden
    overlap = float((hidden[:, 0] * hidden[:, 1]).sum(-1).mean() / k)
    p_hidden = hidden.mean(dim=(0, 1))  # (B, T)
    selectivity, deciles = math.nan, [math.nan] * 10
    if model.encoder.grade_net is not None:
        rank = model.frame_logits(x).cpu().argsort(dim=1).argsort(dim=1)  # 0 = lowest logit of its video
        quarter = math.ceil(t / 4)
        selectivity = float(p_hidden[rank >= t - quarter].mean() - p_hidden[rank < quarter].mean())
        decile = ((2 * rank + 1) * 10) // (2 * t)  # the centre of each rank; the first and last decile always hold one
        deciles = [float(p_hidden[decile == d].mean()) if bool((decile == d).any()) else math.nan for d in range(10)]
    correlation = rate = hidden_precision = pooling_precision = math.nan
    if frame_signal is not None:
        signal = np.broadcast_to(np.asarray(frame_signal, dtype=np.float64), hidden.shape).ravel()
        flags = hidden.numpy().astype(np.float64).ravel()
        if signal.std() > 0 and flags.std() > 0:
            correlation = float(np.corrcoef(flags, signal)[0, 1])
        informative = np.asarray(frame_signal, dtype=np.float64) >= 0.5  # (B, T)
        weights = model.pooling_weights(x, scores)
        weights = np.full(informative.shape, 1.0 / t) if weights is None else weights.double().cpu().numpy()
        rate = float(informative.mean())
        hidden_precision = float((flags * np.broadcast_to(informative, hidden.shape).ravel()).sum() / flags.sum())
        pooling_precision = float((weights * informative).sum() / weights.sum())
    return SamplerDiagnostics(selectivity, overlap, correlation, deciles, rate, hidden_precision, pooling_precision)
