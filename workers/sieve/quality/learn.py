"""``sieve routes learn``: a new route-set version proposed from reviewers' labels.

The labels (``sieve labels export``'s JSONL) are split like any labelled data
(:mod:`sieve.quality.splits`): examples come from the **train** split only, the
thresholds and the novelty threshold are refitted on **calibration**, and the
proposed version is compared with the active one on **test**, which neither saw.

New examples, per route the labels name (and per outcome for labels without a route):
the k-means medoids of the labelled texts (:func:`~sieve.quality.build.select_representatives`),
at most ``max_per_route`` added to a route, none whose cosine similarity to an example
of the set (any route) or to one already chosen reaches ``near_duplicate``. Existing
routes keep their examples and get the new ones after them; a route the set lacks is
added with the labels' outcome, which must be one the set knows. Everything else of
the set (name, mode, defaults, lists, severity) is kept; with a head (beside the active
file, or asked for) a new one is trained on the train split.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sieve.contracts import NEEDS_REVIEW
from sieve.flow.head import LearnedHead
from sieve.progress import SILENT, Progress
from sieve.quality.anchors import with_anchors
from sieve.quality.build import BuildResult, RoutePool, route_pools, select_representatives, with_head
from sieve.quality.datasets import LabelledData, LabelledExample
from sieve.quality.learn_report import compare, render_comparison
from sieve.quality.runner import run_eval, run_fit
from sieve.quality.targets import Targets
from sieve.quality.workbench import Workbench, encode_texts
from sieve.routeset import Route, RouteSet, head_path_for, load_route_set
from sieve.routeset_dump import dump_route_set

NEAR_DUPLICATE = 0.95  # cosine similarity at which a candidate example repeats one the set has


class LearnError(ValueError):
    """Labels a route set cannot learn from; the message says why."""


@dataclass(frozen=True)
class RouteChange:
    """What one route got from the labels."""

    route: str
    outcome: str
    new: bool  # a route the active set did not have
    pool: int  # training labels behind it
    added: tuple[str, ...]
    near_duplicates: int  # medoids left out as near-duplicates

    def as_dict(self) -> dict[str, object]:
        """JSON-ready."""
        return {"route": self.route, "outcome": self.outcome, "new": self.new, "pool": self.pool,
                "added": list(self.added), "near_duplicates": self.near_duplicates}


@dataclass
class Proposal:
    """The proposed route set (not yet fitted), its changes, and the pools a head is trained on."""

    route_set: RouteSet
    changes: list[RouteChange]
    pools: tuple[RoutePool, ...]
    head: LearnedHead | None = None


@dataclass
class LearnResult:
    """What ``routes learn`` wrote and found."""

    proposed: RouteSet  # the fitted, proposed version as read back from ``out``
    active: RouteSet
    changes: list[RouteChange]
    comparison: dict[str, object]
    files: dict[str, str] = field(default_factory=dict)


def check_labels(data: LabelledData, route_set: RouteSet, *, new_outcomes: bool = False) -> None:
    """Raise :class:`LearnError` for labels the set cannot learn from: one outcome only, unknown outcomes.

    ``new_outcomes``: outcomes the set does not know are allowed (intent routing, where each
    intent is its own outcome: the topology must then have a topic for each, e.g. through
    ``outcome_topic_template``; a worker refuses a version whose outcome has none).
    """
    default = route_set.default_outcome
    outcomes = Counter(ex.gold(default) for ex in data.examples)
    if not outcomes:
        raise LearnError(f"{data.source}: no labels to learn from")
    if len(outcomes) < 2:
        only = next(iter(outcomes))
        raise LearnError(
            f"{data.source}: all {len(data)} labels have the outcome {only!r}: one class only; learning "
            "needs labels of at least two outcomes to fit thresholds that tell them apart"
        )
    known = route_set.outcomes - {NEEDS_REVIEW}
    unknown = sorted(set(outcomes) - known)
    if unknown and not new_outcomes:
        raise LearnError(
            f"{data.source}: labels with the outcome {', '.join(map(repr, unknown))}, which {route_set.name} "
            f"does not know (its outcomes: {', '.join(sorted(known))}); relabel them, add a route by hand, "
            "or allow new outcomes (--new-outcomes)"
        )


def labels_route_sets(path: Path) -> set[str]:
    """The route sets the rows of a labels file name (``route_set``, as ``labels export`` writes it)."""
    names: set[str] = set()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return names
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("route_set"), str):
            names.add(row["route_set"])
    return names


def _unit(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.where(norms == 0, 1.0, norms)).astype(np.float32)


def propose(
    route_set: RouteSet,
    train: LabelledData,
    train_vectors: np.ndarray,
    existing_vectors: np.ndarray,
    *,
    max_per_route: int,
    near_duplicate: float = NEAR_DUPLICATE,
    seed: int = 0,
) -> Proposal:
    """The set with examples from ``train`` (row ``i`` is ``train_vectors[i]``) added per route.

    ``existing_vectors``: the vectors of the set's own examples (any route), which a new
    example must not nearly repeat.
    """
    if max_per_route < 1:
        raise LearnError("the cap per route must be at least 1")
    unit = _unit(train_vectors)
    bank = [_unit(existing_vectors)] if existing_vectors.size else []
    taken = {text for route in route_set.routes for text in route.utterances}
    by_name = {route.name: route for route in route_set.routes}
    added: dict[str, list[str]] = {}
    changes: list[RouteChange] = []
    pools = route_pools(train, route_set.default_outcome)
    for pool in pools:
        route = by_name.get(pool.name)
        outcome = route.outcome if route is not None else pool.outcome
        chosen = added.setdefault(pool.name, [])
        rows: list[int] = []
        for i in pool.rows:
            text = train.examples[i].text
            if text is not None and text.strip() and text not in taken:
                taken.add(text)
                rows.append(i)
        room = max_per_route - len(chosen)
        dropped = 0
        before = len(chosen)
        if rows and room > 0:
            for p in select_representatives(unit[rows], room, seed):
                vector = unit[rows[p]]
                if bank and float(np.max(np.concatenate(bank) @ vector)) >= near_duplicate:
                    dropped += 1
                    continue
                bank.append(vector[None, :])
                chosen.append(str(train.examples[rows[p]].text))
        changes.append(RouteChange(pool.name, outcome, route is None, len(pool.rows), tuple(chosen[before:]),
                                   dropped))
    routes = [
        route.model_copy(update={"utterances": [*route.utterances, *added.get(route.name, [])]})
        for route in route_set.routes
    ]
    routes += [Route(name=name, outcome=next(c.outcome for c in changes if c.route == name), utterances=texts)
               for name, texts in added.items() if name not in by_name and texts]
    proposed = route_set.model_copy(update={"routes": routes})  # keeps where its lists resolve from
    RouteSet.model_validate(proposed.model_dump())  # a valid set: raises if not
    # the head learns every route the labels name, under the route names of the proposed set
    head_pools = tuple(p for p in pools if any(r.name == p.name for r in routes))
    return Proposal(proposed, changes, head_pools)


def head_training(
    route_set: RouteSet, train: LabelledData, vectors: np.ndarray, example_vectors: np.ndarray,
    pools: tuple[RoutePool, ...],
) -> tuple[LabelledData, np.ndarray, tuple[RoutePool, ...]]:
    """What a learned head is trained on: the labels' training rows and the set's own examples.

    ``example_vectors``: the set's examples, route by route in its order. Every route keeps
    its class, labelled or not; trained balanced, routes with many rows (the labels' frequent
    routes, the set's large ones) do not crowd out a route that has few.
    """
    extra: list[LabelledExample] = []
    rows: dict[str, list[int]] = {}
    for route in route_set.routes:
        for k, text in enumerate(route.utterances):
            rows.setdefault(route.name, []).append(len(train.examples) + len(extra))
            extra.append(LabelledExample(f"example:{route.name}:{k}", text, route.outcome,
                                         frozenset({route.name})))
    named = {pool.name for pool in pools}
    merged = [RoutePool(p.name, p.outcome, p.rows + tuple(rows.get(p.name, ()))) for p in pools]
    merged += [RoutePool(r.name, r.outcome, tuple(rows[r.name])) for r in route_set.routes
               if r.name not in named and r.name in rows]
    data = train.with_examples([*train.examples, *extra])
    return data, np.vstack([vectors, example_vectors]).astype(np.float32), tuple(merged)


def run_learn(
    bench: Workbench,
    active_file: Path,
    out: Path,
    targets: Targets,
    *,
    max_per_route: int = 20,
    near_duplicate: float = NEAR_DUPLICATE,
    seed: int = 0,
    head: bool = False,
    head_weight: float | None = None,
    head_c: float = 1.0,
    head_words: bool = False,
    min_support: int | None = 50,
    novel_share: float | None = 0.05,
    new_outcomes: bool = False,
    label_accuracy: float = 1.0,
    anchors: LabelledData | None = None,
    command: str = "",
    progress: Progress = SILENT,
) -> LearnResult:
    """Propose, fit on calibration and compare on test; write ``out`` (the proposed, fitted version).

    Next to ``out``: its head (``<out>.head.npz``) when it has one (scoring words when the
    active head does, or with ``head_words``), the fitted thresholds
    (``<out>.thresholds.json``) and the comparison (``<out>.learn.md``, ``<out>.learn.json``).
    Every check that can refuse the labels runs before anything is written. The targets are
    on true accuracy: with ``label_accuracy`` below 1 (how often the labels are right) the fit
    reads them against the labels by :meth:`~sieve.quality.targets.Targets.on_labels`.
    ``anchors``: the active version's automatic decisions (:mod:`sieve.quality.anchors`), at
    most as many as labels, added to train and calibration.
    """
    active = load_route_set(active_file)
    if out.resolve() == active_file.resolve():
        raise LearnError(f"{out}: the proposed version must not overwrite the active route file")
    check_labels(bench.data, active, new_outcomes=new_outcomes)
    on_labels = targets.on_labels(label_accuracy)
    for source in [bench.data.source] + ([anchors.source] if anchors is not None else []):
        named = labels_route_sets(Path(source)) - {active.name}
        if named:
            raise LearnError(f"{source}: labels of route set {', '.join(sorted(named))}, not "
                             f"{active.name}; export or filter the labels of {active.name}")
    splits = bench.splits
    if not splits.train.examples or not splits.calibration.examples or not splits.test.examples:
        raise LearnError(f"{bench.data.source}: {len(bench.data)} labels leave a train, calibration or test "
                         f"split empty ({bench.splits.record.sizes}); learning needs all three")
    anchor_counts = None
    if anchors is not None:
        bench, anchor_counts = with_anchors(bench, anchors, seed=seed, cap=len(bench.data))
    active_head_file = head_path_for(active_file)
    active_head = LearnedHead.load(active_head_file) if active_head_file.exists() else None
    if active_head is not None and active_head.encoder_id != bench.encoder.id:
        raise LearnError(f"{active_head_file}: trained on {active_head.encoder_id!r} vectors, not "
                         f"{bench.encoder.id!r}: learn with the encoder the active set is used with")
    if head_words and not head and active_head is None:
        raise LearnError("head words need a head: ask for one, or keep one beside the active file")
    multi = active.mode == "multi"
    fitted: dict[str, object] = {"refitted": "each category route's accept threshold (multi mode: the "
                                             "novelty threshold is kept, no head)"}
    train = bench.splits.train
    train_vectors = bench.vectors("train", progress=progress)
    texts = [text for route in active.routes for text in route.utterances]
    existing = encode_texts(bench.encoder, texts, description="encoding the active set's examples",
                            progress=progress)
    proposal = propose(active, train, train_vectors, existing, max_per_route=max_per_route,
                       near_duplicate=near_duplicate, seed=seed)
    if (head or active_head is not None) and not multi:
        weight = head_weight if head_weight is not None else active_head.weight if active_head else 0.5
        # a softmax head (a route per row) learns from the set's examples too; a one-vs-rest
        # head from the labels alone (with the examples it automated less on Davidson). Either
        # trains balanced when its rows have a route each: the labels come mostly from review
        # traffic, whose mix of routes is not the stream's, and the head must not learn that mix.
        softmax = (active_head is None or active_head.kind == "softmax") and all(
            len(ex.labels) <= 1 for ex in train.examples)
        head_data, vectors, pools = (head_training(active, train, train_vectors, existing, proposal.pools)
                                     if softmax else (train, train_vectors, proposal.pools))
        built = with_head(BuildResult(proposal.route_set, pools, {}), head_data, vectors, bench.encoder.id,
                          c=head_c, weight=weight, seed=seed, balanced=True,
                          words=head_words or (active_head is not None and active_head.words is not None),
                          progress=progress)
        proposal.head = built.head
    out.parent.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {"proposed": str(out)}
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".learn-") as scratch:
        draft = Path(scratch) / out.name  # the unfitted proposal, for the fit to read
        draft.write_text(dump_route_set(proposal.route_set, draft.parent), encoding="utf-8")
        if proposal.head is not None:
            proposal.head.save(head_path_for(draft))
        if multi:
            from sieve.quality.categories_run import run_category_fit

            run_category_fit(bench, draft, on_labels, fitted_out=out, command=command, progress=progress)
            head_path_for(out).unlink(missing_ok=True)
        else:
            _, fit = run_fit(bench, [("proposed", draft)], on_labels, fitted_out=out, min_support=min_support,
                             novel_share=novel_share, command=command, progress=progress)
            fitted = {"refitted": "the accept and review thresholds and the novelty threshold",
                      "calibration_review_share": fit.calibration.review_share,
                      "targets_met_on_calibration": fit.calibration.feasible,
                      "novelty_threshold": None if fit.novelty is None else fit.novelty.threshold}
            files["thresholds"] = str(out.with_name(out.stem + ".thresholds.json"))
    if head_path_for(out).exists():
        files["head"] = str(head_path_for(out))
    proposed = load_route_set(out)
    report = run_eval(bench, [("active", active_file), ("proposed", out)], split="test", command=command,
                      progress=progress)
    comparison = compare(report, bench.splits.test, active, proposed, [c.as_dict() for c in proposal.changes])
    comparison.update({
        "command": command,
        "labels": bench.data.source,
        "split": bench.splits.record.as_dict(),
        "encoder": bench.encoder.id,
        "max_per_route": max_per_route,
        "near_duplicate": near_duplicate,
        "seed": seed,
        "targets": targets.as_dict(),
        "label_accuracy": label_accuracy,
        "anchors": anchor_counts,
        "targets_on_labels": on_labels.as_dict(),
        "head": None if proposal.head is None else {"weight": proposal.head.weight, **proposal.head.meta},
        "fit": fitted,
    })
    markdown, data = out.with_name(out.stem + ".learn.md"), out.with_name(out.stem + ".learn.json")
    files.update({"comparison": str(markdown), "comparison_json": str(data)})
    comparison["files"] = files
    markdown.write_text(render_comparison(comparison), encoding="utf-8")
    data.write_text(json.dumps(comparison, indent=2) + "\n", encoding="utf-8")
    return LearnResult(proposed, active, proposal.changes, comparison, files)
