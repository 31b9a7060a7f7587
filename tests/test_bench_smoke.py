"""The spine benchmark runs in CI at a small size, so it cannot go stale (figures not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import REPO

pytestmark = pytest.mark.integration


def test_bench_spine_runs_and_prints_its_table(tmp_path) -> None:
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "load-tests" / "bench_spine.py"), "--events", "300", "--quick",
         "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "| worker end to end, MiniLM |" in result.stdout
    assert "| worker end to end, trivial encoder (ceiling) |" in result.stdout
    figures = json.loads(out.read_text())
    assert figures["end_to_end"]["decided"] == 300
    assert figures["best"]["rate"] > 0 and figures["end_to_end"]["memory_mib"] > 0


def test_bench_images_runs_and_prints_its_table() -> None:
    result = subprocess.run([sys.executable, str(REPO / "load-tests" / "bench_images.py"), "--quick"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| tiny")]
    assert [row.split("|")[2].strip() for row in rows] == ["1", "8", "32"]
    assert all(float(row.split("|")[3]) > 0 for row in rows)
