"""The load tests (load-tests/loadgen.py, measure.py, scaling.py) run in CI at a small size, so
they cannot go stale. Figures are not asserted (speed figures come from the script's table)."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer

from sieve.settings import KafkaSettings

from .conftest import DATASETS, REPO

sys.path.insert(0, str(REPO / "load-tests"))

from loadgen import dataset_texts, due, make_events, produce_events  # noqa: E402
from measure import Measurement, parse_output  # noqa: E402


def test_texts_come_from_both_public_datasets() -> None:
    assert (DATASETS / "openai-moderation").is_dir() and (DATASETS / "clinc150").is_dir(), (
        "the repository's data/ folder is where the load texts come from")
    texts = dataset_texts()
    sources = [t.source for t in texts[:10]]
    assert sources == ["openai-moderation", "clinc150"] * 5, "interleaved"
    assert len(texts) == 1680 + 4500 + 1000
    assert all(t.text.strip() for t in texts)


def test_events_are_valid_and_some_are_images() -> None:
    from sieve.contracts import Event

    events = make_events(400, "unit", image_share=0.1, seed=3)
    assert [e["id"] for e in events[:2]] == ["unit-0", "unit-1"]
    images = [e for e in events if e.get("modality") == "image"]
    assert 20 <= len(images) <= 60
    for event in events:
        Event.model_validate(event)
    assert base64.b64decode(images[0]["image_b64"]).startswith(b"\x89PNG")
    assert make_events(50, "unit", image_share=0.1, seed=3) == events[:50], "seeded"


def test_pacing_sends_at_the_rate() -> None:
    assert due(0.0, 100, 1000) == 1
    assert due(0.5, 100, 1000) == 51
    assert due(100.0, 100, 1000) == 1000
    assert due(0.0, 0, 1000) == 1000, "rate 0: flat out"


def test_measurement_percentiles_repeats_and_throughput() -> None:
    m = Measurement()
    for i in range(100):
        m.add(f"r-{i}", 1_000_000 + i * 10, 1_000_000 + i * 10 + 100 + i, "clean")
    m.add("r-5", 1_000_050, 1_009_999, "clean")  # a repeat after a rebalance counts once
    m.add("r-100", 1_001_000, 1_002_000, "dead_letter")
    assert m.decided == 101 and m.duplicates == 1 and m.dead_letters == 1
    p = m.percentiles_s()
    assert p["p50"] < p["p95"] <= p["p99"] <= 1.0
    assert m.span_s() == pytest.approx(2.0)
    assert m.throughput() == pytest.approx(101 / 2.0)


def test_outputs_are_parsed_from_decisions_and_dead_letters() -> None:
    decision = {"event_id": "run-1", "outcome": "violating", "event": {"metadata": {"load_sent_ms": 123}}}
    assert parse_output("x.violating", json.dumps(decision).encode(), "x.dl") == ("run-1", 123, "violating")
    original = json.dumps({"id": "run-2", "modality": "image", "metadata": {"load_sent_ms": 456}}).encode()
    letter = {"payload_b64": base64.b64encode(original).decode(), "reason": "unsupported_modality"}
    assert parse_output("x.dl", json.dumps(letter).encode(), "x.dl") == ("run-2", 456, "dead_letter")
    assert parse_output("x.dl", b"not json", "x.dl") is None


@pytest.mark.integration
def test_rate_limited_generator_paces_its_sends(dev_broker: str) -> None:
    kafka = KafkaSettings(bootstrap_servers=dev_broker)
    events = make_events(200, "paced")
    report = asyncio.run(produce_events(kafka, "load.paced", events, rate=400))
    assert report.sent == 200
    assert 0.4 <= report.seconds < 5.0, report

    async def read() -> list:
        consumer = AIOKafkaConsumer("load.paced", bootstrap_servers=dev_broker, auto_offset_reset="earliest")
        await consumer.start()
        try:
            out: list = []
            deadline = time.monotonic() + 20
            while len(out) < 200 and time.monotonic() < deadline:
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    out += records
            return out
        finally:
            await consumer.stop()

    records = asyncio.run(read())
    sent = sorted(json.loads(r.value)["metadata"]["load_sent_ms"] for r in records)
    assert len(sent) == 200
    assert 350 <= (sent[-1] - sent[0]) <= 5000, "200 events at 400/s span about half a second"


@pytest.mark.integration
def test_scaling_run_small(tmp_path: Path) -> None:
    # The trivial encoder keeps this about the machinery; the real run uses MiniLM.
    result = subprocess.run(
        [sys.executable, str(REPO / "load-tests" / "scaling.py"), "--encoder", "trivial", "--events", "300",
         "--workers", "1", "2", "--partitions", "8", "--image-share", "0.05", "--idle", "20",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-4000:]
    assert "| workers | partitions | events decided | events/s |" in result.stdout
    figures = json.loads((tmp_path / "scaling-trivial.json").read_text())
    rows = figures["rows"]
    assert [r["workers"] for r in rows] == [1, 2]
    images = sum(1 for e in make_events(300, "x", image_share=0.05, seed=7) if e.get("modality") == "image")
    assert images > 0
    for row in rows:
        assert row["decided"] == 300
        assert row["dead_letters"] == images, "image events: this text topology dead-letters them"
        assert 0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
        assert row["events_per_s"] > 0
        assert len(row["worker_cpu_s"]) == row["workers"] and all(c > 0 for c in row["worker_cpu_s"])
        assert sum(row["worker_events"]) >= 300, "each worker's own count of what it consumed"
        assert row["broker_cpu_s"] is not None
    assert all(n > 0 for n in rows[1]["worker_events"]), "two workers split the 8 partitions"
    png = (tmp_path / "scaling-trivial.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
