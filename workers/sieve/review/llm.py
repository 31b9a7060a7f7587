"""An async client for any OpenAI-compatible Chat Completions endpoint, and its guard rails.

* :class:`ChatClient` posts to ``{base_url}/chat/completions`` with httpx; a
  timeout, a transport error, 429, 5xx (and 401/403/404/408, which say the
  endpoint is unusable rather than the request) are retried with exponential
  backoff and jitter, honouring ``Retry-After``; after the retries it raises
  :class:`EndpointUnavailable`. Any other 4xx is :class:`RequestRejected` (this
  request, not the endpoint, is the problem). A 200 whose body is not a chat
  completion is :class:`MalformedCompletion`. Each attempt ends within
  ``timeout_s`` and the whole request (attempts and waits) within
  ``request_deadline_s``, however slowly the endpoint trickles its answer. The
  bearer token goes over plain http only to loopback (or when
  ``allow_plaintext_api_key``), and response texts are redacted
  (:mod:`sieve.review.redact`) before they reach a message or a log.
* :class:`CircuitBreaker`, :class:`RateLimiter` and :class:`TokenBudget` are
  small clock-injected state machines, tested without a network.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, Literal

import httpx

from sieve.review.redact import Redactor
from sieve.settings import LLMSettings

log = logging.getLogger(__name__)

# Statuses that say "try again later" (or "this endpoint is not usable now"), not "this request is bad".
RETRYABLE_STATUSES = frozenset({401, 403, 404, 408, 409, 425, 429, 500, 502, 503, 504})


class LLMError(Exception):
    """Something went wrong asking the LLM."""

    def __init__(self, message: str, *, attempts: int = 0) -> None:
        super().__init__(message)
        self.attempts = attempts


class EndpointUnavailable(LLMError):
    """The endpoint kept failing (timeouts, 429, 5xx, transport) through every retry."""


class RequestRejected(LLMError):
    """The endpoint refused this particular request (a 4xx such as 400 or 413)."""


class MalformedCompletion(LLMError):
    """A 200 whose body is not a chat completion with a message."""


@dataclass(frozen=True, slots=True)
class Completion:
    """The useful part of a chat completion."""

    content: str
    tokens_in: int | None
    tokens_out: int | None
    finish_reason: str | None
    attempts: int


AttemptResult = Literal["ok", "timeout", "transport_error", "http_429", "http_5xx", "http_4xx", "malformed"]


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date); None if absent/bad."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def backoff_delay(attempt: int, base_s: float, max_s: float, retry_after: float | None,
                  rng: Callable[[], float] = random.random) -> float:
    """The wait before retry number ``attempt`` (1-based).

    ``Retry-After`` wins when given (capped at ``max_s``); otherwise exponential
    backoff with full jitter in its upper half: ``base * 2**(attempt-1) * [0.5, 1)``.
    """
    if retry_after is not None:
        return min(retry_after, max_s)
    ceiling = min(max_s, base_s * 2 ** (attempt - 1))
    return ceiling * (0.5 + 0.5 * rng())


class ChatClient:
    """POST chat completions to one OpenAI-compatible endpoint, with retries."""

    def __init__(
        self,
        settings: LLMSettings,
        *,
        on_attempt: Callable[[AttemptResult], None] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        settings.check_key_transport()  # a ValueError here stops the reviewer at start
        self.settings = settings
        self._on_attempt = on_attempt or (lambda result: None)
        self._sleep = sleep
        headers = {"Content-Type": "application/json"}
        key = settings.api_key.get_secret_value() if settings.api_key is not None else ""
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self._redact = Redactor([key])
        self._http = httpx.AsyncClient(
            base_url=settings.base_url.rstrip("/") + "/",
            headers=headers,
            timeout=httpx.Timeout(settings.timeout_s, connect=settings.connect_timeout_s),
            follow_redirects=False,
        )

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    def request_body(
        self,
        messages: list[dict[str, Any]],
        *,
        max_tokens: int,
        json_schema: dict[str, Any] | None = None,
        schema_name: str = "review",
    ) -> dict[str, Any]:
        """The JSON body of one chat-completion request."""
        s = self.settings
        body: dict[str, Any] = {"model": s.model, "messages": messages, s.max_tokens_field: max_tokens}
        if s.temperature is not None:
            body["temperature"] = s.temperature
        if s.response_format == "json_schema" and json_schema is not None:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": schema_name, "strict": True, "schema": json_schema},
            }
        elif s.response_format in ("json_schema", "json_object"):
            body["response_format"] = {"type": "json_object"}
        return body

    async def complete(self, body: dict[str, Any]) -> Completion:
        """Send one request; retry what is worth retrying; return the first message's content.

        Raises :class:`EndpointUnavailable` when ``request_deadline_s`` passes first.
        """
        progress = {"attempts": 0, "in_flight": 0}
        try:
            async with asyncio.timeout(self.settings.request_deadline_s):
                return await self._complete(body, progress)
        except TimeoutError:
            if progress["in_flight"]:
                self._on_attempt("timeout")
            raise EndpointUnavailable(
                f"no answer within llm.request_deadline_s={self.settings.request_deadline_s:g}s "
                f"({progress['attempts']} attempt(s))", attempts=progress["attempts"],
            ) from None

    async def _complete(self, body: dict[str, Any], progress: dict[str, int]) -> Completion:
        s = self.settings
        attempts = 0
        last_error = "no attempt made"
        while True:
            attempts += 1
            progress["attempts"] = attempts
            retry_after: float | None = None
            progress["in_flight"] = 1
            try:
                # timeout_s as a limit on the whole attempt: httpx's own limits are per read.
                async with asyncio.timeout(s.timeout_s):
                    response = await self._http.post("chat/completions", json=body)
            except (httpx.TimeoutException, TimeoutError) as exc:
                progress["in_flight"] = 0
                self._on_attempt("timeout")
                last_error = f"timeout after {s.timeout_s:g}s ({type(exc).__name__})"
            except httpx.TransportError as exc:
                progress["in_flight"] = 0
                self._on_attempt("transport_error")
                last_error = self._redact(f"{type(exc).__name__}: {exc}")
            else:
                progress["in_flight"] = 0
                status = response.status_code
                if status == 200:
                    return self._completion(response, attempts)
                detail = f"HTTP {status}: {self._redact(response.text)[:300]}"
                if status not in RETRYABLE_STATUSES and status < 500:
                    self._on_attempt("http_4xx")
                    raise RequestRejected(detail, attempts=attempts)
                self._on_attempt("http_429" if status == 429 else "http_5xx" if status >= 500 else "http_4xx")
                last_error = detail
                retry_after = parse_retry_after(response.headers.get("retry-after"))
            if attempts > s.max_retries:
                raise EndpointUnavailable(
                    f"{attempts} attempt(s) failed; last: {last_error}", attempts=attempts
                )
            delay = backoff_delay(attempts, s.backoff_base_s, s.backoff_max_s, retry_after)
            log.info("LLM attempt %d failed (%s); retrying in %.2fs", attempts, last_error, delay)
            await self._sleep(delay)

    def _completion(self, response: httpx.Response, attempts: int) -> Completion:
        try:
            payload = response.json()
            choice = payload["choices"][0]
            content = choice["message"]["content"]
            if not isinstance(content, str):
                raise TypeError(f"message content is {type(content).__name__}, not a string")
            usage = payload.get("usage") or {}
            tokens_in, tokens_out = usage.get("prompt_tokens"), usage.get("completion_tokens")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            self._on_attempt("malformed")
            problem = self._redact(f"{type(exc).__name__}: {exc}")
            raise MalformedCompletion(
                f"not a chat completion ({problem}): {self._redact(response.text)[:200]!r}",
                attempts=attempts,
            ) from None
        self._on_attempt("ok")
        return Completion(
            content=content,
            tokens_in=tokens_in if isinstance(tokens_in, int) else None,
            tokens_out=tokens_out if isinstance(tokens_out, int) else None,
            finish_reason=choice.get("finish_reason"),
            attempts=attempts,
        )


BreakerState = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    """Closed → open after ``failures`` failures in a row → half-open after ``open_s`` → one probe.

    While open, :meth:`wait` blocks its callers: the reviewer stops taking new
    work and the events wait in their topic. In half-open exactly one caller
    (the probe) goes through; its success closes the breaker, its failure
    opens it again for another ``open_s``.
    """

    def __init__(self, failures: int, open_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.failures = failures
        self.open_s = open_s
        self._clock = clock
        self._state: BreakerState = "closed"
        self._consecutive = 0
        self._opened_at = 0.0
        self._probing = False
        self.opened_count = 0

    @property
    def state(self) -> BreakerState:
        """The state now (an open breaker whose time is up reads half-open)."""
        if self._state == "open" and self._clock() - self._opened_at >= self.open_s:
            self._state = "half_open"
            self._probing = False
        return self._state

    def allow(self) -> bool:
        """Whether a request may go out now (in half-open, only the first asker gets True)."""
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self._probing:
            self._probing = True
            return True
        return False

    def record_success(self) -> None:
        """The endpoint answered: close."""
        self._state = "closed"
        self._consecutive = 0
        self._probing = False

    def record_failure(self) -> None:
        """The endpoint failed a whole request (after its retries)."""
        self._consecutive += 1
        if self._state == "half_open" or self._consecutive >= self.failures:
            if self._state != "open":
                self.opened_count += 1
                log.warning("circuit breaker open for %.1fs after %d failure(s)", self.open_s,
                            self._consecutive)
            self._state = "open"
            self._opened_at = self._clock()
            self._probing = False

    def release_probe(self) -> None:
        """A probe that ended with neither success nor failure (e.g. cancelled) frees its slot."""
        self._probing = False

    def seconds_until_probe(self) -> float:
        """How long until an open breaker lets a probe through (0 when not open)."""
        if self.state != "open":
            return 0.0
        return max(0.0, self.open_s - (self._clock() - self._opened_at))

    async def wait(self, poll_s: float = 0.05) -> None:
        """Return once a request may go out (immediately when closed)."""
        while not self.allow():
            await asyncio.sleep(max(poll_s, min(self.seconds_until_probe(), 1.0)))


class RateLimiter:
    """At most ``rate_per_s`` acquisitions per second, evenly spaced (no bursts)."""

    def __init__(
        self,
        rate_per_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.interval = 1.0 / rate_per_s
        self._clock = clock
        self._sleep = sleep
        self._next = 0.0

    def reserve(self) -> float:
        """Book the next slot; returns how long to wait for it."""
        now = self._clock()
        slot = max(now, self._next)
        self._next = slot + self.interval
        return slot - now

    async def acquire(self) -> None:
        """Wait for the next free slot."""
        delay = self.reserve()
        if delay > 0:
            await self._sleep(delay)


class TokenBudget:
    """A daily (UTC) token allowance for one process, with reservations for requests in flight.

    A review reserves its estimate before the request; when it ends the
    reservation is settled with the tokens the endpoint reported (or the
    estimate, when it reported none) or released when nothing was spent.
    """

    def __init__(self, daily_limit: int | None, *, today: Callable[[], date] | None = None) -> None:
        self.daily_limit = daily_limit
        self._today = today or (lambda: datetime.now(UTC).date())
        self._day = self._today()
        self.used = 0
        self.reserved = 0

    def _roll(self) -> None:
        day = self._today()
        if day != self._day:
            self._day = day
            self.used = 0

    def reserve(self, tokens: int) -> bool:
        """Hold ``tokens`` for a request; False when that would exceed today's limit."""
        self._roll()
        if self.daily_limit is not None and self.used + self.reserved + tokens > self.daily_limit:
            return False
        self.reserved += tokens
        return True

    def settle(self, reserved: int, spent: int) -> None:
        """A request ended: drop its reservation, count what it spent."""
        self._roll()
        self.reserved = max(0, self.reserved - reserved)
        self.used += spent

    def release(self, reserved: int) -> None:
        """A request spent nothing (e.g. the endpoint was down)."""
        self.reserved = max(0, self.reserved - reserved)

    @property
    def used_today(self) -> int:
        """Tokens counted today."""
        self._roll()
        return self.used
