"""What one quality command works on: labelled data, its splits, and the encoder with its vectors."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sieve.encoders.base import TextEncoder
from sieve.progress import SILENT, Progress
from sieve.quality.datasets import LabelledData, load_data
from sieve.quality.scoring import text_of
from sieve.quality.splits import Splits, split_data

EvalSplit = str  # "test", "calibration", "train" or "all"
ENCODE_CHUNK = 1024  # texts per encoder call (so the progress advances)


def encode_texts(
    encoder: TextEncoder, texts: list[str], *, description: str, progress: Progress = SILENT
) -> np.ndarray:
    """``encoder.encode(texts)`` in chunks, reporting each chunk."""
    chunks: list[np.ndarray] = []
    with progress.task(description, total=len(texts)) as advance:
        for start in range(0, len(texts), ENCODE_CHUNK):
            chunk = texts[start:start + ENCODE_CHUNK]
            chunks.append(encoder.encode(chunk))
            advance(len(chunk))
    if not chunks:
        return encoder.encode([])
    return np.concatenate(chunks) if len(chunks) > 1 else chunks[0]


@dataclass
class Workbench:
    """Labelled data, its splits and a (cached) encoder, shared by one command's steps."""

    data: LabelledData
    splits: Splits
    encoder: TextEncoder
    _vectors: dict[str, np.ndarray] = field(default_factory=dict)

    def part(self, name: EvalSplit) -> LabelledData:
        """A split, or ``all`` of the data."""
        return self.data if name == "all" else self.splits.part(name)

    def vectors(self, name: EvalSplit, *, progress: Progress = SILENT) -> np.ndarray:
        """The split's text vectors (encoded once per command)."""
        if name not in self._vectors:
            texts = text_of(self.part(name))
            self._vectors[name] = encode_texts(
                self.encoder, texts, description=f"encoding the {name} split", progress=progress
            )
        return self._vectors[name]


def open_workbench(
    spec: str,
    encoder: TextEncoder,
    *,
    datasets_dir: Path,
    seed: int = 0,
    fractions: tuple[float, float, float] = (0.5, 0.25, 0.25),
    sample: int | None = None,
    source_splits: bool = True,
) -> Workbench:
    """Load ``spec`` (an adapter name or a JSONL path) and split it (``source_splits``: keep its own)."""
    data = load_data(spec, datasets_dir)
    splits = split_data(data, seed=seed, fractions=fractions, sample=sample, source_splits=source_splits)
    if sample is not None:
        data = data.with_examples(
            sorted(
                splits.train.examples + splits.calibration.examples + splits.test.examples,
                key=lambda ex: ex.id,
            )
        )
    return Workbench(data, splits, encoder)
