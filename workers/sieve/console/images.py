"""An item's image for the moderator: fetched by the console through the workers' guarded fetcher.

The moderator's browser never loads a URL from an event: the console fetches the image
(address checks, size and time limits: :mod:`sieve.flow.images`), decodes it within the
topology's limits, shrinks it and serves it again as a PNG of its own.
"""

from __future__ import annotations

from io import BytesIO

from sieve.flow.images import ImageRejected, decode_image, fetch_http, read_file_uri
from sieve.settings import ImageFetchSettings
from sieve.topology import LimitsSpec

MAX_SIDE = 1024


def image_png(uri: str, settings: ImageFetchSettings, limits: LimitsSpec) -> bytes:
    """The image at ``uri`` as a PNG at most ``MAX_SIDE`` pixels a side; raises :class:`ImageRejected`."""
    if uri.startswith("file:"):
        data = read_file_uri(uri, settings, limits.max_image_bytes)
    else:
        data = fetch_http(uri, settings, limits.max_image_bytes)
    image = decode_image(data, limits, uri).image
    image.thumbnail((MAX_SIDE, MAX_SIDE))
    out = BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


__all__ = ["ImageRejected", "image_png"]
