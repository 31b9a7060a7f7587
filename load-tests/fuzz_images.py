"""Bad images for the fuzz run (load-tests/fuzz.py): image bytes built at run time, and a
local HTTP server that serves the hostile ones.

The server listens on ``127.0.0.2`` (a loopback address the worker is told to allow with
``SIEVE_IMAGES__ALLOW_HOSTS``), so fetches of it go through the whole guarded download;
every other private, loopback or link-local URL the fuzz sends must still be refused.

Paths it serves (``ImageServer.url(path)``):

- ``/ok.png``: a small valid PNG;
- ``/bomb.png``: a PNG whose header declares 50,000 x 50,000 pixels;
- ``/zbomb.png``: a real zlib bomb, 20,000 x 20,000 one-bit pixels in ~50 KB;
- ``/image.svg``: an SVG (not an allowed format);
- ``/redirect-private``: a redirect to a loopback address that is not allowed;
- ``/redirect-loop``: redirects to itself, forever;
- ``/huge``: declares a body of 10 GB;
- ``/endless``: a body without a length that never ends (the size cap must stop it);
- ``/slow.png``: answers after ``slow_s`` seconds (past the worker's fetch timeout);
- anything else: 404.
"""

from __future__ import annotations

import http.server
import io
import random
import socket
import struct
import threading
import time
import zlib
from functools import cache

from PIL import Image, ImageDraw

HOST = "127.0.0.2"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def small_png(seed: int, size: int = 24) -> bytes:
    """A small valid PNG made with Pillow (coloured rectangles)."""
    rng = random.Random(seed)
    image = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    x, y = rng.randrange(size // 2), rng.randrange(size // 2)
    draw.rectangle((x, y, x + size // 3, y + size // 3), fill=tuple(rng.randrange(256) for _ in range(3)))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


@cache
def lying_png(width: int = 50_000, height: int = 50_000) -> bytes:
    """A 2 x 2 PNG made with Pillow whose IHDR is rewritten to declare ``width`` x ``height``."""
    out = io.BytesIO()
    Image.new("L", (2, 2), 128).save(out, format="PNG")
    data = out.getvalue()
    assert data[12:16] == b"IHDR"
    ihdr = struct.pack(">II", width, height) + data[24:29]
    return data[:8] + _chunk(b"IHDR", ihdr) + data[33:]


@cache
def zlib_bomb_png(width: int = 20_000, height: int = 20_000) -> bytes:
    """A real decompression bomb: ``width`` x ``height`` one-bit grey pixels, all zero, compressed
    row by row (never held whole in memory here); about 1,000 times smaller than its pixels."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


@cache
def gif_screen_bomb() -> bytes:
    """A GIF whose logical screen is 30,000 x 30,000 while its one frame is 1 x 1."""
    out = io.BytesIO()
    Image.new("P", (1, 1), 0).save(out, format="GIF")
    data = bytearray(out.getvalue())
    data[6:10] = struct.pack("<HH", 30_000, 30_000)
    return bytes(data)


SVG = (
    b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="100000" height="100000">'
    b'<script>alert(1)</script><rect width="100%" height="100%" fill="red"/></svg>'
)


def closed_port(host: str = HOST) -> int:
    """A port on ``host`` that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class _Handler(http.server.BaseHTTPRequestHandler):
    server: ImageServer

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        self.server.requests += 1

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body:
            self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0]
        try:
            if path == "/ok.png":
                self._send(200, small_png(len(self.path)), {"Content-Type": "image/png"})
            elif path == "/bomb.png":
                self._send(200, lying_png(), {"Content-Type": "image/png"})
            elif path == "/zbomb.png":
                self._send(200, zlib_bomb_png(), {"Content-Type": "image/png"})
            elif path == "/image.svg":
                self._send(200, SVG, {"Content-Type": "image/svg+xml"})
            elif path == "/redirect-private":
                self._send(302, headers={"Location": f"http://127.0.0.1:{self.server.server_port}/ok.png"})
            elif path == "/redirect-loop":
                self._send(302, headers={"Location": "/redirect-loop"})
            elif path == "/huge":
                self._send(200, b"\x89PNG", {"Content-Length": str(10**10)})
            elif path == "/endless":
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.end_headers()
                chunk = b"\x00" * 65536
                while True:  # until the client hangs up
                    self.wfile.write(chunk)
            elif path == "/slow.png":
                time.sleep(self.server.slow_s)
                self._send(200, small_png(1), {"Content-Type": "image/png"})
            else:
                self._send(404, b"not here")
        except (BrokenPipeError, ConnectionResetError):
            pass


class ImageServer(http.server.ThreadingHTTPServer):
    """The hostile image server, on a daemon thread (``with ImageServer() as server:``)."""

    daemon_threads = True

    def __init__(self, slow_s: float = 8.0) -> None:
        super().__init__((HOST, 0), _Handler)
        self.slow_s = slow_s
        self.requests = 0
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        """The URL of ``path`` on this server."""
        return f"http://{HOST}:{self.server_port}{path}"

    def __enter__(self) -> ImageServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()
