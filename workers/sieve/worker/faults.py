"""Worker faults: a fault that hits every event fails the worker, not the events.

Dead letters are for bad events. A batch that fails is retried event by event
(:meth:`sieve.worker.router.RouterWorker._process`, and the pipeline's own
isolation of a failing encode); what still fails alone is dead-lettered. But when
every event of two consecutive batches fails at the same stage with the same error
class (an encoder that raises on everything, a compute child that cannot restart),
the fault is the worker's, and so is a compute call that outlives
``compute_timeout_s``. Then :class:`FaultWatch`:

* does not publish the batch (nothing is committed for its events) and takes no
  new batch (the worker's compute slot stays taken);
* turns ``/readyz`` false and sets ``sieve_worker_fault`` (the ``SieveWorkerFault``
  alert fires on it), counting the fault in ``sieve_worker_faults_total``;
* retries the batch with back-off; once a try is no longer a fault, the worker
  goes on as before;
* after ``worker_fault_exit_s`` it fails the worker (:func:`exit_worker`): the
  process exits non-zero and the orchestrator replaces it.

A poison event among good ones is still a dead letter: its batch is not all failures.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Sequence

import faust

from sieve.contracts import DeadLetter
from sieve.kafka.records import RawRecord
from sieve.worker import metrics
from sieve.worker.compute import Computed, ComputeTimeout

log = logging.getLogger(__name__)

#: Dead-letter reasons that say the processing code raised (not that the input was malformed).
PROCESSING_ERRORS = frozenset({"encode_error", "pipeline_error"})
#: The exit status of a failed worker (EX_SOFTWARE).
EXIT_CODE = 70
_RETRY_FIRST_S = 1.0
_RETRY_MAX_S = 30.0

Signature = tuple[str, str]  # (stage, error class)
_TIMED_OUT: Signature = ("compute", "ComputeTimeout")


class WorkerFailure(RuntimeError):
    """The worker cannot go on (not authorised to publish, a fault past ``worker_fault_exit_s``); it exits."""


def fault_signature(letters: Sequence[DeadLetter], events: int) -> Signature | None:
    """``(stage, error class)`` when each of a batch's ``events`` failed processing the same way, else None.

    Only letters whose reason says the processing code raised count
    (:data:`PROCESSING_ERRORS`): a batch of malformed inputs is bad data, dead-lettered as such.
    """
    failed = [letter for letter in letters if letter.reason in PROCESSING_ERRORS]
    if events == 0 or len(failed) != events:
        return None
    signatures = {(letter.stage, letter.error.split(":", 1)[0]) for letter in failed}
    return signatures.pop() if len(signatures) == 1 else None


def exit_worker(app: faust.App, failure: BaseException, grace_s: float) -> None:
    """End the worker because of ``failure``: it exits non-zero.

    The Faust app is crashed with ``failure`` (its worker stops and re-raises it); a
    process still alive ``grace_s`` later (a shutdown waiting for a hung compute
    thread) is ended with :data:`EXIT_CODE`.
    """
    log.critical("worker failed: %s", failure)
    asyncio.ensure_future(app.crash(failure))
    timer = threading.Timer(grace_s, os._exit, args=(EXIT_CODE,))
    timer.daemon = True
    timer.start()


class FaultWatch:
    """Tells a worker fault from bad events, batch after batch, and rides a fault out (see the module)."""

    def __init__(self, topology: str, exit_after_s: float, fail: Callable[[WorkerFailure], None]) -> None:
        self.topology = topology
        self.exit_after_s = exit_after_s
        self.fail = fail
        self.previous: Signature | None = None  # the last batch's, when all its events failed alike
        self.active: Signature | None = None  # the fault being ridden out
        self.failed = False

    def readiness(self) -> tuple[bool, str]:
        """``/readyz`` check: not ready during a worker fault (or after it failed the worker)."""
        if self.active is None and not self.failed:
            return True, "no worker fault"
        stage, error = self.active or ("?", "?")
        return False, f"worker fault: every event fails at the {stage} stage with {error}"

    async def check(self, records: list[RawRecord],
                    compute: Callable[[list[RawRecord]], Awaitable[Computed]]) -> Computed:
        """``compute(records)``; a worker fault is ridden out here (it returns once a try is no fault).

        Raises :class:`WorkerFailure` when the fault outlasts ``exit_after_s`` (after calling ``fail``).
        """
        try:
            result = await compute(records)
        except ComputeTimeout as exc:  # a hung compute: the worker's fault whatever the events are
            return await self._ride_out(records, compute, _TIMED_OUT, str(exc))
        signature = fault_signature(result.dead_letters, len(records))
        if signature is None or signature != self.previous:
            self.previous = signature
            return result
        return await self._ride_out(records, compute, signature, result.dead_letters[0].error)

    async def _ride_out(self, records: list[RawRecord],
                        compute: Callable[[list[RawRecord]], Awaitable[Computed]],
                        signature: Signature, detail: str) -> Computed:
        stage, error = self.active = signature
        metrics.WORKER_FAULT.labels(self.topology).set(1)
        metrics.WORKER_FAULTS.labels(self.topology, stage, error).inc()
        log.error("worker fault: every event fails at the %s stage with %s (%s); consuming nothing, "
                  "retrying the batch; the worker exits if this lasts %.0fs", stage, error, detail,
                  self.exit_after_s)
        deadline = time.monotonic() + self.exit_after_s
        delay = _RETRY_FIRST_S
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.failed = True
                failure = WorkerFailure(
                    f"worker fault for {self.exit_after_s:g}s (worker_fault_exit_s): every event fails at "
                    f"the {stage} stage with {error} ({detail}); exiting so that the worker is replaced")
                self.fail(failure)
                raise failure
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, _RETRY_MAX_S)
            try:
                result = await compute(records)
            except ComputeTimeout as exc:
                detail = str(exc)
                continue
            if fault_signature(result.dead_letters, len(records)) is None:
                log.info("worker fault cleared: the batch was computed again")
                self.active = self.previous = None
                metrics.WORKER_FAULT.labels(self.topology).set(0)
                return result
            detail = result.dead_letters[0].error
