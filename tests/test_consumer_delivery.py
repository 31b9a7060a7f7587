"""The worker's consumer delivers each fetched message inline, falling back to Faust's ``wait_first``.

``run_eagerly`` steps a coroutine by hand; ``_Consumer.wait_first`` uses it for the
fetch loop's ``wait_first(callback(message), suspend_flow.wait())``. What must hold:
the same results and exceptions as a task would give, and a delivery that blocks is
still abandoned (cancelled) when a rebalance suspends the flow.
"""

from __future__ import annotations

import asyncio
import warnings
from pathlib import Path

import pytest

from sieve.settings import Settings
from sieve.topology import load_topology
from sieve.worker.app import build_app
from sieve.worker.consumer import run_eagerly

REPO = Path(__file__).resolve().parents[1]


async def test_a_coroutine_that_does_not_suspend_finishes_inline() -> None:
    async def deliver() -> int:
        return 7

    assert run_eagerly(deliver()) == (True, 7, None)


async def test_a_suspended_coroutine_is_finished_by_rest_with_the_future_result_and_bare_yields() -> None:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[int] = loop.create_future()
    seen: list[object] = []

    async def deliver() -> int:
        value = await future
        await asyncio.sleep(0)  # a bare yield
        seen.append(value)
        try:
            await failing
        except KeyError as exc:
            seen.append(exc.args[0])
        return value * 2

    failing: asyncio.Future[int] = loop.create_future()
    done, result, rest = run_eagerly(deliver())
    assert (done, result) == (False, None) and rest is not None
    task = asyncio.ensure_future(rest)
    await asyncio.sleep(0)
    assert not task.done()
    future.set_result(21)
    failing.set_exception(KeyError("raised into the coroutine"))
    assert await task == 42
    assert seen == [21, "raised into the coroutine"]


async def test_cancelling_rest_cancels_the_awaited_future_and_the_coroutine() -> None:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[int] = loop.create_future()
    cleaned: list[str] = []

    async def deliver() -> int:
        try:
            return await future
        finally:
            cleaned.append("finally ran")

    _, _, rest = run_eagerly(deliver())
    assert rest is not None
    task = asyncio.ensure_future(rest)
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert future.cancelled() and cleaned == ["finally ran"]


@pytest.fixture
async def consumer():
    # built inside the test's event loop: Faust's wait_first schedules its tasks on the service's loop
    app = build_app(load_topology(REPO / "topologies" / "moderation.yaml"), Settings(metrics_port=0))
    yield app.consumer
    thread_loop = app.consumer._thread.thread_loop  # made for the consumer's thread, which never ran
    if not thread_loop.is_running() and not thread_loop.is_closed():
        thread_loop.close()


async def test_consumer_delivers_inline_and_leaves_no_coroutine_unawaited(consumer) -> None:
    async def deliver() -> str:
        return "delivered"

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # "coroutine ... was never awaited"
        delivery = deliver()
        results = await consumer.wait_first(delivery, consumer.suspend_flow.wait())
    assert results.done == [delivery] and results.results == ["delivered"] and not results.stopped


async def test_a_blocked_delivery_is_abandoned_when_the_flow_is_suspended(consumer) -> None:
    loop = asyncio.get_running_loop()
    room: asyncio.Future[None] = loop.create_future()  # a full stream buffer
    events: list[str] = []

    async def deliver() -> None:
        try:
            await room
            events.append("delivered")
        except asyncio.CancelledError:
            events.append("abandoned")
            raise

    waiting = asyncio.ensure_future(consumer.wait_first(deliver(), consumer.suspend_flow.wait()))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    consumer.suspend_flow.set()  # a rebalance begins
    await asyncio.wait_for(waiting, 5)
    assert events == ["abandoned"]


async def test_a_blocked_delivery_completes_when_there_is_room(consumer) -> None:
    loop = asyncio.get_running_loop()
    room: asyncio.Future[None] = loop.create_future()

    async def deliver() -> str:
        await room
        return "delivered"

    waiting = asyncio.ensure_future(consumer.wait_first(deliver(), consumer.suspend_flow.wait()))
    await asyncio.sleep(0.01)
    room.set_result(None)
    results = await asyncio.wait_for(waiting, 5)
    assert results.results == ["delivered"] and not results.stopped


async def test_while_suspended_faust_s_own_path_is_taken(consumer) -> None:
    consumer.suspend_flow.set()
    ran: list[str] = []

    async def deliver() -> None:
        await asyncio.sleep(0.05)
        ran.append("delivered")

    results = await asyncio.wait_for(consumer.wait_first(deliver(), consumer.suspend_flow.wait()), 5)
    assert ran == [] and results.results == [True]  # the suspension won; the delivery was cancelled


async def test_a_delivery_that_raises_propagates(consumer) -> None:
    async def deliver() -> None:
        raise ValueError("conductor failed")

    with pytest.raises(ValueError, match="conductor failed"):
        await consumer.wait_first(deliver(), consumer.suspend_flow.wait())
