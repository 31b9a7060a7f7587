"""The work behind ``sieve eval``, ``sieve fit`` and ``sieve routes build``.

Each command loads labelled data, splits it (seeded, recorded), encodes what it
needs through an on-disk embedding cache, and writes its outputs: a route file,
a fitted route file and thresholds file, and a report (Markdown, JSON, PNG plots).
Nothing is evaluated on the split it was fitted or built on: routes are built
from ``train``, thresholds fitted on ``calibration``, and reports are on ``test``
unless asked otherwise (``--split all`` for a route set built from other data,
such as the hand-written ``routes/moderation.yaml``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sieve.encoders.core import TextEncoder
from sieve.flow.decide import Policy
from sieve.flow.head import HeadError, LearnedHead, head_path_for
from sieve.flow.match import RouteIndex
from sieve.quality.build import BuildResult, build_route_set, with_head
from sieve.quality.datasets import LabelledData, Splits, load_data, split_data
from sieve.quality.evaluate import (
    ScoredSplit,
    Summary,
    SystemRun,
    confusion,
    no_match_table,
    per_label_table,
    per_outcome_table,
    per_route_table,
    score_split,
    semantic_router_fit,
    semantic_router_run,
    summarise,
    text_of,
    three_way_run,
)
from sieve.quality.fit import FitResult, Targets, fit_thresholds
from sieve.routeset import RouteSet, dump_route_set, load_route_set

EvalSplit = str  # "test", "calibration", "train" or "all"


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

    def vectors(self, name: EvalSplit) -> np.ndarray:
        """The split's text vectors (encoded once per command)."""
        if name not in self._vectors:
            self._vectors[name] = self.encoder.encode(text_of(self.part(name)))
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


# --------------------------------------------------------------------------- report model


@dataclass
class SystemEntry:
    """One row of the side-by-side comparison."""

    label: str
    route_file: str
    scoring: str
    policy: str
    run: SystemRun
    summary: Summary


@dataclass
class Report:
    """Everything a report says; rendered by :mod:`sieve.quality.report`."""

    title: str
    command: str
    data: LabelledData
    split_name: str
    splits: Splits
    encoder_id: str
    systems: list[SystemEntry]
    route_sets: list[dict[str, object]]
    fit: list[dict[str, object]] = field(default_factory=list)
    build: dict[str, object] | None = None
    notes: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)

    @property
    def primary(self) -> SystemEntry:
        """The system the detailed sections describe."""
        return self.systems[0]

    def tables(self) -> dict[str, object]:
        """The primary system's detailed tables."""
        run = self.primary.run
        evaluated = self.data if self.split_name == "all" else self.splits.part(self.split_name)
        return {
            "per_route": per_route_table(run, evaluated),
            "per_outcome": per_outcome_table(run),
            "per_label": per_label_table(run, evaluated),
            "confusion": confusion(run),
        }

    def as_dict(self) -> dict[str, object]:
        """The JSON report."""
        return {
            "title": self.title,
            "command": self.command,
            "data": {"name": self.data.name, "source": self.data.source, "licence": self.data.licence},
            "evaluated_split": self.split_name,
            "split": self.splits.record.as_dict(),
            "encoder": self.encoder_id,
            "route_sets": self.route_sets,
            "side_by_side": [
                {
                    "system": e.label,
                    "route_file": e.route_file,
                    "scoring": e.scoring,
                    "policy": e.policy,
                    **e.summary.as_dict(),
                    "no_match": no_match_table(e.run),
                }
                for e in self.systems
            ],
            "primary": {"system": self.primary.label, **self.tables()},
            "fit": self.fit,
            "build": self.build,
            "notes": self.notes,
            "files": self.files,
        }


def describe_route_set(route_set: RouteSet, path: str) -> dict[str, object]:
    """Name, version, file and size of a route set, for the report."""
    return {
        "file": path,
        "name": route_set.name,
        "version": route_set.version,
        "routes": len(route_set.routes),
        "examples": sum(len(r.utterances) for r in route_set.routes),
        "default_outcome": route_set.default_outcome,
        "defaults": route_set.defaults.model_dump(mode="json"),
        "routes_with_own_thresholds": sum(1 for r in route_set.routes if r.thresholds is not None),
    }


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
    head_c: float = 1.0,
    head_weight: float = 0.5,
    command: str = "",
) -> BuildResult:
    """Build a route set from the training split and write it (and the head) next to ``out``."""
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
    result = build_route_set(
        train,
        bench.vectors("train"),
        name=name or _set_name(bench.data.name),
        default_outcome=default,
        max_examples=max_examples,
        seed=seed,
        description=description,
    )
    if head:
        result = with_head(
            result, train, bench.vectors("train"), bench.encoder.id, c=head_c, weight=head_weight, seed=seed
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(dump_route_set(result.route_set), encoding="utf-8")
    load_route_set(out)  # what was written is an ordinary, valid route file
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


# --------------------------------------------------------------------------- eval and fit


@dataclass
class Candidate:
    """A route file under evaluation, its index and (if beside it) its head."""

    label: str
    path: Path
    route_set: RouteSet
    index: RouteIndex
    head: LearnedHead | None


def load_candidate(label: str, path: Path, encoder: TextEncoder, *, use_head: bool = True) -> Candidate:
    """Read a route file, encode its examples, and pick up ``<file>.head.npz`` if present."""
    route_set = load_route_set(path)
    index = RouteIndex.build(route_set, encoder)
    head = None
    head_file = head_path_for(path)
    if use_head and head_file.exists():
        head = LearnedHead.load(head_file)
        if head.encoder_id != encoder.id:
            raise HeadError(f"{head_file}: trained on {head.encoder_id!r} vectors, not {encoder.id!r}")
    return Candidate(label, path, route_set, index, head)


def _entries_for(
    candidate: Candidate,
    scored: ScoredSplit,
    *,
    policy: Policy | None,
    policy_label: str,
    head_policy: Policy | None = None,
    sr_threshold: float | None = None,
) -> list[SystemEntry]:
    """The systems one route file contributes: three-way, head, semantic-router (default and fitted)."""
    path = str(candidate.path)
    entries = []
    run = three_way_run(f"{candidate.label}, {policy_label}", scored, policy)
    entries.append(
        SystemEntry(run.name, path, "nearest examples", f"three-way, {policy_label}", run, summarise(run))
    )
    if candidate.head is not None:
        head_label = "fitted" if head_policy is not None else policy_label
        run = three_way_run(f"{candidate.label} + head, {head_label}", scored, head_policy, candidate.head)
        entries.append(
            SystemEntry(
                run.name,
                path,
                f"nearest examples + logistic head (weight {candidate.head.weight:g})",
                f"three-way, {head_label}",
                run,
                summarise(run),
            )
        )
    run = semantic_router_run(f"{candidate.label}, semantic-router way (0.5)", scored)
    entries.append(
        SystemEntry(
            run.name,
            path,
            "mean of the route's hits among the 5 nearest",
            "one threshold 0.5, no review",
            run,
            summarise(run),
        )
    )
    if sr_threshold is not None:
        run = semantic_router_run(
            f"{candidate.label}, semantic-router fit ({sr_threshold:g})", scored, sr_threshold
        )
        entries.append(
            SystemEntry(
                run.name,
                path,
                "mean of the route's hits among the 5 nearest",
                f"one threshold {sr_threshold:g} (best accuracy on calibration), no review",
                run,
                summarise(run),
            )
        )
    return entries


def run_eval(
    bench: Workbench,
    route_files: list[tuple[str, Path]],
    *,
    split: EvalSplit = "test",
    command: str = "",
    use_head: bool = True,
) -> Report:
    """Evaluate route files as they are (their own thresholds) on one split, side by side."""
    part = bench.part(split)
    vectors = bench.vectors(split)
    systems: list[SystemEntry] = []
    described = []
    for label, path in route_files:
        candidate = load_candidate(label, path, bench.encoder, use_head=use_head)
        scored = score_split(part, candidate.index, bench.encoder, vectors)
        systems.extend(_entries_for(candidate, scored, policy=None, policy_label="its own thresholds"))
        described.append(describe_route_set(candidate.route_set, str(path)))
    notes = _data_notes(bench.data)
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
    command: str = "",
    use_head: bool = True,
) -> tuple[Report, FitResult]:
    """Fit every route file on the calibration split, write the first one's fit, compare all on test.

    Side by side on the test split, per route file: the fitted three-way policy, the
    file's own thresholds, the head (fitted too) if there is one, the semantic-router
    way at 0.5 and at the threshold semantic-router's ``fit`` would choose.
    """
    calibration, test = bench.splits.calibration, bench.splits.test
    cal_vectors, test_vectors = bench.vectors("calibration"), bench.vectors("test")
    systems: list[SystemEntry] = []
    fits: list[dict[str, object]] = []
    described: list[dict[str, object]] = []
    first_fit: FitResult | None = None
    files: dict[str, str] = {}
    for position, (label, path) in enumerate(route_files):
        candidate = load_candidate(label, path, bench.encoder, use_head=use_head)
        index = candidate.index
        cal = score_split(calibration, index, bench.encoder, cal_vectors)
        scored = score_split(test, index, bench.encoder, test_vectors)
        fit = fit_thresholds(
            cal.match.route_scores,
            list(cal.gold),
            candidate.route_set,
            index.routes,
            targets,
            min_support=min_support,
        )
        fitted_policy = fit.policy(Policy.for_index(index))
        head_policy = None
        head_fit = None
        if candidate.head is not None:
            combined = candidate.head.combine(cal.match.route_scores, cal.vectors, index)
            head_fit = fit_thresholds(
                combined, list(cal.gold), candidate.route_set, index.routes, targets, min_support=min_support
            )
            head_policy = head_fit.policy(Policy.for_index(index))
        sr_threshold, sr_accuracy = semantic_router_fit(cal)
        entries = _entries_for(
            candidate,
            scored,
            policy=fitted_policy,
            policy_label="fitted",
            head_policy=head_policy,
            sr_threshold=sr_threshold,
        )
        own = three_way_run(f"{label}, its own thresholds", scored)
        entries.insert(
            1,
            SystemEntry(
                own.name, str(path), "nearest examples", "three-way, its own thresholds", own, summarise(own)
            ),
        )
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
            first_fit = fit
            _check_written_fit(fit, candidate, cal, fitted_out)
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


def _check_written_fit(fit: FitResult, candidate: Candidate, cal: ScoredSplit, fitted_out: Path) -> None:
    """Write the fitted route file, read it back, and check the worker's policy from it decides as fitted."""
    fitted_out.parent.mkdir(parents=True, exist_ok=True)
    fitted_out.write_text(dump_route_set(fit.route_set), encoding="utf-8")
    reread = load_route_set(fitted_out)
    index = RouteIndex.from_examples(
        reread,
        reread.version,
        candidate.index.encoder_id,
        {
            route.name: [(i, t, v) for i, t, v in _examples_of(candidate.index, route.name)]
            for route in candidate.index.routes
        },
    )
    worker_policy = Policy.for_index(index)
    from sieve.flow.decide import decide_scores

    expected = [v.outcome for v in decide_scores(cal.match.route_scores, fit.policy(worker_policy))]
    got = [v.outcome for v in decide_scores(cal.match.route_scores, worker_policy)]
    if expected != got:
        raise AssertionError(f"{fitted_out}: the written thresholds decide differently from the fit")


def _examples_of(index: RouteIndex, route: str) -> list[tuple[str, str, np.ndarray]]:
    position = index.route_names.index(route)
    start, end = index.bounds[position]
    return [
        (index.example_ids[row], index.example_texts[row], index.vectors[row]) for row in range(start, end)
    ]


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
        notes.append(
            "Out-of-scope queries (intent 'oos') have no route: their gold outcome is the route "
            "set's default."
        )
    return notes
