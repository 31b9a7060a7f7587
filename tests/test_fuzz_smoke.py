"""The fuzz run (load-tests/fuzz.py) at CI size, its generator, and the decoding defects it found.

The full run (10,000 events) is the figure in docs/reliability.md; here 1,000 generated bad
events go through a real worker and every one must be decided or dead-lettered with a reason,
with the worker alive at the end.
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sieve.flow.decode import decode_batch
from sieve.flow.publish import plan_dead_letters
from sieve.kafka.records import RawRecord
from sieve.topology import LimitsSpec, OutputSpec

from .conftest import REPO

sys.path.insert(0, str(REPO / "load-tests"))

from fuzz_check import _decision_id, _letter_id  # noqa: E402
from fuzz_events import FLOOD, KINDS, make_fuzz_events  # noqa: E402
from fuzz_images import lying_png, zlib_bomb_png  # noqa: E402


def record(value: bytes, offset: int = 0) -> RawRecord:
    return RawRecord("in", 0, offset, b"k", value, time.time())


def fuzz(count: int, seed: int = 7) -> list:
    return make_fuzz_events(count, "t", seed=seed, image_base="http://127.0.0.2:8000", closed_port=9)


def test_generator_is_seeded_and_covers_every_kind() -> None:
    events = fuzz(600)
    assert [e.value for e in events[:100]] == [e.value for e in fuzz(200)[:100]], "same seed, same events"
    assert [e.value for e in fuzz(100, seed=8)] != [e.value for e in events[:100]]
    assert {e.kind for e in events} == set(KINDS) | {"surrogate_flood"}
    flood = [i for i, e in enumerate(events) if e.kind == "surrogate_flood"]
    assert flood == list(range(300, 300 + min(FLOOD, 60))), "one contiguous block from the middle"
    assert all(e.key == e.id.encode() for e in events if e.kind != "random_bytes_no_key")
    assert all(e.key is None for e in events if e.kind == "random_bytes_no_key")
    assert {e.expect for e in events} == {"decided", "dead_letter", "either"}


def test_bombs_declare_more_pixels_than_any_limit_allows() -> None:
    from PIL import Image

    from sieve.flow.images import ImageRejected, decode_image

    for data, pixels in ((lying_png(), 50_000 * 50_000), (zlib_bomb_png(), 20_000 * 20_000)):
        assert len(data) < 100_000
        with Image.open(io.BytesIO(data)) as image:
            assert image.size[0] * image.size[1] == pixels
        with pytest.raises(ImageRejected) as refused:
            decode_image(data, LimitsSpec())
        assert refused.value.reason == "image_pixels"


def test_checker_finds_letters_by_offset_or_key_and_decisions_by_fuzz_id() -> None:
    where = {(2, 17): "t-5"}
    ids = {"t-5", "t-6", "t-7"}
    assert (
        _letter_id({"source_topic": "in", "partition": 2, "offset": 17, "key_b64": None}, "in", where, ids)
        == "t-5"
    )
    key = base64.b64encode(b"t-6").decode()
    assert (
        _letter_id({"source_topic": "in", "partition": 0, "offset": 1, "key_b64": key}, "in", where, ids)
        == "t-6"
    )
    assert (
        _letter_id({"source_topic": "in", "partition": 0, "offset": 1, "key_b64": None}, "in", where, ids)
        is None
    )
    assert _decision_id({"event_id": "other", "event": {"metadata": {"fuzz_id": "t-7"}}}, ids) == "t-7"
    assert _decision_id({"event_id": "t-6", "event": {"metadata": {}}}, ids) == "t-6"
    assert _decision_id({"event_id": "warm-1", "event": {"metadata": {}}}, ids) is None


# -- the defects the fuzz run found (flow/decode.py) ---------------------------------------------


def test_lone_surrogate_in_a_metadata_key_is_a_dead_letter_at_decode() -> None:
    # Found by the fuzz run: the model's serialiser replaced the surrogate with U+FFFD, so decode
    # let the event through and the decision's serialiser raised for the whole batch
    # (pipeline_error; a batch made only of such events counted as a worker fault).
    for metadata in ({"\udc80": 1}, {"a": {"\ud800x": [1]}}, {"a": ["\udfff"]}):
        raw = json.dumps({"id": "e1", "text": "hello", "metadata": metadata}).encode()
        oks, letters = decode_batch([record(raw)], LimitsSpec(), worker="w", topology="t")
        assert oks == [] and [(x.reason, x.event_id) for x in letters] == [("invalid_utf8", "e1")]
    raw = json.dumps({"id": "e2", "text": "\U0001f600", "metadata": {"\U0001f600": 1}}).encode()
    oks, letters = decode_batch([record(raw)], LimitsSpec(), worker="w", topology="t")
    assert [d.event.id for d in oks] == ["e2"] and letters == [], "an escaped pair is a valid character"


def test_dead_letter_of_an_id_with_a_lone_surrogate_can_be_published() -> None:
    # Found by the fuzz run: the refused id was carried as the letter's event_id, and publishing
    # the letter (its key is the event id) raised UnicodeEncodeError for the whole batch.
    raw = json.dumps({"id": "e\ud800", "text": "hello"}).encode()
    oks, letters = decode_batch([record(raw, offset=4)], LimitsSpec(), worker="w", topology="t")
    assert oks == [] and len(letters) == 1
    assert letters[0].event_id is None and letters[0].offset == 4
    [message] = plan_dead_letters(letters, OutputSpec())
    assert json.loads(message.value)["reason"] == letters[0].reason


# -- the run itself --------------------------------------------------------------------------------


@pytest.mark.integration
def test_fuzz_run_small_accounts_for_every_event(tmp_path: Path) -> None:
    figures = tmp_path / "fuzz.json"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "load-tests" / "fuzz.py"),
            "--events",
            "1000",
            "--rate",
            "0",
            "--idle",
            "60",
            "--json",
            str(figures),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-4000:]
    assert "| accounted for (decided, or dead-lettered with a reason) | 1000 (100.00 %) |" in result.stdout
    r = json.loads(figures.read_text())
    assert r["events"] == 1000 and r["accounted"] == 1000 and r["unaccounted_count"] == 0
    assert r["decided"] + r["dead_lettered"] - r["both"] == 1000
    assert r["reasonless"] == [] and r["processing_errors"] == 0 and r["wrong_fate_count"] == 0
    assert r["worker_alive"] and r["worker_healthy"]
    kinds = r["by_kind"]
    assert kinds["valid_text"]["decided"] == kinds["valid_text"]["produced"] > 0
    assert kinds["image_valid"]["decided"] == kinds["image_valid"]["produced"] > 0, "images were routed"
    assert set(kinds["image_bomb"]["reasons"]) == {"image_pixels"}
    assert set(kinds["image_private_url"]["reasons"]) == {"image_uri_refused"}
    assert kinds["surrogate_flood"]["reasons"] == {"invalid_utf8": kinds["surrogate_flood"]["produced"]}
    assert r["image_server_requests"] > 0, "fetches reached the allowed image server"
    memory = r["memory"]
    assert memory["peak_mib"] >= memory["start_mib"] > 0 and memory["samples"] > 3
