"""A guarded HTTP GET for URLs that arrive in events (image URIs): SSRF and slow-server defences.

* The host name is resolved once, every address of the answer is checked (no
  private, loopback, link-local, multicast or unspecified address unless the
  settings allow it), and the connection goes to exactly a checked address. The
  URL's host name stays in the ``Host`` header and, for HTTPS, in SNI and the
  certificate check, so a DNS answer that changes between the check and the
  connection (DNS rebinding) cannot send the request anywhere else. Every
  redirect hop is resolved and checked the same way.
* ``allow_hosts`` entries that are addresses or networks (CIDR) are addresses a
  fetch may reach although they are private. Entries that are names may resolve
  to private addresses only when ``allow_hosts_private`` is set; otherwise their
  addresses are checked like any other host's.
* One total deadline, ``fetch_deadline_s``, covers resolution, every hop and
  the body, so a server that sends one byte a second, or headers forever, is cut
  off there (``timeout_s`` limits each read on its own).
* Proxy variables and ``.netrc`` are ignored: a proxy would resolve the name
  itself, after the check.
* Error messages never carry a URL's credentials or query (:func:`redact_url`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
import threading
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx

from sieve.settings import ImageFetchSettings

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_resolver_pool: ThreadPoolExecutor | None = None
_resolver_lock = threading.Lock()


class _RedactRequestLog(logging.Filter):
    """httpx logs every request's URL at INFO; an event's URL may carry a token in its query."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) > 1 and isinstance(args[1], httpx.URL):
            if args[1].query or args[1].userinfo:
                record.args = (args[0], redact_url(str(args[1])), *args[2:])
        return True


logging.getLogger("httpx").addFilter(_RedactRequestLog())


class FetchError(Exception):
    """A guarded fetch that did not return a body; ``reason`` is uri_refused, fetch_failed or too_large."""

    def __init__(self, reason: str, error: str) -> None:
        super().__init__(error)
        self.reason = reason
        self.error = error


def redact_url(url: str) -> str:
    """``url`` without its user name, password and query values, for messages and logs."""
    try:
        parts = urllib.parse.urlsplit(url)
        netloc = parts.netloc.rpartition("@")[2]
        query = "?[redacted]" if parts.query else ""
        return f"{parts.scheme}://{'[redacted]@' if '@' in parts.netloc else ''}{netloc}{parts.path}{query}"
    except ValueError:
        return "[an unparsable URL]"


def _scrub(text: str, url: str) -> str:
    """``text`` with the URL's userinfo and query removed wherever they appear."""
    parts = urllib.parse.urlsplit(url)
    secrets = [parts.netloc.rpartition("@")[0] if "@" in parts.netloc else "", parts.password or "",
               urllib.parse.unquote(parts.password or ""), parts.query]
    for secret in sorted(filter(None, secrets), key=len, reverse=True):
        text = text.replace(secret, "[redacted]")
    return text


@dataclass(frozen=True)
class AddressPolicy:
    """Which resolved addresses a fetch may connect to."""

    hosts: frozenset[str]
    networks: tuple[Network, ...]
    listed_private: bool

    @classmethod
    def from_settings(cls, settings: ImageFetchSettings) -> AddressPolicy:
        """Split ``allow_hosts`` into networks (addresses, CIDR) and host names."""
        hosts: set[str] = set()
        networks: list[Network] = []
        for entry in settings.allow_hosts:
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                hosts.add(entry.lower().rstrip("."))
        return cls(frozenset(hosts), tuple(networks), settings.allow_hosts_private)

    def refuses(self, host: str, address: str) -> bool:
        """Whether connecting to ``address`` (an answer for ``host``) is refused."""
        ip = ipaddress.ip_address(address.partition("%")[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip in network for network in self.networks):
            return False
        if self.listed_private and host.lower().rstrip(".") in self.hosts:
            return False
        return not ip.is_global or ip.is_multicast


def system_resolve(host: str, port: int) -> list[str]:
    """The addresses the system resolver answers for ``host``, in its order, each once."""
    addresses: list[str] = []
    for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        address = str(info[4][0])
        if address not in addresses:
            addresses.append(address)
    return addresses


def _target(url: str) -> tuple[httpx.URL, str, int]:
    """The parsed URL, its host (ASCII) and port; refuses what is not http(s) with a host."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError) as exc:
        raise FetchError("uri_refused", f"not a valid URL: {type(exc).__name__}") from None
    if parsed.scheme not in ("http", "https"):
        raise FetchError("uri_refused", f"scheme {parsed.scheme!r} is not allowed")
    host = parsed.raw_host.decode("ascii")
    if not host:
        raise FetchError("uri_refused", "the URI has no host")
    return parsed, host, parsed.port or (443 if parsed.scheme == "https" else 80)


def _literal(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return None


def _checked(host: str, addresses: list[str], policy: AddressPolicy) -> list[str]:
    if not addresses:
        raise FetchError("fetch_failed", f"{host!r} resolves to no address")
    for address in addresses:
        if policy.refuses(host, address):
            raise FetchError(
                "uri_refused", f"{host!r} resolves to {address}, a private, loopback or link-local address"
            )
    return addresses


def check_url(url: str, settings: ImageFetchSettings) -> list[str]:
    """Resolve and check a URL's host now; the addresses a fetch may connect to, or :class:`FetchError`."""
    _, host, port = _target(url)
    literal = _literal(host)
    try:
        addresses = [literal] if literal else system_resolve(host, port)
    except (OSError, UnicodeError) as exc:
        raise FetchError("fetch_failed", f"cannot resolve {host!r}: {exc}") from None
    return _checked(host, addresses, AddressPolicy.from_settings(settings))


def _pool() -> ThreadPoolExecutor:
    # Resolution runs on its own threads, not the event loop's default executor, which
    # asyncio.run would wait for at the end: a resolver that hangs past the deadline
    # must not hold the fetch.
    global _resolver_pool
    with _resolver_lock:
        if _resolver_pool is None:
            _resolver_pool = ThreadPoolExecutor(8, thread_name_prefix="sieve-resolve")
        return _resolver_pool


async def _resolve_checked(host: str, port: int, policy: AddressPolicy) -> list[str]:
    literal = _literal(host)
    if literal:
        return _checked(host, [literal], policy)
    try:
        addresses = await asyncio.get_running_loop().run_in_executor(_pool(), system_resolve, host, port)
    except (OSError, UnicodeError) as exc:
        raise FetchError("fetch_failed", f"cannot resolve {host!r}: {exc}") from None
    return _checked(host, addresses, policy)


async def _get_pinned(client: httpx.AsyncClient, url: httpx.URL, address: str, max_bytes: int,
                      shown: str) -> bytes | str:
    """GET ``url`` from exactly ``address``: the body, or a redirect's location."""
    headers = {"Host": url.netloc.decode("ascii")}
    extensions = {"sni_hostname": url.raw_host.decode("ascii")} if url.scheme == "https" else {}
    # The URL's credentials go as an Authorization header, out of the URL that httpx logs.
    auth = httpx.BasicAuth(url.username, url.password) if url.userinfo else None
    request = client.build_request("GET", url.copy_with(host=address, userinfo=b""), headers=headers,
                                   extensions=extensions)
    response = await client.send(request, stream=True, auth=auth)
    body = bytearray()
    try:
        if response.is_redirect:
            return response.headers.get("location", "")
        if response.status_code != 200:
            raise FetchError("fetch_failed", f"GET {shown} answered {response.status_code}")
        declared = response.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            raise FetchError("too_large", f"{shown} declares {declared} bytes, over {max_bytes}")
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > max_bytes:
                raise FetchError("too_large", f"{shown} sent over {max_bytes} bytes; stopped")
        return bytes(body)
    finally:
        # A failed fetch's traceback keeps this frame alive (often in a cycle, until the cyclic
        # collector runs): it must not keep up to max_bytes of download with it.
        body.clear()
        await response.aclose()


async def guarded_get(url: str, settings: ImageFetchSettings, max_bytes: int) -> bytes:
    """GET ``url`` within ``fetch_deadline_s`` and ``max_bytes``, checking and pinning every hop."""
    policy = AddressPolicy.from_settings(settings)
    verify: ssl.SSLContext | bool = True
    if settings.ca_file is not None:
        verify = ssl.create_default_context(cafile=str(settings.ca_file))
    current = url
    try:
        async with asyncio.timeout(settings.fetch_deadline_s), httpx.AsyncClient(
            timeout=settings.timeout_s, follow_redirects=False, trust_env=False, verify=verify,
            headers={"user-agent": settings.user_agent},
        ) as client:
            for _ in range(settings.max_redirects + 1):
                target, host, port = _target(current)
                addresses = await _resolve_checked(host, port, policy)
                shown = redact_url(current)
                for n, address in enumerate(addresses):
                    try:
                        result = await _get_pinned(client, target, address, max_bytes, shown)
                        break
                    except httpx.ConnectError:
                        if n == len(addresses) - 1:
                            raise
                if isinstance(result, bytes):
                    return result
                current = urllib.parse.urljoin(current, result)
    except TimeoutError:
        raise FetchError(
            "fetch_failed",
            f"GET {redact_url(current)} did not finish within images.fetch_deadline_s="
            f"{settings.fetch_deadline_s:g}s",
        ) from None
    except httpx.TimeoutException:
        raise FetchError("fetch_failed", f"GET {redact_url(current)} timed out") from None
    except httpx.HTTPError as exc:
        detail = _scrub(_scrub(str(exc), current), url)
        raise FetchError("fetch_failed", f"GET {redact_url(current)} failed: {type(exc).__name__}: "
                                         f"{detail}") from None
    raise FetchError("fetch_failed", f"more than {settings.max_redirects} redirects")


def fetch(url: str, settings: ImageFetchSettings, max_bytes: int) -> bytes:
    """:func:`guarded_get` from synchronous code (the pipeline's fetch threads)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(guarded_get(url, settings, max_bytes))
    # On an event loop's own thread: run the fetch's loop on a helper thread.
    with ThreadPoolExecutor(1) as helper:
        return helper.submit(asyncio.run, guarded_get(url, settings, max_bytes)).result()
