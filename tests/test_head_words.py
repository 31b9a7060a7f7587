"""A learned head with word features: trained, stored and read back exactly; never run without the texts."""

from __future__ import annotations

import io

import numpy as np
import pytest

from sieve.flow.head import HEAD_FORMAT, HEAD_FORMAT_WORDS, HeadError, LearnedHead, train_head
from sieve.flow.head_words import WordFeatures

TEXTS = ["you are vermin and should die", "lovely weather for the match", "die you vermin",
         "the match was lovely", "vermin like you should die", "what lovely weather"]
VIOLATING = np.array([True, False, True, False, True, False])


def trained(texts: list[str] | None) -> tuple[LearnedHead, np.ndarray]:
    """A one-vs-rest head over random vectors (they carry no signal): what it learns, it learns from words."""
    vectors = np.random.default_rng(0).normal(size=(len(TEXTS), 8)).astype(np.float32)
    membership = np.stack([VIOLATING, ~VIOLATING, VIOLATING], axis=1)  # two routes on one row: one-vs-rest
    head = train_head(vectors, membership, ["threat", "clean", "hate"], "test:enc", c=10.0, texts=texts)
    return head, vectors


def test_word_features_are_fitted_on_the_texts_and_computed_the_same_after_a_round_trip():
    words = WordFeatures.fit(TEXTS)
    assert "vermin" in words.vocabulary and "lovely" in words.vocabulary
    assert "should die" in words.vocabulary  # word pairs too
    assert "for" not in words.vocabulary  # in one text only
    again = WordFeatures(tuple(words.vocabulary), np.array(words.idf))
    features = words.transform(["vermin, die"]).toarray()
    assert np.array_equal(features, again.transform(["vermin, die"]).toarray())
    assert features[0, words.vocabulary.index("vermin")] > 0 and np.isclose(np.linalg.norm(features), 1.0)
    assert WordFeatures.fit(["one", "two"]).transform(["one two"]).shape == (1, 0)  # no word in two texts


def test_a_head_with_words_scores_them_and_reads_back_exactly():
    head, vectors = trained(TEXTS)
    plain, _ = trained(None)
    assert head.words is not None and head.meta["words"] == len(head.words) and plain.words is None
    p = head.probabilities(vectors, TEXTS)
    assert (p[VIOLATING, 0] > 0.5).all() and (p[~VIOLATING, 0] < 0.5).all()  # learned from the words
    assert not np.allclose(p, head.probabilities(vectors, ["the weather"] * len(TEXTS)))
    data = head.to_bytes()
    back = LearnedHead.from_bytes(data)
    assert back.words is not None and back.words.vocabulary == head.words.vocabulary
    np.testing.assert_array_equal(back.probabilities(vectors, TEXTS), p)
    with np.load(io.BytesIO(data)) as arrays:
        assert HEAD_FORMAT_WORDS in str(arrays["header"])
    with np.load(io.BytesIO(plain.to_bytes())) as arrays:  # a head without words: the format it always had
        assert HEAD_FORMAT in str(arrays["header"]) and "words" not in arrays


def test_a_head_with_words_refuses_to_score_without_the_texts():
    head, vectors = trained(TEXTS)
    with pytest.raises(HeadError, match="needs the texts"):
        head.probabilities(vectors)
    with pytest.raises(HeadError, match="needs the texts"):
        head.probabilities(vectors, TEXTS[:2])


def test_a_damaged_word_part_is_refused():
    head, _ = trained(TEXTS)
    broken = LearnedHead(head.route_names, head.encoder_id, head.kind, head.coef, head.intercept, head.weight,
                         head.meta, head.words, np.zeros((3, 2), dtype=np.float32))
    with pytest.raises(HeadError, match="not a head file"):
        LearnedHead.from_bytes(broken.to_bytes())
