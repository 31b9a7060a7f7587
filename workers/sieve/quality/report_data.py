"""What a quality report says: the systems side by side, the route sets, the fit, the notes.

Built by :mod:`sieve.quality.runner`; written out as Markdown, JSON and PNG plots by
:func:`sieve.quality.report.write_report`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sieve.quality.datasets import LabelledData
from sieve.quality.splits import Splits
from sieve.quality.systems import SystemRun
from sieve.quality.tables import (
    Summary,
    confusion,
    no_match_table,
    per_label_table,
    per_outcome_table,
    per_route_table,
)
from sieve.routeset import RouteSet


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

    @property
    def evaluated(self) -> LabelledData:
        """The examples the systems were measured on."""
        return self.data if self.split_name == "all" else self.splits.part(self.split_name)

    def tables(self) -> dict[str, object]:
        """The primary system's detailed tables."""
        run = self.primary.run
        return {
            "per_route": per_route_table(run, self.evaluated),
            "per_outcome": per_outcome_table(run),
            "per_label": per_label_table(run, self.evaluated),
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
