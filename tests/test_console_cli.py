"""``sieve console``: what it refuses to start without, and the seeded hand-offs of ``--seed``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sieve.console.seed import SEEDED, seed_handoffs
from sieve.contracts import Decision
from sieve.encoders.trivial import TrivialEncoder
from sieve.routeset import load_route_set
from sieve.topology import load_topology

REPO = Path(__file__).resolve().parents[1]
TOPOLOGY = REPO / "topologies" / "moderation.yaml"


def sieve(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SIEVE_CONSOLE__")}
    return subprocess.run([sys.executable, "-m", "sieve", *args], env={**clean, **env}, capture_output=True,
                          text=True, timeout=120, cwd=REPO)


def test_serving_needs_a_session_key_and_a_user(tmp_path: Path) -> None:
    users = str(tmp_path / "users.yaml")
    no_key = sieve("console", str(TOPOLOGY), SIEVE_CONSOLE__USERS_FILE=users)
    assert no_key.returncode == 2 and "SIEVE_CONSOLE__SECRET_KEY" in no_key.stderr
    no_users = sieve("console", str(TOPOLOGY), SIEVE_CONSOLE__USERS_FILE=users, SIEVE_CONSOLE__SECRET_KEY="k")
    assert no_users.returncode == 2 and "sieve console users add" in no_users.stderr.replace("\n", " ")
    added = subprocess.run([sys.executable, "-m", "sieve", "console", "users", "add", "ana", "--role", "lead",
                            "--password-stdin", "--users-file", users], input="long enough pw\n", text=True,
                           capture_output=True, timeout=120, cwd=REPO)
    assert added.returncode == 0, added.stderr
    listed = sieve("console", "users", "list", "--users-file", users)
    assert listed.stdout.split() == ["ana", "lead", "enabled"]


def test_seeded_handoffs_are_router_decisions_handed_on_and_marked_seeded() -> None:
    topology = load_topology(TOPOLOGY)
    route_set = load_route_set(REPO / "routes" / "moderation.yaml")
    samples = REPO / "routes" / "samples" / "demo-messages.jsonl"
    messages = seed_handoffs(topology, route_set, TrivialEncoder(), samples, 5, "some-model")
    assert len(messages) == 5 and {m.topic for m in messages} == {"sieve.human-review"}
    decisions = [Decision.model_validate_json(m.value) for m in messages]
    assert all(d.outcome == "needs_review" and d.final is False for d in decisions)
    assert all(d.review is not None and d.review.handoff_reason == SEEDED and d.review.verdict is None
               for d in decisions)  # no LLM answer is made up
    assert all(d.scores and d.review.router_decision_id != d.id for d in decisions)  # type: ignore[union-attr]
