"""Text encoders: normalised rows, the right shape, and no dependence on batch neighbours."""

from __future__ import annotations

import zlib

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sieve.encoders.base import TextEncoder, l2_normalise_rows, resolve_device
from sieve.encoders.factory import build_text_encoder
from sieve.encoders.sentence_transformers import SentenceTransformerEncoder
from sieve.encoders.trivial import TrivialEncoder
from sieve.topology import EncoderSpec

_short_texts = st.lists(
    st.text(st.characters(codec="utf-8"), max_size=40), min_size=1, max_size=5
)


def assert_rows_normalised(matrix: np.ndarray) -> None:
    np.testing.assert_allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=1e-5)


def assert_batch_independent(encoder: TextEncoder, texts: list[str], atol: float) -> None:
    batch = encoder.encode(texts)
    assert batch.shape == (len(texts), encoder.dim)
    for i, text in enumerate(texts):
        np.testing.assert_allclose(batch[i], encoder.encode([text])[0], atol=atol,
                                   err_msg=f"row {i}: {text!r}")


# --------------------------------------------------------------------------- MiniLM


def test_minilm_identity(minilm):
    assert isinstance(minilm, TextEncoder)
    assert minilm.id == "st:all-MiniLM-L6-v2"
    assert minilm.dim == 384
    assert minilm.device == "cpu"


def test_minilm_rows_normalised_with_shape(minilm):
    texts = ["the cat sat on the mat", "quarterly earnings beat expectations", "hi"]
    vectors = minilm.encode(texts)
    assert vectors.shape == (3, 384)
    assert vectors.dtype == np.float32
    assert_rows_normalised(vectors)


def test_minilm_captures_meaning(minilm):
    cat, kitten, stocks = minilm.encode(
        ["a cat is sleeping on the sofa", "a kitten naps on the couch",
         "the stock market fell sharply today"]
    )
    assert float(cat @ kitten) > float(cat @ stocks) + 0.2


def test_minilm_empty_list(minilm):
    empty = minilm.encode([])
    assert empty.shape == (0, 384)
    assert empty.dtype == np.float32


def test_minilm_batch_independent_across_lengths(minilm):
    # Very different lengths in one batch: padding must not leak into any row.
    texts = [
        "ok",
        "I can't log in since the update, the app keeps showing an error after the splash "
        "screen and then closes; reinstalling did not help and my colleague has the same "
        "problem on a different phone, so it is probably not my device " * 2,
        "refund please",
        "🙂",
        "",
    ]
    assert_batch_independent(minilm, texts, atol=1e-4)


def test_minilm_order_is_the_callers(minilm):
    texts = ["a much longer sentence that will be sorted after the short one", "short"]
    forward = minilm.encode(texts)
    backward = minilm.encode(texts[::-1])
    np.testing.assert_allclose(forward, backward[::-1], atol=1e-4)
    assert float(forward[0] @ forward[1]) < 0.99  # not the same vector twice


@settings(deadline=None, max_examples=6, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=_short_texts)
def test_minilm_batch_row_equals_single(minilm, texts):
    assert_batch_independent(minilm, texts, atol=1e-4)


def test_minilm_batches_larger_than_batch_size(minilm):
    small_batches = SentenceTransformerEncoder(device="cpu", batch_size=2)
    texts = [f"message number {i} about topic {i % 3}" for i in range(5)]
    np.testing.assert_allclose(small_batches.encode(texts), minilm.encode(texts), atol=1e-4)


# --------------------------------------------------------------------------- trivial


def test_trivial_identity(trivial_encoder):
    assert isinstance(trivial_encoder, TextEncoder)
    assert trivial_encoder.id == "trivial:crc32-64"
    assert trivial_encoder.dim == 64
    assert TrivialEncoder(dim=16).id == "trivial:crc32-16"


def test_trivial_deterministic_and_normalised(trivial_encoder):
    texts = ["hello world", "Hello   WORLD", "world hello", "something else entirely"]
    first = trivial_encoder.encode(texts)
    # a fresh instance gives the same vectors: no per-process hash seed
    np.testing.assert_array_equal(first, TrivialEncoder().encode(texts))
    assert first.shape == (4, 64) and first.dtype == np.float32
    assert_rows_normalised(first)
    # lower-cased bag of words: case, spacing and order do not matter
    np.testing.assert_array_equal(first[0], first[1])
    np.testing.assert_array_equal(first[0], first[2])
    assert float(first[0] @ first[3]) < 0.99


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(codec="utf-8"), max_size=60), max_size=12))
def test_trivial_is_a_normalised_count_of_hashed_words(texts):
    # the definition, one word at a time: bucket = CRC-32 of the lower-cased word's UTF-8 mod dim
    expected = np.zeros((len(texts), 64), np.float32)
    for row, text in enumerate(texts):
        for word in text.lower().split():
            expected[row, zlib.crc32(word.encode()) % 64] += 1.0
    np.testing.assert_allclose(TrivialEncoder().encode(texts), l2_normalise_rows(expected), rtol=0, atol=0)


def test_trivial_counts_repeated_words(trivial_encoder):
    once, twice = trivial_encoder.encode(["spam eggs", "spam spam eggs"])
    assert not np.allclose(once, twice)


def test_trivial_without_words_is_a_zero_row(trivial_encoder):
    vectors = trivial_encoder.encode(["", "   "])
    np.testing.assert_array_equal(vectors, np.zeros((2, 64), np.float32))
    assert trivial_encoder.encode([]).shape == (0, 64)


@settings(deadline=None, max_examples=100)
@given(texts=_short_texts)
def test_trivial_batch_row_equals_single(texts):
    encoder = TrivialEncoder()
    assert_batch_independent(encoder, texts, atol=1e-6)
    vectors = encoder.encode(texts)
    norms = np.linalg.norm(vectors, axis=1)
    has_words = np.array([bool(text.split()) for text in texts])
    np.testing.assert_allclose(norms[has_words], 1.0, atol=1e-5)
    np.testing.assert_array_equal(norms[~has_words], 0.0)


# --------------------------------------------------------------------------- helpers


def test_l2_normalise_rows():
    matrix = np.array([[3.0, 4.0], [0.0, 0.0], [0.0, -2.0]])
    out = l2_normalise_rows(matrix)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0], [0.0, -1.0]])


def test_resolve_device_passes_explicit_choices():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("cuda") == "cuda"
    assert resolve_device("auto") in {"cpu", "cuda"}


def test_build_text_encoder_trivial():
    encoder = build_text_encoder(EncoderSpec(kind="trivial"))
    assert isinstance(encoder, TrivialEncoder)


def test_max_seq_length_truncates(minilm):
    # Two texts that differ only after the 16th token embed the same when truncated there.
    short_model = SentenceTransformerEncoder(device="cpu", max_seq_length=16)
    head = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen"
    a, b = short_model.encode([head + " apples and pears", head + " volcanoes erupting"])
    np.testing.assert_allclose(a, b, atol=1e-5)
    full_a, full_b = minilm.encode([head + " apples and pears", head + " volcanoes erupting"])
    assert not np.allclose(full_a, full_b, atol=1e-3)
