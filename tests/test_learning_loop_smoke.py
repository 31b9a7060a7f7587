"""load-tests/learning_loop.py runs end to end at a tiny size (trivial encoder), so it cannot go stale.

Three windows of 40 events of a synthetic labelled set (examples of the shipped moderation
routes with their route's outcome, and everyday chatter as clean) go through the real
``sieve worker`` and ``sieve review`` on the session's dev broker; the reviewer's LLM is the
script's oracle double; half the automatic decisions are audited; each candidate is shadowed
through the next window before its promotion is judged (``--shadow``), and what it would
overturn is audited too (``--shadow-audit-share``); each candidate keeps the active version's
automatic decisions (``--anchors``). Figures are not asserted, only that they
are there and consistent.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import REPO

pytestmark = pytest.mark.integration

FIELDS = {"window", "events", "labels_before", "automatic_share", "automatic_accuracy",
          "automatic_accuracy_ci", "novel_share", "review_share", "llm_calls", "promotions", "versions"}


def tiny_labelled_set(path: Path) -> None:
    """120 rows: 80 examples of the shipped routes (their outcome), 40 clean everyday lines, shuffled."""
    route_set = yaml.safe_load((REPO / "routes" / "moderation.yaml").read_text())
    rows = [{"text": text, "outcome": route["outcome"]}
            for route in route_set["routes"] for text in route.get("utterances", [])[:8]]
    rng = random.Random(0)
    rng.shuffle(rows)
    rows = rows[:80] + [{"text": f"synthetic line {i}: the weather, lunch and the bus", "outcome": "clean"}
                        for i in range(40)]
    rng.shuffle(rows)
    path.write_text("".join(json.dumps({"id": f"t{i}", **row}) + "\n" for i, row in enumerate(rows)))


def test_learning_loop_streams_windows_and_counts_every_llm_call(tmp_path: Path, dev_broker: str) -> None:
    data, out = tmp_path / "tiny.jsonl", tmp_path / "run"
    tiny_labelled_set(data)
    result = subprocess.run(
        [sys.executable, str(REPO / "load-tests" / "learning_loop.py"), str(data),
         "--routes", str(REPO / "routes" / "moderation.yaml"), "--out", str(out), "--encoder", "trivial",
         "--window", "40", "--llm-delay-s", "0.02", "--refresh-s", "1", "--bootstrap", dev_broker,
         "--prefix", f"loop-smoke-{tmp_path.name}", "--audit-share", "0.5", "--shadow",
         "--min-shadow-events", "1", "--shadow-checks", "2", "--shadow-audit-share", "1", "--anchors"],
        capture_output=True, text=True, timeout=420,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-4000:]
    report = json.loads((out / "loop.json").read_text())
    windows = report["windows"]
    assert [w["window"] for w in windows] == [0, 1, 2]
    assert all(FIELDS <= set(w) for w in windows)
    assert [w["events"] for w in windows] == [40, 40, 40]
    # Every event was decided, automatically or by review, and the labels came back between windows.
    assert all(w["automatic"] + round(w["review_share"] * 40) + w["dead_letters"] == 40 for w in windows)
    # Audits (half the automatic decisions) came back as labels and nothing else: the verdicts and
    # hand-offs are exactly the reviewed events, and no automatic decision got a second one.
    assert 0 < sum(w["audits"] for w in windows) <= sum(w["automatic"] for w in windows)
    assert all(w["reviewer_verdicts"] + w["handoffs"] == round(w["review_share"] * 40) for w in windows)
    assert windows[0]["labels_before"] == 0 < windows[1]["labels_before"] <= windows[2]["labels_before"]
    ends = [step for step in report["learning"] if "in_window" not in step]
    assert len(ends) == 2
    # The candidate learned after window 0 was shadowed through window 1 (the worker restarted with
    # it), and its promotion was judged on that window's live shadow counts too: halfway through
    # (--shadow-checks 2) and, unless promoted then, again at the window's end.
    first, second = ends
    assert report["shadow"] and report["shadow_checks"] == 2 and first["shadowing"] != second["shadowing"]
    judged = [step for step in report["learning"] if step.get("candidate") == first["shadowing"]]
    assert (judged[0]["in_window"], judged[0]["after_events"]) == (1, 20)
    assert "20 events shadowed" in " ".join(judged[0]["promote_output"])
    assert judged == [judged[0]] if judged[0]["promoted"] else judged == [judged[0], second]
    assert sum(w["promotions"] for w in windows) == sum(step["promoted"] for step in report["learning"])
    assert report["shadow_audit_share"] == 1.0
    assert yaml.safe_load((out / "topology.yaml").read_text())["review"]["shadow_audit_share"] == 1.0
    # Each learn read the active version's automatic decisions as anchors (none yet from a
    # version promoted just before)
    assert report["anchors"]
    for step in (0, 1):
        anchors = [json.loads(line) for line in (out / "labels" / f"anchors-{step}.jsonl").open()]
        assert all(a["labeller"].startswith("router:") and a["outcome"] != "needs_review" for a in anchors)
        evidence = json.loads((out / "routes" / f"after-window-{step}.learn.json").read_text())
        assert (evidence["anchors"] or {"read": 0})["read"] == len(anchors)
        if step == 0:  # window 0's automatic decisions, one per text
            assert 0 < len(anchors) <= windows[0]["automatic"]
    said = " ".join(judged[-1]["promote_output"])
    assert f"{20 * len(judged)} events shadowed" in said and "shadow agreement" in said, said
    # The LLM calls the reviewer's decisions report are the requests the oracle answered.
    assert sum(w["llm_calls"] for w in windows) == report["overall"]["oracle_requests"] > 0
    assert report["overall"]["oracle_unknown_items"] == 0
    for w in windows:
        for share in ("automatic_share", "novel_share", "review_share"):
            assert 0.0 <= w[share] <= 1.0
        if w["automatic_accuracy"] is not None:
            low, high = w["automatic_accuracy_ci"]
            assert 0.0 <= low <= w["automatic_accuracy"] <= high <= 1.0
    # The printed table has a line per window, and the plot was written.
    lines = [line.split() for line in result.stdout.splitlines()]
    assert [row[0] for row in lines if row and row[0].isdigit() and len(row) >= 10] == ["0", "1", "2"]
    assert (out / "loop.png").stat().st_size > 0
