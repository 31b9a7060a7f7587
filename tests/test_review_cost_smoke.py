"""The review-cost script runs in CI at a small size, so it cannot go stale (figures not asserted)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .conftest import REPO


def test_review_cost_runs_and_prints_its_table() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "load-tests" / "review_cost.py"), "--encoder", "trivial",
         "--limit", "60", "--shares", "0.05,0.2", "--price-in", "1", "--price-out", "2"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "reached needs_review:" in result.stdout
    rows = [line for line in result.stdout.splitlines() if line.startswith("| 1,000,000 |")]
    assert [row.split("|")[2].strip() for row in rows] == ["5%", "20%"]
    # Cost grows with the share: 4x the reviews, 4x the cost.
    costs = [float(row.split("|")[6].replace(",", "")) for row in rows]
    assert costs[1] == pytest.approx(4 * costs[0], rel=0.01)
