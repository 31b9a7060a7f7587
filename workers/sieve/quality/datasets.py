"""Labelled data: the example model, a JSONL format, and adapters for the public sets.

A labelled example carries the text, its *gold outcome* and its *labels*:

- ``outcome``: what a perfect router would decide (``violating``, an intent's
  name, ...). ``None`` means "matches nothing": the route set's default outcome
  (``clean``, ``unrouted``, ...), resolved when a route set is known.
- ``labels``: the fine-grained classes the example belongs to (moderation
  categories, an intent). A route named like a label is measured against it.
- ``unknown``: labels whose value is not known for this example (the
  openai-moderation set labels each row for some categories only); such an
  example counts neither for nor against that label's route.

JSONL, one object per line::

    {"text": "...", "label": "billing"}                      # outcome = the label
    {"text": "...", "labels": ["hate", "violence"], "outcome": "violating"}
    {"text": "...", "labels": {"hate": 1, "sexual": 0, "violence": null}, "outcome": "violating"}
    {"text": "..."}                                          # no class: the default outcome
    {"image_uri": "file:///x.png", "label": "weapons"}       # image reference (image encoder needed)

``id`` and ``split`` (``train`` / ``calibration`` / ``test``) are optional; a
given ``split`` is the data set's own, which :mod:`sieve.quality.splits` keeps.
"""

from __future__ import annotations

import csv
import gzip
import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from sieve.routeset import NAME_PATTERN

SplitName = Literal["train", "calibration", "test"]
_SPLIT_ALIASES = {
    "train": "train",
    "calibration": "calibration",
    "cal": "calibration",
    "val": "calibration",
    "validation": "calibration",
    "dev": "calibration",
    "test": "test",
}

ADAPTERS = ("openai-moderation", "clinc150", "davidson")

# openai-moderation category keys -> the route names of routes/moderation.yaml.
MODERATION_CATEGORIES: dict[str, str] = {
    "S": "sexual",
    "H": "hate",
    "V": "violence",
    "HR": "harassment",
    "SH": "self_harm",
    "S3": "sexual_minors",
    "H2": "hate_threatening",
    "V2": "violence_graphic",
}


class DatasetError(ValueError):
    """Labelled data that cannot be used; the message names the file and line."""


@dataclass(frozen=True, slots=True)
class LabelledExample:
    """One labelled item (see the module docstring)."""

    id: str
    text: str | None
    outcome: str | None
    labels: frozenset[str] = frozenset()
    unknown: frozenset[str] = frozenset()
    image: str | None = None
    source_split: str | None = None

    def gold(self, default_outcome: str) -> str:
        """The gold outcome, with "matches nothing" resolved to the route set's default."""
        return self.outcome if self.outcome is not None else default_outcome


@dataclass(frozen=True)
class LabelledData:
    """A labelled data set and where it came from."""

    name: str
    examples: tuple[LabelledExample, ...]
    # Every label name the data uses (the vocabulary a route name is matched against).
    label_names: tuple[str, ...]
    source: str
    licence: str
    # The outcome of rows with no class, as the data set calls it (moderation: clean).
    default_outcome: str | None = None
    # The outcome of rows with a label, where it is one outcome for all (moderation: violating).
    positive_outcome: str | None = None

    def __len__(self) -> int:
        return len(self.examples)

    def with_examples(self, examples: Iterable[LabelledExample]) -> LabelledData:
        """The same data set description over other examples (a split or a sample)."""
        return replace(self, examples=tuple(examples))

    def label_counts(self) -> Counter[str]:
        """How many examples carry each label."""
        return Counter(label for ex in self.examples for label in ex.labels)


# --------------------------------------------------------------------------- JSONL


def _as_label_set(value: object, where: str) -> tuple[frozenset[str], frozenset[str]]:
    """``labels`` as (positive, unknown): a list of names or a {name: 1/0/null} map."""
    if isinstance(value, str):
        return frozenset({value}), frozenset()
    if isinstance(value, list):
        if not all(isinstance(item, str) for item in value):
            raise DatasetError(f"{where}: 'labels' must be a list of strings or a mapping")
        return frozenset(value), frozenset()
    if isinstance(value, dict):
        positive, unknown = set(), set()
        for name, flag in value.items():
            if flag is None:
                unknown.add(name)
            elif flag in (1, True, 1.0):
                positive.add(name)
            elif flag not in (0, False, 0.0):
                raise DatasetError(f"{where}: label {name!r} must be 1, 0 or null, got {flag!r}")
        return frozenset(positive), frozenset(unknown)
    raise DatasetError(
        f"{where}: 'labels' must be a list of strings or a mapping, got {type(value).__name__}"
    )


def parse_labelled_line(obj: object, where: str, number: int) -> LabelledExample:
    """One JSONL object as a :class:`LabelledExample` (errors name the line)."""
    if not isinstance(obj, dict):
        raise DatasetError(f"{where}: a labelled example is a JSON object, got {type(obj).__name__}")
    text = obj.get("text")
    image = obj.get("image_uri") or obj.get("image")
    if text is not None and not isinstance(text, str):
        raise DatasetError(f"{where}: 'text' must be a string")
    if image is not None and not isinstance(image, str):
        raise DatasetError(f"{where}: 'image_uri' must be a string")
    if not (text and text.strip()) and not image:
        raise DatasetError(f"{where}: needs a non-empty 'text' or an 'image_uri'")
    if "label" in obj and "labels" in obj:
        raise DatasetError(f"{where}: give 'label' or 'labels', not both")
    raw = obj.get("labels", obj.get("label"))
    positive, unknown = _as_label_set(raw, where) if raw is not None else (frozenset(), frozenset())
    outcome = obj.get("outcome")
    if outcome is not None and not isinstance(outcome, str):
        raise DatasetError(f"{where}: 'outcome' must be a string")
    if outcome is None and positive:
        if len(positive) > 1:
            raise DatasetError(
                f"{where}: {len(positive)} labels and no 'outcome': say which outcome the row has"
            )
        outcome = next(iter(positive))
    for name in (outcome, *positive):
        if name is not None and not re.match(NAME_PATTERN, name):
            raise DatasetError(f"{where}: {name!r} is not a route/outcome name ({NAME_PATTERN})")
    split = obj.get("split")
    if split is not None and split not in _SPLIT_ALIASES:
        raise DatasetError(f"{where}: 'split' must be one of train, calibration, test; got {split!r}")
    return LabelledExample(
        id=str(obj.get("id", number)),
        text=text,
        outcome=outcome,
        labels=positive,
        unknown=unknown,
        image=image,
        source_split=_SPLIT_ALIASES[split] if split is not None else None,
    )


def load_jsonl(path: str | Path) -> LabelledData:
    """Read a labelled JSONL file (plain or ``.gz``)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    examples: list[LabelledExample] = []
    mentioned: set[str] = set()  # labels named anywhere, 0s included: the vocabulary
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    obj = json.loads(line)
                except ValueError as exc:
                    raise DatasetError(f"{where}: not JSON: {exc}") from None
                examples.append(parse_labelled_line(obj, where, number))
                raw = obj.get("labels")
                if isinstance(raw, dict):
                    mentioned.update(str(name) for name in raw)
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if not examples:
        raise DatasetError(f"{path}: no labelled examples")
    ids = Counter(ex.id for ex in examples)
    repeated = [i for i, n in ids.items() if n > 1]
    if repeated:
        raise DatasetError(f"{path}: ids must be unique; {repeated[0]!r} repeats")
    labels = sorted(mentioned | {label for ex in examples for label in ex.labels | ex.unknown})
    return LabelledData(path.stem, tuple(examples), tuple(labels), source=str(path), licence="(your data)")


# --------------------------------------------------------------------------- the public sets


def load_openai_moderation(datasets_dir: Path) -> LabelledData:
    """openai/moderation-api-release samples-1680 (MIT): 8 categories, outcome violating / clean.

    Labels are the categories named as routes/moderation.yaml names them (``S`` ->
    ``sexual``, ...). A row flagged in any category is ``violating``; every other
    row is ``clean``, also where some categories are unknown (a missing key).
    """
    path = datasets_dir / "openai-moderation" / "samples-1680.jsonl.gz"
    examples: list[LabelledExample] = []
    try:
        handle = gzip.open(path, "rt", encoding="utf-8")
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read: {exc.strerror or exc}") from None
    with handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            positive = frozenset(name for key, name in MODERATION_CATEGORIES.items() if row.get(key) == 1)
            unknown = frozenset(name for key, name in MODERATION_CATEGORIES.items() if key not in row)
            examples.append(
                LabelledExample(
                    id=f"om-{number:04d}",
                    text=row["prompt"],
                    outcome="violating" if positive else "clean",
                    labels=positive,
                    unknown=unknown,
                )
            )
    return LabelledData(
        "openai-moderation",
        tuple(examples),
        tuple(MODERATION_CATEGORIES.values()),
        source="openai/moderation-api-release @ f4ab51b5, data/samples-1680.jsonl.gz (arXiv 2208.03274)",
        licence="MIT",
        default_outcome="clean",
        positive_outcome="violating",
    )


_CLINC_SPLITS: dict[str, SplitName] = {
    "train": "train",
    "oos_train": "train",
    "val": "calibration",
    "oos_val": "calibration",
    "test": "test",
    "oos_test": "test",
}


def load_clinc150(datasets_dir: Path) -> LabelledData:
    """clinc/oos-eval data_full (CC BY 3.0): 150 intents plus out-of-scope, with its own splits.

    An intent's outcome is its name; an ``oos`` query has no class (the route set's
    default outcome). The data set's train / val / test become train / calibration / test.
    """
    path = datasets_dir / "clinc150" / "data_full.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read: {exc.strerror or exc}") from None
    examples: list[LabelledExample] = []
    intents: set[str] = set()
    for key, split in _CLINC_SPLITS.items():
        for number, (text, intent) in enumerate(data[key]):
            is_oos = intent == "oos"
            if not is_oos:
                intents.add(intent)
            examples.append(
                LabelledExample(
                    id=f"clinc-{key}-{number:05d}",
                    text=text,
                    outcome=None if is_oos else intent,
                    labels=frozenset() if is_oos else frozenset({intent}),
                    source_split=split,
                )
            )
    return LabelledData(
        "clinc150",
        tuple(examples),
        tuple(sorted(intents)),
        source="clinc/oos-eval @ 828f8093, data/data_full.json (Larson et al., EMNLP 2019)",
        licence="CC BY 3.0",
        default_outcome="oos",
    )


# Davidson et al.'s ``class`` column -> the row's label (``neither`` has none: clean).
DAVIDSON_CLASSES: dict[str, str | None] = {"0": "hate", "1": "offensive", "2": None}


def load_davidson(datasets_dir: Path) -> LabelledData:
    """t-davidson/hate-speech-and-offensive-language labeled_data (MIT): tweets, violating / clean.

    ``class`` 0 (hate speech) and 1 (offensive language) are ``violating``, with the
    label ``hate`` or ``offensive``; 2 (neither) is ``clean``. The tweets are kept raw
    (HTML entities, ``RT @user:`` prefixes, URLs). The set serves to measure routes
    on data they were not built or fitted on, so every row is in its ``test`` split:
    building or fitting on it takes ``--resplit`` (a seeded split, as openai-moderation).
    """
    path = datasets_dir / "davidson" / "labeled_data.csv"
    examples: list[LabelledExample] = []
    try:
        handle = path.open(encoding="utf-8", newline="")
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read: {exc.strerror or exc}") from None
    with handle:
        rows = csv.reader(handle)
        header = next(rows, None)
        if header is None or header[5:7] != ["class", "tweet"]:
            raise DatasetError(f"{path}: expected the columns ,count,...,class,tweet; got {header}")
        for number, row in enumerate(rows, 2):
            if row[5] not in DAVIDSON_CLASSES:
                raise DatasetError(f"{path}:{number}: class must be 0, 1 or 2, got {row[5]!r}")
            label = DAVIDSON_CLASSES[row[5]]
            examples.append(
                LabelledExample(
                    id=f"davidson-{int(row[0]):05d}",
                    text=row[6],
                    outcome="violating" if label else "clean",
                    labels=frozenset({label}) if label else frozenset(),
                    source_split="test",
                )
            )
    return LabelledData(
        "davidson",
        tuple(examples),
        ("hate", "offensive"),
        source="t-davidson/hate-speech-and-offensive-language @ cb50f7e9, data/labeled_data.csv "
        "(Davidson et al., ICWSM 2017)",
        licence="MIT",
        default_outcome="clean",
        positive_outcome="violating",
    )


def load_data(spec: str, datasets_dir: Path) -> LabelledData:
    """``openai-moderation``, ``clinc150``, ``davidson`` or a path to a labelled JSONL file."""
    if spec == "openai-moderation":
        return load_openai_moderation(datasets_dir)
    if spec == "clinc150":
        return load_clinc150(datasets_dir)
    if spec == "davidson":
        return load_davidson(datasets_dir)
    path = Path(spec)
    if not path.exists():
        raise DatasetError(f"{spec}: no such file, and not one of the adapters ({', '.join(ADAPTERS)})")
    return load_jsonl(path)
