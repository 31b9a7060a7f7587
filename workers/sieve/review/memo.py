"""One review per content: the LLM is asked once per distinct text (or image) and route-set version.

Repeats of a text that is being reviewed wait for that review; repeats of one already
reviewed get its verdict without a call. Only verdicts are shared: a hand-off (a rejected
request, a malformed reply) leaves the next repeat to ask again. Bounded: at most
``max_entries`` verdicts, each kept ``ttl_s``. Across reviewer processes, repeats meet in
one process because the router keys the needs-review topic by the same content key
(:func:`sieve.flow.dedup.review_key`).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from sieve.contracts import Decision
from sieve.flow.dedup import review_key
from sieve.review.steps import ReviewReply


class ReviewMemo:
    """Verdicts by content key, and the reviews of content in flight."""

    def __init__(self, max_entries: int = 10_000, ttl_s: float = 3600.0, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._clock = clock
        self._done: OrderedDict[str, tuple[float, ReviewReply]] = OrderedDict()
        self._in_flight: dict[str, asyncio.Future[ReviewReply | None]] = {}
        self.saved = 0  # LLM calls not made

    @staticmethod
    def key(decision: Decision) -> str | None:
        """The content key of a decision's event (None: nothing to share it by)."""
        return review_key(decision.route_set_version, decision.event.text,
                          decision.image.sha256 if decision.image is not None else None)

    async def once(self, key: str | None,
                   review: Callable[[], Awaitable[tuple[Decision, ReviewReply | None]]],
                   reuse: Callable[[ReviewReply], Decision]) -> Decision:
        """``review()`` for the first of a content, ``reuse(verdict)`` for its repeats."""
        if key is None:
            return (await review())[0]
        done = self._done.get(key)
        if done is not None and self._clock() - done[0] <= self.ttl_s:
            self._done.move_to_end(key)
            self.saved += 1
            return reuse(done[1])
        pending = self._in_flight.get(key)
        if pending is not None:
            reply = await asyncio.shield(pending)
            if reply is not None:
                self.saved += 1
                return reuse(reply)
            return (await review())[0]  # the first one was handed off: ask for this one
        future: asyncio.Future[ReviewReply | None] = asyncio.get_running_loop().create_future()
        self._in_flight[key] = future
        reply = None
        try:
            final, reply = await review()
            return final
        finally:
            del self._in_flight[key]
            future.set_result(reply)
            if reply is not None:
                self._done[key] = (self._clock(), reply)
                self._done.move_to_end(key)
                while len(self._done) > self.max_entries:
                    self._done.popitem(last=False)
