"""The chaos run (load-tests/chaos.py) at CI size, its TCP proxy and its checker.

The proxy tests run it between a socket and a local echo server; the checker tests feed it
output records; the run itself starts two real workers and one reviewer (asking the scripted
LLM endpoint, load-tests/llm_script.py) behind the proxy, SIGKILLs the workers three times and
the reviewer once, cuts their path to the broker for 10 s, and must account for every event
and settle every review.
"""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import REPO

sys.path.insert(0, str(REPO / "load-tests"))

import argparse  # noqa: E402

from chaos import plan  # noqa: E402
from chaos_check import Ledger  # noqa: E402
from llm_script import ScriptedEndpoint  # noqa: E402
from tcp_proxy import ChaosProxy  # noqa: E402


@pytest.fixture
def echo() -> Iterator[int]:
    """A threaded TCP echo server on loopback; yields its port."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):  # the proxy resets its connections on purpose
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join(5)
    server.close()


def client(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.settimeout(5)
    return sock


def test_proxy_forwards_stalls_and_delivers_held_bytes_at_heal(echo: int) -> None:
    with ChaosProxy(("127.0.0.1", echo)) as proxy, client(proxy.port) as sock:
        sock.sendall(b"ping")
        assert sock.recv(10) == b"ping"
        proxy.partition()
        assert proxy.cut
        sock.sendall(b"held")
        sock.settimeout(1.0)
        with pytest.raises(TimeoutError):
            sock.recv(10)
        proxy.heal()
        sock.settimeout(5)
        assert sock.recv(10) == b"held", "held bytes are delivered after the heal, in order"
        assert proxy.stats()["accepted"] == 1 and proxy.stats()["up_bytes"] == 8


def test_proxy_stalls_one_direction_only(echo: int) -> None:
    with ChaosProxy(("127.0.0.1", echo)) as proxy, client(proxy.port) as sock:
        proxy.partition("stall", "down")
        sock.sendall(b"abc")
        sock.settimeout(1.0)
        with pytest.raises(TimeoutError):
            sock.recv(10)
        assert proxy.stats()["up_bytes"] == 3, "the request reached the server"
        proxy.heal()
        sock.settimeout(5)
        assert sock.recv(10) == b"abc"


def closed(sock: socket.socket) -> bool:
    """Whether the peer closed or reset the connection (a send, then a read)."""
    try:
        sock.sendall(b"x")
        return sock.recv(10) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


def test_proxy_reset_closes_connections_and_refuses_new_ones_until_healed(echo: int) -> None:
    with ChaosProxy(("127.0.0.1", echo)) as proxy:
        with client(proxy.port) as sock:
            sock.sendall(b"up")
            assert sock.recv(10) == b"up"
            proxy.partition("reset")
            assert closed(sock)
        try:
            refused = client(proxy.port)
        except ConnectionResetError:  # reset before the handshake's end was seen
            pass
        else:
            with refused:
                assert closed(refused)
        assert proxy.stats()["refused"] >= 1 and proxy.stats()["resets"] >= 1
        proxy.heal()
        with client(proxy.port) as again:
            again.sendall(b"back")
            assert again.recv(10) == b"back"


def test_proxy_drop_throws_bytes_away_and_cuts_the_stream_at_heal(echo: int) -> None:
    with ChaosProxy(("127.0.0.1", echo)) as proxy, client(proxy.port) as sock:
        proxy.partition("drop", "up")
        sock.sendall(b"lost")
        time.sleep(0.5)
        assert proxy.stats()["up_dropped"] == 4 and proxy.stats()["up_bytes"] == 0
        proxy.heal()
        assert closed(sock), "a stream that lost bytes is closed at the heal"


def test_proxy_delay_holds_every_chunk(echo: int) -> None:
    with ChaosProxy(("127.0.0.1", echo)) as proxy, client(proxy.port) as sock:
        proxy.delay(300)
        started = time.monotonic()
        sock.sendall(b"slow")
        assert sock.recv(10) == b"slow"
        assert time.monotonic() - started >= 0.6, "300 ms each way"


def decision(event_id: str, decision_id: str, version: str = "v1", outcome: str = "clean") -> dict:
    return {"event_id": event_id, "id": decision_id, "route_set_version": version, "outcome": outcome}


def test_checker_counts_repeats_apart_from_conflicting_ids_and_finds_the_lost() -> None:
    ledger = Ledger()
    ledger.add_decision(decision("e1", "d1"))
    ledger.add_decision(decision("e1", "d1"))  # a repeat after a crash: allowed
    ledger.add_decision(decision("e2", "d2"))
    ledger.add_decision(decision("e2", "d2b"))  # same version, another id: a defect
    ledger.add_decision(decision("e3", "d3", "v1"))
    ledger.add_decision(decision("e3", "d3b", "v2"))  # a new route-set version: allowed
    ledger.add_decision(decision("e4", "d4", outcome="clean"))
    ledger.add_decision(decision("e4", "d4", outcome="violating"))  # one id, two outcomes
    key = base64.b64encode(b"e5").decode()
    ledger.add_dead_letter({"event_id": None, "key_b64": key, "reason": "not_json"})
    payload = base64.b64encode(json.dumps({"id": "e6"}).encode()).decode()
    ledger.add_dead_letter({"payload_b64": payload, "reason": "text_too_long"})
    ledger.add_decision(decision("other", "dx"))
    verdict = ledger.verdict({"e1", "e2", "e3", "e4", "e5", "e6", "e7"})
    assert verdict.lost == ["e7"]
    assert (verdict.decided, verdict.dead_lettered_only) == (4, 2)
    assert (verdict.repeats, verdict.repeated_events) == (2, 2)
    assert verdict.conflicting == ["e2"] and verdict.version_changes == 1
    assert verdict.outcome_mismatches == ["e4"]
    assert verdict.dead_letter_reasons == {"not_json": 1, "text_too_long": 1}
    assert verdict.unmatched == 1 and not verdict.ok
    assert "| **lost** (neither) | 1 |" in verdict.table()


def reviewed(event_id: str, router_id: str, verdict_id: str, outcome: str = "clean") -> dict:
    reason = "malformed_reply" if outcome == "needs_review" else None
    return {"event_id": event_id, "id": verdict_id, "route_set_version": "v1", "outcome": outcome,
            "decided_by": "llm", "review": {"router_decision_id": router_id, "handoff_reason": reason}}


def test_checker_settles_each_review_by_a_verdict_or_a_hand_off_and_finds_the_unsettled() -> None:
    ledger = Ledger()
    for n in range(1, 7):
        ledger.add_decision({**decision(f"r{n}", f"d{n}", outcome="needs_review"), "decided_by": "router"})
    ledger.add_decision(reviewed("r1", "d1", "v1"))
    ledger.add_decision(reviewed("r1", "d1", "v1"))  # repeated after a reviewer was killed: allowed
    ledger.add_handoff({**reviewed("r2", "d2", "v2", "needs_review"), "decided_by": "router"})
    ledger.add_decision(reviewed("r3", "d3", "v3"))
    ledger.add_decision(reviewed("r3", "d3", "v3b"))  # two verdict ids for one router decision
    ledger.add_decision(reviewed("r4", "d4", "v4", "violating"))
    ledger.add_handoff(reviewed("r4", "d4", "v4", "needs_review"))  # one verdict id, two fates
    ledger.add_decision(reviewed("r5", "d5", "v5"))
    ledger.add_decision(reviewed("r5", "d5", "v5", "violating"))  # one verdict id, two outcomes
    ledger.add_decision(reviewed("zz", "dz", "vz"))  # a review of no router decision seen
    verdict = ledger.verdict({f"r{n}" for n in range(1, 7)}, reviewed=True)
    review = verdict.review
    assert review is not None
    assert verdict.lost == [] and verdict.conflicting == [], "LLM verdicts are not router decisions"
    assert (review.needs_review, review.verdicts, review.handoffs) == (6, 4, 1)
    assert review.unsettled == ["d6"] and not review.ok and not verdict.ok
    assert review.repeats == 2 and review.two_ids == ["d3"]
    assert review.two_fates == ["v4", "v5"] and review.orphans == 1
    assert review.handoff_reasons == {"malformed_reply": 2}
    assert "| **unsettled** (neither) | 1 |" in verdict.table()
    ledger.add_handoff(reviewed("r6", "d6", "v6", "needs_review"))
    assert ledger.settlement({"r6"}).ok and ledger.settled("d6")


@pytest.mark.parametrize("mode", ["single", "multi"])
@pytest.mark.parametrize("response_format", ["json_schema", "json_object"])
def test_scripted_endpoint_answers_valid_verdicts_fixed_by_the_text_and_some_malformed(
    mode: str, response_format: str
) -> None:
    from dataclasses import replace

    from sieve.review.catalogue import ReplyError, ReviewCatalogue
    from sieve.review.steps import build_messages, parse_reply
    from sieve.routeset import load_route_set

    from .review_helpers import make_decision

    catalogue = replace(ReviewCatalogue.from_route_set(load_route_set(REPO / "routes" / "moderation.yaml")),
                        mode=mode, severity=("violating", "clean") if mode == "multi" else ())
    endpoint = ScriptedEndpoint(malformed_share=0.1, violating_share=0.3)
    fates: Counter = Counter()
    for i in range(300):
        messages = build_messages(make_decision(f"e{i}", f"message number {i}", route_set="moderation"),
                                  catalogue, nonce=f"{i:08x}", max_examples=4)
        body: dict = {"model": "scripted", "messages": messages}
        body["response_format"] = ({"type": "json_schema", "json_schema": {
            "name": "sieve_review", "strict": True, "schema": catalogue.reply_schema()}}
            if response_format == "json_schema" else {"type": "json_object"})
        content = endpoint.answer(body)
        assert endpoint.answer(body) == content, "a repeated review gets the same answer"
        try:
            reply = parse_reply(content, catalogue)
        except ReplyError:
            fates["malformed"] += 1
            continue
        fates[reply.verdict] += 1
        assert (reply.route is None) == (reply.verdict == "clean")
    assert set(fates) == {"malformed", "violating", "clean"}, fates
    assert 10 <= fates["malformed"] <= 60 and 50 <= fates["violating"] <= 150, fates


def test_plan_of_the_full_run_spreads_partitions_without_overlap() -> None:
    import random

    args = argparse.Namespace(partition_s="30,30,30,300", duration=1300.0, warm_s=5.0, kills=20,
                              rebalances=10)
    timeline = plan(args, random.Random(7))
    assert sum(a == "kill" for _, _, a, _ in timeline) == 20
    assert sum(a == "rebalance" for _, _, a, _ in timeline) == 10
    cuts = [(t, a, i) for t, _, a, i in timeline if a in ("cut", "heal")]
    assert [(a, i) for _, a, i in cuts] == [(a, i) for i in range(4) for a in ("cut", "heal")]
    lengths = [round(cuts[k + 1][0] - cuts[k][0]) for k in range(0, 8, 2)]
    assert lengths == [30, 30, 30, 300]
    assert all(t >= 5.0 for t, *_ in timeline) and max(t for t, *_ in timeline) <= 1300.0
    with pytest.raises(SystemExit):
        plan(argparse.Namespace(**{**vars(args), "duration": 600.0}), random.Random(7))


@pytest.mark.integration
def test_chaos_run_small_loses_nothing_settles_reviews_and_output_stops_while_cut(tmp_path: Path) -> None:
    figures = tmp_path / "chaos.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "load-tests" / "chaos.py"), "--workers", "2", "--kills", "3",
         "--reviewers", "1", "--reviewer-kills", "1",
         "--rebalances", "2", "--partition-s", "10", "--rate", "15", "--duration", "80",
         "--idle", "90", "--json", str(figures), "--keep", str(tmp_path / "logs")],
        capture_output=True, text=True, timeout=900, cwd=REPO,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    r = json.loads(figures.read_text())
    assert r["produced"] == 1200 and r["lost"] == [], r["lost_where"]
    assert r["decided"] + r["dead_lettered_only"] == 1200
    assert r["conflicting"] == [] and r["outcome_mismatches"] == []
    assert r["actions"]["SIGKILL"] == 3 and r["actions"]["restart"] >= 3
    assert r["reviewer_actions"]["SIGKILL"] == 1 and r["reviewer_actions"]["restart"] >= 1
    review = r["review"]
    assert review["needs_review"] > 0 and review["unsettled"] == [], review["unsettled"][:20]
    assert review["verdicts"] > 0 and review["handoffs"] > 0, "the endpoint's malformed share is handed off"
    assert review["verdicts"] + review["handoffs"] == review["needs_review"]
    assert review["two_ids"] == [] and review["two_fates"] == []
    assert r["llm"].get("503", 0) > 0, "the scripted endpoint failed some requests; they were retried"
    [cut] = r["partitions"]
    assert cut["seconds"] >= 10
    assert cut["inputs_during"] > 0, "events kept arriving while the workers were cut off"
    assert cut["outputs_during"] == 0, "the proxy is in the workers' path: their output stopped"
    assert cut["resumed_after_s"] is not None, "output resumed after the heal"
    assert r["proxy"]["accepted"] > 0 and r["broker_alive"]
    assert "| **lost** (neither) | 0 |" in result.stdout
    assert "| **unsettled** (neither) | 0 |" in result.stdout
