"""sieve routes learn: a route-set version proposed from reviewers' labels, fitted and compared."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from sieve.cli import app
from sieve.flow.head import LearnedHead, train_head
from sieve.quality.build import RoutePool
from sieve.quality.datasets import LabelledData, LabelledExample
from sieve.quality.learn import LearnError, check_labels, head_training, propose, run_learn
from sieve.quality.targets import Targets
from sieve.quality.workbench import open_workbench
from sieve.routeset import head_path_for, load_route_set, parse_route_set

ACTIVE = """\
name: chat
default_outcome: clean
lists: [lists/threats.yaml]
routes:
  - {name: spam, outcome: violating, utterances: ["buy cheap pills now", "cheap pills for sale today"]}
  - {name: clean, outcome: clean, utterances: ["see you at lunch", "lovely weather today"]}
"""
THREATS = {"name": "threats", "kind": "block", "route": "spam", "entries": [{"id": "kill", "term": "kill"}]}


def active_file(tmp_path: Path) -> Path:
    (tmp_path / "routes" / "lists").mkdir(parents=True)
    (tmp_path / "routes" / "lists" / "threats.yaml").write_text(yaml.safe_dump(THREATS))
    path = tmp_path / "routes" / "chat.yaml"
    path.write_text(ACTIVE)
    return path


def label_rows() -> list[dict[str, object]]:
    """Rows as `sieve labels export` writes them; some for a route the active set lacks (scam)."""
    rows: list[dict[str, object]] = []
    for i in range(40):
        rows.append({"text": f"send the gift card code {i} to claim your prize", "outcome": "violating",
                     "labels": ["scam"]})
        rows.append({"text": f"cheap pills {i} buy now online", "outcome": "violating", "labels": ["spam"]})
        rows.append({"text": f"meeting the team for lunch at {i}", "outcome": "clean"})
    return [{"id": f"l{n:03d}", **row, "labeller": "llm:r", "route_set": "chat", "route_set_version": "v"}
            for n, row in enumerate(rows)]


def write_labels(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_propose_caps_routes_adds_new_ones_and_leaves_out_near_duplicates():
    route_set = parse_route_set(yaml.safe_load(ACTIVE.replace("lists: [lists/threats.yaml]\n", "")))
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16))
    centres[1] = centres[0] + 0.01 * rng.normal(size=16)  # two clusters with nearly the same centre
    existing = np.eye(16, dtype=np.float32)[:4]  # the set's four examples
    rows, vectors = [], []
    for c in range(4):
        for j in range(6):
            rows.append(LabelledExample(f"s{c}-{j}", f"scam text {c} {j}", "violating", frozenset({"scam"})))
            vectors.append(centres[c] + 0.001 * rng.normal(size=16))
    for j in range(3):  # a spam label that repeats the set's first example
        rows.append(LabelledExample(f"p{j}", f"pills again {j}", "violating", frozenset({"spam"})))
        vectors.append(existing[0] + 0.001 * rng.normal(size=16))
    train = LabelledData("l", tuple(rows), ("scam", "spam"), source="l.jsonl", licence="-")
    proposal = propose(route_set, train, np.array(vectors), existing, max_per_route=3, seed=0)
    changes = {c.route: c for c in proposal.changes}
    scam = proposal.route_set.route("scam")
    assert scam.outcome == "violating" and changes["scam"].new
    # four clusters, cap 3: three medoids; of clusters 0 and 1 (same centre) at most one is kept
    assert len(changes["scam"].added) + changes["scam"].near_duplicates == 3
    assert len(scam.utterances) <= 3
    kept_clusters = [text.split()[2] for text in scam.utterances]
    assert not {"0", "1"} <= set(kept_clusters)
    # the spam labels nearly repeat an example the set has: none added, counted as left out
    assert proposal.route_set.route("spam").utterances == route_set.route("spam").utterances
    assert changes["spam"].added == () and changes["spam"].near_duplicates >= 1
    assert proposal.route_set.route("clean") == route_set.route("clean")
    assert (proposal.route_set.name, proposal.route_set.default_outcome) == ("chat", "clean")


def test_learn_proposes_fits_and_compares_on_held_back_labels(tmp_path, trivial_encoder):
    active = active_file(tmp_path)
    labels = write_labels(tmp_path / "labels.jsonl", label_rows())
    bench = open_workbench(str(labels), trivial_encoder, datasets_dir=tmp_path)
    out = tmp_path / "proposed" / "chat.yaml"
    result = run_learn(bench, active, out, Targets(accuracy=0.9, z=0.0), max_per_route=5, seed=0,
                       min_support=None, head=True, head_words=True)
    assert LearnedHead.load(head_path_for(out)).words is not None  # asked for: the active set has no head
    proposed = load_route_set(out)
    assert proposed == result.proposed and proposed.name == "chat"
    assert proposed.version != load_route_set(active).version
    assert [item.name for item in proposed.loaded_lists] == ["threats"]  # lists still resolve from --out
    assert yaml.safe_load(out.read_text())["lists"] == ["../routes/lists/threats.yaml"]
    assert proposed.defaults.novelty is not None  # the novelty threshold was refitted
    assert head_path_for(out).exists()
    # new examples: from the train split only, never from calibration or test
    before = {t for r in load_route_set(active).routes for t in r.utterances}
    added = {t for r in proposed.routes for t in r.utterances} - before
    train = {ex.text for ex in bench.splits.train.examples}
    held = {ex.text for ex in bench.splits.calibration.examples + bench.splits.test.examples}
    assert added and added <= train and not added & held
    assert all(len(set(r.utterances) - before) <= 5 for r in proposed.routes)  # the cap
    assert proposed.route("scam").outcome == "violating"
    # the comparison: on held-back scam labels the proposed version routes them automatically
    comparison = json.loads(out.with_name("chat.learn.json").read_text())
    scam = next(r for r in comparison["label_routes"] if r["route"] == "scam")
    assert not scam["in_active"] and scam["events"] == len(
        [ex for ex in bench.splits.test.examples if "scam" in ex.labels])
    assert scam["active"]["routed_to_it_share"] == 0.0 and scam["active"]["auto_correct_share"] < 0.5
    assert scam["proposed"]["routed_to_it_share"] > 0.8 and scam["proposed"]["auto_correct_share"] > 0.8
    assert {s["side"] for s in comparison["systems"]} == {"active", "proposed"}
    markdown = out.with_name("chat.learn.md").read_text()
    assert "| scam | violating | yes |" in markdown and "| scam | no |" in markdown


def test_routes_learn_cli_writes_the_proposed_version(tmp_path):
    active = active_file(tmp_path)
    labels = write_labels(tmp_path / "labels.jsonl", label_rows())
    out = tmp_path / "new.yaml"
    result = CliRunner().invoke(app, ["routes", "learn", str(active), "--labels", str(labels), "-o", str(out),
                                      "--max-per-route", "4", "--min-support", "0", "--z", "0",
                                      "--min-accuracy", "0.9", "--label-accuracy", "0.9",
                                      "--encoder", "trivial", "--no-cache", "-q"])
    assert result.exit_code == 0, result.output
    comparison = json.loads(out.with_name("new.learn.json").read_text())
    assert comparison["label_accuracy"] == 0.9 and comparison["targets"]["accuracy"] == 0.9
    assert comparison["targets_on_labels"]["accuracy"] == pytest.approx(0.9 * 0.8 + 0.1)
    assert "taken as right 90.0% of the time" in out.with_name("new.learn.md").read_text()
    assert "new routes scam" in result.output and "auto" in result.output
    assert load_route_set(out).route("scam").outcome == "violating"
    assert out.with_name("new.learn.md").exists() and out.with_name("new.thresholds.json").exists()
    assert not head_path_for(out).exists()  # the active set has no head and none was asked for
    assert not list(tmp_path.glob(".learn-*"))  # the unfitted draft is not left behind


@pytest.mark.parametrize(("rows", "message"), [
    ([], "no labels to learn from"),
    ([{"id": f"c{i}", "text": f"hello number {i}", "outcome": "clean"} for i in range(12)],
     "one class only"),
    ([{"id": f"c{i}", "text": f"hello number {i}", "outcome": "clean" if i % 2 else "phishing"}
      for i in range(12)], "'phishing', which chat does not know"),
    ([{**row, "route_set": "other"} for row in label_rows()], "labels of route set other, not chat"),
])
def test_labels_it_cannot_learn_from_fail_clearly_and_write_nothing(tmp_path, rows, message):
    active = active_file(tmp_path)
    labels = write_labels(tmp_path / "labels.jsonl", rows)
    out = tmp_path / "out" / "new.yaml"
    result = CliRunner().invoke(app, ["routes", "learn", str(active), "--labels", str(labels), "-o", str(out),
                                      "--encoder", "trivial", "--no-cache", "-q"])
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()


def test_head_words_without_a_head_fail_clearly_and_write_nothing(tmp_path):
    active = active_file(tmp_path)  # no head beside it
    labels = write_labels(tmp_path / "labels.jsonl", label_rows())
    out = tmp_path / "out" / "new.yaml"
    result = CliRunner().invoke(app, ["routes", "learn", str(active), "--labels", str(labels), "-o", str(out),
                                      "--encoder", "trivial", "--no-cache", "-q", "--head-words"])
    assert result.exit_code == 2
    assert "head words need a head" in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()


def test_check_labels_resolves_rows_without_outcome_to_the_default():
    route_set = parse_route_set(yaml.safe_load(ACTIVE.replace("lists: [lists/threats.yaml]\n", "")))
    rows = (LabelledExample("1", "a", None), LabelledExample("2", "b", "clean"))
    with pytest.raises(LearnError, match="one class only"):
        check_labels(LabelledData("l", rows, (), source="l.jsonl", licence="-"), route_set)
    both = (*rows, LabelledExample("3", "c", "violating"))
    check_labels(LabelledData("l", both, (), source="l.jsonl", licence="-"), route_set)  # two outcomes: fine
    phishing = (*rows, LabelledExample("3", "c", "phishing"))
    novel = LabelledData("l", phishing, (), source="l.jsonl", licence="-")
    with pytest.raises(LearnError, match="'phishing', which chat does not know"):
        check_labels(novel, route_set)
    check_labels(novel, route_set, new_outcomes=True)  # intent routing: a new intent is a new outcome


def test_labels_from_data_writes_learnable_labels_with_a_seeded_wrong_share(tmp_path: Path) -> None:
    import subprocess
    import sys

    from sieve.quality.datasets import load_jsonl

    from .conftest import REPO

    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"text {i}", "label": "a" if i % 2 else "b"})
                              for i in range(200)))
    out = tmp_path / "labels.jsonl"
    script = str(REPO / "load-tests" / "labels_from_data.py")
    done = subprocess.run([sys.executable, script, str(data), str(out), "--wrong", "0.1"],
                          capture_output=True, text=True, check=True)
    labels = load_jsonl(out)
    gold = {ex.text: ex.outcome for ex in load_jsonl(data).examples}
    flipped = sum(ex.outcome != gold[ex.text] for ex in labels.examples)
    assert len(labels.examples) == 200 and f"({flipped} flipped)" in done.stdout and 5 < flipped < 40


def test_targets_on_labels_are_the_agreement_a_decider_of_that_accuracy_has_with_noisy_labels() -> None:
    from sieve.quality.targets import accuracy_from_agreement, agreement_for

    rng = np.random.default_rng(0)
    n = 200_000
    truth = rng.integers(0, 2, n)
    for accuracy, label_accuracy in [(0.95, 0.95), (0.9, 0.8), (0.99, 0.9)]:
        decided = np.where(rng.random(n) < accuracy, truth, 1 - truth)
        labels = np.where(rng.random(n) < label_accuracy, truth, 1 - truth)
        seen = float(np.mean(decided == labels))  # what a fit measures against the labels
        assert agreement_for(accuracy, label_accuracy) == pytest.approx(seen, abs=0.004)
        assert accuracy_from_agreement(seen, label_accuracy) == pytest.approx(accuracy, abs=0.006)
    # labels always right: nothing changes; more outcomes can only agree less (cautious)
    targets = Targets(precision={"violating": 0.9}, accuracy=0.95, z=1.0)
    assert targets.on_labels(1.0) == targets
    read = targets.on_labels(0.95)
    assert read.accuracy == pytest.approx(0.905) and read.precision["violating"] == pytest.approx(0.86)
    assert read.z == 1.0 and accuracy_from_agreement(0.02, 0.95) == 0.0
    with pytest.raises(ValueError, match="label accuracy"):
        targets.on_labels(0.5)


def test_a_learned_head_trains_on_the_sets_examples_and_the_labels():
    route_set = parse_route_set(yaml.safe_load(ACTIVE.replace("lists: [lists/threats.yaml]\n", "")))
    rows = [LabelledExample(f"s{i}", f"scam {i}", "violating", frozenset({"scam"})) for i in range(3)]
    train = LabelledData("l", tuple(rows), ("scam",), source="l.jsonl", licence="-")
    vectors = np.ones((3, 4), np.float32)
    examples = np.arange(16, dtype=np.float32).reshape(4, 4)  # spam's two, then clean's two
    data, stacked, pools = head_training(route_set, train, vectors, examples, (RoutePool("scam", "violating",
                                                                                       (0, 1, 2)),))
    # the labels' rows first, then the set's examples; every route of the set has a pool, labelled or not
    assert [ex.text for ex in data.examples[3:]] == ["buy cheap pills now", "cheap pills for sale today",
                                                      "see you at lunch", "lovely weather today"]
    assert data.examples[3].labels == {"spam"} and data.examples[5].outcome == "clean"
    np.testing.assert_array_equal(stacked, np.vstack([vectors, examples]))
    assert {p.name: p.rows for p in pools} == {"scam": (0, 1, 2), "spam": (3, 4), "clean": (5, 6)}


def test_a_balanced_head_gives_a_route_with_few_rows_its_share():
    rng = np.random.default_rng(0)
    centres = np.eye(8, dtype=np.float32)[:3] + 0.6 * np.eye(8, dtype=np.float32)[3]
    counts = (200, 200, 6)  # two routes with many rows, one the labels named a few times
    vectors = np.vstack([centres[r] + 0.35 * rng.normal(size=(n, 8)) for r, n in enumerate(counts)])
    membership = np.zeros((sum(counts), 3), bool)
    membership[np.arange(sum(counts)), np.repeat(np.arange(3), counts)] = True
    test = np.vstack([centres[2] + 0.35 * rng.normal(size=(200, 8))]).astype(np.float32)
    shares = {}
    for balanced in (False, True):
        head = train_head(vectors.astype(np.float32), membership, ["a", "b", "c"], "x", c=1.0,
                          balanced=balanced)
        shares[balanced] = float((head.probabilities(test).argmax(axis=1) == 2).mean())
        assert head.meta.get("balanced", False) is balanced
    assert shares[False] < shares[True] and shares[True] > 0.6


@pytest.mark.parametrize("words", [False, True], ids=["vectors", "vectors and words"])
def test_a_head_learned_from_labels_with_a_route_each_trains_balanced(tmp_path, trivial_encoder, words):
    """An active one-vs-rest head (multi-label training data), labels of one route each: the
    proposed head is a softmax trained on the labels alone, balanced (review traffic's mix of
    routes is not the stream's); it scores words when the active head does."""
    active = active_file(tmp_path)
    membership = np.array([[1, 1], [1, 0], [0, 1], [0, 1]], bool)  # a row in both routes: one-vs-rest
    texts = ["cheap pills now", "buy cheap now", "lunch now", "weather now"]
    train_head(trivial_encoder.encode(texts), membership, ["spam", "clean"], trivial_encoder.id, c=1.0,
               texts=texts if words else None).save(head_path_for(active))
    labels = write_labels(tmp_path / "labels.jsonl", label_rows())
    bench = open_workbench(str(labels), trivial_encoder, datasets_dir=tmp_path)
    out = tmp_path / "proposed" / "chat.yaml"
    result = run_learn(bench, active, out, Targets(accuracy=0.9, z=0.0), max_per_route=5, seed=0,
                       min_support=None)
    head = result.comparison["head"]
    assert head is not None and head["balanced"] is True
    assert ("words" in head) is words
    assert (LearnedHead.load(head_path_for(out)).words is not None) is words
    # the labels alone: no row of the set's own examples joined them
    assert head["rows"] == sum(1 for ex in bench.splits.train.examples if ex.labels or ex.outcome == "clean")
