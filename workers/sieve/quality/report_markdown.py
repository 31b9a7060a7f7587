"""A :class:`~sieve.quality.report_data.Report` as Markdown, one function per section.

Every report has every section (:data:`SECTIONS`, in order), each saying so when it
does not apply: setup, side by side, decisions of the primary system, per route,
per outcome, per label, confusion, coverage-risk, cascade, far from every example, fit.
"""

from __future__ import annotations

from collections.abc import Callable

from sieve.quality import report_detail
from sieve.quality.report_data import Report
from sieve.quality.report_format import CPT_KEYS, Page, ci, num, pct, table
from sieve.quality.tables import no_match_table


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


def _novelty(novelty: object) -> str:
    if not isinstance(novelty, dict):
        return "no threshold"
    return (f"threshold {novelty['threshold']:g} ({pct(novelty['baseline'])} of calibration novel), "
            f"novel events → {novelty['on_novel']}")


def _setup(page: Page) -> list[str]:
    report = page.report
    record = report.splits.record
    out: list[str] = []
    if report.command:
        out += ["```", report.command, "```", ""]
    out += [
        f"- Data: **{report.data.name}** — {report.data.source}; licence {report.data.licence}.",
        f"- Evaluated on: **{report.split_name}** ({len(report.evaluated)} examples).",
        f"- Split: {record.method}, seed {record.seed}, sizes "
        + ", ".join(f"{k} {v}" for k, v in record.sizes.items())
        + ", digests "
        + ", ".join(f"{k} `{v}`" for k, v in record.digests.items())
        + (f", at most {record.sample} per split (sample)" if record.sample else "")
        + ".",
        f"- Encoder: `{report.encoder_id}`; decisions by the worker's own `match_batch` and `decide_scores`.",
        "",
    ]
    out += table(
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
    return out


def _side_by_side(page: Page) -> list[str]:
    out = [
        "Same split, same encoder. *Auto*: decided without review; *accuracy with review*: gold labels "
        "standing in for the reviewer; *router alone*: every event decided by the router (no review); "
        "CPT(x): share deferred to review to recover x of the gap between the router alone and a "
        "perfect reviewer (RouteLLM); APGR: area under that recovery curve (0.5 = random deferral). "
        "*Novel*: events above the route set's novelty threshold (— when it has none); they never get "
        "the default outcome automatically.",
        "",
    ]
    rows = []
    for entry in page.report.systems:
        s = entry.summary
        rows.append(
            [
                entry.label,
                entry.scoring,
                entry.policy,
                pct(s.auto_share),
                ci(s.auto_correct, s.auto),
                pct(s.review_share),
                pct(s.novel_share),
                num(s.accuracy_with_review),
                num(s.forced_accuracy),
                num(1 - s.coverage_risk["0.75"]),
                " / ".join(pct(s.cascade.cpt[k], 0) for k in CPT_KEYS),
                num(s.cascade.apgr),
            ]
        )
    header = ["system", "scoring", "policy", "auto", "auto accuracy [95% CI]", "review", "novel"]
    header += ["accuracy with review", "router alone", "accuracy, 75% most confident"]
    header += ["CPT " + "/".join(k.rstrip("%") for k in CPT_KEYS), "APGR"]
    return out + table(header, rows)


def _coverage_risk(page: Page) -> list[str]:
    systems = page.report.systems
    out = [
        "The router's answer without review, events ranked by confidence (distance to the decision "
        "boundary): the error rate among the most confident share. AURC: the mean risk over all "
        "coverages.",
        "",
    ]
    coverages = list(systems[0].summary.coverage_risk)
    out += table(
        ["system", *[f"risk @ {float(c):.0%}" for c in coverages], "AURC"],
        [
            [e.label, *[num(e.summary.coverage_risk[c]) for c in coverages], num(e.summary.aurc)]
            for e in systems
        ],
    )
    return out + page.plot("coverage_risk")


def _cascade(page: Page) -> list[str]:
    systems = page.report.systems
    out = [
        "Gold labels stand in for the reviewer: the least confident share goes to review and comes "
        "back right. Accuracy of all events against the share deferred.",
        "",
    ]
    deferrals = list(systems[0].summary.cascade.accuracy_at)[1:]  # the first: nothing deferred
    out += table(
        [
            "system",
            "router alone",
            *[f"{float(d):.0%} deferred" for d in deferrals],
            *[f"CPT({k})" for k in CPT_KEYS],
            "APGR",
        ],
        [
            [
                e.label,
                num(e.summary.cascade.router_accuracy),
                *[num(e.summary.cascade.accuracy_at[d]) for d in deferrals],
                *[pct(e.summary.cascade.cpt[k]) for k in CPT_KEYS],
                num(e.summary.cascade.apgr),
            ]
            for e in systems
        ],
    )
    return out + page.plot("cascade")


def _far_from_every_example(page: Page) -> list[str]:
    out = [
        "Events no route accepts and none holds in its review band (reason `no_match`): what they got "
        "(the set's `defaults.no_match`: its default outcome, or review) and what they really were.",
        "",
    ]
    rows = []
    for e in page.report.systems:
        nm = no_match_table(e.run)
        given, gold = nm["given"], nm["gold"]
        assert isinstance(given, dict) and isinstance(gold, dict)
        rows.append(
            [
                e.label,
                str(nm["events"]),
                pct(nm["share"]),  # type: ignore[arg-type]
                ", ".join(f"{k} {v}" for k, v in sorted(given.items())) or "—",
                ", ".join(f"{k} {v}" for k, v in sorted(gold.items(), key=lambda kv: -kv[1])[:5]) or "—",
                pct(nm["gold_default_share"]),  # type: ignore[arg-type]
            ]
        )
    return out + table(["system", "events", "share", "given", "gold (top 5)", "gold = default"], rows)


def _fit(page: Page) -> list[str]:
    report = page.report
    out: list[str] = []
    for fit in report.fit:
        nearest = fit["nearest"]
        assert isinstance(nearest, dict)
        cal = nearest["calibration"]
        out += [
            f"**{fit['label']}** (`{fit['route_file']}`): targets "
            f"{_targets(nearest['targets'])}. On calibration: review {pct(cal['review_share'])}, "
            f"auto accuracy {num(cal['auto_accuracy'])}, feasible {cal['feasible']}; shared "
            f"thresholds {_global(nearest['global'])}; routes with their own: "
            f"{len(nearest['refined_routes'])}; no match → {nearest['no_match']}; "
            f"novelty → {_novelty(nearest.get('novelty'))}."
        ]
        head = fit["head"]
        if isinstance(head, dict):
            hc = head["calibration"]
            out += [
                f"  With the head: review {pct(hc['review_share'])}, auto accuracy "
                f"{num(hc['auto_accuracy'])}, feasible {hc['feasible']}, no match → {head['no_match']}."
            ]
        sr = fit["semantic_router_fit"]
        assert isinstance(sr, dict)
        out += [
            f"  semantic-router's fit: threshold {sr['threshold']:g} (calibration accuracy "
            f"{num(sr['calibration_accuracy'])}).",
            "",
        ]
    if not report.fit:
        out += [
            "Not fitted: thresholds as written in the route file(s). `sieve fit` chooses them on the "
            "calibration split."
        ]
    if report.files:
        out += ["", "Files written: " + ", ".join(f"{k} `{v}`" for k, v in report.files.items()) + "."]
    return out


_RENDERERS: tuple[tuple[str, Callable[[Page], list[str]]], ...] = (
    ("## Setup", _setup),
    ("## Side by side", _side_by_side),
    ("## Decisions", report_detail.decisions),
    ("## Per route", report_detail.per_route),
    ("## Per outcome", report_detail.per_outcome),
    ("## Per label", report_detail.per_label),
    ("## Confusion", report_detail.confusion),
    ("## Coverage–risk", _coverage_risk),
    ("## Cascade", _cascade),
    ("## Far from every example", _far_from_every_example),
    ("## Fit", _fit),
)
SECTIONS = tuple(heading for heading, _ in _RENDERERS)


def render_markdown(report: Report, plots: dict[str, str]) -> str:
    """The report as Markdown (``plots``: the plot files written beside it, by name)."""
    page = Page(report, plots, report.tables())
    out: list[str] = [f"# {report.title}", ""]
    for position, (heading, render) in enumerate(_RENDERERS):
        if position:
            out.append("")
        out += [heading, "", *render(page)]
    return "\n".join(out) + "\n"
