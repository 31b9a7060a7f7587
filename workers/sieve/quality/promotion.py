"""When a proposed route-set version may be promoted without a person: margins over the active one.

The evidence is ``sieve routes learn``'s comparison (``<out>.learn.json``): the active and
the proposed version measured on the same held-back labels, each by its primary system
(the one the worker runs: with its head when it has one). The proposal is favoured when,
on those labels,

- its automatic accuracy is at least the active one's plus ``accuracy_margin`` (a negative
  margin allows a small loss of accuracy for more automation), and its Wilson lower bound
  is at least ``min_accuracy`` when one is set;
- its automatic share is at least the active one's plus ``auto_margin``;

and the evidence is about the version being promoted. Every check is reported, passed or
not. Novel events need no check of their own: they go to review, so they count against the
automatic share.
"""

from __future__ import annotations

from dataclasses import dataclass


class EvidenceError(ValueError):
    """Evidence that does not say what a promotion needs; the message names what is missing."""


@dataclass(frozen=True)
class Margins:
    """What the proposal must beat the active version by (shares and accuracies, 0 to 1)."""

    accuracy_margin: float = 0.0
    auto_margin: float = 0.0
    min_accuracy: float | None = None


@dataclass(frozen=True)
class Check:
    """One comparison of the proposal with the active version."""

    name: str
    passed: bool
    detail: str


def _primary(evidence: dict[str, object], side: str) -> dict[str, object]:
    primary = evidence.get("primary")
    systems = evidence.get("systems")
    if not isinstance(primary, dict) or not isinstance(systems, list) or side not in primary:
        raise EvidenceError(f"no {side!r} primary system in the evidence (not a `routes learn` comparison?)")
    for system in systems:
        if isinstance(system, dict) and system.get("side") == side and system.get("system") == primary[side]:
            return system
    raise EvidenceError(f"the {side} primary system {primary[side]!r} has no figures in the evidence")


def _number(system: dict[str, object], key: str) -> float | None:
    value = system.get(key)
    return float(value) if isinstance(value, int | float) else None


def promotion_checks(evidence: dict[str, object], version: str, margins: Margins) -> list[Check]:
    """The checks a version must pass to be promoted on this evidence (see the module docstring)."""
    proposed_info = evidence.get("proposed")
    proposed_version = proposed_info.get("version") if isinstance(proposed_info, dict) else None
    active, proposed = _primary(evidence, "active"), _primary(evidence, "proposed")
    checks = [Check("version", proposed_version == version,
                    f"the evidence is about {proposed_version!r}, promoting {version!r}")]
    a_acc, p_acc = _number(active, "auto_accuracy"), _number(proposed, "auto_accuracy")
    if p_acc is None:
        checks.append(Check("accuracy", False, "the proposal decides nothing automatically"))
    else:
        floor = (a_acc or 0.0) + margins.accuracy_margin
        checks.append(Check("accuracy", p_acc >= floor,
                            f"automatic accuracy {p_acc:.3f}, needs {floor:.3f} (active {a_acc or 0.0:.3f} "
                            f"{margins.accuracy_margin:+.3f})"))
        if margins.min_accuracy is not None:
            ci = proposed.get("auto_accuracy_ci95")
            low = float(ci[0]) if isinstance(ci, list) and ci else 0.0
            checks.append(Check("accuracy lower bound", low >= margins.min_accuracy,
                                f"Wilson lower bound {low:.3f}, needs {margins.min_accuracy:.3f}"))
    a_auto, p_auto = _number(active, "auto_share") or 0.0, _number(proposed, "auto_share") or 0.0
    checks.append(Check("automatic share", p_auto >= a_auto + margins.auto_margin,
                        f"{p_auto:.1%} automatic, needs {a_auto + margins.auto_margin:.1%} "
                        f"(active {a_auto:.1%} {margins.auto_margin:+.1%})"))
    return checks
