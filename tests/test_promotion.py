"""Promotion by margins: `sieve routes promote --if-better` on `routes learn`'s comparison."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sieve.cli import app
from sieve.quality.promotion import (
    EvidenceError,
    Margins,
    ShadowMargins,
    promotion_checks,
    shadow_checks,
    shadow_counts,
)
from sieve.settings import QdrantSettings, get_settings
from sieve.store.qdrant import RouteStore

from .test_promote import promo_topology
from .test_store import small_set, with_route


def evidence(version: str, active: tuple[float, float], proposed: tuple[float, float],
             low: float = 0.9) -> dict:
    """The shape `routes learn` writes: (auto share, auto accuracy) of each side's primary system."""
    def system(side: str, share: float, accuracy: float) -> dict:
        return {"side": side, "system": f"{side} + head", "auto_share": share, "auto_accuracy": accuracy,
                "events": 1000,
                "auto_accuracy_ci95": [low if side == "proposed" else 0.5, 0.99], "novel_share": 0.05}
    other = {"side": "active", "system": "active, nearest", "auto_share": 1.0, "auto_accuracy": 1.0}
    return {"proposed": {"version": version},
            "primary": {"active": "active + head", "proposed": "proposed + head"},
            "systems": [other, system("active", *active), system("proposed", *proposed)]}


def failed(checks) -> set[str]:
    return {c.name for c in checks if not c.passed}


def test_a_proposal_must_beat_the_active_primary_by_the_margins() -> None:
    better = evidence("v2", active=(0.15, 0.66), proposed=(0.95, 0.947))
    assert failed(promotion_checks(better, "v2", Margins())) == set()
    # the active side's other systems do not count: only its primary (with its head)
    assert failed(promotion_checks(better, "v2", Margins(auto_margin=0.85))) == {"automatic share"}
    assert failed(promotion_checks(better, "v2", Margins(accuracy_margin=0.3))) == {"accuracy"}
    assert failed(promotion_checks(better, "v2", Margins(min_accuracy=0.95))) == {"accuracy lower bound"}
    assert failed(promotion_checks(better, "v3", Margins())) == {"version"}
    worse = evidence("v2", active=(0.5, 0.95), proposed=(0.8, 0.90))
    assert failed(promotion_checks(worse, "v2", Margins())) == {"accuracy"}
    # a negative margin trades a little accuracy for automation
    assert failed(promotion_checks(worse, "v2", Margins(accuracy_margin=-0.06))) == set()
    with pytest.raises(EvidenceError, match="primary"):
        promotion_checks({"systems": []}, "v2", Margins())


def test_with_min_added_accuracy_the_decisions_a_proposal_adds_are_judged_not_its_average() -> None:
    # the active version is sure of few of its own review items; the proposal automates many more
    wider = evidence("v2", active=(0.123, 0.980), proposed=(0.673, 0.927))
    assert failed(promotion_checks(wider, "v2", Margins())) == {"accuracy"}
    # what it adds: (0.673 * 0.927 - 0.123 * 0.980) / 0.55 = 0.915 alike with the labels
    checks = promotion_checks(wider, "v2", Margins(min_added_accuracy=0.95))
    assert failed(checks) == {"added accuracy"} and "accuracy" not in {c.name for c in checks}
    assert "0.915 alike" in next(c.detail for c in checks if c.name == "added accuracy")
    # labels right 95% of the time: 0.915 agreement is (0.915 - 0.05) / 0.9 = 0.961 accurate
    noisy = {**wider, "label_accuracy": 0.95}
    assert failed(promotion_checks(noisy, "v2", Margins(min_added_accuracy=0.95))) == set()
    assert failed(promotion_checks(noisy, "v2", Margins(min_added_accuracy=0.97))) == {"added accuracy"}
    # asking for more automation still can
    assert failed(promotion_checks(noisy, "v2", Margins(min_added_accuracy=0.95, auto_margin=0.6))) == {
        "automatic share"}
    # a proposal that automates less must give up only decisions less accurate than asked
    narrower = {**evidence("v2", active=(0.5, 0.95), proposed=(0.4, 0.90)), "label_accuracy": 0.95}
    checks = promotion_checks(narrower, "v2", Margins(min_added_accuracy=0.9))
    assert failed(checks) == {"given-up accuracy"} and "automatic share" not in {c.name for c in checks}
    # fewer automatic decisions, more of them right: the active one was wrong on what it decided alone
    sharper = {**evidence("v2", active=(0.126, 0.517), proposed=(0.108, 0.88)), "label_accuracy": 0.95}
    assert failed(promotion_checks(sharper, "v2", Margins(min_added_accuracy=0.95))) == set()
    assert failed(promotion_checks(sharper, "v2", Margins())) == {"automatic share"}
    # a proposal that decides nothing may replace one that was wrong on what it decided
    silent = {**evidence("v2", active=(0.081, 0.5), proposed=(0.0, 0.0)), "label_accuracy": 0.95}
    assert failed(promotion_checks(silent, "v2", Margins(min_added_accuracy=0.95))) == set()


def test_promote_if_better_refuses_or_promotes_and_logs_its_checks(tmp_path: Path, monkeypatch,
                                                                    trivial_encoder) -> None:
    qdrant = tmp_path / "q"
    store = RouteStore(QdrantSettings(path=qdrant, lock_wait_s=5))
    active, candidate = small_set(), with_route(small_set(), "greet", utterances=["hey", "howdy"])
    store.sync(active, trivial_encoder)
    store.sync(candidate, trivial_encoder, activate=False)
    topology = promo_topology(tmp_path)
    weak, strong = tmp_path / "weak.json", tmp_path / "strong.json"
    weak.write_text(json.dumps(evidence(candidate.version, active=(0.5, 0.95), proposed=(0.6, 0.90))))
    strong.write_text(json.dumps(evidence(candidate.version, active=(0.5, 0.90), proposed=(0.7, 0.95))))
    monkeypatch.setenv("SIEVE_QDRANT__PATH", str(qdrant))
    get_settings.cache_clear()
    try:
        runner = CliRunner()
        command = ["routes", "promote", "tiny", candidate.version, "--topology", str(topology), "--if-better"]
        refused = runner.invoke(app, [*command, "--evidence", str(weak)])
        assert refused.exit_code == 1 and "not promoted" in refused.output and "NO" in refused.output
        assert RouteStore(QdrantSettings(path=qdrant, lock_wait_s=5)).current_version(
            "tiny", trivial_encoder.id) == active.version
        bare = runner.invoke(app, command)
        assert bare.exit_code == 2 and "--evidence" in bare.output
        promoted = runner.invoke(app, [*command, "--evidence", str(strong), "--auto-margin", "0.1"])
        assert promoted.exit_code == 0, promoted.output
    finally:
        get_settings.cache_clear()
    store = RouteStore(QdrantSettings(path=qdrant, lock_wait_s=5))
    assert store.current_version("tiny", trivial_encoder.id) == candidate.version
    entry = store.promotions("tiny", trivial_encoder.id)[-1]
    assert (entry["version"], entry["previous"]) == (candidate.version, active.version)
    logged = entry["evidence"]
    assert [c["name"] for c in logged["checks"]] == ["version", "accuracy", "automatic share"]
    assert all(c["passed"] for c in logged["checks"]) and logged["margins"]["auto"] == 0.1
    assert logged["margins"]["min_added_accuracy"] is None


def metrics_text(version: str, events: int, automatic: int, active: int, both: int, alike: int,
                 topology: str = "t", equivalent: int | None = None) -> str:
    """A worker's /metrics lines for one shadow version (the names and labels the worker exports).

    Without ``equivalent``, the lines of a worker that does not count equivalent decisions.
    """
    labels = f'{{topology="{topology}",shadow_version="{version}"}}'
    counts = {"events": events, "automatic": automatic, "active_automatic": active, "both_automatic": both,
              "both_automatic_agreed": alike}
    if equivalent is not None:
        counts["both_automatic_equivalent"] = equivalent
    return "".join(f"# TYPE sieve_shadow_{name}_total counter\nsieve_shadow_{name}_total{labels} {value}\n"
                   for name, value in counts.items())


def test_shadow_counts_sum_the_workers_and_keep_to_the_version() -> None:
    one = metrics_text("v2", 600, 500, 300, 290, 285, equivalent=288)
    two = metrics_text("v2", 400, 300, 200, 190, 180) + metrics_text("v1", 999, 999, 999, 999, 0, "u")
    # the second worker counts no equivalent decisions: its alike ones count as equivalent
    assert shadow_counts([one, two], "v2") == {"events": 1000, "automatic": 800, "active_automatic": 500,
                                              "both_automatic": 480, "both_automatic_agreed": 465,
                                              "both_automatic_equivalent": 468}
    assert shadow_counts([one], "v9")["events"] == 0


def test_the_shadow_must_agree_where_the_active_version_was_sure_and_automate_more() -> None:
    good = shadow_counts([metrics_text("v2", 1000, 800, 500, 480, 470)], "v2")
    assert failed(shadow_checks(good, ShadowMargins())) == set()
    assert failed(shadow_checks(good, ShadowMargins(min_events=2000))) == {"shadow events"}
    assert failed(shadow_checks(good, ShadowMargins(min_agreement=0.99))) == {"shadow agreement"}
    assert failed(shadow_checks(good, ShadowMargins(auto_margin=0.4))) == {"shadow automatic share"}
    contradicts = shadow_counts([metrics_text("v2", 1000, 800, 500, 480, 400)], "v2")  # 83% alike
    assert failed(shadow_checks(contradicts, ShadowMargins())) == {"shadow agreement"}
    # clean through another benign route (or none): another route, the same decision
    other_route = shadow_counts([metrics_text("v2", 1000, 800, 500, 480, 400, equivalent=470)], "v2")
    assert failed(shadow_checks(other_route, ShadowMargins())) == set()
    flips = shadow_counts([metrics_text("v2", 1000, 800, 500, 480, 380, equivalent=400)], "v2")
    assert failed(shadow_checks(flips, ShadowMargins())) == {"shadow agreement"}
    nothing = shadow_counts([], "v2")
    assert failed(shadow_checks(nothing, ShadowMargins())) == {"shadow events", "shadow agreement",
                                                               "shadow automatic share"}
