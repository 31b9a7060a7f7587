"""The ``sieve`` command line."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console

from sieve.routeset import RouteSet
from sieve.settings import get_settings
from sieve.topology import Topology

app = typer.Typer(help="Sieve: route and moderate text events by meaning, at stream speed.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
routes_app = typer.Typer(help="Route sets: check and sync to the route store.", no_args_is_help=True)
dead_app = typer.Typer(help="The dead-letter topic.", no_args_is_help=True)
schemas_app = typer.Typer(help="JSON Schema files of the wire contracts.", no_args_is_help=True)
topics_app = typer.Typer(help="Kafka topics of a topology.", no_args_is_help=True)
app.add_typer(routes_app, name="routes")
app.add_typer(dead_app, name="dead-letters")
app.add_typer(schemas_app, name="schemas")
app.add_typer(topics_app, name="topics")

console = Console(stderr=True)

EncoderKind = Annotated[
    str, typer.Option("--encoder", help="sentence-transformers (default) or trivial (no model).")
]
ModelOpt = Annotated[
    str | None, typer.Option("--model", help="sentence-transformers model path; default: bundled MiniLM.")
]
BackendOpt = Annotated[
    str,
    typer.Option("--backend", help="auto (default: torch on CUDA, openvino on the CPU), torch, onnx (fp32), "
                                   "onnx-int8, openvino (bf16 where the CPU has it) or openvino-int8: how "
                                   "the sentence-transformers model runs; torch, onnx, openvino and auto "
                                   "share one vector space, each int8 backend has its own (route vectors, "
                                   "thresholds)."),
]


def _fail(message: str) -> NoReturn:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(2)


def _setup_logging() -> None:
    logging.basicConfig(
        level=get_settings().log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@app.command()
def broker(
    port: Annotated[int | None, typer.Option(help="Port; default: settings dev_broker.port.")] = None,
) -> None:
    """Run the dev broker (tansu, memory storage) on 127.0.0.1 in the foreground."""
    from sieve.kafka.broker import broker_command

    settings = get_settings()
    command = broker_command(settings.dev_broker.host, port or settings.dev_broker.port)
    console.print(f"dev broker on {settings.dev_broker.host}:{port or settings.dev_broker.port}")
    os.execv(command[0], command)


@routes_app.command("check")
def routes_check(path: Path) -> None:
    """Validate a route file and print its routes."""
    from sieve.routeset import RouteSetError, load_route_set

    try:
        route_set = load_route_set(path)
    except RouteSetError as exc:
        _fail(str(exc))
    console.print(f"{route_set.name} version {route_set.version}: {len(route_set.routes)} routes")
    for route in route_set.routes:
        console.print(
            f"  {route.name:24} -> {route.outcome:16} {len(route.utterances)} utterances, "
            f"{len(route.images)} images, {len(route.prompts)} prompts"
        )


@routes_app.command("sync")
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
) -> None:
    """Encode a route file's examples and write them to the route store (only what changed).

    Utterances go to the text encoder's collection; example images and CLIP prompts
    to the image encoder's, when one is given (directly or by a topology).
    """
    from sieve.encoders.core import encoders_for
    from sieve.routeset import RouteSetError, load_route_set
    from sieve.store.qdrant import RouteStore, RouteStoreError
    from sieve.topology import EncoderSpec, ImageEncoderSpec, TopologyError, load_topology

    settings = get_settings()
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
            _fail(f"{path} has image examples or prompts: give --image-model or --topology")
        built = encoders_for(text_spec if route_set.routes_in("text") else None,
                             image_spec if route_set.routes_in("image") else None, settings)
        encoders = [encoder for encoder in built if encoder is not None]
        store = RouteStore(settings.qdrant)
        reports = [store.sync(route_set, text_or_image) for text_or_image in encoders]
    except (RouteSetError, RouteStoreError, TopologyError, ValueError) as exc:
        _fail(str(exc))
    for report in reports:
        console.print(
            f"synced {report.route_set} {report.previous_version or '(new)'} -> {report.version} "
            f"in {report.collection}: +{report.added} ~{report.updated} -{report.deleted} "
            f"={report.unchanged}"
        )


@app.command("tiny-clip")
def tiny_clip(directory: Path, seed: int = 0) -> None:
    """Write a tiny open_clip model with seeded random weights (tests and the offline image demo)."""
    from sieve.encoders.core import save_tiny_clip

    save_tiny_clip(directory, seed)
    console.print(f"wrote a tiny open_clip model to {directory}; use model: local-dir:{directory.resolve()}")


@topics_app.command("create")
def topics_create(topology_path: Path) -> None:
    """Create a topology's input and output topics (those missing) with their partition counts."""
    from sieve.topology import load_topology, load_topology_route_set

    topology = load_topology(topology_path)
    created = asyncio.run(_create_topics(topology, load_topology_route_set(topology)))
    console.print(f"created {len(created)} topics: {', '.join(created) or '-'}")


async def _create_topics(topology: Topology, route_set: RouteSet) -> list[str]:
    from sieve.kafka.client import ensure_topics

    settings = get_settings()
    wanted = {topic: topology.input.partitions for topic in topology.input.topics}
    wanted |= {topic: topology.output.partitions for topic in topology.output_topics(route_set)}
    return await ensure_topics(settings.kafka, wanted, topology.output.replication_factor)


@app.command()
def worker(
    topology_path: Annotated[Path, typer.Argument(help="Topology YAML, e.g. topologies/moderation.yaml")],
    sync: Annotated[bool, typer.Option(help="Sync the topology's route file before starting.")] = False,
) -> None:
    """Run a router worker for one topology (joins its consumer group)."""
    from sieve.encoders.core import release_device_memory
    from sieve.routeset import RouteSetError
    from sieve.store.qdrant import RouteStore, RouteStoreError
    from sieve.topology import TopologyError, load_topology, load_topology_route_set
    from sieve.worker.batch import DrainingWorker, RouterWorker
    from sieve.worker.compute import (
        build_compute,
        build_encoders,
        encoder_ids,
        limit_blas_threads,
        settle_heap,
    )
    from sieve.worker.health import attach_router, serve
    from sieve.worker.metrics import ROUTE_SET

    _setup_logging()
    settings = get_settings()
    limit_blas_threads(settings)
    try:
        topology = load_topology(topology_path)
        route_set = load_topology_route_set(topology)
        store = RouteStore(settings.qdrant)
        # Models load here only to embed routes (--sync) or to run on a thread; with
        # compute=process the child loads its own, and the index is found by encoder id.
        encoders = None
        if sync or settings.compute_mode == "thread":
            encoders = build_encoders(topology, settings)
        if sync:
            assert encoders is not None
            for model in encoders:
                if model is not None:
                    store.sync(route_set, model)
        ids = encoder_ids(topology)
        indexes = {space: store.load(topology.route_set.name, model_id) for space, model_id in ids.items()}
        compute = build_compute(topology, settings, indexes, encoders)
    except (TopologyError, RouteSetError, RouteStoreError, ValueError) as exc:
        _fail(str(exc))
    if encoders is not None and compute.mode == "process":
        del encoders
        release_device_memory()  # the compute child built its own encoders
    index = indexes["text"]
    asyncio.run(_create_topics(topology, index.route_set))
    ROUTE_SET.info({"route_set": index.route_set.name, "version": index.version, "encoder": index.encoder_id})
    router = RouterWorker(topology, settings, compute, store)
    attach_router(router)  # /healthz heartbeat, /readyz checks, consumer-lag gauges
    serve(settings.metrics_host, settings.metrics_port, settings.health)
    console.print(
        f"worker {settings.worker_name}: topology {topology.name}, route set "
        f"{index.route_set.name}@{index.version}, encoder {', '.join(ids.values())}, compute {compute.mode}, "
        f"metrics :{settings.metrics_port}"
    )
    settle_heap()
    DrainingWorker(router, loglevel=settings.log_level, quiet=True).execute_from_commandline()


@app.command()
def review(
    topology_path: Annotated[Path, typer.Argument(help="Topology YAML, e.g. topologies/moderation.yaml")],
) -> None:
    """Run an LLM reviewer for a topology's needs-review topic (settings: SIEVE_LLM__*)."""
    from sieve.review.worker import run_reviewer
    from sieve.routeset import RouteSetError
    from sieve.topology import TopologyError, load_topology, load_topology_route_set

    _setup_logging()
    try:
        topology = load_topology(topology_path)
        route_set = load_topology_route_set(topology)
    except (TopologyError, RouteSetError, ValueError) as exc:
        _fail(str(exc))
    run_reviewer(topology, route_set, get_settings(), console.print)


@app.command()
def produce(
    path: Annotated[Path, typer.Argument(help="JSONL file, one event per line ('-' for stdin).")],
    topic: Annotated[str, typer.Option("--topic", "-t")],
) -> None:
    """Send each line of a JSONL file as one message (keyed by its 'id'); bad lines go as they are."""
    from sieve.kafka.client import produce as send_all

    lines = sys.stdin.buffer.read().splitlines() if str(path) == "-" else path.read_bytes().splitlines()
    messages = []
    for line in lines:
        if not line.strip():
            continue
        key = None
        try:
            event_id = json.loads(line).get("id")
            key = str(event_id).encode() if event_id is not None else None
        except (ValueError, AttributeError):
            pass
        messages.append((key, line))
    count = asyncio.run(send_all(get_settings().kafka, topic, messages))
    console.print(f"produced {count} messages to {topic}")


@app.command()
def tail(
    topics: Annotated[list[str], typer.Argument(help="Topics to read.")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep waiting for messages.")] = False,
    idle: Annotated[float, typer.Option(help="Without --follow: stop after this many idle seconds.")] = 2.0,
    limit: Annotated[int | None, typer.Option(help="Stop after this many messages.")] = None,
) -> None:
    """Print messages of topics as JSON lines (from the beginning; commits nothing)."""
    from sieve.kafka.client import read_topic

    async def run() -> None:
        count = 0
        async for record in read_topic(get_settings().kafka, topics, idle_timeout_s=None if follow else idle):
            value = record.value.decode("utf-8", "replace") if record.value else ""
            sys.stdout.write(json.dumps({"topic": record.topic, "partition": record.partition,
                                         "offset": record.offset, "value": _maybe_json(value)}) + "\n")
            count += 1
            if limit is not None and count >= limit:
                return

    asyncio.run(run())


def _maybe_json(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        return text


@dead_app.command("replay")
def dead_letters_replay(
    topic: Annotated[str, typer.Option(help="The dead-letter topic.")] = "sieve.dead-letter",
    to: Annotated[str | None, typer.Option(help="Send here instead of each letter's source topic.")] = None,
    reason: Annotated[
        list[str] | None, typer.Option(help="Only letters with this reason (repeatable).")
    ] = None,
    group: Annotated[
        str, typer.Option(help="Consumer group that remembers what was replayed.")
    ] = "sieve-dead-letter-replay",
    idle: Annotated[float, typer.Option(help="Stop after this many idle seconds.")] = 3.0,
    dry_run: Annotated[bool, typer.Option(help="Only count what would be replayed.")] = False,
) -> None:
    """Re-send dead letters' original bytes (e.g. after a fix); truncated ones are reported, not sent."""
    from sieve.worker.replay import replay_dead_letters

    summary = asyncio.run(
        replay_dead_letters(get_settings().kafka, topic, to=to, reasons=set(reason or []),
                            group=group, idle_s=idle, dry_run=dry_run)
    )
    console.print(
        f"replayed {summary.replayed}, skipped {summary.skipped} (filtered), "
        f"truncated {summary.truncated} (not replayable), unreadable {summary.unreadable}"
    )


@schemas_app.command("export")
def schemas_export(
    directory: Annotated[Path, typer.Argument()] = Path("schemas"),
    check: Annotated[bool, typer.Option(help="Fail if the files differ instead of writing.")] = False,
) -> None:
    """Write schemas/*.schema.json from the pydantic models."""
    from sieve.schema_export import export_schemas

    drift = export_schemas(directory, check=check)
    if check and drift:
        _fail(f"schemas out of date: {', '.join(drift)}; run `sieve schemas export`")
    console.print("schemas up to date" if check else f"wrote schemas to {directory}")


@app.command()
def demo(
    events: Annotated[int, typer.Option(help="How many events to send (the samples, repeated).")] = 1000,
    topology_path: Annotated[Path, typer.Option("--topology")] = Path("topologies/moderation.yaml"),
) -> None:
    """Start the dev broker, sync the routes, run a worker, send samples, show decisions and events/s."""
    from sieve.cli.demo import run_demo

    raise typer.Exit(run_demo(topology_path, events))


# --------------------------------------------------------------------------- quality: eval, fit, build

DataArg = Annotated[str, typer.Argument(help="openai-moderation, clinc150, or a labelled JSONL file.")]
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
    typer.Option(help="Ignore the data set's own splits (clinc150's): seeded, stratified, 50/25/25."),
]


def _quality_bench(
    data: str, seed: int, sample: int | None, encoder: str, model: str | None, cache: bool, resplit: bool,
    backend: str = "auto",
):
    from sieve.encoders.cache import CachedEncoder
    from sieve.encoders.core import TextEncoder, encoders_for
    from sieve.quality.datasets import DatasetError
    from sieve.quality.runner import open_workbench
    from sieve.topology import EncoderSpec

    settings = get_settings()
    built, _ = encoders_for(EncoderSpec(kind=encoder, model=model, backend=backend),  # type: ignore[arg-type]
                            None, settings)
    assert built is not None
    text_encoder: TextEncoder = built
    if cache:
        text_encoder = CachedEncoder(text_encoder, settings.embedding_cache_dir)
    try:
        return open_workbench(data, text_encoder, datasets_dir=settings.datasets_dir, seed=seed,
                              sample=sample, source_splits=not resplit)
    except DatasetError as exc:
        _fail(str(exc))
        raise  # unreachable: _fail exits


def _labelled(paths: list[Path]) -> list[tuple[str, Path]]:
    stems = [p.stem for p in paths]
    return [(p.stem if stems.count(p.stem) == 1 else str(p), p) for p in paths]


def _command_line() -> str:
    import shlex

    return "sieve " + shlex.join(sys.argv[1:])


@app.command("eval")
def eval_command(
    data: DataArg,
    routes: Annotated[Path, typer.Option("--routes", "-r", help="The route file to evaluate.")],
    compare: Annotated[
        list[Path] | None, typer.Option(help="Another route file, side by side (repeatable).")
    ] = None,
    split: Annotated[str, typer.Option(help="test, calibration, train, or all.")] = "test",
    out: Annotated[Path, typer.Option(help="Report folder.")] = Path("out/eval"),
    seed: SeedOpt = 0,
    sample: SampleOpt = None,
    resplit: ResplitOpt = False,
    head: HeadOpt = True,
    plots: Annotated[bool, typer.Option(help="Write the PNG plots.")] = True,
    cache: CacheOpt = True,
    encoder: EncoderKind = "sentence-transformers",
    model: ModelOpt = None,
    backend: BackendOpt = "auto",
) -> None:
    """Run labelled data through the worker's batch functions; write a report (Markdown, JSON, PNG)."""
    from sieve.flow.head import HeadError
    from sieve.quality.report import write_report
    from sieve.quality.runner import run_eval
    from sieve.routeset import RouteSetError

    if split not in ("test", "calibration", "train", "all"):
        _fail(f"--split must be test, calibration, train or all, not {split!r}")
    bench = _quality_bench(data, seed, sample, encoder, model, cache, resplit, backend)
    try:
        report = run_eval(bench, _labelled([routes, *(compare or [])]), split=split,
                          command=_command_line(), use_head=head)
    except (RouteSetError, HeadError, ValueError) as exc:
        _fail(str(exc))
    paths = write_report(report, out, plots=plots)
    s = report.primary.summary
    console.print(
        f"{report.primary.label}: auto {s.auto_share:.1%} at accuracy {s.auto_accuracy or 0:.3f}, "
        f"review {s.review_share:.1%} ({s.events} events); report {paths['markdown']}"
    )


def _parse_targets(min_precision: list[str] | None, min_accuracy: float | None, z: float):
    from sieve.quality.fit import Targets

    precision: dict[str, float] = {}
    for item in min_precision or []:
        outcome, sep, value = item.partition("=")
        try:
            precision[outcome.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not outcome.strip():
            _fail(f"--min-precision takes OUTCOME=P, e.g. violating=0.9; got {item!r}")
    if not precision and min_accuracy is None:
        min_accuracy = 0.95
    try:
        return Targets(precision=precision, accuracy=min_accuracy, z=z)
    except ValueError as exc:
        _fail(str(exc))
        raise


@app.command("fit")
def fit_command(
    data: DataArg,
    routes: Annotated[Path, typer.Option("--routes", "-r", help="The route file to fit.")],
    compare: Annotated[
        list[Path] | None, typer.Option(help="Another route file, fitted and compared too (repeatable).")
    ] = None,
    min_precision: Annotated[
        list[str] | None,
        typer.Option(help="OUTCOME=P: automatic decisions of that outcome at least this precise "
                          "(repeatable)."),
    ] = None,
    min_accuracy: Annotated[
        float | None,
        typer.Option(help="All automatic decisions at least this accurate (default 0.95 when no "
                          "--min-precision is given)."),
    ] = None,
    z: Annotated[float, typer.Option(help="Targets must hold at the Wilson lower bound with this z (0: the "
                                          "calibration point estimate).")] = 1.0,
    min_support: Annotated[
        int, typer.Option(help="A route gets thresholds of its own when it tops this many calibration events "
                               "(0: never).")
    ] = 50,
    fitted: Annotated[
        Path | None,
        typer.Option(help="Where the fitted route file goes (default: OUT/<routes>.fitted.yaml)."),
    ] = None,
    out: Annotated[Path, typer.Option(help="Report folder.")] = Path("out/fit"),
    seed: SeedOpt = 0,
    sample: SampleOpt = None,
    resplit: ResplitOpt = False,
    head: HeadOpt = True,
    plots: Annotated[bool, typer.Option(help="Write the PNG plots.")] = True,
    cache: CacheOpt = True,
    encoder: EncoderKind = "sentence-transformers",
    model: ModelOpt = None,
    backend: BackendOpt = "auto",
) -> None:
    """Fit thresholds on calibration data to meet precision targets with the least review; report on test."""
    from sieve.flow.head import HeadError
    from sieve.quality.report import write_report
    from sieve.quality.runner import run_fit
    from sieve.routeset import RouteSetError

    targets = _parse_targets(min_precision, min_accuracy, z)
    bench = _quality_bench(data, seed, sample, encoder, model, cache, resplit, backend)
    fitted_out = fitted or out / f"{routes.stem}.fitted.yaml"
    try:
        report, fit = run_fit(bench, _labelled([routes, *(compare or [])]), targets, fitted_out=fitted_out,
                              min_support=min_support or None, command=_command_line(), use_head=head)
    except (RouteSetError, HeadError, ValueError) as exc:
        _fail(str(exc))
    paths = write_report(report, out, plots=plots)
    s = report.primary.summary
    console.print(
        f"fitted on calibration (review {fit.calibration.review_share:.1%}, targets "
        f"{'met' if fit.calibration.feasible else 'NOT met'}); on test: auto {s.auto_share:.1%} at accuracy "
        f"{s.auto_accuracy or 0:.3f}, review {s.review_share:.1%}. Route file {fitted_out}; report "
        f"{paths['markdown']}"
    )


@routes_app.command("build")
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
) -> None:
    """Build a route file from the training split of labelled data: diverse examples per route."""
    from sieve.quality.runner import run_build

    if max_examples < 1:
        _fail("--max-examples must be at least 1")
    if not 0.0 <= head_weight <= 1.0:
        _fail("--head-weight must be within [0, 1]")
    bench = _quality_bench(data, seed, sample, encoder, model, cache, resplit, backend)
    try:
        result = run_build(bench, out, name=name, max_examples=max_examples, seed=seed,
                           default_outcome=default_outcome, head=head, head_c=head_c,
                           head_weight=head_weight, command=_command_line())
    except ValueError as exc:
        _fail(str(exc))
    kept = sum(result.kept.values())
    console.print(
        f"built {result.route_set.name}: {len(result.route_set.routes)} routes, {kept} examples from "
        f"{len(bench.splits.train)} training examples -> {out}"
        + (" (+ head)" if result.head is not None else "")
    )


def main() -> None:
    """Entry point of the ``sieve`` console script."""
    app()
