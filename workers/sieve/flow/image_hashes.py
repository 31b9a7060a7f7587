"""Image hash lists: perceptual hashes of known images, matched by Hamming distance (pure).

``phash`` is imagehash's 64-bit DCT hash: the image in greyscale at 32x32, the sign of its
lowest 8x8 frequencies against their median. Re-encoding, resizing and small crops move few
bits; a different image lands about 32 bits away. A crop moves more (up to about 18 bits at 5%
per side), so each known image is stored with the hashes of its crops (``crop_hashes``, up to 5%
per side) and a cropped copy lands near one of them. Each list sets the distance at which a hash
matches (``max_distance``); the nearest entry within it fires.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import imagehash
import numpy as np
from PIL import Image

from sieve.flow.lists import ListHit
from sieve.lists import HashList


def phash(image: Image.Image) -> int:
    """The image's 64-bit perceptual hash as an integer."""
    bits = imagehash.phash(image.convert("RGB")).hash.flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def phash_hex(image: Image.Image) -> str:
    """The hash as list files write it: 16 lowercase hex digits."""
    return f"{phash(image):016x}"


CROP_STEPS = (0.0, 0.025, 0.05)  # per side: every combination, 81 crops


def crop_hashes(image: Image.Image) -> list[str]:
    """Hashes of the image cropped by each combination of ``CROP_STEPS`` per side, uncropped left out."""
    width, height = image.size
    hashes = []
    for left, top, right, bottom in itertools.product(CROP_STEPS, repeat=4):
        if left == top == right == bottom == 0.0:
            continue
        box = (int(width * left), int(height * top), int(width * (1 - right)), int(height * (1 - bottom)))
        hashes.append(phash_hex(image.crop(box)))
    return sorted(set(hashes))


class HashMatcher:
    """The image hash lists of one route set, as arrays, matched over batches."""

    def __init__(self, lists: Sequence[HashList]) -> None:
        self.lists = tuple(lists)
        self._tables = []
        for hash_list in self.lists:
            owners = [i for i, e in enumerate(hash_list.entries) for _ in e.hashes()]
            values = [int(h, 16) for e in hash_list.entries for h in e.hashes()]
            self._tables.append((hash_list, np.array(values, dtype=np.uint64), owners))

    def __bool__(self) -> bool:
        return bool(self.lists)

    def match(self, image_hash: int) -> list[ListHit]:
        """The nearest entry of each list within its ``max_distance`` of ``image_hash``."""
        hits = []
        probe = np.uint64(image_hash)
        for hash_list, table, owners in self._tables:
            distances = np.bitwise_count(np.bitwise_xor(table, probe))
            nearest = int(np.argmin(distances))
            if int(distances[nearest]) <= hash_list.max_distance:
                entry = hash_list.entries[owners[nearest]]
                hits.append(ListHit(hash_list.name, entry.id, hash_list.route,
                                    distance=int(distances[nearest])))
        return hits

    def match_batch(self, images: Sequence[Image.Image | None]) -> list[list[ListHit]]:
        """``match`` for each image of a batch (``None``: a text event or an image that failed)."""
        return [self.match(phash(image)) if image is not None else [] for image in images]
