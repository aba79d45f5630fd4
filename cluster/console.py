"""What a training run says on the job's console.

Ray's processes do not forward their output to the job (``cluster.runtime.init_ray``), so the Train workers send
what the user should see, rank 0's progress lines and any rank's warnings, through a Ray queue that the driver
reads while the trainer fits, and the driver logs them. Everything is also logged in the worker's own log (Ray's
session logs), and ``--verbose`` forwards all of Ray's output as well.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

log = logging.getLogger(__name__)


class WorkerConsole:
    """A Train worker's messages for the job's console (``queue``: a ``ray.util.queue.Queue``, or None where no
    driver listens, as in a Tune trial)."""

    def __init__(self, queue: Any | None, logger: logging.Logger) -> None:
        self.queue = queue
        self.logger = logger

    def say(self, level: int, message: str) -> None:
        from ray.exceptions import RayError

        self.logger.log(level, message)
        if self.queue is None:
            return
        try:
            self.queue.put((level, message))
        except RayError as err:  # the driver's node is gone: training goes on, messages stay in this log
            self.logger.warning("the job console is unreachable (%s); messages go to this worker's log only",
                                type(err).__name__)
            self.queue = None

    def info(self, message: str) -> None:
        self.say(logging.INFO, message)

    def warning(self, message: str) -> None:
        self.say(logging.WARNING, message)


def new_console_queue() -> Any:
    """The queue a run's workers write to: a Ray actor that needs no CPU, on the driver's node, so that losing
    another node never takes the console with it."""
    import ray
    from ray.util.queue import Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})


def fit_showing_progress(trainer: Any, queue: Any) -> Any:
    """``trainer.fit()`` while logging, in this process, what the workers send to ``queue``; returns its result
    or raises its exception."""
    from ray.exceptions import RayError
    from ray.util.queue import Empty

    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as err:  # re-raised below, in the caller's thread
            outcome["error"] = err

    thread = threading.Thread(target=fit, name="trainer-fit", daemon=True)
    thread.start()
    try:
        while thread.is_alive() or not queue.empty():
            try:
                level, message = queue.get(timeout=0.5)
            except Empty:
                continue
            log.log(level, message)
    except RayError as err:
        log.warning("lost the workers' console (%s); training goes on, its progress is in the Ray worker logs",
                    type(err).__name__)
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
