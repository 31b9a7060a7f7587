"""The exported backends of the sentence-transformers text encoder: ONNX Runtime and OpenVINO.

On first use a model's transformer, with eager attention, is exported to ONNX
(``torch.onnx.export``, the torch.export-based exporter; inputs ``input_ids`` /
``attention_mask`` / ``token_type_ids``, output ``last_hidden_state``, dynamic batch
and sequence axes). Three model files are kept, run by four backends:

* ``onnx``: the fp32 export on ONNX Runtime;
* ``onnx-int8``: a copy made by ONNX Runtime's dynamic quantiser: the attention
  projections (query, key, value, output) in int8, per output channel, activations
  quantised per call; the feed-forward matmuls stay fp32;
* ``openvino``: the fp32 export compiled by OpenVINO's CPU plugin, in bf16 where the
  CPU has it (AVX512-BF16 or AMX; f32 elsewhere);
* ``openvino-int8``: a copy with every weight matmul int8 per output channel
  (:func:`write_weight_int8`), run by OpenVINO with dynamic quantisation: activations
  in int8 per token, in groups of ``OPENVINO_GROUP_SIZE`` channels.

fp32 ONNX computes what torch computes, faster on a small CPU: on the demo messages
(2 threads, batch 16) 617-661 sentences/s against torch's ~295, every row at cosine
>= 0.99999 to ``SentenceTransformer.encode`` (checked when the export is built, and
by the tests). Its vectors are torch's, so it keeps torch's encoder id
(``st:<model>``): route vectors and fitted thresholds carry over. ``openvino`` in
bf16 stays within cosine 0.9999 of torch on every row (0.99997 here, as torch fp16
on CUDA does) and keeps the id too; on this CPU (AMD EPYC, AVX512-BF16, 2 threads)
it ran 1.7x ``onnx`` on the demo messages and 1.9x on long moderation prompts, so
``auto`` picks it on machines without CUDA.

int8 through ONNX Runtime, measured over 500 demo and moderation texts (worst row's
cosine to fp32 / demo sentences/s on 1 thread, fp32 ONNX 239): everything int8
0.977 / 567; feed-forward down-projection fp32 0.981 / 380; both feed-forward matmuls
fp32 0.995 / 272. Only the last keeps every row at cosine >= 0.99, so it is the
recipe. ONNX Runtime scales activations per tensor, i.e. per *batch*, which is what
costs the accuracy: one outlier token coarsens every row's steps. OpenVINO's
per-token groups keep every matmul int8 at a worst row of 0.997 (group 64; 0.9975
at 32, 0.995 at 128, 0.989 per whole token) and run 1.8-1.9x ``onnx``. Each int8
recipe is a vector space of its own (``st:<model>+onnx-int8``, ``+openvino-int8``).
Weight-only int8 (ONNX Runtime's ``MatMulNBits``, 8 bits, any block size, int8
compute) measured no faster than fp32 ONNX here.

The result is cached on disk, one folder per model *content* and tool versions
(:func:`cache_key`), built in a temporary folder and renamed into place, under a
file lock: workers starting together export once and never see a half-written
model. A cached model needs neither torch nor transformers at run time: the
encoder is ONNX Runtime or OpenVINO plus the model's fast tokenizer
(``tokenizer.json``).

Pooling (mean over the attention mask, or CLS) follows the model's own pooling
config; rows are L2-normalised one by one.

A caveat of ``onnx-int8``: because of its per-batch activation scales a row depends
on its batch neighbours within the quantisation error (cosine to the row encoded
alone >= 0.996 on the demo messages; tested at >= 0.99), where the fp32 backends are
exact; ``openvino-int8``'s rows move by less than 0.001 (tested).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import numpy as np

from sieve.encoders.core import (
    PaddingStats,
    bundled_minilm_path,
    l2_normalise_rows,
    pad_token_ids,
    padding_stats,
    plan_batches,
    prefetched,
    st_model_name,
)
from sieve.settings import usable_cpus

# Part of the cache key and of nothing else: bump it when the export or the
# quantisation changes. A change that moves the vectors must also change the id suffix.
RECIPE = ("onnx/4: torch.onnx dynamo export of eager attention, kept as fp32; "
          "quantize_dynamic per-channel QInt8 MatMul, FFN fp32; "
          "every weight MatMul int8 per output channel behind DequantizeLinear (OpenVINO)")
# ONNX Runtime graph rewrites left out of every session: its SkipLayerNormalization
# kernel took 11 % of a long-text batch here, the Add + LayerNormalization it replaces
# 2-3 % (same outputs to float rounding).
DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)
DEFAULT_CACHE_DIR = Path(".sieve/cache/onnx")
Precision = Literal["fp32", "int8", "ov", "ov-int8"]


@dataclass(frozen=True, slots=True)
class Variant:
    """One exported backend: its topology name, model file, runtime, id suffix, probe bar."""

    backend: str
    file: str
    runtime: Literal["onnxruntime", "openvino"]
    # What it adds to the encoder id: fp32 computes torch's vectors, and so does bf16 to
    # within cosine 0.9999 (as torch fp16 on CUDA does); each int8 recipe is its own space.
    id_suffix: str
    # A freshly built model must reach this cosine to torch on PROBE_TEXTS, or it is not cached.
    min_probe_cosine: float


VARIANTS: dict[Precision, Variant] = {
    "fp32": Variant("onnx", "model.fp32.onnx", "onnxruntime", "", 0.9999),
    "int8": Variant("onnx-int8", "model.int8.onnx", "onnxruntime", "+onnx-int8", 0.98),
    # the fp32 export, in bf16 where the CPU has it
    "ov": Variant("openvino", "model.fp32.onnx", "openvino", "", 0.9999),
    "ov-int8": Variant("openvino-int8", "model.wq8.onnx", "openvino", "+openvino-int8", 0.98),
}
MODEL_FILES: dict[Precision, str] = {precision: v.file for precision, v in VARIANTS.items()}
BACKEND_PRECISIONS: dict[str, Precision] = {v.backend: precision for precision, v in VARIANTS.items()}
# openvino-int8 quantises activations per token in groups of this many channels (so rows
# hardly depend on their batch); 64 measured fastest here, 32 closest to fp32.
OPENVINO_GROUP_SIZE = 64
META_FILE = "meta.json"
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

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ModelLayout:
    """What the ONNX path needs to know about a sentence-transformers model folder."""

    directory: Path
    name: str
    max_seq_length: int
    pooling: str  # "mean" or "cls"


def resolve_model_dir(model: str | None) -> tuple[Path, str]:
    """A model's local folder and short name: the bundled MiniLM, a local path, or a hub name."""
    name = st_model_name(model)
    if model is None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return Path(bundled_minilm_path()), name
    path = Path(model)
    if path.is_dir():
        return path, name
    from huggingface_hub import snapshot_download

    repo = model if "/" in model else f"sentence-transformers/{model}"
    return Path(snapshot_download(repo)), name


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def read_layout(directory: Path, name: str, max_seq_length: int | None = None) -> ModelLayout:
    """Check that the folder is a model this backend can run (Transformer, Pooling, Normalize)."""
    modules_file = directory / "modules.json"
    if not modules_file.is_file():
        raise ValueError(
            f"{directory}: no modules.json; the ONNX backends run sentence-transformers models"
        )
    if not (directory / "tokenizer.json").is_file():
        raise ValueError(f"{directory}: no tokenizer.json; the ONNX backends need a fast tokenizer")
    pooling = None
    for module in _read_json(modules_file):
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        if kind == "Pooling":
            pooling = _pooling_mode(_read_json(directory / module.get("path", "") / "config.json"))
        elif kind not in ("Transformer", "Normalize"):
            raise ValueError(
                f"{directory}: module {kind!r} is not supported by the ONNX backends "
                "(Transformer, Pooling and Normalize are); use backend torch"
            )
    if pooling is None:
        raise ValueError(f"{directory}: no Pooling module; the ONNX backends need one")
    if max_seq_length is None:
        st_config = directory / "sentence_bert_config.json"
        max_seq_length = _read_json(st_config).get("max_seq_length") if st_config.is_file() else None
    positions = _read_json(directory / "config.json").get("max_position_embeddings")
    if max_seq_length is None:
        max_seq_length = positions or 512
    if positions:
        max_seq_length = min(int(max_seq_length), int(positions))
    return ModelLayout(directory=directory, name=name, max_seq_length=int(max_seq_length), pooling=pooling)


def fast_tokenizer(layout: ModelLayout) -> Any:
    """The model's fast tokenizer as these backends run it: unpadded, cut at ``max_seq_length``."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(layout.directory / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(layout.max_seq_length)
    return tokenizer


def _pooling_mode(config: dict[str, Any]) -> str:
    mode = config.get("pooling_mode")
    if isinstance(mode, str):
        chosen = {mode.removeprefix("pooling_mode_").removesuffix("_tokens").removesuffix("_token")}
    else:
        chosen = {key.removeprefix("pooling_mode_").removesuffix("_tokens").removesuffix("_token")
                  for key, value in config.items() if key.startswith("pooling_mode_") and value is True}
    if chosen == {"mean"} or chosen == {"cls"}:
        return chosen.pop()
    raise ValueError(f"pooling {sorted(chosen)} is not supported by the ONNX backends (mean or cls is)")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def cache_key(directory: Path) -> str:
    """SHA-256 over the recipe, the tool versions and every file of the model folder (path and content)."""
    digest = hashlib.sha256(RECIPE.encode())
    for package in KEY_PACKAGES:
        digest.update(f"\n{package}=={_version(package)}".encode())
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and ".git" not in p.parts):
        with path.open("rb") as handle:
            file_digest = hashlib.file_digest(handle, "sha256").hexdigest()
        digest.update(f"\n{path.relative_to(directory).as_posix()}:{file_digest}".encode())
    return digest.hexdigest()


def cache_folder(cache_dir: Path, layout: ModelLayout) -> Path:
    """Where the model's ONNX exports live: ``<cache_dir>/<name>-<key prefix>``."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", layout.name)[:60]
    return Path(cache_dir) / f"{readable}-{cache_key(layout.directory)[:20]}"


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def publish_folder(built: Path, final: Path) -> bool:
    """Rename a complete folder into place; False (and ``built`` removed) if one is already there."""
    try:
        os.rename(built, final)
        return True
    except OSError:
        if (final / META_FILE).is_file():
            shutil.rmtree(built, ignore_errors=True)
            return False
        raise


def ensure_onnx_models(layout: ModelLayout, cache_dir: str | Path) -> tuple[Path, bool]:
    """The cached ONNX models' folder, exported first if missing; and whether this call built it."""
    final = cache_folder(Path(cache_dir), layout)
    if (final / META_FILE).is_file():
        return final, False
    final.parent.mkdir(parents=True, exist_ok=True)
    # One builder per model at a time (others wait, then find it built); the rename
    # below keeps the folder all-or-nothing even where the lock does not reach (flock
    # does not span hosts on some network file systems).
    with _file_lock(final.parent / f".{final.name}.lock"):
        if (final / META_FILE).is_file():
            return final, False
        if final.exists():  # a folder without meta: left by hand or by an older layout
            shutil.rmtree(final)
        building = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
        try:
            meta = export_models(layout, building)
            (building / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
            building.chmod(0o755)  # mkdtemp's 0700 would keep other users' workers out
            return final, publish_folder(building, final)
        finally:
            shutil.rmtree(building, ignore_errors=True)


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


def export_models(layout: ModelLayout, folder: Path) -> dict[str, Any]:
    """Export the model's transformer to ONNX (fp32), write its two int8 copies; the metadata."""
    import onnx
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from sentence_transformers import SentenceTransformer

    started = time.perf_counter()
    # Eager attention, not torch's scaled_dot_product_attention: the exporter guards SDPA's
    # softmax with IsNaN + Where (for fully masked rows, which mean pooling never has),
    # and that guard over every (batch, head, token, token) cell was 17-19 % of a
    # long-text batch. Same vectors either way (cosine 1.0 to torch).
    model = SentenceTransformer(str(layout.directory), device="cpu",
                                model_kwargs={"attn_implementation": "eager"})
    model.max_seq_length = layout.max_seq_length
    model.eval()
    first: Any = model[0]  # the Transformer module (typed loosely by sentence-transformers)
    transformer: Any = first.auto_model.eval()
    tokenizer: Any = first.tokenizer
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
    fp32_file = folder / MODEL_FILES["fp32"]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper, tuple(features[name] for name in names), str(fp32_file),
            input_names=names, output_names=["last_hidden_state"],
            dynamic_shapes={name: {0: batch, 1: sequence} for name in names},
            dynamo=True, external_data=False, verbose=False,
        )
    exported = time.perf_counter()
    config = transformer.config
    keep_fp32 = feed_forward_matmuls(onnx.load(str(fp32_file), load_external_data=False),
                                     int(config.intermediate_size), int(config.hidden_size))
    root = logging.getLogger()
    drop = _DropRootRecords()
    root.addFilter(drop)
    try:
        quantize_dynamic(
            str(fp32_file), str(folder / MODEL_FILES["int8"]), per_channel=True, weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul"], nodes_to_exclude=keep_fp32,
        )
    finally:
        root.removeFilter(drop)
    write_weight_int8(fp32_file, folder / MODEL_FILES["ov-int8"])
    quantised = time.perf_counter()

    # Every built model must agree with the torch model, or none is cached.
    dim = int(model.get_embedding_dimension() or config.hidden_size)
    reference = model.encode(list(PROBE_TEXTS), convert_to_numpy=True, normalize_embeddings=True)
    probe_ids = list(tokenizer(list(PROBE_TEXTS), truncation=True,
                               max_length=layout.max_seq_length)["input_ids"])
    probe_cosines: dict[str, float] = {}
    for precision, variant in VARIANTS.items():
        probe = _Runner(open_session(folder, precision, threads=1), layout.pooling, dim).run(
            probe_ids, pad_id=int(tokenizer.pad_token_id or 0), token_types="token_type_ids" in names)
        cosine = float(np.sum(l2_normalise_rows(probe) * reference, axis=1).min())
        if cosine < variant.min_probe_cosine:
            raise RuntimeError(
                f"{precision} ONNX export of {layout.name} disagrees with the torch model (cosine "
                f"{cosine:.6f} < {variant.min_probe_cosine}); use backend torch"
            )
        probe_cosines[precision] = round(cosine, 6)
    return {
        "model": layout.name,
        "source": str(layout.directory),
        "recipe": RECIPE,
        "versions": {package: _version(package) for package in KEY_PACKAGES},
        "inputs": names,
        "dim": dim,
        "pooling": layout.pooling,
        "fp32_matmuls": keep_fp32,
        "probe_min_cosine": probe_cosines,
        "export_s": round(exported - started, 2),
        "quantise_s": round(quantised - exported, 2),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _session(path: Path, threads: int, optimized_to: Path | None = None) -> Any:
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


class _OrtSession:
    """An ONNX Runtime session as the runner calls it: input names, feeds -> last hidden state."""

    def __init__(self, path: Path, threads: int) -> None:
        self.session = _session(path, threads)
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(self.session.run(["last_hidden_state"], feeds)[0])


def openvino_config(precision: Precision, threads: int, capabilities: list[str]) -> dict[str, Any]:
    """OpenVINO CPU plugin settings: one stream of ``threads`` threads, not pinned to cores.

    ``ov`` computes in bf16 where the CPU has it (f32 otherwise); ``ov-int8`` in f32 with
    int8 weights and activations quantised per token group. The plugin pins its threads
    by default; a worker shares its cores with its own event loop and, scaled out, with
    other workers, so the OS places them (unpinned measured as fast here).
    """
    config: dict[str, Any] = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1,
                              "PERFORMANCE_HINT": "LATENCY", "ENABLE_CPU_PINNING": False}
    if precision == "ov":
        config["INFERENCE_PRECISION_HINT"] = "bf16" if "BF16" in capabilities else "f32"
    else:
        config["INFERENCE_PRECISION_HINT"] = "f32"
        config["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = OPENVINO_GROUP_SIZE
    return config


class _OpenVinoSession:
    """The exported model compiled by OpenVINO's CPU plugin (one infer request, dynamic shapes)."""

    def __init__(self, path: Path, precision: Precision, threads: int) -> None:
        import openvino as ov

        core = ov.Core()
        self.config = openvino_config(precision, threads,
                                      list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")))
        compiled = core.compile_model(core.read_model(str(path)), "CPU", self.config)
        self.inputs = [port.get_any_name() for port in compiled.inputs]
        self._request = compiled.create_infer_request()

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return np.array(self._request.infer(feeds)[0])  # a copy: the request reuses its buffer


def open_session(folder: Path, precision: Precision, threads: int) -> _OrtSession | _OpenVinoSession:
    """The runtime that runs ``precision``'s model file from an export folder."""
    path = folder / MODEL_FILES[precision]
    if VARIANTS[precision].runtime == "openvino":
        return _OpenVinoSession(path, precision, threads)
    return _OrtSession(path, threads)


class _Runner:
    """Runs padded batches through a session and pools the last hidden state."""

    def __init__(self, session: _OrtSession | _OpenVinoSession, pooling: str, dim: int) -> None:
        self.session = session
        self.pooling = pooling
        self.dim = dim
        self.inputs = session.inputs

    def pool(self, hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
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


class OnnxEncoder:
    """A sentence-transformers model exported to ONNX, run on the CPU by ONNX Runtime or OpenVINO.

    Same model and tokenizer as :class:`~sieve.encoders.core.SentenceTransformerEncoder`.
    ``precision`` is the backend's variant (``BACKEND_PRECISIONS``): ``"fp32"``
    (backend ``onnx``) and ``"ov"`` (``openvino``) compute torch's vectors and have
    its ``id`` (``st:<model>``); ``"int8"`` (``onnx-int8``) and ``"ov-int8"``
    (``openvino-int8``) are vector spaces of their own. ``threads`` is the session's
    intra-op thread count (the worker's ``torch_threads``; unset: the CPUs
    this process may use);
    ``cache_dir`` holds the exported models. ``built`` says whether this
    construction exported it (False: taken from the cache); ``build_s`` is how
    long getting it took. Texts are tokenised once per call, sorted by token
    length and run in batches of ``batch_size`` (``last_padding`` counts the
    tokens), rows returned in the caller's order.
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        precision: Precision = "int8",
        device: str = "auto",
        batch_size: int = 64,
        max_seq_length: int | None = None,
        threads: int | None = None,
        cache_dir: str | Path = DEFAULT_CACHE_DIR,
        bucket_by_length: bool = True,
    ) -> None:
        if device not in ("auto", "cpu"):
            raise ValueError(f"the ONNX backends run on the CPU, not {device!r}; use backend torch or auto")
        if precision not in VARIANTS:
            raise ValueError(f"precision {precision!r}: one of {', '.join(VARIANTS)}")
        self.device = "cpu"
        self.precision: Precision = precision
        directory, name = resolve_model_dir(model)
        self.layout = read_layout(directory, name, max_seq_length)
        started = time.perf_counter()
        self.folder, self.built = ensure_onnx_models(self.layout, cache_dir)
        self.build_s = time.perf_counter() - started
        self.meta: dict[str, Any] = _read_json(self.folder / META_FILE)
        self._tokenizer = fast_tokenizer(self.layout)
        padding = _read_json(directory / "tokenizer.json").get("padding") or {}
        self._pad_id = int(padding.get("pad_id", 0))
        self.threads = usable_cpus() if threads is None else threads
        session = open_session(self.folder, precision, self.threads)
        self._runner = _Runner(session, self.layout.pooling, int(self.meta["dim"]))
        self._token_types = "token_type_ids" in self._runner.inputs
        self.batch_size = batch_size
        self.bucket_by_length = bucket_by_length
        self.last_padding = PaddingStats()
        self._lock = threading.Lock()

    @property
    def id(self) -> str:
        """``st:all-MiniLM-L6-v2`` (fp32: torch's vectors) or ``st:all-MiniLM-L6-v2+onnx-int8``."""
        return f"st:{self.layout.name}{VARIANTS[self.precision].id_suffix}"

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
