"""sieve eval: labelled data, splits, the embedding cache, metrics, and reports on the public sets."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from sieve.cli import app
from sieve.contracts import NEEDS_REVIEW
from sieve.encoders.cache import CachedEncoder
from sieve.flow.decide import Policy, decide_scores, novelty_scores
from sieve.flow.list_policy import decide_with_lists
from sieve.flow.match import MatchResult, RouteIndex
from sieve.flow.pipeline import RouterPipeline
from sieve.quality.datasets import (
    DatasetError,
    LabelledData,
    LabelledExample,
    load_clinc150,
    load_jsonl,
    load_openai_moderation,
)
from sieve.quality.metrics import cascade_curve, coverage_risk_curve, summarise_cascade, wilson
from sieve.quality.report import write_report
from sieve.quality.report_markdown import SECTIONS
from sieve.quality.runner import run_eval
from sieve.quality.scoring import forced_answers, score_split, three_way_run
from sieve.quality.semantic_router import semantic_router_fit, semantic_router_run
from sieve.quality.splits import sample_data, split_data
from sieve.quality.systems import ScoredSplit
from sieve.quality.tables import per_label_table, per_route_table, summarise
from sieve.routeset import RouteSet, load_route_set, parse_route_set
from sieve.routeset_dump import dump_route_set
from sieve.thresholds import Novelty
from sieve.topology import load_topology
from tests.test_pipeline import text_record

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO / "data"

# --------------------------------------------------------------------------- statistics


def test_wilson_interval_known_values():
    low, high = wilson(81, 100)
    assert (round(low, 4), round(high, 4)) == (0.7222, 0.8749)
    assert wilson(0, 0) == (0.0, 1.0)
    low, high = wilson(10, 10)
    assert high == 1.0 and 0.72 < low < 0.73
    low, high = wilson(0, 10)
    assert low == 0.0 and 0.27 < high < 0.28


def test_cascade_curve_defers_least_confident_first():
    correct = np.array([True, False, True, False, True])
    confidence = np.array([0.9, 0.1, 0.8, 0.2, 0.7])
    deferred, accuracy = cascade_curve(correct, confidence)
    np.testing.assert_allclose(deferred, [0, 0.2, 0.4, 0.6, 0.8, 1.0])
    # both errors are the least confident: deferring 2 of 5 fixes everything
    np.testing.assert_allclose(accuracy, [0.6, 0.8, 1.0, 1.0, 1.0, 1.0])
    summary = summarise_cascade(correct, confidence)
    assert summary.router_accuracy == pytest.approx(0.6)
    assert summary.cpt == {"50%": pytest.approx(0.2), "80%": pytest.approx(0.4), "95%": pytest.approx(0.4)}
    # PGR: 0, .5, 1, 1, 1, 1 -> trapezoid area .05 + .15 + .2 + .2 + .2
    assert summary.apgr == pytest.approx(0.8)


def test_cascade_random_ranking_gives_about_half():
    rng = np.random.default_rng(0)
    correct = rng.random(20_000) < 0.7
    summary = summarise_cascade(correct, rng.random(20_000))
    assert summary.apgr == pytest.approx(0.5, abs=0.02)
    assert summary.cpt["50%"] == pytest.approx(0.5, abs=0.03)


def test_cascade_without_errors_has_no_gap():
    summary = summarise_cascade(np.array([True, True]), np.array([0.1, 0.2]))
    assert summary.apgr is None and summary.cpt["95%"] == 0.0


def test_coverage_risk_curve():
    correct = np.array([True, False, True, True])
    coverage, risk = coverage_risk_curve(correct, np.array([0.4, 0.3, 0.9, 0.1]))
    np.testing.assert_allclose(coverage, [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(risk, [0.0, 0.0, 1 / 3, 0.25])


# --------------------------------------------------------------------------- hand-made index

HAND = parse_route_set(
    {
        "name": "hand",
        "default_outcome": "clean",
        "defaults": {"aggregation": {"method": "max"}, "accept": 0.8, "review": 0.6, "margin": 0.05},
        "routes": [
            {"name": "a", "outcome": "bad", "utterances": ["a0", "a1"]},
            {"name": "b", "outcome": "clean", "utterances": ["b0"]},
        ],
    }
)


def hand_scored(scores: list[list[float]], gold: list[str | None], nearest: list[list[tuple[int, float]]],
                route_set: RouteSet = HAND):
    vectors = {"a0": [1.0, 0, 0], "a1": [0.8, 0.6, 0], "b0": [0, 0, 1.0]}
    index = RouteIndex.from_examples(
        route_set, route_set.version, "hand:3d",
        {r.name: [(u, u, np.array(vectors[u], np.float32)) for u in r.utterances] for r in route_set.routes},
    )
    data = LabelledData(
        "hand", tuple(LabelledExample(f"e{i}", f"t{i}", g, frozenset({"a"}) if g == "bad" else frozenset())
                      for i, g in enumerate(gold)),
        ("a",), source="hand", licence="-", positive_outcome="bad",
    )
    match = MatchResult(
        np.array(scores, np.float32),
        np.array([[row for row, _ in n] for n in nearest]),
        np.array([[s for _, s in n] for n in nearest], np.float32),
    )
    return ScoredSplit(data, index, np.zeros((len(gold), 3), np.float32), match,
                       tuple(ex.gold("clean") for ex in data.examples))


def test_forced_answers_collapse_the_band_to_its_midpoint():
    policy = Policy.for_index(hand_scored([[0.5, 0.1]], ["bad"], [[(0, 0.5)]]).index)
    # accept .8, review .6: the boundary is .7
    answers, confidence = forced_answers(np.array([[0.75, 0.1], [0.65, 0.1], [0.2, 0.9], [0.95, 0.9]],
                                                  np.float32), policy)
    assert answers == ["bad", "clean", "clean", "bad"]
    np.testing.assert_allclose(confidence, [0.05, 0.05, 0.7, 0.05], atol=1e-6)


def test_three_way_and_semantic_router_runs_on_a_hand_index():
    scored = hand_scored(
        [[0.9, 0.1], [0.7, 0.2], [0.3, 0.2], [0.2, 0.95]],
        ["bad", "bad", None, None],
        [[(0, 0.9), (1, 0.5), (2, 0.1)], [(0, 0.7), (2, 0.2), (1, 0.1)],
         [(0, 0.3), (1, 0.25), (2, 0.2)], [(2, 0.95), (0, 0.2), (1, 0.1)]],
    )
    run = three_way_run("hand", scored)
    assert run.outcomes == ("bad", NEEDS_REVIEW, "clean", "clean")
    assert run.reasons == ("accept", "review_band", "no_match", "accept")
    summary = summarise(run)
    assert (summary.auto, summary.auto_correct, summary.review) == (3, 3, 1)
    assert summary.accuracy_with_review == 1.0
    # semantic-router: route a's hits average (0.9 + 0.5) / 2 = 0.7 > b's 0.1; best hit 0.9 > 0.5
    sr = semantic_router_run("sr", scored)
    assert sr.outcomes == ("bad", "bad", "clean", "clean")
    assert sr.routes == (0, 0, None, 1)
    assert semantic_router_run("sr", scored, threshold=0.75).outcomes == ("bad", "clean", "clean", "clean")
    threshold, accuracy = semantic_router_fit(scored)
    assert accuracy == 1.0 and threshold < 0.7
    routes = {row["route"]: row for row in per_route_table(run, scored.data)}
    assert routes["a"]["against"] == "label" and routes["a"]["precision"] == 1.0
    assert routes["a"]["recall"] == 0.5  # the reviewed one counts as a miss
    assert routes["b"]["against"] == "outcome" and routes["b"]["recall"] is None
    label = per_label_table(run, scored.data)[0]
    assert (label["count"], label["caught"], label["reviewed"], label["missed"]) == (2, 1, 1, 0)


def novel_hand(**novelty: object) -> RouteSet:
    data = HAND.model_dump(mode="json")
    data["defaults"]["novelty"] = novelty
    return parse_route_set(data)


NOVEL_SCORES = [[0.9, 0.1], [0.3, 0.2], [0.2, 0.25], [0.2, 0.95]]
NOVEL_NEAREST = [[(0, 0.9)], [(0, 0.3)], [(2, 0.25)], [(2, 0.95)]]  # novelty .1, .7, .75, .05


def test_three_way_run_reports_the_novel_share():
    scored = hand_scored(NOVEL_SCORES, ["bad", None, None, None], NOVEL_NEAREST,
                         novel_hand(threshold=0.5, baseline=0.05))
    run = three_way_run("hand", scored)
    assert run.outcomes == ("bad", NEEDS_REVIEW, NEEDS_REVIEW, "clean")  # far away: not clean
    assert run.reasons == ("accept", "no_match", "no_match", "accept")
    assert run.novel is not None and run.novel.tolist() == [False, True, True, False]
    summary = summarise(run)
    assert (summary.novel, summary.novel_share) == (2, 0.5)
    assert summary.as_dict()["novel_share"] == 0.5
    plain = summarise(three_way_run("hand", hand_scored(NOVEL_SCORES, ["bad", None, None, None],
                                                        NOVEL_NEAREST)))
    assert plain.novel is None and plain.novel_share is None
    assert plain.reasons["no_match"] == 2 and plain.review == 0  # without a threshold: the default


def test_eval_reports_the_novel_share_and_warns_on_novel_default(tmp_path, trivial_encoder):
    rows = [{"text": f"refund my order number {i}", "label": "billing"} for i in range(12)]
    rows += [{"text": f"tell me a joke about {w}", "id": f"x{i}"} for i, w in enumerate("abcdefghijkl")]
    data = tmp_path / "support.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    shipped = load_route_set(REPO / "routes" / "support.yaml")
    files = {}
    for on_novel in ("needs_review", "default"):
        # threshold 0: every event not equal to an example is novel
        novel = shipped.model_copy(update={"defaults": shipped.defaults.model_copy(
            update={"novelty": Novelty(threshold=0.0, baseline=0.05, on_novel=on_novel)})})
        files[on_novel] = tmp_path / f"support-{on_novel}.yaml"
        files[on_novel].write_text(dump_route_set(novel))
    for on_novel, path in files.items():
        out = tmp_path / on_novel
        result = CliRunner().invoke(app, ["eval", str(data), "--routes", str(path), "--out", str(out),
                                          "--encoder", "trivial", "--no-cache", "--no-plots"])
        assert result.exit_code == 0, result.output
        assert "novel 100.0%" in result.output
        assert ("declares novel events safe" in result.output) == (on_novel == "default")
        report = json.loads((out / "report.json").read_text())
        assert report["side_by_side"][0]["novel_share"] == 1.0
        assert report["side_by_side"][-1]["novel_share"] is None  # semantic-router: no such thing
        markdown = (out / "report.md").read_text()
        assert "| novel |" in markdown and "| 100.0% |" in markdown


# --------------------------------------------------------------------------- labelled data


def test_jsonl_formats(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [
        {"text": "refund please", "label": "billing"},
        {"text": "you idiots", "labels": ["harassment", "hate"], "outcome": "violating"},
        {"text": "mixed", "labels": {"hate": 1, "sexual": 0, "violence": None}, "outcome": "violating"},
        {"text": "nice weather"},
        {"image_uri": "file:///x.png", "label": "weapons", "id": "img-1", "split": "val"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    data = load_jsonl(path)
    a, b, c, d, e = data.examples
    assert (a.outcome, a.labels) == ("billing", frozenset({"billing"}))
    assert (b.outcome, b.labels) == ("violating", frozenset({"harassment", "hate"}))
    assert (c.labels, c.unknown) == (frozenset({"hate"}), frozenset({"violence"}))
    assert d.outcome is None and d.gold("clean") == "clean"
    assert (e.id, e.image, e.text, e.source_split) == ("img-1", "file:///x.png", None, "calibration")
    assert set(data.label_names) == {"billing", "harassment", "hate", "sexual", "violence", "weapons"}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"label": "x"}', "needs a non-empty 'text'"),
        ('{"text": "a", "labels": ["x", "y"]}', "say which outcome"),
        ('{"text": "a", "label": "Not A Name"}', "not a route/outcome name"),
        ('{"text": "a", "labels": {"x": 2}}', "must be 1, 0 or null"),
        ('{"text": "a", "split": "holdout"}', "'split' must be one of"),
        ("not json", "not JSON"),
        ("[1, 2]", "is a JSON object"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(DatasetError, match=message) as info:
        load_jsonl(path)
    assert f"{path}:2" in str(info.value)


def test_openai_moderation_adapter():
    data = load_openai_moderation(DATASETS)
    assert len(data) == 1680
    assert sum(ex.outcome == "violating" for ex in data.examples) == 522
    counts = data.label_counts()
    assert counts["sexual"] == 237 and counts["violence_graphic"] == 24
    # a missing key is unknown, never a 0
    assert sum("hate" in ex.unknown for ex in data.examples) == 909
    assert all(not (ex.labels & ex.unknown) for ex in data.examples)
    assert data.licence == "MIT" and "f4ab51b5" in data.source


def test_clinc150_adapter_keeps_its_splits():
    data = load_clinc150(DATASETS)
    assert len(data) == 23_700 and len(data.label_names) == 150
    splits = split_data(data)
    assert splits.record.method == "source"
    assert splits.record.sizes == {"train": 15_100, "calibration": 3_100, "test": 5_500}
    assert sum(ex.outcome is None for ex in splits.test.examples) == 1000
    resplit = split_data(data, seed=3, source_splits=False)
    assert resplit.record.method == "seeded-stratified"
    assert abs(resplit.record.sizes["test"] - 23_700 / 4) < 200


def test_splits_are_seeded_disjoint_and_stratified():
    data = load_openai_moderation(DATASETS)
    one, again, other = split_data(data, seed=7), split_data(data, seed=7), split_data(data, seed=8)
    assert one.record == again.record
    assert one.record.digests != other.record.digests
    ids = [{ex.id for ex in one.part(name).examples} for name in ("train", "calibration", "test")]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert sum(len(i) for i in ids) == 1680
    for name, share in (("train", 0.5), ("calibration", 0.25), ("test", 0.25)):
        part = one.part(name)
        assert len(part) == pytest.approx(1680 * share, rel=0.05)
        flagged = sum(ex.outcome == "violating" for ex in part.examples) / len(part)
        assert flagged == pytest.approx(522 / 1680, abs=0.02)
    small = split_data(data, seed=7, sample=50)
    assert small.record.sizes == {"train": 50, "calibration": 50, "test": 50}
    assert {ex.id for ex in small.test.examples} <= ids[2]
    sampled = sample_data(data, 200, seed=1)
    assert len(sampled) == 200 and sampled == sample_data(data, 200, seed=1)


# --------------------------------------------------------------------------- embedding cache


def test_embedding_cache_persists_and_matches(tmp_path, trivial_encoder):
    texts = ["one fish", "two fish", "one fish", "red fish"]
    cached = CachedEncoder(trivial_encoder, tmp_path)
    first = cached.encode(texts)
    np.testing.assert_array_equal(first, trivial_encoder.encode(texts))
    assert (cached.misses, cached.hits) == (3, 1)
    again = CachedEncoder(trivial_encoder, tmp_path)  # a new process would see the shards
    np.testing.assert_array_equal(again.encode(texts[::-1]), first[::-1])
    assert (again.misses, again.hits) == (0, 4)
    assert again.id == trivial_encoder.id and again.encode([]).shape == (0, trivial_encoder.dim)
    (next(again.directory.glob("shard-*.npz"))).write_bytes(b"broken")
    assert CachedEncoder(trivial_encoder, tmp_path).encode(["blue fish"]).shape == (1, trivial_encoder.dim)


# --------------------------------------------------------------------------- the real model


def test_eval_decides_as_the_worker_pipeline(minilm, moderation_index, moderation_bench):
    """Eval's decisions are the worker's: RouterPipeline.process on the same texts agrees."""
    part = moderation_bench.splits.test.with_examples(moderation_bench.splits.test.examples[:40])
    topology = load_topology(REPO / "topologies" / "moderation.yaml")
    pipeline = RouterPipeline(topology=topology, encoder=minilm, index=moderation_index, worker="t")
    result = pipeline.process([text_record(i, ex.id, str(ex.text)) for i, ex in enumerate(part.examples)])
    scored = score_split(part, moderation_index, minilm)  # encodes the texts as the pipeline does
    run = three_way_run("eval", scored, Policy.for_index(moderation_index, topology.thresholds))
    assert [d.outcome for d in result.decisions] == list(run.outcomes)
    assert [d.reason for d in result.decisions] == list(run.reasons)
    policy = Policy.for_index(moderation_index, topology.thresholds)
    novelty = novelty_scores(scored.match.nearest_score)
    _, verdicts = decide_with_lists(scored.match.route_scores, policy, novelty, scored.list_hits,
                                    moderation_index)
    assert [v.outcome for v in verdicts] == list(run.outcomes)
    assert [d.novel for d in result.decisions] == [v.novel for v in verdicts]
    assert policy.novelty_threshold is not None  # the shipped set has one
    # the shipped profanity list holds some of these prompts: the worker names the same hits
    assert scored.list_hits is not None and any(scored.list_hits)
    assert [[h.entry for h in d.list_hits or []] for d in result.decisions] == [
        [h.entry for h in hits] for hits in scored.list_hits]
    plain = decide_scores(scored.match.route_scores, policy, novelty)
    assert [v.outcome for v in plain] != list(run.outcomes)  # the holds changed some decisions


def test_eval_report_has_every_section(moderation_bench, tmp_path):
    report = run_eval(
        moderation_bench,
        [("moderation", REPO / "routes" / "moderation.yaml"), ("support", REPO / "routes" / "support.yaml")],
        split="test", command="sieve eval openai-moderation --routes routes/moderation.yaml",
    )
    paths = write_report(report, tmp_path)
    markdown = paths["markdown"].read_text()
    positions = [markdown.index(section) for section in SECTIONS]
    assert positions == sorted(positions)
    for label in ("moderation, its own thresholds", "moderation, semantic-router way (0.5)",
                  "support, its own thresholds", "support, semantic-router way (0.5)"):
        assert f"| {label} |" in markdown
    for png in ("coverage_risk.png", "cascade.png"):
        assert paths[png.removesuffix(".png")].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(paths["json"].read_text())
    assert data["split"]["sizes"] == {"train": 150, "calibration": 150, "test": 150}
    assert data["evaluated_split"] == "test" and len(data["side_by_side"]) == 4
    first = data["side_by_side"][0]
    assert first["events"] == 150 and first["auto"] + first["review"] == 150
    assert first["auto"] > 0
    assert first["auto_accuracy"] == pytest.approx(first["auto_correct"] / first["auto"])
    assert set(first["cascade"]["cpt"]) == {"50%", "80%", "95%"}
    primary = data["primary"]
    assert {row["label"] for row in primary["per_label"]} == set(moderation_bench.data.label_names)
    assert sum(sum(row.values()) for row in primary["confusion"].values()) == 150
    assert all(math.isfinite(row["aurc"]) for row in data["side_by_side"])


def test_eval_cli_on_a_jsonl_file(tmp_path):
    rows = [{"text": f"refund my order number {i}", "label": "billing"} for i in range(12)]
    rows += [{"text": f"where is parcel {i} now", "label": "shipping"} for i in range(12)]
    rows += [{"text": f"tell me a joke about {w}", "id": f"x{i}"} for i, w in enumerate("abcdefghijkl")]
    data = tmp_path / "support.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["eval", str(data), "--routes", str(REPO / "routes" / "support.yaml"),
                                      "--out", str(out), "--encoder", "trivial", "--no-cache", "--no-plots"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["side_by_side"][0]["events"] == 9  # a quarter of 36
    assert report["split"]["method"] == "seeded-stratified"
    missing = CliRunner().invoke(app, ["eval", str(tmp_path / "nope.jsonl"), "--routes", "x.yaml",
                                       "--encoder", "trivial", "--no-cache"])
    assert missing.exit_code == 2 and "no such file" in missing.output
