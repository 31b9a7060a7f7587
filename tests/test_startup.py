"""Start-up against a missing broker: retried with back-off for ``kafka.startup_timeout_s``, then one line.

A worker (or reviewer) started before its brokers keeps trying to connect; one that never
finds them stops with a one-line error naming the servers and the setting, not a traceback.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiokafka.errors import KafkaConnectionError

from sieve.kafka.broker import start_dev_broker
from sieve.kafka.startup import BrokerUnavailable, wait_for_broker
from sieve.settings import KafkaSettings

from .conftest import REPO, free_port, worker_env


class RefusingBroker:
    """Fault injection: a connect refused ``refusals`` times, then answered; records when it was called."""

    def __init__(self, refusals: int) -> None:
        self.refusals = refusals
        self.calls: list[float] = []

    async def __call__(self, settings: KafkaSettings) -> None:
        self.calls.append(asyncio.get_running_loop().time())
        if len(self.calls) <= self.refusals:
            raise KafkaConnectionError(f"injected: refused ({len(self.calls)})")


def test_connecting_is_retried_with_doubling_back_off_until_the_broker_answers() -> None:
    broker = RefusingBroker(refusals=3)
    attempts = asyncio.run(wait_for_broker(KafkaSettings(startup_timeout_s=30), connect=broker,
                                           backoff_s=0.2, backoff_max_s=0.5))
    assert attempts == 4 == len(broker.calls)
    gaps = [later - earlier for earlier, later in zip(broker.calls, broker.calls[1:], strict=False)]
    # 0.2, 0.4, then capped at 0.5 (lower bounds only; a clock tick of slack)
    assert [gap >= wait - 0.02 for gap, wait in zip(gaps, [0.2, 0.4, 0.5], strict=True)] == [True] * 3


def test_no_broker_in_the_start_up_time_is_one_line_naming_the_servers_and_the_setting() -> None:
    broker = RefusingBroker(refusals=10**6)
    kafka = KafkaSettings(bootstrap_servers="broker-a:9092,broker-b:9092", startup_timeout_s=1.0)
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable) as raised:
        asyncio.run(wait_for_broker(kafka, connect=broker, backoff_s=0.1))
    assert time.monotonic() - started >= 1.0
    assert len(broker.calls) >= 3  # 0, 0.1, 0.3, 0.7, 1.0 s
    message = str(raised.value)
    assert "\n" not in message
    assert "broker-a:9092,broker-b:9092" in message and "SIEVE_KAFKA__STARTUP_TIMEOUT_S" in message


@pytest.mark.integration
def test_a_broker_that_starts_late_is_picked_up() -> None:
    port = free_port()
    kafka = KafkaSettings(bootstrap_servers=f"127.0.0.1:{port}", startup_timeout_s=60)

    async def start_broker_late() -> subprocess.Popen[bytes]:
        await asyncio.sleep(2.0)
        return await asyncio.to_thread(start_dev_broker, port=port)

    async def main() -> tuple[int, subprocess.Popen[bytes]]:
        late = asyncio.create_task(start_broker_late())
        attempts = await wait_for_broker(kafka)
        return attempts, await late

    started = time.monotonic()
    attempts, process = asyncio.run(main())
    try:
        assert time.monotonic() - started >= 2.0
        assert attempts >= 3  # refused at 0, 0.5 and 1.5 s at least, then connected
    finally:
        process.terminate()
        process.wait(10)


@pytest.mark.parametrize("command", ["worker", "review"])
def test_starting_without_a_broker_exits_with_one_line_and_no_traceback(command: str, tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    env = worker_env(address, tmp_path / "qdrant", SIEVE_KAFKA__STARTUP_TIMEOUT_S="2")
    started = time.monotonic()
    topology = REPO / "topologies" / "moderation.yaml"
    done = subprocess.run([sys.executable, "-m", "sieve", command, str(topology)],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert time.monotonic() - started >= 2.0  # it kept trying for the start-up time
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr
    assert address in errors[0] and "SIEVE_KAFKA__STARTUP_TIMEOUT_S" in errors[0], done.stderr
    assert done.stderr.rstrip().endswith("SIEVE_KAFKA__STARTUP_TIMEOUT_S"), "the error is one line, the last"
