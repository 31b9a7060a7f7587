"""What ``eval``, ``fit`` and ``routes build`` share: the labelled-data options and the workbench."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from sieve.cli.base import fail
from sieve.progress import SILENT, Progress
from sieve.settings import get_settings

if TYPE_CHECKING:
    from sieve.quality.workbench import Workbench

DataArg = Annotated[
    str, typer.Argument(help="openai-moderation, clinc150, davidson, or a labelled JSONL file.")
]
SeedOpt = Annotated[int, typer.Option(help="Seed of the train/calibration/test split (and of k-means).")]
SampleOpt = Annotated[
    int | None, typer.Option(help="Keep at most this many examples per split (seeded, stratified).")
]
CacheOpt = Annotated[
    bool, typer.Option(help="Reuse embeddings cached on disk (settings embedding_cache_dir).")
]
HeadOpt = Annotated[bool, typer.Option(help="Use a route file's head (<file>.head.npz) when it has one.")]
ResplitOpt = Annotated[
    bool,
    typer.Option(
        help="Ignore the data set's own splits (clinc150's, davidson's): seeded, stratified, 50/25/25."
    ),
]
PlotsOpt = Annotated[bool, typer.Option(help="Write the PNG plots.")]


def open_bench(
    data: str, seed: int, sample: int | None, encoder: str, model: str | None, cache: bool, resplit: bool,
    backend: str = "auto", *, progress: Progress = SILENT,
) -> Workbench:
    """The labelled data set ``data``, split and sampled, with the text encoder the options name."""
    from sieve.encoders.base import TextEncoder
    from sieve.encoders.cache import CachedEncoder
    from sieve.encoders.factory import encoders_for
    from sieve.quality.datasets import DatasetError
    from sieve.quality.workbench import open_workbench
    from sieve.topology import EncoderSpec

    settings = get_settings()
    built, _ = encoders_for(EncoderSpec(kind=encoder, model=model, backend=backend),  # type: ignore[arg-type]
                            None, settings, progress=progress)
    assert built is not None
    text_encoder: TextEncoder = built
    if cache:
        text_encoder = CachedEncoder(text_encoder, settings.embedding_cache_dir)
    try:
        return open_workbench(data, text_encoder, datasets_dir=settings.datasets_dir, seed=seed,
                              sample=sample, source_splits=not resplit)
    except DatasetError as exc:
        fail(str(exc))


def labelled(paths: list[Path]) -> list[tuple[str, Path]]:
    """Each route file with its label in reports: its stem, or its path where stems repeat."""
    stems = [p.stem for p in paths]
    return [(p.stem if stems.count(p.stem) == 1 else str(p), p) for p in paths]
