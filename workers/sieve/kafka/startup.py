"""Start-up against the broker: connect with back-off for a while, then fail with one line.

A worker that starts before its brokers (a cluster rolling, a compose stack starting)
waits for them for ``kafka.startup_timeout_s`` (``SIEVE_KAFKA__STARTUP_TIMEOUT_S``)
instead of dying on the first refused connection; if none answers in that time it
stops with a one-line error that names the servers and the setting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from sieve.kafka.client import client_kwargs
from sieve.settings import KafkaSettings

log = logging.getLogger(__name__)


class BrokerUnavailable(RuntimeError):
    """No Kafka broker answered within the start-up time; the message is one line for the operator."""


async def connect_once(settings: KafkaSettings) -> None:
    """Connect to the cluster once: bootstrap from the configured servers and fetch its metadata."""
    admin = AIOKafkaAdminClient(**client_kwargs(settings))
    try:
        await admin.start()
    finally:
        await admin.close()


class _ClientErrors(logging.Handler):
    """Holds aiokafka's connection errors (the detail its exceptions leave out) instead of logging them."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.last: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        self.last = " ".join(record.getMessage().split())


@contextlib.contextmanager
def _client_errors() -> Iterator[_ClientErrors]:
    """Catch aiokafka's log while connecting: each attempt is logged once, by :func:`wait_for_broker`."""
    logger = logging.getLogger("aiokafka")
    handler = _ClientErrors()
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


async def wait_for_broker(
    settings: KafkaSettings,
    *,
    connect: Callable[[KafkaSettings], Awaitable[None]] = connect_once,
    backoff_s: float = 0.5,
    backoff_max_s: float = 5.0,
) -> int:
    """Connect to the cluster, retrying with doubling back-off for ``settings.startup_timeout_s``.

    Returns the number of attempts it took. Raises :class:`BrokerUnavailable`, whose
    one-line message names the servers and the setting, when none answered in time.
    Each attempt may take the time left, and at least a second.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.startup_timeout_s
    delay = backoff_s
    attempt = 0
    with _client_errors() as client_errors:
        while True:
            attempt += 1
            client_errors.last = None
            limit = max(deadline - loop.time(), 1.0)
            try:
                await asyncio.wait_for(connect(settings), limit)
                return attempt
            except TimeoutError:
                error = client_errors.last or f"no answer in {limit:.1f} s"
            except (KafkaError, OSError) as exc:
                error = client_errors.last or " ".join(str(exc).split())
            left = deadline - loop.time()
            if left <= 0:
                raise BrokerUnavailable(
                    f"no Kafka broker answered at {settings.bootstrap_servers} in "
                    f"{settings.startup_timeout_s:g} s ({attempt} attempts, last: {error}); check "
                    f"SIEVE_KAFKA__BOOTSTRAP_SERVERS, or wait longer with SIEVE_KAFKA__STARTUP_TIMEOUT_S"
                )
            wait = min(delay, left)
            log.warning("Kafka at %s not reachable (%s); attempt %d, retrying in %.1f s",
                        settings.bootstrap_servers, error, attempt, wait)
            await asyncio.sleep(wait)
            delay = min(2 * delay, backoff_max_s)
