"""Candidate versions, promotion and rollback in the route store (a real Qdrant, local mode on tmp_path)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from sieve.cli import app
from sieve.settings import QdrantSettings, get_settings
from sieve.store.qdrant import RouteStore, RouteStoreError

from .test_store import small_set, with_route


@pytest.fixture
def store(tmp_path) -> RouteStore:
    return RouteStore(QdrantSettings(path=tmp_path / "q", lock_wait_s=5))


def test_a_candidate_synced_without_activating_is_stored_and_not_active(store, trivial_encoder):
    active, candidate = small_set(), with_route(small_set(), "greet", utterances=["hey", "howdy"])
    store.sync(active, trivial_encoder)
    report = store.sync(candidate, trivial_encoder, activate=False)
    assert report.version == candidate.version
    assert store.current_version("tiny", trivial_encoder.id) == active.version
    versions = {v.version: v.active for v in store.list_versions("tiny", trivial_encoder.id)}
    assert versions == {active.version: True, candidate.version: False}
    assert store.load("tiny", trivial_encoder.id, candidate.version).version == candidate.version


def test_promote_and_rollback_move_the_pointer_and_log_the_evidence(store, trivial_encoder):
    active, candidate = small_set(), with_route(small_set(), "greet", utterances=["hey", "howdy"])
    store.sync(active, trivial_encoder)
    store.sync(candidate, trivial_encoder, activate=False)
    evidence = {"held_back_accuracy": [0.91, 0.95], "shadow_agreement": 0.97}
    assert store.set_active("tiny", trivial_encoder.id, candidate.version, evidence) == active.version
    assert store.load("tiny", trivial_encoder.id).version == candidate.version
    assert store.rollback("tiny", trivial_encoder.id, {"reason": "worse on review"}) == active.version
    assert store.current_version("tiny", trivial_encoder.id) == active.version
    log = store.promotions("tiny", trivial_encoder.id)
    assert [(e["previous"], e["version"]) for e in log] == [
        (None, active.version), (active.version, candidate.version), (candidate.version, active.version)]
    assert log[0]["evidence"] == {"via": "sync"}
    assert log[1]["evidence"] == evidence
    assert log[2]["evidence"] == {"rollback_from": candidate.version, "reason": "worse on review"}


def test_promoting_an_unknown_version_or_rolling_back_past_the_first_is_refused(store, trivial_encoder):
    store.sync(small_set(), trivial_encoder)
    with pytest.raises(RouteStoreError, match="no complete version"):
        store.set_active("tiny", trivial_encoder.id, "0123456789abcdef")
    with pytest.raises(RouteStoreError, match="no earlier active version"):
        store.rollback("tiny", trivial_encoder.id)
    assert store.current_version("tiny", trivial_encoder.id) == small_set().version


def promo_topology(tmp_path: Path) -> Path:
    """A topology over the small set (trivial encoder), for the promote commands."""
    topology = tmp_path / "t.yaml"
    topology.write_text(yaml.safe_dump({
        "name": "promo", "input": {"topics": ["t.in"]}, "route_set": {"name": "tiny"},
        "encoder": {"kind": "trivial"},
        "output": {"outcome_topics": {"ok": "t.ok", "bad": "t.bad", "needs_review": "t.review"}},
    }), encoding="utf-8")
    return topology


def test_the_cli_promotes_with_evidence_and_rolls_back(tmp_path: Path, monkeypatch, trivial_encoder):
    qdrant = tmp_path / "cli-q"
    store = RouteStore(QdrantSettings(path=qdrant, lock_wait_s=5))
    active, candidate = small_set(), with_route(small_set(), "greet", utterances=["hey", "howdy"])
    store.sync(active, trivial_encoder)
    topology = promo_topology(tmp_path)
    proof = tmp_path / "proof.json"
    proof.write_text(json.dumps({"agreement": 0.98}), encoding="utf-8")
    monkeypatch.setenv("SIEVE_QDRANT__PATH", str(qdrant))
    get_settings.cache_clear()
    try:
        runner = CliRunner()
        routes = tmp_path / "candidate.yaml"
        routes.write_text(yaml.safe_dump(candidate.model_dump(mode="json")), encoding="utf-8")
        staged = runner.invoke(app, ["routes", "sync", str(routes), "--topology", str(topology),
                                     "--no-activate"])
        assert staged.exit_code == 0 and "not active" in " ".join(staged.output.split()), staged.output
        assert store.current_version("tiny", trivial_encoder.id) == active.version
        promoted = runner.invoke(app, ["routes", "promote", "tiny", candidate.version, "--topology",
                                       str(topology), "--evidence", str(proof), "--reason", "shadow agreed"])
        assert promoted.exit_code == 0, promoted.output
        listed = runner.invoke(app, ["routes", "versions", "tiny", "--topology", str(topology)])
        assert f"* {candidate.version}" in listed.output
        rolled = runner.invoke(app, ["routes", "rollback", "tiny", "--topology", str(topology)])
        assert rolled.exit_code == 0, rolled.output
        again = runner.invoke(app, ["routes", "promote", "tiny", "nope", "--topology", str(topology)])
        assert again.exit_code != 0 and "no complete version" in again.output
    finally:
        get_settings.cache_clear()
    assert store.current_version("tiny", trivial_encoder.id) == active.version
    entry = store.promotions("tiny", trivial_encoder.id)[1]
    assert entry["evidence"] == {"via": "promote", "reason": "shadow agreed", "evidence": {"agreement": 0.98}}
