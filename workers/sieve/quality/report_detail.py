"""The report sections on the primary system: its decisions, per route, per outcome, per label, confusion."""

from __future__ import annotations

import numpy as np

from sieve.quality.report_format import MAX_ROWS, Page, ci, noisy, num, pct, table
from sieve.quality.tables import NOISY_BELOW

LARGEST = 10  # a long per-outcome table shows the largest outcomes, then the lowest F1
CONFUSION_MAX = 12  # gold outcomes shown as a full confusion table; more: the largest off-diagonal cells
OFF_DIAGONAL = 25


def decisions(page: Page) -> list[str]:
    """Decided automatically, reviewed, why, and the precision of each automatic outcome."""
    primary = page.report.primary
    s = primary.summary
    out = [f"Primary system: **{primary.label}**.", ""]
    out += [
        f"- Decided automatically: {s.auto} of {s.events} ({pct(s.auto_share)}), accuracy "
        f"{ci(s.auto_correct, s.auto)} (Wilson 95%).",
        f"- Sent to review: {s.review} ({pct(s.review_share)}).",
        "- Reasons: " + ", ".join(f"{k} {v}" for k, v in sorted(s.reasons.items())) + ".",
        "",
    ]
    return out + table(
        ["automatic outcome", "decided", "correct", "precision [95% CI]", "gold examples"],
        [
            [
                o,
                str(v["decided"]),
                str(v["correct"]),
                ci(int(v["correct"] or 0), int(v["decided"] or 0)),
                str(v["gold"]),
            ]
            for o, v in s.outcome_precision.items()
        ],
    )


def per_route(page: Page) -> list[str]:
    """Precision / recall / F1 per route, the routes with the most support first."""
    out = [
        "A route named like a label is measured against that label (unknown labels left out); "
        f"others against their outcome (precision only). Recall counts reviewed events as misses. "
        f"*noisy*: fewer than {NOISY_BELOW} gold examples.",
        "",
    ]
    rows = page.rows("per_route")
    ordered = sorted(rows, key=lambda r: -(r["support"] or r["decided"] or 0))
    out += table(
        ["route", "outcome", "against", "support", "decided", "precision", "recall", "F1", "noisy"],
        [
            [
                str(r["route"]),
                str(r["outcome"]),
                str(r["against"]),
                str(r["support"] if r["support"] is not None else "—"),
                str(r["decided"]),
                num(r["precision"]),
                num(r["recall"]),
                num(r["f1"]),
                noisy(r),
            ]
            for r in ordered[:MAX_ROWS]
        ],
    )
    if len(rows) > MAX_ROWS:
        out += ["", f"({len(rows) - MAX_ROWS} more routes in report.json.)"]
    return out


def per_outcome(page: Page) -> list[str]:
    """Precision / recall / F1 per gold outcome (and the macro F1 where there are many)."""
    rows = page.rows("per_outcome")
    out: list[str] = []
    f1s = [r["f1"] for r in rows if r["f1"] is not None]
    if len(rows) > 3:
        out += [f"Macro F1 over {len(rows)} outcomes: {num(float(np.mean(f1s)) if f1s else None)}.", ""]
    ordered = sorted(rows, key=lambda r: (-(r["support"] or 0), str(r["outcome"])))
    shown = (
        ordered
        if len(ordered) <= MAX_ROWS
        else ordered[:LARGEST]
        + sorted(ordered, key=lambda r: r["f1"] if r["f1"] is not None else 2.0)[: MAX_ROWS - LARGEST]
    )
    out += table(
        ["outcome", "support", "decided", "precision", "recall", "F1", "reviewed", "noisy"],
        [
            [
                str(r["outcome"]),
                str(r["support"]),
                str(r["decided"]),
                num(r["precision"]),
                num(r["recall"]),
                num(r["f1"]),
                str(r["reviewed"]),
                noisy(r),
            ]
            for r in shown
        ],
    )
    if len(ordered) > MAX_ROWS:
        lowest = MAX_ROWS - LARGEST
        out += ["", f"(The {LARGEST} largest and the {lowest} lowest-F1 outcomes; all in report.json.)"]
    return out


def per_label(page: Page) -> list[str]:
    """Each category's examples: caught, reviewed, missed (data with one positive outcome only)."""
    rows = page.rows("per_label")
    if not rows:
        return ["Not applicable: the data has no single positive outcome for its labels (see per outcome)."]
    out = [
        "Each category's examples: decided as the positive outcome, sent to review, or missed. "
        f"*noisy*: fewer than {NOISY_BELOW} examples.",
        "",
    ]
    return out + table(
        ["label", "count", "unknown", "caught", "reviewed", "missed", "noisy"],
        [
            [
                str(r["label"]),
                str(r["count"]),
                str(r["unknown"]),
                pct(r["caught_share"]),
                pct(r["reviewed_share"]),
                pct(r["missed_share"]),
                noisy(r),
            ]
            for r in rows
        ],
    )


def confusion(page: Page) -> list[str]:
    """Gold outcome x decided outcome; for many outcomes, the most frequent mistakes only."""
    counts = page.tables["confusion"]
    assert isinstance(counts, dict)
    decided_names = sorted({d for row in counts.values() for d in row})
    if len(counts) <= CONFUSION_MAX:
        return table(
            ["gold \\ decided", *decided_names],
            [[g, *[str(counts[g].get(d, 0)) for d in decided_names]] for g in sorted(counts)],
        )
    pairs = sorted(((n, g, d) for g, row in counts.items() for d, n in row.items() if d != g), reverse=True)
    out = [
        f"{len(counts)} gold outcomes: the {OFF_DIAGONAL} most frequent off-diagonal cells (the full "
        "table is in report.json).",
        "",
    ]
    return out + table(["gold", "decided", "events"], [[g, d, str(n)] for n, g, d in pairs[:OFF_DIAGONAL]])
