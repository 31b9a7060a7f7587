"""The route store on qdrant-client's embedded local mode (a real Qdrant, on tmp_path)."""

from __future__ import annotations

import re
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from qdrant_client import QdrantClient
from qdrant_client.common import client_warnings
from typer.testing import CliRunner

from sieve.cli import app
from sieve.encoders.trivial import TrivialEncoder
from sieve.flow.match import RouteIndex, example_id
from sieve.routeset import RouteSet, parse_route_set
from sieve.settings import QdrantSettings, get_settings
from sieve.store.qdrant import RouteStore, RouteStoreError, space_name

from .progress_helpers import RecordingProgress


def small_set(**changes) -> RouteSet:
    data = {
        "name": "tiny",
        "default_outcome": "ok",
        "routes": [
            {"name": "greet", "outcome": "ok",
             "utterances": ["hello there", "good morning friend", "hi how are you"]},
            {"name": "complain", "outcome": "bad",
             "utterances": ["this is terrible service", "I want my money back"]},
        ],
    }
    data.update(changes)
    return parse_route_set(data)


def with_route(route_set: RouteSet, name: str, **changes) -> RouteSet:
    data = route_set.model_dump(mode="json")
    for route in data["routes"]:
        if route["name"] == name:
            route.update(changes)
    return parse_route_set(data)


@pytest.fixture
def store(tmp_path) -> RouteStore:
    return RouteStore(QdrantSettings(path=tmp_path / "q", lock_wait_s=5))


def counts(report) -> tuple[int, int, int, int]:
    return report.added, report.updated, report.deleted, report.unchanged


def stored_payloads(store: RouteStore, encoder_id: str, set_name: str, version: str) -> dict[str, dict]:
    """The stored points of one version of a set, by example id."""
    with store.client() as client:
        records, _ = client.scroll(store.collection(encoder_id), limit=1000, with_payload=True)
    return {r.payload["example"]: dict(r.payload) for r in records
            if r.payload and r.payload["set"] == set_name and r.payload["version"] == version}


# --------------------------------------------------------------------------- sync


def test_space_and_collection_names(store):
    assert space_name("st:all-MiniLM-L6-v2") == "st-all-minilm-l6-v2"
    assert store.collection("trivial:crc32-64") == "sieve__trivial-crc32-64"
    assert store.meta_collection == "sieve__route_sets"


def test_sync_lifecycle(store, trivial_encoder):
    encoder_id = trivial_encoder.id
    route_set = small_set()
    assert store.current_version("tiny", encoder_id) is None

    first = store.sync(route_set, trivial_encoder)
    assert counts(first) == (5, 0, 0, 0)
    assert first.previous_version is None
    assert first.version == route_set.version
    assert first.collection == "sieve__trivial-crc32-64"
    assert store.current_version("tiny", encoder_id) == route_set.version
    assert (first.points, first.written, first.encoded) == (5, 5, 5)
    assert set(stored_payloads(store, encoder_id, "tiny", route_set.version)) == {
        example_id("tiny", r.name, u) for r in route_set.routes for u in r.utterances
    }

    again = store.sync(route_set, trivial_encoder)
    assert counts(again) == (0, 0, 0, 5)
    assert again.previous_version == route_set.version
    assert (again.written, again.encoded) == (0, 0)  # the same version twice: nothing written

    # remove one utterance: the new version lacks exactly that example; the old one keeps it
    fewer = with_route(route_set, "greet", utterances=["hello there", "hi how are you"])
    report = store.sync(fewer, trivial_encoder)
    assert counts(report) == (0, 0, 1, 4)
    assert (report.written, report.encoded) == (4, 0)  # vectors come from the previous version
    assert report.previous_version == route_set.version
    gone = example_id("tiny", "greet", "good morning friend")
    payloads = stored_payloads(store, encoder_id, "tiny", fewer.version)
    assert gone not in payloads and len(payloads) == 4
    assert gone in stored_payloads(store, encoder_id, "tiny", route_set.version)
    assert store.current_version("tiny", encoder_id) == fewer.version

    # change an outcome: a new version with the new payloads, nothing re-encoded
    relabelled = with_route(fewer, "complain", outcome="rude")
    report = store.sync(relabelled, trivial_encoder)
    assert counts(report) == (0, 2, 0, 2)
    assert report.encoded == 0
    payloads = stored_payloads(store, encoder_id, "tiny", relabelled.version)
    complain_ids = {example_id("tiny", "complain", u) for u in ("this is terrible service",
                                                                "I want my money back")}
    assert {payloads[pid]["outcome"] for pid in complain_ids} == {"rude"}
    assert {payloads[pid]["version"] for pid in complain_ids} == {relabelled.version}
    assert store.load("tiny", encoder_id).route_set.route("complain").outcome == "rude"

    # add one utterance
    more = with_route(relabelled, "complain",
                      utterances=["this is terrible service", "I want my money back",
                                  "worst support ever"])
    report = store.sync(more, trivial_encoder)
    assert counts(report) == (1, 0, 0, 4)
    assert report.encoded == 1
    assert store.current_version("tiny", encoder_id) == more.version
    assert len(store.load("tiny", encoder_id).example_ids) == 5


def test_threshold_change_changes_version_only(store, trivial_encoder):
    store.sync(small_set(), trivial_encoder)
    stricter = small_set(defaults={"accept": 0.7})
    report = store.sync(stricter, trivial_encoder)
    assert counts(report) == (0, 0, 0, 5)
    assert store.current_version("tiny", trivial_encoder.id) == stricter.version
    loaded = store.load("tiny", trivial_encoder.id)
    assert loaded.route_set.defaults.accept == 0.7
    assert loaded.version == stricter.version


def test_moving_an_utterance_between_routes(store, trivial_encoder):
    store.sync(small_set(), trivial_encoder)
    moved = parse_route_set({
        "name": "tiny", "default_outcome": "ok",
        "routes": [
            {"name": "greet", "outcome": "ok", "utterances": ["hello there", "hi how are you"]},
            {"name": "complain", "outcome": "bad",
             "utterances": ["this is terrible service", "I want my money back",
                            "good morning friend"]},
        ],
    })
    report = store.sync(moved, trivial_encoder)
    assert counts(report) == (1, 0, 1, 4)
    assert report.encoded == 0  # the same utterance has the same vector in another route
    assert store.load("tiny", trivial_encoder.id).example_texts[-1] == "good morning friend"


def test_sets_and_encoder_spaces_do_not_interfere(store, trivial_encoder):
    other = small_set(name="other")
    store.sync(small_set(), trivial_encoder)
    store.sync(other, trivial_encoder)
    # shrinking one set leaves the other alone
    shrunk = with_route(small_set(), "greet", utterances=["hello there"])
    assert counts(store.sync(shrunk, trivial_encoder)) == (0, 0, 2, 3)
    assert len(store.load("other", trivial_encoder.id).example_ids) == 5
    assert len(store.load("tiny", trivial_encoder.id).example_ids) == 3
    # another encoder space is a separate collection with its own version record
    narrow = TrivialEncoder(dim=16)
    assert store.current_version("tiny", narrow.id) is None
    report = store.sync(small_set(), narrow)
    assert report.collection == "sieve__trivial-crc32-16"
    assert counts(report) == (5, 0, 0, 0)
    assert store.current_version("tiny", narrow.id) == small_set().version
    assert store.current_version("tiny", trivial_encoder.id) == shrunk.version
    assert store.load("tiny", narrow.id).vectors.shape == (5, 16)


# --------------------------------------------------------------------------- load


def assert_same_index(loaded: RouteIndex, built: RouteIndex) -> None:
    assert loaded.route_set == built.route_set
    assert loaded.version == built.version
    assert loaded.encoder_id == built.encoder_id
    assert loaded.example_ids == built.example_ids
    assert loaded.example_texts == built.example_texts
    assert loaded.bounds == built.bounds
    assert loaded.example_route.tolist() == built.example_route.tolist()
    np.testing.assert_allclose(loaded.vectors, built.vectors, atol=1e-5)


def test_load_equals_build_trivial(store, support_set, trivial_encoder):
    store.sync(support_set, trivial_encoder)
    loaded = store.load("support", trivial_encoder.id)
    built = RouteIndex.build(support_set, trivial_encoder)
    assert_same_index(loaded, built)
    assert loaded.example_ids[0] == example_id("support", support_set.routes[0].name,
                                               support_set.routes[0].utterances[0])


def test_load_equals_build_minilm(store, minilm):
    route_set = small_set()
    report = store.sync(route_set, minilm)
    assert report.collection == "sieve__st-all-minilm-l6-v2"
    loaded = store.load("tiny", minilm.id)
    assert loaded.vectors.shape == (5, 384)
    assert_same_index(loaded, RouteIndex.build(route_set, minilm))


def test_load_keeps_the_set_order_after_edits(store, trivial_encoder):
    store.sync(small_set(), trivial_encoder)
    reordered = with_route(small_set(), "greet",
                           utterances=["hi how are you", "new one", "hello there",
                                       "good morning friend"])
    store.sync(reordered, trivial_encoder)
    loaded = store.load("tiny", trivial_encoder.id)
    assert_same_index(loaded, RouteIndex.build(reordered, trivial_encoder))


def test_load_of_an_unsynced_set(store, trivial_encoder):
    with pytest.raises(RouteStoreError, match="'tiny' has not been synced.*sieve routes sync"):
        store.load("tiny", trivial_encoder.id)
    store.sync(small_set(), trivial_encoder)
    with pytest.raises(RouteStoreError, match="has not been synced for encoder 'st:"):
        store.load("tiny", "st:all-MiniLM-L6-v2")
    with pytest.raises(RouteStoreError, match="'nothing' has not been synced"):
        store.load("nothing", trivial_encoder.id)


def test_store_survives_reopening(tmp_path, trivial_encoder):
    settings = QdrantSettings(path=tmp_path / "q")
    RouteStore(settings).sync(small_set(), trivial_encoder)
    fresh = RouteStore(settings)  # a new process would do just this
    assert fresh.current_version("tiny", trivial_encoder.id) == small_set().version
    assert counts(fresh.sync(small_set(), trivial_encoder)) == (0, 0, 0, 5)


# --------------------------------------------------------------------------- the lock


def test_locked_store_times_out_with_a_clear_error(tmp_path, trivial_encoder):
    path = tmp_path / "q"
    path.mkdir()
    holder = QdrantClient(path=str(path))
    try:
        store = RouteStore(QdrantSettings(path=path, lock_wait_s=0.5))
        started = time.monotonic()
        with pytest.raises(RouteStoreError, match="locked by another process for over 0.5s"):
            store.current_version("tiny", trivial_encoder.id)
        assert time.monotonic() - started >= 0.5  # it did wait before giving up
    finally:
        holder.close()


def test_store_waits_for_the_lock_holder(tmp_path, trivial_encoder):
    path = tmp_path / "q"
    path.mkdir()
    holder = QdrantClient(path=str(path))
    release = threading.Timer(0.6, holder.close)
    release.start()
    try:
        store = RouteStore(QdrantSettings(path=path, lock_wait_s=20))
        started = time.monotonic()
        report = store.sync(small_set(), trivial_encoder)
        waited = time.monotonic() - started
    finally:
        release.join()
        holder.close()
    assert waited >= 0.5
    assert report.added == 5
    assert store.current_version("tiny", trivial_encoder.id) == small_set().version


def test_lock_is_released_after_each_operation(store, trivial_encoder):
    store.sync(small_set(), trivial_encoder)
    # the store closed its client: another client can open the path right away
    other = QdrantClient(path=str(store.settings.path))
    try:
        assert other.collection_exists(store.collection(trivial_encoder.id))
    finally:
        other.close()


# --------------------------------------------------------------------------- a missing server


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port bound by no listener: every connection to it is refused."""
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))
        yield bound.getsockname()[1]


@pytest.mark.parametrize("grpc", [False, True], ids=["rest", "grpc"])
def test_a_missing_server_fails_in_one_line_after_retrying(closed_port, grpc):
    url = f"http://127.0.0.1:{closed_port}"
    settings = QdrantSettings(url=url, prefer_grpc=grpc, grpc_port=closed_port, startup_timeout_s=0.5)
    store = RouteStore(settings)
    started = time.monotonic()
    with pytest.raises(RouteStoreError, match=rf"route store at {url} unreachable for 0.5s") as caught:
        store.current_version("tiny", "trivial:crc32-64")
    assert time.monotonic() - started >= 0.5  # it kept trying that long
    message = str(caught.value)
    attempts = re.search(r"\((\d+) attempts", message)
    assert attempts is not None and int(attempts.group(1)) > 1, message
    assert "\n" not in message and "refused" in message.lower(), message


def test_routes_sync_against_a_missing_server_ends_in_an_error_not_a_traceback(closed_port, monkeypatch):
    monkeypatch.setenv("SIEVE_QDRANT__URL", f"http://127.0.0.1:{closed_port}")
    monkeypatch.setenv("SIEVE_QDRANT__PREFER_GRPC", "false")
    monkeypatch.setenv("SIEVE_QDRANT__STARTUP_TIMEOUT_S", "0.3")
    get_settings.cache_clear()
    route_file = Path(__file__).parents[1] / "routes" / "moderation.yaml"
    try:
        result = CliRunner().invoke(app, ["routes", "sync", str(route_file), "-q", "--encoder", "trivial"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 2, result.output
    assert "unreachable for 0.3s" in " ".join(result.output.split())
    assert "Traceback" not in result.output


# --------------------------------------------------------------------------- warnings


def test_sync_in_local_mode_emits_no_warning(store, trivial_encoder):
    # A payload index in local mode makes qdrant-client warn, attributed to sieve.store.qdrant
    # (not covered by pyproject's qdrant_client filter), so the store makes none. qdrant-client shows
    # that warning once per process, so forget it was shown before checking.
    client_warnings.SEEN_MESSAGES.discard("create-local-payload-indexes")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        store.sync(small_set(), trivial_encoder)
        store.load("tiny", trivial_encoder.id)
    assert [str(w.message) for w in caught] == []


def test_store_path_is_created(tmp_path, trivial_encoder):
    path: Path = tmp_path / "deep" / "er" / "q"
    RouteStore(QdrantSettings(path=path)).sync(small_set(), trivial_encoder)
    assert path.is_dir()


# --------------------------------------------------------------------------- progress


def test_sync_reports_its_steps_and_totals(store, trivial_encoder, monkeypatch):
    # small chunks and pages, so each step advances more than once
    monkeypatch.setattr("sieve.store.qdrant._ENCODE_CHUNK", 2)
    monkeypatch.setattr("sieve.store.qdrant._PAGE", 2)
    route_set = small_set()

    progress = RecordingProgress()
    store.sync(route_set, trivial_encoder, progress=progress)
    assert progress.seen() == [("encoding examples", 5, 5), ("upserting points", 5, 5)]
    assert [step.advances for step in progress.steps] == [[2, 2, 1], [2, 2, 1]]
    assert all(step.finished for step in progress.steps)
    # the chunks were put together in order: the same index as encoding the set at once
    assert_same_index(store.load("tiny", trivial_encoder.id), RouteIndex.build(route_set, trivial_encoder))

    progress = RecordingProgress()
    store.sync(with_route(route_set, "complain", outcome="rude"), trivial_encoder, progress=progress)
    assert progress.seen() == [("upserting points", 5, 5)]  # a new version: its points, none encoded

    progress = RecordingProgress()
    store.sync(with_route(route_set, "complain", outcome="rude"), trivial_encoder, progress=progress)
    assert progress.seen() == []  # nothing to encode, upsert or update
