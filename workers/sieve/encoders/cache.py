"""An on-disk cache of text embeddings, keyed by encoder id and the text's SHA-256.

Evaluating, fitting and building on the full public data sets encodes tens of
thousands of texts, the same ones run after run. :class:`CachedEncoder` wraps any
:class:`~sieve.encoders.base.TextEncoder` and encodes only texts it has not seen
under that encoder id. Vectors are stored as append-only shards
(``<dir>/<encoder-slug>/shard-*.npz``, each written to a temporary name and
renamed), so two processes filling one cache never corrupt it. The cache is for
offline work (eval, fit, build); the worker never uses it.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from pathlib import Path

import numpy as np

from sieve.encoders.base import TextEncoder


def text_key(text: str) -> bytes:
    """The 32-byte key of one text."""
    return hashlib.sha256(text.encode("utf-8")).digest()


def _slug(encoder_id: str) -> str:
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", encoder_id)[:80]
    return f"{readable}-{hashlib.sha256(encoder_id.encode()).hexdigest()[:8]}"


class CachedEncoder:
    """A :class:`TextEncoder` that remembers vectors on disk (same id, dim and rows as ``inner``)."""

    def __init__(self, inner: TextEncoder, cache_dir: str | Path) -> None:
        self.inner = inner
        self.directory = Path(cache_dir) / _slug(inner.id)
        self._vectors: dict[bytes, np.ndarray] = {}
        self.hits = 0
        self.misses = 0
        self._load()

    @property
    def id(self) -> str:
        """The wrapped encoder's id (the cache never changes the vector space)."""
        return self.inner.id

    @property
    def dim(self) -> int:
        """The wrapped encoder's vector length."""
        return self.inner.dim

    def _load(self) -> None:
        if not self.directory.is_dir():
            return
        for shard in sorted(self.directory.glob("shard-*.npz")):
            try:
                with np.load(shard, allow_pickle=False) as data:
                    keys, vectors = data["keys"], data["vectors"]
            except (OSError, ValueError, KeyError):
                continue  # a damaged shard is only a cache miss
            if vectors.ndim != 2 or vectors.shape[1] != self.inner.dim:
                continue
            for key, vector in zip(keys, vectors, strict=True):
                self._vectors[bytes(key)] = vector

    def _store(self, keys: list[bytes], vectors: np.ndarray) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"shard-{uuid.uuid4().hex}"
        temporary = self.directory / f".{name}.tmp.npz"
        np.savez(temporary, keys=np.array(keys, dtype="S32"), vectors=vectors.astype(np.float32))
        os.replace(temporary, self.directory / f"{name}.npz")

    def encode(self, texts: list[str]) -> np.ndarray:
        """Rows for ``texts`` in order; only unseen texts reach the wrapped encoder."""
        keys = [text_key(text) for text in texts]
        missing: dict[bytes, str] = {}
        for key, text in zip(keys, texts, strict=True):
            if key not in self._vectors and key not in missing:
                missing[key] = text
        self.misses += len(missing)
        self.hits += len(texts) - len(missing)
        if missing:
            new_keys = list(missing)
            vectors = np.asarray(self.inner.encode(list(missing.values())), dtype=np.float32)
            for key, vector in zip(new_keys, vectors, strict=True):
                self._vectors[key] = vector
            self._store(new_keys, vectors)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([self._vectors[key] for key in keys]).astype(np.float32, copy=False)
