"""A multi-mode review end to end: a real `sieve review` process on the dev broker.

Router decisions of a multi-mode set (spam accepted, hate in its review band) go to the
needs-review topic; the reviewer asks ScriptedLLM (tests/llm_double.py: a test double of
an OpenAI-compatible endpoint on 127.0.0.1, answering from a script), which confirms hate
and rejects spam; the verdicts reach the outcome's topic and both routes' topics, final.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiokafka import AIOKafkaConsumer

from sieve.contracts import Label
from sieve.kafka.client import ensure_topics, produce, read_topic
from sieve.settings import KafkaSettings

from .conftest import worker_env
from .llm_double import ScriptedLLM, Step
from .test_review_multi import MULTI, SPAM_AND_HATE, reply, router_decision

pytestmark = pytest.mark.integration


@pytest.fixture
def llm() -> Iterator[ScriptedLLM]:
    with ScriptedLLM() as server:
        yield server


async def read_with_headers(kafka: KafkaSettings, topics: list[str], *, want: int,
                            timeout_s: float) -> list[tuple[str, bytes | None, dict[str, Any]]]:
    """(topic, sieve-final header, decision) of the topics' messages until ``want`` arrived."""
    consumer = AIOKafkaConsumer(*topics, bootstrap_servers=kafka.bootstrap_servers,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    out: list[tuple[str, bytes | None, dict[str, Any]]] = []
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and len(out) < want:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                out += [(r.topic, dict(r.headers).get("sieve-final"), json.loads(r.value)) for r in records]
        return out
    finally:
        await consumer.stop()


def test_a_reviewer_process_publishes_confirmed_and_rejected_routes(
    dev_broker: str, tmp_path: Path, llm: ScriptedLLM
) -> None:
    prefix = f"rvm{uuid.uuid4().hex[:8]}"
    kafka = KafkaSettings(bootstrap_servers=dev_broker)
    route_file = tmp_path / "routes.yaml"
    route_file.write_text(yaml.safe_dump(MULTI))
    topic = {name: f"{prefix}.{name}" for name in ("in", "clean", "violating", "queue", "needs-review",
                                                   "human-review", "dead-letter", "labels")}
    topology = tmp_path / "topology.yaml"
    topology.write_text(yaml.safe_dump({
        "name": prefix, "group_id": f"{prefix}-group",
        "input": {"topics": [topic["in"]], "partitions": 1},
        "route_set": {"name": "mod", "file": str(route_file)},
        "encoder": {"kind": "trivial"},
        "output": {"outcome_topics": {o: topic[o] for o in ("clean", "violating", "queue")}
                   | {"needs_review": topic["needs-review"]},
                   "route_topic_prefix": f"{prefix}.route.", "dead_letter_topic": topic["dead-letter"],
                   "partitions": 1},
        "review": {"human_review_topic": topic["human-review"], "labels_topic": topic["labels"],
                   "max_reviews_per_s": 100,
                   "batching": {"max_events": 8, "max_wait_s": 0.2}},
    }))
    # the router's decisions: spam accepted, hate in its review band; the LLM confirms hate only
    decisions = [router_decision(SPAM_AND_HATE, f"text {i}", event_id=f"m{i}") for i in range(2)]
    llm.script.extend([Step(content=reply(["hate"], "violating", "hate")) for _ in decisions])
    asyncio.run(ensure_topics(kafka, {topic["needs-review"]: 1}))
    asyncio.run(produce(kafka, topic["needs-review"],
                        [(d.event_id.encode(), d.model_dump_json().encode()) for d in decisions]))
    log = tmp_path / "review.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "sieve", "review", str(topology)],
        env=worker_env(dev_broker, tmp_path / "qdrant", SIEVE_LLM__BASE_URL=llm.base_url,
                       SIEVE_LLM__MODEL="scripted", SIEVE_SHUTDOWN_GRACE_S="2"),
        stdout=open(log, "wb"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
    )
    try:
        wanted = [topic["violating"], f"{prefix}.route.spam", f"{prefix}.route.hate", topic["human-review"]]
        got = asyncio.run(read_with_headers(kafka, wanted, want=6, timeout_s=90))
        labels = asyncio.run(read_labels(kafka, topic["labels"]))
    finally:
        process.kill()
        process.wait(10)
    assert len(got) == 6, log.read_text()[-3000:]
    by_topic: dict[str, set[str]] = {}
    for name, final, decision in got:
        by_topic.setdefault(name, set()).add(decision["event_id"])
        assert (final, decision["final"], decision["decided_by"], decision["outcome"]) == (
            b"true", True, "llm", "violating")
        assert {r["route"]: r["confirmed"] for r in decision["routes"]} == {"spam": False, "hate": True}
        assert (decision["review"]["routes"], decision["review"]["rejected_routes"]) == (["hate"], ["spam"])
    assert by_topic == {name: {"m0", "m1"} for name in wanted[:3]}
    # every verdict is also a label on the labels topic: what the router should have decided
    assert sorted(label.event_id for label in labels) == ["m0", "m1"]
    for label in labels:
        assert (label.outcome, label.routes, label.labeller_kind, label.labeller) == (
            "violating", ["hate"], "llm", "scripted")
        assert label.router_outcome == "needs_review" and label.route_set == "mod"


async def read_labels(kafka: KafkaSettings, topic: str) -> list[Label]:
    """The labels on ``topic`` (read until it has been idle for a few seconds)."""
    return [Label.model_validate_json(record.value)
            async for record in read_topic(kafka, [topic], idle_timeout_s=5.0)]
