"""What every encoder is: the text and image encoder protocols, and the helpers they share.

Every encoder normalises each row on its own, so an event's vector never depends
on its batch neighbours (``encode(batch)[i] == encode([batch[i]])``, tested).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class TextEncoder(Protocol):
    """What the pipeline needs from a text encoder."""

    @property
    def id(self) -> str:
        """Stable name of the vector space (model + revision); part of the store's key."""
        ...

    @property
    def dim(self) -> int:
        """Vector length."""
        ...

    def encode(self, texts: list[str]) -> np.ndarray:
        """``(len(texts), dim)`` float32, each row L2-normalised."""
        ...


@runtime_checkable
class ImageEncoder(Protocol):
    """What the pipeline needs from an image encoder (a CLIP-style model with two towers)."""

    @property
    def id(self) -> str:
        """Stable name of the vector space."""
        ...

    @property
    def dim(self) -> int:
        """Vector length."""
        ...

    def encode_images(self, images: list[Any]) -> np.ndarray:
        """``(len(images), dim)`` float32 from RGB PIL images, each row L2-normalised."""
        ...

    def encode_prompts(self, texts: list[str]) -> np.ndarray:
        """Text prompts into the same space (the CLIP text tower), rows L2-normalised."""
        ...


def l2_normalise_rows(matrix: np.ndarray) -> np.ndarray:
    """Each row divided by its own norm (zero rows stay zero)."""
    matrix = np.asarray(matrix, dtype=np.float32)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.maximum(norms, 1e-12)


def resolve_device(device: str) -> str:
    """``auto`` becomes ``cuda`` when a GPU is visible, else ``cpu``."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def release_device_memory() -> None:
    """Give the GPU back the memory of encoders this process let go (its compute child has its own)."""
    import gc
    import sys

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
