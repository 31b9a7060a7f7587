"""The image encoder: an open_clip model (two towers: images and text prompts into one space)."""

from __future__ import annotations

import hashlib
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from sieve.encoders.base import l2_normalise_rows, resolve_device
from sieve.settings import usable_cpus

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


def clip_encoder_id(model: str, pretrained: str | None) -> str:
    """An open_clip model's encoder id, without loading it: name and tag, or a local folder's weights hash."""
    if model.startswith("local-dir:"):
        local = Path(model.removeprefix("local-dir:"))
        weights = next(iter(sorted(local.glob("open_clip_model.*"))), None)
        tag = hashlib.sha256(weights.read_bytes()).hexdigest()[:12] if weights else "local"
        return f"clip:{local.name}:{tag}"
    return f"clip:{model}:{pretrained or 'random'}"


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
        self._id = clip_encoder_id(model, pretrained)
        with torch.no_grad():
            probe = self._model.encode_text(self._tokenizer(["probe"]).to(self.device))
        self._dim = int(probe.shape[-1])
        self._lock = threading.Lock()
        # Preprocessing (resize, crop, to tensor) runs per image on the CPU, and on a GPU
        # machine it is what bounds images/s. PIL and torch release the interpreter lock
        # there, so a batch's images go to threads.
        self.preprocess_threads = min(8, usable_cpus())
        self._preprocessors: ThreadPoolExecutor | None = None

    @property
    def id(self) -> str:
        """E.g. ``clip:ViT-B-32:laion2b_s34b_b79k``."""
        return self._id

    @property
    def dim(self) -> int:
        """Embedding size."""
        return self._dim

    def preprocess(self, images: list[Any]) -> Any:
        """The model's transforms over a batch of RGB PIL images, on ``preprocess_threads``: one tensor."""
        if self.preprocess_threads <= 1 or len(images) < 2:
            return self._torch.stack([self._preprocess(image) for image in images])
        if self._preprocessors is None:
            self._preprocessors = ThreadPoolExecutor(self.preprocess_threads,
                                                     thread_name_prefix="sieve-preprocess")
        return self._torch.stack(list(self._preprocessors.map(self._preprocess, images)))

    def _run(self, tensors: Any, tower: str) -> np.ndarray:
        torch = self._torch
        out = []
        with self._lock, torch.no_grad():
            if self.torch_threads is not None and torch.get_num_threads() != self.torch_threads:
                torch.set_num_threads(self.torch_threads)
            cuda = self.device.startswith("cuda")
            if cuda:
                # Page-locked host memory, so the copies below can run asynchronously.
                tensors = tensors.pin_memory()
            for start in range(0, len(tensors), self.batch_size):
                chunk = tensors[start:start + self.batch_size].to(self.device, non_blocking=cuda)
                if tower == "image":
                    if cuda:
                        chunk = chunk.half()
                    features = self._model.encode_image(chunk)
                else:
                    features = self._model.encode_text(chunk)
                out.append(features.float())
            # One device-to-host copy (and synchronisation) per call.
            matrix = torch.cat(out).cpu().numpy()
        return l2_normalise_rows(matrix)

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
