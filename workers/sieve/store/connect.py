"""Opening the route store's Qdrant client: a local path's lock, a server that is not up yet.

Local mode (``path``) allows one process at a time: :func:`open_local` waits up to
``lock_wait_s`` for another holder. A server (``url``) may still be starting when a
worker starts: :func:`wait_for_server` retries with back-off for ``startup_timeout_s``
and then fails with one line. :func:`store_failures` turns the network errors of any
later request into a :class:`RouteStoreError` of one line.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from qdrant_client import QdrantClient
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from sieve.settings import QdrantSettings

_FIRST_DELAY_S = 0.05
_MAX_DELAY_S = 2.0


class RouteStoreError(RuntimeError):
    """The store is unreachable, locked for too long, or lacks (a complete version of) the asked-for set."""


def _is_rpc_error(exc: BaseException) -> bool:
    """A gRPC call failed (the client speaks gRPC when ``prefer_grpc``); grpc has no typed stubs here."""
    return any(cls.__module__.startswith("grpc") and cls.__name__ == "RpcError" for cls in type(exc).__mro__)


def _unreachable(exc: BaseException) -> bool:
    """The server could not be reached (worth retrying while it starts)."""
    if isinstance(exc, ResponseHandlingException):  # REST: connection refused, timed out, ...
        return True
    if _is_rpc_error(exc):
        code = getattr(exc, "code", None)
        name = getattr(code(), "name", "") if callable(code) else ""
        return name in ("UNAVAILABLE", "DEADLINE_EXCEEDED")
    return False


def describe(exc: BaseException) -> str:
    """One line about a failed request (a gRPC error's text spans several)."""
    if _is_rpc_error(exc):
        code, details = getattr(exc, "code", None), getattr(exc, "details", None)
        if callable(code) and callable(details):
            return f"{getattr(code(), 'name', code())}: {details()}"
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def open_local(settings: QdrantSettings) -> QdrantClient:
    """A client on the local path; waits while another process holds it."""
    settings.path.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + settings.lock_wait_s
    delay = _FIRST_DELAY_S
    while True:
        try:
            return QdrantClient(path=str(settings.path))
        except RuntimeError as exc:
            if "already accessed" not in str(exc) or time.monotonic() > deadline:
                raise RouteStoreError(
                    f"route store at {settings.path} is locked by another "
                    f"process for over {settings.lock_wait_s}s (local mode "
                    "allows one process at a time; use a Qdrant server to share it)"
                ) from exc
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


def open_server(settings: QdrantSettings) -> QdrantClient:
    """A client of the Qdrant server at ``settings.url`` (no request made yet)."""
    assert settings.url is not None
    api_key = settings.api_key.get_secret_value() if settings.api_key else None
    return QdrantClient(url=settings.url, api_key=api_key, prefer_grpc=settings.prefer_grpc,
                        grpc_port=settings.grpc_port)


def wait_for_server(client: QdrantClient, settings: QdrantSettings) -> None:
    """Retry until the server answers, with back-off for ``startup_timeout_s``, then fail in one line."""
    deadline = time.monotonic() + settings.startup_timeout_s
    delay = _FIRST_DELAY_S
    attempts = 0
    while True:
        attempts += 1
        try:
            client.get_collections()
            return
        except Exception as exc:
            if not _unreachable(exc):
                raise RouteStoreError(f"route store at {settings.url} refused: {describe(exc)}") from exc
            left = deadline - time.monotonic()
            if left <= 0:
                raise RouteStoreError(
                    f"route store at {settings.url} unreachable for {settings.startup_timeout_s:g}s "
                    f"({attempts} attempts; qdrant.startup_timeout_s): {describe(exc)}"
                ) from exc
        time.sleep(min(delay, left))
        delay = min(delay * 2, _MAX_DELAY_S)


@contextmanager
def store_failures(where: str) -> Iterator[None]:
    """Turn a failed request to the store into a one-line :class:`RouteStoreError`."""
    try:
        yield
    except (ResponseHandlingException, UnexpectedResponse) as exc:
        raise RouteStoreError(f"route store at {where}: {describe(exc)}") from exc
    except Exception as exc:
        if _is_rpc_error(exc):
            raise RouteStoreError(f"route store at {where}: {describe(exc)}") from exc
        raise
