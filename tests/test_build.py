"""sieve routes build: diverse representative examples, readable route files, the learned head."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from sieve.cli import app
from sieve.flow.head import HeadError, LearnedHead, train_head
from sieve.flow.match import RouteIndex
from sieve.quality.build import (
    build_route_set,
    membership_matrix,
    route_pools,
    select_representatives,
    with_head,
)
from sieve.quality.datasets import LabelledData, LabelledExample
from sieve.quality.runner import run_build, run_eval
from sieve.quality.workbench import open_workbench
from sieve.routeset import head_path_for, load_route_set, parse_route_set
from sieve.routeset_dump import dump_route_set

from .progress_helpers import RecordingProgress

REPO = Path(__file__).resolve().parents[1]


def clustered(centres: int, per: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors in tight clusters around random centres; cluster sizes 2*per, per, per, ..."""
    rng = np.random.default_rng(seed)
    middles = rng.normal(size=(centres, 16))
    sizes = [2 * per] + [per] * (centres - 1)
    rows = np.concatenate([middles[c] + 0.05 * rng.normal(size=(n, 16)) for c, n in enumerate(sizes)])
    owner = np.concatenate([[c] * n for c, n in enumerate(sizes)])
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32), owner


def test_representatives_cover_every_cluster_unlike_first_n():
    vectors, owner = clustered(5, 20)
    picked = select_representatives(vectors, 5, seed=0)
    assert len(picked) == 5 and len(set(picked)) == 5
    assert sorted(owner[picked]) == [0, 1, 2, 3, 4]  # one per cluster: diverse
    assert owner[picked[0]] == 0  # the biggest cluster's representative first
    assert len(set(owner[:5])) == 1  # whereas the first five all come from one cluster
    # each pick is its cluster's medoid, not an outlier: closest to its cluster's mean
    for row in picked:
        members = vectors[owner == owner[row]]
        centre = members.mean(axis=0)
        assert vectors[row] @ centre >= np.sort(members @ centre)[-3]
    assert picked == select_representatives(vectors, 5, seed=0)  # seeded: the same again
    assert sorted(select_representatives(vectors[:3], 10, seed=0)) == [0, 1, 2]  # fewer rows than k: all


def small_data() -> LabelledData:
    examples = [
        LabelledExample("1", "buy now cheap pills", "violating", frozenset({"spam"})),
        LabelledExample("2", "cheap pills buy", "violating", frozenset({"spam"})),
        LabelledExample("3", "I will hurt you", "violating", frozenset({"threat", "spam"})),
        LabelledExample("4", "lovely weather today", "clean"),
        LabelledExample("5", "lovely weather today", "clean"),  # a repeated text is kept once
        LabelledExample("6", "see you at lunch", "clean"),
        LabelledExample("7", "odd one", None),
    ]
    return LabelledData("small", tuple(examples), ("spam", "threat", "unused"), source="test", licence="-",
                        default_outcome="clean")


def test_pools_from_labels_and_unlabelled_rows(trivial_encoder):
    data = small_data()
    pools = {p.name: p for p in route_pools(data, "clean")}
    assert set(pools) == {"spam", "threat", "clean"}  # "unused" has no examples: no route
    assert pools["spam"].rows == (0, 1, 2) and pools["spam"].outcome == "violating"
    assert pools["clean"].rows == (3, 4, 5, 6) and pools["clean"].outcome == "clean"
    vectors = trivial_encoder.encode([str(ex.text) for ex in data.examples])
    built = build_route_set(data, vectors, name="small-built", default_outcome="clean", max_examples=2,
                            seed=1)
    clean = built.route_set.route("clean")
    assert len(clean.utterances) == 2 and len(set(clean.utterances)) == 2
    assert built.kept == {"spam": 2, "threat": 1, "clean": 2}
    membership = membership_matrix(data, built.pools)
    assert membership.sum(axis=1).tolist() == [1, 1, 2, 1, 1, 1, 1]


def test_built_route_file_round_trips(tmp_path, trivial_encoder):
    data = small_data()
    vectors = trivial_encoder.encode([str(ex.text) for ex in data.examples])
    built = build_route_set(data, vectors, name="small-built", default_outcome="clean", description="from x")
    path = tmp_path / "built.yaml"
    path.write_text(dump_route_set(built.route_set))
    back = load_route_set(path)
    assert back == built.route_set and back.version == built.route_set.version
    raw = yaml.safe_load(path.read_text())  # an ordinary, readable file
    assert raw["routes"][0]["name"] == "spam" and raw["default_outcome"] == "clean"


def test_head_trains_saves_and_combines(tmp_path):
    vectors, owner = clustered(3, 30, seed=2)
    membership = np.eye(3, dtype=bool)[owner]
    head = train_head(vectors, membership, ["a", "b", "c"], "enc", c=10.0, weight=0.25)
    assert head.kind == "softmax"
    probs = head.probabilities(vectors)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert (probs.argmax(axis=1) == owner).mean() > 0.95
    head.save(tmp_path / "h.head.npz")
    back = LearnedHead.load(tmp_path / "h.head.npz")
    assert back.route_names == ("a", "b", "c") and back.weight == 0.25 and back.kind == "softmax"
    np.testing.assert_allclose(back.probabilities(vectors), probs, rtol=1e-5)
    # multi-label rows: one binary model per route
    multi = membership.copy()
    multi[:5, 1] = True
    ovr = train_head(vectors, multi, ["a", "b", "c"], "enc")
    assert ovr.kind == "one_vs_rest" and ovr.probabilities(vectors).shape == (len(vectors), 3)
    # two classes: softmax over one logit, the same probabilities as a logistic
    two = train_head(vectors[owner < 2], np.eye(2, dtype=bool)[owner[owner < 2]], ["a", "b"], "enc")
    assert (two.probabilities(vectors[owner < 2]).argmax(axis=1) == owner[owner < 2]).mean() > 0.95
    (tmp_path / "bad.npz").write_bytes(b"nope")
    with pytest.raises(HeadError):
        LearnedHead.load(tmp_path / "bad.npz")
    assert head_path_for("routes/x.yaml") == Path("routes/x.head.npz")


def test_head_combines_with_nearest_scores(trivial_encoder):
    data = small_data()
    vectors = trivial_encoder.encode([str(ex.text) for ex in data.examples])
    built = with_head(build_route_set(data, vectors, name="s", default_outcome="clean"), data, vectors,
                      trivial_encoder.id, weight=0.5)
    assert built.head is not None and built.head.kind == "one_vs_rest"  # row 3 is in two routes
    index = RouteIndex.build(built.route_set, trivial_encoder)
    nearest = np.full((2, 3), 0.4, np.float32)
    combined = built.head.combine(nearest, vectors[:2], index)
    expected = 0.5 * nearest + 0.5 * built.head.route_scores(vectors[:2], index)
    np.testing.assert_allclose(combined, expected, rtol=1e-6)
    other = RouteIndex.from_examples(index.route_set, "v", "other-encoder",
                                     {r.name: [("i", "t", np.ones(64))] for r in index.routes})
    with pytest.raises(HeadError, match="trained on"):
        built.head.route_scores(vectors[:2], other)


def test_build_from_moderation_train_split_only(moderation_bench, tmp_path):
    out = tmp_path / "moderation-built.yaml"
    built = run_build(moderation_bench, out, max_examples=10, head=True, command="sieve routes build ...")
    back = load_route_set(out)
    assert back == built.route_set
    assert {r.name for r in back.routes} >= {"sexual", "hate", "clean"}
    assert all(len(r.utterances) <= 10 for r in back.routes)
    assert all(r.outcome == ("clean" if r.name == "clean" else "violating") for r in back.routes)
    train_texts = {ex.text for ex in moderation_bench.splits.train.examples}
    splits = moderation_bench.splits
    held_out = {ex.text for ex in splits.test.examples + splits.calibration.examples}
    examples = {u for r in back.routes for u in r.utterances}
    assert examples <= train_texts and not (examples & (held_out - train_texts))
    assert head_path_for(out).exists()
    summary = json.loads(out.with_name("moderation-built.build.json").read_text())
    assert summary["split"]["digests"] == moderation_bench.splits.record.digests
    # the head is measured beside nearest examples alone
    report = run_eval(moderation_bench, [("built", out)])
    labels = [e.label for e in report.systems]
    assert labels[:2] == ["built, its own thresholds", "built + head, its own thresholds"]


def support_rows() -> list[dict[str, str]]:
    rows = [{"text": f"refund for order {i} please", "label": "billing"} for i in range(30)]
    rows += [{"text": f"my parcel {i} is late", "label": "shipping"} for i in range(30)]
    rows += [{"text": f"random chatter number {i}"} for i in range(30)]
    return rows


def test_build_reports_its_steps(tmp_path, trivial_encoder):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in support_rows()))
    bench = open_workbench(str(data), trivial_encoder, datasets_dir=tmp_path)
    progress = RecordingProgress()
    run_build(bench, tmp_path / "built.yaml", max_examples=5, head=True, progress=progress)
    train = len(bench.splits.train)
    assert train == 45
    assert progress.seen() == [
        ("encoding the train split", train, train),
        ("choosing examples per route (k-means)", 3, 3),  # billing, shipping, the unlabelled rows
        ("training the head", 1, 1),  # one route per row: one softmax model
    ]
    assert all(step.finished for step in progress.steps)


def test_routes_build_cli(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in support_rows()))
    out = tmp_path / "routes" / "support-built.yaml"
    result = CliRunner().invoke(app, ["routes", "build", str(data), "--out", str(out), "--max-examples", "5",
                                      "--default-outcome", "unrouted", "--head", "--encoder", "trivial",
                                      "--no-cache"])
    assert result.exit_code == 0, result.output
    built = load_route_set(out)
    assert [(r.name, r.outcome, len(r.utterances)) for r in built.routes] == [
        ("billing", "billing", 5), ("shipping", "shipping", 5), ("unrouted", "unrouted", 5)]
    assert built.default_outcome == "unrouted"
    assert parse_route_set(yaml.safe_load(out.read_text())) == built
    assert (tmp_path / "routes" / "support-built.head.npz").exists()
    check = CliRunner().invoke(app, ["routes", "check", str(out)])
    assert check.exit_code == 0
