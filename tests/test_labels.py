"""Labels back: final verdicts as labels, exported to the labelled JSONL eval, fit and routes build read."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from sieve.cli import app
from sieve.contracts import Decision, Event, Label, Review
from sieve.flow.match import MatchResult
from sieve.flow.rows import decision_rows, validate_decisions
from sieve.kafka.client import ensure_topics, produce
from sieve.quality.datasets import load_jsonl
from sieve.quality.labels import LabelReport, export_rows, parse_labels
from sieve.settings import KafkaSettings, get_settings
from tests.test_contract_compat import assert_valid
from tests.test_multi import INDEX, POLICY

NOW = datetime(2026, 12, 3, 3, 0, tzinfo=UTC)


def router_decision(text: str, scores: list[float], event_id: str = "e1") -> Decision:
    matrix = np.array([scores], dtype=np.float32)
    match = MatchResult(matrix, np.zeros((1, 1), np.int64), matrix.max(axis=1, keepdims=True))
    [row] = decision_rows([Event(id=event_id, text=text)], match, INDEX, POLICY, decided_at=NOW)
    return validate_decisions([row])[0]


def verdict_of(router: Decision, outcome: str, routes: list[str], model: str = "llm-a",
               at: datetime = NOW) -> Decision:
    review = Review(model=model, verdict=outcome, route=routes[0] if routes else None,
                    router_decision_id=router.id, routes=routes, rejected_routes=[])
    return router.model_copy(update={
        "id": Decision.make_id(router.id, "review"), "outcome": outcome,
        "route": routes[0] if routes else None, "decided_by": "llm", "decided_at": at, "review": review,
        "final": True})


def label(text: str, outcome: str, routes: list[str], *, event_id: str = "e1", model: str = "llm-a",
          at: datetime = NOW, kind: str = "llm") -> Label:
    router = router_decision(text, [0.45, 0.1, 0.1, 0.1, 0.0], event_id)
    made = Label.of_verdict(verdict_of(router, outcome, routes, model, at), router)
    return made.model_copy(update={"labeller_kind": kind}) if kind != "llm" else made


def test_a_verdict_becomes_a_label_with_who_decided_and_what_it_corrects():
    router = router_decision("you people are vermin", [0.45, 0.1, 0.1, 0.1, 0.0])
    verdict = verdict_of(router, "violating", ["hate"])
    made = Label.of_verdict(verdict, router)
    assert (made.outcome, made.routes, made.route, made.labeller_kind, made.labeller) == (
        "violating", ["hate"], "hate", "llm", "llm-a")
    assert (made.router_outcome, made.router_route) == ("needs_review", "hate")
    assert (made.route_set_version, made.decision_id, made.router_decision_id) == (
        INDEX.version, verdict.id, router.id)
    assert made.id == Label.of_verdict(verdict, router).id == Label.make_id(verdict.id)  # deterministic
    assert_valid("label", made.model_dump(mode="json"))
    with pytest.raises(ValueError, match="reviewer's verdict"):
        Label.of_verdict(router, router)


def test_export_keeps_one_row_per_content_and_counts_repeats_and_duplicates():
    first = label("buy cheap pills", "queue", ["spam"])
    again = label("buy  cheap pills".replace("  ", " "), "queue", ["spam"], event_id="e2", model="llm-b")
    rows, report = export_rows([first, first, again, label("hello there", "clean", [], event_id="e3")])
    assert (report.repeats, report.duplicates, report.exported, report.conflicts) == (1, 1, 2, [])
    assert {r["text"]: (r["outcome"], r.get("labels")) for r in rows} == {
        "buy cheap pills": ("queue", ["spam"]), "hello there": ("clean", None)}


def test_a_conflict_is_reported_and_a_human_wins_then_the_latest():
    llm = label("that is sick", "violating", ["violence"], at=NOW)
    later_llm = label("that is sick", "clean", [], event_id="e2", at=NOW + timedelta(hours=1))
    rows, report = export_rows([llm, later_llm])
    assert [r["outcome"] for r in rows] == ["clean"]  # the later LLM label
    [conflict] = report.conflicts
    assert (conflict.kept.id, [o.id for o in conflict.overruled]) == (later_llm.id, [llm.id])
    human = label("that is sick", "violating", ["violence"], event_id="e3", at=NOW, kind="human")
    rows, report = export_rows([llm, later_llm, human])
    assert [(r["outcome"], r["labels"]) for r in rows] == [("violating", ["violence"])]
    # the LLM label that agrees with the human's is a duplicate, the other one is overruled
    assert [o.id for o in report.conflicts[0].overruled] == [later_llm.id]
    assert report.duplicates == 1


def test_what_cannot_be_exported_is_counted_not_raised():
    report = LabelReport()
    good = label("hello", "clean", [])
    inline_image = good.model_copy(
        update={"id": "img", "text": None, "modality": "image", "image_sha256": "ab"})
    messages = [good.model_dump_json(), b"not json", b'{"id": "x"}', inline_image.model_dump_json(), ""]
    parsed = parse_labels(messages, report)
    rows, report = export_rows(parsed, report)
    assert (report.read, report.unreadable, report.no_content, report.exported) == (4, 2, 1, 1)


def test_the_export_is_labelled_data_eval_and_fit_read(tmp_path: Path):
    labels = [label("you people are vermin", "violating", ["hate", "violence"]),
              label("see you at lunch", "clean", [], event_id="e2")]
    source = tmp_path / "labels.jsonl"
    source.write_text("".join(lbl.model_dump_json() + "\n" for lbl in labels), encoding="utf-8")
    out = tmp_path / "export.jsonl"
    result = CliRunner().invoke(app, ["labels", "export", "--from-file", str(source), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "wrote 2 labelled rows" in result.output
    data = load_jsonl(out)
    by_text = {ex.text: ex for ex in data.examples}
    assert by_text["you people are vermin"].labels == frozenset({"hate", "violence"})
    assert by_text["you people are vermin"].outcome == "violating"
    assert by_text["see you at lunch"].gold("clean") == "clean"


def test_an_empty_label_set_is_a_clear_error(tmp_path: Path):
    source = tmp_path / "empty.jsonl"
    source.write_text("garbage\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["labels", "export", "--from-file", str(source), "--out",
                                      str(tmp_path / "x.jsonl")])
    assert result.exit_code != 0
    assert "no labels to export" in result.output
    assert not (tmp_path / "x.jsonl").exists()


def test_export_reads_the_labels_topic_on_the_broker(dev_broker: str, tmp_path: Path, monkeypatch):
    topic = "test.labels.export"
    kafka = KafkaSettings(bootstrap_servers=dev_broker)
    labels = [label(f"text {i}", "clean", [], event_id=f"e{i}") for i in range(5)]

    async def publish() -> None:
        await ensure_topics(kafka, {topic: 2})
        await produce(kafka, topic, [(lbl.event_id.encode(), lbl.model_dump_json().encode())
                                     for lbl in labels + labels[:2]])  # two delivered twice

    asyncio.run(publish())
    monkeypatch.setenv("SIEVE_KAFKA__BOOTSTRAP_SERVERS", dev_broker)
    get_settings.cache_clear()
    try:
        out = tmp_path / "from-topic.jsonl"
        result = CliRunner().invoke(app, ["labels", "export", "--topic", topic, "--out", str(out),
                                          "--idle", "2"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert sorted(r["text"] for r in rows) == [f"text {i}" for i in range(5)]
    assert "2 repeats" in result.output
