"""The chaos run's processes: the dev broker advertising the proxy, the harness's direct path to
it, and the fleets of ``sieve worker`` (router) and ``sieve review`` (reviewer) processes that
chaos.py kills, restarts, adds and removes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import aiokafka.client

from sieve.cli.demo import free_port
from sieve.kafka.broker import broker_command, port_open
from sieve.settings import get_settings


def start_broker(port: int, advertised_port: int, log: Path) -> subprocess.Popen[bytes]:
    """tansu listening on ``port`` and advertising ``127.0.0.1:<advertised_port>`` (the proxy)."""
    command = broker_command("127.0.0.1", port)
    command[command.index("--advertised-listener-url") + 1] = f"tcp://127.0.0.1:{advertised_port}"
    process = subprocess.Popen(command, stdout=open(log, "ab"), stderr=subprocess.STDOUT,  # noqa: SIM115
                               start_new_session=True)
    deadline = time.monotonic() + 15
    while not port_open("127.0.0.1", port):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"tansu did not start (log: {log})")
        time.sleep(0.05)
    return process


@contextlib.contextmanager
def bypass(proxy_port: int, broker_port: int) -> Iterator[None]:
    """This process's Kafka clients connect to the broker itself where metadata names the proxy.

    Only the harness's producer and watcher use it (a test hook of this process, not of the
    workers): they must see the broker while the workers' path is cut.
    """
    original = aiokafka.client.create_conn

    async def direct(host, port, **kwargs):  # noqa: ANN001, ANN202, ANN003
        return await original(host, broker_port if port == proxy_port else port, **kwargs)

    aiokafka.client.create_conn = direct
    try:
        yield
    finally:
        aiokafka.client.create_conn = original


class Fleet:
    """The ``sieve <command>`` processes, by slot; restarts what dies unless it was told to leave.

    ``command`` is ``worker`` (routers, called "worker N" in the log) or ``review``
    (reviewers, "reviewer N"); two fleets can share one action log.
    """

    def __init__(self, tmp: Path, topology: Path, env: dict[str, str], restart_delay_s: float,
                 command: str = "worker", log: list[tuple[float, str]] | None = None) -> None:
        self.tmp, self.topology, self.env, self.restart_delay_s = tmp, topology, env, restart_delay_s
        self.command = command
        self.kind = "reviewer" if command == "review" else "worker"
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.every: list[subprocess.Popen[bytes]] = []  # all ever started (a leaver may outlive its slot)
        self.ports: dict[int, int] = {}
        self.leaving: set[int] = set()
        self.restart_at: dict[int, float] = {}
        self.starts = 0
        self.counts: Counter = Counter()
        self.log: list[tuple[float, str]] = log if log is not None else []
        self.t0 = time.monotonic()

    def note(self, text: str) -> None:
        """One line of the action log (seconds since the start)."""
        self.log.append((time.monotonic() - self.t0, text))
        print(f"[{time.monotonic() - self.t0:7.1f} s] {text}", flush=True)

    def start(self, slot: int) -> None:
        """Start (or restart) the process of ``slot``."""
        self.starts += 1
        port = free_port()
        folder = self.tmp / f"{self.kind[0]}{slot}"
        folder.mkdir(exist_ok=True)
        self.ports[slot] = port
        self.procs[slot] = subprocess.Popen(
            [sys.executable, "-m", "sieve", self.command, str(self.topology)],
            env={**self.env, "SIEVE_METRICS_PORT": str(port),
                 "SIEVE_WORKER_NAME": f"chaos-{self.kind[0]}{slot}-{self.starts}"},
            stdout=open(folder / f"{self.kind}.log", "ab"), stderr=subprocess.STDOUT,  # noqa: SIM115
            cwd=folder,
        )
        self.every.append(self.procs[slot])

    def running(self) -> list[int]:
        """Slots whose process is alive."""
        return [s for s, p in self.procs.items() if p.poll() is None]

    def kill(self, rng: random.Random) -> None:
        """SIGKILL a random running process; it is restarted after the delay."""
        alive = [s for s in self.running() if s not in self.leaving]
        if not alive:
            self.note(f"kill: no {self.kind} running")
            return
        slot = rng.choice(alive)
        self.procs[slot].send_signal(signal.SIGKILL)
        self.procs[slot].wait(10)
        self.counts["SIGKILL"] += 1
        self.restart_at[slot] = time.monotonic() + self.restart_delay_s
        self.note(f"SIGKILL {self.kind} {slot} (pid {self.procs[slot].pid})")

    def join(self, slot: int) -> None:
        """A new worker joins the group."""
        self.leaving.discard(slot)
        self.start(slot)
        self.counts["join"] += 1
        self.note(f"worker {slot} joins")

    def leave(self, slot: int) -> None:
        """A worker leaves the group (SIGTERM: it finishes its batch and commits)."""
        if slot in self.procs and self.procs[slot].poll() is None:
            self.leaving.add(slot)
            self.restart_at.pop(slot, None)
            self.procs[slot].send_signal(signal.SIGTERM)
            self.counts["leave"] += 1
            self.note(f"worker {slot} leaves (SIGTERM)")

    def supervise(self) -> None:
        """Restart the killed workers whose delay passed and those that exited on their own."""
        now = time.monotonic()
        for slot, proc in list(self.procs.items()):
            if proc.poll() is None or slot in self.leaving:
                continue
            if slot not in self.restart_at:
                self.counts["exited on its own"] += 1
                self.note(f"{self.kind} {slot} exited on its own with {proc.returncode}; restarting")
                self.restart_at[slot] = now + self.restart_delay_s
            if now >= self.restart_at[slot]:
                del self.restart_at[slot]
                self.start(slot)
                self.counts["restart"] += 1

    def stop(self) -> None:
        """SIGTERM every worker; SIGKILL those still running after 60 s."""
        self.leaving |= set(self.procs)
        for proc in self.every:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.every:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def worker_env(args: argparse.Namespace, bootstrap: str, qdrant: Path) -> dict[str, str]:
    """Environment of the workers: the proxy as bootstrap, fast group timeouts, one thread."""
    return {
        **os.environ,
        "SIEVE_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
        "SIEVE_QDRANT__PATH": str(qdrant),
        "SIEVE_KAFKA__SESSION_TIMEOUT_S": "6",
        "SIEVE_KAFKA__HEARTBEAT_INTERVAL_S": "1",
        "SIEVE_KAFKA__REBALANCE_TIMEOUT_S": "15",
        "SIEVE_KAFKA__COMMIT_INTERVAL_S": "0.5",
        "SIEVE_ROUTE_REFRESH_S": "3600",
        "SIEVE_COMPUTE": args.compute,
        "SIEVE_DEVICE": "cpu",
        "SIEVE_TORCH_THREADS": "1",
        "SIEVE_LOG_LEVEL": "INFO",
        "SIEVE_ONNX_CACHE_DIR": str(Path(get_settings().onnx_cache_dir).resolve()),
    }


def reviewer_env(env: dict[str, str], llm_base_url: str) -> dict[str, str]:
    """Environment of the reviewers: the workers' (the proxy as bootstrap) and the scripted endpoint.

    Short LLM timeouts and backoffs, so the endpoint's scripted 503s and hung requests cost
    retries of a second or two, not minutes.
    """
    return {
        **env,
        "SIEVE_LLM__BASE_URL": llm_base_url,
        "SIEVE_LLM__MODEL": "scripted",
        "SIEVE_LLM__TIMEOUT_S": "2",
        "SIEVE_LLM__MAX_RETRIES": "3",
        "SIEVE_LLM__BACKOFF_BASE_S": "0.2",
        "SIEVE_LLM__BACKOFF_MAX_S": "2",
        "SIEVE_LLM__BREAKER_FAILURES": "5",
        "SIEVE_LLM__BREAKER_OPEN_S": "2",
        "SIEVE_SHUTDOWN_GRACE_S": "5",
    }
