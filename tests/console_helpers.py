"""What the review console's tests share: a topology on its own topics, hand-offs, users, Kafka reads."""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from aiokafka import AIOKafkaConsumer
from argon2 import PasswordHasher
from pydantic import SecretStr

from sieve.console.users import UserFile
from sieve.contracts import Decision, Review
from sieve.kafka.client import client_kwargs, ensure_topics, send_messages
from sieve.kafka.records import Outbound
from sieve.review.steps import handoff_decision
from sieve.routeset import RouteSet
from sieve.settings import ConsoleSettings, KafkaSettings, Settings
from sieve.topology import Topology

from .review_helpers import ROUTE_SET, make_decision

# argon2 with small costs: the tests log in often (the product uses argon2's defaults)
FAST_HASHER = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
PASSWORD = "correct horse battery"
USERS = {"alice": "moderator", "bob": "moderator", "lena": "lead"}


@dataclass
class ConsoleSetup:
    """One test's console world: its topology (own topics), route set, settings and users file."""

    topology: Topology
    route_set: RouteSet
    settings: Settings
    topics: dict[str, str]

    @property
    def kafka(self) -> KafkaSettings:
        return self.settings.kafka


def console_setup(tmp_path: Path, bootstrap: str, **console: Any) -> ConsoleSetup:
    """A topology on fresh topics (2 partitions), the reviewer tests' route set, three users."""
    prefix = f"cons{uuid.uuid4().hex[:8]}"
    topics = {name: f"{prefix}.{name}" for name in ("in", "clean", "violating", "needs-review",
                                                   "human-review", "dead-letter", "labels")}
    tmp_path.mkdir(parents=True, exist_ok=True)
    route_file = tmp_path / "routes.yaml"
    route_file.write_text(yaml.safe_dump(ROUTE_SET.model_dump(mode="json", exclude_none=True)))
    topology = Topology.model_validate({
        "name": "cons", "group_id": f"{prefix}-group",
        "input": {"topics": [topics["in"]], "partitions": 2},
        "route_set": {"name": "mod", "file": str(route_file)},
        "encoder": {"kind": "trivial"},
        "output": {"outcome_topics": {"clean": topics["clean"], "violating": topics["violating"],
                                     "needs_review": topics["needs-review"]},
                   "route_topic_prefix": f"{prefix}.route.", "dead_letter_topic": topics["dead-letter"],
                   "partitions": 2},
        "review": {"human_review_topic": topics["human-review"], "labels_topic": topics["labels"]},
    })
    users_file = tmp_path / "users.yaml"
    users = UserFile.load(users_file, hasher=FAST_HASHER)
    for name, role in USERS.items():
        users.add(name, role, PASSWORD)  # type: ignore[arg-type]
    users.save()
    settings = Settings(kafka=KafkaSettings(bootstrap_servers=bootstrap),
                        console=ConsoleSettings(secret_key=SecretStr("test-key-" + prefix),
                                                users_file=users_file, **console))
    return ConsoleSetup(topology, ROUTE_SET, settings, topics)


def handoff(event_id: str, text: str | None = "is this fine?", *, reason: str = "low_confidence",
            llm_verdict: str | None = None, tenant: str | None = None, **update: Any) -> Decision:
    """A reviewer's hand-off to human review (the router's needs_review decision, handed on)."""
    if tenant is not None:
        event = {"id": event_id, "modality": update.get("modality", "text"), "tenant": tenant}
        if text is not None:
            event["text"] = text
        update["event"] = event
    router = make_decision(event_id, text, **update)
    review = Review(model="scripted", verdict=llm_verdict,
                    route="threat" if llm_verdict == "violating" else None,
                    confidence=0.4 if llm_verdict else None, rationale="not sure" if llm_verdict else None,
                    handoff_reason=reason, router_decision_id=router.id)
    return handoff_decision(router, review, datetime.now(UTC))


async def produce_handoffs(setup: ConsoleSetup, decisions: list[Decision], raw: list[bytes] = ()) -> None:
    """Put hand-offs (and raw bytes, for bad records) on the human-review topic, acknowledged."""
    topic = setup.topics["human-review"]
    await ensure_topics(setup.kafka, {topic: 2})
    messages = [Outbound(topic, d.event_id.encode(), d.model_dump_json().encode()) for d in decisions]
    messages += [Outbound(topic, b"bad", value) for value in raw]
    await send_messages(setup.kafka, messages)


async def read_json(kafka: KafkaSettings, topic: str, want: int, timeout_s: float = 20.0
                    ) -> list[dict[str, Any]]:
    """Every message on ``topic`` (JSON), waiting until at least ``want`` arrived or the time is up."""
    consumer = AIOKafkaConsumer(topic, **client_kwargs(kafka), auto_offset_reset="earliest",
                                enable_auto_commit=False)
    await consumer.start()
    got: list[dict[str, Any]] = []
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            batches = await consumer.getmany(timeout_ms=300)
            got += [json.loads(r.value) for rs in batches.values() for r in rs]
            if len(got) >= want and not batches:
                break
        return got
    finally:
        await consumer.stop()
