"""Running an exported model on the CPU: ONNX Runtime and OpenVINO sessions, pooled into sentence vectors.

A session takes padded int64 inputs (``input_ids``, ``attention_mask`` and, where the
model has them, ``token_type_ids``) and returns the last hidden state;
:class:`SentenceRunner` plans and pads the batches and pools each row (mean over the
attention mask, or CLS, as the model's pooling config says).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sieve.encoders.batching import pad_token_ids, plan_batches, prefetched
from sieve.encoders.onnx_variants import VARIANTS, Precision, VariantName

# ONNX Runtime graph rewrites left out of every session: its SkipLayerNormalization kernel
# is slower on the CPU than the Add + LayerNormalization it replaces (same outputs to float
# rounding; docs/benchmarks.md).
DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)
# openvino-int8 quantises activations per token in groups of this many channels, so rows
# hardly depend on their batch (docs/benchmarks.md compares group sizes).
OPENVINO_GROUP_SIZE = 64


def onnxruntime_session(path: Path, threads: int, optimized_to: Path | None = None) -> Any:
    """An ONNX Runtime CPU session; ``optimized_to`` also saves the graph it runs (after its rewrites)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if optimized_to is not None:
        options.optimized_model_filepath = str(optimized_to)
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(DISABLED_OPTIMIZERS))


class OnnxRuntimeSession:
    """An ONNX Runtime session as the runner calls it: input names, feeds -> last hidden state."""

    def __init__(self, path: Path, threads: int) -> None:
        self.session = onnxruntime_session(path, threads)
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """The last hidden state of one padded batch."""
        return np.asarray(self.session.run(["last_hidden_state"], feeds)[0])


def openvino_config(weights: Precision, threads: int, capabilities: list[str]) -> dict[str, Any]:
    """OpenVINO CPU plugin settings for a model file with ``weights``: one stream of ``threads`` threads.

    fp32 weights compute in bf16 where the CPU has it (f32 otherwise); int8 weights
    in f32, with activations quantised per token group. The plugin pins its threads
    to cores by default; a worker shares its cores with its own event loop and,
    scaled out, with other workers, so here the OS places them.
    """
    config: dict[str, Any] = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1,
                              "PERFORMANCE_HINT": "LATENCY", "ENABLE_CPU_PINNING": False}
    if weights == "fp32":
        config["INFERENCE_PRECISION_HINT"] = "bf16" if "BF16" in capabilities else "f32"
    else:
        config["INFERENCE_PRECISION_HINT"] = "f32"
        config["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = OPENVINO_GROUP_SIZE
    return config


class OpenVinoSession:
    """An exported model compiled by OpenVINO's CPU plugin (one infer request, dynamic shapes)."""

    def __init__(self, path: Path, weights: Precision, threads: int) -> None:
        import openvino as ov

        core = ov.Core()
        self.config = openvino_config(weights, threads,
                                      list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")))
        compiled = core.compile_model(core.read_model(str(path)), "CPU", self.config)
        self.inputs = [port.get_any_name() for port in compiled.inputs]
        self._request = compiled.create_infer_request()

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """The last hidden state of one padded batch."""
        return np.array(self._request.infer(feeds)[0])  # a copy: the request reuses its buffer


def open_session(folder: Path, variant: VariantName, threads: int) -> OnnxRuntimeSession | OpenVinoSession:
    """The runtime that runs ``variant``'s model file from an export folder."""
    chosen = VARIANTS[variant]
    path = folder / chosen.file
    if chosen.runtime == "openvino":
        return OpenVinoSession(path, chosen.weights, threads)
    return OnnxRuntimeSession(path, threads)


class SentenceRunner:
    """Runs padded batches through a session and pools the last hidden state into sentence vectors."""

    def __init__(self, session: OnnxRuntimeSession | OpenVinoSession, pooling: str, dim: int) -> None:
        self.session = session
        self.pooling = pooling
        self.dim = dim
        self.inputs = session.inputs

    def pool(self, hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """One vector per row: the first token's (CLS) or the mean over the attention mask."""
        if self.pooling == "cls":
            return hidden[:, 0]
        weights = mask[:, :, None].astype(np.float32)
        return (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)

    def run(self, ids: list[list[int]], *, pad_id: int, token_types: bool, batch_size: int = 64,
            by_length: bool = True) -> np.ndarray:
        """Unnormalised sentence vectors of token-id rows, in their order."""
        plan = plan_batches([len(row) for row in ids], batch_size, by_length=by_length)
        out = np.empty((len(ids), self.dim), dtype=np.float32)

        def prepare(group: np.ndarray) -> dict[str, np.ndarray]:
            arrays = pad_token_ids([ids[i] for i in group], pad_id=pad_id, token_types=token_types)
            return {name: arrays[name] for name in self.inputs}

        for group, feeds in prefetched(plan, prepare):
            hidden = self.session(feeds)
            out[group] = self.pool(hidden, feeds["attention_mask"])
        return out
