"""The sentence-transformers text encoder run by torch (CPU in fp32, CUDA in fp16)."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from sieve.encoders.base import l2_normalise_rows, resolve_device
from sieve.encoders.batching import PaddingStats, pad_token_ids, padding_stats, plan_batches, prefetched
from sieve.encoders.st_model import bundled_minilm_path, st_model_name


class SentenceTransformerEncoder:
    """Any sentence-transformers model run by torch; fp16 weights on CUDA, fp32 on CPU.

    ``model`` is a local path or a hub name; ``None`` loads the bundled MiniLM
    offline. An encode call is tokenised once; its texts are sorted by token length
    and cut into batches of at most ``batch_size``, each padded only to its own
    longest text (:func:`~sieve.encoders.batching.plan_batches`); the next batch is
    padded on a helper thread while the current one runs, into pinned host memory
    copied with ``non_blocking=True`` on CUDA. The forward pass is the model's own
    modules (transformer, pooling, normalisation), so rows equal
    ``SentenceTransformer.encode``'s (tested to 1e-5 on CPU), and come back in the
    caller's order. ``last_padding`` counts the real and padded tokens of the last call.
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        device: str = "auto",
        batch_size: int = 64,
        max_seq_length: int | None = None,
        torch_threads: int | None = None,
        bucket_by_length: bool = True,
    ) -> None:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        if model is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        model_path = bundled_minilm_path() if model is None else model
        self._name = st_model_name(model)
        # OpenMP thread counts are per OS thread: encode() re-applies this in the
        # thread that calls it (the worker's executor thread, not the main one).
        self.torch_threads = torch_threads
        import torch
        from sentence_transformers import SentenceTransformer

        self._torch = torch
        self.device = resolve_device(device)
        self._model = SentenceTransformer(model_path, device=self.device)
        if self.device.startswith("cuda"):
            self._model.half()
        if max_seq_length is not None:
            self._model.max_seq_length = max_seq_length
        self._model.eval()
        self.batch_size = batch_size
        # False: batches follow the caller's order (measuring what bucketing saves).
        self.bucket_by_length = bucket_by_length
        dim = self._model.get_embedding_dimension()
        if dim is None:
            raise ValueError(f"model {model_path} does not say its embedding size")
        self._dim = int(dim)
        first: Any = self._model[0]  # the Transformer module (typed loosely by sentence-transformers)
        self._tokenizer: Any = first.tokenizer
        self._token_types = "token_type_ids" in getattr(self._tokenizer, "model_input_names", ())
        self.last_padding = PaddingStats()
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

    @property
    def max_seq_length(self) -> int:
        """Texts are cut to this many tokens (special tokens included)."""
        return int(self._model.max_seq_length or self._tokenizer.model_max_length)

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Each text's token ids as the model's tokenizer gives them, truncated, unpadded."""
        encoded = self._tokenizer(
            texts, padding=False, truncation="longest_first", max_length=self.max_seq_length,
            return_attention_mask=False, return_token_type_ids=False,
        )
        return [list(row) for row in encoded["input_ids"]]

    def encode(self, texts: list[str]) -> np.ndarray:
        """Embed ``texts`` in length-sorted batches of ``batch_size``; rows normalised one by one."""
        if not texts:
            return np.zeros((0, self._dim), dtype=np.float32)
        torch = self._torch
        with self._lock:
            if self.torch_threads is not None and torch.get_num_threads() != self.torch_threads:
                torch.set_num_threads(self.torch_threads)
            ids = self.token_ids(texts)
            lengths = [len(row) for row in ids]
            plan = plan_batches(lengths, self.batch_size, by_length=self.bucket_by_length)
            self.last_padding = padding_stats(lengths, plan)
            vectors = self._forward(ids, plan)
        return l2_normalise_rows(vectors)

    def host_batch(self, rows: Sequence[Sequence[int]]) -> dict[str, Any]:
        """One padded batch as CPU tensors; in pinned (page-locked) memory when the model is on CUDA."""
        torch = self._torch
        arrays = pad_token_ids(
            rows, pad_id=self._tokenizer.pad_token_id or 0, token_types=self._token_types,
            left=getattr(self._tokenizer, "padding_side", "right") == "left",
        )
        host = {name: torch.from_numpy(array) for name, array in arrays.items()}
        if self.device.startswith("cuda"):
            host = {name: tensor.pin_memory() for name, tensor in host.items()}
        return host

    def _forward(self, ids: list[list[int]], plan: list[np.ndarray]) -> np.ndarray:
        torch = self._torch
        pin = self.device.startswith("cuda")
        outputs = []
        with torch.inference_mode():
            for _group, host in prefetched(plan, lambda group: self.host_batch([ids[i] for i in group])):
                features = {name: tensor.to(self.device, non_blocking=pin) for name, tensor in host.items()}
                outputs.append(self._model(features)["sentence_embedding"])
            # One device-to-host copy (and synchronisation) per call, rows in plan order.
            stacked = torch.cat(outputs).float().cpu().numpy()
        vectors = np.empty_like(stacked)
        vectors[np.concatenate(plan)] = stacked
        return vectors
