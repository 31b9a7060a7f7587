"""What the model's arithmetic allows on this CPU: FLOPs per message and the matmul peaks.

bench_peer.py prints, beside its ratios, the ceiling each ratio has here: a system that
ran all-MiniLM-L6-v2's matrix products on every message at this machine's measured matmul
peak, and did nothing else, would decide ``peak / FLOPs per message`` messages per second.
Divided by the peer's rate, that is the largest ratio any implementation of the same model
at that precision can show against it on these messages and cores. A target above it
cannot be met by faster code, only by fewer or cheaper multiplies.

* FLOPs are counted from the model's shape (``ModelShape``) on each message's own tokens,
  truncated as the encoder truncates them, no padding: the linear layers (Q, K, V, output,
  the two feed-forward matmuls: ``2 x tokens x weights``) and attention's two products
  (``4 x tokens² x hidden`` per layer). Embedding look-ups, softmax, GELU, LayerNorm and
  pooling are left out (they are not matmuls); tests/test_roofline.py checks the count
  against torch's own FLOP counter on the real model.
* Peaks are measured, not taken from a data sheet: torch's matmul of the model's three
  product shapes on a batch of 1,024 tokens (16 texts of 64: Q/K/V together, the first and
  the second feed-forward matmul) in fp32, bf16 and int8 (``torch._int_mm``: int8 in, int32
  out), the best rate of any shape and run on ``threads`` threads. The best, not the mean,
  so that the bound errs high: a ratio shown above it would mean the peak was measured low.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sieve.encoders.st_model import ModelLayout, fast_tokenizer

# tokens x in x out: MiniLM's Q/K/V, FFN1 and FFN2 products on a batch of 16 texts of 64 tokens
PEAK_SHAPES = ((1024, 384, 1152), (1024, 384, 1536), (1024, 1536, 384))
PRECISIONS = ("fp32", "bf16", "int8")


@dataclass(frozen=True, slots=True)
class ModelShape:
    """The sizes of a BERT-style encoder that set its matmul FLOPs."""

    hidden: int
    intermediate: int
    layers: int

    @classmethod
    def from_config(cls, model_dir: str | Path) -> ModelShape:
        """From a transformers ``config.json`` (BERT, MPNet and their kin use these names)."""
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
        return cls(int(config["hidden_size"]), int(config["intermediate_size"]),
                   int(config["num_hidden_layers"]))

    @property
    def linear_flops_per_token(self) -> int:
        """Q, K, V and output projections plus the two feed-forward matmuls, every layer."""
        return 2 * self.layers * (4 * self.hidden * self.hidden + 2 * self.hidden * self.intermediate)

    def attention_flops(self, lengths: np.ndarray | list[int]) -> np.ndarray:
        """Attention's two products per text (scores Q K^T, then P V), every layer."""
        tokens = np.asarray(lengths, dtype=np.float64)
        return 4.0 * self.layers * self.hidden * tokens * tokens

    def flops(self, lengths: np.ndarray | list[int]) -> np.ndarray:
        """Matmul FLOPs of encoding texts of these token lengths, each on its own (no padding)."""
        tokens = np.asarray(lengths, dtype=np.float64)
        return self.linear_flops_per_token * tokens + self.attention_flops(tokens)


def token_lengths(texts: list[str], layout: ModelLayout) -> list[int]:
    """Each text's token count, tokenised and cut as the ONNX and OpenVINO backends do."""
    return [len(encoding.ids) for encoding in fast_tokenizer(layout).encode_batch(texts)]


def matmul_peak(precision: str, threads: int, shape: tuple[int, int, int] = PEAK_SHAPES[1],
                repeats: int = 3, seconds: float = 0.3) -> float:
    """torch's matmul rate in GFLOP/s (int8: GOP/s) on ``threads`` threads: best of ``repeats``."""
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: one of {', '.join(PRECISIONS)}")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        m, k, n = shape
        generator = torch.Generator().manual_seed(0)
        if precision == "int8":
            a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=generator)
            b = torch.randint(-127, 128, (k, n), dtype=torch.int8, generator=generator)

            def product() -> object:
                return torch._int_mm(a, b)
        else:
            dtype = torch.float32 if precision == "fp32" else torch.bfloat16
            a = torch.randn(m, k, generator=generator).to(dtype)
            b = torch.randn(k, n, generator=generator).to(dtype)

            def product() -> object:
                return a @ b
        product()
        best = 0.0
        for _ in range(repeats):
            calls, started = 0, time.perf_counter()
            while True:
                product()
                calls += 1
                elapsed = time.perf_counter() - started
                if elapsed >= seconds:
                    break
            best = max(best, 2.0 * m * k * n * calls / elapsed / 1e9)
        return best
    finally:
        torch.set_num_threads(previous)


def matmul_peaks(threads: int, shapes: tuple[tuple[int, int, int], ...] = PEAK_SHAPES,
                 repeats: int = 3, seconds: float = 0.3) -> dict[str, float]:
    """Per precision, the best :func:`matmul_peak` over ``shapes``."""
    return {precision: max(matmul_peak(precision, threads, shape, repeats, seconds) for shape in shapes)
            for precision in PRECISIONS}


def cpu_has_bf16() -> bool:
    """Whether OpenVINO computes in bf16 here (it says so in its CPU capabilities)."""
    try:
        import openvino as ov
    except ImportError:
        return False
    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def backend_precision(backend: str, bf16: bool) -> str:
    """The precision of a backend's linear layers, whose peak bounds it.

    onnx-int8 runs only its attention projections in int8 (the feed-forward matmuls stay
    fp32), so its bound is between fp32's and int8's; it is held to the int8 one here, the
    bound of the issue's int8 target.
    """
    if backend in ("torch", "onnx"):
        return "fp32"
    if backend == "openvino":
        return "bf16" if bf16 else "fp32"
    return "int8"


def compute_bound(lengths: list[int], shape: ModelShape, peaks: dict[str, float]) -> dict:
    """FLOPs per message and, per precision, the messages/s of a system at that matmul peak."""
    flops = shape.flops(lengths)
    per_message = float(flops.mean())
    return {
        "tokens_mean": float(np.mean(lengths)),
        "gflop_per_message": per_message / 1e9,
        "attention_share": float(shape.attention_flops(lengths).sum() / flops.sum()),
        "peaks_gflops": peaks,
        "ceiling_rate": {p: peak * 1e9 / per_message for p, peak in peaks.items()},
    }
