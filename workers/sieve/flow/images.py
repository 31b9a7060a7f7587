"""Image events: get the bytes (inline base64 or a guarded fetch), decode them safely.

Every failure is an :class:`ImageRejected` with a reason code, which the
pipeline turns into a dead letter; nothing here lets an image exhaust memory:
downloads stop at ``max_image_bytes``, the pixel count is read from the header
before any pixel is decoded, and only the first frame of an animation is used.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import socket
import urllib.parse
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import httpx
from PIL import Image, ImageOps, UnidentifiedImageError

from sieve.contracts import Event, ImageRef
from sieve.settings import ImageFetchSettings
from sieve.topology import LimitsSpec

# Pillow's own bomb guard would warn (or raise) at a fixed size; Sieve checks the
# topology's limit itself before decoding, so the global guard is switched off.
Image.MAX_IMAGE_PIXELS = None


class ImageRejected(Exception):
    """An image event Sieve cannot use; ``reason`` is a short code."""

    def __init__(self, reason: str, error: str) -> None:
        super().__init__(error)
        self.reason = reason
        self.error = error


@dataclass(frozen=True)
class LoadedImage:
    """A decoded RGB image and the reference decisions carry instead of its pixels."""

    image: Image.Image
    ref: ImageRef


def _blocked_address(address: str, allowed: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    ip = ipaddress.ip_address(address)
    if any(ip in network for network in allowed):
        return False
    return not ip.is_global or ip.is_multicast


def _allowed_networks(settings: ImageFetchSettings) -> tuple[set[str], list]:
    hosts: set[str] = set()
    networks = []
    for entry in settings.allow_hosts:
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            hosts.add(entry.lower())
    return hosts, networks


def check_url(url: str, settings: ImageFetchSettings) -> None:
    """Refuse URLs that are not http(s) or that resolve to non-public addresses (SSRF)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ImageRejected("image_uri_refused", f"scheme {parts.scheme!r} is not allowed")
    host = parts.hostname
    if not host:
        raise ImageRejected("image_uri_refused", "the URI has no host")
    allowed_hosts, allowed_networks = _allowed_networks(settings)
    if host.lower() in allowed_hosts:
        return
    try:
        infos = socket.getaddrinfo(host, parts.port or (443 if parts.scheme == "https" else 80))
    except socket.gaierror as exc:
        raise ImageRejected("image_fetch_failed", f"cannot resolve {host!r}: {exc}") from None
    for info in infos:
        address = str(info[4][0])
        if _blocked_address(address, allowed_networks):
            raise ImageRejected(
                "image_uri_refused",
                f"{host!r} resolves to {address}, a private, loopback or link-local address",
            )


def fetch_http(url: str, settings: ImageFetchSettings, max_bytes: int) -> bytes:
    """GET an image with a time limit and a size limit, re-checking every redirect hop."""
    current = url
    with httpx.Client(timeout=settings.timeout_s, follow_redirects=False,
                      headers={"user-agent": settings.user_agent}) as client:
        for _ in range(settings.max_redirects + 1):
            check_url(current, settings)
            try:
                with client.stream("GET", current) as response:
                    if response.is_redirect:
                        location = response.headers.get("location", "")
                        current = urllib.parse.urljoin(current, location)
                        continue
                    if response.status_code != 200:
                        raise ImageRejected(
                            "image_fetch_failed", f"GET {current} answered {response.status_code}"
                        )
                    declared = response.headers.get("content-length")
                    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                        raise ImageRejected(
                            "image_too_large", f"{current} declares {declared} bytes, over {max_bytes}"
                        )
                    body = bytearray()
                    for chunk in response.iter_bytes():
                        body += chunk
                        if len(body) > max_bytes:
                            raise ImageRejected(
                                "image_too_large", f"{current} sent over {max_bytes} bytes; stopped"
                            )
                    return bytes(body)
            except httpx.TimeoutException:
                raise ImageRejected("image_fetch_failed", f"GET {current} timed out") from None
            except httpx.HTTPError as exc:
                raise ImageRejected("image_fetch_failed", f"GET {current} failed: {exc}") from None
    raise ImageRejected("image_fetch_failed", f"more than {settings.max_redirects} redirects")


def read_file_uri(uri: str, settings: ImageFetchSettings, max_bytes: int) -> bytes:
    """A ``file://`` image, only when a root directory is configured and the file lies inside it."""
    if settings.file_root is None:
        raise ImageRejected("image_uri_refused", "file:// URIs are not allowed (no images.file_root)")
    path = Path(urllib.parse.unquote(urllib.parse.urlsplit(uri).path)).resolve()
    root = settings.file_root.resolve()
    if not path.is_relative_to(root):
        raise ImageRejected("image_uri_refused", f"{path} is outside the allowed directory {root}")
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise ImageRejected("image_too_large", f"{path} has {size} bytes, over {max_bytes}")
        return path.read_bytes()
    except OSError as exc:
        raise ImageRejected("image_fetch_failed", f"cannot read {path}: {exc.strerror}") from None


def image_bytes(event: Event, settings: ImageFetchSettings, limits: LimitsSpec) -> bytes:
    """The encoded image of an event, inline or fetched."""
    if event.image_b64 is not None:
        if len(event.image_b64) > limits.max_image_bytes * 4 // 3 + 4:
            raise ImageRejected("image_too_large", f"inline image over {limits.max_image_bytes} bytes")
        try:
            return base64.b64decode(event.image_b64, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ImageRejected("image_base64", f"image_b64 is not valid base64: {exc}") from None
    assert event.image_uri is not None
    if event.image_uri.startswith("file:"):
        return read_file_uri(event.image_uri, settings, limits.max_image_bytes)
    return fetch_http(event.image_uri, settings, limits.max_image_bytes)


def decode_image(data: bytes, limits: LimitsSpec, uri: str | None = None) -> LoadedImage:
    """Decode with Pillow: allowed format, pixel and frame limits, EXIF orientation, RGB."""
    digest = hashlib.sha256(data).hexdigest()
    try:
        with Image.open(BytesIO(data)) as opened:
            fmt = opened.format or "unknown"
            if fmt not in limits.image_formats:
                raise ImageRejected("image_format", f"format {fmt} is not in {list(limits.image_formats)}")
            width, height = opened.size
            if width * height > limits.max_image_pixels:
                raise ImageRejected(
                    "image_pixels", f"{width}x{height} pixels, over the limit of {limits.max_image_pixels}"
                )
            frames = getattr(opened, "n_frames", 1)
            if frames > limits.max_image_frames:
                raise ImageRejected("image_frames", f"{frames} frames, over {limits.max_image_frames}")
            opened.seek(0)
            opened.load()
            upright = ImageOps.exif_transpose(opened)
            rgb = upright.convert("RGB")
    except ImageRejected:
        raise
    except UnidentifiedImageError:
        raise ImageRejected("image_format", "not an image Pillow can identify") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise ImageRejected("image_corrupt", f"cannot decode the image: {exc}") from None
    ref = ImageRef(sha256=digest, uri=uri, format=fmt, width=rgb.width, height=rgb.height, bytes=len(data))
    return LoadedImage(rgb, ref)


def load_image(event: Event, settings: ImageFetchSettings, limits: LimitsSpec) -> LoadedImage:
    """Bytes, then pixels, of an image event; raises :class:`ImageRejected`."""
    return decode_image(image_bytes(event, settings, limits), limits, event.image_uri)
