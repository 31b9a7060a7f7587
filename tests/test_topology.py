"""Topologies: the shipped ones, outcome -> topic mapping, and errors naming the field."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from sieve.contracts import NEEDS_REVIEW
from sieve.routeset import RouteSetError, load_route_set
from sieve.topology import (
    TOPOLOGY_SCHEMA_VERSION,
    OutputSpec,
    Topology,
    TopologyError,
    load_topology,
    load_topology_route_set,
)

from .conftest import copy_shipped_routes

REPO = Path(__file__).resolve().parents[1]
TOPOLOGIES = REPO / "topologies"


def minimal_topology() -> dict:
    return {
        "name": "mini",
        "input": {"topics": ["in.events"]},
        "route_set": {"name": "moderation", "file": "../routes/moderation.yaml"},
        "output": {
            "outcome_topics": {"clean": "out.clean", "violating": "out.bad",
                               NEEDS_REVIEW: "out.review"},
        },
    }


def write_topology(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- shipped


@pytest.mark.parametrize("name", ["moderation", "support"])
def test_shipped_topologies_load_and_match_their_route_sets(name):
    topology = load_topology(TOPOLOGIES / f"{name}.yaml")
    assert topology.name == name
    assert topology.consumer_group == f"sieve-{name}"
    assert topology.route_set.name == name
    # the relative 'file' is resolved against the topology file, not the cwd
    assert topology.route_set.file is not None
    assert topology.route_set.file.is_absolute()
    assert topology.route_set.file == (REPO / "routes" / f"{name}.yaml").resolve()
    route_set = load_topology_route_set(topology)
    assert route_set == load_route_set(REPO / "routes" / f"{name}.yaml")
    topology.check_outcomes(route_set)  # every outcome has a topic
    assert topology.encoder.kind == "sentence-transformers"
    assert topology.encoder.model is None  # the bundled MiniLM


def test_route_set_file_is_resolved_relative_to_the_topology(tmp_path, monkeypatch):
    # Copy a topology and its route set into another tree, then load from a third directory.
    tree = tmp_path / "tree"
    (tree / "routes").mkdir(parents=True)
    (tree / "topologies").mkdir()
    shutil.copy(REPO / "routes" / "support.yaml", tree / "routes" / "support.yaml")
    shutil.copy(TOPOLOGIES / "support.yaml", tree / "topologies" / "support.yaml")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    topology = load_topology(Path("..") / "tree" / "topologies" / "support.yaml")
    assert topology.route_set.file == (tree / "routes" / "support.yaml").resolve()
    assert load_topology_route_set(topology).name == "support"


def test_absolute_route_set_file_is_kept(tmp_path):
    data = minimal_topology()
    absolute = (REPO / "routes" / "moderation.yaml").resolve()
    data["route_set"]["file"] = str(absolute)
    topology = load_topology(write_topology(tmp_path / "deep" / "er" / "t.yaml", data))
    assert topology.route_set.file == absolute


def test_defaults_of_a_minimal_topology(tmp_path):
    topology = load_topology(write_topology(tmp_path / "topologies" / "mini.yaml",
                                            minimal_topology()))
    assert topology.consumer_group == "sieve-mini"
    assert topology.output.route_topic_prefix == "route."
    assert topology.output.dead_letter_topic == "sieve.dead-letter"
    assert topology.limits.max_text_chars == 8000
    assert topology.thresholds is None
    assert topology.schema_version == TOPOLOGY_SCHEMA_VERSION == 5, "optional in the file"
    assert topology.review is None or topology.review.audit_share == 0.0  # audits only when asked


def test_schema_version_may_be_declared(tmp_path):
    data = {"schema_version": 1, **minimal_topology()}
    assert load_topology(write_topology(tmp_path / "topologies" / "v.yaml", data)).schema_version == 1


# --------------------------------------------------------------------------- topic_for


def test_topic_for_moderation():
    output = load_topology(TOPOLOGIES / "moderation.yaml").output
    assert output.topic_for("clean") == "sieve.clean"
    assert output.topic_for("violating") == "sieve.violating"
    assert output.topic_for(NEEDS_REVIEW) == "sieve.needs-review"
    with pytest.raises(KeyError, match="'spam'"):
        output.topic_for("spam")


def test_topic_for_support_uses_the_template_after_explicit_topics():
    output = load_topology(TOPOLOGIES / "support.yaml").output
    assert output.topic_for(NEEDS_REVIEW) == "support.needs-review"
    assert output.topic_for("billing") == "support.billing"
    # underscores become hyphens in templated topics
    assert output.topic_for("technical_support") == "support.technical-support"
    assert output.topic_for("unrouted") == "support.unrouted"
    assert output.topic_for("anything_new") == "support.anything-new"


def test_explicit_topic_beats_template():
    output = OutputSpec(outcome_topics={"billing": "money"}, outcome_topic_template="t.{outcome}")
    assert output.topic_for("billing") == "money"
    assert output.topic_for("sales") == "t.sales"


# --------------------------------------------------------------------------- check_outcomes


def test_check_outcomes_names_the_missing_outcome(moderation_set):
    data = minimal_topology()
    del data["output"]["outcome_topics"]["violating"]
    topology = Topology.model_validate(data)
    with pytest.raises(TopologyError) as info:
        topology.check_outcomes(moderation_set)
    message = str(info.value)
    assert "violating" in message
    assert "'mini'" in message and "'moderation'" in message
    assert "clean" not in message.split("outcome(s)")[1].split(" of route set")[0]


def test_check_outcomes_lists_every_missing_outcome(support_set):
    topology = load_topology(TOPOLOGIES / "moderation.yaml")
    with pytest.raises(TopologyError) as info:
        topology.check_outcomes(support_set)
    missing = info.value.args[0].split("outcome(s) ")[1].split(" of route set")[0].split(", ")
    assert missing == sorted(support_set.outcomes - {NEEDS_REVIEW})


def test_load_topology_route_set_checks_outcomes(tmp_path):
    data = minimal_topology()
    del data["output"]["outcome_topics"][NEEDS_REVIEW]
    topology = load_topology(write_topology(tmp_path / "topologies" / "t.yaml", data))
    # the file is resolved against tmp_path/topologies, where there is no ../routes: copy one
    copy_shipped_routes("moderation.yaml", tmp_path / "routes")
    with pytest.raises(TopologyError, match=NEEDS_REVIEW):
        load_topology_route_set(topology)


def test_load_topology_route_set_refuses_another_set(tmp_path):
    data = minimal_topology()
    data["route_set"] = {"name": "moderation", "file": str(REPO / "routes" / "support.yaml")}
    topology = load_topology(write_topology(tmp_path / "t.yaml", data))
    with pytest.raises(TopologyError, match="expects route set 'moderation'.*defines 'support'"):
        load_topology_route_set(topology)


def test_load_topology_route_set_needs_a_file(tmp_path):
    data = minimal_topology()
    data["route_set"] = {"name": "moderation"}
    topology = load_topology(write_topology(tmp_path / "t.yaml", data))
    with pytest.raises(TopologyError, match="names no file"):
        load_topology_route_set(topology)


def test_load_topology_route_set_reports_a_missing_route_file(tmp_path):
    topology = load_topology(write_topology(tmp_path / "topologies" / "t.yaml",
                                            minimal_topology()))
    with pytest.raises(RouteSetError, match="cannot read"):
        load_topology_route_set(topology)


# --------------------------------------------------------------------------- output_topics


def test_output_topics_moderation(moderation_set):
    topology = load_topology(TOPOLOGIES / "moderation.yaml")
    topics = topology.output_topics(moderation_set)
    assert topics == sorted(set(topics))
    expected = {"sieve.clean", "sieve.violating", "sieve.needs-review", "sieve.dead-letter"}
    expected |= {f"route.{route.name}" for route in moderation_set.routes}
    assert set(topics) == expected


def test_output_topics_support_without_route_topics(support_set):
    topology = load_topology(TOPOLOGIES / "support.yaml")
    topics = topology.output_topics(support_set)
    assert not any(topic.startswith("route.") for topic in topics)
    assert "support.dead-letter" in topics
    assert "support.unrouted" in topics and "support.needs-review" in topics
    assert set(topics) == {topology.output.topic_for(o) for o in support_set.outcomes} | {
        "support.dead-letter"
    }


# --------------------------------------------------------------------------- malformed files


def _mutated(mutate) -> dict:
    data = minimal_topology()
    mutate(data)
    return data


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        pytest.param(lambda d: d.pop("input"), "input", id="missing-input"),
        pytest.param(lambda d: d.pop("output"), "output", id="missing-output"),
        pytest.param(lambda d: d["input"].__setitem__("topics", []), "input.topics",
                     id="no-input-topics"),
        pytest.param(lambda d: d["input"].__setitem__("partitions", 0), "input.partitions",
                     id="zero-partitions"),
        pytest.param(lambda d: d.__setitem__("name", "Not A Name"), "name", id="bad-name"),
        pytest.param(lambda d: d["route_set"].__setitem__("name", "Moderation!"),
                     "route_set.name", id="bad-route-set-name"),
        pytest.param(lambda d: d.__setitem__("encoder", {"kind": "bert"}), "encoder.kind",
                     id="bad-encoder"),
        pytest.param(lambda d: d.__setitem__("batching", {"max_events": 0}),
                     "batching.max_events", id="bad-batching"),
        pytest.param(lambda d: d.__setitem__("batching", {"max_wait_s": 0}),
                     "batching.max_wait_s", id="zero-wait"),
        pytest.param(lambda d: d.__setitem__("limits", {"max_event_bytes": 10}),
                     "limits.max_event_bytes", id="tiny-event-limit"),
        pytest.param(lambda d: d.__setitem__("thresholds", {"accept": 2}), "thresholds.accept",
                     id="bad-threshold"),
        pytest.param(lambda d: d.__setitem__("outputs", {}), "outputs", id="unknown-field"),
        pytest.param(lambda d: d.__setitem__("schema_version", 0), "schema_version", id="version-zero"),
        pytest.param(lambda d: d.__setitem__("schema_version", "one"), "schema_version",
                     id="version-not-a-number"),
        pytest.param(lambda d: d["output"].__setitem__("dead_letter", "x"), "output.dead_letter",
                     id="unknown-output-field"),
    ],
)
def test_malformed_topology_names_the_field(tmp_path, mutate, field):
    path = write_topology(tmp_path / "bad.yaml", _mutated(mutate))
    with pytest.raises(TopologyError) as info:
        load_topology(path)
    message = str(info.value)
    assert str(path) in message
    assert f"field {field!r}" in message, message


def test_not_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: [oops\n", encoding="utf-8")
    with pytest.raises(TopologyError, match="not valid YAML"):
        load_topology(path)


def test_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- name: x\n", encoding="utf-8")
    with pytest.raises(TopologyError, match="a topology is a mapping") as info:
        load_topology(path)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(TopologyError, match="cannot read"):
        load_topology(tmp_path / "none.yaml")


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        pytest.param(lambda d: d["input"].__setitem__("topics", ["sieve events!"]),
                     "input.topics", id="input"),
        pytest.param(lambda d: d["output"].__setitem__("dead_letter_topic", "dead letters"),
                     "output.dead_letter_topic", id="dead-letter"),
    ],
)
def test_illegal_topic_names_are_rejected(tmp_path, mutate, field):
    path = write_topology(tmp_path / "bad.yaml", _mutated(mutate))
    with pytest.raises(TopologyError, match=field.replace(".", r"\.")):
        load_topology(path)
