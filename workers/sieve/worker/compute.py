"""Where the router computes a batch: on a thread of the worker, or in a child process.

The pipeline (decode, encode, match, decide, serialise, plan) is pure per-event
Python around the encoder call. On a thread (``compute: thread``) it shares the
interpreter lock with the event loop that runs Faust's consumer and the producer:
both stages take turns on one core. In a child process (``compute: process``) it
runs on its own core and interpreter, and the worker's process keeps only the
Kafka side; the records go to the child and the planned messages come back
pickled, as files in a memory-backed folder. The default, ``auto``, is the child
when the worker may use two CPUs or more (:func:`sieve.settings.usable_cpus`) and
the thread otherwise. With the trivial encoder the child measured 1.2-1.8x the
events/s of the thread on 2 cores, which is what brings a worker to 0.4x of a plain
aiokafka loop (docs/benchmarks.md); with MiniLM on the CPU the encoder is the bound
and both modes make the same events/s (the child costs a second interpreter); on a
GPU the per-event Python is the bound again and the child pays.

Both return a :class:`Computed`: the messages to publish and what the metrics
count, never the decision rows (pickling those would cost more than the child saves).
The child is spawned (not forked: torch and threads do not survive a fork), builds
its own encoders from the topology, and gets route indexes from the worker, which
alone talks to the route store. The worker loads those indexes by the encoder ids the
topology names (:func:`encoder_ids`), so it loads no model itself unless it embeds
routes (``--sync``); the child's pipeline checks the ids against its loaded encoders.
A child that dies (out of memory, a crash in native code) is replaced and the batch
is raised as failed, so the worker retries it and, if one record keeps killing it,
dead-letters that record alone.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import multiprocessing
import os
import pickle
import shutil
import signal
import tempfile
import threading
import time
import weakref
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from threadpoolctl import threadpool_limits
from typing_extensions import override

from sieve.contracts import DeadLetter
from sieve.encoders.core import (
    ImageEncoder,
    TextEncoder,
    clip_encoder_id,
    encoders_for,
    text_encoder_id,
)
from sieve.flow.match import RouteIndex
from sieve.flow.pipeline import BatchResult, RouterPipeline
from sieve.kafka.records import Outbound, RawRecord, new_tuple
from sieve.routeset import Space
from sieve.settings import Settings
from sieve.topology import Topology

log = logging.getLogger(__name__)

def settle_heap(gen0_threshold: int = 50_000) -> None:
    """Keep the garbage collector off the per-event path.

    A worker holds millions of long-lived objects after start-up (torch, the
    model, Faust); a batch allocates tens of objects per event that live until
    the batch is published. With CPython's default thresholds the collector runs
    every 700 allocations and the older generations walk that whole heap: in a
    profile of the trivial-encoder worker it took about half of ``decide``. So:
    collect once, freeze the start-up heap (never scanned again) and collect the
    young generation every ``gen0_threshold`` allocations instead.
    """
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(gen0_threshold, gen1, gen2)


@dataclass
class Computed:
    """What the worker needs of a computed batch: the messages, and what the metrics count.

    ``outcomes`` counts decisions by ``(outcome, route or "", decided_by)``;
    ``event_times`` are the Kafka timestamps (s) of the decided events that had one
    (end-to-end latency is measured from them once the batch is acknowledged).
    """

    outbound: list[Outbound]
    dead_letters: list[DeadLetter]
    seconds: dict[str, float]
    outcomes: dict[tuple[str, str, str], int]
    event_times: list[float]


def summarise(result: BatchResult) -> Computed:
    """A pipeline result reduced to what leaves the compute stage."""
    outcomes: dict[tuple[str, str, str], int] = {}
    event_times: list[float] = []
    for row in result.rows:
        key = (row["outcome"], row["route"] or "", row["decided_by"])
        outcomes[key] = outcomes.get(key, 0) + 1
        if row["latency_ms"] is not None:
            event_times.append(row["decided_at"].timestamp() - row["latency_ms"] / 1000.0)
    return Computed(result.outbound, result.dead_letters, result.seconds, outcomes, event_times)


def limit_blas_threads(settings: Settings) -> None:
    """Cap numpy's BLAS thread pool at ``settings.blas_threads`` for this process (worker or child)."""
    threadpool_limits(limits=settings.blas_threads, user_api="blas")


def build_encoders(topology: Topology, settings: Settings) -> tuple[TextEncoder, ImageEncoder | None]:
    """The topology's text encoder and, when it has one, its image encoder (settings: device, threads)."""
    encoder, image_encoder = encoders_for(topology.encoder, topology.image_encoder, settings)
    assert encoder is not None
    return encoder, image_encoder


def encoder_ids(topology: Topology) -> dict[Space, str]:
    """Each space's encoder id, from the topology alone: what to load its route index by, no model loaded."""
    ids: dict[Space, str] = {"text": text_encoder_id(topology.encoder)}
    if topology.image_encoder is not None:
        ids["image"] = clip_encoder_id(topology.image_encoder.model, topology.image_encoder.pretrained)
    return ids


def build_pipeline(topology: Topology, settings: Settings, indexes: dict[Space, RouteIndex],
                   encoders: tuple[TextEncoder, ImageEncoder | None] | None = None) -> RouterPipeline:
    """The topology's pipeline over ``indexes``, with ``encoders`` or ones built here.

    The pipeline refuses an index whose encoder id is not its encoder's, so ids taken
    from :func:`encoder_ids` are checked once the models load.
    """
    encoder, image_encoder = encoders or build_encoders(topology, settings)
    return RouterPipeline(topology, encoder, indexes["text"], settings.worker_name,
                          image_encoder=image_encoder, image_index=indexes.get("image"),
                          image_fetch=settings.images)


class Compute:
    """Runs batches through a topology's pipeline; holds the route indexes it decides against."""

    mode: str  # "thread" or "process"

    @property
    def indexes(self) -> dict[Space, RouteIndex]:
        """Every space's current route index."""
        raise NotImplementedError

    async def run(self, records: list[RawRecord]) -> Computed:
        """One batch through every stage."""
        raise NotImplementedError

    async def swap_index(self, index: RouteIndex) -> None:
        """Decide against ``index`` (in its space) from the next batch on."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop the thread or the child."""
        raise NotImplementedError


def _run_pipeline(pipeline: RouterPipeline, records: list[RawRecord]) -> Computed:
    return summarise(pipeline.process(records))


class ThreadCompute(Compute):
    """The pipeline on one thread of the worker's process, a batch at a time."""

    mode = "thread"

    def __init__(self, pipeline: RouterPipeline) -> None:
        self.pipeline = pipeline
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="sieve-encode")

    @property
    @override
    def indexes(self) -> dict[Space, RouteIndex]:
        return self.pipeline.indexes

    @override
    async def run(self, records: list[RawRecord]) -> Computed:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, _run_pipeline, self.pipeline, records)

    @override
    async def swap_index(self, index: RouteIndex) -> None:
        self.pipeline.swap_index(index)

    @override
    def close(self) -> None:
        self._executor.shutdown(wait=False)


# -- the child process ---------------------------------------------------------------------

_CHILD: RouterPipeline | None = None
_SCRATCH = ""


def _scratch_root() -> str:
    """A memory-backed folder for batch files when there is one (``/dev/shm``), else the temp folder."""
    return "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


def _put(folder: str, value: Any) -> str:
    """Pickle ``value`` (no cycles) into a new file in ``folder``; its path.

    The pickler runs without its memo (``fast``): a batch's messages are thousands of
    small tuples and bytes objects, and memoising each of them cost 1.5 µs per message
    against 0.3 without (the memo only saves repeats of the same object, here the topic
    and header names). ``fast`` refuses self-referencing values; batches have none.
    """
    fd, path = tempfile.mkstemp(dir=folder, suffix=".pickle")
    with os.fdopen(fd, "wb") as file:
        pickler = pickle.Pickler(file, protocol=pickle.HIGHEST_PROTOCOL)
        pickler.fast = True
        pickler.dump(value)
    return path


def _take(path: str) -> Any:
    """What :func:`_put` wrote (the file is removed)."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    finally:
        os.unlink(path)
    return pickle.loads(data)


def _exit_with(parent: int, scratch: str) -> None:
    """Exit as soon as ``parent`` is gone (a SIGKILLed worker cannot tell its child to stop).

    The child holds both ends of its call queue's pipe, so it would wait for work
    forever; it polls its parent's id instead (reparented: the worker died) and
    removes the batch files' folder on its way out.
    """
    while os.getppid() == parent:
        time.sleep(0.5)
    shutil.rmtree(scratch, ignore_errors=True)
    os._exit(0)


def _child_start(
    topology: Topology, settings: Settings, indexes: dict[Space, RouteIndex], parent: int, scratch: str,
) -> None:
    """In the child: build the encoders and the pipeline once; leave signals to the worker."""
    global _CHILD, _SCRATCH

    _SCRATCH = scratch
    threading.Thread(target=_exit_with, args=(parent, scratch), name="sieve-parent-watch",
                     daemon=True).start()
    # The worker decides when the child stops (a Ctrl-C reaches the whole process group).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    limit_blas_threads(settings)
    _CHILD = build_pipeline(topology, settings, indexes)
    settle_heap()


def _child_ready() -> int:
    return os.getpid()




def _child_run(records_file: str) -> str:
    assert _CHILD is not None
    rows: list[tuple[Any, ...]] = _take(records_file)
    computed = _run_pipeline(_CHILD, [new_tuple(RawRecord, row) for row in rows])
    # Named tuples pickle through a Python-level __reduce__ each (and unpickle through their
    # __new__): plain tuples cost a third as much on both sides.
    computed.outbound = [tuple(message) for message in computed.outbound]  # type: ignore[misc]
    return _put(_SCRATCH, computed)


def _child_swap(index: RouteIndex) -> None:
    assert _CHILD is not None
    _CHILD.swap_index(index)


class ChildDied(RuntimeError):
    """The compute child exited while it held a batch (it has been replaced)."""


class ProcessCompute(Compute):
    """The pipeline in a spawned child process with its own encoders; the worker keeps the Kafka side.

    Starting it blocks until the child has built its encoders (so a model that
    cannot load fails the worker's start, not its first batch).
    """

    mode = "process"

    def __init__(self, topology: Topology, settings: Settings, indexes: dict[Space, RouteIndex]) -> None:
        self.topology = topology
        self.settings = settings
        self._indexes = dict(indexes)
        self.restarts = 0
        self.scratch = tempfile.mkdtemp(prefix="sieve-compute-", dir=_scratch_root())
        # removed by close(), at the worker's exit, or by the child if the worker is killed
        weakref.finalize(self, shutil.rmtree, self.scratch, ignore_errors=True)
        self._executor = self._start()

    def _start(self) -> ProcessPoolExecutor:
        executor = ProcessPoolExecutor(
            1, mp_context=multiprocessing.get_context("spawn"), initializer=_child_start,
            initargs=(self.topology, self.settings, self._indexes, os.getpid(), self.scratch),
        )
        try:
            self.pid = executor.submit(_child_ready).result()
        except BrokenProcessPool:
            executor.shutdown(wait=False)
            raise ValueError("the compute child could not build its pipeline (its error is printed "
                             "above); SIEVE_COMPUTE=thread runs it in the worker's process") from None
        return executor

    @property
    @override
    def indexes(self) -> dict[Space, RouteIndex]:
        return dict(self._indexes)

    async def _call(self, function: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        executor: Executor = self._executor
        try:
            return await loop.run_in_executor(executor, function, *args)
        except BrokenProcessPool as exc:
            if executor is self._executor:  # not yet replaced by a concurrent call
                log.error("the compute child (pid %s) died; starting a new one", self.pid)
                self.restarts += 1
                self._executor = await loop.run_in_executor(None, self._start)
            raise ChildDied(f"the compute child died during {function.__name__}") from exc

    @override
    async def run(self, records: list[RawRecord]) -> Computed:
        # A batch goes to the child and back as files, not through the executor's pipe: the
        # pipe moves 64 kB per read, and between reads the worker's result thread waits for
        # the interpreter lock while the child, its pipe full, waits for the worker.
        records_file = _put(self.scratch, [tuple(record) for record in records])
        try:
            result_file: str = await self._call(_child_run, records_file)
        finally:
            if os.path.exists(records_file):  # the child died before it took the batch
                os.unlink(records_file)
        result: Computed = _take(result_file)
        result.outbound = [new_tuple(Outbound, message) for message in result.outbound]
        return result

    @override
    async def swap_index(self, index: RouteIndex) -> None:
        self._indexes[index.space] = index  # a restarted child starts with it
        try:
            await self._call(_child_swap, index)
        except ChildDied:
            pass  # the new child was started with the new index

    @override
    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        shutil.rmtree(self.scratch, ignore_errors=True)


def build_compute(topology: Topology, settings: Settings, indexes: dict[Space, RouteIndex],
                  encoders: tuple[TextEncoder, ImageEncoder | None] | None = None) -> Compute:
    """``settings.compute_mode``: a child that builds its own encoders, or the pipeline on a thread.

    On a thread the pipeline uses ``encoders`` when given (built here otherwise); a
    child always builds its own, so a worker in process mode need not load a model.
    """
    if settings.compute_mode == "process":
        return ProcessCompute(topology, settings, indexes)
    return ThreadCompute(build_pipeline(topology, settings, indexes, encoders))
