"""The router's pipeline in a spawned child process (``compute: process``).

The child runs the pipeline on its own core and interpreter; the worker's process
keeps only the Kafka side. The records go to the child and the planned messages
come back pickled, as files in a memory-backed folder (not through the executor's
pipe). The child is spawned (not forked: torch and threads do not survive a fork),
builds its own encoders from the topology, and gets route indexes (each with its
route-set version's learned head, if any) from the worker, which alone talks to the
route store. A child that dies (out of memory, a crash in native code) is replaced
and the batch is raised as failed, so the worker retries it and, if one record keeps
killing it, dead-letters that record alone.
"""

from __future__ import annotations

import asyncio
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
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from typing_extensions import override

from sieve.flow.head import head_of
from sieve.flow.match import RouteIndex
from sieve.flow.pipeline import RouterPipeline
from sieve.kafka.records import Outbound, RawRecord, new_tuple
from sieve.routeset import Space
from sieve.settings import Settings
from sieve.topology import Topology
from sieve.worker.compute import (
    Compute,
    Computed,
    build_pipeline,
    limit_blas_threads,
    run_pipeline,
    settle_heap,
)

log = logging.getLogger(__name__)

_CHILD: RouterPipeline | None = None
_SCRATCH = ""


def _scratch_root() -> str:
    """A memory-backed folder for batch files when there is one (``/dev/shm``), else the temp folder."""
    return "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


def _put(folder: str, value: Any) -> str:
    """Pickle ``value`` (no cycles) into a new file in ``folder``; its path.

    The pickler runs without its memo (``fast``): a batch's messages are thousands of
    small tuples and bytes objects, and memoising each of them was most of the pickling
    (the memo only saves repeats of the same object, here the topic and header names).
    ``fast`` refuses self-referencing values; batches have none.
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
    tenant_indexes: dict[tuple[str, Space], RouteIndex] | None = None,
    shadow_index: RouteIndex | None = None,
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
    _CHILD = build_pipeline(topology, settings, indexes, tenant_indexes=tenant_indexes,
                            shadow_index=shadow_index)
    settle_heap()


def _child_ready() -> int:
    return os.getpid()


def _child_run(records_file: str) -> str:
    assert _CHILD is not None
    rows: list[tuple[Any, ...]] = _take(records_file)
    computed = run_pipeline(_CHILD, [new_tuple(RawRecord, row) for row in rows])
    # Named tuples pickle through a Python-level __reduce__ each (and unpickle through their
    # __new__): plain tuples cross cheaper, and the worker makes them Outbound again.
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
    cannot load fails the worker's start, not its first batch). ``shadow_index``: a
    version of the topology's own text route set the child shadows (:mod:`sieve.flow.shadow`).
    """

    mode = "process"

    def __init__(self, topology: Topology, settings: Settings, indexes: dict[Space, RouteIndex],
                 tenant_indexes: dict[tuple[str, Space], RouteIndex] | None = None,
                 shadow_index: RouteIndex | None = None) -> None:
        for index in [*indexes.values(), *(tenant_indexes or {}).values(),
                      *([shadow_index] if shadow_index is not None else [])]:
            head_of(index)  # a head that does not fit its index fails the start here, not in the child
        self.topology = topology
        self.settings = settings
        self._indexes = dict(indexes)
        self.shadow_index = shadow_index
        # The tenants' route sets other than the topology's own, by (set name, space).
        self._tenant_indexes = {key: index for key, index in (tenant_indexes or {}).items()
                                if key not in {(i.route_set.name, s) for s, i in indexes.items()}}
        self.restarts = 0
        self.scratch = tempfile.mkdtemp(prefix="sieve-compute-", dir=_scratch_root())
        # removed by close(), at the worker's exit, or by the child if the worker is killed
        weakref.finalize(self, shutil.rmtree, self.scratch, ignore_errors=True)
        self._executor = self._start()

    def _start(self) -> ProcessPoolExecutor:
        executor = ProcessPoolExecutor(
            1, mp_context=multiprocessing.get_context("spawn"), initializer=_child_start,
            initargs=(self.topology, self.settings, self._indexes, os.getpid(), self.scratch,
                      self._tenant_indexes, self.shadow_index),
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

    @property
    @override
    def tenant_indexes(self) -> dict[tuple[str, Space], RouteIndex]:
        own = {(index.route_set.name, space): index for space, index in self._indexes.items()}
        return {**own, **self._tenant_indexes}

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
        head_of(index)  # a head that does not fit the index is refused here, before any child has it
        key = (index.route_set.name, index.space)
        previous, previous_tenant = dict(self._indexes), dict(self._tenant_indexes)
        # a restarted child starts with it (as the pipeline swaps: the sets of that name, else the own)
        if key in self._tenant_indexes:
            self._tenant_indexes[key] = index
        own = self._indexes.get(index.space)
        if key not in self._tenant_indexes or (own is not None and own.route_set.name == key[0]):
            self._indexes[index.space] = index
        try:
            await self._call(_child_swap, index)
        except ChildDied:
            pass  # the new child was started with the new index
        except Exception:  # the child refused it and kept the version it had
            self._indexes, self._tenant_indexes = previous, previous_tenant
            raise

    @override
    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        shutil.rmtree(self.scratch, ignore_errors=True)
