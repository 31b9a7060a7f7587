"""Prompt injection, measured: the share of review verdicts an injection changes.

The corpus (tests/fixtures/injections.jsonl, 224 attempts) goes through the real reviewer
against a double of a gullible model that obeys every instruction or fake reply it sees outside
the item's data markers (tests/injection_double.py; a test double, not a real LLM). The control
row feeds the same double a naive prompt that pastes the text raw, to show what the double does
with injections that escape. One table, per wrapper:

    .venv/bin/python load-tests/injection.py
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.injection_double import Table, corpus, measure_control, measure_reviewer  # noqa: E402


def print_table(reviewer: Table, control: Table) -> None:
    """Reviewer and control side by side, one row per wrapper, ``all`` last."""
    print("| wrapper | attempts | Sieve: changed | Sieve: rejected | Sieve: schema violations accepted "
          "| control: changed | control: rejected | control: schema violations accepted |")
    print("|---|---|---|---|---|---|---|---|")
    for wrapper in [*sorted(k for k in reviewer if k != "all"), "all"]:
        r, c = reviewer[wrapper], control[wrapper]
        print(f"| {wrapper} | {r['attempts']} | {r['changed']} | {r['rejected']} | "
              f"{r['schema_violations_accepted']} | {c['changed']} | {c['rejected']} | "
              f"{c['schema_violations_accepted']} |")


def main() -> int:
    attempts = corpus()
    reviewer, _ = asyncio.run(measure_reviewer(attempts))
    control = measure_control(attempts)
    print_table(reviewer, control)
    total = reviewer["all"]
    print(f"\nverdicts changed by an injection: {total['changed']}/{total['attempts']} "
          f"({total['changed'] / total['attempts']:.1%}); schema violations accepted: "
          f"{total['schema_violations_accepted'] + control['all']['schema_violations_accepted']}")
    return 0 if total["changed"] == 0 and total["schema_violations_accepted"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
