"""``sieve routes ...``: check a route file, sync it to the route store, build one from labelled data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sieve.cli.base import BackendOpt, EncoderKind, ModelOpt, QuietOpt, command_line, console, fail
from sieve.cli.progress import progress_for
from sieve.cli.workbench import CacheOpt, DataArg, ResplitOpt, SampleOpt, SeedOpt, open_bench
from sieve.settings import get_settings

app = typer.Typer(help="Route sets: check and sync to the route store.", no_args_is_help=True)


@app.command("check")
def routes_check(path: Path) -> None:
    """Validate a route file and print its routes."""
    from sieve.routeset import RouteSetError, load_route_set

    try:
        route_set = load_route_set(path)
    except RouteSetError as exc:
        fail(str(exc))
    console.print(f"{route_set.name} version {route_set.version}: {len(route_set.routes)} routes")
    for route in route_set.routes:
        console.print(
            f"  {route.name:24} -> {route.outcome:16} {len(route.utterances)} utterances, "
            f"{len(route.images)} images, {len(route.prompts)} prompts"
        )


@app.command("sync")
def routes_sync(
    path: Path,
    encoder: EncoderKind = "sentence-transformers",
    model: ModelOpt = None,
    backend: BackendOpt = "auto",
    image_model: Annotated[
        str | None, typer.Option(help="open_clip model for image examples and prompts, e.g. ViT-B-32 "
                                      "or local-dir:/path; default: the topology's, else none.")
    ] = None,
    image_pretrained: Annotated[str | None, typer.Option(help="open_clip pretrained tag.")] = None,
    topology_path: Annotated[
        Path | None, typer.Option("--topology", help="Take the encoders from this topology.")
    ] = None,
    quiet: QuietOpt = False,
) -> None:
    """Store a route file's version complete in the route store, then make it the active one.

    Only examples the active version lacks are encoded; earlier versions stay stored.

    Utterances go to the text encoder's collection; example images and CLIP prompts
    to the image encoder's, when one is given (directly or by a topology).
    """
    from sieve.encoders.factory import encoders_for
    from sieve.routeset import RouteSetError, load_route_set
    from sieve.store.qdrant import RouteStore, RouteStoreError
    from sieve.topology import EncoderSpec, ImageEncoderSpec, TopologyError, load_topology

    settings = get_settings()
    progress = progress_for(console, quiet=quiet)
    try:
        route_set = load_route_set(path)
        text_spec = EncoderSpec(kind=encoder, model=model, backend=backend)  # type: ignore[arg-type]
        image_spec = None
        if topology_path is not None:
            topology = load_topology(topology_path)
            text_spec, image_spec = topology.encoder, topology.image_encoder
        if image_model is not None:
            image_spec = ImageEncoderSpec(model=image_model, pretrained=image_pretrained)
        if route_set.routes_in("image") and image_spec is None:
            fail(f"{path} has image examples or prompts: give --image-model or --topology")
        built = encoders_for(text_spec if route_set.routes_in("text") else None,
                             image_spec if route_set.routes_in("image") else None, settings,
                             progress=progress)
        encoders = [encoder for encoder in built if encoder is not None]
        store = RouteStore(settings.qdrant)
        reports = [store.sync(route_set, text_or_image, progress=progress) for text_or_image in encoders]
    except (RouteSetError, RouteStoreError, TopologyError, ValueError) as exc:
        fail(str(exc))
    for report in reports:
        state = "already complete" if report.written == 0 else f"{report.written} points written"
        console.print(
            f"synced {report.route_set} {report.previous_version or '(new)'} -> {report.version} "
            f"in {report.collection}: +{report.added} ~{report.updated} -{report.deleted} "
            f"={report.unchanged} ({report.points} points, {state}, {report.encoded} encoded)"
        )


@app.command("build")
def routes_build(
    data: DataArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="The route file to write.")],
    name: Annotated[str | None, typer.Option(help="Route set name (default: <data>-built).")] = None,
    max_examples: Annotated[int, typer.Option(help="At most this many examples per route.")] = 50,
    default_outcome: Annotated[
        str | None, typer.Option(help="Outcome of events far from every route (default: the data's).")
    ] = None,
    head: Annotated[bool, typer.Option(help="Also train a logistic-regression head, saved as "
                                            "<out>.head.npz.")] = False,
    head_weight: Annotated[float, typer.Option(help="Weight of the head's probability in a route's "
                                                   "score.")] = 0.5,
    head_c: Annotated[float, typer.Option(help="Inverse regularisation strength of the head.")] = 1.0,
    seed: SeedOpt = 0,
    sample: SampleOpt = None,
    resplit: ResplitOpt = False,
    cache: CacheOpt = True,
    encoder: EncoderKind = "sentence-transformers",
    model: ModelOpt = None,
    backend: BackendOpt = "auto",
    quiet: QuietOpt = False,
) -> None:
    """Build a route file from the training split of labelled data: diverse examples per route."""
    from sieve.quality.runner import run_build

    if max_examples < 1:
        fail("--max-examples must be at least 1")
    if not 0.0 <= head_weight <= 1.0:
        fail("--head-weight must be within [0, 1]")
    progress = progress_for(console, quiet=quiet)
    bench = open_bench(data, seed, sample, encoder, model, cache, resplit, backend, progress=progress)
    try:
        result = run_build(bench, out, name=name, max_examples=max_examples, seed=seed,
                           default_outcome=default_outcome, head=head, head_c=head_c,
                           head_weight=head_weight, command=command_line(), progress=progress)
    except ValueError as exc:
        fail(str(exc))
    kept = sum(result.kept.values())
    console.print(
        f"built {result.route_set.name}: {len(result.route_set.routes)} routes, {kept} examples from "
        f"{len(bench.splits.train)} training examples -> {out}"
        + (" (+ head)" if result.head is not None else "")
    )
