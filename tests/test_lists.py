"""Term and pattern lists and image hash lists: loading, evasions, allow masks, perceptual hashes."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from sieve.flow.image_hashes import HashMatcher, crop_hashes, phash, phash_hex
from sieve.flow.lists import TermMatcher, fold
from sieve.lists import HashList, ListError, TermList, content_bytes, load_list, parse_list

BLOCK = {"name": "threats", "kind": "block", "route": "violence", "entries": [
    {"id": "kill", "term": "kill"},
    {"id": "hate-you", "term": "hate you"},
    {"id": "shit", "term": "shit"},
    {"id": "crime", "pattern": r"h[a4@]te\s+crimes?\b"},
]}
ALLOW = {"name": "safe-phrases", "kind": "allow", "entries": [
    {"id": "lights", "term": "kill the lights"},
    {"id": "process", "pattern": r"kill -9"},
]}


@pytest.fixture(scope="module")
def matcher() -> TermMatcher:
    return TermMatcher([parse_list(BLOCK, "block.yaml"), parse_list(ALLOW, "allow.yaml")])


def fired(matcher: TermMatcher, text: str) -> list[str]:
    return sorted(hit.entry for hit in matcher.match(text))


@pytest.mark.parametrize("text", [
    "I will kill you", "I will KILL you", "I will KIIIILLL you", "I will k1ll you", "I will ｋｉｌｌ you",
    "I will k\u200bi\u200bll you", "I will \u202ekill\u202c you", "I will k\u00adill you",
    "kill.", "(kill)", "KILL!!!",
])
def test_evasions_of_a_term_still_match(matcher: TermMatcher, text: str) -> None:
    assert fired(matcher, text) == ["kill"]


@pytest.mark.parametrize("text, expected", [
    ("i h4te y0u", ["hate-you"]),
    ("I HATE     YOU", ["hate-you"]),
    ("$hit happens", ["shit"]),
    ("sh!t", ["shit"]),
    ("the report on h@te crimes", ["crime"]),
])
def test_substitutions_and_patterns(matcher: TermMatcher, text: str, expected: list[str]) -> None:
    assert fired(matcher, text) == expected


@pytest.mark.parametrize("text", [
    "skills and killer apps",  # word boundaries: not inside other words
    "I hate when you are late",  # the two words must be adjacent
    "hatred of you",
    "shiitake mushrooms",
    "please kill the lights",  # allowed span masks the block term inside it
    "run kill -9 on the stuck process",
    "",
])
def test_no_hit_outside_word_boundaries_or_inside_an_allowed_span(matcher: TermMatcher, text: str) -> None:
    assert fired(matcher, text) == []


def test_an_allowed_span_masks_only_what_it_covers(matcher: TermMatcher) -> None:
    assert fired(matcher, "kill the lights, then I will kill you") == ["kill"]


def test_an_allow_list_alone_decides_nothing() -> None:
    allow_only = TermMatcher([parse_list(ALLOW, "allow.yaml")])
    assert allow_only.match("please kill the lights") == []


def test_hits_name_their_list_route_and_span(matcher: TermMatcher) -> None:
    [hit] = matcher.match("Well, I will KIIILL you")
    assert (hit.list, hit.entry, hit.route) == ("threats", "kill", "violence")
    assert hit.span is not None and fold("Well, I will KIIILL you")[slice(*hit.span)] == "kiiill"


def test_batches_keep_their_order_and_skip_image_events(matcher: TermMatcher) -> None:
    assert [[h.entry for h in hits] for hits in matcher.match_batch(["kill", None, "fine", "sh1t"])] == [
        ["kill"], [], [], ["shit"]]


# -- loading and bad input --------------------------------------------------------------------------

@pytest.mark.parametrize("data, message", [
    ({"name": "x", "kind": "block", "route": "r", "entries": [{"id": "p", "pattern": r"(a)\1"}]},
     "entry 'p': pattern refused: invalid escape sequence"),
    ({"name": "x", "kind": "block", "route": "r", "entries": [{"id": "p", "pattern": r"(?<!a)b"}]},
     "entry 'p': pattern refused"),
    ({"name": "x", "kind": "block", "entries": [{"id": "a", "term": "a"}]}, "names the route"),
    ({"name": "x", "kind": "allow", "route": "r", "entries": [{"id": "a", "term": "a"}]}, "no 'route'"),
    ({"name": "x", "kind": "block", "route": "r", "entries": [{"id": "a", "term": "a"}, {"id": "b"}]},
     "entry 2 ('b')"),
    ({"name": "x", "kind": "block", "route": "r",
      "entries": [{"id": "a", "term": "a"}, {"id": "a", "term": "b"}]},
     "entry id 'a' is used twice"),
    ({"name": "x", "kind": "image_hash", "route": "r", "entries": [{"id": "h", "hash": "abc"}]},
     "16 lowercase hex digits, not 'abc'"),
    ({"name": "x", "kind": "image_hash", "route": "r",
      "entries": [{"id": "h", "hash": "0" * 16, "crops": ["0" * 15]}]}, "not '000000000000000'"),
    ({"name": "x", "kind": "blocks", "entries": []}, "kind"),
])
def test_bad_lists_are_refused_naming_the_file_and_entry(data: dict, message: str) -> None:
    with pytest.raises(ListError, match="^bad.yaml: ") as info:
        parse_list(data, "bad.yaml")
    assert message in str(info.value)


def test_a_malformed_file_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nkind: block\nentries:\n  - {id: a, term: [unclosed\n")
    with pytest.raises(ListError, match=r"broken.yaml: line \d+ not YAML"):
        load_list(path)
    with pytest.raises(ListError, match="cannot read"):
        load_list(tmp_path / "missing.yaml")


def test_list_content_is_what_the_version_hashes() -> None:
    block, allow = parse_list(BLOCK, "b"), parse_list(ALLOW, "a")
    assert content_bytes([block, allow]) == content_bytes([allow, block])
    changed = parse_list({**BLOCK, "entries": [*BLOCK["entries"], {"id": "new", "term": "new"}]}, "b")
    assert content_bytes([changed, allow]) != content_bytes([block, allow])
    assert isinstance(block, TermList) and isinstance(parse_list(
        {"name": "h", "kind": "image_hash", "route": "r", "entries": [{"id": "h", "hash": "0" * 16}]}, "h"),
        HashList)


# -- image hashes ------------------------------------------------------------------------------------

def picture(seed: int, size: tuple[int, int] = (320, 240)) -> Image.Image:
    """A generated picture: a background and a dozen coloured ellipses."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", size, tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x, y = int(rng.integers(0, size[0] - 20)), int(rng.integers(0, size[1] - 20))
        w, h = int(rng.integers(10, 150)), int(rng.integers(10, 150))
        draw.ellipse([x, y, x + w, y + h], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return image


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue()))


def crop(image: Image.Image, left: float, top: float, right: float, bottom: float) -> Image.Image:
    w, h = image.size
    return image.crop((int(w * left), int(h * top), int(w * (1 - right)), int(h * (1 - bottom))))


def known(images: dict[str, Image.Image]) -> HashMatcher:
    entries = [{"id": name, "hash": phash_hex(image), "crops": crop_hashes(image)}
               for name, image in images.items()]
    hash_list = parse_list({"name": "known", "kind": "image_hash", "route": "illegal",
                            "entries": entries}, "known.yaml")
    assert isinstance(hash_list, HashList)
    return HashMatcher([hash_list])


def test_copies_match_and_other_images_do_not() -> None:
    originals = {f"img{i}": picture(i) for i in range(6)}
    matcher = known(originals)
    rng = np.random.default_rng(7)
    for name, image in originals.items():
        copies = [jpeg(image, 50), image.resize((160, 120)), image.resize((640, 480)),
                  crop(image, *rng.uniform(0, 0.05, 4)), crop(image, 0.05, 0.05, 0.05, 0.05),
                  crop(image, 0.05, 0, 0, 0), jpeg(crop(image, 0.03, 0.01, 0.0, 0.04).resize((200, 150)), 60)]
        for copy in copies:
            [hit] = matcher.match(phash(copy))
            assert (hit.entry, hit.route) == (name, "illegal") and hit.distance is not None
    strangers = [picture(seed) for seed in range(1000, 1200)]
    assert sum(bool(hits) for hits in matcher.match_batch(strangers)) == 0


def test_a_photo_like_image_and_its_copies() -> None:
    # Smooth gradients with noise, closer to a photograph than flat shapes.
    rng = np.random.default_rng(3)
    y, x = np.mgrid[0:300, 0:400]
    base = np.stack([np.sin(x / 37.0) * 90 + 128, np.cos(y / 23.0) * 90 + 128, (x + y) / 700 * 255], -1)
    photo = Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8))
    matcher = known({"photo": photo})
    for copy in (jpeg(photo, 50), photo.resize((200, 150)), crop(photo, 0.04, 0.02, 0.05, 0.01)):
        assert [h.entry for h in matcher.match(phash(copy))] == ["photo"]
    assert matcher.match(phash(photo.transpose(Image.Transpose.FLIP_TOP_BOTTOM))) == []


# -- the command line ---------------------------------------------------------------------------------

def test_add_images_hashes_a_folder_and_check_loads_it(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from sieve.cli import app

    folder = tmp_path / "known"
    (folder / "sub").mkdir(parents=True)
    picture(1).save(folder / "one.png")
    picture(2).save(folder / "sub" / "two.jpg", quality=90)
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "lists" / "known.yaml"
    runner = CliRunner()
    done = runner.invoke(app, ["lists", "add-images", str(folder), "--out", str(out), "--route", "illegal"])
    assert done.exit_code == 0, done.output
    # the console wraps its lines at 80 columns, where the path happens to end
    assert "2 images added, 1 skipped" in " ".join(done.output.split())
    hash_list = load_list(out)
    assert isinstance(hash_list, HashList) and len(hash_list.entries) == 2
    assert all(len(e.crops) >= 40 for e in hash_list.entries)
    assert b"PNG" not in out.read_bytes() and "one.png" in out.read_text()  # hashes, never pixels
    again = runner.invoke(app, ["lists", "add-images", str(folder), "--out", str(out)])
    assert again.exit_code == 0 and "0 images added" in " ".join(again.output.split())
    [hit] = HashMatcher([hash_list]).match(phash(jpeg(picture(2).resize((160, 120)), 50)))
    assert hit.list == "known"
    checked = runner.invoke(app, ["lists", "check", str(out)])
    assert checked.exit_code == 0
    assert "image_hash list 'known', 2 entries -> route illegal" in " ".join(checked.output.split())
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nkind: block\nroute: r\nentries:\n  - {id: p, pattern: '(?=x)'}\n")
    refused = runner.invoke(app, ["lists", "check", str(bad)])
    assert refused.exit_code == 2
    assert "bad.yaml: entry 'p': pattern refused" in " ".join(refused.output.split())
    new = runner.invoke(app, ["lists", "add-images", str(folder), "--out", str(tmp_path / "n.yaml")])
    assert new.exit_code == 2 and "--route" in new.output


def test_a_letter_repeated_less_than_in_the_term_is_another_word() -> None:
    matcher = TermMatcher([parse_list({"name": "p", "kind": "block", "route": "r", "entries": [
        {"id": "ass", "term": "ass"}, {"id": "hell", "term": "go to hell"}]}, "p")])
    assert fired(matcher, "as soon as possible") == []
    assert fired(matcher, "go to hel") == []
    assert fired(matcher, "what an a$$") == ["ass"]
    assert fired(matcher, "ASSSS") == ["ass"]
    assert fired(matcher, "gooo to HELLLL") == ["hell"]


def test_a_doubled_letter_is_spelling_and_three_are_a_stretch() -> None:
    matcher = TermMatcher([parse_list({"name": "p", "kind": "block", "route": "r", "entries": [
        {"id": "god", "term": "god"}, {"id": "kill", "term": "kill"}]}, "p")])
    assert fired(matcher, "a good recipe for banana bread") == []  # good is a word, not a stretched god
    assert fired(matcher, "oh my gooood") == ["god"]
    assert fired(matcher, "I will kiiill you") == ["kill"]
    assert fired(matcher, "I will kiill you") == []  # two i's: neither the term nor a stretch of it


# -- lists belong to their route set's version ---------------------------------------------------------

ROUTES = """\
name: chat
default_outcome: clean
lists: [lists/threats.yaml]
routes:
  - {name: violence, outcome: violating, utterances: ["I will hurt you", "you will pay for this"]}
  - {name: smalltalk, outcome: clean, utterances: ["hello there", "how are you"]}
"""


def route_file(tmp_path: Path, block: dict = BLOCK, routes: str = ROUTES) -> Path:
    import yaml

    (tmp_path / "lists").mkdir(exist_ok=True)
    (tmp_path / "lists" / "threats.yaml").write_text(yaml.safe_dump(block))
    path = tmp_path / "chat.yaml"
    path.write_text(routes)
    return path


def test_a_route_sets_lists_load_with_it_and_change_its_version(tmp_path: Path) -> None:
    from sieve.routeset import load_route_set

    route_set = load_route_set(route_file(tmp_path))
    [loaded] = route_set.loaded_lists
    assert isinstance(loaded, TermList) and loaded.name == "threats"
    changed = {**BLOCK, "entries": [*BLOCK["entries"], {"id": "more", "term": "more"}]}
    assert load_route_set(route_file(tmp_path, changed)).version != route_set.version
    without = load_route_set(route_file(tmp_path, routes=ROUTES.replace("lists: [lists/threats.yaml]\n", "")))
    assert without.version != route_set.version and without.loaded_lists == ()
    assert "lists" not in without.model_dump()  # a set without lists dumps and hashes as before


def test_a_list_for_an_unknown_route_or_a_missing_file_is_refused_at_load(tmp_path: Path) -> None:
    from sieve.routeset import RouteSetError, load_route_set

    with pytest.raises(RouteSetError, match=r"chat.yaml: field 'lists': .*threats.yaml: route 'violence2' "
                                            r"is not a route of the set"):
        load_route_set(route_file(tmp_path, {**BLOCK, "route": "violence2"}))
    with pytest.raises(RouteSetError, match="field 'lists': .*missing.yaml: cannot read"):
        load_route_set(route_file(tmp_path, routes=ROUTES.replace("threats.yaml", "missing.yaml")))


def test_the_store_keeps_a_versions_lists_and_refuses_them_tampered(tmp_path: Path) -> None:
    from sieve.encoders.trivial import TrivialEncoder
    from sieve.routeset import load_route_set
    from sieve.settings import QdrantSettings
    from sieve.store.qdrant import RouteStore
    from sieve.store.versions import route_set_of, version_record

    route_set = load_route_set(route_file(tmp_path))
    store = RouteStore(QdrantSettings(path=tmp_path / "q", lock_wait_s=5))
    encoder = TrivialEncoder()
    store.sync(route_set, encoder)
    index = store.load("chat", encoder.id)
    assert index.version == route_set.version
    assert index.route_set.loaded_lists == route_set.loaded_lists
    record = version_record(route_set, encoder.id, "text", 4)
    record["lists"][0]["entries"][0]["term"] = "tampered"
    with pytest.raises(Exception, match="hashes to version"):
        route_set_of(record)
