"""The console's Kafka side on the dev broker: verdicts and labels out, durable claims, restarts, commits."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from sieve.console.queue import Conflict
from sieve.console.service import ConsoleService
from sieve.console.verdict import Choice, verdict_id
from sieve.kafka.client import committed_offsets

from .console_helpers import ConsoleSetup, console_setup, handoff, produce_handoffs, read_json

pytestmark = pytest.mark.integration


async def started(setup: ConsoleSetup, clock: Callable[[], datetime] | None = None) -> ConsoleService:
    """A console service, started and caught up with the hand-offs."""
    service = (ConsoleService(setup.topology, setup.route_set, setup.settings) if clock is None
               else ConsoleService(setup.topology, setup.route_set, setup.settings, clock=clock))
    await service.start()
    deadline = asyncio.get_running_loop().time() + 30
    while not service.ready:
        assert asyncio.get_running_loop().time() < deadline, service.broker_error
        await asyncio.sleep(0.1)
    return service


async def until(check: Callable[[], bool], what: str, timeout_s: float = 20) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def test_a_verdict_goes_to_the_verdict_topics_and_its_label_to_the_labels_topic(
        dev_broker: str, tmp_path: Path) -> None:
    setup = console_setup(tmp_path, dev_broker)
    h = handoff("e1", "you will regret this when I find you", llm_verdict="clean")
    await produce_handoffs(setup, [h])
    service = await started(setup)
    try:
        await until(lambda: service.queue.get(h.id) is not None, "the hand-off")
        await service.claim(h.id, "alice")
        made = await service.decide(h.id, "alice", Choice("violating", ("threat",), "a threat"))
    finally:
        await service.stop()
    verdicts = await read_json(setup.kafka, setup.topics["violating"], 1)
    assert [v["id"] for v in verdicts] == [made.id == verdict_id(h.id) and made.id]
    assert verdicts[0]["review"]["moderator"] == "alice" and verdicts[0]["final"] is True
    assert verdicts[0]["review"]["verdict"] == "clean"  # the LLM's answer, kept beside the human's
    routed = await read_json(setup.kafka, f"{setup.topology.output.route_topic_prefix}threat", 1)
    assert [v["id"] for v in routed] == [made.id]
    labels = await read_json(setup.kafka, setup.topics["labels"], 1)
    assert [(x["labeller_kind"], x["labeller"], x["outcome"], x["routes"], x["note"]) for x in labels] == [
        ("human", "alice", "violating", ["threat"], "a threat")]
    audit = await read_json(setup.kafka, f"{setup.topics['human-review']}.console-audit", 2)
    assert [(a["user"], a["action"]) for a in audit] == [("alice", "claim"), ("alice", "decide")]


async def test_two_moderators_racing_for_one_item_get_one_claim(dev_broker: str, tmp_path: Path) -> None:
    setup = console_setup(tmp_path, dev_broker)
    h = handoff("e1")
    await produce_handoffs(setup, [h])
    service = await started(setup)
    try:
        await until(lambda: service.queue.get(h.id) is not None, "the hand-off")
        results = await asyncio.gather(service.claim(h.id, "alice"), service.claim(h.id, "bob"),
                                       return_exceptions=True)
        assert sum(isinstance(r, Conflict) for r in results) == 1
        holder = service.queue.get(h.id).state.user  # type: ignore[union-attr]
        other = "bob" if holder == "alice" else "alice"
        with pytest.raises(Conflict, match=f"claimed by {holder}"):
            await service.decide(h.id, other, Choice("clean"))
        await service.decide(h.id, holder, Choice("clean"))  # type: ignore[arg-type]
        with pytest.raises(Conflict, match=f"already decided by {holder}"):
            await service.decide(h.id, other, Choice("violating", ("threat",)))
    finally:
        await service.stop()
    assert len(await read_json(setup.kafka, setup.topics["clean"], 1)) == 1
    assert await read_json(setup.kafka, setup.topics["violating"], 0, timeout_s=2) == []


async def test_a_restart_offers_undecided_items_again_and_never_decided_ones(
        dev_broker: str, tmp_path: Path) -> None:
    setup = console_setup(tmp_path, dev_broker, lease_s=600)
    handoffs = [handoff(f"e{n}", f"text {n}") for n in range(8)]
    await produce_handoffs(setup, handoffs)
    service = await started(setup)
    try:
        await until(lambda: len(service.queue.items) == 8, "8 hand-offs")
        by_offset = sorted(service.queue.items.values(), key=lambda i: (i.partition, i.offset))
        # per partition, decide every item but the first: nothing may be committed past it
        partitions = {i.partition for i in by_offset}
        firsts = {p: min(i.offset for i in by_offset if i.partition == p) for p in partitions}
        decided = [i.id for i in by_offset if i.offset != firsts[i.partition]]
        for item_id in decided:
            await service.decide(item_id, "alice", Choice("clean"))
        claimed = next(i.id for i in by_offset if i.id not in decided)
        await service.claim(claimed, "bob")
    finally:
        await service.stop()
    committed = await committed_offsets(setup.kafka, setup.topics["human-review"], service.topics["group"])
    assert committed == firsts  # below the lowest undecided item of each partition

    again = await started(setup)
    try:
        await until(lambda: len(again.queue.items) == 8, "the 8 hand-offs read again")
        now = again.clock()
        assert {i.id for i in again.queue.undecided()} == {h.id for h in handoffs} - set(decided)
        assert {i.id for i in again.queue.waiting(now)} == {h.id for h in handoffs} - set(decided) - {claimed}
        assert again.queue.get(claimed).state.user == "bob"  # type: ignore[union-attr]  # the claim survived
        with pytest.raises(Conflict, match="already decided by alice"):
            await again.decide(decided[0], "bob", Choice("violating", ("threat",)))
        for item in again.queue.undecided():
            await again.decide(item.id, item.state.user or "alice", Choice("clean"))
    finally:
        await again.stop()
    committed = await committed_offsets(setup.kafka, setup.topics["human-review"], service.topics["group"])
    assert sum(committed.values()) == 8  # everything decided: committed to the end
    verdicts = await read_json(setup.kafka, setup.topics["clean"], 8)
    assert sorted(v["id"] for v in verdicts) == sorted(verdict_id(h.id) for h in handoffs)  # once each

    third = await started(setup)
    try:
        await asyncio.sleep(1)
        assert third.queue.undecided() == []
    finally:
        await third.stop()


async def test_an_abandoned_claim_returns_to_the_queue_after_its_lease(
        dev_broker: str, tmp_path: Path) -> None:
    setup = console_setup(tmp_path, dev_broker, lease_s=60)
    now = [datetime.now(UTC)]
    h = handoff("e1")
    await produce_handoffs(setup, [h])
    service = await started(setup, clock=lambda: now[0])
    try:
        await until(lambda: service.queue.get(h.id) is not None, "the hand-off")
        await service.claim_next("alice")
        assert await service.claim_next("bob") is None
        now[0] += timedelta(seconds=61)
        taken = await service.claim_next("bob")
        assert taken is not None and taken.id == h.id and taken.state.user == "bob"
    finally:
        await service.stop()


async def test_a_record_that_is_not_a_handoff_is_dead_lettered_and_the_queue_moves_past_it(
        dev_broker: str, tmp_path: Path) -> None:
    setup = console_setup(tmp_path, dev_broker)
    await produce_handoffs(setup, [], raw=[b"{not json", b'{"id": "x"}'])
    service = await started(setup)
    try:
        letters = await read_json(setup.kafka, setup.topics["dead-letter"], 2)
        await until(lambda: sum(service.queue.committable().values()) == 2, "the commit past both")
        assert service.queue.undecided() == []
    finally:
        await service.stop()
    assert sorted(x["reason"] for x in letters) == ["not_a_handoff", "not_a_handoff"]
    committed = await committed_offsets(setup.kafka, setup.topics["human-review"], service.topics["group"])
    assert sum(committed.values()) == 2


async def test_a_leads_override_publishes_a_second_verdict_and_keeps_the_first(
        dev_broker: str, tmp_path: Path) -> None:
    setup = console_setup(tmp_path, dev_broker)
    h = handoff("e1")
    await produce_handoffs(setup, [h, handoff("e2")])
    service = await started(setup)
    try:
        await until(lambda: len(service.queue.items) == 2, "the hand-offs")
        first = await service.decide(h.id, "alice", Choice("clean"))
        with pytest.raises(Conflict, match="not decided yet"):
            await service.decide(service.queue.undecided()[0].id, "lena", Choice("clean"), override=True)
        second = await service.decide(h.id, "lena", Choice("violating", ("insult",)), override=True)
        assert second.id == verdict_id(h.id, first.id) != first.id
        assert [v.by for v in service.queue.get(h.id).state.verdicts] == ["alice", "lena"]  # type: ignore
    finally:
        await service.stop()
    published = await read_json(setup.kafka, setup.topics["clean"], 1)
    published += await read_json(setup.kafka, setup.topics["violating"], 1)
    assert [(v["id"], v["review"]["moderator"], v["review"]["overrides"]) for v in published] == [
        (first.id, "alice", None), (second.id, "lena", first.id)]
