"""The trivial text encoder: hashed words, no model (for measuring the streaming machinery)."""

from __future__ import annotations

import zlib

import numpy as np

from sieve.encoders.base import l2_normalise_rows


class TrivialEncoder:
    """A hashing encoder with no model: bag of hashed words, normalised.

    Not a stand-in for meaning: it exists to measure the streaming machinery
    (the ceiling a real encoder can reach) and is named ``trivial`` wherever used.
    """

    def __init__(self, dim: int = 64) -> None:
        self._dim = dim

    @property
    def id(self) -> str:
        """``trivial:crc32-<dim>``."""
        return f"trivial:crc32-{self._dim}"

    @property
    def dim(self) -> int:
        """Vector length."""
        return self._dim

    def encode(self, texts: list[str]) -> np.ndarray:
        """Hash each lower-cased word (CRC-32) into a bucket; count per row; normalise each row."""
        crc32, dim = zlib.crc32, self._dim
        counts: list[int] = []
        hashes: list[int] = []
        for text in texts:
            words = text.lower().split()
            counts.append(len(words))
            hashes.extend([crc32(word.encode()) for word in words])
        # cell (row, bucket) of every word, all counted by one bincount
        cells = (np.repeat(np.arange(len(texts), dtype=np.intp) * dim, counts)
                 + np.asarray(hashes, dtype=np.uint32).astype(np.intp) % dim)
        out = np.bincount(cells, minlength=len(texts) * dim).reshape(len(texts), dim)
        return l2_normalise_rows(out.astype(np.float32))
