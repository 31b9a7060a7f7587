"""The work behind ``sieve eval``, ``sieve fit`` and ``sieve routes build``.

Each command opens a :class:`~sieve.quality.workbench.Workbench` (labelled data,
seeded and recorded splits, an encoder behind the on-disk embedding cache) and
writes its outputs: a route file, a fitted route file and thresholds file, and a
:class:`~sieve.quality.report_data.Report`. Nothing is evaluated on the split it was
fitted or built on: routes are built from ``train``, thresholds fitted on
``calibration``, and reports are on ``test`` unless asked otherwise (``--split all``
for a route set built from other data, such as the hand-written ``routes/moderation.yaml``).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sieve.encoders.base import TextEncoder
from sieve.flow.decide import Policy, decide_scores, novelty_scores
from sieve.flow.head import HeadError, LearnedHead, decision_scores
from sieve.flow.match import RouteIndex
from sieve.progress import SILENT, Advance, Progress
from sieve.quality.build import BuildResult, build_route_set, with_head
from sieve.quality.datasets import LabelledData
from sieve.quality.fit import NOVEL_SHARE, FitResult, declare_novel_default, fit_lead, fit_thresholds
from sieve.quality.report_data import Report, SystemEntry, describe_route_set
from sieve.quality.scoring import held_by_lists, score_split, three_way_run
from sieve.quality.semantic_router import (
    SEMANTIC_ROUTER_SCORING,
    SEMANTIC_ROUTER_THRESHOLD,
    semantic_router_fit,
    semantic_router_run,
)
from sieve.quality.systems import ScoredSplit, SystemRun
from sieve.quality.tables import summarise
from sieve.quality.targets import Targets
from sieve.quality.unseen import Unseen, unseen_of
from sieve.quality.workbench import EvalSplit, Workbench
from sieve.routeset import RouteSet, head_path_for, load_route_set
from sieve.routeset_dump import dump_route_set
from sieve.thresholds import Novelty

# --------------------------------------------------------------------------- build


def run_build(
    bench: Workbench,
    out: Path,
    *,
    name: str | None = None,
    max_examples: int = 50,
    seed: int = 0,
    default_outcome: str | None = None,
    head: bool = False,
    head_c: float = 1.0, head_weight: float = 0.5, head_words: bool = False,
    lists: Sequence[Path] = (),
    command: str = "",
    progress: Progress = SILENT,
) -> BuildResult:
    """Build a route set from the training split and write it (and the head) next to ``out``.

    ``lists``: list files the written set names (:mod:`sieve.lists`), e.g. a shipped profanity list.
    """
    train = bench.splits.train
    default = default_outcome or bench.data.default_outcome or "unrouted"
    record = bench.splits.record
    description = (
        f"Built by `sieve routes build` from {bench.data.name} ({bench.data.source}; licence "
        f"{bench.data.licence}), training split only: {record.sizes['train']} examples, split "
        f"{record.method} seed {record.seed} (train digest {record.digests['train']}). Up to "
        f"{max_examples} examples per route, chosen as k-means medoids (seed {seed}). "
        "Thresholds are defaults: fit them with `sieve fit`."
    )
    vectors = bench.vectors("train", progress=progress)
    result = build_route_set(
        train,
        vectors,
        name=name or _set_name(bench.data.name),
        default_outcome=default,
        max_examples=max_examples,
        seed=seed,
        description=description,
        progress=progress,
    )
    if head:
        result = with_head(result, train, vectors, bench.encoder.id, c=head_c, weight=head_weight, seed=seed,
                           words=head_words, progress=progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    named = [os.path.relpath(Path(p).resolve(), out.parent.resolve()) for p in lists]  # relative to the file
    out.write_text(dump_route_set(result.route_set.model_copy(update={"lists": named})), encoding="utf-8")
    load_route_set(out)  # what was written is an ordinary, valid route file (its lists name its routes)
    if result.head is not None:
        result.head.save(head_path_for(out))
    summary = {
        "command": command,
        "split": record.as_dict(),
        "encoder": bench.encoder.id,
        "max_examples": max_examples,
        "seed": seed,
        **result.as_dict(),
    }
    out.with_name(out.stem + ".build.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return result


def _set_name(data_name: str) -> str:
    cleaned = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in data_name.lower()).strip("-_")
    return f"{cleaned or 'routes'}-built"[:64]


@dataclass
class Candidate:
    """A route file under evaluation, its index and (if beside it) its head."""

    label: str
    path: Path
    route_set: RouteSet
    index: RouteIndex
    head: LearnedHead | None


def load_candidate(
    label: str, path: Path, encoder: TextEncoder, *, use_head: bool = True, progress: Progress = SILENT
) -> Candidate:
    """Read a route file, encode its examples, and pick up ``<file>.head.npz`` if present."""
    route_set = load_route_set(path)
    with progress.task(f"encoding the examples of {label}") as advance:
        index = RouteIndex.build(route_set, encoder)
        advance(len(index.example_ids))
    head = None
    head_file = head_path_for(path)
    if use_head and head_file.exists():
        head = LearnedHead.load(head_file)
        if head.encoder_id != encoder.id:
            raise HeadError(f"{head_file}: trained on {head.encoder_id!r} vectors, not {encoder.id!r}")
    return Candidate(label, path, route_set, index, head)


def _system(run: SystemRun, path: Path, scoring: str, policy: str) -> SystemEntry:
    """One side-by-side row: a system's run on the split and its summary."""
    return SystemEntry(run.name, str(path), scoring, policy, run, summarise(run))


def _entries_for(
    candidate: Candidate,
    scored: ScoredSplit,
    *,
    policy: Policy | None,
    policy_label: str,
    advance: Advance,
    head_policy: Policy | None = None,
    sr_threshold: float | None = None,
) -> list[SystemEntry]:
    """The systems one route file contributes: three-way, head, semantic-router (default and fitted)."""
    label, path = candidate.label, candidate.path
    run = three_way_run(f"{label}, {policy_label}", scored, policy)
    entries = [_system(run, path, "nearest examples", f"three-way, {policy_label}")]
    advance(1)
    if candidate.head is not None:
        head_label = "fitted" if head_policy is not None else policy_label
        run = three_way_run(f"{label} + head, {head_label}", scored, head_policy, candidate.head)
        scoring = f"nearest examples + logistic head (weight {candidate.head.weight:g})"
        entries.append(_system(run, path, scoring, f"three-way, {head_label}"))
        advance(1)
    default = SEMANTIC_ROUTER_THRESHOLD
    run = semantic_router_run(f"{label}, semantic-router way ({default:g})", scored)
    entries.append(_system(run, path, SEMANTIC_ROUTER_SCORING, f"one threshold {default:g}, no review"))
    advance(1)
    if sr_threshold is not None:
        run = semantic_router_run(f"{label}, semantic-router fit ({sr_threshold:g})", scored, sr_threshold)
        policy_text = f"one threshold {sr_threshold:g} (best accuracy on calibration), no review"
        entries.append(_system(run, path, SEMANTIC_ROUTER_SCORING, policy_text))
        advance(1)
    return entries


def run_eval(
    bench: Workbench,
    route_files: list[tuple[str, Path]],
    *,
    split: EvalSplit = "test",
    command: str = "",
    use_head: bool = True,
    progress: Progress = SILENT,
) -> Report:
    """Evaluate route files as they are (their own thresholds) on one split, side by side."""
    part = bench.part(split)
    vectors = bench.vectors(split, progress=progress)
    systems: list[SystemEntry] = []
    described = []
    novelties: list[tuple[Path, Novelty | None]] = []
    for label, path in route_files:
        candidate = load_candidate(label, path, bench.encoder, use_head=use_head, progress=progress)
        with progress.task(f"scoring {label}", total=2 + (candidate.head is not None)) as advance:
            scored = score_split(part, candidate.index, bench.encoder, vectors)
            own = "its own thresholds"
            systems.extend(_entries_for(candidate, scored, policy=None, policy_label=own, advance=advance))
        described.append(describe_route_set(candidate.route_set, str(path)))
        novelties.append((path, candidate.route_set.defaults.novelty))
    notes = _data_notes(bench.data) + [
        f"WARNING: {path} declares novel events safe (`defaults.novelty.on_novel: default`): events "
        "unlike anything its routes know get its default outcome without review."
        for path, novelty in novelties if novelty is not None and novelty.on_novel == "default"
    ]
    if split == "all":
        notes.append(
            "Evaluated on every example (`--split all`): only valid for route sets that were not "
            "built or fitted on this data."
        )
    return Report(
        title=f"Sieve evaluation: {bench.data.name}, {split} split",
        command=command,
        data=bench.data,
        split_name=split,
        splits=bench.splits,
        encoder_id=bench.encoder.id,
        systems=systems,
        route_sets=described,
        notes=notes,
    )


def run_fit(
    bench: Workbench,
    route_files: list[tuple[str, Path]],
    targets: Targets,
    *,
    fitted_out: Path,
    min_support: int | None = 50,
    novel_share: float | None = NOVEL_SHARE,
    novel_default: bool = False,
    lead_cost: float | None = None,
    unseen_share: float | None = None,
    command: str = "",
    use_head: bool = True,
    progress: Progress = SILENT,
) -> tuple[Report, FitResult]:
    """Fit each route file on calibration, write the first one's fit (its head's, with one), compare on test.

    ``novel_share``: the share of calibration events the novelty threshold flags (None: no
    threshold); ``novel_default``: declare novel events safe where the test split shows it;
    ``lead_cost``: fit a default lead too (:func:`fit_lead`; None: the set's own lead);
    ``unseen_share``: fit with that share of calibration events left out of their routes (:mod:`.unseen`).
    Side by side on test, per route file: the fitted policy, the file's own thresholds, the
    head (fitted too), semantic-router at its default threshold and at its ``fit``'s.
    """
    calibration, test = bench.splits.calibration, bench.splits.test
    cal_vectors = bench.vectors("calibration", progress=progress)
    test_vectors = bench.vectors("test", progress=progress)
    systems: list[SystemEntry] = []
    fits: list[dict[str, object]] = []
    described: list[dict[str, object]] = []
    first_fit: FitResult | None = None
    files: dict[str, str] = {}
    for position, (label, path) in enumerate(route_files):
        candidate = load_candidate(label, path, bench.encoder, use_head=use_head, progress=progress)
        index = candidate.index
        cal = score_split(calibration, index, bench.encoder, cal_vectors)
        scored = score_split(test, index, bench.encoder, test_vectors)
        fit_on = functools.partial(_fit_on, cal=cal, scored=scored, candidate=candidate, targets=targets,
                                   min_support=min_support, novel_share=novel_share,
                                   novel_default=novel_default, lead_cost=lead_cost, progress=progress)
        fit = fit_on(cal.match.route_scores, scored.match.route_scores, unseen_of(cal, None, unseen_share))
        fitted_policy = fit.policy(Policy.for_index(index))
        head_policy = None
        head_fit = None
        cal_scores = cal.match.route_scores
        if candidate.head is not None:
            cal_scores = decision_scores(cal.match.route_scores, cal.vectors, index, candidate.head,
                                         cal.texts)
            head_fit = fit_on(cal_scores, decision_scores(scored.match.route_scores, scored.vectors, index,
                                                          candidate.head, scored.texts),
                              unseen_of(cal, candidate.head, unseen_share))
            head_policy = head_fit.policy(Policy.for_index(index))
        sr_threshold, sr_accuracy = semantic_router_fit(cal)
        with progress.task(f"scoring {label} on test", total=4 + (candidate.head is not None)) as advance:
            entries = _entries_for(
                candidate,
                scored,
                policy=fitted_policy,
                policy_label="fitted",
                advance=advance,
                head_policy=head_policy,
                sr_threshold=sr_threshold,
            )
            own = three_way_run(f"{label}, its own thresholds", scored)
            entries.insert(1, _system(own, path, "nearest examples", "three-way, its own thresholds"))
            advance(1)
        if candidate.head is not None and position == 0:
            # the head's system first: it is what the written route file (head beside it) decides
            entries.insert(0, entries.pop(next(i for i, e in enumerate(entries) if "+ head" in e.label)))
        systems.extend(entries)
        described.append(describe_route_set(candidate.route_set, str(path)))
        fits.append(
            {
                "route_file": str(path),
                "label": label,
                "nearest": fit.thresholds(),
                "head": head_fit.thresholds() if head_fit is not None else None,
                "semantic_router_fit": {"threshold": sr_threshold, "calibration_accuracy": sr_accuracy},
            }
        )
        if position == 0:
            first_fit = head_fit if head_fit is not None else fit
            _check_written_fit(first_fit, candidate, cal, cal_scores, fitted_out)
            files["fitted_route_set"] = str(fitted_out)
            thresholds_file = fitted_out.with_name(fitted_out.stem + ".thresholds.json")
            thresholds_file.write_text(json.dumps(fits[0], indent=2) + "\n", encoding="utf-8")
            files["thresholds"] = str(thresholds_file)
    assert first_fit is not None
    report = Report(
        title=f"Sieve fit: {bench.data.name}, fitted on calibration, measured on test",
        command=command,
        data=bench.data,
        split_name="test",
        splits=bench.splits,
        encoder_id=bench.encoder.id,
        systems=systems,
        route_sets=described,
        fit=fits,
        notes=_data_notes(bench.data),
        files=files,
    )
    return report, first_fit


def _fit_on(
    cal_scores: np.ndarray, test_scores: np.ndarray, unseen: Unseen | None, *, cal: ScoredSplit,
    scored: ScoredSplit, candidate: Candidate, targets: Targets, min_support: int | None,
    novel_share: float | None, novel_default: bool, lead_cost: float | None, progress: Progress,
) -> FitResult:
    """Thresholds (a lead too, with ``lead_cost``) fitted on calibration; novel declared safe if asked."""
    index = candidate.index
    fit = functools.partial(fit_thresholds, cal_scores, list(cal.gold), routes=index.routes, targets=targets,
                            min_support=min_support, novelty=novelty_scores(cal.match.nearest_score),
                            novel_share=novel_share, held=held_by_lists(cal), unseen=unseen,
                            progress=progress)
    fitted = (fit(route_set=candidate.route_set) if lead_cost is None
              else fit_lead(lambda rs: fit(route_set=rs), candidate.route_set, lead_cost))
    if novel_default:
        fitted = declare_novel_default(fitted, Policy.for_index(index), test_scores,
                                       novelty_scores(scored.match.nearest_score), list(scored.gold))
    return fitted


def _check_written_fit(
    fit: FitResult, candidate: Candidate, cal: ScoredSplit, scores: np.ndarray, fitted_out: Path
) -> None:
    """Write the fitted route file (and its head beside it), read it back, and check it decides as fitted.

    With a head the fit is the head's: the worker decides on the head's combined ``scores``.
    """
    fitted_out.parent.mkdir(parents=True, exist_ok=True)
    fitted_out.write_text(dump_route_set(fit.route_set, fitted_out.parent), encoding="utf-8")
    head_out = head_path_for(fitted_out)
    if candidate.head is not None:
        head_out.write_bytes(head_path_for(candidate.path).read_bytes())
    else:
        head_out.unlink(missing_ok=True)
    reread = load_route_set(fitted_out)
    index = RouteIndex.from_examples(
        reread,
        reread.version,
        candidate.index.encoder_id,
        {route.name: _examples_of(candidate.index, route.name) for route in candidate.index.routes},
    )
    worker_policy = Policy.for_index(index)
    novelty = novelty_scores(cal.match.nearest_score)
    expected = [v.outcome for v in decide_scores(scores, fit.policy(worker_policy), novelty)]
    got = [v.outcome for v in decide_scores(scores, worker_policy, novelty)]
    if expected != got:
        raise AssertionError(f"{fitted_out}: the written thresholds decide differently from the fit")


def _examples_of(index: RouteIndex, route: str) -> list[tuple[str, str, np.ndarray]]:
    position = index.route_names.index(route)
    start, end = index.bounds[position]
    return [(index.example_ids[r], index.example_texts[r], index.vectors[r]) for r in range(start, end)]


def _data_notes(data: LabelledData) -> list[str]:
    notes: list[str] = []
    if data.name == "openai-moderation":
        unknown = sum(1 for ex in data.examples if not ex.labels and ex.unknown)
        notes.append(
            "Binary gold outcome: violating when flagged in any category, else clean. "
            f"{unknown} of the clean examples here were not labelled for every category (a missing key "
            "means unknown), so some 'clean' gold labels may hide a violation in an unlabelled category; "
            "per-category rows leave unknowns out."
        )
    if data.name == "clinc150":
        notes.append("Out-of-scope queries (intent 'oos') have no route: their gold outcome is the route "
                     "set's default.")
    return notes
