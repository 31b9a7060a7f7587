"""``sieve routes ...``: check a route file, sync it to the route store, build one from labelled data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sieve.cli.base import BackendOpt, EncoderKind, ModelOpt, QuietOpt, command_line, console, fail
from sieve.cli.learn import routes_learn
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
    path: Annotated[Path | None, typer.Argument(help="Route file; default: the --topology's own.")] = None,
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
    activate: Annotated[bool, typer.Option(
        "--activate/--no-activate", help="Make the version active (default), or only store it as a "
        "candidate for `sieve routes promote`.")] = True,
    quiet: QuietOpt = False,
) -> None:
    """Store a route file's version complete in the route store, then make it the active one.

    Only examples the active version lacks are encoded; earlier versions stay stored.

    Utterances go to the text encoder's collection; example images and CLIP prompts
    to the image encoder's, when one is given (directly or by a topology). With
    ``--topology``, its tenants' route sets are synced too (docs/tenants.md).
    """
    from sieve.encoders.factory import encoders_for
    from sieve.routeset import RouteSetError, load_route_set
    from sieve.store.qdrant import RouteStore, RouteStoreError
    from sieve.topology import (
        EncoderSpec,
        ImageEncoderSpec,
        TopologyError,
        load_tenant_route_sets,
        load_topology,
        load_topology_route_set,
    )

    settings = get_settings()
    progress = progress_for(console, quiet=quiet)
    if path is None and topology_path is None:
        fail("give a route file, or --topology to sync the topology's route sets")
    try:
        route_sets = [load_route_set(path)] if path is not None else []
        text_spec = EncoderSpec(kind=encoder, model=model, backend=backend)  # type: ignore[arg-type]
        image_spec = None
        if topology_path is not None:
            topology = load_topology(topology_path)
            text_spec, image_spec = topology.encoder, topology.image_encoder
            if path is None:
                route_sets.append(load_topology_route_set(topology))
            names = {route_set.name for route_set in route_sets}
            route_sets += [s for s in load_tenant_route_sets(topology) if s.name not in names]
        if image_model is not None:
            image_spec = ImageEncoderSpec(model=image_model, pretrained=image_pretrained)
        for route_set in route_sets:
            if route_set.routes_in("image") and image_spec is None:
                fail(f"route set {route_set.name} has image examples or prompts: give --image-model or "
                     "--topology")
        built = encoders_for(text_spec if any(s.routes_in("text") for s in route_sets) else None,
                             image_spec if any(s.routes_in("image") for s in route_sets) else None, settings,
                             progress=progress)
        store = RouteStore(settings.qdrant)
        reports = [
            store.sync(route_set, text_or_image, progress=progress, activate=activate)
            for route_set in route_sets
            for space, text_or_image in zip(("text", "image"), built, strict=True)
            if text_or_image is not None and route_set.routes_in(space)  # type: ignore[arg-type]
        ]
    except (RouteSetError, RouteStoreError, TopologyError, ValueError) as exc:
        fail(str(exc))
    for report in reports:
        state = "already complete" if report.written == 0 else f"{report.written} points written"
        console.print(
            f"synced {report.route_set} {report.previous_version or '(new)'} -> {report.version} "
            f"in {report.collection}: +{report.added} ~{report.updated} -{report.deleted} "
            f"={report.unchanged} ({report.points} points, {state}, {report.encoded} encoded)"
            + ("" if activate else "; stored as a candidate, not active")
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
    head_words: Annotated[bool, typer.Option(help="The head also scores the text's words and word pairs "
                                                  "(TF-IDF), not only its embedding.")] = False,
    lists: Annotated[list[Path] | None, typer.Option(
        "--lists", help="A list file the built set names (repeatable), e.g. routes/lists/profanity.yaml; "
        "its route must be one the data builds.")] = None,
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
    if head_words and not head:
        fail("--head-words needs --head")
    progress = progress_for(console, quiet=quiet)
    bench = open_bench(data, seed, sample, encoder, model, cache, resplit, backend, progress=progress)
    try:
        result = run_build(bench, out, name=name, max_examples=max_examples, seed=seed,
                           default_outcome=default_outcome, head=head, head_c=head_c,
                           head_weight=head_weight, head_words=head_words, lists=lists or (),
                           command=command_line(),
                           progress=progress)
    except ValueError as exc:
        fail(str(exc))
    kept = sum(result.kept.values())
    console.print(
        f"built {result.route_set.name}: {len(result.route_set.routes)} routes, {kept} examples from "
        f"{len(bench.splits.train)} training examples -> {out}"
        + (" (+ head)" if result.head is not None else "")
    )


app.command("learn")(routes_learn)  # in its own module: sieve.cli.learn

# --------------------------------------------------------------------------- versions

TopologyArg = Annotated[Path, typer.Option("--topology", help="The topology whose encoders name the space.")]
SpaceOpt = Annotated[str, typer.Option(help="The encoder space: text or image.")]


def _space_of(topology_path: Path, space: str) -> str:
    """The encoder id of a topology's space (no model is loaded)."""
    from sieve.topology import TopologyError, load_topology
    from sieve.worker.compute import encoder_ids

    try:
        ids = encoder_ids(load_topology(topology_path))
    except TopologyError as exc:
        fail(str(exc))
    if space not in ids:
        fail(f"the topology has no {space} encoder")
    return ids[space]


@app.command("versions")
def routes_versions(name: Annotated[str, typer.Argument(help="The route set's name.")],
                    topology_path: TopologyArg, space: SpaceOpt = "text") -> None:
    """List a route set's stored versions (the active one marked) and its promotion log."""
    from sieve.store.qdrant import RouteStore, RouteStoreError

    encoder_id = _space_of(topology_path, space)
    store = RouteStore(get_settings().qdrant)
    try:
        versions, log = store.list_versions(name, encoder_id), store.promotions(name, encoder_id)
    except RouteStoreError as exc:
        fail(str(exc))
    for stored in versions:
        console.print(f"{'*' if stored.active else ' '} {stored.version}  {stored.points} points, "
                      f"synced {stored.synced_at}")
    for entry in log:
        console.print(f"  {entry['at']}: {entry.get('previous') or '(none)'} -> {entry['version']} "
                      f"{entry.get('evidence') or {}}")


@app.command("promote")
def routes_promote(
    name: Annotated[str, typer.Argument(help="The route set's name.")],
    version: Annotated[str, typer.Argument(help="The stored version to make active.")],
    topology_path: TopologyArg,
    space: SpaceOpt = "text",
    reason: Annotated[str | None, typer.Option(help="Why: kept in the promotion log.")] = None,
    evidence: Annotated[Path | None, typer.Option(
        help="A JSON file of evidence (e.g. an eval comparison) kept in the promotion log.")] = None,
    if_better: Annotated[bool, typer.Option(
        "--if-better", help="Promote only if the evidence (`routes learn`'s .learn.json) favours the "
        "version by the margins below; otherwise change nothing and exit 1.")] = False,
    accuracy_margin: Annotated[float, typer.Option(
        help="--if-better: automatic accuracy at least the active one's plus this.")] = 0.0,
    auto_margin: Annotated[float, typer.Option(
        help="--if-better: automatic share at least the active one's plus this.")] = 0.0,
    min_accuracy: Annotated[float | None, typer.Option(
        help="--if-better: the Wilson lower bound of its automatic accuracy at least this.")] = None,
    min_added_accuracy: Annotated[float | None, typer.Option(
        help="--if-better: the decisions the versions trade judged instead (through the evidence's label "
        "accuracy): those it adds at least this accurate, those it gives up less.")] = None,
    shadow_metrics: Annotated[list[str] | None, typer.Option(
        help="--if-better: a worker's /metrics URL (repeat for each worker) shadowing VERSION: its live "
        "figures must pass too.")] = None,
    min_shadow_events: Annotated[int, typer.Option(
        help="--shadow-metrics: events shadowed, at least.")] = 500,
    min_agreement: Annotated[float, typer.Option(
        help="--shadow-metrics: equivalent (same outcome; same route unless the default) on the events "
        "both versions decided automatically, at least.")] = 0.95,
    shadow_auto_margin: Annotated[float, typer.Option(
        help="--shadow-metrics: live automatic share at least the active one's plus this.")] = 0.0,
) -> None:
    """Make a stored version the active one: workers switch to it between batches."""
    import json

    from sieve.quality.promotion import (
        EvidenceError,
        Margins,
        ShadowMargins,
        promotion_checks,
        scrape,
        shadow_checks,
        shadow_counts,
    )
    from sieve.store.qdrant import RouteStore, RouteStoreError

    encoder_id = _space_of(topology_path, space)
    proof: dict[str, object] = {"via": "promote"}
    if reason:
        proof["reason"] = reason
    if if_better and evidence is None:
        fail("--if-better needs --evidence (the .learn.json that `sieve routes learn` wrote)")
    if evidence is not None:
        try:
            proof["evidence"] = json.loads(evidence.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            fail(f"{evidence}: not readable JSON: {exc}")
    if if_better:
        margins = Margins(accuracy_margin, auto_margin, min_accuracy, min_added_accuracy)
        try:
            checks = promotion_checks(proof["evidence"], version, margins)  # type: ignore[arg-type]
            if shadow_metrics:
                shadow = ShadowMargins(min_shadow_events, min_agreement, shadow_auto_margin)
                counts = shadow_counts(scrape(shadow_metrics), version)
                checks += shadow_checks(counts, shadow)
                proof["shadow"] = {"metrics": shadow_metrics, "counts": counts, "margins": vars(shadow)}
        except EvidenceError as exc:
            fail(f"{evidence if not shadow_metrics else 'evidence'}: {exc}")
        for check in checks:
            console.print(f"  {'ok ' if check.passed else 'NO '} {check.name}: {check.detail}")
        if not all(check.passed for check in checks):
            console.print(f"{name}: {version} not promoted: the evidence does not favour it by the margins")
            raise typer.Exit(1)
        proof["checks"] = [{"name": c.name, "passed": c.passed, "detail": c.detail} for c in checks]
        proof["margins"] = {"accuracy": accuracy_margin, "auto": auto_margin, "min_accuracy": min_accuracy,
                            "min_added_accuracy": min_added_accuracy}
    try:
        previous = RouteStore(get_settings().qdrant).set_active(name, encoder_id, version, proof)
    except RouteStoreError as exc:
        fail(str(exc))
    console.print(f"{name}: {previous or '(none)'} -> {version} is active ({encoder_id})")


@app.command("rollback")
def routes_rollback(
    name: Annotated[str, typer.Argument(help="The route set's name.")],
    topology_path: TopologyArg,
    space: SpaceOpt = "text",
    reason: Annotated[str | None, typer.Option(help="Why: kept in the promotion log.")] = None,
) -> None:
    """Make the version that was active before the current one active again."""
    from sieve.store.qdrant import RouteStore, RouteStoreError

    encoder_id = _space_of(topology_path, space)
    try:
        store = RouteStore(get_settings().qdrant)
        current = store.current_version(name, encoder_id)
        proof = {"via": "rollback", **({"reason": reason} if reason else {})}
        version = store.rollback(name, encoder_id, proof)
    except RouteStoreError as exc:
        fail(str(exc))
    console.print(f"{name}: rolled back {current} -> {version} ({encoder_id})")
