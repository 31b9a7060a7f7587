"""``sieve routes learn``: a new route-set version proposed from reviewers' labels (and anchors)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sieve.cli.base import BackendOpt, EncoderKind, ModelOpt, QuietOpt, command_line, console, fail
from sieve.cli.progress import progress_for
from sieve.cli.workbench import CacheOpt, SeedOpt, open_bench


def routes_learn(
    routes: Annotated[Path, typer.Argument(help="The active route file.")],
    labels: Annotated[Path, typer.Option("--labels", help="Labelled JSONL from `sieve labels export`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The proposed (fitted) route file to write.")],
    max_per_route: Annotated[int, typer.Option(help="Add at most this many examples to a route.")] = 20,
    near_duplicate: Annotated[float, typer.Option(
        help="Leave out a new example this similar (cosine) to one the set has or one added.")] = 0.95,
    head: Annotated[bool, typer.Option(help="Train a head (<out>.head.npz) even when the active file has "
                                            "none; one beside the active file is always retrained.")] = False,
    head_weight: Annotated[float | None, typer.Option(
        help="Weight of the head's probability (default: the active head's, else 0.5).")] = None,
    head_words: Annotated[bool, typer.Option(help="The head scores the text's words too (as the active "
                                                  "head's always does when it has them).")] = False,
    min_precision: Annotated[list[str] | None, typer.Option(
        help="OUTCOME=P: automatic decisions of that outcome at least this precise (repeatable).")] = None,
    min_accuracy: Annotated[float | None, typer.Option(
        help="All automatic decisions at least this accurate (default 0.95, without --min-precision).")
    ] = None,
    z: Annotated[float, typer.Option(help="Targets hold at the Wilson lower bound with this z.")] = 1.0,
    label_accuracy: Annotated[float, typer.Option(
        help="How often the labels are right (e.g. the LLM's agreement with moderators): the targets "
        "are on true accuracy, read against labels this right.")] = 1.0,
    min_support: Annotated[int, typer.Option(
        help="A route gets thresholds of its own above this many calibration events (0: never).")] = 50,
    novel_share: Annotated[float, typer.Option(
        help="The novelty threshold flags this share of the calibration labels (0: none).")] = 0.05,
    seed: SeedOpt = 0,
    cache: CacheOpt = True,
    encoder: EncoderKind = "sentence-transformers",
    model: ModelOpt = None,
    backend: BackendOpt = "auto",
    new_outcomes: Annotated[bool, typer.Option(
        "--new-outcomes", help="Allow label outcomes the set does not know (intent routing: each intent "
        "its own outcome; the topology needs a topic for each).")] = False,
    anchors: Annotated[Path | None, typer.Option(help="The active version's automatic decisions "
                                                      "(`sieve labels anchors`), for it to keep.")] = None,
    quiet: QuietOpt = False,
) -> None:
    """Propose a new version of a route set from reviewers' labels, fitted and compared with the active one.

    Examples come from the labels' train split, thresholds are refitted on calibration, and
    both versions are measured on the held-back test split (<out>.learn.md, <out>.learn.json).
    """
    from sieve.cli.quality import parse_targets
    from sieve.flow.head import HeadError
    from sieve.quality.datasets import load_data
    from sieve.quality.learn import run_learn
    from sieve.routeset import RouteSetError, load_route_set

    if max_per_route < 1:
        fail("--max-per-route must be at least 1")
    if not 0.0 < near_duplicate <= 1.0:
        fail("--near-duplicate must be within (0, 1]")
    if head_weight is not None and not 0.0 <= head_weight <= 1.0:
        fail("--head-weight must be within [0, 1]")
    if not 0.5 < label_accuracy <= 1.0:
        fail("--label-accuracy must be within (0.5, 1]: labels right half the time or less teach nothing")
    try:
        load_route_set(routes)
        text = labels.read_text(encoding="utf-8")
    except RouteSetError as exc:
        fail(str(exc))
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"{labels}: cannot read: {getattr(exc, 'strerror', None) or exc}")
    if not text.strip():
        fail(f"{labels}: no labels to learn from (the file is empty); export them with `sieve labels export`")
    targets = parse_targets(min_precision, min_accuracy, z)
    progress = progress_for(console, quiet=quiet)
    bench = open_bench(str(labels), seed, None, encoder, model, cache, False, backend, progress=progress)
    try:
        given = anchors is not None and anchors.read_text(encoding="utf-8").strip()
        kept = load_data(str(anchors), Path(".")) if given else None  # an empty file: no anchors
        result = run_learn(bench, routes, out, targets, max_per_route=max_per_route, anchors=kept,
                           near_duplicate=near_duplicate, seed=seed, head=head, head_weight=head_weight,
                           head_words=head_words,
                           min_support=min_support or None, novel_share=novel_share or None,
                           new_outcomes=new_outcomes, label_accuracy=label_accuracy, command=command_line(),
                           progress=progress)
    except (RouteSetError, HeadError, ValueError, OSError) as exc:
        fail(str(exc))
    added = sum(len(change.added) for change in result.changes)
    new = [change.route for change in result.changes if change.new and change.added]
    console.print(f"proposed {result.proposed.name} version {result.proposed.version} (active "
                  f"{result.active.version}): {added} examples added"
                  + (f", new routes {', '.join(new)}" if new else "") + f" -> {out}")
    for system in result.comparison["systems"]:  # type: ignore[attr-defined]
        if system["system"] in result.comparison["primary"].values():  # type: ignore[attr-defined]
            console.print(f"  {system['side']:8} auto {system['auto_share']:.1%} at accuracy "
                          f"{system['auto_accuracy'] or 0:.3f}, review {system['review_share']:.1%} "
                          f"({system['events']} held-back labels)")
    console.print(f"comparison {result.files['comparison']}; promote with `sieve routes sync {out} "
                  "--no-activate` then `sieve routes promote`")
