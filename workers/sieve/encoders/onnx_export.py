"""Exporting a sentence-transformers model for the exported backends: ONNX, its int8 copies, probes.

The model's transformer, with eager attention, is exported to ONNX
(``torch.onnx.export``, the torch.export-based exporter; inputs ``input_ids`` /
``attention_mask`` / ``token_type_ids``, output ``last_hidden_state``, dynamic batch
and sequence axes) and kept in fp32. Two int8 copies are written from it: ONNX
Runtime's dynamic quantiser over the attention projections (``onnx-int8``), and every
weight matmul int8 behind ``DequantizeLinear`` for OpenVINO (:func:`write_weight_int8`,
``openvino-int8``). Every variant is then run on :data:`PROBE_TEXTS` and must agree
with the torch model to its ``min_probe_cosine``, or nothing is kept.
:mod:`sieve.encoders.onnx_cache` decides when to export and where the files live.
"""

from __future__ import annotations

import logging
import time
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from sieve.encoders.base import l2_normalise_rows
from sieve.encoders.onnx_runtime import SentenceRunner, open_session
from sieve.encoders.onnx_variants import VARIANTS
from sieve.encoders.st_model import ModelLayout
from sieve.progress import SILENT, Progress

# Part of the cache key and of nothing else: bump it when the export or the
# quantisation changes. A change that moves the vectors must also change the id suffix.
RECIPE = ("onnx/4: torch.onnx dynamo export of eager attention, kept as fp32; "
          "quantize_dynamic per-channel QInt8 MatMul, FFN fp32; "
          "every weight MatMul int8 per output channel behind DequantizeLinear (OpenVINO)")
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
# Versions that change the exported or quantised graph.
KEY_PACKAGES = ("onnxruntime", "onnx", "torch", "transformers", "sentence-transformers")
# Every freshly built model is checked against torch on these texts (Variant.min_probe_cosine).
PROBE_TEXTS = (
    "hi",
    "where is my refund? I returned the parcel three weeks ago and still have not heard back",
    "a cat is sleeping on the sofa",
    "the stock market fell sharply today after the central bank raised interest rates again",
)


def package_version(package: str) -> str:
    """An installed package's version, or ``absent``."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def export_models(layout: ModelLayout, folder: Path, *, progress: Progress = SILENT) -> dict[str, Any]:
    """Export the model into ``folder`` (fp32 ONNX, two int8 copies), probe each variant; the metadata."""
    started = time.perf_counter()
    fp32_file = folder / VARIANTS["onnx"].file
    with progress.task(f"exporting {layout.name} to ONNX", total=1) as advance:
        model = _load_eager(layout)
        names = _export_fp32(model, layout, fp32_file)
        advance(1)
    exported = time.perf_counter()
    config = model[0].auto_model.config
    with progress.task(f"quantising {layout.name} to int8", total=2) as advance:
        keep_fp32 = _quantise_attention(fp32_file, folder / VARIANTS["onnx-int8"].file,
                                        int(config.intermediate_size), int(config.hidden_size))
        advance(1)
        write_weight_int8(fp32_file, folder / VARIANTS["openvino-int8"].file)
        advance(1)
    quantised = time.perf_counter()
    dim = int(model.get_embedding_dimension() or config.hidden_size)
    probe_cosines = _probe(model, layout, folder, dim, token_types="token_type_ids" in names,
                           progress=progress)
    return {
        "model": layout.name,
        "source": str(layout.directory),
        "recipe": RECIPE,
        "versions": {package: package_version(package) for package in KEY_PACKAGES},
        "inputs": names,
        "dim": dim,
        "pooling": layout.pooling,
        "fp32_matmuls": keep_fp32,
        "probe_min_cosine": probe_cosines,
        "export_s": round(exported - started, 2),
        "quantise_s": round(quantised - exported, 2),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _load_eager(layout: ModelLayout) -> Any:
    """The model on the CPU with eager attention, not torch's scaled_dot_product_attention.

    The exporter guards SDPA's softmax with IsNaN + Where (for fully masked rows, which
    mean pooling never has), a costly guard over every (batch, head, token, token) cell;
    eager attention computes the same vectors without it.
    """
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(layout.directory), device="cpu",
                                model_kwargs={"attn_implementation": "eager"})
    model.max_seq_length = layout.max_seq_length
    model.eval()
    return model


def _export_fp32(model: Any, layout: ModelLayout, target: Path) -> list[str]:
    """Export the transformer (to its last hidden state) as fp32 ONNX; the input names it takes."""
    import torch

    transformer: Any = model[0].auto_model.eval()
    features = model.preprocess(list(PROBE_TEXTS[:2]))
    names = [name for name in INPUT_NAMES if name in features]
    if names[:2] != ["input_ids", "attention_mask"]:
        raise ValueError(f"{layout.directory}: the tokenizer gives {sorted(features)}; the ONNX backends "
                         "needs input_ids and attention_mask")

    class LastHiddenState(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.transformer = transformer

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any = None) -> Any:
            extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
            output = self.transformer(input_ids=input_ids, attention_mask=attention_mask, **extra)
            return output.last_hidden_state

    wrapper = LastHiddenState().eval()
    batch = torch.export.Dim("batch")
    positions = int(getattr(transformer.config, "max_position_embeddings", 0) or layout.max_seq_length)
    sequence = torch.export.Dim("sequence", max=max(positions, layout.max_seq_length))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper, tuple(features[name] for name in names), str(target),
            input_names=names, output_names=["last_hidden_state"],
            dynamic_shapes={name: {0: batch, 1: sequence} for name in names},
            dynamo=True, external_data=False, verbose=False,
        )
    return names


class _DropRootRecords(logging.Filter):
    """Drops the quantiser's advice to pre-process (logged on the root logger; not needed here)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Please consider to run pre-processing")


def feed_forward_matmuls(model: Any, intermediate_size: int, hidden_size: int) -> list[str]:
    """Names of the MatMul nodes whose constant weight maps hidden <-> intermediate (the feed-forward)."""
    shapes = {init.name: tuple(init.dims) for init in model.graph.initializer}
    wanted = {(hidden_size, intermediate_size), (intermediate_size, hidden_size)}
    return [
        node.name for node in model.graph.node
        if node.op_type == "MatMul" and len(node.input) == 2 and shapes.get(node.input[1]) in wanted
    ]


def _quantise_attention(source: Path, target: Path, intermediate_size: int, hidden_size: int) -> list[str]:
    """The ``onnx-int8`` copy: every MatMul but the feed-forward ones int8 per channel; those kept fp32."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    keep_fp32 = feed_forward_matmuls(onnx.load(str(source), load_external_data=False),
                                     intermediate_size, hidden_size)
    root = logging.getLogger()
    drop = _DropRootRecords()
    root.addFilter(drop)
    try:
        quantize_dynamic(
            str(source), str(target), per_channel=True, weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul"], nodes_to_exclude=keep_fp32,
        )
    finally:
        root.removeFilter(drop)
    return keep_fp32


def write_weight_int8(source: Path, target: Path) -> int:
    """Copy ``source`` with every weight MatMul's weight int8 per output channel; how many.

    Each constant ``[in, out]`` weight becomes symmetric int8 with one fp32 scale per
    output column, read through ``DequantizeLinear``: OpenVINO takes that pattern as
    compressed weights and, with dynamic quantisation, multiplies in int8.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(source))
    weights = {init.name: init for init in model.graph.initializer}
    done: dict[str, str] = {}
    nodes = []
    for node in model.graph.node:
        name = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else ""
        if name in weights and len(weights[name].dims) == 2:
            if name not in done:
                weight = numpy_helper.to_array(weights[name]).astype(np.float32)
                scale = np.abs(weight).max(axis=0) / 127.0
                scale[scale == 0] = 1.0
                quantised = np.clip(np.rint(weight / scale), -127, 127).astype(np.int8)
                model.graph.initializer.extend([
                    numpy_helper.from_array(quantised, f"{name}_int8"),
                    numpy_helper.from_array(scale.astype(np.float32), f"{name}_scale"),
                    numpy_helper.from_array(np.zeros(scale.shape, np.int8), f"{name}_zero"),
                ])
                done[name] = f"{name}_dequantised"
                nodes.append(helper.make_node(
                    "DequantizeLinear", [f"{name}_int8", f"{name}_scale", f"{name}_zero"], [done[name]],
                    axis=1, name=f"{name}_DequantizeLinear"))
            node.input[1] = done[name]
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {name for node in model.graph.node for name in node.input}
    kept = [init for init in model.graph.initializer if init.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    onnx.save(model, str(target))
    return len(done)


def _probe(model: Any, layout: ModelLayout, folder: Path, dim: int, *, token_types: bool,
           progress: Progress) -> dict[str, float]:
    """Each variant's worst cosine to the torch model on PROBE_TEXTS; raises if one is below its bar."""
    tokenizer: Any = model[0].tokenizer
    reference = model.encode(list(PROBE_TEXTS), convert_to_numpy=True, normalize_embeddings=True)
    probe_ids = list(tokenizer(list(PROBE_TEXTS), truncation=True,
                               max_length=layout.max_seq_length)["input_ids"])
    cosines: dict[str, float] = {}
    with progress.task(f"checking {layout.name}'s exports against torch", total=len(VARIANTS)) as advance:
        for name, variant in VARIANTS.items():
            runner = SentenceRunner(open_session(folder, name, threads=1), layout.pooling, dim)
            probe = runner.run(probe_ids, pad_id=int(tokenizer.pad_token_id or 0), token_types=token_types)
            cosine = float(np.sum(l2_normalise_rows(probe) * reference, axis=1).min())
            if cosine < variant.min_probe_cosine:
                raise RuntimeError(
                    f"the {name} export of {layout.name} disagrees with the torch model (cosine "
                    f"{cosine:.6f} < {variant.min_probe_cosine}); use backend torch"
                )
            cosines[name] = round(cosine, 6)
            advance(1)
    return cosines
