"""Encoders from topology specs and settings: the one place settings become encoder arguments.

A text spec's ``backend`` picks torch, ONNX Runtime or OpenVINO; ``auto`` is torch on
CUDA (fp16) and OpenVINO on the CPU (bf16 where the CPU has it, f32 elsewhere): one
vector space (torch's encoder id), the fastest way to compute it on each.
"""

from __future__ import annotations

from pathlib import Path

from sieve.encoders.base import ImageEncoder, TextEncoder, resolve_device
from sieve.encoders.clip import OpenClipEncoder
from sieve.encoders.onnx_encoder import DEFAULT_CACHE_DIR, OnnxEncoder
from sieve.encoders.onnx_variants import VARIANTS
from sieve.encoders.sentence_transformers import SentenceTransformerEncoder
from sieve.encoders.st_model import st_model_name
from sieve.encoders.trivial import TrivialEncoder
from sieve.progress import SILENT, Progress
from sieve.settings import Settings
from sieve.topology import EncoderSpec, ImageEncoderSpec


def text_encoder_id(spec: EncoderSpec) -> str:
    """The id of the vector space :func:`build_text_encoder` would compute, without loading a model.

    The device does not enter it: torch (CPU or CUDA), ``onnx``, ``openvino`` and ``auto``
    compute one space; ``onnx-int8`` and ``openvino-int8`` each their own.
    """
    if spec.kind == "trivial":
        return TrivialEncoder().id
    name, backend = st_model_name(spec.model), spec.backend
    if backend == "auto" or backend == "torch":
        return f"st:{name}"
    return f"st:{name}{VARIANTS[backend].id_suffix}"


def build_text_encoder(
    spec: EncoderSpec,
    *,
    device: str = "auto",
    torch_threads: int | None = None,
    onnx_cache_dir: str | Path | None = None,
    progress: Progress = SILENT,
) -> TextEncoder:
    """The encoder a topology asks for; ``spec.backend`` picks torch, ONNX Runtime or OpenVINO.

    ``onnx_cache_dir`` keeps the exported models (settings ``onnx_cache_dir``), and
    ``progress`` hears about exporting one on first use; ``torch_threads`` also sets the
    exported backends' threads.
    """
    if spec.kind == "trivial":
        return TrivialEncoder()
    backend = spec.backend
    if backend == "auto":
        backend = "openvino" if resolve_device(device) == "cpu" else "torch"
    if backend != "torch":
        return OnnxEncoder(
            spec.model,
            variant=backend,
            device=device,
            batch_size=spec.batch_size,
            max_seq_length=spec.max_seq_length,
            threads=torch_threads,
            cache_dir=DEFAULT_CACHE_DIR if onnx_cache_dir is None else onnx_cache_dir,
            progress=progress,
        )
    return SentenceTransformerEncoder(
        spec.model,
        device=device,
        batch_size=spec.batch_size,
        max_seq_length=spec.max_seq_length,
        torch_threads=torch_threads,
    )


def build_image_encoder(
    spec: ImageEncoderSpec, *, device: str = "auto", torch_threads: int | None = None
) -> ImageEncoder:
    """The image encoder a topology asks for."""
    return OpenClipEncoder(
        spec.model, spec.pretrained, device=device, batch_size=spec.batch_size, torch_threads=torch_threads
    )


def encoders_for(
    text_spec: EncoderSpec | None, image_spec: ImageEncoderSpec | None, settings: Settings,
    *, progress: Progress = SILENT,
) -> tuple[TextEncoder | None, ImageEncoder | None]:
    """The encoders for these specs, on the device, threads and export cache the settings name.

    ``progress`` hears about the long step of a first use: exporting the text model
    for an ONNX Runtime or OpenVINO backend (``auto`` on a machine without CUDA).
    """
    text = image = None
    if text_spec is not None:
        text = build_text_encoder(text_spec, device=settings.device, torch_threads=settings.torch_threads,
                                  onnx_cache_dir=settings.onnx_cache_dir, progress=progress)
    if image_spec is not None:
        image = build_image_encoder(image_spec, device=settings.device, torch_threads=settings.torch_threads)
    return text, image
