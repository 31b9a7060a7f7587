"""What ``sieve routes learn`` writes: the active and the proposed version on the same held-back labels."""

from __future__ import annotations

from sieve.contracts import NEEDS_REVIEW
from sieve.quality.datasets import LabelledData
from sieve.quality.metrics import ratio, wilson
from sieve.quality.report_data import Report, SystemEntry
from sieve.routeset import RouteSet

SIDES = ("active", "proposed")


def _side(entry: SystemEntry) -> str:
    return "proposed" if entry.label.startswith("proposed") else "active"


def _primary(entries: list[SystemEntry]) -> SystemEntry:
    """What the worker decides with: the three-way policy with the head when the file has one."""
    three_way = [e for e in entries if e.run.kind == "three-way"]
    return next((e for e in three_way if "+ head" in e.label), three_way[0])


def _system(entry: SystemEntry) -> dict[str, object]:
    s = entry.summary
    low, high = wilson(s.auto_correct, s.auto)
    return {"side": _side(entry), "system": entry.label, "events": s.events, "auto_share": s.auto_share,
            "auto_accuracy": s.auto_accuracy, "auto_accuracy_ci95": [low, high],
            "review_share": s.review_share, "novel_share": s.novel_share}


def _per_route(entry: SystemEntry, test: LabelledData, route: str) -> dict[str, object]:
    """On the held-back labels naming ``route``: decided automatically, correctly, and routed to it."""
    run = entry.run
    names = run.index.route_names
    rows = [i for i, ex in enumerate(test.examples) if route in ex.labels]
    auto = [i for i in rows if run.outcomes[i] != NEEDS_REVIEW]
    correct = [i for i in auto if run.outcomes[i] == run.gold[i]]
    routed = [i for i in auto if run.routes[i] is not None and names[int(run.routes[i])] == route]  # type: ignore[arg-type]
    return {"auto_share": ratio(len(auto), len(rows)), "auto_correct_share": ratio(len(correct), len(rows)),
            "routed_to_it_share": ratio(len(routed), len(rows))}


def compare(report: Report, test: LabelledData, active: RouteSet, proposed: RouteSet,
            changes: list[dict[str, object]]) -> dict[str, object]:
    """JSON-ready: the versions, the routes' changes, every system, the primary ones per label route."""
    primary = {side: _primary([e for e in report.systems if _side(e) == side]) for side in SIDES}
    known = {route.name for route in active.routes}
    label_routes = sorted({label for ex in test.examples for label in ex.labels})
    return {
        "active": {"name": active.name, "version": active.version, "routes": len(active.routes)},
        "proposed": {"name": proposed.name, "version": proposed.version, "routes": len(proposed.routes)},
        "held_back_labels": len(test),
        "changes": changes,
        "systems": [_system(entry) for entry in report.systems],
        "primary": {side: primary[side].label for side in SIDES},
        "label_routes": [
            {"route": route, "in_active": route in known,
             "events": sum(1 for ex in test.examples if route in ex.labels),
             **{side: _per_route(primary[side], test, route) for side in SIDES}}
            for route in label_routes
        ],
    }


def _pct(value: object) -> str:
    return "-" if value is None else f"{float(value):.1%}"  # type: ignore[arg-type]


def _label_accuracy_lines(c: dict[str, object]) -> list[str]:
    """What the fit aimed at when the labels are taken as right less than always."""
    q, on_labels = c.get("label_accuracy", 1.0), c.get("targets_on_labels")
    if not isinstance(q, int | float) or q >= 1.0 or not isinstance(on_labels, dict):
        return []
    return ["", f"The labels are taken as right {q:.1%} of the time: the fit's targets on true accuracy "
                f"({c.get('targets')}) were read as agreement with the labels ({on_labels}). The accuracies "
                "below are agreement with the labels."]


def render_comparison(c: dict[str, object]) -> str:
    """The comparison as short Markdown."""
    active, proposed, fit = c["active"], c["proposed"], c.get("fit") or {}
    assert isinstance(active, dict) and isinstance(proposed, dict) and isinstance(fit, dict)
    lines = [
        f"# Route set {proposed['name']}: learned version {proposed['version']} against active "
        f"{active['version']}",
        "",
        f"Command: `{c.get('command', '')}`",
        "",
        f"Examples from the labels' train split only; {fit.get('refitted', 'thresholds')} refitted on the "
        f"calibration split; both versions measured on the same {c['held_back_labels']} held-back (test) "
        "labels.",
        *_label_accuracy_lines(c),
        "",
        "## Routes changed",
        "",
        "| route | outcome | new | training labels | added | near-duplicates left out |",
        "|---|---|---|---|---|---|",
    ]
    for ch in c["changes"]:  # type: ignore[attr-defined]
        lines.append(f"| {ch['route']} | {ch['outcome']} | {'yes' if ch['new'] else ''} | {ch['pool']} | "
                     f"{len(ch['added'])} | {ch['near_duplicates']} |")
    lines += ["", "## Systems on the held-back labels", "",
              "| version | system | auto | auto accuracy (95% CI) | review | novel |",
              "|---|---|---|---|---|---|"]
    for s in c["systems"]:  # type: ignore[attr-defined]
        low, high = s["auto_accuracy_ci95"]
        lines.append(f"| {s['side']} | {s['system']} | {_pct(s['auto_share'])} | {_pct(s['auto_accuracy'])} "
                     f"({low:.3f}-{high:.3f}) | {_pct(s['review_share'])} | {_pct(s['novel_share'])} |")
    primary = c["primary"]
    assert isinstance(primary, dict)
    lines += ["", f"## Per route the labels name (active: {primary['active']}; "
              f"proposed: {primary['proposed']})",
              "", "| route | in active | events | active auto / correct / routed to it | "
              "proposed auto / correct / routed to it |", "|---|---|---|---|---|"]
    for r in c["label_routes"]:  # type: ignore[attr-defined]
        keys = ("auto_share", "auto_correct_share", "routed_to_it_share")
        cells = [" / ".join(_pct(r[side][k]) for k in keys) for side in SIDES]
        lines.append(f"| {r['route']} | {'yes' if r['in_active'] else 'no'} | {r['events']} | {cells[0]} | "
                     f"{cells[1]} |")
    return "\n".join(lines) + "\n"
