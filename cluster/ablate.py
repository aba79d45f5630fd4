"""The paper's Table 3 as one command (``jobs/ablate.py``): every row x seed is a trial of one Ray Tune grid,
and every trial is a Ray Train run of the training entry, evaluated on the test protocol.

Rows (``ROWS``; ``--rows`` picks them, ``tau<value>`` adds a sampler-noise row such as ``tau0.3``)::

    IX           full: the paper recipe as configured
    I            w/o GRL                       sampler.grl=false
    II           random sampler                sampler.kind=random
    VI           w/o FR                        loss.reconstruction=false
    VII          w/o VC                        loss.view_contrastive=false
    VIII         w/o P2Set                     loss.p2set=false
    no-frweight  sampler hears L_FR through the token gate only   sampler.reconstruction_weight=false
    hash-paper / hash-released                 model.hash_layer=...
    released     the released code's recipe    --recipe released
    tau<value>   IX at another Gumbel noise level                 sampler.tau=<value>

Beyond the paper (README, "Beyond the paper"): ``II-indep`` (random masks drawn independently per view),
``sampler-salience``, ``sampler-hpm`` / ``sampler-reducible`` (a learned loss predictor choosing the hidden
frames, ``sampler.kind=predicted`` with ``sampler.target=loss|reducible``), ``pool-salience``,
``positives-nearest`` (NNCLR positives, ``loss.positives=nearest``), ``centers-input`` and ``focused`` (the
recipe).

The base configuration is the dataset preset with ``--recipe``/``--config``/``--set`` (and the reduced preset on
generated data); a row's overrides and ``train.seed=<seed>`` come last. Evaluation runs every ``--eval-every``
epochs for the GMAP-by-epoch curves. A training-free row, ITQ of mean-pooled features fitted on the training
split, is added to the table.

Output, printed and logged to one MLflow parent run (each trial is a child run): a table of mean ± std over
seeds of mAP@5/20/40/60/80/100 and GMAP per row with the relative GMAP change against IX; GMAP by epoch of every
row in one figure; and the epochs each row needs to reach 90 % of the full row's final GMAP (the paper's
convergence claim for P2Set).

Resuming: every finished trial writes ``<storage>/<name>/trials/<row>-s<seed>.json``. Re-running the same
command runs only the trials without one (a trial interrupted mid-run resumes from its Train checkpoint, since
its run name ``<name>-<row>-s<seed>`` is fixed) and reuses the parent MLflow run, which stays RUNNING until the
trials have ended. Child runs a stopped attempt left RUNNING end KILLED and are continued by their trials, never
duplicated; SIGINT/SIGTERM end the parent and the running trials KILLED (:mod:`cluster.trials`). A trial file
written with another configuration is refused, naming the row and seed.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import numpy as np

from autossvh.config import Config, config_from_dict
from cluster import tracking
from cluster.cli import config_from_args
from cluster.preflight import check_count, check_destinations, check_run_options, check_training_inputs
from cluster.reference_codes import ReferenceRow, reference_rows
from cluster.runtime import (
    TRIAL_DRIVER_CPUS,
    absolute_path,
    configure_logging,
    init_ray,
    local_resources,
    mlflow_locations,
    trial_resources,
    trials_at_once,
)
from cluster.train import add_arguments as add_train_arguments
from cluster.train import fit_trial, resolve_data

log = logging.getLogger(__name__)

ROWS: dict[str, tuple[str, str | None, list[str]]] = {
    "IX": ("full", None, []),
    "I": ("w/o GRL", None, ["sampler.grl=false"]),
    "II": ("random sampler", None, ["sampler.kind=random"]),
    "VI": ("w/o FR", None, ["loss.reconstruction=false"]),
    "VII": ("w/o VC", None, ["loss.view_contrastive=false"]),
    "VIII": ("w/o P2Set", None, ["loss.p2set=false"]),
    "no-frweight": ("sampler w/o the L_FR weight path", None, ["sampler.reconstruction_weight=false"]),
    "hash-paper": ("paper hash layer (Eq. 6-7)", None, ["model.hash_layer=paper"]),
    "hash-released": ("released hash layer", None, ["model.hash_layer=released"]),
    "released": ("released code's recipe", "released", []),
    "II-indep": ("random sampler, independent draws", None, ["sampler.kind=independent"]),
    "sampler-salience": ("sampler hides by frame salience", None, ["sampler.kind=salience"]),
    "sampler-hpm": ("sampler hides predicted-hard frames (HPM)", None,
                    ["sampler.kind=predicted", "sampler.target=loss"]),
    "sampler-reducible": ("sampler hides frames of high predicted reducible loss", None,
                          ["sampler.kind=predicted", "sampler.target=reducible"]),
    "pool-salience": ("codes pooled by frame salience", None, ["model.pooling=salience"]),
    "positives-nearest": ("nearest-neighbour positives (NNCLR)", None, ["loss.positives=nearest"]),
    "centers-input": ("centres fixed from the input", None, ["loss.centers=input", "cluster.warmup_epoch=0"]),
    "focused": ("focused recipe (beyond the paper)", "focused", ["cluster.warmup_epoch=0"]),  # centres from epoch 0
}
DEFAULT_ROWS = ("IX", "I", "II", "VI", "VII", "VIII", "released", "tau1", "tau3")
FULL_ROW = "IX"
CONVERGENCE_SHARE = 0.9
KS = (5, 20, 40, 60, 80, 100)
POOLING, RATE = "sampler/pooling_precision", "sampler/informative_rate"


def row_definition(row: str) -> tuple[str, str | None, list[str]]:
    """(description, recipe or None for --recipe, overrides) of a row name."""
    if row in ROWS:
        return ROWS[row]
    if row.startswith("tau"):
        try:
            tau = float(row[3:])
        except ValueError:
            tau = math.nan
        if math.isfinite(tau) and tau > 0:
            return f"tau = {tau:g}", None, [f"sampler.tau={tau:g}"]
    raise ValueError(f"--rows: unknown row {row!r}; allowed: {', '.join(ROWS)} or tau<value> (e.g. tau0.3)")


def trial_key(row: str, seed: int) -> str:
    return f"{row}-s{seed}"


def trial_config(dataset: str, args: argparse.Namespace, base_overrides: list[str], row: str, seed: int) -> Config:
    """The base configuration with the row's recipe and overrides and the seed, last."""
    _, recipe, overrides = row_definition(row)
    row_args = argparse.Namespace(**{**vars(args), "recipe": recipe or args.recipe,
                                     "overrides": [*args.overrides, *overrides, f"train.seed={seed}"]})
    return config_from_args(dataset, row_args, base_overrides, strict=False)  # --set applies to every row


@dataclass
class TrialResult:
    """A finished trial: its final retrieval and GMAP by (1-based) epoch."""

    row: str
    seed: int
    map_at_k: dict[int, float]
    gmap_l2: float
    gmap_by_epoch: dict[int, float]
    mlflow_run_id: str
    config: dict[str, Any]
    sampler: dict[str, float] = field(default_factory=dict)  # the last epoch's diagnostics (NaN-free metrics)

    def to_json(self) -> str:
        data = {**self.__dict__, "map_at_k": {str(k): v for k, v in self.map_at_k.items()},
                "gmap_by_epoch": {str(k): v for k, v in self.gmap_by_epoch.items()}}
        return json.dumps(data, indent=2)

    @classmethod
    def from_json(cls, text: str) -> TrialResult:
        data = json.loads(text)
        data["map_at_k"] = {int(k): v for k, v in data["map_at_k"].items()}
        data["gmap_by_epoch"] = {int(k): v for k, v in data["gmap_by_epoch"].items()}
        return cls(**data)


def _write_text(url: str, text: str) -> None:
    """Write ``text`` to ``url`` (any fsspec URL) through a temporary name, so a reader never sees half of it."""
    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path + ".tmp", "w") as f:
        f.write(text)
    fs.mv(path + ".tmp", path)


def read_trials(results: str) -> dict[str, TrialResult]:
    """Finished trials under the ablation's ``trials`` folder, by key."""
    fs, path = fsspec.core.url_to_fs(results)
    if not fs.exists(path):
        return {}
    return {Path(p).stem: TrialResult.from_json(fs.cat_file(p).decode()) for p in fs.glob(f"{path}/*.json")}


def _trial(params: dict[str, Any], ablation: dict[str, Any]) -> dict[str, float]:
    """One trial: a TorchTrainer on the store, its epochs forwarded to Tune, its result written to a file."""
    from ray.tune.integration.ray_train import TuneReportCallback

    configure_logging(force=True)
    row, seed = params["trial"]["row"], params["trial"]["seed"]
    key = trial_key(row, seed)
    cfg = config_from_dict(ablation["configs"][key])
    args = argparse.Namespace(**ablation["args"])
    name = f"{ablation['name']}-{key}"
    done = fit_trial(cfg, args, ablation, name, [TuneReportCallback()],
                     f"{ablation['label']}, row {row}, seed {seed}")
    gmap_by_epoch = {r.epoch + 1: r.retrieval.gmap_l2 for r in done.history if r.retrieval is not None}
    probed = [r.sampler for r in done.history if r.sampler is not None]
    trial = TrialResult(row, seed, dict(done.retrieval.map_at_k), done.retrieval.gmap_l2, gmap_by_epoch,
                        done.mlflow_run_id, cfg.to_dict(), probed[-1].metrics() if probed else {})
    _write_text(f"{ablation['results']}/{key}.json", trial.to_json())
    return {"gmap_l2": done.retrieval.gmap_l2, **{f"map_at_{k}": v for k, v in done.retrieval.map_at_k.items()}}


@dataclass
class RowSummary:
    """Mean and standard deviation over a row's seeds."""

    row: str
    description: str
    seeds: int
    map_mean: dict[int, float]
    map_std: dict[int, float]
    gmap_mean: float
    gmap_std: float
    gmap_by_epoch: dict[int, tuple[float, float]]  # epoch -> (mean, std) over the seeds evaluated then
    epochs_to_target: float | None  # mean first epoch at CONVERGENCE_SHARE of the full row's final GMAP
    peak_gmap: tuple[float, float]  # (mean, std) over seeds of the best GMAP of any evaluated epoch
    peak_epoch: float | None  # mean over seeds of the epoch of that best GMAP
    sampler: dict[str, float] = field(default_factory=dict)  # mean over seeds of the last epoch's diagnostics

    @classmethod
    def of(cls, row: str, description: str, trials: list[TrialResult], target: float | None) -> RowSummary:
        maps = np.array([[t.map_at_k[k] for k in KS] for t in trials])
        gmaps = np.array([t.gmap_l2 for t in trials])
        epochs = sorted(set().union(*(t.gmap_by_epoch for t in trials)))
        by_epoch = {e: (float(np.mean(v)), float(np.std(v))) for e in epochs
                    if (v := [t.gmap_by_epoch[e] for t in trials if e in t.gmap_by_epoch])}
        peaks = [max(t.gmap_by_epoch.items(), key=lambda item: item[1]) if t.gmap_by_epoch else (None, t.gmap_l2)
                 for t in trials]
        peak_values = np.array([value for _, value in peaks])
        peak_epochs = [epoch for epoch, _ in peaks]
        peak_epoch = float(np.mean(peak_epochs)) if None not in peak_epochs else None
        reached = None
        if target is not None:
            firsts = [min((e for e, g in t.gmap_by_epoch.items() if g >= target), default=None) for t in trials]
            reached = float(np.mean(firsts)) if all(f is not None for f in firsts) else None
        probed = {key: float(np.mean(values)) for key in set().union(*(t.sampler for t in trials))
                  if len(values := [t.sampler[key] for t in trials if key in t.sampler]) == len(trials)}
        return cls(row, description, len(trials), dict(zip(KS, maps.mean(0).tolist(), strict=True)),
                   dict(zip(KS, maps.std(0).tolist(), strict=True)), float(gmaps.mean()), float(gmaps.std()),
                   by_epoch, reached, (float(peak_values.mean()), float(peak_values.std())), peak_epoch, probed)

    @classmethod
    def training_free(cls, reference: ReferenceRow) -> RowSummary:
        r = reference.retrieval
        probed = {} if math.isnan(reference.pooling_precision) else {POOLING: reference.pooling_precision}
        return cls(reference.row, reference.description, 1, dict(r.map_at_k), dict.fromkeys(KS, 0.0), r.gmap_l2, 0.0,
                   {}, None, (r.gmap_l2, 0.0), None, probed)


def summarise(trials: dict[str, TrialResult], rows: list[str],
              references: list[ReferenceRow] = ()) -> list[RowSummary]:
    """One summary per row (in ``rows`` order) plus the training-free ``references``; the convergence target is
    90 % of the full row's mean final GMAP when the full row ran."""
    by_row = {row: [t for t in trials.values() if t.row == row] for row in rows}
    full = by_row.get(FULL_ROW)
    target = CONVERGENCE_SHARE * float(np.mean([t.gmap_l2 for t in full])) if full else None
    summaries = [RowSummary.of(row, row_definition(row)[0], by_row[row], target) for row in rows if by_row[row]]
    return summaries + [RowSummary.training_free(reference) for reference in references]


def table_text(summaries: list[RowSummary], title: str) -> str:
    """The ablation table: mean ± std of mAP@K and GMAP per row, ΔGMAP against IX, GMAP over ITQ's, the best GMAP
    of any evaluated epoch (and when), the final GMAP's fall from it, epochs to 90 % of IX, and the last epoch's
    view overlap and informative-frame precision of the hidden frames and of the pooling weights."""
    full = next((s for s in summaries if s.row == FULL_ROW), None)
    itq = next((s for s in summaries if s.row == "ITQ"), None)
    header = (f"{'row':<16} {'what':<34} {'seeds':>5} " + " ".join(f"{'mAP@' + str(k):>13}" for k in KS)
              + f" {'GMAP':>13} {'vs IX':>7} {'x ITQ':>6} {'best GMAP':>13} {'at ep.':>6} {'fall':>6} "
              f"{'ep. to 90% IX':>13} {'overlap':>7} {'hid.prec':>8} {'pool.prec':>9}")
    lines = [title, header, "-" * len(header)]

    def probed(s: RowSummary, key: str, width: int) -> str:
        return f"{s.sampler[key]:>{width}.2f}" if key in s.sampler else f"{'-':>{width}}"

    for s in summaries:
        change = f"{100 * (s.gmap_mean / full.gmap_mean - 1):+6.1f}%" if full and full.gmap_mean > 0 else "    n/a"
        ratio = f"{s.gmap_mean / itq.gmap_mean:6.2f}" if itq and itq.gmap_mean > 0 else "   n/a"
        epochs = "-" if not s.gmap_by_epoch else "never" if s.epochs_to_target is None else f"{s.epochs_to_target:.1f}"
        fall = f"{100 * (1 - s.gmap_mean / s.peak_gmap[0]):5.1f}%" if s.gmap_by_epoch and s.peak_gmap[0] > 0 \
            else f"{'-':>6}"
        cells = " ".join(f"{s.map_mean[k]:.4f}±{s.map_std[k]:.4f}" for k in KS)
        peak_at = "-" if s.peak_epoch is None else f"{s.peak_epoch:.1f}"
        lines.append(f"{s.row:<16} {s.description[:34]:<34} {s.seeds:>5} {cells} "
                     f"{s.gmap_mean:.4f}±{s.gmap_std:.4f} {change:>7} {ratio} "
                     f"{s.peak_gmap[0]:.4f}±{s.peak_gmap[1]:.4f} "
                     f"{peak_at:>6} {fall} {epochs:>13} {probed(s, 'sampler/view_overlap', 7)} "
                     f"{probed(s, 'sampler/hidden_precision', 8)} {probed(s, POOLING, 9)}")
    lines.append("GMAP: of the final epoch; best GMAP: the highest of any evaluated epoch (mean ± std over seeds) "
                 "and the mean epoch it came at; fall: the final GMAP below the best")
    rates = [s.sampler[RATE] for s in summaries if RATE in s.sampler]
    if rates:
        lines.append(f"hid.prec / pool.prec: share of the hidden frames / of the pooling weight on frames that show "
                     f"the class, last epoch, against a base rate of {np.mean(rates):.2f}")
    if full is not None:
        lines.append(f"epochs to 90%: first epoch (1-based, mean over seeds) at which a row's GMAP reaches "
                     f"{CONVERGENCE_SHARE:.0%} of IX's mean final GMAP ({CONVERGENCE_SHARE * full.gmap_mean:.4f})")
    return "\n".join(lines)


def plot_gmap_by_epoch(summaries: list[RowSummary], path: Path, title: str) -> Path:
    """GMAP (mean over seeds, ± std shaded) against the epoch of every row in one figure; ITQ as a line."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.0, 5.0), dpi=120)
    ax = fig.add_subplot(1, 1, 1)
    for s in summaries:
        if not s.gmap_by_epoch:  # a training-free row
            ax.axhline(s.gmap_mean, linestyle="--", linewidth=1.2, label=f"{s.row}: {s.description}")
            continue
        epochs = sorted(s.gmap_by_epoch)
        mean = np.array([s.gmap_by_epoch[e][0] for e in epochs])
        std = np.array([s.gmap_by_epoch[e][1] for e in epochs])
        width = 2.2 if s.row == FULL_ROW else 1.2
        (line,) = ax.plot(epochs, mean, linewidth=width, label=f"{s.row}: {s.description}")
        ax.fill_between(epochs, mean - std, mean + std, color=line.get_color(), alpha=0.12)
    ax.set_xlabel("epoch")
    ax.set_ylabel("GMAP = sqrt(sum of mAP@K^2), K = 5..100")
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def _parent_run(plan: AblationPlan, args: argparse.Namespace, extra: dict[str, Any]) -> str:
    """The ablation's parent MLflow run, RUNNING until :func:`report` ends it: the one recorded by an earlier
    attempt (the children that attempt's stopped job left RUNNING end KILLED; their trials run again and continue
    them), else a new one with the base config and ``extra`` as params."""
    state_url = f"{plan.root}/ablation.json"
    fs, path = fsspec.core.url_to_fs(state_url)
    if fs.exists(path):
        run_id = json.loads(fs.cat_file(path))["parent_run_id"]
        stale = tracking.end_open_children(plan.mlflow_uri, run_id, "KILLED", "found RUNNING when the ablation was "
                                           "re-run: the job that ran it was stopped")
        if stale:
            log.warning("MLflow runs a stopped attempt left RUNNING, now KILLED: %s", ", ".join(stale))
        tracking.reopen_run(plan.mlflow_uri, run_id)
        return run_id
    run_id = tracking.create_run(plan.mlflow_uri, args.experiment, plan.name, artifact_location=plan.artifacts,
                                 tags=tracking.run_tags(sys.argv[0], plan.label, plan.base),
                                 params=tracking.config_params(plan.base, extra))
    _write_text(state_url, json.dumps({"parent_run_id": run_id}))
    return run_id


@dataclass
class AblationPlan:
    """The trials of an ablation, checked before Ray starts: their configs by key, and the finished ones."""

    name: str
    rows: list[str]
    url: str
    label: str  # the dataset as a reader should see it (storage.store.FeatureStore.label)
    options: dict[str, Any]
    base: Config
    configs: dict[str, dict[str, Any]]
    root: str  # <storage>/<name>
    finished: dict[str, TrialResult]
    mlflow_uri: str
    artifacts: str

    @property
    def results(self) -> str:
        return f"{self.root}/trials"

    def pending(self) -> list[dict[str, Any]]:
        """The (row, seed) of every trial without a result, in table order."""
        keys = [key.rsplit("-s", 1) for key in self.configs if key not in self.finished]
        return [{"row": row, "seed": int(seed)} for row, seed in keys]


def plan_ablation(dataset: str, args: argparse.Namespace) -> AblationPlan:
    """Rows, configs and finished trials; raises ValueError (or TrackingError) naming what is wrong."""
    rows = list(dict.fromkeys(args.rows))
    for row in rows:
        row_definition(row)
    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    check_run_options(args)
    check_count(args.max_concurrent, "--max-concurrent", 1)
    local = local_resources(min_cpus(args), args.num_cpus)
    if local is not None:  # the local Ray's resources are known before it starts
        trials_at_once(args, local, len(rows) * args.seeds)
    name = args.name or f"{dataset}-ablation"
    mlflow_uri, artifacts = mlflow_locations(args.mlflow_uri, args.mlflow_artifacts)
    check_destinations(args.storage, name, mlflow_uri, artifacts)
    tracking.check_reachable(mlflow_uri)
    args.overrides = [*args.overrides, f"train.eval_every={args.eval_every}"]
    url, options, base_overrides, store = resolve_data(dataset, args)
    configs = {}
    for row in rows:
        for seed in range(args.seeds):
            cfg = trial_config(dataset, args, base_overrides, row, seed)
            check_training_inputs(cfg, store, args.workers, args.val_videos)
            configs[trial_key(row, seed)] = cfg.to_dict()
    root = f"{absolute_path(args.storage).rstrip('/')}/{name}"
    finished = read_trials(f"{root}/trials")
    for key, trial in finished.items():
        if key in configs and trial.config != configs[key]:
            raise ValueError(f"trial {key} of ablation {name!r} was run with another configuration (in "
                             f"{root}/trials/{key}.json); use another --name, or the settings it ran with")
    return AblationPlan(name, rows, url, store.label, options, config_from_args(dataset, args, base_overrides, False),
                        configs, root, finished, mlflow_uri, artifacts)


def min_cpus(args: argparse.Namespace) -> int:
    """The CPUs a local Ray needs for one trial: its Train workers, its Tune function and one to spare."""
    return int(args.workers * args.cpus_per_worker) + 2


def run_trials(plan: AblationPlan, args: argparse.Namespace, parent_run_id: str) -> None:
    """The pending trials as one Ray Tune grid, as many at once as the cluster holds (or --max-concurrent), each
    finished, failed or stopped trial said in one line and its MLflow child run ended accordingly
    (:mod:`cluster.trials`)."""
    import ray
    from ray import tune

    from cluster.trials import TrialTrail, tune_run_options

    pending = plan.pending()
    init_ray(min_cpus(args), args.num_cpus, args.verbose)  # started by run_planned; here for a direct call
    args.gpus_per_worker, _ = trial_resources(args, ray.cluster_resources())
    concurrent = trials_at_once(args, ray.cluster_resources(), len(pending))
    storage = absolute_path(args.storage)
    args.storage, args.mlflow_uri, args.mlflow_artifacts = storage, plan.mlflow_uri, plan.artifacts  # trial folders
    ablation = {"configs": plan.configs, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in
                                                   vars(args).items()},
                "url": plan.url, "options": plan.options, "name": plan.name, "parent_run_id": parent_run_id,
                "results": plan.results, "label": plan.label, "script": sys.argv[0]}
    trail = TrialTrail(plan.mlflow_uri, parent_run_id, len(pending),
                       lambda trial: f"{plan.name}-{trial_key(**trial.config['trial'])}", plan.base.train.num_epochs)
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(_trial, ablation=ablation), {"CPU": TRIAL_DRIVER_CPUS}),
        param_space={"trial": tune.grid_search(pending)},
        tune_config=tune.TuneConfig(num_samples=1, max_concurrent_trials=concurrent),
        run_config=tune.RunConfig(storage_path=storage, name=f"{plan.name}-tune-{int(time.time())}",
                                  callbacks=[trail], **tune_run_options(args.verbose)),
    )
    log.info("running %d trial(s), %d at a time; Ray's own output is in its session logs%s", len(pending),
             concurrent, "" if args.verbose else " (--verbose shows it)")
    grid = tuner.fit()
    if grid.num_errors:
        log.error("%d of %d trials failed; see the trial logs under %s. Re-run the same command to run them again "
                  "(finished trials are kept)", grid.num_errors, len(pending), storage)


def report(plan: AblationPlan, args: argparse.Namespace, parent_run_id: str) -> int:
    """The table, figure and summary of the finished trials, printed and logged to the parent run."""
    finished = {k: v for k, v in read_trials(plan.results).items() if k in plan.configs}
    missing = [key for key in plan.configs if key not in finished]
    summaries = summarise(finished, plan.rows, reference_rows(plan.url, plan.options, plan.base))
    title = (f"{plan.label} ablation {plan.name!r}, {plan.base.model.nbits} bits, {plan.base.train.num_epochs} "
             "epochs, test protocol, mean ± std over seeds")
    text = table_text(summaries, title)
    rows = [s.__dict__ for s in summaries]
    with tracking.start_run(plan.mlflow_uri, args.experiment, run_id=parent_run_id), \
            tempfile.TemporaryDirectory() as folder:
        import mlflow

        out = Path(folder)
        (out / "ablation_table.txt").write_text(text + "\n")
        (out / "ablation.json").write_text(json.dumps(rows, indent=2, default=str))
        plot_gmap_by_epoch(summaries, out / "gmap_by_epoch.png", title)
        for file in ("ablation_table.txt", "ablation.json", "gmap_by_epoch.png"):
            mlflow.log_artifact(str(out / file))
        mlflow.log_metrics({f"{s.row}/gmap_l2_mean": s.gmap_mean for s in summaries}
                           | {f"{s.row}/gmap_l2_std": s.gmap_std for s in summaries})
    if missing:  # the parent is finished only when its trials are
        tracking.end_run(plan.mlflow_uri, parent_run_id, "FAILED", f"trials without a result: {', '.join(missing)}")
    print(text)
    print(f"MLflow parent run {parent_run_id}\n{tracking.ui_hint(plan.mlflow_uri, parent_run_id)}")
    if args.summary_json is not None:
        args.summary_json.parent.mkdir(parents=True, exist_ok=True)
        args.summary_json.write_text(json.dumps({"rows": rows, "missing": missing, "parent_run_id": parent_run_id},
                                                indent=2, default=str))
    if missing:
        log.error("trials without a result: %s; re-run the same command to run them", ", ".join(missing))
        return 1
    return 0


def run_ablation(dataset: str, args: argparse.Namespace) -> int:
    """The ablation per ``args`` (see :func:`add_arguments`); returns the exit code."""
    configure_logging(args.verbose)
    try:
        plan = plan_ablation(dataset, args)
    except (ValueError, tracking.TrackingError) as err:
        log.error("%s", err)
        return 2
    from cluster.trials import JobStopped

    try:
        return run_planned(plan, args)
    except JobStopped as stopped:
        log.error("stopped by %s: the MLflow parent run and the trials that were running are marked KILLED; "
                  "re-run the same command to run the unfinished trials", stopped)
        return 128 + stopped.signum


def run_planned(plan: AblationPlan, args: argparse.Namespace) -> int:
    """Run the pending trials of a checked plan under its parent MLflow run and report; returns the exit code."""
    from cluster.trials import stopping_ends_runs

    parent_run_id = _parent_run(plan, args, {"data": plan.url, "rows": plan.rows, "seeds": args.seeds,
                                             "ablation": True})
    pending = plan.pending()
    log.info("ablation %r: %d rows x %d seeds, %d trials done, %d to run", plan.name, len(plan.rows), args.seeds,
             len(plan.configs) - len(pending), len(pending))
    if pending:
        init_ray(min_cpus(args), args.num_cpus, args.verbose)
    with stopping_ends_runs(plan.mlflow_uri, parent_run_id):
        if pending:
            run_trials(plan, args, parent_run_id)
        return report(plan, args, parent_run_id)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_train_arguments(parser)
    parser.add_argument("--dataset", required=True, choices=["activitynet", "fcvid", "ucf101", "hmdb51"],
                        help="the preset (and, without --data, the kind of generated store) of every row")
    parser.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS),
                        help=f"rows to run (default: {' '.join(DEFAULT_ROWS)}); see cluster/ablate.py")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per row: train.seed = 0 .. seeds-1")
    parser.add_argument("--eval-every", type=int, default=1, help="evaluate every N epochs (GMAP-by-epoch curve)")
    parser.add_argument("--max-concurrent", type=int, help="trials at once (default: what the cluster holds)")
    parser.set_defaults(workers=1, name=None)
