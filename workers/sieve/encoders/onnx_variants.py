"""The exported backends of the sentence-transformers text encoder, and what each one is.

On first use a model's transformer is exported to ONNX (:mod:`sieve.encoders.onnx_export`)
and kept as three model files, run by four backends. Here each backend is a *variant*,
named as the topology's ``backend`` names it:

* ``onnx``: the fp32 export on ONNX Runtime;
* ``onnx-int8``: a copy made by ONNX Runtime's dynamic quantiser: the attention
  projections (query, key, value, output) in int8, per output channel, activations
  quantised per call; the feed-forward matmuls stay fp32;
* ``openvino``: the fp32 export compiled by OpenVINO's CPU plugin, computing in bf16
  where the CPU has it (f32 elsewhere);
* ``openvino-int8``: a copy with every weight matmul int8 per output channel, run by
  OpenVINO with dynamic quantisation: activations in int8 per token, in groups of
  ``OPENVINO_GROUP_SIZE`` channels.

fp32 ONNX computes what torch computes, and OpenVINO's bf16 stays within cosine
0.9999 of it on every row (as torch fp16 on CUDA does); both are checked when the
export is built, and by the tests. So ``onnx`` and ``openvino`` keep torch's encoder id
(``st:<model>``): route vectors and fitted thresholds carry over. Each int8 recipe is
a vector space of its own (``st:<model>+onnx-int8``, ``+openvino-int8``).

Why the int8 recipes differ: ONNX Runtime scales activations per tensor, i.e. per
*batch*, so one outlier token coarsens every row's steps; quantising the feed-forward
matmuls as well puts rows below cosine 0.99 to fp32, so they stay fp32. It also makes
an ``onnx-int8`` row depend on its batch neighbours within the quantisation error
(tested at >= 0.99), where the fp32 variants are exact. OpenVINO's per-token groups
keep every weight matmul int8 above 0.99, and its rows move by less than 0.001 with
their batch (tested). docs/benchmarks.md has the measurements behind these choices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

VariantName = Literal["onnx", "onnx-int8", "openvino", "openvino-int8"]
Runtime = Literal["onnxruntime", "openvino"]
# The precision of a model file's weight matmuls (onnx-int8: its attention projections).
Precision = Literal["fp32", "int8"]


@dataclass(frozen=True, slots=True)
class Variant:
    """One exported backend: its model file, the runtime that runs it, its weights, id suffix, probe bar."""

    file: str
    runtime: Runtime
    weights: Precision
    # What it adds to the encoder id: "" where it computes torch's vectors (fp32, and
    # OpenVINO's bf16 within cosine 0.9999); each int8 recipe is its own space.
    id_suffix: str
    # A freshly built model must reach this cosine to torch on the probe texts, or it is not cached.
    min_probe_cosine: float


VARIANTS: dict[VariantName, Variant] = {
    "onnx": Variant("model.fp32.onnx", "onnxruntime", "fp32", "", 0.9999),
    "onnx-int8": Variant("model.int8.onnx", "onnxruntime", "int8", "+onnx-int8", 0.98),
    "openvino": Variant("model.fp32.onnx", "openvino", "fp32", "", 0.9999),
    "openvino-int8": Variant("model.wq8.onnx", "openvino", "int8", "+openvino-int8", 0.98),
}
