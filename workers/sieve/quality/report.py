"""Write a :class:`~sieve.quality.runner.Report` as Markdown, JSON and PNG plots into one folder.

Sections (each one present in every report, saying so when it does not apply):
setup, side by side, decisions of the primary system, per route, per outcome,
per label, confusion, coverage-risk, cascade, far from every example, fit.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sieve.quality.evaluate import (
    NOISY_BELOW,
    cascade_curve,
    coverage_risk_curve,
    no_match_table,
    wilson,
)
from sieve.quality.runner import Report

SECTIONS = (
    "## Setup",
    "## Side by side",
    "## Decisions",
    "## Per route",
    "## Per outcome",
    "## Per label",
    "## Confusion",
    "## Coverage–risk",
    "## Cascade",
    "## Far from every example",
    "## Fit",
)
MAX_ROWS = 40  # longer tables: the rows with the most support in Markdown, all of them in the JSON


def _pct(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{100 * value:.{digits}f}%"


def _num(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines.extend("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows)
    return lines


def _ci(correct: int, total: int) -> str:
    if total == 0:
        return "—"
    low, high = wilson(correct, total)
    return f"{correct / total:.3f} [{low:.3f}, {high:.3f}]"


def render_markdown(report: Report, plots: dict[str, str]) -> str:
    """The report as Markdown."""
    out: list[str] = [f"# {report.title}", ""]
    record = report.splits.record
    evaluated = report.data if report.split_name == "all" else report.splits.part(report.split_name)
    out += ["## Setup", ""]
    if report.command:
        out += ["```", report.command, "```", ""]
    out += [
        f"- Data: **{report.data.name}** — {report.data.source}; licence {report.data.licence}.",
        f"- Evaluated on: **{report.split_name}** ({len(evaluated)} examples).",
        f"- Split: {record.method}, seed {record.seed}, sizes "
        + ", ".join(f"{k} {v}" for k, v in record.sizes.items())
        + ", digests "
        + ", ".join(f"{k} `{v}`" for k, v in record.digests.items())
        + (f", at most {record.sample} per split (sample)" if record.sample else "")
        + ".",
        f"- Encoder: `{report.encoder_id}`; decisions by the worker's own `match_batch` and `decide_scores`.",
        "",
    ]
    out += _table(
        [
            "route file",
            "set",
            "version",
            "routes",
            "examples",
            "default",
            "accept / review / margin",
            "no match",
            "routes with own thresholds",
        ],
        [
            [
                str(rs["file"]),
                str(rs["name"]),
                f"`{rs['version']}`",
                str(rs["routes"]),
                str(rs["examples"]),
                str(rs["default_outcome"]),
                "{accept} / {review} / {margin}".format(**rs["defaults"]),  # type: ignore[arg-type]
                str(rs["defaults"]["no_match"]),  # type: ignore[index]
                str(rs["routes_with_own_thresholds"]),
            ]
            for rs in report.route_sets
        ],
    )
    for note in report.notes:
        out += ["", f"> {note}"]
    out += [
        "",
        "## Side by side",
        "",
        "Same split, same encoder. *Auto*: decided without review; *accuracy with review*: gold labels "
        "standing in for the reviewer; *router alone*: every event decided by the router (no review); "
        "CPT(x): share deferred to review to recover x of the gap between the router alone and a "
        "perfect reviewer (RouteLLM); APGR: area under that recovery curve (0.5 = random deferral).",
        "",
    ]
    rows = []
    for entry in report.systems:
        s = entry.summary
        cpt = s.cascade.cpt
        rows.append(
            [
                entry.label,
                entry.scoring,
                entry.policy,
                _pct(s.auto_share),
                _ci(s.auto_correct, s.auto),
                _pct(s.review_share),
                _num(s.accuracy_with_review),
                _num(s.forced_accuracy),
                _num(1 - s.coverage_risk["0.75"]),
                " / ".join(_pct(cpt[k], 0) for k in ("50%", "80%", "95%")),
                _num(s.cascade.apgr),
            ]
        )
    out += _table(
        [
            "system",
            "scoring",
            "policy",
            "auto",
            "auto accuracy [95% CI]",
            "review",
            "accuracy with review",
            "router alone",
            "accuracy, 75% most confident",
            "CPT 50/80/95",
            "APGR",
        ],
        rows,
    )
    primary = report.primary
    s = primary.summary
    out += ["", "## Decisions", "", f"Primary system: **{primary.label}**.", ""]
    out += [
        f"- Decided automatically: {s.auto} of {s.events} ({_pct(s.auto_share)}), accuracy "
        f"{_ci(s.auto_correct, s.auto)} (Wilson 95%).",
        f"- Sent to review: {s.review} ({_pct(s.review_share)}).",
        "- Reasons: " + ", ".join(f"{k} {v}" for k, v in sorted(s.reasons.items())) + ".",
        "",
    ]
    out += _table(
        ["automatic outcome", "decided", "correct", "precision [95% CI]", "gold examples"],
        [
            [
                o,
                str(v["decided"]),
                str(v["correct"]),
                _ci(int(v["correct"] or 0), int(v["decided"] or 0)),
                str(v["gold"]),
            ]
            for o, v in s.outcome_precision.items()
        ],
    )
    tables = report.tables()
    out += [
        "",
        "## Per route",
        "",
        "A route named like a label is measured against that label (unknown labels left out); "
        f"others against their outcome (precision only). Recall counts reviewed events as misses. "
        f"*noisy*: fewer than {NOISY_BELOW} gold examples.",
        "",
    ]
    per_route = tables["per_route"]
    assert isinstance(per_route, list)
    per_route_sorted = sorted(per_route, key=lambda r: -(r["support"] or r["decided"] or 0))
    out += _table(
        ["route", "outcome", "against", "support", "decided", "precision", "recall", "F1", "noisy"],
        [
            [
                str(r["route"]),
                str(r["outcome"]),
                str(r["against"]),
                str(r["support"] if r["support"] is not None else "—"),
                str(r["decided"]),
                _num(r["precision"]),
                _num(r["recall"]),
                _num(r["f1"]),
                "noisy" if r["noisy"] else "",
            ]
            for r in per_route_sorted[:MAX_ROWS]
        ],
    )
    if len(per_route) > MAX_ROWS:
        out += ["", f"({len(per_route) - MAX_ROWS} more routes in report.json.)"]
    per_outcome = tables["per_outcome"]
    assert isinstance(per_outcome, list)
    out += ["", "## Per outcome", ""]
    f1s = [r["f1"] for r in per_outcome if r["f1"] is not None]
    if len(per_outcome) > 3:
        out += [
            f"Macro F1 over {len(per_outcome)} outcomes: {_num(float(np.mean(f1s)) if f1s else None)}.",
            "",
        ]
    ordered = sorted(per_outcome, key=lambda r: (-(r["support"] or 0), str(r["outcome"])))
    shown = (
        ordered
        if len(ordered) <= MAX_ROWS
        else ordered[:10]
        + sorted(ordered, key=lambda r: r["f1"] if r["f1"] is not None else 2.0)[: MAX_ROWS - 10]
    )
    out += _table(
        ["outcome", "support", "decided", "precision", "recall", "F1", "reviewed", "noisy"],
        [
            [
                str(r["outcome"]),
                str(r["support"]),
                str(r["decided"]),
                _num(r["precision"]),
                _num(r["recall"]),
                _num(r["f1"]),
                str(r["reviewed"]),
                "noisy" if r["noisy"] else "",
            ]
            for r in shown
        ],
    )
    if len(ordered) > MAX_ROWS:
        out += ["", f"(The 10 largest and the {MAX_ROWS - 10} lowest-F1 outcomes; all in report.json.)"]
    per_label = tables["per_label"]
    assert isinstance(per_label, list)
    out += ["", "## Per label", ""]
    if per_label:
        out += [
            "Each category's examples: decided as the positive outcome, sent to review, or missed. "
            f"*noisy*: fewer than {NOISY_BELOW} examples.",
            "",
        ]
        out += _table(
            ["label", "count", "unknown", "caught", "reviewed", "missed", "noisy"],
            [
                [
                    str(r["label"]),
                    str(r["count"]),
                    str(r["unknown"]),
                    _pct(r["caught_share"]),
                    _pct(r["reviewed_share"]),
                    _pct(r["missed_share"]),
                    "noisy" if r["noisy"] else "",
                ]
                for r in per_label
            ],
        )
    else:
        out += ["Not applicable: the data has no single positive outcome for its labels (see per outcome)."]
    table = tables["confusion"]
    assert isinstance(table, dict)
    out += ["", "## Confusion", ""]
    decided_names = sorted({d for row in table.values() for d in row})
    if len(table) <= 12:
        out += _table(
            ["gold \\ decided", *decided_names],
            [[g, *[str(table[g].get(d, 0)) for d in decided_names]] for g in sorted(table)],
        )
    else:
        pairs = sorted(
            ((n, g, d) for g, row in table.items() for d, n in row.items() if d != g), reverse=True
        )[:25]
        out += [
            f"{len(table)} gold outcomes: the 25 most frequent off-diagonal cells (the full table is in "
            "report.json).",
            "",
        ]
        out += _table(["gold", "decided", "events"], [[g, d, str(n)] for n, g, d in pairs])
    out += [
        "",
        "## Coverage–risk",
        "",
        "The router's answer without review, events ranked by confidence (distance to the decision "
        "boundary): the error rate among the most confident share. AURC: the mean risk over all "
        "coverages.",
        "",
    ]
    coverages = list(report.systems[0].summary.coverage_risk)
    out += _table(
        ["system", *[f"risk @ {float(c):.0%}" for c in coverages], "AURC"],
        [
            [e.label, *[_num(e.summary.coverage_risk[c]) for c in coverages], _num(e.summary.aurc)]
            for e in report.systems
        ],
    )
    if "coverage_risk" in plots:
        out += ["", f"![coverage-risk]({plots['coverage_risk']})"]
    out += [
        "",
        "## Cascade",
        "",
        "Gold labels stand in for the reviewer: the least confident share goes to review and comes "
        "back right. Accuracy of all events against the share deferred.",
        "",
    ]
    deferrals = list(report.systems[0].summary.cascade.accuracy_at)
    out += _table(
        [
            "system",
            "router alone",
            *[f"{float(d):.0%} deferred" for d in deferrals[1:]],
            "CPT(50%)",
            "CPT(80%)",
            "CPT(95%)",
            "APGR",
        ],
        [
            [
                e.label,
                _num(e.summary.cascade.router_accuracy),
                *[_num(e.summary.cascade.accuracy_at[d]) for d in deferrals[1:]],
                *[_pct(e.summary.cascade.cpt[k]) for k in ("50%", "80%", "95%")],
                _num(e.summary.cascade.apgr),
            ]
            for e in report.systems
        ],
    )
    if "cascade" in plots:
        out += ["", f"![cascade]({plots['cascade']})"]
    out += [
        "",
        "## Far from every example",
        "",
        "Events no route accepts and none holds in its review band (reason `no_match`): what they got "
        "(the set's `defaults.no_match`: its default outcome, or review) and what they really were.",
        "",
    ]
    rows = []
    for e in report.systems:
        nm = no_match_table(e.run)
        given = nm["given"]
        gold = nm["gold"]
        assert isinstance(given, dict) and isinstance(gold, dict)
        rows.append(
            [
                e.label,
                str(nm["events"]),
                _pct(nm["share"]),  # type: ignore[arg-type]
                ", ".join(f"{k} {v}" for k, v in sorted(given.items())) or "—",
                ", ".join(f"{k} {v}" for k, v in sorted(gold.items(), key=lambda kv: -kv[1])[:5]) or "—",
                _pct(nm["gold_default_share"]),  # type: ignore[arg-type]
            ]
        )
    out += _table(["system", "events", "share", "given", "gold (top 5)", "gold = default"], rows)
    out += ["", "## Fit", ""]
    if report.fit:
        for fit in report.fit:
            nearest = fit["nearest"]
            assert isinstance(nearest, dict)
            cal = nearest["calibration"]
            out += [
                f"**{fit['label']}** (`{fit['route_file']}`): targets "
                f"{_targets(nearest['targets'])}. On calibration: review {_pct(cal['review_share'])}, "
                f"auto accuracy {_num(cal['auto_accuracy'])}, feasible {cal['feasible']}; shared "
                f"thresholds {_global(nearest['global'])}; routes with their own: "
                f"{len(nearest['refined_routes'])}; no match → {nearest['no_match']}."
            ]
            head = fit["head"]
            if isinstance(head, dict):
                hc = head["calibration"]
                out += [
                    f"  With the head: review {_pct(hc['review_share'])}, auto accuracy "
                    f"{_num(hc['auto_accuracy'])}, feasible {hc['feasible']}, no match → {head['no_match']}."
                ]
            sr = fit["semantic_router_fit"]
            assert isinstance(sr, dict)
            out += [
                f"  semantic-router's fit: threshold {sr['threshold']:g} (calibration accuracy "
                f"{_num(sr['calibration_accuracy'])}).",
                "",
            ]
    else:
        out += [
            "Not fitted: thresholds as written in the route file(s). `sieve fit` chooses them on the "
            "calibration split."
        ]
    if report.files:
        out += ["", "Files written: " + ", ".join(f"{k} `{v}`" for k, v in report.files.items()) + "."]
    return "\n".join(out) + "\n"


def _targets(targets: dict[str, object]) -> str:
    parts = [f"precision {k} ≥ {v}" for k, v in dict(targets["precision"]).items()]  # type: ignore[call-overload]
    if targets.get("accuracy") is not None:
        parts.append(f"accuracy ≥ {targets['accuracy']}")
    z = float(targets["z"])  # type: ignore[arg-type]
    return ", ".join(parts) + (f" (Wilson lower bound, z={z:g})" if z > 0 else " (point estimate)")


def _global(params: dict[str, object]) -> str:
    return (
        f"accept {params['accept']}, default-outcome routes accept {params['default_accept']}, "
        f"band width {params['width']}, margin {params['margin']}"
    )


def write_plots(report: Report, directory: Path) -> dict[str, str]:
    """coverage_risk.png and cascade.png, one line per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots: dict[str, str] = {}
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for entry in report.systems:
        correct = np.array(entry.run.forced, dtype=object) == np.array(entry.run.gold, dtype=object)
        coverage, risk = coverage_risk_curve(correct, entry.run.confidence)
        axes.plot(coverage, risk, label=entry.label, linewidth=1.2)
    axes.set_xlabel("coverage (share decided, most confident first)")
    axes.set_ylabel("risk (error rate)")
    axes.set_title(f"Coverage–risk, {report.data.name} {report.split_name}")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(directory / "coverage_risk.png", dpi=110)
    plt.close(figure)
    plots["coverage_risk"] = "coverage_risk.png"

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for entry in report.systems:
        correct = np.array(entry.run.forced, dtype=object) == np.array(entry.run.gold, dtype=object)
        deferred, accuracy = cascade_curve(correct, entry.run.confidence)
        line = axes.plot(deferred, accuracy, label=entry.label, linewidth=1.2)
        s = entry.summary
        if s.review:  # the system's own operating point
            axes.plot([s.review_share], [s.accuracy_with_review], "o", color=line[0].get_color())
    axes.plot(
        [0, 1],
        [report.systems[0].summary.cascade.router_accuracy, 1.0],
        ":",
        color="grey",
        label="random deferral (first system)",
    )
    axes.set_xlabel("share deferred to review (least confident first)")
    axes.set_ylabel("accuracy, reviewer = gold")
    axes.set_title(f"Cascade, {report.data.name} {report.split_name}")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(directory / "cascade.png", dpi=110)
    plt.close(figure)
    plots["cascade"] = "cascade.png"
    return plots


def write_report(report: Report, directory: Path, *, plots: bool = True) -> dict[str, Path]:
    """report.md, report.json and (unless ``plots`` is off) the PNG plots."""
    directory.mkdir(parents=True, exist_ok=True)
    written = write_plots(report, directory) if plots else {}
    markdown = render_markdown(report, written)
    (directory / "report.md").write_text(markdown, encoding="utf-8")
    (directory / "report.json").write_text(
        json.dumps(report.as_dict(), indent=2, default=_json_default) + "\n", encoding="utf-8"
    )
    paths = {"markdown": directory / "report.md", "json": directory / "report.json"}
    paths.update({name: directory / file for name, file in written.items()})
    return paths


def _json_default(value: object) -> object:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
