"""A worker's HTTP endpoints: ``/metrics``, ``/healthz`` (liveness) and ``/readyz`` (readiness).

One small WSGI server (stdlib ``wsgiref``, one thread per request) serves all three,
so Kubernetes probes and Prometheus share the metrics port.

* ``/healthz``: the process is alive and its event loop responsive: a Faust timer
  beats every ``heartbeat_s``; a beat older than ``stall_s`` means the loop is stuck
  (503). Before the first beat the worker counts as starting (alive) for
  ``startup_s``.
* ``/readyz``: every registered readiness check passes; for a router: its route
  index is loaded, its consumer has joined the group (a worker with no partition —
  more workers than partitions — is joined and ready), it is not draining, publishing
  has not been failing continuously for longer than ``publish_unready_s``, and it is
  not in a worker fault (:mod:`sieve.worker.faults`).

The same timer updates the consumer-lag gauge of each assigned input partition:
the high-water mark the broker sent with the last Fetch response minus the
committed offset (never ListOffsets(latest), which the dev broker, tansu, answers with
the base offset of the partition's last record batch + 1, not the high-water mark).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any, cast
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import REGISTRY, make_wsgi_app

from sieve.settings import HealthSettings
from sieve.worker import metrics

if TYPE_CHECKING:
    from sieve.worker.batch_worker import BatchWorker
    from sieve.worker.router import RouterWorker

log = logging.getLogger(__name__)

StartResponse = Callable[..., Any]
ReadinessCheck = Callable[[], tuple[bool, str]]


@dataclass
class Probes:
    """The state behind ``/healthz`` and ``/readyz`` of one process."""

    settings: HealthSettings = field(default_factory=HealthSettings)
    clock: Callable[[], float] = time.monotonic
    started_at: float = field(default=0.0)
    last_beat: float | None = None
    checks: dict[str, ReadinessCheck] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.started_at = self.clock()

    def beat(self) -> None:
        """The event loop is running (called from a timer on the loop)."""
        self.last_beat = self.clock()

    def add_check(self, name: str, check: ReadinessCheck) -> None:
        """Register a readiness condition: ``check() -> (ok, detail)``."""
        self.checks[name] = check

    def liveness(self) -> tuple[bool, dict[str, Any]]:
        """Alive: the loop beat within ``stall_s`` (or it is still starting, up to ``startup_s``)."""
        now = self.clock()
        if self.last_beat is None:
            starting_for = now - self.started_at
            alive = starting_for <= self.settings.startup_s
            return alive, {"status": "starting" if alive else "never started",
                           "starting_for_s": round(starting_for, 3)}
        age = now - self.last_beat
        alive = age <= self.settings.stall_s
        return alive, {"status": "alive" if alive else "event loop stalled",
                       "heartbeat_age_s": round(age, 3)}

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Ready: every registered check passes (a process with none is ready)."""
        details: dict[str, Any] = {}
        ready = True
        for name, check in self.checks.items():
            try:
                ok, detail = check()
            except Exception as exc:  # a broken check makes the worker unready, not the server crash
                ok, detail = False, f"{type(exc).__name__}: {exc}"
            details[name] = {"ok": ok, "detail": detail}
            ready = ready and ok
        return ready, {"status": "ready" if ready else "not ready", "checks": details}


#: The probes of this process: ``serve`` answers from them, ``attach_router`` feeds them.
PROBES = Probes()


def wsgi_app(probes: Probes, registry: Any = REGISTRY) -> Callable[[dict, StartResponse], Iterable[bytes]]:
    """The WSGI application: ``/metrics`` (and ``/``), ``/healthz``, ``/readyz``; 404 otherwise."""
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/").rstrip("/") or "/"
        if path in ("/metrics", "/"):
            return metrics_app(environ, start_response)
        if path in ("/healthz", "/readyz"):
            ok, body = probes.liveness() if path == "/healthz" else probes.readiness()
            payload = json.dumps(body).encode()
            start_response("200 OK" if ok else "503 Service Unavailable",
                           [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))])
            return [payload]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: try /metrics, /healthz or /readyz\n"]

    return app


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        """Probes every few seconds would flood the log."""


def serve(
    host: str, port: int, settings: HealthSettings | None = None, probes: Probes = PROBES
) -> WSGIServer | None:
    """Serve the endpoints from a daemon thread; port 0: off. Returns the server.

    The start-up allowance of ``/healthz`` counts from here (models are loaded by now).
    """
    if settings is not None:
        probes.settings = settings
    probes.started_at = probes.clock()
    if not port:
        return None
    family, _, _, _, sockaddr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]

    class Server(_ThreadingServer):
        address_family = family

    server = make_server(str(sockaddr[0]), port, wsgi_app(probes), Server, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="sieve-http", daemon=True).start()
    return server


class WorkerHealth:
    """Heartbeat, readiness and consumer lag of one batch worker (router or reviewer).

    Driven by a Faust timer: each tick beats ``/healthz`` and refreshes
    ``sieve_consumer_lag`` for the worker's own input partitions. ``/readyz`` needs
    the consumer group joined, the worker not draining, publishing not failing for
    longer than ``publish_unready_s``, no worker fault, and any ``checks`` given.
    """

    def __init__(
        self,
        worker: BatchWorker,
        input_topics: Iterable[str],
        probes: Probes = PROBES,
        checks: dict[str, Callable[[], tuple[bool, str]]] | None = None,
    ) -> None:
        self.worker = worker
        self.probes = probes
        probes.settings = worker.settings.health
        self.topology = worker.name
        self.joined = False
        self.assigned: frozenset[tuple[str, int]] = frozenset()
        self._input_topics = set(input_topics)
        for name, check in (checks or {}).items():
            probes.add_check(name, check)
        probes.add_check("consumer_group", self._consumer_joined)
        probes.add_check("not_draining", self._not_draining)
        probes.add_check("publishing", worker.publishing_readiness)
        probes.add_check("no_worker_fault", worker.faults.readiness)
        metrics.WORKER_FAULT.labels(self.topology).set(0)
        worker.app.on_partitions_assigned.connect(cast(Any, self._on_assigned))
        worker.app.timer(probes.settings.heartbeat_s, name="sieve.worker.health")(self.tick)

    def _consumer_joined(self) -> tuple[bool, str]:
        if not self.joined:
            return False, "waiting for the consumer group to assign partitions"
        return True, f"{len(self.assigned)} input partition(s) assigned"

    def _not_draining(self) -> tuple[bool, str]:
        return not self.worker.draining, "draining" if self.worker.draining else "taking batches"

    async def _on_assigned(self, sender: Any, *args: Any, signal: Any = None, **kwargs: Any) -> None:
        """Faust's on_partitions_assigned signal: the group (re)balanced; maybe no partition for us."""
        assigned: Iterable[Any] = args[0] if args else kwargs.get("assigned", ())
        self.joined = True
        self.assigned = frozenset(
            (tp.topic, tp.partition) for tp in assigned if tp.topic in self._input_topics
        )
        metrics.ASSIGNED_PARTITIONS.labels(self.topology).set(len(self.assigned))

    async def tick(self) -> None:
        """Beat (the loop runs) and refresh the lag gauges."""
        self.probes.beat()
        metrics.HEARTBEAT.labels(self.topology).set(time.time())
        try:
            self.update_lag()
        except Exception:  # metrics must never take the worker down
            log.exception("consumer-lag update failed")

    def update_lag(self) -> dict[tuple[str, int], int]:
        """Set ``sieve_consumer_lag`` per assigned partition; drop partitions no longer ours."""
        consumer = self.worker.app.consumer
        lags: dict[tuple[str, int], int] = {}
        committed_offsets = getattr(consumer, "_committed_offset", {})
        for tp in consumer.assignment():
            if tp.topic not in self._input_topics:
                continue
            highwater = consumer.highwater(tp)
            if highwater is None:  # nothing fetched from this partition yet
                continue
            # Faust keeps the offset it last committed (Kafka's "next offset to read");
            # before the group's first commit on a partition, count from its start.
            committed = committed_offsets.get(tp) or 0
            lags[(tp.topic, tp.partition)] = max(0, int(highwater) - int(committed))
        for topic, partition in list(_lag_series(self.topology)):
            if (topic, partition) not in lags:
                metrics.CONSUMER_LAG.remove(self.topology, topic, str(partition))
        for (topic, partition), lag in lags.items():
            metrics.CONSUMER_LAG.labels(self.topology, topic, str(partition)).set(lag)
        return lags


def _lag_series(topology: str) -> Iterable[tuple[str, int]]:
    """The (topic, partition) pairs the lag gauge has a series for, for one topology."""
    for sample_family in metrics.CONSUMER_LAG.collect():
        for sample in sample_family.samples:
            if sample.labels.get("topology") == topology:
                yield sample.labels["topic"], int(sample.labels["partition"])


def attach_router(router: RouterWorker, probes: Probes = PROBES) -> WorkerHealth:
    """Give a router worker its heartbeat, readiness checks (route index loaded) and lag gauges."""

    def index_loaded() -> tuple[bool, str]:
        index = router.compute.indexes.get("text")
        return index is not None, f"route set version {getattr(index, 'version', None)}"

    return WorkerHealth(router, router.topology.input.topics, probes, {"route_index": index_loaded})
