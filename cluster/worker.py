"""One Ray Train worker of a training run: ``setup``, ``train``, ``final_evaluation``, ``cleanup``.

Every rank builds the model and resumes from Ray Train's latest checkpoint when there is one, then runs the shared
epoch skeleton (``autossvh.trainer.run_epoch``) with this class as its steps:

* clustering round: each rank encodes its block of the train split and submits the codes to the run's
  clustering actor, which clusters them once all ranks are in and returns the same result to every rank;
* training: one epoch of DDP over the global batch (``gather_with_grad``; each rank takes
  ``train.batch_size / world_size`` videos per step) and a scheduler step;
* evaluation: every rank encodes its block of query (and database) and rank 0 computes mAP@K and GMAP.

Videos held out of training (``--val-videos N``, ``storage.validation.validation_holdout``): the same rows on every
rank, never read by the train reader, left out of every clustering round, the input centres, the salience bank and
the probe videos; rank 0 reads them once at setup (N videos in the stored dtype, in memory) and at every evaluation
logs their leave-one-out mAP@5 (``map/val_map5``), by which ``--selection best-val-map5`` selects.

After each epoch rank 0 reports a checkpoint (:class:`cluster.checkpoint.TrainState`) and then logs the epoch
to MLflow, so a crash in between leaves a gap that the resumed run back-fills. After the last epoch every rank
encodes the selected model (``--selection``) and rank 0 reports a final checkpoint with its evaluation,
precision/recall by radius included, which the driver reads. A step whose loss is not finite on any rank is
skipped by all ranks; ``train.max_nonfinite_steps`` in a row stop the run with an error, keeping the last
checkpoint.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autossvh.anchors import input_centers, pooled_inputs
from autossvh.clustering import ClusteringResult
from autossvh.config import config_from_dict
from autossvh.diagnostics import PROBE_VIDEOS, SamplerDiagnostics, sampler_diagnostics
from autossvh.engine import (
    Encoded,
    EpochStats,
    NonFiniteGuard,
    Retrieval,
    build_optimizer,
    build_scheduler,
    encode,
    encode_batch_size,
    evaluate_codes,
    train_one_epoch,
)
from autossvh.losses import ClusterTargets
from autossvh.metrics import knn_agreement, leave_one_out_map
from autossvh.model import AutoSSVH, leaves_parameters_unused
from autossvh.trainer import EpochRecord, epoch_line, run_epoch
from cluster.checkpoint import CHECKPOINT_FILE, FinalEvaluation, TrainState, report_checkpoint
from cluster.console import WorkerConsole
from cluster.distributed import (
    all_ranks_agree,
    broadcast_from_rank0,
    gather_objects,
    gather_rows_to_rank0,
    gather_with_grad,
)
from cluster.preflight import VAL_MAP_K, per_rank_batch_size
from cluster.runtime import configure_logging
from storage.reader import EvalReader, TrainReader, make_loader
from storage.schema import queries_are_database, stored_split
from storage.store import FeatureStore, open_store
from storage.validation import validation_holdout

log = logging.getLogger(__name__)

CLUSTER_ATTEMPTS = 3  # clustering rounds tried per epoch when the actor dies
ACTOR_RESTART_TIMEOUT_S = 300.0  # how long a rank waits for a restarting clustering actor before its next attempt
SELECTIONS = ("last", "best-map5", "knn-agreement", "best-val-map5")
SELECTION_SCORES = {"knn-agreement": "knn_agreement", "best-val-map5": "val_map5"}  # the others: test mAP@5
KNN_AGREEMENT_K = 10


@dataclass
class WorkerConfig:
    """What the driver hands every Train worker (``train_loop_config``)."""

    config: dict[str, Any]  # Config.to_dict()
    data: str  # feature store URL
    storage_options: dict[str, Any]
    actor: Any  # the run's ClusteringActor handle
    loader_workers: int
    mlflow_uri: str
    mlflow_run_id: str  # the run the driver created for the Train run: every attempt continues it
    selection: str  # one of SELECTIONS
    console: Any | None = None  # the driver's console queue (cluster.console); None in a Tune trial
    val_videos: int = 0  # training videos held out as a labelled validation split (--val-videos)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train entry of every rank."""
    worker = TrainWorker(WorkerConfig(**config))
    worker.setup()
    worker.train()
    worker.final_evaluation()
    worker.cleanup()


def rng_state() -> dict[str, torch.Tensor | None]:
    """This process's torch RNG states (the sampler's Gumbel noise draws from them)."""
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(state: dict[str, torch.Tensor | None]) -> None:
    torch.set_rng_state(state["cpu"].cpu())
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


def cluster_on_actor(actor: Any, epoch: int, rank: int, world: int, num_train: int, indices: np.ndarray,
                     encoded: Encoded, console: WorkerConsole, previous: ClusteringResult | None = None,
                     actor_has_previous: bool = True) -> ClusteringResult:
    """Submit this rank's codes and read the epoch's clustering. If the actor died on any rank's call (it is
    restarted empty), every rank agrees on that through a collective and all redo the round.

    ``previous`` (rank 0's last clustering result, for the warm start) goes to the actor with the codes unless
    ``actor_has_previous``, and again with every retry, since a restarted actor is empty."""
    import ray
    from ray.exceptions import ActorUnavailableError, RayActorError

    for attempt in range(1, CLUSTER_ATTEMPTS + 1):
        result = None
        handoff = previous if attempt > 1 or not actor_has_previous else None
        try:
            ray.get(actor.submit.remote(epoch, rank, indices, encoded.features, encoded.codes, handoff))
            result = ray.get(actor.result.remote(epoch, world, num_train))
        except (RayActorError, ActorUnavailableError) as err:
            console.warning(f"rank {rank}: clustering round of epoch {epoch + 1} failed (attempt {attempt} of "
                            f"{CLUSTER_ATTEMPTS}): {str(err).splitlines()[0]}; waiting for the actor to answer again "
                            f"(at most {ACTOR_RESTART_TIMEOUT_S:.0f} s)")
            wait_for_restart(actor)
        if all_ranks_agree(result is not None):
            return result
    raise RuntimeError(f"the clustering actor failed {CLUSTER_ATTEMPTS} rounds of epoch {epoch + 1} in a row")


def wait_for_restart(actor: Any, timeout_s: float = ACTOR_RESTART_TIMEOUT_S) -> None:
    """Block until a restarting actor answers again, so that a retry spends its attempt on a live actor rather than
    on "the actor is restarting" (a restart takes seconds on a loaded node). Returns early if the actor is dead for
    good (out of restarts): the next attempt then fails with that error."""
    import ray
    from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get(actor.backend.remote(), timeout=max(1.0, deadline - time.monotonic()))
            return
        except ActorDiedError:
            return
        except (ActorUnavailableError, GetTimeoutError):
            time.sleep(0.5)


def weights_digest(model: torch.nn.Module) -> bytes:
    """A BLAKE2b digest of every tensor of ``model``'s state (names, dtypes, shapes and bytes): equal digests mean
    equal weights, whatever changed them (a fused optimiser step does not bump the tensors' version counters).
    About 40 ms for the released model's 12M parameters on one CPU core."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.digest()


class TrainWorker:
    """One rank's run; also the :class:`autossvh.trainer.EpochSteps` of the epoch skeleton."""

    def __init__(self, wc: WorkerConfig) -> None:
        import ray.train
        import ray.train.torch

        configure_logging(force=True)  # Ray configures the worker's root logger
        self.wc = wc
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.cfg = config_from_dict(wc.config)
        self.device = ray.train.torch.get_device()
        self.state: TrainState | None = None  # the last checkpoint's state (rank 0), resumed or reported
        self.logged_epochs: set[int] = set()
        self.console = WorkerConsole(wc.console, log)
        self.encodings: dict[str, tuple[bytes, Encoded, int]] = {}  # see _encode_block

    # ----- setup and teardown ---------------------------------------------------------------------------------

    def setup(self) -> None:
        """Model, optimiser and schedule (resumed from Ray Train's checkpoint if any), DDP, readers, MLflow."""
        import ray.train
        import ray.train.torch

        cfg = self.cfg
        torch.manual_seed(cfg.train.seed + self.rank)
        np.random.seed(cfg.train.seed + self.rank)
        self.model = AutoSSVH(cfg).to(self.device)
        store = open_store(self.wc.data, self.wc.storage_options)
        self.protocol = store.info.protocol
        self.holdout = validation_holdout(store.num_videos("train"), store.info.chunk_videos, self.wc.val_videos)
        if self.model.salience is not None:  # the same bank on every rank; a resumed run loads it with the weights
            self.model.salience.fit_from(store.split("train").feats, cfg.train.seed, store.info.chunk_videos,
                                         exclude=self.holdout.rows)
        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.guard = NonFiniteGuard(cfg.train.max_nonfinite_steps)
        self.start_epoch, self.last_result, self.actor_has_previous = 0, None, False
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                self._resume(TrainState.load(Path(folder) / CHECKPOINT_FILE, checkpoint.path, self.device))
        self.ddp = ray.train.torch.prepare_model(
            self.model, parallel_strategy_kwargs={"find_unused_parameters": leaves_parameters_unused(cfg)})
        self.reader = TrainReader(self.wc.data, "train", per_rank_batch_size(cfg.train.batch_size, self.world),
                                  self.rank, self.world, cfg.train.seed, self.wc.storage_options, drop_last=True,
                                  holdout=self.holdout)
        if self.rank == 0:
            self.labels = store.eval_labels()
            train = store.split("train")
            rows = self.holdout.first_training_rows(PROBE_VIDEOS)
            signal = store.frame_signal("train", int(rows[-1]) + 1)
            self.probe = (torch.from_numpy(np.asarray(train.feats[rows], dtype=np.float32)),
                          None if signal is None else signal[rows])
            held = self.holdout.rows  # whole chunks but one: read once, kept as stored
            self.validation = (torch.from_numpy(np.asarray(train.feats[held])), np.asarray(train.labels[held])) \
                if len(held) else None
            self._start_mlflow(store)

    def _resume(self, state: TrainState) -> None:
        self.model.load_state_dict(state.model)
        self.optimizer.load_state_dict(state.optimizer)
        self.scheduler.load_state_dict(state.scheduler)
        self.start_epoch, self.last_result, self.state = state.epoch + 1, state.clustering, state
        if len(state.rng) == self.world:  # same world size: every rank continues its own random stream
            set_rng_state(state.rng[self.rank])
        if self.rank == 0:
            self.console.info(f"resumed from the checkpoint of epoch {state.epoch + 1} (MLflow run "
                              f"{state.mlflow_run_id})")

    def _start_mlflow(self, store: FeatureStore) -> None:
        """Rank 0 continues the run the driver created: on a fresh start it logs the config and the store as its
        input; resuming a checkpoint, it back-fills the epochs the run lacks."""
        from mlflow.tracking import MlflowClient

        from cluster import tracking

        wc, resumed = self.wc, self.state
        active = tracking.continue_run(wc.mlflow_uri, resumed.mlflow_run_id if resumed else wc.mlflow_run_id)
        self.run_id = active.info.run_id
        if resumed is None:
            tracking.log_config(self.cfg, {"data": wc.data, "storage_options": wc.storage_options,
                                           "world_size": self.world, "selection": wc.selection,
                                           "val_videos": wc.val_videos})
            tracking.log_store_input(store)
            return
        # An epoch logged whose checkpoint Ray never registered (the job died in between) stays as logged.
        history = MlflowClient().get_metric_history(self.run_id, "loss/total")
        self.logged_epochs = {m.step - 1 for m in history}  # MLflow steps count epochs from 1
        for record in resumed.history:
            if record.epoch not in self.logged_epochs:
                tracking.log_epoch(record, num_cluster=self.cfg.cluster.num_cluster)
                self.logged_epochs.add(record.epoch)

    def cleanup(self) -> None:
        if self.rank == 0:
            import mlflow

            mlflow.end_run()

    # ----- the epoch loop -------------------------------------------------------------------------------------

    def train(self) -> None:
        """Epochs ``start_epoch`` .. ``train.num_epochs - 1`` of the shared skeleton, each reported and logged."""
        epochs, start = self.cfg.train.num_epochs, time.perf_counter()
        if self.rank == 0 and self.start_epoch < epochs:
            self.console.info(f"{self.world} worker(s) ready on {self.device.type}: epochs {self.start_epoch + 1} "
                              f"to {epochs}")
        for epoch in range(self.start_epoch, epochs):
            record = run_epoch(self, self.cfg, epoch, self.device)
            val_map5 = self._report(record)
            if self.rank == 0:
                eta = (time.perf_counter() - start) / (epoch + 1 - self.start_epoch) * (epochs - epoch - 1)
                self.console.info(epoch_line(record, epochs, eta, val_map5))

    def _report(self, record: EpochRecord) -> float | None:
        """Rank 0: the epoch's checkpoint to Ray Train, then its metrics to MLflow; other ranks: the metrics.
        Returns the held-out videos' mAP@5 where rank 0 evaluated them this epoch, else None."""
        import ray.train

        from cluster import tracking

        stats = record.stats
        metrics = {"epoch": record.epoch, "loss": stats.loss, "train_seconds": stats.seconds,
                   "cluster_seconds": record.cluster_seconds, "eval_seconds": record.eval_seconds}
        rng = gather_objects(rng_state())
        if self.rank != 0:
            ray.train.report(metrics)
            return None
        previous = self.state
        history = [*(previous.history if previous else []), record]
        best = (previous.best_epoch, previous.best_map5, previous.best_model) if previous else (-1, -1.0, None)
        scores: dict[str, float] = {}  # the selection scores besides the test mAP@5, logged under map/
        if record.retrieval is not None:
            scores["knn_agreement"] = self._knn_agreement()
            if self.validation is not None:
                scores["val_map5"] = self._val_map5()
            by = SELECTION_SCORES.get(self.wc.selection)
            score = record.retrieval.map_at_k[5] if by is None else scores[by]
            if score > best[1]:
                kept = {k: v.detach().clone() for k, v in self.model.state_dict().items()} \
                    if self.wc.selection != "last" else None
                best = (record.epoch, score, kept)
            metrics |= {f"map_at_{k}": v for k, v in record.retrieval.map_at_k.items()}
            metrics |= {"gmap_l2": record.retrieval.gmap_l2, **scores}
        self.state = TrainState(
            model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(), epoch=record.epoch, config=self.cfg.to_dict(),
            mlflow_run_id=self.run_id, rng=rng, clustering=self.last_result, history=history,
            best_epoch=best[0], best_map5=best[1], best_model=best[2], val_videos=self.wc.val_videos)
        report_checkpoint(metrics, self.state)
        if record.epoch in self.logged_epochs:
            self.console.warning(f"epoch {record.epoch + 1} was logged to MLflow by an attempt whose checkpoint was "
                                 "lost; keeping those metrics")
        else:
            tracking.log_epoch(record, num_cluster=self.cfg.cluster.num_cluster)
            if scores:
                import mlflow

                mlflow.log_metrics({f"map/{key}": value for key, value in scores.items()},
                                   step=tracking.epoch_step(record.epoch))
        return scores.get("val_map5")

    # ----- EpochSteps -----------------------------------------------------------------------------------------

    def learning_rate(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def cluster(self, epoch: int) -> ClusteringResult:
        if self.cfg.loss.centers == "input":
            if self.last_result is None:
                self.last_result = self._input_centers()
            return self.last_result
        encoded, first = self._encode_block(self.model, "train")
        rows = np.arange(first, first + len(encoded.codes), dtype=np.int64)
        training = self.holdout.is_training(rows)  # held-out videos are encoded with the block, never clustered
        indices = self.holdout.training_index(rows[training])
        encoded = Encoded(encoded.codes[training], encoded.features[training])
        previous = self.last_result if self.rank == 0 else None
        self.last_result = cluster_on_actor(self.wc.actor, epoch, self.rank, self.world, self.holdout.num_training,
                                            indices, encoded, self.console, previous, self.actor_has_previous)
        self.actor_has_previous = True
        return self.last_result

    def _knn_agreement(self) -> float:
        """The label-free selection score (:func:`autossvh.metrics.knn_agreement`) of the current model on the
        probe videos of the train split (rank 0): their codes' neighbours against their pooled inputs'."""
        feats = self.probe[0]
        codes = encode(self.model, [feats], self.device).codes
        return knn_agreement(codes, pooled_inputs(self.model, [feats], self.device), KNN_AGREEMENT_K)

    def _val_map5(self) -> float:
        """The ``best-val-map5`` selection score of the current model (rank 0): the leave-one-out mAP@5 of the
        held-out videos among themselves (:func:`autossvh.metrics.leave_one_out_map`), with their labels only."""
        feats, labels = self.validation
        codes = encode(self.model, feats.split(self.encode_batch), self.device).codes
        return leave_one_out_map(codes, labels, VAL_MAP_K)

    def _input_centers(self) -> ClusteringResult:
        """The fixed centres of ``loss.centers=input`` (:mod:`autossvh.anchors`): every rank pools its block of the
        train split (less the held-out videos), rank 0 clusters them all and hands the result to every rank."""
        reader = EvalReader(self.wc.data, "train", self.encode_batch, self.rank, self.world, self.wc.storage_options,
                            dtype=None)
        pooled = pooled_inputs(self.model, make_loader(reader, self.wc.loader_workers), self.device)
        pooled = gather_rows_to_rank0(pooled[self.holdout.is_training(np.arange(reader.start, reader.stop))])
        result = None if pooled is None else input_centers(pooled, self.cfg, use_gpu=self.device.type == "cuda")
        return broadcast_from_rank0(result)

    def train_epoch(self, epoch: int, targets: ClusterTargets | None) -> EpochStats:
        self.reader.set_epoch(epoch)
        stats = train_one_epoch(self.ddp, make_loader(self.reader, self.wc.loader_workers), self.optimizer, self.cfg,
                                self.device, targets, gather=gather_with_grad, guard=self.guard)
        self.scheduler.step()
        return stats

    def probe_sampler(self) -> SamplerDiagnostics | None:
        return sampler_diagnostics(self.model, *self.probe) if self.rank == 0 else None

    def evaluate(self, epoch: int) -> Retrieval | None:
        return self._evaluate(self.model)

    # ----- evaluation -----------------------------------------------------------------------------------------

    @functools.cached_property
    def encode_batch(self) -> int:
        """Videos per encoding batch (:func:`autossvh.engine.encode_batch_size`), whole chunks of the store."""
        info = open_store(self.wc.data, self.wc.storage_options).info
        return encode_batch_size(self.cfg, self.device, np.dtype(info.dtype).itemsize, info.chunk_videos)

    def _encode_block(self, model: AutoSSVH, split: str) -> tuple[Encoded, int]:
        """This rank's contiguous block of ``split`` encoded, and the block's first row.

        The features are read as stored and converted where the model runs. The last encoding of each stored
        split is kept with the digest of the weights that made it (:func:`weights_digest`) and returned again
        while they are unchanged: where the database is the train split (UCF101, HMDB51) an evaluation encodes
        exactly what the next epoch's clustering round needs, and the final evaluation of the last epoch's model
        repeats that epoch's evaluation."""
        stored, digest = stored_split(self.protocol, split), weights_digest(model)
        kept = self.encodings.get(stored)
        if kept is None or kept[0] != digest:
            reader = EvalReader(self.wc.data, split, self.encode_batch, self.rank, self.world,
                                self.wc.storage_options, dtype=None)
            kept = digest, encode(model, make_loader(reader, self.wc.loader_workers), self.device), reader.start
            self.encodings[stored] = kept
        return kept[1], kept[2]

    def _evaluate(self, model: AutoSSVH, with_pr: bool = False) -> Retrieval | None:
        """Every rank encodes its block of query (and database, unless aliased); rank 0 gets the mAP@K."""
        query = gather_rows_to_rank0(self._encode_block(model, "query")[0].codes)
        database = query if queries_are_database(self.protocol) else gather_rows_to_rank0(
            self._encode_block(model, "database")[0].codes)
        if self.rank != 0:
            return None
        return evaluate_codes(query, self.labels["query"], database, self.labels["database"], with_pr)

    def final_evaluation(self) -> None:
        """All ranks encode the selected model's codes; rank 0 adds mAP@K, GMAP and precision/recall by radius to
        a last checkpoint (``final``), which the driver reads instead of evaluating in its own process."""
        import ray
        import ray.train

        chosen = None
        if self.rank == 0 and self.wc.selection != "last" and self.state.best_epoch != self.state.epoch:
            chosen = self.state.best_model
        chosen = broadcast_from_rank0(chosen)
        model = self.model
        if chosen is not None:  # a separate model: the final checkpoint keeps the last epoch's weights to resume
            model = AutoSSVH(self.cfg).to(self.device)
            model.load_state_dict(chosen)
        retrieval = self._evaluate(model, with_pr=True)
        nodes = gather_objects(ray.get_runtime_context().get_node_id())
        if self.rank != 0:
            ray.train.report({})
            return
        selected = self.state.best_epoch if chosen is not None else self.state.epoch
        self.state.final = FinalEvaluation(selected, retrieval)
        metrics = {"epoch": self.state.epoch, "selected_epoch": selected, "worker_nodes": nodes,
                   "gmap_l2": retrieval.gmap_l2} | {f"map_at_{k}": v for k, v in retrieval.map_at_k.items()}
        report_checkpoint(metrics, self.state)
