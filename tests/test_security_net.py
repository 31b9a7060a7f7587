"""Network defences of the image fetcher and the LLM client, against real loopback servers.

* DNS rebinding: the fetcher must connect to exactly the address it checked.
  The system resolver is replaced by :class:`RebindingResolver`, a FAULT-INJECTION
  DOUBLE of DNS (a name whose answer changes between two look-ups, or mixes a
  public and a loopback address); a loopback server started here must receive
  nothing unless the settings allow it.
* Slow servers: servers here send one byte a second, or headers forever; an image
  fetch ends in ``image_fetch_failed`` within ``images.fetch_deadline_s`` and an
  LLM request in ``EndpointUnavailable`` within ``llm.request_deadline_s``. Upper
  bounds on time are generous and only deadlines. A slow image in a batch costs
  the batch no more than the deadline (the pipeline fixture of test_images).
"""

from __future__ import annotations

import base64
import http.server
import io
import ipaddress
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from sieve.flow.images import ImageRejected, check_url, fetch_http
from sieve.review.llm import ChatClient, EndpointUnavailable
from sieve.settings import ImageFetchSettings, LLMSettings

from .test_images import image_index, image_record, image_route_file, pipeline  # noqa: F401

PUBLIC = "1.1.1.1"  # a global address: passes the check; nothing listens there on the test's port
SLACK_S = 5.0  # generous: only a deadline


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "blue").save(buffer, "PNG")
    return buffer.getvalue()


class _Handler(http.server.BaseHTTPRequestHandler):
    """Records every request; serves a PNG, a trickled body, endless headers, a trickled LLM reply."""

    protocol_version = "HTTP/1.1"
    server: _Server

    def do_GET(self) -> None:  # noqa: N802
        self.server.requests.append((self.path, self.headers.get("Host")))
        self.server.authorizations.append(self.headers.get("Authorization"))
        if self.path == "/x.png":
            body = png()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/trickle.png":
            self.send_response(200)
            self.send_header("Content-Length", "30")
            self.end_headers()
            self._trickle(b"\x89" * 30)
        elif self.path == "/endless":
            self.send_response(200)
            self.end_headers()
            try:
                while True:
                    self.wfile.write(b"\0" * 65536)
            except (BrokenPipeError, ConnectionResetError):
                pass
        elif self.path == "/headers-forever":
            self.wfile.write(b"HTTP/1.1 200 OK\r\n")
            self._trickle(b"".join(f"X-Slow-{i}: 1\r\n".encode() for i in range(30)), size=20)
        else:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.server.requests.append((self.path, self.headers.get("Host")))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        body = b'{"choices": [{"message": {"content": "late"}}]}'
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self._trickle(body)

    def _trickle(self, data: bytes, size: int = 1) -> None:
        """``size`` bytes a second, for at most 30 s; stops when the client has left."""
        try:
            for i in range(0, len(data), size):
                self.wfile.write(data[i:i + size])
                self.wfile.flush()
                time.sleep(1.0)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args: Any) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[tuple[str, str | None]] = []
        self.authorizations: list[str | None] = []
        self.sni: list[str | None] = []

    @property
    def port(self) -> int:
        return int(self.server_address[1])


@pytest.fixture
def server() -> Iterator[_Server]:
    srv = _Server()
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


class RebindingResolver:
    """FAULT-INJECTION DOUBLE of DNS, installed as ``socket.getaddrinfo``.

    ``answers[name]`` is a list of answers, one per look-up (the last one repeats):
    ``[["1.1.1.1"], ["127.0.0.1"]]`` answers a public address first and loopback
    after, as a rebinding attacker's name server with a zero TTL would. Other names
    (and address literals) go to the real resolver.
    """

    def __init__(self, answers: dict[str, list[list[str]]]) -> None:
        self.answers = answers
        self.lookups: dict[str, int] = {}
        self.real = socket.getaddrinfo

    def __call__(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        name = host.decode() if isinstance(host, bytes) else str(host)
        if name not in self.answers:
            return self.real(host, port, *args, **kwargs)
        n = self.lookups.get(name, 0)
        self.lookups[name] = n + 1
        answer = self.answers[name][min(n, len(self.answers[name]) - 1)]
        out = []
        for address in answer:
            if ":" in address:
                out.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, int(port or 0), 0, 0)))
            else:
                out.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, int(port or 0))))
        return out


def install(monkeypatch: pytest.MonkeyPatch, answers: dict[str, list[list[str]]]) -> RebindingResolver:
    resolver = RebindingResolver(answers)
    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    return resolver


# -- DNS rebinding ---------------------------------------------------------------------------


def test_rebinding_name_connects_only_to_the_checked_address(monkeypatch, server: _Server) -> None:
    resolver = install(monkeypatch, {"rebind.test": [[PUBLIC], ["127.0.0.1"]]})
    settings = ImageFetchSettings(timeout_s=1, fetch_deadline_s=3)
    with pytest.raises(ImageRejected) as info:
        fetch_http(f"http://rebind.test:{server.port}/x.png", settings, 1_000_000)
    # The public address was checked, and only it was tried; the loopback answer was never used.
    assert info.value.reason == "image_fetch_failed"
    assert server.requests == []
    assert resolver.lookups["rebind.test"] == 1


def test_an_answer_with_a_loopback_address_is_refused(monkeypatch, server: _Server) -> None:
    install(monkeypatch, {"mixed.test": [[PUBLIC, "127.0.0.1"]], "mapped.test": [["::ffff:127.0.0.1"]]})
    for name in ("mixed.test", "mapped.test"):
        with pytest.raises(ImageRejected) as info:
            fetch_http(f"http://{name}:{server.port}/x.png", ImageFetchSettings(), 1_000_000)
        assert info.value.reason == "image_uri_refused" and "127.0.0.1" in info.value.error
    assert server.requests == []


def test_allow_listed_name_is_checked_unless_private_addresses_are_allowed(monkeypatch, server) -> None:
    install(monkeypatch, {"images.internal": [["127.0.0.1"]]})
    url = f"http://images.internal:{server.port}/x.png"
    with pytest.raises(ImageRejected) as info:
        fetch_http(url, ImageFetchSettings(allow_hosts=("images.internal",)), 1_000_000)
    assert info.value.reason == "image_uri_refused" and server.requests == []
    allowed = ImageFetchSettings(allow_hosts=("images.internal",), allow_hosts_private=True)
    assert fetch_http(url, allowed, 1_000_000) == png()
    # Connected to the checked address, with the URL's name in the Host header.
    assert server.requests == [("/x.png", f"images.internal:{server.port}")]
    # allow_hosts_private covers the listed names only.
    install(monkeypatch, {"other.internal": [["127.0.0.1"]]})
    with pytest.raises(ImageRejected, match="loopback"):
        fetch_http(f"http://other.internal:{server.port}/x.png", allowed, 1_000_000)


def test_allow_listed_name_is_checked_with_the_system_resolver() -> None:
    with pytest.raises(ImageRejected) as info:
        check_url("http://localhost/x.png", ImageFetchSettings(allow_hosts=("localhost",)))
    assert info.value.reason == "image_uri_refused"
    allowed = ImageFetchSettings(allow_hosts=("localhost",), allow_hosts_private=True)
    addresses = check_url("http://localhost/x.png", allowed)
    assert addresses and all(ipaddress.ip_address(a).is_loopback for a in addresses)


def test_url_credentials_are_sent_as_basic_auth(server: _Server) -> None:
    settings = ImageFetchSettings(allow_hosts=("127.0.0.1/8",))
    assert fetch_http(f"http://us%40er:p%3Ass@127.0.0.1:{server.port}/x.png", settings, 1_000_000) == png()
    assert server.authorizations == ["Basic " + base64.b64encode(b"us@er:p:ss").decode()]
    assert server.requests == [("/x.png", f"127.0.0.1:{server.port}")]


def _certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a certificate for images.test it signed (the openssl command line)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command line to make certificates")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=Sieve test CA", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    openssl("req", *ec, "-keyout", "leaf.key", "-out", "leaf.csr", "-subj", "/CN=images.test")
    (folder / "san.ext").write_text("subjectAltName=DNS:images.test\n")
    openssl("x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "leaf.pem", "-days", "2", "-extfile", "san.ext")
    return folder / "ca.pem", folder / "leaf.pem", folder / "leaf.key"


def test_https_to_the_checked_address_keeps_sni_and_the_certificate_check(monkeypatch, tmp_path) -> None:
    ca, cert, key = _certificates(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    srv = _Server()
    context.sni_callback = lambda sock, name, ctx: srv.sni.append(name)  # type: ignore[assignment]
    srv.socket = context.wrap_socket(srv.socket, server_side=True)
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        install(monkeypatch, {"images.test": [["127.0.0.1"]], "wrong.test": [["127.0.0.1"]]})
        settings = ImageFetchSettings(allow_hosts=("127.0.0.1",), ca_file=ca, fetch_deadline_s=5)
        assert fetch_http(f"https://images.test:{srv.port}/x.png", settings, 1_000_000) == png()
        assert srv.sni == ["images.test"] and srv.requests == [("/x.png", f"images.test:{srv.port}")]
        # Same address, another name: the certificate (for images.test) does not match it.
        with pytest.raises(ImageRejected, match="CERTIFICATE_VERIFY_FAILED") as info:
            fetch_http(f"https://wrong.test:{srv.port}/x.png", settings, 1_000_000)
        assert info.value.reason == "image_fetch_failed" and srv.sni[-1] == "wrong.test"
        assert len(srv.requests) == 1
    finally:
        srv.shutdown()
        srv.server_close()


# -- slow servers ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/trickle.png", "/headers-forever"])
def test_a_trickling_image_server_ends_within_the_fetch_deadline(server: _Server, path: str) -> None:
    # Each read comes within timeout_s; only the total deadline can end this.
    settings = ImageFetchSettings(allow_hosts=("127.0.0.1",), timeout_s=5, fetch_deadline_s=2)
    started = time.monotonic()
    with pytest.raises(ImageRejected) as info:
        fetch_http(f"http://127.0.0.1:{server.port}{path}", settings, 1_000_000)
    assert time.monotonic() - started < settings.fetch_deadline_s + SLACK_S
    assert info.value.reason == "image_fetch_failed"
    assert "fetch_deadline_s=2s" in info.value.error
    assert [p for p, _ in server.requests] == [path]


def frames_of(exc: BaseException | None) -> Iterator[Any]:
    """Every frame an exception's traceback, cause and context keep alive."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        tb = exc.__traceback__
        while tb is not None:
            yield tb.tb_frame
            tb = tb.tb_next
        exc = exc.__cause__ or exc.__context__


def test_a_refused_download_leaves_no_buffer_alive_in_its_traceback(server: _Server) -> None:
    # A failed fetch's frames outlive it (in reference cycles, until the cyclic collector runs):
    # they must not hold the download, or a stream of refused images grows the worker.
    settings = ImageFetchSettings(allow_hosts=("127.0.0.1",), timeout_s=5, fetch_deadline_s=10)
    with pytest.raises(ImageRejected) as info:
        fetch_http(f"http://127.0.0.1:{server.port}/endless", settings, 1_000_000)
    assert "over 1000000 bytes" in info.value.error
    held = [(frame.f_code.co_name, name, len(value)) for frame in frames_of(info.value)
            for name, value in frame.f_locals.items()
            if isinstance(value, bytes | bytearray) and len(value) > 65536]
    assert held == []


def test_a_slow_image_server_does_not_stall_the_batch_beyond_the_deadline(server: _Server,
                                                                           pipeline) -> None:  # noqa: F811
    pipeline.image_fetch = ImageFetchSettings(allow_hosts=("127.0.0.1",), timeout_s=5, fetch_deadline_s=2)
    base = f"http://127.0.0.1:{server.port}"
    started = time.monotonic()
    result = pipeline.process([image_record(0, uri=f"{base}/trickle.png"),
                               image_record(1, uri=f"{base}/x.png")])
    assert time.monotonic() - started < 2 + SLACK_S  # the deadline, generously
    assert [(letter.offset, letter.reason) for letter in result.dead_letters] == [(0, "image_fetch_failed")]
    assert "fetch_deadline_s=2s" in result.dead_letters[0].error
    assert [d.event_id for d in result.decisions] == ["img-1"]


async def test_a_trickling_llm_ends_within_the_request_deadline(server: _Server) -> None:
    settings = LLMSettings(base_url=f"http://127.0.0.1:{server.port}/v1", timeout_s=20, max_retries=3,
                           backoff_base_s=0.05, request_deadline_s=2)
    results: list[str] = []
    client = ChatClient(settings, on_attempt=results.append)
    started = time.monotonic()
    try:
        with pytest.raises(EndpointUnavailable, match="request_deadline_s=2s"):
            await client.complete({"messages": []})
    finally:
        await client.aclose()
    assert time.monotonic() - started < settings.request_deadline_s + SLACK_S
    assert results == ["timeout"] and len(server.requests) == 1


async def test_timeout_s_limits_a_whole_llm_attempt(server: _Server) -> None:
    settings = LLMSettings(base_url=f"http://127.0.0.1:{server.port}/v1", timeout_s=1.5, max_retries=1,
                           backoff_base_s=0.05, request_deadline_s=60)
    results: list[str] = []
    client = ChatClient(settings, on_attempt=results.append)
    started = time.monotonic()
    try:
        with pytest.raises(EndpointUnavailable, match="2 attempt.*timeout after 1.5s"):
            await client.complete({"messages": []})
    finally:
        await client.aclose()
    assert time.monotonic() - started < 2 * settings.timeout_s + SLACK_S
    assert results == ["timeout", "timeout"] and len(server.requests) == 2
