"""When a proposed route-set version may be promoted without a person: margins over the active one.

The evidence is ``sieve routes learn``'s comparison (``<out>.learn.json``): the active and
the proposed version measured on the same held-back labels, each by its primary system
(the one the worker runs: with its head when it has one). The proposal is favoured when,
on those labels,

- its automatic accuracy is at least the active one's plus ``accuracy_margin`` (a negative
  margin allows a small loss of accuracy for more automation), and its Wilson lower bound
  is at least ``min_accuracy`` when one is set;
- its automatic share is at least the active one's plus ``auto_margin``;

or, with ``min_added_accuracy``, both checks judge the decisions the two versions trade
instead (net: the proposal's right automatic decisions minus the active's, over its
automatic decisions minus the active's), read as true accuracy through the evidence's
``label_accuracy`` (:func:`~sieve.quality.targets.accuracy_from_agreement`): a proposal
that automates more must add decisions at least ``min_added_accuracy`` accurate; one that
automates less must give up decisions that were less accurate than that (better reviewed);
``auto_margin`` above 0 still asks for more automation. Labels from review traffic are
the active version's hard cases, where a proposal that automates much more is less
accurate on average even when every decision it adds is as good as the target asks.

And the evidence is about the version being promoted. With the workers' metrics of a
shadow run (:func:`shadow_counts`, :func:`shadow_checks`), the live traffic must agree too:
enough events shadowed, the candidate deciding equivalently where both versions decided
automatically (``min_agreement``: it must not contradict what the active version was sure
of; equivalent is the same outcome, and the same route unless the outcome is the route
set's default, so clean through a benign route and clean through none agree), and its
would-be automatic share at least the active one's plus ``auto_margin``. Every check is
reported, passed or not. Novel events need no check of their own: they go to review, so
they count against the automatic share.
"""

from __future__ import annotations

from dataclasses import dataclass

from sieve.quality.targets import accuracy_from_agreement


class EvidenceError(ValueError):
    """Evidence that does not say what a promotion needs; the message names what is missing."""


@dataclass(frozen=True)
class Margins:
    """What the proposal must beat the active version by (shares and accuracies, 0 to 1).

    ``min_added_accuracy``: the accuracy the automatic decisions the versions trade are
    judged against, instead of ``accuracy_margin`` and (unless ``auto_margin`` > 0) the share.
    """

    accuracy_margin: float = 0.0
    auto_margin: float = 0.0
    min_accuracy: float | None = None
    min_added_accuracy: float | None = None


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
    trade = _trade_check(evidence, active, proposed, margins.min_added_accuracy)
    if trade is not None:
        checks.append(trade)
    elif p_acc is None:
        checks.append(Check("accuracy", False, "the proposal decides nothing automatically"))
    else:
        floor = (a_acc or 0.0) + margins.accuracy_margin
        checks.append(Check("accuracy", p_acc >= floor,
                            f"automatic accuracy {p_acc:.3f}, needs {floor:.3f} (active {a_acc or 0.0:.3f} "
                            f"{margins.accuracy_margin:+.3f})"))
    if p_acc is not None and margins.min_accuracy is not None:
        ci = proposed.get("auto_accuracy_ci95")
        low = float(ci[0]) if isinstance(ci, list) and ci else 0.0
        checks.append(Check("accuracy lower bound", low >= margins.min_accuracy,
                            f"Wilson lower bound {low:.3f}, needs {margins.min_accuracy:.3f}"))
    if margins.min_added_accuracy is not None and margins.auto_margin <= 0:
        return checks  # the trade check judged the change of automatic share
    a_auto, p_auto = _number(active, "auto_share") or 0.0, _number(proposed, "auto_share") or 0.0
    checks.append(Check("automatic share", p_auto >= a_auto + margins.auto_margin,
                        f"{p_auto:.1%} automatic, needs {a_auto + margins.auto_margin:.1%} "
                        f"(active {a_auto:.1%} {margins.auto_margin:+.1%})"))
    return checks


def _trade_check(evidence: dict[str, object], active: dict[str, object], proposed: dict[str, object],
                 floor: float | None) -> Check | None:
    """The automatic decisions the versions trade, against ``floor``; None when none is asked or traded."""
    events = _number(proposed, "events")
    if floor is None or not events:
        return None
    sides = (("a", active), ("p", proposed))
    decided = {side: (_number(s, "auto_share") or 0.0) * events for side, s in sides}
    right = {side: (_number(s, "auto_accuracy") or 0.0) * decided[side] for side, s in sides}
    more = decided["p"] - decided["a"]
    if abs(more) < 0.5:  # not one decision traded: the plain accuracy check applies
        return None
    label_accuracy = evidence.get("label_accuracy", 1.0)
    q = float(label_accuracy) if isinstance(label_accuracy, int | float) else 1.0
    agreement = (right["p"] - right["a"]) / more  # net right per net decision traded
    accuracy = accuracy_from_agreement(agreement, q)
    read = f"{agreement:.3f} alike with the labels, {accuracy:.3f} accurate with labels right {q:.1%}"
    if more > 0:
        return Check("added accuracy", accuracy >= floor,
                     f"the {more:.0f} automatic decisions it adds are {read}; needs {floor:.3f}")
    return Check("given-up accuracy", accuracy < floor,
                 f"the {-more:.0f} automatic decisions it gives up were {read}; must be under {floor:.3f}")


@dataclass(frozen=True)
class ShadowMargins:
    """What the shadowed version must show on live traffic (the workers' shadow counters)."""

    min_events: int = 500
    min_agreement: float = 0.95
    auto_margin: float = 0.0


SHADOW_COUNTERS = ("events", "automatic", "active_automatic", "both_automatic", "both_automatic_agreed",
                   "both_automatic_equivalent")


def scrape(urls: list[str]) -> list[str]:
    """Each URL's text (workers' ``/metrics``); :class:`EvidenceError` when one does not answer."""
    import httpx

    texts = []
    for url in urls:
        try:
            response = httpx.get(url, timeout=10)
            response.raise_for_status()
        except httpx.HTTPError as exc:
            raise EvidenceError(f"shadow metrics {url}: {exc}") from None
        texts.append(response.text)
    return texts


def shadow_counts(scrapes: list[str], version: str) -> dict[str, float]:
    """The shadow counters of ``version`` summed over the workers' ``/metrics`` texts (every topology).

    A worker that does not count ``both_automatic_equivalent`` yet adds its
    ``both_automatic_agreed`` there (decided alike is decided equivalently).
    """
    from prometheus_client.parser import text_string_to_metric_families

    counts = dict.fromkeys(SHADOW_COUNTERS, 0.0)
    names = {f"sieve_shadow_{key}_total": key for key in SHADOW_COUNTERS}
    for text in scrapes:
        one = dict.fromkeys(SHADOW_COUNTERS, 0.0)
        seen = set()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                key = names.get(sample.name)
                if key is not None and sample.labels.get("shadow_version") == version:
                    one[key] += sample.value
                    seen.add(key)
        if "both_automatic_equivalent" not in seen:
            one["both_automatic_equivalent"] = one["both_automatic_agreed"]
        for key, value in one.items():
            counts[key] += value
    return counts


def shadow_checks(counts: dict[str, float], margins: ShadowMargins) -> list[Check]:
    """Checks on the shadow's live figures (see the module docstring).

    Enough events, agreement where the active version was sure of itself, and an automatic
    share at least the active one's plus ``auto_margin``.
    """
    events = counts["events"]
    checks = [Check("shadow events", events >= margins.min_events,
                    f"{events:.0f} events shadowed, needs {margins.min_events}")]
    both = counts["both_automatic"]
    agreement = counts["both_automatic_equivalent"] / both if both else 0.0
    alike = counts["both_automatic_agreed"] / both if both else 0.0
    checks.append(Check("shadow agreement", both > 0 and agreement >= margins.min_agreement,
                        f"{agreement:.1%} equivalent ({alike:.1%} alike, route too) on the {both:.0f} "
                        f"events both decided automatically, needs {margins.min_agreement:.1%}"))
    shadow_auto = counts["automatic"] / events if events else 0.0
    active_auto = counts["active_automatic"] / events if events else 0.0
    more = events > 0 and shadow_auto >= active_auto + margins.auto_margin
    checks.append(Check("shadow automatic share", more,
                        f"{shadow_auto:.1%} automatic on live traffic, needs "
                        f"{active_auto + margins.auto_margin:.1%} (active {active_auto:.1%} "
                        f"{margins.auto_margin:+.1%})"))
    return checks
