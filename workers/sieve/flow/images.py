"""Image events: get the bytes (inline base64 or a guarded fetch), decode them safely.

Every failure is an :class:`ImageRejected` with a reason code, which the
pipeline turns into a dead letter (its message never carries a URL's
credentials); fetches go through :mod:`sieve.flow.netguard` (SSRF checks pinned
to the connected address, a total deadline); nothing here lets an image exhaust memory:
downloads stop at ``max_image_bytes``, the pixel count is read from the header
before any pixel is decoded, and only the first frame of an animation is used.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import urllib.parse
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from sieve.contracts import Event, ImageRef
from sieve.flow import netguard
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


def check_url(url: str, settings: ImageFetchSettings) -> list[str]:
    """Refuse URLs that are not http(s) or that resolve to refused addresses (SSRF); the checked addresses."""
    try:
        return netguard.check_url(url, settings)
    except netguard.FetchError as exc:
        raise ImageRejected(f"image_{exc.reason}", exc.error) from None


def fetch_http(url: str, settings: ImageFetchSettings, max_bytes: int) -> bytes:
    """GET an image within the fetch deadline and the size limit, connecting only to checked addresses.

    :mod:`sieve.flow.netguard` does the work: each hop's host is resolved once, its
    addresses checked, and the connection made to a checked address.
    """
    try:
        return netguard.fetch(url, settings, max_bytes)
    except netguard.FetchError as exc:
        raise ImageRejected(f"image_{exc.reason}", exc.error) from None


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
