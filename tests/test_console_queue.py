"""The console's queue and verdicts, without Kafka: claims and leases, conflicts, the committable prefix."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from sieve.console.queue import Conflict, ConsoleQueue, Item, ItemState, VerdictRef
from sieve.console.verdict import Choice, InvalidChoice, human_verdict, plan_verdict, verdict_id
from sieve.contracts import Label
from sieve.review.catalogue import ReviewCatalogue
from sieve.topology import OutputSpec

from .console_helpers import handoff
from .review_helpers import ROUTE_SET

T0 = datetime(2026, 12, 3, 9, 0, tzinfo=UTC)
CATALOGUE = ReviewCatalogue.from_route_set(ROUTE_SET)


def item(n: int, partition: int = 0, seconds: float = 0) -> Item:
    decision = handoff(f"e{n}", f"text {n}", tenant="acme" if n % 2 else "globex")
    return Item(decision.id, partition, n, decision, T0 + timedelta(seconds=seconds + n))


def ref(item_id: str, by: str = "alice", outcome: str = "clean") -> VerdictRef:
    return VerdictRef(id=verdict_id(item_id), outcome=outcome, routes=(), by=by, at=T0)


def queue_of(*items: Item, lease_s: float = 60) -> ConsoleQueue:
    queue = ConsoleQueue(lease_s)
    for it in items:
        queue.add(it)
    return queue


def test_waiting_is_oldest_first_and_filters_by_tenant_and_route() -> None:
    a, b, c = item(3), item(1), item(2)
    queue = queue_of(a, b, c)
    assert [i.id for i in queue.waiting(T0)] == [b.id, c.id, a.id]
    assert [i.id for i in queue.waiting(T0, tenant="acme")] == [b.id, a.id]
    assert [i.id for i in queue.waiting(T0, route="threat")] == [b.id, c.id, a.id]
    assert queue.waiting(T0, route="no-such-route") == []


def test_a_claim_keeps_others_out_until_its_lease_ends() -> None:
    a = item(1)
    queue = queue_of(a, lease_s=60)
    queue.apply(a.id, queue.claim(a.id, "alice", T0))
    assert queue.waiting(T0 + timedelta(seconds=30)) == []
    with pytest.raises(Conflict, match="claimed by alice"):
        queue.claim(a.id, "bob", T0 + timedelta(seconds=30))
    with pytest.raises(Conflict, match="claimed by alice"):
        queue.decide(a.id, "bob", ref(a.id, "bob"), T0 + timedelta(seconds=30))
    # abandoned: after the lease it is waiting again and bob may take it
    later = T0 + timedelta(seconds=61)
    assert [i.id for i in queue.waiting(later)] == [a.id]
    state = queue.claim(a.id, "bob", later)
    assert (state.status, state.user, state.until) == ("claimed", "bob", later + timedelta(seconds=60))


def test_next_for_gives_ones_own_claim_first() -> None:
    a, b = item(1), item(2)
    queue = queue_of(a, b)
    queue.apply(b.id, queue.claim(b.id, "alice", T0))
    assert queue.next_for("alice", T0).id == b.id  # type: ignore[union-attr]
    assert queue.next_for("bob", T0).id == a.id  # type: ignore[union-attr]


def test_decided_items_are_never_offered_and_a_second_decision_is_a_conflict() -> None:
    a = item(1)
    queue = queue_of(a)
    queue.apply(a.id, queue.decide(a.id, "alice", ref(a.id), T0))
    assert queue.waiting(T0) == [] and queue.next_for("bob", T0) is None
    with pytest.raises(Conflict, match="already decided by alice"):
        queue.decide(a.id, "bob", ref(a.id, "bob"), T0)
    with pytest.raises(Conflict, match="already decided by alice"):
        queue.claim(a.id, "bob", T0)
    # a lead's override adds a verdict and keeps the first
    second = VerdictRef(id=verdict_id(a.id, ref(a.id).id), outcome="violating", routes=("threat",), by="lena",
                        at=T0)
    state = queue.override(a.id, second)
    assert [v.by for v in state.verdicts] == ["alice", "lena"]


def test_committable_stops_below_the_lowest_undecided_item_per_partition() -> None:
    items = [item(n, partition=n % 2) for n in range(6)]  # p0: 0, 2, 4; p1: 1, 3, 5
    queue = queue_of(*items)
    assert queue.committable() == {0: 0, 1: 1}
    for n in (0, 4, 3):  # p0: 0 and 4 decided (2 not); p1: 3 decided (1 not)
        queue.apply(items[n].id, queue.decide(items[n].id, "alice", ref(items[n].id), T0))
    assert queue.committable() == {0: 2, 1: 1}
    for n in (2, 1, 5):
        queue.apply(items[n].id, queue.decide(items[n].id, "alice", ref(items[n].id), T0))
    assert queue.committable() == {0: 5, 1: 6}  # past the last read
    queue.seen(0, 9)  # a record that made no item (read, nothing to decide)
    assert queue.committable()[0] == 10


def test_committed_decided_items_are_forgotten_but_a_late_decision_still_conflicts() -> None:
    a, b = item(1), item(2)
    queue = queue_of(a, b)
    queue.apply(a.id, queue.decide(a.id, "alice", ref(a.id), T0))
    queue.forget_decided(queue.committable(), keep=1)
    assert queue.get(a.id) is not None  # kept: a lead may still override it
    queue.forget_decided(queue.committable(), keep=0)
    assert queue.get(a.id) is None and queue.get(b.id) is not None
    with pytest.raises(Conflict, match="already decided by alice"):
        queue.decide(a.id, "bob", ref(a.id, "bob"), T0)
    with pytest.raises(KeyError):
        queue.require("never-seen")


def test_state_read_before_its_item_applies_when_the_item_arrives() -> None:
    """The state topic is read first at start-up: an item decided there stays decided when read again."""
    a = item(1)
    queue = ConsoleQueue(60)
    decided = ItemState(status="decided", user="alice", verdicts=(ref(a.id),))
    queue.apply(a.id, ItemState.from_json(decided.to_json()))  # through its JSON, as from the topic
    queue.add(a)
    assert queue.get(a.id).state == decided  # type: ignore[union-attr]
    assert queue.waiting(T0) == [] and queue.committable() == {0: 2}


def test_numbers_count_waiting_claimed_and_the_oldest_age() -> None:
    a, b = item(1), item(2)
    queue = queue_of(a, b)
    queue.apply(a.id, queue.claim(a.id, "alice", T0))
    numbers = queue.numbers(T0 + timedelta(seconds=11))
    assert (numbers.waiting, numbers.claimed, numbers.decided, numbers.oldest_age_s) == (1, 1, 0, 10.0)
    assert queue_of().numbers(T0).oldest_age_s == 0.0


def test_a_human_verdict_has_its_id_from_the_handoff_and_a_human_label() -> None:
    h = handoff("e1", "you will regret this", llm_verdict="violating")
    verdict = human_verdict(h, Choice("violating", ("threat",), "clear threat"), "alice", CATALOGUE, T0)
    again = human_verdict(h, Choice("violating", ("threat",), "clear threat"), "alice", CATALOGUE, T0)
    assert verdict.id == again.id == verdict_id(h.id) != h.id
    assert (verdict.outcome, verdict.route, verdict.final) == ("violating", "threat", True)
    assert verdict.decided_by == "llm"  # the review stage; review.moderator names the person
    assert verdict.review is not None and verdict.review.moderator == "alice"
    assert verdict.review.moderator_note == "clear threat"
    assert verdict.review.verdict == "violating"  # the LLM's own answer is kept beside the moderator's
    output = OutputSpec(outcome_topics={"clean": "c", "violating": "v"}, route_topic_prefix="route.")
    topics = [m.topic for m in plan_verdict(verdict, h, output, "labels")]
    assert topics == ["v", "route.threat", "labels"]
    label = Label.of_verdict(verdict, h)
    assert (label.labeller_kind, label.labeller, label.note) == ("human", "alice", "clear threat")
    assert label.router_decision_id == h.review.router_decision_id  # type: ignore[union-attr]
    overridden = human_verdict(h, Choice("clean"), "lena", CATALOGUE, T0, overrides=verdict.id)
    assert overridden.id == verdict_id(h.id, verdict.id) not in (verdict.id, h.id)
    assert overridden.review.overrides == verdict.id and overridden.route is None  # type: ignore[union-attr]


@pytest.mark.parametrize("choice, error", [
    (Choice("banned"), "not an outcome"),
    (Choice("violating", ("nope",)), "not a route"),
    (Choice("clean", ("threat",)), "has outcome 'clean'"),
])
def test_a_choice_that_is_not_a_verdict_of_the_set_is_refused(choice: Choice, error: str) -> None:
    with pytest.raises(InvalidChoice, match=error):
        human_verdict(handoff("e1"), choice, "alice", CATALOGUE, T0)


def test_a_multi_set_verdict_confirms_the_ticked_routes_and_rejects_the_rest() -> None:
    from sieve.contracts import Review
    from sieve.review.steps import handoff_decision

    from .test_review_multi import CATALOGUE as MULTI
    from .test_review_multi import SPAM_AND_HATE, router_decision

    router = router_decision(SPAM_AND_HATE)  # spam accepted, hate in review: handed off to people
    review = Review(model="m", handoff_reason="low_confidence", router_decision_id=router.id)
    h = handoff_decision(router, review, T0)
    verdict = human_verdict(h, Choice("violating", ("hate", "spam")), "alice", MULTI, T0)
    assert verdict.outcome == "violating" and verdict.review.moderator == "alice"  # type: ignore[union-attr]
    assert sorted(verdict.review.routes or []) == ["hate", "spam"]  # type: ignore[union-attr]
    assert verdict.categories is not None and verdict.categories["hate"] and verdict.categories["spam"]
    only_spam = human_verdict(h, Choice("queue", ("spam",)), "alice", MULTI, T0)
    assert only_spam.review.rejected_routes == ["hate"]  # type: ignore[union-attr]
    with pytest.raises(InvalidChoice, match="most severe"):  # the outcome must follow from the routes
        human_verdict(h, Choice("clean", ("hate",)), "alice", MULTI, T0)
