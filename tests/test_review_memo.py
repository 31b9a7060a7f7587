"""One review per content: repeats of a text wait for, or reuse, its verdict; nothing else is shared."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client import REGISTRY

from sieve.flow.dedup import review_key
from sieve.review.memo import ReviewMemo

from .llm_double import ScriptedLLM, Step, review_json
from .review_helpers import make_decision
from .test_review_engine import engine


@pytest.fixture
def llm() -> Iterator[ScriptedLLM]:
    with ScriptedLLM() as server:
        yield server


async def test_repeats_in_flight_and_after_share_one_llm_call(llm: ScriptedLLM) -> None:
    llm.script.append(Step(content=review_json("violating", "threat", 0.9), delay_s=0.3))
    reviewer = engine(llm)
    try:
        wave = [make_decision(f"e{i}", "I will find you [violating:threat]") for i in range(5)]
        finals = await reviewer.review_many(wave)
        later = await reviewer.review(make_decision("e9", "I will find you [violating:threat]"))
    finally:
        await reviewer.aclose()
    assert len(llm.requests) == 1
    assert [f.outcome for f in [*finals, later]] == ["violating"] * 6
    assert [f.event_id for f in finals] == [f"e{i}" for i in range(5)]
    assert len({f.id for f in [*finals, later]}) == 6  # each repeat's decision is its own
    reused = [f.review.reused for f in [*finals, later] if f.review is not None]
    assert reused.count(True) == 5 and reused.count(None) == 1
    assert reviewer.memo.saved == 5
    assert REGISTRY.get_sample_value("sieve_review_reused_total", {"topology": "test"}) >= 5


async def test_other_text_or_version_is_reviewed_again(llm: ScriptedLLM) -> None:
    reviewer = engine(llm)
    try:
        await reviewer.review(make_decision("a", "same words"))
        await reviewer.review(make_decision("b", "same words", route_set_version="v2"))
        await reviewer.review(make_decision("c", "other words"))
        await reviewer.review(make_decision("d", "same words"))
    finally:
        await reviewer.aclose()
    assert len(llm.requests) == 3


async def test_a_hand_off_is_not_shared(llm: ScriptedLLM) -> None:
    llm.script.extend([Step(content="not json"), Step(content="still not json")])
    reviewer = engine(llm)
    try:
        first = await reviewer.review(make_decision("a", "hmm"))
        second = await reviewer.review(make_decision("b", "hmm"))
    finally:
        await reviewer.aclose()
    assert first.review is not None and first.review.handoff_reason == "malformed_reply"
    assert second.outcome == "clean" and len(llm.requests) == 3  # asked again, answered this time


def test_the_memo_is_bounded_and_keys_follow_the_content() -> None:
    assert review_key("v1", "hi", None) == review_key("v1", "hi", "ff" * 32)  # the text decides
    assert review_key("v1", "hi", None) != review_key("v2", "hi", None)
    assert review_key("v1", None, "ab" * 32) != review_key("v1", None, "cd" * 32)
    assert review_key("v1", None, None) is None


async def test_the_memo_keeps_at_most_max_entries(llm: ScriptedLLM) -> None:
    reviewer = engine(llm)
    reviewer.memo = ReviewMemo(max_entries=2)
    try:
        for i in range(3):
            await reviewer.review(make_decision(f"a{i}", f"text {i}"))
        await reviewer.review(make_decision("b0", "text 0"))  # the oldest was dropped: asked again
        await reviewer.review(make_decision("b2", "text 2"))  # still kept
    finally:
        await reviewer.aclose()
    assert len(llm.requests) == 4
