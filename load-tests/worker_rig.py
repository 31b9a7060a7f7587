"""One dev broker and one real ``sieve worker`` process, for bench_peer.py and bench_latency.py.

The same arrangement as bench_spine.py's ``worker_run`` (dev broker, a topology over
routes/moderation.yaml, a fresh embedded route store, one worker process, decisions read
back from the verdict topics), split into steps so a benchmark can produce a backlog, start
the worker, read decisions, pace more events at it and read its /metrics in between:

    with WorkerRig(tmp, "torch", encoder_spec("sentence-transformers", "torch", 64)) as rig:
        rig.produce(events)            # a backlog (or rate=... to pace it)
        rig.start_worker()
        records = rig.decisions(run, len(events))
        rate, _ = steady_rate(records)

Before the worker starts, ``sieve routes sync --topology`` embeds the route set with the
topology's own encoder (and backend), as a deployment's sync job would; the worker then
loads no model in its own process when its pipeline runs in a compute child.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import TracebackType

import yaml
from aiokafka import AIOKafkaConsumer

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_spine import peak_rss_mib  # noqa: E402
from loadgen import ProduceReport, produce_events  # noqa: E402
from measure import parse_output  # noqa: E402

from sieve.cli.demo import free_port  # noqa: E402
from sieve.kafka.broker import start_dev_broker, stop_process  # noqa: E402
from sieve.kafka.client import client_kwargs  # noqa: E402
from sieve.settings import KafkaSettings, get_settings  # noqa: E402
from sieve.topology import EncoderSpec  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ROUTES = REPO / "routes" / "moderation.yaml"
INPUT_TOPIC = "bench.in"
OUTCOME_TOPICS = {
    "clean": "bench.clean", "violating": "bench.violating", "needs_review": "bench.needs-review"
}
DEAD_LETTER_TOPIC = "bench.dead-letter"


def backend_available(backend: str) -> bool:
    """Whether this checkout's topology EncoderSpec takes ``backend`` (``torch`` always works)."""
    return backend == "torch" or "backend" in EncoderSpec.model_fields


def encoder_spec(kind: str, backend: str | None, batch_size: int) -> dict:
    """The topology's ``encoder`` mapping; ``backend`` is written only where EncoderSpec has it."""
    spec: dict = {"kind": kind, "batch_size": batch_size}
    if kind == "sentence-transformers" and backend is not None:
        if "backend" in EncoderSpec.model_fields:
            spec["backend"] = backend
        elif backend != "torch":
            raise ValueError(f"EncoderSpec in this checkout has no 'backend' field: cannot run {backend!r}")
    return spec


def metric_samples(port: int) -> list[tuple[str, dict[str, str], float]]:
    """Every sample on the worker's /metrics: ``(name, labels, value)``."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, value = line.rsplit(" ", 1)
        name, _, rest = head.partition("{")
        labels = {}
        for pair in rest.rstrip("}").split('",'):
            if "=" in pair:
                key, raw = pair.split("=", 1)
                labels[key.strip(",")] = raw.strip('"')
        samples.append((name, labels, float(value)))
    return samples


def metric_total(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == w for k, w in labels.items()))


class WorkerRig:
    """A dev broker, a topology file and (after :meth:`start_worker`) one worker process."""

    def __init__(
        self,
        tmp: Path,
        label: str,
        encoder: dict,
        *,
        threads: int = 2,
        max_events: int = 256,
        max_wait_s: float = 0.2,
        partitions: int = 4,
    ) -> None:
        self.tmp, self.label, self.threads = tmp, label, threads
        self.topology = {
            "name": "bench",
            "input": {"topics": [INPUT_TOPIC], "partitions": partitions},
            "route_set": {"name": "moderation", "file": str(ROUTES)},
            "encoder": encoder,
            "batching": {"max_events": max_events, "max_wait_s": max_wait_s},
            "output": {"outcome_topics": OUTCOME_TOPICS, "dead_letter_topic": DEAD_LETTER_TOPIC},
        }
        self.port = free_port()
        self.metrics_port = free_port()
        self.kafka = KafkaSettings(bootstrap_servers=f"127.0.0.1:{self.port}")
        self.broker: subprocess.Popen[bytes] | None = None
        self.worker: subprocess.Popen[bytes] | None = None
        self.worker_log = tmp / f"worker-{label}.log"

    def __enter__(self) -> WorkerRig:
        self.topology_path = self.tmp / f"topology-{self.label}.yaml"
        self.topology_path.write_text(yaml.safe_dump(self.topology))
        self.broker = start_dev_broker(port=self.port, log_path=self.tmp / f"broker-{self.label}.log")
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for process, grace in ((self.worker, 60), (self.broker, 10)):
            if process is not None:
                stop_process(process, grace)

    def produce(self, events: list[dict], rate: float = 0.0) -> ProduceReport:
        """Send events to the input topic (loadgen.produce_events: flat out, or ``rate`` events/s)."""
        return asyncio.run(produce_events(self.kafka, INPUT_TOPIC, events, rate))

    def start_worker(self) -> None:
        """Sync the routes with the topology's encoder; start ``sieve worker`` (it creates its topics)."""
        env = {
            **os.environ,
            "SIEVE_KAFKA__BOOTSTRAP_SERVERS": self.kafka.bootstrap_servers,
            "SIEVE_QDRANT__PATH": str(self.tmp / f"qdrant-{self.label}"),
            "SIEVE_METRICS_PORT": str(self.metrics_port),
            "SIEVE_TORCH_THREADS": str(self.threads),
            "SIEVE_DEVICE": "cpu",
            "SIEVE_LOG_LEVEL": "WARNING",
            "SIEVE_ROUTE_REFRESH_S": "3600",
            "SIEVE_KAFKA__SESSION_TIMEOUT_S": "4",
            "SIEVE_KAFKA__HEARTBEAT_INTERVAL_S": "1",
            # the worker runs in a temporary folder: point it at the checkout's ONNX export
            "SIEVE_ONNX_CACHE_DIR": str(Path(get_settings().onnx_cache_dir).resolve()),
        }
        sync = subprocess.run(
            [sys.executable, "-m", "sieve", "routes", "sync", str(ROUTES),
             "--topology", str(self.topology_path)],
            env=env, capture_output=True, cwd=self.tmp, check=False,
        )
        if sync.returncode != 0:
            raise RuntimeError(f"routes sync failed ({sync.returncode}):\n{sync.stdout.decode()[-2000:]}"
                               f"{sync.stderr.decode()[-2000:]}")
        self.worker = subprocess.Popen(
            [sys.executable, "-m", "sieve", "worker", str(self.topology_path)],
            env=env, stdout=open(self.worker_log, "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
            cwd=self.tmp,  # Faust writes its <app>-data directory here
        )

    def _check_worker(self) -> None:
        if self.worker is not None and self.worker.poll() is not None:
            tail = self.worker_log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the worker exited with {self.worker.returncode}; its log ends:\n{tail}")

    def decisions(self, run: str, want: int, timeout_s: float = 1800.0) -> tuple[list, int]:
        """The first decision record of each event of ``run`` (ids ``<run>-<i>``) and the dead-letter count.

        Reads the verdict and dead-letter topics from the beginning (no group) until ``want``
        events have an output; raises if the worker dies or ``timeout_s`` passes first.
        """
        return asyncio.run(self._decisions(run, want, timeout_s))

    async def _decisions(self, run: str, want: int, timeout_s: float) -> tuple[list, int]:
        topics = [*OUTCOME_TOPICS.values(), DEAD_LETTER_TOPIC]
        consumer = AIOKafkaConsumer(*topics, **client_kwargs(self.kafka), auto_offset_reset="earliest",
                                    enable_auto_commit=False, group_id=None)
        await consumer.start()
        first: dict[str, object] = {}
        dead: set[str] = set()
        deadline = time.monotonic() + timeout_s
        try:
            while len(first) + len(dead) < want:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{len(first) + len(dead)} of {want} events of {run} decided "
                                       f"in {timeout_s:.0f} s (worker log: {self.worker_log})")
                self._check_worker()
                for batch in (await consumer.getmany(timeout_ms=500, max_records=5000)).values():
                    for record in batch:
                        parsed = parse_output(record.topic, record.value or b"", DEAD_LETTER_TOPIC)
                        if parsed is None or parsed[0].rsplit("-", 1)[0] != run:
                            continue
                        if parsed[2] == "dead_letter":
                            dead.add(parsed[0])
                        else:
                            first.setdefault(parsed[0], record)
        finally:
            await consumer.stop()
        return list(first.values()), len(dead)

    def input_timestamps(self, run: str, want: int, timeout_s: float = 120.0) -> dict[str, int]:
        """Kafka timestamp (ms) of each input record of ``run``, by event id."""
        return asyncio.run(self._input_timestamps(run, want, timeout_s))

    async def _input_timestamps(self, run: str, want: int, timeout_s: float) -> dict[str, int]:
        consumer = AIOKafkaConsumer(INPUT_TOPIC, **client_kwargs(self.kafka), auto_offset_reset="earliest",
                                    enable_auto_commit=False, group_id=None)
        await consumer.start()
        stamps: dict[str, int] = {}
        deadline = time.monotonic() + timeout_s
        try:
            while len(stamps) < want and time.monotonic() < deadline:
                for batch in (await consumer.getmany(timeout_ms=500, max_records=5000)).values():
                    for record in batch:
                        event_id = (record.key or b"").decode()
                        if event_id.rsplit("-", 1)[0] == run:
                            stamps.setdefault(event_id, record.timestamp)
        finally:
            await consumer.stop()
        return stamps

    def metrics(self) -> list[tuple[str, dict[str, str], float]]:
        """The worker's /metrics samples."""
        return metric_samples(self.metrics_port)

    def peak_rss_mib(self) -> float:
        """The worker's peak resident memory so far (VmHWM)."""
        return peak_rss_mib(self.worker.pid) if self.worker is not None else float("nan")


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def decided_at_batches(records: list) -> int:
    """How many worker batches the decisions came from (a batch's decisions share ``decided_at``)."""
    return len({json.loads(r.value)["decided_at"] for r in records})
