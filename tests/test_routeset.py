"""Route sets: loading, versioning, error messages, threshold precedence, YAML round trip.

Also guards the shipped example texts against copying from the public datasets
used for calibration and evaluation (a shared 8-word sequence would leak test
data into the routes and inflate every figure measured on it).
"""

from __future__ import annotations

import copy
import functools
import gzip
import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from sieve.contracts import NEEDS_REVIEW
from sieve.flow.match import match_batch
from sieve.routeset import (
    NAME_PATTERN,
    ROUTE_SET_SCHEMA_VERSION,
    RouteSet,
    RouteSetError,
    ThresholdOverrides,
    load_route_set,
    parse_route_set,
)
from sieve.routeset_dump import dump_route_set

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO / "data"


def base_data() -> dict:
    """A small valid route set as plain data (each test mutates its own copy)."""
    return {
        "name": "demo",
        "description": "a small set for tests",
        "default_outcome": "ok",
        "defaults": {
            "aggregation": {"method": "top_k_mean", "k": 2},
            "accept": 0.6,
            "review": 0.4,
            "margin": 0.05,
        },
        "routes": [
            {
                "name": "alpha",
                "outcome": "bad",
                "policy": "Alpha things.",
                "utterances": ["first alpha example", "second alpha example"],
            },
            {"name": "beta", "outcome": "ok", "utterances": ["a beta example"]},
        ],
    }


def write_yaml(path: Path, data: object) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- shipped sets


@pytest.mark.parametrize(
    ("file", "name", "default_outcome", "some_outcomes"),
    [
        ("moderation.yaml", "moderation", "clean", {"violating", "clean"}),
        (
            "support.yaml",
            "support",
            "unrouted",
            {"sales", "billing", "technical_support", "account", "shipping"},
        ),
    ],
)
def test_shipped_route_sets_load(file, name, default_outcome, some_outcomes):
    route_set = load_route_set(REPO / "routes" / file)
    assert route_set.name == name
    assert route_set.default_outcome == default_outcome
    assert some_outcomes <= route_set.outcomes
    assert NEEDS_REVIEW in route_set.outcomes
    assert default_outcome in route_set.outcomes
    k = route_set.defaults.aggregation.k
    for route in route_set.routes:
        # the LLM reviewer reads the policy; top_k_mean needs at least k examples to mean anything
        assert route.policy and route.policy.strip(), route.name
        assert len(route.utterances) >= k, route.name
    assert re.fullmatch(r"[0-9a-f]{16}", route_set.version)


def test_shipped_fixtures_are_the_files(moderation_set, support_set):
    assert moderation_set == load_route_set(REPO / "routes" / "moderation.yaml")
    assert support_set.name == "support"


# Everyday content is clean by being close to benign examples, not far from violating ones.
BENIGN_KINDS = {
    "everyday_chat", "jokes_and_banter", "news_and_discussion", "health_and_support",
    "education_and_fiction", "product_and_tech", "reviews", "support_requests",
    "creative_and_hobbies", "sports", "gaming", "reporting_abuse",
}


def test_moderation_benign_routes_cover_everyday_traffic(moderation_set):
    clean = {r.name: r.utterances for r in moderation_set.routes if r.outcome == "clean"}
    violating = [u for r in moderation_set.routes if r.outcome == "violating" for u in r.utterances]
    assert set(clean) == BENIGN_KINDS
    assert all(len(texts) >= 15 for texts in clean.values()), {n: len(t) for n, t in clean.items()}
    benign = [u for texts in clean.values() for u in texts]
    assert len(benign) >= len(violating)
    # real traffic is not tidy: short posts and long ones, emoji and other non-ASCII
    assert sum(len(u) <= 40 for u in benign) >= 20
    assert sum(len(u) >= 150 for u in benign) >= 20
    assert sum(any(ord(ch) > 0x2000 for ch in u) for u in benign) >= 10


# Written after the routes, never added to them: gaming and sports trash talk, banter,
# reports and moderators quoting abuse, news of a hate crime, reviews, support requests.
HELD_OUT_BENIGN = [
    "ez game, their tank never showed up",
    "my buddy called me a muppet for missing the penalty lol",
    "a player keeps sending me racist messages after every match, is there a way to report them?",
    "Court sentences man for homophobic assault outside a bar",
    "what a comeback in the second half, I'm losing my voice",
    "delivery guy left the package in the rain, box soaked, 2 stars",
    "can't find where to change my notification sound, help?",
    "what do you call a bear with no teeth? a gummy bear",
    "morning all \u2615 who's got plans for the weekend",
    "Admin here: posts with slurs get removed, repeat offenders get banned. "
    "Please report instead of arguing.",
]


def test_moderation_everyday_posts_are_nearest_to_benign_routes(moderation_index, minilm):
    shipped = {u for r in moderation_index.route_set.routes for u in r.utterances}
    assert not shipped & set(HELD_OUT_BENIGN)
    match = match_batch(minilm.encode(HELD_OUT_BENIGN), moderation_index,
                        moderation_index.route_set.defaults.aggregation)
    for text, scores in zip(HELD_OUT_BENIGN, match.route_scores, strict=True):
        top = moderation_index.routes[int(scores.argmax())]
        assert top.outcome == "clean", (text, top.name, float(scores.max()))


# --------------------------------------------------------------------------- version


def test_version_is_stable_across_loads_and_formatting(tmp_path):
    first = load_route_set(REPO / "routes" / "support.yaml")
    second = load_route_set(REPO / "routes" / "support.yaml")
    assert first.version == second.version
    # Same content, different YAML (flow style, no comments, other key order): same version.
    data = yaml.safe_load((REPO / "routes" / "support.yaml").read_text(encoding="utf-8"))
    reordered = dict(reversed(list(data.items())))
    path = tmp_path / "support.yaml"
    path.write_text(yaml.safe_dump(reordered, default_flow_style=True), encoding="utf-8")
    assert load_route_set(path).version == first.version


def _changed(mutate: Callable[[dict], None]) -> str:
    data = base_data()
    mutate(data)
    return parse_route_set(data).version


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda d: d["routes"][0]["utterances"].__setitem__(0, "first alpha example!"),
                     id="utterance-edited"),
        pytest.param(lambda d: d["routes"][1]["utterances"].append("another beta"),
                     id="utterance-added"),
        pytest.param(lambda d: d["routes"][0]["utterances"].pop(), id="utterance-removed"),
        pytest.param(lambda d: d["defaults"].__setitem__("accept", 0.61), id="default-accept"),
        pytest.param(lambda d: d["defaults"].__setitem__("margin", 0.06), id="default-margin"),
        pytest.param(lambda d: d["routes"][0].__setitem__("thresholds", {"accept": 0.7}),
                     id="route-threshold"),
        pytest.param(lambda d: d["routes"][1].__setitem__("outcome", "bad"), id="outcome"),
        pytest.param(lambda d: d["defaults"]["aggregation"].__setitem__("k", 3),
                     id="aggregation"),
    ],
)
def test_version_changes_with_content(mutate):
    base = parse_route_set(base_data()).version
    assert _changed(mutate) != base


def test_version_ignores_explicit_defaults():
    # Writing a default value out explicitly is not a change of content.
    data = base_data()
    data["routes"][1]["policy"] = None
    assert parse_route_set(data).version == parse_route_set(base_data()).version


# --------------------------------------------------------------------------- errors


ERROR_CASES = [
    pytest.param(
        lambda d: d["routes"][1].pop("utterances"),
        ["route 'beta' (routes[1])", "a route needs examples"],
        id="missing-utterances",
    ),
    pytest.param(
        lambda d: d["routes"][1].__setitem__("utterances", []),
        ["route 'beta' (routes[1])", "a route needs examples"],
        id="no-utterances",
    ),
    pytest.param(
        lambda d: d["routes"][0].__setitem__("outcome", "Bad Outcome!"),
        ["route 'alpha' (routes[0])", "field 'outcome'", "pattern"],
        id="bad-outcome-name",
    ),
    pytest.param(
        lambda d: d["routes"][1].__setitem__("outcome", NEEDS_REVIEW),
        ["route 'beta' (routes[1])", "field 'outcome'", "'needs_review'"],
        id="needs-review-outcome",
    ),
    pytest.param(
        lambda d: d["routes"][0].__setitem__("name", "Alpha Route"),
        ["route 'Alpha Route' (routes[0])", "field 'name'"],
        id="bad-route-name",
    ),
    pytest.param(
        lambda d: d["routes"][0]["utterances"].append("   "),
        ["route 'alpha' (routes[0])", "field 'utterances'", "utterance 2 is empty"],
        id="empty-utterance",
    ),
    pytest.param(
        lambda d: d["routes"][0]["utterances"].append("first alpha example"),
        ["route 'alpha' (routes[0])", "field 'utterances'", "utterance 2 repeats"],
        id="repeated-utterance",
    ),
    pytest.param(
        lambda d: d["routes"][1].__setitem__("colour", "red"),
        ["route 'beta' (routes[1])", "field 'colour'", "Extra inputs"],
        id="unknown-route-field",
    ),
    pytest.param(
        lambda d: d.__setitem__("colour", "red"),
        ["field 'colour'", "Extra inputs"],
        id="unknown-top-level-field",
    ),
    pytest.param(
        lambda d: d["routes"][0].__setitem__("thresholds", {"accept": 0.7, "reveiw": 0.5}),
        ["route 'alpha' (routes[0])", "field 'thresholds.reveiw'"],
        id="unknown-threshold-field",
    ),
    pytest.param(
        lambda d: d["routes"][0].__setitem__("thresholds", {"accept": 1.5}),
        ["route 'alpha' (routes[0])", "field 'thresholds.accept'"],
        id="threshold-out-of-range",
    ),
    pytest.param(
        lambda d: d["defaults"].update(accept=0.5, review=0.6),
        ["field 'defaults'", "review (0.6) must not exceed accept (0.5)"],
        id="set-review-above-accept",
    ),
    pytest.param(
        lambda d: d["routes"][1].__setitem__("thresholds", {"accept": 0.3}),
        ["route 'beta'", "review (0.4) exceeds accept (0.3)"],
        id="route-review-above-accept-after-merge",
    ),
    pytest.param(
        lambda d: d["routes"][1].__setitem__("name", "alpha"),
        ["route names must be unique", "route 'alpha' (routes[1]), field 'name'"],
        id="duplicate-route-names",
    ),
    pytest.param(
        lambda d: d.pop("default_outcome"),
        ["field 'default_outcome'", "Field required"],
        id="missing-default-outcome",
    ),
    pytest.param(
        lambda d: d.__setitem__("routes", []),
        ["field 'routes'"],
        id="no-routes",
    ),
    pytest.param(
        lambda d: d["defaults"]["aggregation"].__setitem__("method", "median"),
        ["field 'defaults.aggregation.method'"],
        id="bad-aggregation",
    ),
]


@pytest.mark.parametrize(("mutate", "expected"), ERROR_CASES)
def test_malformed_file_names_file_route_and_field(tmp_path, mutate, expected):
    data = base_data()
    mutate(data)
    path = write_yaml(tmp_path / "broken.yaml", data)
    with pytest.raises(RouteSetError) as info:
        load_route_set(path)
    message = str(info.value)
    assert str(path) in message
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"
    # Data that is already parsed gives the same message under the given source name.
    with pytest.raises(RouteSetError, match=re.escape("<test>")):
        parse_route_set(data, "<test>")


def test_error_is_a_value_error():
    assert issubclass(RouteSetError, ValueError)


def test_every_error_is_reported_with_its_own_location(tmp_path):
    data = base_data()
    data["routes"][0]["outcome"] = "NOPE"
    data["routes"][1]["utterances"] = [""]
    path = write_yaml(tmp_path / "two.yaml", data)
    with pytest.raises(RouteSetError) as info:
        load_route_set(path)
    lines = str(info.value).splitlines()
    assert len(lines) == 2
    assert all(line.startswith(f"{path}: ") for line in lines)
    assert "route 'alpha' (routes[0]), field 'outcome'" in lines[0]
    assert "route 'beta' (routes[1]), field 'utterances'" in lines[1]


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        pytest.param(lambda d: d["routes"][1].__setitem__("name", "alpha"),
                     "routes[1]", id="duplicate-name"),
        pytest.param(lambda d: d["routes"][1].__setitem__("thresholds", {"accept": 0.3}),
                     "route 'beta' (routes[1]), field 'thresholds'", id="merged-thresholds"),
    ],
)
def test_set_level_route_errors_name_route_index(mutate, expected):
    data = base_data()
    mutate(data)
    with pytest.raises(RouteSetError) as info:
        parse_route_set(data, "x.yaml")
    assert expected in str(info.value)


def test_not_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: demo\nroutes: [unclosed\n  - {\n", encoding="utf-8")
    with pytest.raises(RouteSetError, match="not valid YAML") as info:
        load_route_set(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("text", "kind"), [("- a\n- b\n", "list"), ("just a string\n", "str"), ("", "NoneType")]
)
def test_not_a_mapping(tmp_path, text, kind):
    path = tmp_path / "list.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(RouteSetError, match=f"a route set is a mapping, got {kind}") as info:
        load_route_set(path)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere.yaml"
    with pytest.raises(RouteSetError, match="cannot read") as info:
        load_route_set(path)
    assert str(path) in str(info.value)


# --------------------------------------------------------------------------- thresholds


def test_thresholds_for_precedence():
    data = base_data()
    data["routes"][0]["thresholds"] = {"accept": 0.8}
    route_set = parse_route_set(data)
    alpha, beta = route_set.routes

    # defaults only
    plain = route_set.thresholds_for(beta)
    assert (plain.accept, plain.review, plain.margin) == (0.6, 0.4, 0.05)

    # topology overrides beat the defaults ...
    overrides = ThresholdOverrides(accept=0.7, margin=0.1)
    beta_t = route_set.thresholds_for(beta, overrides)
    assert (beta_t.accept, beta_t.review, beta_t.margin) == (0.7, 0.4, 0.1)

    # ... and the route's own beat both; unset fields fall through
    alpha_t = route_set.thresholds_for(alpha, overrides)
    assert (alpha_t.accept, alpha_t.review, alpha_t.margin) == (0.8, 0.4, 0.1)
    alpha_plain = route_set.thresholds_for(alpha)
    assert (alpha_plain.accept, alpha_plain.review, alpha_plain.margin) == (0.8, 0.4, 0.05)


def test_threshold_overrides_over_keeps_base_for_unset_fields():
    base = parse_route_set(base_data()).defaults.thresholds
    assert ThresholdOverrides().over(base) == base
    assert ThresholdOverrides(review=0.1).over(base).review == 0.1
    assert ThresholdOverrides(review=0.1).over(base).accept == base.accept


def test_route_lookup_and_outcomes():
    route_set = parse_route_set(base_data())
    assert route_set.route("beta").utterances == ["a beta example"]
    with pytest.raises(KeyError):
        route_set.route("gamma")
    assert route_set.outcomes == {"bad", "ok", NEEDS_REVIEW}


# --------------------------------------------------------------------------- schema_version


def test_schema_version_is_optional_and_not_content():
    implicit = parse_route_set(base_data())
    explicit = parse_route_set({"schema_version": 1, **base_data()})
    later = parse_route_set({"schema_version": 4, **base_data()})
    assert implicit.schema_version == later.schema_version == ROUTE_SET_SCHEMA_VERSION == 4
    assert explicit.schema_version == 1
    # The file format's version changes neither the content version (decision ids) nor equality.
    assert implicit.version == explicit.version == later.version
    assert implicit == later
    changed = base_data()
    changed["routes"][0]["utterances"].append("one more example")
    assert parse_route_set(changed).version != implicit.version


@pytest.mark.parametrize("value", [0, -1, "one", 1.5])
def test_schema_version_must_be_a_positive_integer(value):
    with pytest.raises(RouteSetError, match="field 'schema_version'"):
        parse_route_set({"schema_version": value, **base_data()})


# --------------------------------------------------------------------------- dump / parse


@pytest.mark.parametrize("file", ["moderation.yaml", "support.yaml"])
def test_dump_round_trips_shipped_sets(file, tmp_path):
    route_set = load_route_set(REPO / "routes" / file)
    text = dump_route_set(route_set)
    back = parse_route_set(yaml.safe_load(text), "dumped")
    assert back.model_dump() == route_set.model_dump()
    # written elsewhere, the file names its lists from there: same lists, same version
    (tmp_path / "out").mkdir()
    written = tmp_path / "out" / file
    written.write_text(dump_route_set(route_set, written.parent))
    again = load_route_set(written)
    assert again == route_set and again.version == route_set.version
    assert again.loaded_lists == route_set.loaded_lists
    # human-editable: block style, keys in model order, no nulls written out
    assert text.startswith(f"schema_version: {ROUTE_SET_SCHEMA_VERSION}\nname: ")
    assert "null" not in text


# Any text YAML can carry, U+0085 (NEL) and the Unicode line separators included.
_TEXT = st.characters(codec="utf-8")
_names = st.from_regex(NAME_PATTERN, fullmatch=True)
_utterance = st.text(_TEXT, min_size=1, max_size=30).filter(lambda s: s.strip())
_route = st.fixed_dictionaries(
    {
        "name": _names,
        "outcome": _names.filter(lambda n: n != NEEDS_REVIEW),
        "utterances": st.lists(_utterance, min_size=1, max_size=4, unique=True),
    },
    optional={
        "policy": st.text(_TEXT, max_size=40),
        "thresholds": st.fixed_dictionaries(
            {}, optional={"margin": st.floats(0.0, 2.0), "accept": st.floats(0.5, 1.0)}
        ),
    },
)


@settings(deadline=None, max_examples=150)
@given(
    routes=st.lists(_route, min_size=1, max_size=3, unique_by=lambda r: r["name"]),
    default=_names.filter(lambda n: n != NEEDS_REVIEW),
    description=st.text(_TEXT, max_size=40),
)
def test_dump_parse_round_trip_property(routes, default, description):
    data = {"name": "generated", "description": description, "default_outcome": default,
            "routes": copy.deepcopy(routes)}
    route_set = parse_route_set(data)
    back = parse_route_set(yaml.safe_load(dump_route_set(route_set)))
    assert back == route_set
    assert back.version == route_set.version


def test_dump_round_trips_nel_character():
    data = base_data()
    data["routes"][0]["utterances"].append("wait for it\x85here")
    route_set = parse_route_set(data)
    back = parse_route_set(yaml.safe_load(dump_route_set(route_set)))
    assert back.version == route_set.version


def test_dumped_yaml_is_loadable_from_a_file(tmp_path):
    route_set = parse_route_set(base_data())
    path = tmp_path / "dumped.yaml"
    path.write_text(dump_route_set(route_set), encoding="utf-8")
    assert load_route_set(path) == route_set
    assert isinstance(load_route_set(path), RouteSet)


# --------------------------------------------------------------------------- dataset leakage

_MODERATION_DATA = DATASETS / "openai-moderation" / "samples-1680.jsonl.gz"
_CLINC_DATA = DATASETS / "clinc150" / "data_full.json"
_NGRAM = 8


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


def _words(text: str) -> list[str]:
    return re.findall(r"\w+(?:'\w+)*", text.lower())


def _ngrams(text: str, n: int = _NGRAM) -> set[tuple[str, ...]]:
    words = _words(text)
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


@functools.cache
def _dataset_texts() -> tuple[str, ...]:
    # Missing data must fail this test, never skip it.
    assert _MODERATION_DATA.is_file(), f"dataset missing: {_MODERATION_DATA}"
    assert _CLINC_DATA.is_file(), f"dataset missing: {_CLINC_DATA}"
    texts: list[str] = []
    with gzip.open(_MODERATION_DATA, "rt", encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                texts.append(json.loads(line)["prompt"])
    clinc = json.loads(_CLINC_DATA.read_text(encoding="utf-8"))
    for split in ("train", "val", "test", "oos_train", "oos_val", "oos_test"):
        texts.extend(text for text, _intent in clinc[split])
    return tuple(texts)


@functools.cache
def _dataset_grams() -> frozenset[tuple[str, ...]]:
    grams: set[tuple[str, ...]] = set()
    for text in _dataset_texts():
        grams |= _ngrams(text)
    return frozenset(grams)


def _shipped_texts() -> list[tuple[str, str]]:
    shipped: list[tuple[str, str]] = []
    for path in sorted((REPO / "routes").glob("*.yaml")):  # every shipped route set
        route_set = load_route_set(path)
        for route in route_set.routes:
            shipped.extend((f"{path.name}:{route.name}", text) for text in route.utterances + route.prompts)
    demo = REPO / "routes" / "samples" / "demo-messages.jsonl"
    for number, line in enumerate(demo.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            shipped.append((f"demo-messages.jsonl:{number}", json.loads(line)["text"]))
    return shipped


def test_shipped_texts_share_nothing_with_the_datasets():
    dataset = _dataset_texts()
    # sanity: the files are the ones the README describes, not empty stand-ins
    assert len(dataset) == 1680 + 15_000 + 3_000 + 4_500 + 100 + 100 + 1_000
    shipped = _shipped_texts()
    assert len(shipped) > 300

    dataset_texts = {_normalise(text) for text in dataset}
    dataset_grams = _dataset_grams()

    equal = [(where, text) for where, text in shipped if _normalise(text) in dataset_texts]
    assert not equal, f"shipped texts equal to dataset texts: {equal[:10]}"
    overlapping = [
        (where, text, " ".join(sorted(_ngrams(text) & dataset_grams)[0]))
        for where, text in shipped
        if _ngrams(text) & dataset_grams
    ]
    assert not overlapping, f"shipped texts sharing an {_NGRAM}-word sequence: {overlapping[:10]}"


def test_leak_check_detects_a_copied_sequence():
    # The check itself must be able to fail: a text quoting 8 dataset words is caught.
    dataset = _dataset_texts()
    donor = next(text for text in dataset if len(_words(text)) >= 12)
    quoted = "as someone wrote: " + " ".join(_words(donor)[2:2 + _NGRAM]) + " !!"
    assert _ngrams(quoted) & _dataset_grams()
    assert _normalise("  " + donor.upper() + "\n") == _normalise(donor)
