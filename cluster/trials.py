"""What a sweep or an ablation (``jobs/tune.py``, ``jobs/ablate.py``) says and records while its Tune trials run.

The console is as quiet as a training job's: Ray Tune's own reporter (its status table every 30 s, the trial
tables, the "View detailed results" and TensorBoard hints) stays off unless ``--verbose``
(:func:`tune_run_options`), and :class:`TrialTrail` logs one line per finished trial and a progress line at most
every :data:`PROGRESS_EVERY_S` seconds.

The MLflow trail is honest: every trial's child run ends FINISHED (its Train run ends it), FAILED (the trial
raised) or KILLED (a scheduler such as ASHA stopped it early, or the job was stopped), with the reason in the tag
``cluster.tracking.END_REASON_TAG``. The parent run ends only when its trials have: :func:`stopping_ends_runs`
turns SIGINT and SIGTERM in the job's driver into :class:`JobStopped` and ends the parent and its open children
KILLED (any other exception: FAILED), and a re-run ends the children a killed job left RUNNING
(:func:`cluster.tracking.end_open_children`) before it runs their trials again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ray.tune import Callback
from ray.tune.experiment import Trial

from cluster import tracking

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 60.0


class JobStopped(BaseException):
    """SIGINT or SIGTERM reached the job's driver (a BaseException, like KeyboardInterrupt: nothing catches it
    by accident on its way out)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def tune_run_options(verbose: bool) -> dict[str, Any]:
    """``tune.RunConfig`` options that keep Ray Tune's reporter off the console unless ``verbose``.

    Tune's newer output engine prints its start block and hints whatever the verbosity, so the quiet console uses
    the older engine (``RAY_AIR_NEW_OUTPUT=0``) at verbosity 0, which prints nothing."""
    if verbose:
        return {}
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    return {"verbose": 0}


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _scores(result: dict[str, Any]) -> str:
    """mAP@5 and GMAP of a trial's last report, where it has them."""
    parts = [f"{label} {result[key]:.4f}" for key, label in (("map_at_5", "mAP@5"), ("gmap_l2", "GMAP"))
             if isinstance(result.get(key), (int, float))]
    return ", ".join(parts) or "no evaluation reported"


def _error_line(trial: Trial) -> str:
    """The last line of a failed trial's traceback (the exception and its message), else where its log is."""
    try:
        lines = [line for line in Path(trial.error_file).read_text().splitlines() if line.strip()]
    except (OSError, TypeError):
        lines = []
    return lines[-1].strip() if lines else f"see the trial's log under {trial.path}"


class TrialTrail(Callback):
    """A Tune callback in the job's driver: one line per finished, stopped or failed trial, a progress line at
    most every ``every_s`` seconds, and each trial's MLflow child run ended as the trial ended.

    ``run_name``: the child run's name of a trial (each trial's Train run creates its child run under that name);
    ``stopper``: what may stop a trial early, as a reader should see it (``"ASHA (...)"``), None where nothing
    does; ``epochs``: the epochs of a trial that runs to its end."""

    def __init__(self, tracking_uri: str, parent_run_id: str, total: int, run_name: Callable[[Trial], str],
                 epochs: int, stopper: str | None = None, every_s: float = PROGRESS_EVERY_S) -> None:
        self.tracking_uri, self.parent_run_id, self.total = tracking_uri, parent_run_id, total
        self.run_name, self.epochs, self.stopper, self.every_s = run_name, epochs, stopper, every_s
        self.start = self.last_progress = time.monotonic()
        self.finished = self.stopped = self.failed = 0

    def _end_if_running(self, name: str, status: str, reason: str) -> bool:
        """End the trial's child run as ``status`` with ``reason`` if it is still RUNNING; True if it was. An MLflow
        error is logged, not raised: raised in a Tune callback, it would end every trial of the job."""
        try:
            running = tracking.children(self.tracking_uri, self.parent_run_id, name, status="RUNNING")
            for run in running:
                tracking.end_run(self.tracking_uri, run.info.run_id, status, reason)
        except Exception as err:  # bookkeeping must not stop the trials
            log.warning("could not end the MLflow run of trial %s (%s: %s); it may stay RUNNING", name,
                        type(err).__name__, err)
            return False
        return bool(running)

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        """A trial that returned has a FINISHED child run (its Train run ended it); one whose run is still RUNNING
        was stopped before its end by the scheduler, and its run ends KILLED with the reason."""
        name, result = self.run_name(trial), trial.last_result or {}
        seconds, epoch = result.get("time_total_s", 0.0), result.get("epoch")
        when = f"after epoch {int(epoch) + 1} of {self.epochs}" if isinstance(epoch, (int, float)) else "early"
        reason = f"stopped {when} by {self.stopper or 'the Tune scheduler'}: {_scores(result)}"
        if self._end_if_running(name, "KILLED", reason):
            self.stopped += 1
            log.info("trial %s %s (%s); MLflow run KILLED", name, reason, _duration(seconds))
            return
        self.finished += 1
        log.info("trial %s finished (%d of %d): %s, %s", name, self.finished + self.stopped + self.failed, self.total,
                 _scores(result), _duration(seconds))

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        name, error = self.run_name(trial), _error_line(trial)
        self.failed += 1
        self._end_if_running(name, "FAILED", error)
        log.error("trial %s failed: %s (its log: %s)", name, error, trial.path)

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        """Every trial has ended: a child run still RUNNING now (its trial's end was missed) ends KILLED."""
        try:
            left = tracking.end_open_children(self.tracking_uri, self.parent_run_id, "KILLED",
                                              "still RUNNING when its Tune run ended")
        except Exception as err:  # bookkeeping must not hide the results
            log.warning("could not check the trials' MLflow runs (%s: %s)", type(err).__name__, err)
            return
        if left:
            log.warning("MLflow runs still RUNNING after their trials ended, now KILLED: %s", ", ".join(left))

    def on_step_end(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        now = time.monotonic()
        if now - self.last_progress < self.every_s:
            return
        self.last_progress = now
        running = sum(t.status == Trial.RUNNING for t in trials)
        ended = self.finished + self.stopped + self.failed
        log.info("progress: %d of %d trials ended (%d finished, %d stopped early, %d failed), %d running, "
                 "%d waiting; %s", ended, self.total, self.finished, self.stopped, self.failed, running,
                 max(0, self.total - ended - running), _duration(now - self.start))


@contextlib.contextmanager
def stopping_ends_runs(tracking_uri: str, parent_run_id: str) -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM stop the driver (Tune's own SIGINT handling, which would wait for the
    trials, is off), and the block raises :class:`JobStopped`. Whatever escapes the block ends the parent run and
    its children still RUNNING: KILLED for a stop (after Ray is shut down, so no trial ends its run afterwards),
    FAILED otherwise. Call it after Ray has started (``ray.init`` installs its own SIGTERM handler)."""
    import ray

    received: list[int] = []

    def stop(signum: int, frame: Any) -> None:
        received.append(signum)
        raise KeyboardInterrupt  # the one exception Ray's blocking calls hand back to Python as it is

    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except KeyboardInterrupt:
        for signum in previous:
            signal.signal(signum, signal.SIG_IGN)  # a second Ctrl-C must not cut the bookkeeping short
        stopped = JobStopped(received[0] if received else signal.SIGINT)
        ray.shutdown()
        reason = f"the job was stopped ({stopped}) while its trials ran"
        tracking.end_open_children(tracking_uri, parent_run_id, "KILLED", reason)
        tracking.end_run(tracking_uri, parent_run_id, "KILLED", reason)
        raise stopped from None
    except Exception as err:
        reason = f"the job failed: {type(err).__name__}: {err}"
        tracking.end_open_children(tracking_uri, parent_run_id, "FAILED", reason)
        tracking.end_run(tracking_uri, parent_run_id, "FAILED", reason)
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
