"""The duplicate-wave cache: keys, time to live, the memory bound, and a repeat's own row."""

from __future__ import annotations

from sieve.flow.dedup import DecisionCache, image_key, repeat_row, text_key

ROW = {"id": "d1", "event_id": "e1", "event": {"id": "e1", "text": "buy now"}, "latency_ms": 3.0,
       "decided_at": "2026-12-02T10:00:00+00:00", "source_topic": "in", "image": None,
       "outcome": "violating", "reason": "accept", "route": "spam", "score": 0.91, "margin": 0.3,
       "scores": [{"route": "spam", "outcome": "violating", "score": 0.91}], "nearest": []}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_keys_are_exact_content_under_one_policy_and_version() -> None:
    key = text_key("moderation", "v1", "buy now")
    assert key == text_key("moderation", "v1", "buy now")
    assert text_key("moderation", "v1", "cafe\u0301") == text_key("moderation", "v1", "caf\u00e9")  # NFC
    assert key != text_key("moderation", "v2", "buy now")  # a new version decides again
    assert key != text_key("kids", "v1", "buy now")  # another policy decides again
    assert key != text_key("moderation", "v1", "Buy now")  # exact content, not evasion-folded
    assert key != text_key("moderation", "v1", "buy\u200bnow")
    assert image_key("moderation", "v1", "ab" * 32) != image_key("moderation", "v1", "cd" * 32)
    assert text_key("m", "v1", "\ud800 lone") != key  # a lone surrogate still has a key


def test_a_repeat_gets_the_decision_with_its_own_event_fields() -> None:
    cache = DecisionCache(1 << 20, ttl_s=60)
    key = text_key("m", "v1", "buy now")
    assert cache.get(key) is None
    cache.put(key, ROW)
    decided = cache.get(key)
    assert decided is not None and "id" not in decided and "event" not in decided
    row = repeat_row(decided, {"id": "d2", "event_id": "e2", "event": {"id": "e2", "text": "buy now"},
                               "latency_ms": 1.0, "decided_at": "later", "source_topic": "in", "image": None})
    assert row["id"] == "d2" and row["event_id"] == "e2" and row["from_cache"] is True
    assert (row["outcome"], row["route"], row["score"]) == ("violating", "spam", 0.91)
    assert cache.stats.hits == 1 and cache.stats.misses == 1 and cache.stats.hit_ratio == 0.5


def test_entries_expire_after_their_time_to_live() -> None:
    clock = Clock()
    cache = DecisionCache(1 << 20, ttl_s=10, clock=clock)
    key = text_key("m", "v1", "buy now")
    cache.put(key, ROW)
    clock.now = 9.9
    assert cache.get(key) is not None
    clock.now = 10.1
    assert cache.get(key) is None and len(cache) == 0 and cache.bytes == 0


def test_memory_is_bounded_least_recently_used_first() -> None:
    one = DecisionCache(1 << 20, ttl_s=60)
    one.put(b"x", ROW)
    size = one.bytes
    cache = DecisionCache(size * 3, ttl_s=60)
    for i in range(3):
        cache.put(bytes([i]), ROW)
    assert cache.get(bytes([0])) is not None  # 0 is now the most recently used
    cache.put(bytes([3]), ROW)
    assert cache.get(bytes([1])) is None and cache.get(bytes([0])) is not None
    assert len(cache) == 3 and cache.bytes <= cache.max_bytes and cache.stats.evictions == 1
    tiny = DecisionCache(10, ttl_s=60)
    tiny.put(b"x", ROW)  # larger than the whole cache: not kept
    assert len(tiny) == 0 and tiny.bytes == 0


def test_needs_review_messages_are_keyed_by_content_so_repeats_meet_in_one_reviewer() -> None:
    from sieve.flow.dedup import review_key
    from sieve.flow.publish import plan_decisions
    from sieve.topology import OutputSpec

    from .review_helpers import make_decision

    output = OutputSpec(outcome_topics={"clean": "c", "violating": "v", "needs_review": "r"},
                        route_topic_prefix="route.")
    first, repeat = make_decision("a", "buy now"), make_decision("b", "buy now")
    other = make_decision("c", "something else")
    clean = make_decision("d", "buy now").model_copy(update={"outcome": "clean"})
    messages = plan_decisions([first, repeat, other, clean.model_dump(mode="json")], output)
    review = [m for m in messages if m.topic == "r"]
    assert [m.key for m in review] == [review_key("v1", "buy now", None).encode()] * 2 + [
        review_key("v1", "something else", None).encode()]
    assert {m.key for m in messages if m.topic != "r"} == {b"a", b"b", b"c", b"d"}  # elsewhere: event id


def test_a_multi_label_entry_counts_its_fired_routes_and_categories():
    from sieve.flow.dedup import estimated_bytes

    single = {"scores": [{"route": "a"}] * 3, "nearest": []}
    fired = [{"route": "a"}, {"route": "b"}]
    multi = {**single, "routes": fired, "categories": dict.fromkeys("abcdefgh", False)}
    assert estimated_bytes(multi) == estimated_bytes(single) + 2 * 200 + 8 * 150
