"""Bad events for the fuzz run (load-tests/fuzz.py), generated deterministically from a seed.

Each :class:`FuzzEvent` is one Kafka record (key and value bytes) tagged with its ``kind``
and what Sieve should do with it: ``decided`` (a valid, if odd, event), ``dead_letter`` (it
must be refused, with a reason) or ``either`` (input whose fate is the product's choice, e.g.
JSON's ``NaN``). Every record is keyed by its fuzz id (``<run>-<i>``) except the
``random_bytes_no_key`` kind, which the checker finds by partition and offset; every JSON
event that could be decided carries the fuzz id in ``metadata.fuzz_id``.

    events = make_fuzz_events(1000, "fz", seed=7, image_base="http://127.0.0.2:8000", closed_port=9)
"""

from __future__ import annotations

import base64
import json
import random
from collections.abc import Callable
from dataclasses import dataclass

from fuzz_images import SVG, gif_screen_bomb, lying_png, small_png, zlib_bomb_png

# Limits of the fuzz topology (fuzz.py puts them in the topology's ``limits``).
MAX_TEXT_CHARS = 8000
MAX_EVENT_BYTES = 262_144
FLOOD = 400  # events in the contiguous block of surrogate_flood events

WORDS = (
    "the parcel never arrived and nobody answers", "how do I reset my password",
    "selling a bike, barely used", "you are all idiots and I will find you", "what is the weather in Lisbon",
    "refund please", "buy cheap pills online now",
)
ZERO_WIDTH = "\u200b\u200c\u200d\u2060\ufeff\u00ad\u180e"
BIDI = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c"


@dataclass(frozen=True)
class FuzzEvent:
    """One generated record: its fuzz id, kind, expectation, key and value."""

    id: str
    kind: str
    expect: str  # "decided", "dead_letter" or "either"
    key: bytes | None
    value: bytes


@dataclass(frozen=True)
class _Ctx:
    rng: random.Random
    fid: str
    kind: str
    image_base: str
    closed_port: int

    def base(self, **fields: object) -> dict:
        event: dict = {
            "id": self.fid, "text": self.rng.choice(WORDS),
            "metadata": {"fuzz_id": self.fid, "fuzz_kind": self.kind},
        }
        event.update(fields)
        return event

    def image(self, **fields: object) -> dict:
        return {
            "id": self.fid, "modality": "image", "metadata": {"fuzz_id": self.fid, "fuzz_kind": self.kind},
            **fields,
        }


def _dumps(event: object, **options: object) -> bytes:
    return json.dumps(event, **options).encode()  # type: ignore[arg-type]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# -- generators: each returns (value, expect) --------------------------------------------------


def random_bytes(c: _Ctx) -> tuple[bytes, str]:
    size = c.rng.choice((1, 2, 7, 64, 500, 4000))
    return bytes(c.rng.randrange(256) for _ in range(size)), "dead_letter"


def empty(c: _Ctx) -> tuple[bytes, str]:
    return b"", "dead_letter"


def invalid_utf8(c: _Ctx) -> tuple[bytes, str]:
    raw = _dumps(c.base(text="caf\u00e9 " * 5))
    bad = c.rng.choice((b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf"))
    at = raw.index(b"caf")  # inside the text: a raw lone surrogate, overlong, out-of-range bytes
    return raw[:at] + bad + raw[at:], "dead_letter"


def truncated_json(c: _Ctx) -> tuple[bytes, str]:
    raw = _dumps(c.base(text=" ".join(c.rng.choice(WORDS) for _ in range(5))))
    return raw[: c.rng.randrange(1, len(raw) - 1)], "dead_letter"


def deep_nesting(c: _Ctx) -> tuple[bytes, str]:
    depth = c.rng.choice((65, 100, 1000, 20_000, 50_000))  # under MAX_EVENT_BYTES
    opener, closer = c.rng.choice((("[", "]"), ('{"a":', "}")))
    nested = opener * depth + "1" + closer * depth
    where = c.rng.choice(("top", "metadata", "unclosed"))
    if where == "top":
        return nested.encode(), "dead_letter"
    if where == "unclosed":
        return (opener * depth).encode(), "dead_letter"
    raw = _dumps(c.base(metadata={"fuzz_id": c.fid, "deep": 0}))
    return raw.replace(b'"deep": 0', b'"deep": ' + nested.encode()), "dead_letter"


def nested_ok(c: _Ctx) -> tuple[bytes, str]:
    depth = c.rng.randrange(2, 60)
    raw = _dumps(c.base(metadata={"fuzz_id": c.fid, "deep": 0}))
    return raw.replace(b'"deep": 0', b'"deep": ' + b"[" * depth + b"1" + b"]" * depth), "decided"


def not_object(c: _Ctx) -> tuple[bytes, str]:
    return c.rng.choice((
        b"[]", b"null", b"true", b"42", b'"text"', b'[{"id": "x"}]', b"{}", b" ", b"1e999",
        b'{"id": "x"} {"id": "y"}',
    )), "dead_letter"


def wrong_types(c: _Ctx) -> tuple[bytes, str]:
    field, value = c.rng.choice((
        ("id", 42), ("id", None), ("id", ["a"]), ("id", ""), ("id", {"x": 1}), ("text", 7),
        ("text", None), ("text", ["a", "b"]), ("text", {"t": "x"}), ("modality", "video"),
        ("modality", 1), ("metadata", "not a map"), ("metadata", [1, 2]), ("tenant", 12),
        ("tenant", True), ("created_at", "yesterday"), ("created_at", [2024]), ("schema_version", 0),
        ("schema_version", "one"), ("schema_version", -3), ("image_b64", 5), ("image_uri", 5),
    ))
    return _dumps(c.base(**{field: value})), "dead_letter"


def missing_fields(c: _Ctx) -> tuple[bytes, str]:
    event = c.base()
    choice = c.rng.randrange(5)
    if choice == 0:
        del event["id"]
    elif choice == 1:
        del event["text"]
    elif choice == 2:
        event["image_uri"] = "http://example.invalid/x.png"  # a text event with an image field
    elif choice == 3:
        event = c.image(image_b64=_b64(small_png(1)), image_uri=c.image_base + "/ok.png")  # both
    else:
        event = c.image()  # neither
    return _dumps(event), "dead_letter"


def extra_fields(c: _Ctx) -> tuple[bytes, str]:
    return _dumps(
        c.base(**{c.rng.choice(("txt", "Text", "__proto__", "constructor", "id ")): "x"})
    ), "dead_letter"


def huge_text(c: _Ctx) -> tuple[bytes, str]:
    size = c.rng.choice((MAX_TEXT_CHARS + 1, 20_000, 60_000))
    return _dumps(c.base(text="ab " * (size // 3 + 1))), "dead_letter"


def text_at_limit(c: _Ctx) -> tuple[bytes, str]:
    return _dumps(c.base(text="\u00e9" * MAX_TEXT_CHARS)), "decided"  # 8000 characters


def huge_event(c: _Ctx) -> tuple[bytes, str]:
    blob = "x" * (MAX_EVENT_BYTES + c.rng.randrange(1, 120_000))
    return _dumps(c.base(metadata={"fuzz_id": c.fid, "blob": blob})), "dead_letter"


def huge_id(c: _Ctx) -> tuple[bytes, str]:
    field = c.rng.choice(("id", "tenant"))
    return _dumps(c.base(**{field: c.fid + "x" * 300})), "dead_letter"


def huge_metadata(c: _Ctx) -> tuple[bytes, str]:
    metadata = {"fuzz_id": c.fid} | {f"k{i}": i for i in range(c.rng.choice((1000, 10_000)))}
    return _dumps(c.base(metadata=metadata)), "decided"


def big_numbers(c: _Ctx) -> tuple[bytes, str]:
    digits = c.rng.choice((400, 5000, 100_000))
    raw = _dumps(c.base(metadata={"fuzz_id": c.fid, "n": 0}))
    return raw.replace(b'"n": 0', b'"n": ' + b"9" * digits), "either"


def lone_surrogate(c: _Ctx) -> tuple[bytes, str]:
    s = c.rng.choice(("\ud800", "\udfff", "\udc00x", "a\ud83d"))  # high, low, reversed pair halves
    where = c.rng.choice(("text", "id", "tenant", "metadata", "metadata_key"))
    if where == "metadata":
        event = c.base(metadata={"fuzz_id": c.fid, "note": s})
    elif where == "metadata_key":
        event = c.base(metadata={"fuzz_id": c.fid, s: 1})
    elif where == "id":
        event = c.base(id=c.fid + s)
    else:
        event = c.base(**{where: "hello " + s})
    return _dumps(event), "dead_letter"  # json.dumps escapes them: \ud800


def surrogate_flood(c: _Ctx) -> tuple[bytes, str]:
    """A lone surrogate in a metadata key: sent as one contiguous block (``FLOOD`` events), so whole
    batches are made of it: bad input, which must not pass for a fault of the worker."""
    return _dumps(c.base(metadata={"fuzz_id": c.fid, "\udc80" + c.fid: 1})), "dead_letter"


def paired_surrogates(c: _Ctx) -> tuple[bytes, str]:
    return _dumps(c.base(text="emoji \U0001f600 \U0001f4a9 ok")), "decided"  # escaped as valid pairs


def zero_width(c: _Ctx) -> tuple[bytes, str]:
    mode = c.rng.randrange(3)
    if mode == 0:
        text = "".join(c.rng.choice(ZERO_WIDTH) for _ in range(c.rng.randrange(1, 50)))  # nothing visible
    else:
        text = c.rng.choice(ZERO_WIDTH).join(c.rng.choice(WORDS))
    return _dumps(c.base(text=text, tenant="t\u200bx"), ensure_ascii=mode == 2), "decided"


def bidi(c: _Ctx) -> tuple[bytes, str]:
    text = c.rng.choice(BIDI) + c.rng.choice(WORDS)[::-1] + "\u202e" + "gnp.exe" + "\u05e9\u05dc\u05d5\u05dd"
    return _dumps(c.base(id=c.fid, text=text, tenant="\u202eevil"), ensure_ascii=False), "decided"


def control_chars(c: _Ctx) -> tuple[bytes, str]:
    text = "a\u0000b\u0007c\u001b[31mred\u001b[0m\r\n\u0085\u2028\u2029" + c.rng.choice(WORDS)
    return _dumps(c.base(text=text)), "decided"


def whitespace_text(c: _Ctx) -> tuple[bytes, str]:
    return _dumps(
        c.base(text=c.rng.choice(("", " ", "\n\t \r", "\u3000\u2003", "\u00a0" * 9)))
    ), "dead_letter"


def nonstandard_json(c: _Ctx) -> tuple[bytes, str]:
    raw = _dumps(c.base(metadata={"fuzz_id": c.fid, "x": 1}))
    mode = c.rng.randrange(7)
    if mode == 0:
        return raw.replace(b'"x": 1', b'"x": NaN'), "either"
    if mode == 1:
        return raw.replace(b'"x": 1', b'"x": -Infinity'), "either"
    if mode == 2:  # a duplicate key: the last one wins in both parsers
        return raw.replace(b'"x": 1', b'"x": 1, "x": 2'), "either"
    if mode == 3:
        return raw[:-1] + b",}", "dead_letter"  # trailing comma
    if mode == 4:
        return b"\xef\xbb\xbf" + raw, "either"  # a UTF-8 byte order mark
    if mode == 5:
        return b"/* c */" + raw, "dead_letter"
    return b" \n\t" + raw + b"\n\n", "decided"


def weird_dates(c: _Ctx) -> tuple[bytes, str]:
    value = c.rng.choice((
        "0001-01-01T00:00:00Z", "9999-12-31T23:59:59+14:00", 1e20, -1, 0, "2024-02-30T00:00:00Z",
        "2024-01-01T25:61:00", "2024-01-01",
    ))
    return _dumps(c.base(created_at=value)), "either"


def valid_text(c: _Ctx) -> tuple[bytes, str]:
    return _dumps(c.base(tenant=f"t{c.rng.randrange(5)}", created_at="2026-01-01T00:00:00Z")), "decided"


# -- images ----------------------------------------------------------------------------------


def image_valid(c: _Ctx) -> tuple[bytes, str]:
    if c.rng.random() < 0.5:
        return _dumps(c.image(image_b64=_b64(small_png(c.rng.randrange(1000))))), "decided"
    return _dumps(c.image(image_uri=f"{c.image_base}/ok.png?{c.fid}")), "decided"


def image_bad_base64(c: _Ctx) -> tuple[bytes, str]:
    return _dumps(
        c.image(image_b64=c.rng.choice(("!!!", "abc", "====", "\u00e9\u00e9\u00e9\u00e9", "")))
    ), "dead_letter"


def image_not_image(c: _Ctx) -> tuple[bytes, str]:
    data = c.rng.choice((
        bytes(c.rng.randrange(256) for _ in range(300)), b"GIF89a", b"\x89PNG\r\n\x1a\n",
        small_png(3)[: c.rng.randrange(8, 60)], b"%PDF-1.4 hello", b"\xff\xd8\xff\xe0",
    ))
    return _dumps(c.image(image_b64=_b64(data))), "dead_letter"


def image_bomb(c: _Ctx) -> tuple[bytes, str]:
    data = c.rng.choice((lying_png(), zlib_bomb_png(), gif_screen_bomb()))
    return _dumps(c.image(image_b64=_b64(data))), "dead_letter"


def image_svg(c: _Ctx) -> tuple[bytes, str]:
    if c.rng.random() < 0.5:
        return _dumps(c.image(image_b64=_b64(SVG))), "dead_letter"
    return _dumps(c.image(image_uri=f"{c.image_base}/image.svg")), "dead_letter"


def image_data_url(c: _Ctx) -> tuple[bytes, str]:
    uri = c.rng.choice((
        f"data:image/png;base64,{_b64(small_png(2))}", "data:image/svg+xml,<svg/>", "file:///etc/passwd",
        "ftp://127.0.0.1/x.png", "gopher://127.0.0.1:6379/_INFO", "javascript:alert(1)",
        "//no-scheme/x.png", "http:///x.png", "",
    ))
    return _dumps(c.image(image_uri=uri)), "dead_letter"


def image_private_url(c: _Ctx) -> tuple[bytes, str]:
    host = c.rng.choice((
        "127.0.0.1", "10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254", "0.0.0.0", "[::1]",
        "[fe80::1]", "[fc00::1]", "100.64.0.1", "224.0.0.1", "255.255.255.255",
    ))
    return _dumps(c.image(image_uri=f"http://{host}/latest/meta-data/")), "dead_letter"


def image_rebinding_url(c: _Ctx) -> tuple[bytes, str]:
    # Names and spellings that resolve to loopback only when looked up: the guard must resolve them.
    host = c.rng.choice((
        "localhost", "LOCALHOST.", "2130706433", "0x7f000001", "0x7f.1", "127.1", "017700000001",
        "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "127.000.000.001", "[0:0:0:0:0:ffff:127.0.0.1]", "0",
    ))
    return _dumps(c.image(image_uri=f"http://{host}:{c.closed_port}/x.png")), "dead_letter"


def image_closed_port(c: _Ctx) -> tuple[bytes, str]:
    host = c.image_base.rsplit(":", 1)[0]
    return _dumps(c.image(image_uri=f"{host}:{c.closed_port}/x.png")), "dead_letter"


def image_served(c: _Ctx) -> tuple[bytes, str]:
    path = c.rng.choice((
        "/bomb.png", "/zbomb.png", "/redirect-private", "/redirect-loop", "/huge", "/endless",
        "/missing.png",
    ))
    return _dumps(c.image(image_uri=c.image_base + path)), "dead_letter"


def image_slow(c: _Ctx) -> tuple[bytes, str]:
    return _dumps(c.image(image_uri=c.image_base + "/slow.png")), "dead_letter"


Gen = Callable[[_Ctx], tuple[bytes, str]]
# kind -> (generator, weight). Images are about an eighth of the events.
KINDS: dict[str, tuple[Gen, float]] = {
    "random_bytes": (random_bytes, 7), "random_bytes_no_key": (random_bytes, 1), "empty": (empty, 1),
    "invalid_utf8": (invalid_utf8, 4), "truncated_json": (truncated_json, 7),
    "deep_nesting": (deep_nesting, 4), "nested_ok": (nested_ok, 2), "not_object": (not_object, 3),
    "wrong_types": (wrong_types, 9), "missing_fields": (missing_fields, 4), "extra_fields": (extra_fields, 2),
    "huge_text": (huge_text, 3), "text_at_limit": (text_at_limit, 1), "huge_event": (huge_event, 0.5),
    "huge_id": (huge_id, 2), "huge_metadata": (huge_metadata, 1), "big_numbers": (big_numbers, 2),
    "lone_surrogate": (lone_surrogate, 5), "paired_surrogates": (paired_surrogates, 1),
    "zero_width": (zero_width, 5), "bidi": (bidi, 5), "control_chars": (control_chars, 3),
    "whitespace_text": (whitespace_text, 2), "nonstandard_json": (nonstandard_json, 4),
    "weird_dates": (weird_dates, 2), "valid_text": (valid_text, 6), "image_valid": (image_valid, 1.5),
    "image_bad_base64": (image_bad_base64, 1), "image_not_image": (image_not_image, 1),
    "image_bomb": (image_bomb, 1.5), "image_svg": (image_svg, 1), "image_data_url": (image_data_url, 1.5),
    "image_private_url": (image_private_url, 1.5), "image_rebinding_url": (image_rebinding_url, 1.5),
    "image_closed_port": (image_closed_port, 0.5), "image_served": (image_served, 2),
    "image_slow": (image_slow, 0.1),
}


def make_fuzz_events(
    count: int, run: str, *, seed: int, image_base: str, closed_port: int
) -> list[FuzzEvent]:
    """``count`` fuzz events with ids ``<run>-<i>``, kinds drawn by weight from ``seed``.

    ``image_base`` is the fuzz image server (fuzz_images.ImageServer), ``closed_port`` a port
    nothing listens on. The first events cover every kind once, so a short run has them all;
    from the middle on comes one block of ``surrogate_flood`` events (``FLOOD``, at most a tenth).
    """
    rng = random.Random(seed)
    names = list(KINDS)
    weights = [KINDS[k][1] for k in names]
    flood = range(count // 2, count // 2 + min(FLOOD, count // 10))
    events = []
    for i in range(count):
        if i in flood:
            kind = "surrogate_flood"
        else:
            kind = names[i] if i < len(names) else rng.choices(names, weights)[0]
        fid = f"{run}-{i}"
        make = surrogate_flood if kind == "surrogate_flood" else KINDS[kind][0]
        value, expect = make(_Ctx(random.Random(rng.random()), fid, kind, image_base, closed_port))
        key = None if kind == "random_bytes_no_key" else fid.encode()
        events.append(FuzzEvent(fid, kind, expect, key, value))
    return events
