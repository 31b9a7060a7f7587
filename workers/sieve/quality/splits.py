"""Seeded, recorded train / calibration / test splits of labelled data.

Splits are explicit and seeded (:func:`split_data`): the same data, seed and
fractions always give the same rows in the same splits, and every report records
the seed, the method, the sizes and a digest of each split's ids
(:class:`SplitRecord`), so two reports can be checked to have used the same rows.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from sieve.quality.datasets import DatasetError, LabelledData, LabelledExample, SplitName

SPLITS: tuple[SplitName, ...] = ("train", "calibration", "test")


def _digest(ids: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class SplitRecord:
    """How a data set was split: enough to reproduce and to check two reports used the same rows."""

    data: str
    method: str  # "source" (the data set's own) or "seeded-stratified"
    seed: int
    fractions: dict[str, float]
    sizes: dict[str, int]
    digests: dict[str, str]
    sample: int | None = None

    def as_dict(self) -> dict[str, object]:
        """JSON-ready."""
        return {
            "data": self.data,
            "method": self.method,
            "seed": self.seed,
            "fractions": self.fractions,
            "sizes": self.sizes,
            "digests": self.digests,
            "sample_per_split": self.sample,
        }


@dataclass(frozen=True)
class Splits:
    """Train, calibration and test parts of one data set, and how they were made."""

    train: LabelledData
    calibration: LabelledData
    test: LabelledData
    record: SplitRecord = field(compare=False)

    def part(self, name: str) -> LabelledData:
        """A split by name (``train``, ``calibration``, ``test``)."""
        if name not in SPLITS:
            raise DatasetError(f"no split {name!r}: one of {', '.join(SPLITS)}")
        part: LabelledData = getattr(self, name)
        return part


def _strata(example: LabelledExample) -> str:
    # Outcome and the whole label set: a small category gets its share of every split.
    return f"{example.outcome}|{','.join(sorted(example.labels))}"


def _stratified_order(examples: Sequence[LabelledExample], rng: random.Random) -> list[LabelledExample]:
    """Examples interleaved stratum by stratum, each stratum shuffled: any prefix is stratified."""
    groups: dict[str, list[LabelledExample]] = {}
    for ex in examples:
        groups.setdefault(_strata(ex), []).append(ex)
    keyed: list[tuple[float, str, LabelledExample]] = []
    for key in sorted(groups):
        members = groups[key]
        rng.shuffle(members)
        size = len(members)
        # position i of a stratum of size s sits at (i + u) / s: evenly spread over [0, 1)
        offset = rng.random()
        keyed.extend(((i + offset) / size, ex.id, ex) for i, ex in enumerate(members))
    keyed.sort(key=lambda item: (item[0], item[1]))
    return [ex for _, _, ex in keyed]


def sample_data(data: LabelledData, size: int, seed: int) -> LabelledData:
    """A seeded, stratified sample of ``size`` examples (all of them if fewer)."""
    if size >= len(data):
        return data
    ordered = _stratified_order(list(data.examples), random.Random(seed))
    return data.with_examples(ordered[:size])


def split_data(
    data: LabelledData,
    *,
    seed: int = 0,
    fractions: tuple[float, float, float] = (0.5, 0.25, 0.25),
    sample: int | None = None,
    source_splits: bool = True,
) -> Splits:
    """Train / calibration / test.

    Uses the data set's own splits where every example has one (clinc150, or a
    JSONL with ``split``) unless ``source_splits`` is off; otherwise a seeded
    split stratified by outcome and labels, with the given fractions. ``sample``
    keeps at most that many examples of each split (seeded, stratified), for
    quick runs and tests.
    """
    own = [ex.source_split for ex in data.examples]
    parts: dict[str, list[LabelledExample]] = {name: [] for name in SPLITS}
    if all(own) and source_splits:
        method = "source"
        for ex in data.examples:
            parts[str(ex.source_split)].append(ex)
        total = len(data.examples)
        used = {name: len(parts[name]) / total for name in SPLITS}
    else:
        if any(own) and not all(own):
            raise DatasetError(f"{data.name}: some examples name a split and some do not")
        if abs(sum(fractions) - 1.0) > 1e-9 or min(fractions) < 0:
            raise DatasetError(f"split fractions must be >= 0 and sum to 1, got {fractions}")
        method = "seeded-stratified"
        rng = random.Random(seed)
        groups: dict[str, list[LabelledExample]] = {}
        for ex in data.examples:
            groups.setdefault(_strata(ex), []).append(ex)
        for key in sorted(groups):
            members = sorted(groups[key], key=lambda ex: ex.id)
            rng.shuffle(members)
            n = len(members)
            # each stratum cut at its own rounded fractions
            cut_train = round(n * fractions[0])
            cut_cal = round(n * (fractions[0] + fractions[1]))
            parts["train"].extend(members[:cut_train])
            parts["calibration"].extend(members[cut_train:cut_cal])
            parts["test"].extend(members[cut_cal:])
        used = dict(zip(SPLITS, fractions, strict=True))
    if sample is not None:
        for offset, name in enumerate(SPLITS):
            ordered = _stratified_order(
                sorted(parts[name], key=lambda ex: ex.id), random.Random(seed + offset)
            )
            parts[name] = ordered[:sample]
    for name in SPLITS:
        parts[name].sort(key=lambda ex: ex.id)
    record = SplitRecord(
        data=data.name,
        method=method,
        seed=seed,
        fractions={k: round(v, 4) for k, v in used.items()},
        sizes={name: len(parts[name]) for name in SPLITS},
        digests={name: _digest(ex.id for ex in parts[name]) for name in SPLITS},
        sample=sample,
    )
    return Splits(
        train=data.with_examples(parts["train"]),
        calibration=data.with_examples(parts["calibration"]),
        test=data.with_examples(parts["test"]),
        record=record,
    )
