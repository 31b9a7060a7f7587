"""The sentence-transformers text encoder on the exported backends (ONNX Runtime or OpenVINO, CPU)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from sieve.encoders.base import l2_normalise_rows
from sieve.encoders.batching import PaddingStats, padding_stats, plan_batches
from sieve.encoders.onnx_cache import META_FILE, ensure_onnx_models
from sieve.encoders.onnx_runtime import SentenceRunner, open_session
from sieve.encoders.onnx_variants import VARIANTS, VariantName
from sieve.encoders.st_model import fast_tokenizer, read_json, read_layout, resolve_model_dir
from sieve.progress import SILENT, Progress
from sieve.settings import usable_cpus

DEFAULT_CACHE_DIR = Path(".sieve/cache/onnx")


class OnnxEncoder:
    """A sentence-transformers model exported to ONNX, run on the CPU by ONNX Runtime or OpenVINO.

    Same model and tokenizer as :class:`~sieve.encoders.sentence_transformers.SentenceTransformerEncoder`.
    ``variant`` is the backend (:data:`~sieve.encoders.onnx_variants.VARIANTS`): ``onnx``
    and ``openvino`` compute torch's vectors and have its ``id`` (``st:<model>``);
    ``onnx-int8`` and ``openvino-int8`` are vector spaces of their own. ``threads`` is
    the session's intra-op thread count (the worker's ``torch_threads``; unset: the
    CPUs this process may use); ``cache_dir`` holds the exported models, and
    ``progress`` hears about the export when this construction has to make it.
    ``built`` says whether this construction exported it (False: taken from the
    cache); ``build_s`` is how long getting it took. Texts are tokenised once per
    call, sorted by token length and run in batches of ``batch_size``
    (``last_padding`` counts the tokens), rows returned in the caller's order.
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        variant: VariantName = "onnx-int8",
        device: str = "auto",
        batch_size: int = 64,
        max_seq_length: int | None = None,
        threads: int | None = None,
        cache_dir: str | Path = DEFAULT_CACHE_DIR,
        bucket_by_length: bool = True,
        progress: Progress = SILENT,
    ) -> None:
        if device not in ("auto", "cpu"):
            raise ValueError(f"the ONNX backends run on the CPU, not {device!r}; use backend torch or auto")
        if variant not in VARIANTS:
            raise ValueError(f"variant {variant!r}: one of {', '.join(VARIANTS)}")
        self.device = "cpu"
        self.variant: VariantName = variant
        directory, name = resolve_model_dir(model)
        self.layout = read_layout(directory, name, max_seq_length)
        started = time.perf_counter()
        self.folder, self.built = ensure_onnx_models(self.layout, cache_dir, progress=progress)
        self.build_s = time.perf_counter() - started
        self.meta: dict[str, Any] = read_json(self.folder / META_FILE)
        self._tokenizer = fast_tokenizer(self.layout)
        padding = read_json(directory / "tokenizer.json").get("padding") or {}
        self._pad_id = int(padding.get("pad_id", 0))
        self.threads = usable_cpus() if threads is None else threads
        session = open_session(self.folder, variant, self.threads)
        self._runner = SentenceRunner(session, self.layout.pooling, int(self.meta["dim"]))
        self._token_types = "token_type_ids" in self._runner.inputs
        self.batch_size = batch_size
        self.bucket_by_length = bucket_by_length
        self.last_padding = PaddingStats()
        self._lock = threading.Lock()

    @property
    def id(self) -> str:
        """``st:all-MiniLM-L6-v2`` (torch's vectors) or e.g. ``st:all-MiniLM-L6-v2+onnx-int8``."""
        return f"st:{self.layout.name}{VARIANTS[self.variant].id_suffix}"

    @property
    def dim(self) -> int:
        """Embedding size of the model."""
        return self._runner.dim

    @property
    def max_seq_length(self) -> int:
        """Texts are cut to this many tokens (special tokens included)."""
        return self.layout.max_seq_length

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Each text's token ids from the model's fast tokenizer, truncated, unpadded."""
        return [encoding.ids for encoding in self._tokenizer.encode_batch(texts)]

    def encode(self, texts: list[str]) -> np.ndarray:
        """Embed ``texts`` in length-sorted batches of ``batch_size``; rows normalised one by one."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._lock:
            ids = self.token_ids(texts)
            lengths = [len(row) for row in ids]
            self.last_padding = padding_stats(
                lengths, plan_batches(lengths, self.batch_size, by_length=self.bucket_by_length))
            vectors = self._runner.run(ids, pad_id=self._pad_id, token_types=self._token_types,
                                       batch_size=self.batch_size, by_length=self.bucket_by_length)
        return l2_normalise_rows(vectors)
