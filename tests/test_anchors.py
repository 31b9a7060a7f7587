"""Anchors: the active version's automatic decisions, exported and kept by ``routes learn --anchors``."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from typer.testing import CliRunner

from sieve.cli import app
from sieve.contracts import Decision
from sieve.kafka.client import ensure_topics, produce
from sieve.quality.anchors import anchor_rows, with_anchors
from sieve.quality.datasets import LabelledData, LabelledExample, load_jsonl
from sieve.quality.workbench import open_workbench
from sieve.settings import KafkaSettings, get_settings
from tests.test_labels import router_decision, verdict_of
from tests.test_learn import active_file, label_rows, write_labels
from tests.test_multi import INDEX

HATE, CLEAN, UNSURE = [0.9, 0.1, 0.1, 0.1, 0.0], [0.0] * 5, [0.45, 0.1, 0.1, 0.1, 0.0]
SELF_HARM = [0.0] * 4 + [0.9]


def decisions() -> list[Decision]:
    """Automatic decisions of INDEX's version, and what an anchors export must leave out."""
    hate = router_decision("you people are vermin", HATE, "e1")
    clean = router_decision("see you at lunch", CLEAN, "e2")
    unsure = router_decision("what a take", UNSURE, "e3")
    single = router_decision("i want to hurt myself", SELF_HARM, "e8").model_copy(
        update={"mode": "single", "categories": None, "routes": None})
    return [
        hate, clean, single,
        unsure,  # needs_review
        verdict_of(unsure, "violating", ["hate"]),  # the reviewer's verdict, not the router's
        router_decision("you people are vermin", HATE, "e4"),  # the same text again
        router_decision("an older version's call", HATE, "e5").model_copy(update={"route_set_version": "v0"}),
        clean.model_copy(update={"event": clean.event.model_copy(update={"text": None, "modality": "image",
                                                                         "image_uri": "s3://b/c.png"})}),
    ]


def test_anchors_are_the_versions_automatic_decisions_once_per_text(tmp_path: Path):
    messages = [d.model_dump_json().encode() for d in decisions()] + [b"not a decision", b""]
    rows, report = anchor_rows(messages, INDEX.version)
    assert [(r["text"], r["outcome"], r["labels"]) for r in rows] == [
        ("you people are vermin", "violating", ["hate"]),  # multi mode: the categories that accepted
        ("see you at lunch", "clean", []),  # the default outcome through no route
        ("i want to hurt myself", "violating", ["self-harm"]),  # single mode: the route
    ]
    assert {r["labeller"] for r in rows} == {f"router:{INDEX.version}"}
    assert (report.read, report.unreadable, report.other_version, report.not_automatic, report.no_text,
            report.repeats, report.exported) == (9, 1, 1, 2, 1, 1, 3)
    assert len(anchor_rows(messages, None)[0]) == 4  # no version asked for: the older one's too
    path = tmp_path / "anchors.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_jsonl(path)  # labelled data that routes learn reads
    assert [(ex.outcome, sorted(ex.labels)) for ex in data.examples] == [
        ("violating", ["hate"]), ("clean", []), ("violating", ["self-harm"])]


def test_anchors_join_train_and_calibration_never_test_at_most_as_many_as_asked(tmp_path, trivial_encoder):
    labels = write_labels(tmp_path / "labels.jsonl", label_rows())
    bench = open_workbench(str(labels), trivial_encoder, datasets_dir=tmp_path)
    labelled = bench.data.examples[0]
    rows = [LabelledExample(f"anchor:{i}", f"lovely day number {i}", "clean", frozenset()) for i in range(30)]
    rows.append(LabelledExample("anchor:x", labelled.text, "clean", frozenset()))  # the label wins
    anchors = LabelledData("anchors", tuple(rows), (), source="anchors.jsonl", licence="-")
    grown, counts = with_anchors(bench, anchors, seed=0)
    assert counts == {"read": 31, "used": 30, "train": 20, "calibration": 10}
    assert grown.splits.test == bench.splits.test and grown.data == bench.data
    added_train = set(grown.splits.train.examples) - set(bench.splits.train.examples)
    added_cal = set(grown.splits.calibration.examples) - set(bench.splits.calibration.examples)
    assert len(added_train) == 20 and len(added_cal) == 10 and not added_train & added_cal
    assert labelled.text not in {ex.text for ex in added_train | added_cal}
    assert grown.vectors("train").shape[0] == len(grown.splits.train.examples)  # encoded afresh
    _, capped = with_anchors(bench, anchors, seed=0, cap=9)
    assert (capped["used"], capped["train"] + capped["calibration"]) == (9, 9)


def test_routes_learn_keeps_anchors_out_of_the_held_back_comparison(tmp_path):
    active = active_file(tmp_path)
    labels = write_labels(tmp_path / "labels.jsonl", label_rows())
    anchors = tmp_path / "anchors.jsonl"
    anchors.write_text("".join(json.dumps({"id": f"anchor:{i}", "text": f"lunch with friends on day {i}",
                                           "outcome": "clean", "labels": [], "labeller": "router:v",
                                           "route_set": "chat"}) + "\n" for i in range(45)))
    common = ["--labels", str(labels), "--max-per-route", "4", "--min-support", "0", "--z", "0",
              "--min-accuracy", "0.9", "--encoder", "trivial", "--no-cache", "-q"]
    runner = CliRunner()

    def learn(out: Path, *more: str) -> dict:
        result = runner.invoke(app, ["routes", "learn", str(active), "-o", str(out), *common, *more])
        assert result.exit_code == 0, result.output
        return json.loads(out.with_name(out.stem + ".learn.json").read_text())

    plain = learn(tmp_path / "plain.yaml")
    anchored = learn(tmp_path / "anchored.yaml", "--anchors", str(anchors))
    assert plain["anchors"] is None
    assert anchored["anchors"] == {"read": 45, "used": 45, "train": 30, "calibration": 15}
    # the held-back comparison is on the same labels, with or without anchors
    assert anchored["split"] == plain["split"]
    assert [s["events"] for s in anchored["systems"]] == [s["events"] for s in plain["systems"]]
    anchors.write_text("")  # an active version that decided nothing by itself yet
    assert learn(tmp_path / "empty.yaml", "--anchors", str(anchors))["anchors"] is None
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"id": "a", "text": "hi", "outcome": "clean", "route_set": "other"}) + "\n")
    result = runner.invoke(app, ["routes", "learn", str(active), "-o", str(tmp_path / "x.yaml"), *common,
                                 "--anchors", str(other)])
    assert result.exit_code != 0 and "route set other, not chat" in result.output
    assert "other.jsonl" in result.output  # the file at fault is named
    result = runner.invoke(app, ["routes", "learn", str(active), "-o", str(tmp_path / "y.yaml"), *common,
                                 "--anchors", str(tmp_path / "missing.jsonl")])
    assert result.exit_code != 0 and "missing.jsonl" in result.output


def test_labels_anchors_reads_the_outcome_topics_on_the_broker(dev_broker: str, tmp_path: Path, monkeypatch):
    kafka = KafkaSettings(bootstrap_servers=dev_broker)
    made = decisions()
    by_topic = {"test.anchors.violating": [d for d in made if d.outcome == "violating"],
                "test.anchors.clean": [d for d in made if d.outcome != "violating"]}

    async def publish() -> None:
        await ensure_topics(kafka, dict.fromkeys(by_topic, 2))
        for topic, items in by_topic.items():
            await produce(kafka, topic, [(d.event_id.encode(), d.model_dump_json().encode()) for d in items])

    asyncio.run(publish())
    monkeypatch.setenv("SIEVE_KAFKA__BOOTSTRAP_SERVERS", dev_broker)
    get_settings.cache_clear()
    try:
        out = tmp_path / "anchors.jsonl"
        result = CliRunner().invoke(app, ["labels", "anchors", "--out", str(out), "--idle", "2",
                                          *(f"--topic={t}" for t in by_topic), "--version", INDEX.version])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert sorted(r["text"] for r in rows) == ["i want to hurt myself", "see you at lunch",
                                               "you people are vermin"]
    assert "wrote 3 anchors" in result.output and "1 of other versions" in result.output
