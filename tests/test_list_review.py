"""Block lists with ``action: review``: a hit holds its route for review, never decides alone.

Through the real pipeline (trivial encoder, real lists), in single and multi sets, and the
same rule in ``sieve eval`` and ``sieve fit`` (:func:`sieve.flow.list_policy.decide_with_lists`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from sieve.cli import app
from sieve.contracts import NEEDS_REVIEW, Decision
from sieve.flow.decide import Policy, decide_scores
from sieve.flow.list_policy import decide_with_lists
from sieve.flow.lists import ListHit, TermMatcher
from sieve.flow.match import RouteIndex
from sieve.flow.pipeline import RouterPipeline
from sieve.lists import ListError, load_list, parse_list
from sieve.quality.decider import FastDecider, Params, check_agrees_with_worker
from sieve.routeset import load_route_set
from sieve.topology import load_topology

from .conftest import REPO
from .test_lists import ROUTES, route_file
from .test_prefilter import MULTI_ROUTES, CountingEncoder, record

REVIEW = {"name": "profanity", "kind": "block", "route": "violence", "action": "review",
          "entries": [{"id": "s", "term": "shit"}, {"id": "d", "pattern": r"\bd[a4]mn\b"}]}


def pipeline_with(tmp_path: Path, routes: str = ROUTES) -> tuple[RouterPipeline, CountingEncoder]:
    topology = load_topology(REPO / "topologies" / "moderation.yaml")
    topology = topology.model_copy(update={"output": topology.output.model_copy(
        update={"outcome_topic_template": "t.{outcome}"})})
    encoder = CountingEncoder()
    index = RouteIndex.build(load_route_set(route_file(tmp_path, REVIEW, routes)), encoder)
    encoder.texts.clear()
    return RouterPipeline(topology, encoder, index, "t"), encoder


def decide(pipeline: RouterPipeline, text: str) -> Decision:
    [decision] = pipeline.process([record(0, "a", text)]).decisions
    return decision


def test_a_review_list_loads_and_its_hits_say_review() -> None:
    matcher = TermMatcher([parse_list(REVIEW, "r.yaml")])
    [hit] = matcher.match("well SH1T, that went badly")
    assert (hit.list, hit.entry, hit.route, hit.action) == ("profanity", "s", "violence", "review")
    assert [h.action for h in matcher.match("d4mn")] == ["review"]
    allow = parse_list({"name": "ok", "kind": "allow", "entries": [{"id": "a", "term": "shit happens"}]}, "a")
    assert TermMatcher([parse_list(REVIEW, "r.yaml"), allow]).match("well, shit happens") == []


@pytest.mark.parametrize(("data", "message"), [
    ({"name": "x", "kind": "allow", "action": "review", "entries": [{"id": "a", "term": "a"}]},
     "no 'action'"),
    ({"name": "x", "kind": "block", "action": "review", "entries": [{"id": "a", "term": "a"}]}, "'route'"),
    ({"name": "x", "kind": "block", "route": "r", "action": "hold", "entries": [{"id": "a", "term": "a"}]},
     "action"),
])
def test_bad_actions_are_refused(data: dict, message: str) -> None:
    with pytest.raises(ListError, match=message):
        parse_list(data, "bad.yaml")


def test_in_a_single_set_a_review_hit_holds_what_would_be_clean(tmp_path: Path) -> None:
    pipeline, encoder = pipeline_with(tmp_path)
    plain = decide(pipeline, "hello there")
    assert (plain.outcome, plain.list_hits) == ("clean", None)
    held = decide(pipeline, "shit hello there")
    assert encoder.texts[-1] == "shit hello there"  # encoded and matched: the hit did not decide alone
    assert (held.outcome, held.reason, held.route) == (NEEDS_REVIEW, "review_band", "violence")
    assert held.final is False
    assert held.list_hits is not None and [(h.entry, h.action) for h in held.list_hits] == [("s", "review")]
    assert held.nearest  # a scored decision, unlike a block hit's


def test_a_review_hit_never_lowers_a_route_that_accepted(tmp_path: Path) -> None:
    pipeline, _ = pipeline_with(tmp_path)
    decision = decide(pipeline, "damn you will pay for this")
    assert (decision.outcome, decision.reason, decision.route) == ("violating", "accept", "violence")
    assert decision.list_hits is not None and decision.list_hits[0].action == "review"


def test_in_a_multi_set_the_hits_route_fires_in_its_review_band(tmp_path: Path) -> None:
    pipeline, _ = pipeline_with(tmp_path, MULTI_ROUTES)
    held = decide(pipeline, "hello there how are you shit")
    assert (held.outcome, held.reason, held.route) == (NEEDS_REVIEW, "review_band", "violence")
    assert held.mode == "multi"
    assert held.routes is not None and [(r.route, r.band) for r in held.routes] == [("violence", "review")]
    assert held.categories is not None and held.categories["violence"] is False
    # a route that accepts on its own stays the verdict; the held route is listed beside it
    hurt = decide(pipeline, "shit I will hurt you")
    assert (hurt.outcome, hurt.route) == ("violating", "violence")
    assert hurt.routes is not None and ("violence", "accept") in {(r.route, r.band) for r in hurt.routes}


def test_in_a_multi_set_a_held_route_takes_part_in_the_severity_rule() -> None:
    from .test_multi import rows_with_hits

    hit = ListHit(list="profanity", entry="s", route="hate", action="review")
    # spam (queue) accepts on its own; hate (violating, more severe) is held in its review band
    [row] = rows_with_hits([[0.10, 0.10, 0.75, 0.10, 0.0]], [[hit]])
    assert (row["outcome"], row["reason"], row["route"]) == (NEEDS_REVIEW, "review_band", "hate")
    assert {(r["route"], r["band"]) for r in row["routes"]} == {("hate", "review"), ("spam", "accept")}
    assert row["list_hits"] == [{"list": "profanity", "entry": "s", "route": "hate", "distance": None,
                                 "action": "review"}]
    # violence accepts: as severe as the held hate route, so it stands
    [row] = rows_with_hits([[0.10, 0.75, 0.10, 0.10, 0.0]], [[hit]])
    assert (row["outcome"], row["route"]) == ("violating", "violence")
    # a block hit on the same route accepts it instead
    [row] = rows_with_hits([[0.10, 0.10, 0.75, 0.10, 0.0]], [[ListHit("slurs", "s", "hate")]])
    assert (row["outcome"], row["route"]) == ("violating", "hate")


def test_eval_applies_the_lists_as_the_worker_does(tmp_path: Path) -> None:
    route_set = load_route_set(route_file(tmp_path, REVIEW, ROUTES))
    encoder = CountingEncoder()
    index = RouteIndex.build(route_set, encoder)
    texts = ["hello there", "shit hello there", "you will pay for this damn", "how are you"]
    vectors = encoder.encode(texts)
    from sieve.flow.match import match_batch
    match = match_batch(vectors, index, index.aggregation)
    hits = TermMatcher([item for item in route_set.loaded_lists]).match_batch(texts)  # type: ignore[misc]
    policy = Policy.for_index(index)
    scores, verdicts = decide_with_lists(match.route_scores, policy, None, hits, index)
    assert [v.outcome for v in verdicts] == ["clean", NEEDS_REVIEW, "violating", "clean"]
    plain = decide_scores(match.route_scores, policy)
    assert [v.outcome for v in plain] == ["clean", "clean", "violating", "clean"]
    assert np.array_equal(scores, match.route_scores)  # a review hit changes no score
    pipeline, _ = pipeline_with(tmp_path)
    records = [record(i, f"e{i}", t) for i, t in enumerate(texts)]
    worker = [d.outcome for d in pipeline.process(records).decisions]
    assert worker == [v.outcome for v in verdicts]


def test_fit_sees_held_events_go_to_review() -> None:
    # one clean route, one violating: event 1 would be clean, but a review hit holds it
    scores = np.array([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9]], dtype=np.float32)
    held = np.array([False, True, False])
    outcomes = ("clean", "violating")
    decider = FastDecider(scores, outcomes, "clean", held)
    params = Params(accept=np.array([0.5, 0.5]), width=np.array([0.1, 0.1]), margin=np.array([0.0, 0.0]),
                    no_match_review=False)
    check_agrees_with_worker(decider, params, params.policy(outcomes, "clean"), None, held)
    with pytest.raises(AssertionError, match="disagrees"):
        blind = FastDecider(scores, outcomes, "clean")  # a decider that does not see the held events
        check_agrees_with_worker(blind, params, params.policy(outcomes, "clean"), None, held)


def test_from_words_writes_a_list_that_loads(tmp_path: Path) -> None:
    words = tmp_path / "words.txt"
    words.write_text("# a comment\nshit\n\n2 girls 1 cup\n")
    out = tmp_path / "lists" / "profanity.yaml"
    command = ["lists", "from-words", str(words), "--out", str(out), "--route", "violence"]
    result = CliRunner().invoke(app, [*command, "--action", "review", "--description", "test words"])
    assert result.exit_code == 0, result.output
    loaded = load_list(out)
    assert [e.term for e in loaded.entries] == ["shit", "2 girls 1 cup"]  # type: ignore[union-attr]
    assert (loaded.route, getattr(loaded, "action", None)) == ("violence", "review")
    bad = CliRunner().invoke(app, [*command, "--action", "hold"])
    assert bad.exit_code != 0 and "action" in bad.output


def test_the_shipped_profanity_list_is_the_vendored_word_list_unchanged() -> None:
    shipped = load_list(REPO / "routes" / "lists" / "profanity.yaml")
    words = [w.strip() for w in (REPO / "data" / "blocklists" / "better-profanity" / "profanity_wordlist.txt")
             .read_text().splitlines() if w.strip()]
    assert [e.term for e in shipped.entries] == words  # type: ignore[union-attr]
    assert (shipped.kind, shipped.route) == ("block", "harassment")
    assert getattr(shipped, "action", None) == "review"
    assert (REPO / "routes" / "lists" / "LICENSE.better-profanity").read_text() == (
        REPO / "data" / "blocklists" / "better-profanity" / "LICENSE").read_text()
    moderation = load_route_set(REPO / "routes" / "moderation.yaml")
    assert [item.name for item in moderation.loaded_lists] == ["profanity", "slurs"]


def test_the_shipped_slur_list_adds_to_the_profanity_list_and_holds_for_review() -> None:
    slurs = load_list(REPO / "routes" / "lists" / "slurs.yaml")
    profanity = load_list(REPO / "routes" / "lists" / "profanity.yaml")
    terms = [e.term for e in slurs.entries]  # type: ignore[union-attr]
    assert len(terms) == len(set(terms)) > 50
    assert not set(terms) & {e.term for e in profanity.entries}  # type: ignore[union-attr]
    assert (slurs.kind, slurs.route, getattr(slurs, "action", None)) == ("block", "hate", "review")
    matcher = TermMatcher([profanity, slurs])  # type: ignore[list-item]
    held = ["these hoes ain't loyal", "text me later my nigs", "go back home you towel heads",
            "what a bunch of R3T4RDS", "white trash everywhere"]
    assert all(any(h.list == "slurs" for h in matcher.match(text)) for text in held)
    # plain words around the slurs stay out: a hit needs the whole word
    fine = ["those shoes are lovely", "horse riding lessons on sunday", "a towel and a headband",
            "the sandwich was trash-talked by the chef", "the photo was a bit dark"]
    assert not any(matcher.match(text) for text in fine)


def test_built_and_fitted_sets_name_their_lists_and_fit_holds_hits(tmp_path: Path, trivial_encoder) -> None:
    import json

    from sieve.quality.runner import run_build, run_fit
    from sieve.quality.targets import Targets
    from sieve.quality.workbench import open_workbench

    rows = [{"text": f"refund for order {i} please", "label": "billing"} for i in range(30)]
    rows += [{"text": f"my parcel {i} is late", "label": "shipping"} for i in range(30)]
    rows += [{"text": f"damn random chatter number {i}"} for i in range(30)]
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    bench = open_workbench(str(data), trivial_encoder, datasets_dir=tmp_path)
    (tmp_path / "lists").mkdir()
    review = tmp_path / "lists" / "p.yaml"
    review.write_text(yaml.safe_dump({**REVIEW, "route": "shipping"}))
    out = tmp_path / "built" / "b.yaml"
    run_build(bench, out, max_examples=5, lists=[review])
    built = load_route_set(out)
    assert yaml.safe_load(out.read_text())["lists"] == ["../lists/p.yaml"]
    assert [item.name for item in built.loaded_lists] == ["profanity"]
    fitted_out = tmp_path / "fit" / "b.fitted.yaml"
    report, _ = run_fit(bench, [("built", out)], Targets(accuracy=0.9), fitted_out=fitted_out)
    fitted = load_route_set(fitted_out)
    assert fitted.loaded_lists == built.loaded_lists  # the fitted file, written elsewhere, finds them too
    entry = report.systems[0]
    # every chatter event has a review hit ("damn"): none gets the default outcome without review,
    # in the fit's search and in its measured decisions alike
    default = built.default_outcome
    held = [o for o, g in zip(entry.run.outcomes, entry.run.gold, strict=True) if g == default]
    assert held and all(o == NEEDS_REVIEW for o in held)
    billing = {o for o, g in zip(entry.run.outcomes, entry.run.gold, strict=True) if g == "billing"}
    assert billing == {"billing"}
