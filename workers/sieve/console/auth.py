"""The console's sign-in helpers: login rate limits, CSRF tokens, session contents, a proxy's user header.

Pure functions and one small class, no web framework: the web app passes in
``request.session`` (a dict that Starlette's SessionMiddleware signs into a cookie),
the request's headers and the clock.
"""

from __future__ import annotations

import hmac
import secrets
import threading
from collections import OrderedDict, deque
from collections.abc import Mapping, MutableMapping
from typing import Any

# How far a session's login time may lie ahead of the clock (a clock stepped back a little).
CLOCK_SKEW_S = 60.0


class LoginLimiter:
    """Counts failed logins per key (``user:alice``, ``addr:1.2.3.4``) in a sliding window.

    A key with ``max_failures`` failures inside the last ``window_s`` seconds is refused
    until the oldest of them leaves the window. Memory is bounded: a key keeps at most
    ``max_failures`` times, keys whose last failure left the window are forgotten on every
    call, and beyond ``max_keys`` keys the ones that failed longest ago are dropped.
    """

    def __init__(self, max_failures: int, window_s: float, max_keys: int = 100_000) -> None:
        if max_failures < 1:
            raise ValueError("max_failures must be at least 1")
        if window_s <= 0:
            raise ValueError("window_s must be positive")
        self.max_failures = max_failures
        self.window_s = window_s
        self.max_keys = max_keys
        # key -> its latest failure times, oldest first; the keys ordered by their latest failure
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def allowed(self, keys: list[str], now: float) -> bool:
        """False when any of ``keys`` has ``max_failures`` failures inside the window ending at ``now``."""
        with self._lock:
            self._prune(now)
            return all(self._count(key, now) < self.max_failures for key in keys)

    def failed(self, keys: list[str], now: float) -> None:
        """Record one failed login at ``now`` against each of ``keys``."""
        with self._lock:
            self._prune(now)
            for key in keys:
                times = self._failures.pop(key, None)
                if times is None:
                    times = deque(maxlen=self.max_failures)
                times.append(now)
                self._failures[key] = times  # now the most recent
            while len(self._failures) > self.max_keys:
                self._failures.popitem(last=False)

    def succeeded(self, keys: list[str]) -> None:
        """Forget the failures of ``keys`` (after a successful login)."""
        with self._lock:
            for key in keys:
                self._failures.pop(key, None)

    def __len__(self) -> int:
        """How many keys have failures on record."""
        return len(self._failures)

    def _count(self, key: str, now: float) -> int:
        times = self._failures.get(key)
        if times is None:
            return 0
        cutoff = now - self.window_s
        while times and times[0] <= cutoff:
            times.popleft()
        return len(times)

    def _prune(self, now: float) -> None:
        """Forget the keys whose latest failure is outside the window (they lead the order)."""
        cutoff = now - self.window_s
        while self._failures:
            key, times = next(iter(self._failures.items()))
            if times and times[-1] > cutoff:
                break
            del self._failures[key]


def new_csrf_token() -> str:
    """A fresh random token for a session's forms."""
    return secrets.token_urlsafe(32)


def csrf_ok(expected: str | None, submitted: str | None) -> bool:
    """True when the form's token equals the session's, in constant time; False when either is empty."""
    if not expected or not submitted or not isinstance(expected, str) or not isinstance(submitted, str):
        return False
    return hmac.compare_digest(expected.encode("utf-8"), submitted.encode("utf-8"))


def session_user(session: Mapping[str, Any], now: float, max_age_s: float) -> str | None:
    """The signed-in user's name, when the session has one whose login is less than ``max_age_s`` old."""
    user = session.get("user")
    login_at = session.get("login_at")
    if not isinstance(user, str) or not user:
        return None
    if isinstance(login_at, bool) or not isinstance(login_at, int | float):
        return None
    age = now - login_at
    if age >= max_age_s or age < -CLOCK_SKEW_S:
        return None
    return user


def start_session(session: MutableMapping[str, Any], user: str, now: float) -> None:
    """Sign ``user`` in: empty the session, then set the user, the login time and a fresh CSRF token.

    Emptying first means nothing from before the login (an attacker's planted token) carries over.
    """
    session.clear()
    session["user"] = user
    session["login_at"] = now
    session["csrf"] = new_csrf_token()


def header_user(headers: Mapping[str, str], header_name: str | None) -> str | None:
    """The user an authenticating proxy names in ``header_name``; None when that is off or the header empty.

    Header names match regardless of case. Only safe behind a proxy that sets the header
    itself and drops any copy the client sent.
    """
    if not header_name:
        return None
    value = headers.get(header_name)
    if value is None:
        wanted = header_name.lower()
        value = next((v for k, v in headers.items() if k.lower() == wanted), None)
    if value is None:
        return None
    value = value.strip()
    return value or None
