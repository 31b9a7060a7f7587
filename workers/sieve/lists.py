"""Lists: term and pattern lists, and image hash lists, the files that decide known content.

A term list (YAML, ``schemas/term-list.schema.json``)::

    schema_version: 1
    name: slurs
    kind: block              # block: a hit adds ``route``; allow: its spans mask block hits
    route: hate              # block lists only: the route a hit adds (a route of the set)
    action: accept           # block lists: accept (a hit accepts ``route``, the default) or
                             # review (a hit puts ``route`` in its review band)
    entries:
      - {id: s1, term: "some slur"}             # words, matched at word boundaries, evasions folded
      - {id: p1, pattern: "k[i1]ll +all"}       # RE2 syntax: linear time, no lookaround

An image hash list::

    schema_version: 1
    name: known-images
    kind: image_hash
    route: illegal
    algorithm: phash         # 64-bit DCT perceptual hash (imagehash)
    max_distance: 8          # Hamming distance at which a hash matches
    entries:
      - {id: h1, hash: "d1c4b0e8f0f0e0c0", crops: [...]}   # crops: written by add-images

Everything is checked when the file loads (``ListError`` names file, entry and field):
a pattern RE2 cannot run (back references, lookaround) is refused then, never on the
hot path. Lists belong to their route set's version: ``content_bytes`` is what goes into
the version's hash.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

import re2
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sieve.contracts import SCHEMA_VERSION_DOC

# 2: action (review)
LIST_SCHEMA_VERSION = 2
ENTRY_ID = r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,127}$"
LIST_NAME = r"^[a-z0-9][a-z0-9_\-]{0,63}$"
HASH_BITS = {"phash": 64}


class ListError(ValueError):
    """A list file that cannot be used; the message names the file, the entry and the field."""


class TermEntry(BaseModel):
    """One entry of a term list: a term (words) or a pattern (RE2), never both."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=ENTRY_ID, description="Named in decisions and metrics when it fires.")
    term: str | None = Field(default=None, min_length=1, max_length=500)
    pattern: str | None = Field(default=None, min_length=1, max_length=2000)
    note: str | None = Field(default=None, description="Why the entry is there (for people).")

    @model_validator(mode="after")
    def _one_of(self) -> TermEntry:
        if (self.term is None) == (self.pattern is None):
            raise ValueError("an entry has exactly one of 'term' and 'pattern'")
        return self


class TermList(BaseModel):
    """A block list (a hit accepts ``route`` or holds it for review) or an allow list (masks block hits)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int = Field(default=LIST_SCHEMA_VERSION, ge=1, description=SCHEMA_VERSION_DOC)
    name: str = Field(pattern=LIST_NAME)
    kind: Literal["block", "allow"]
    route: str | None = Field(default=None, description="Block lists: the route a hit adds.")
    action: Literal["accept", "review"] | None = Field(default=None, description=(
        "Block lists: what a hit does. accept (the default): it accepts `route`. review: it puts "
        "`route` in its review band, so the event never gets the set's default outcome automatically."))
    description: str | None = None
    entries: list[TermEntry] = Field(min_length=1)

    @model_validator(mode="after")
    def _route_and_ids(self) -> TermList:
        if self.kind == "block" and self.route is None:
            raise ValueError("a block list names the route its hits add ('route')")
        if self.kind == "allow" and (self.route is not None or self.action is not None):
            raise ValueError("an allow list decides nothing by itself: it has no 'route' and no 'action'")
        _unique_ids([e.id for e in self.entries])
        return self


class HashEntry(BaseModel):
    """One known image: its perceptual hash in hex, and an id."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=ENTRY_ID)
    hash: str = Field(pattern=r"^[0-9a-f]+$", description="The perceptual hash, lowercase hex.")
    crops: list[str] = Field(
        default_factory=list,
        description="Hashes of the image cropped by up to 5% per side (`sieve lists add-images` "
        "writes them): a cropped copy matches one of them.")
    note: str | None = None

    def hashes(self) -> list[str]:
        """The image's hash and its crops' hashes."""
        return [self.hash, *self.crops]


class HashList(BaseModel):
    """Perceptual hashes of known images; an image within ``max_distance`` bits matches."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int = Field(default=LIST_SCHEMA_VERSION, ge=1, description=SCHEMA_VERSION_DOC)
    name: str = Field(pattern=LIST_NAME)
    kind: Literal["image_hash"]
    route: str
    description: str | None = None
    algorithm: Literal["phash"] = "phash"
    max_distance: int = Field(default=8, ge=0, le=32)
    entries: list[HashEntry] = Field(min_length=1)

    @model_validator(mode="after")
    def _hash_lengths(self) -> HashList:
        digits = HASH_BITS[self.algorithm] // 4
        for entry in self.entries:
            for value in entry.hashes():
                if len(value) != digits or value.strip("0123456789abcdef"):
                    raise ValueError(f"entry {entry.id!r}: a {self.algorithm} hash is {digits} lowercase "
                                     f"hex digits, not {value!r}")
        _unique_ids([e.id for e in self.entries])
        return self


AnyList = Annotated[TermList | HashList, Field(discriminator="kind")]


class _ListFile(BaseModel):
    """A list file of any kind (for validation by ``kind``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    list: AnyList


def _unique_ids(ids: list[str]) -> None:
    seen: set[str] = set()
    for entry_id in ids:
        if entry_id in seen:
            raise ValueError(f"entry id {entry_id!r} is used twice")
        seen.add(entry_id)


def parse_list(data: object, source: str) -> TermList | HashList:
    """A list from parsed YAML/JSON; ``ListError`` names ``source``, the entry and the field."""
    try:
        parsed = _ListFile.model_validate({"list": data}).list
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = [str(p) for p in err["loc"][1:] if str(p) not in ("block", "allow", "image_hash",
                                                                      "TermList", "HashList")]
            where = _entry_name(data, loc)
            problems.append(f"{where}: {err['msg']}")
        raise ListError(f"{source}: " + "; ".join(problems)) from None
    if isinstance(parsed, TermList):
        for entry in parsed.entries:
            if entry.pattern is not None:
                try:
                    compile_pattern(entry.pattern)
                except ValueError as exc:
                    raise ListError(f"{source}: entry {entry.id!r}: pattern refused: {exc}") from None
    return parsed


def re2_options() -> re2.Options:
    """RE2's options for list patterns: UTF-8, errors raised (not logged)."""
    options = re2.Options()
    options.log_errors = False
    return options


def compile_pattern(pattern: str) -> re2._Regexp:
    """A list pattern compiled by RE2 (linear time); ``ValueError`` for what RE2 cannot run."""
    try:
        return re2.compile(pattern, re2_options())
    except re2.error as exc:
        message = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise ValueError(f"{message} (RE2 runs no back references or lookaround)") from None


def _entry_name(data: object, loc: list[str]) -> str:
    """``entries.3.term`` -> ``entry 'p1' (line 4 of entries), field 'term'``."""
    if len(loc) >= 2 and loc[0] == "entries" and loc[1].isdigit() and isinstance(data, dict):
        index = int(loc[1])
        entries = data.get("entries")
        entry_id = None
        if isinstance(entries, list) and index < len(entries) and isinstance(entries[index], dict):
            entry_id = entries[index].get("id")
        field = ".".join(loc[2:]) or "entry"
        return f"entry {index + 1} ({entry_id!r}), field {field!r}"
    return "field " + repr(".".join(loc) or "list")


def load_list(path: str | Path) -> TermList | HashList:
    """Read and check a list file (YAML or JSON)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ListError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise ListError(f"{path}:{line} not YAML: {getattr(exc, 'problem', exc)}") from None
    return parse_list(data, str(path))


def load_lists(base_dir: Path | None, names: list[str], routes: set[str]) -> tuple[TermList | HashList, ...]:
    """A route set's list files, paths relative to ``base_dir``; each list's route must be in ``routes``."""
    loaded = []
    for name in names:
        path = Path(name) if base_dir is None else base_dir / name
        item = load_list(path)
        if item.route is not None and item.route not in routes:
            known = ", ".join(sorted(routes))
            raise ListError(f"{path}: route {item.route!r} is not a route of the set ({known})")
        loaded.append(item)
    seen: set[str] = set()
    for item in loaded:
        if item.name in seen:
            raise ListError(f"two lists are named {item.name!r}; list names are unique in a set")
        seen.add(item.name)
    return tuple(loaded)


def content_bytes(lists: list[TermList | HashList]) -> bytes:
    """What the lists contribute to their route set's version hash (order-independent)."""
    payload = sorted(json.dumps(item.model_dump(mode="json", exclude={"schema_version"}),
                                sort_keys=True) for item in lists)
    return json.dumps(payload).encode()
