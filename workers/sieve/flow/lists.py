"""Term and pattern lists, matched over a batch of texts (pure; no model, no I/O).

What each kind of entry sees:

* **Patterns** (RE2) run on the *folded* text: Unicode NFKC, case-folded, invisible format
  characters (zero-width, bidi controls, soft hyphens, tag characters) removed. A pattern
  writes its own character classes for substitutions (``h[a4@]te``).
* **Terms** are matched word by word, at word boundaries, on the *normalised* text: the
  folded text with common character substitutions undone where they sit against a letter
  (``h4te``, ``$hit``, ``sh!t``; sentence punctuation after a word is left alone), and a
  letter repeated at least as often as in the term (``haaate`` matches ``hate``, ``KIIILL``
  matches ``kill``, but ``as`` does not match ``ass``). A term is normalised the same way.

Allow-list entries mask the span they match: a block hit lying inside an allowed span does
not count (a block term inside an allowed brand name or place name). An allow entry never
decides anything by itself. Spans are in the folded text.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import re
import string
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import re2

from sieve.lists import TermList, compile_pattern, re2_options

# Look-alike characters read as the letter they stand for, where they touch a letter.
SUBSTITUTIONS = {"4": "a", "@": "a", "3": "e", "1": "i", "!": "i", "0": "o", "$": "s",
                 "5": "s", "7": "t", "+": "t", "8": "b", "9": "g"}
_WORD = re.compile(r"[^\W_]+")


@dataclass(frozen=True)
class ListHit:
    """One list entry that fired on an event."""

    list: str
    entry: str
    route: str | None  # the route a block or review hit adds; None for an allow hit
    span: tuple[int, int] | None = None  # a term or pattern hit: where, in the folded text
    distance: int | None = None  # an image hash hit: the Hamming distance in bits
    action: str = "accept"  # a block or image hash hit: accept; a block list with action review: review


@functools.cache
def _invisible() -> re.Pattern[str]:
    """The format characters (category Cf) ``fold`` deletes: zero-width, bidi, soft hyphen, tags."""
    codes = [c for c in [*range(0x10000), *range(0xE0000, 0xE0080)] if unicodedata.category(chr(c)) == "Cf"]
    ranges: list[list[int]] = []
    for code in codes:  # as ranges: a short character class is a fast one
        if ranges and ranges[-1][1] == code - 1:
            ranges[-1][1] = code
        else:
            ranges.append([code, code])
    return re.compile("[" + "".join(f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in ranges) + "]")


def fold(text: str) -> str:
    """NFKC, case-folded, invisible format characters removed (what patterns see)."""
    if text.isascii():
        return text.lower()
    text = _invisible().sub("", unicodedata.normalize("NFKC", text)).casefold()
    return unicodedata.normalize("NFKC", text)


_SUBSTITUTABLE = re.compile("[" + re.escape("".join(SUBSTITUTIONS)) + "]+")
# ASCII punctuation as spaces: an ASCII text's words are then ``str.split``'s (fast path).
_PUNCTUATION = str.maketrans({c: " " for c in string.punctuation})
_SUBSTITUTE = str.maketrans(SUBSTITUTIONS)
_REPEATED = re.compile(r"([^\W\d_])\1+")


@dataclass(frozen=True)
class Normalised:
    """The text terms are matched in, and the way back to offsets in the folded text."""

    text: str  # substituted, runs of a repeated letter collapsed
    substituted: str  # the folded text with substitutions undone (same length, same offsets)

    @functools.cached_property
    def runs(self) -> tuple[tuple[int, int, int], ...]:
        """Each collapsed run of a repeated letter, as computed for an event with a candidate hit.

        Its index in ``text``, its end in the folded text, and how many letters were removed up
        to and including it.
        """
        runs = []
        removed = 0
        for run in _REPEATED.finditer(self.substituted):
            i, j = run.span()
            runs.append((i - removed, j, removed + j - i - 1))
            removed += j - i - 1
        return tuple(runs)

    def folded_span(self, start: int, end: int) -> tuple[int, int]:
        """The folded-text span of ``text[start:end]``."""
        runs = self.runs
        index = [run[0] for run in runs]
        before = bisect.bisect_left(index, start)
        folded_start = start + (runs[before - 1][2] if before else 0)
        last = bisect.bisect_right(index, end - 1) - 1
        if last >= 0 and runs[last][0] == end - 1:
            return folded_start, runs[last][1]
        return folded_start, end + (runs[last][2] if last >= 0 else 0)


def _undo_substitutions(folded: str) -> str:
    pieces = []
    at = 0
    for run in _SUBSTITUTABLE.finditer(folded):
        i, j = run.span()
        before = i > 0 and folded[i - 1].isalpha()
        after = j < len(folded) and folded[j].isalpha()
        if after or (before and run.group().strip("!")):  # "!" after a word is punctuation
            pieces += [folded[at:i], run.group().translate(_SUBSTITUTE)]
            at = j
    return "".join(pieces) + folded[at:] if pieces else folded


def normalise(folded: str) -> Normalised:
    """Substitutions undone where they touch a letter, runs of a repeated letter collapsed."""
    substituted = _undo_substitutions(folded)
    return Normalised(_REPEATED.sub(r"\1", substituted), substituted)


Profile = tuple[tuple[str, int], ...]


def letter_runs(text: str) -> Profile:
    """The letters of ``text`` as (letter, how many times in a row): ``kiill`` -> k1 i2 l2."""
    letters = (c for c in text if c.isalpha())
    return tuple((letter, len(list(run))) for letter, run in itertools.groupby(letters))


def term_words(term: str) -> tuple[tuple[str, ...], Profile]:
    """A term as the word sequence it matches (letters collapsed) and its letter runs.

    A text matches where its words are the same once collapsed *and* each run of a letter is
    as long as the term's or stretched past it to three or more: ``kiiill`` matches ``kill``;
    ``as`` does not match ``ass``, nor ``good`` ``god`` (a doubled letter is spelling).
    """
    normalised = normalise(fold(term))
    return tuple(_WORD.findall(normalised.text)), letter_runs(normalised.substituted)


def _words(text: str) -> set[str]:
    """The distinct words of a text (letters and digits)."""
    if text.isascii():
        return set(text.translate(_PUNCTUATION).replace("_", " ").split())
    return set(_WORD.findall(text))


STRETCHED = 3  # a run of a letter this long stands for any shorter one: ``kiiill`` is ``kill``


def _long_enough(found: Profile, wanted: Profile) -> bool:
    """Each run as long as the term's, or stretched (3 or more): ``good`` is not ``god``, ``goood`` is."""
    return len(found) == len(wanted) and all(
        a == b and (m == n or m >= max(n, STRETCHED)) for (a, m), (b, n) in zip(found, wanted, strict=True))


class _TermIndex:
    """Every term of some lists (all with one action), by first word: one dictionary look-up per word."""

    def __init__(self, action: str) -> None:
        self.action = action
        self.by_first: dict[str, list[tuple[tuple[str, ...], Profile, str, str, str | None]]] = {}

    def add(self, term: str, list_name: str, entry: str, route: str | None) -> None:
        words, profile = term_words(term)
        if words:
            self.by_first.setdefault(words[0], []).append((words, profile, list_name, entry, route))

    def hits(self, normalised: Normalised) -> list[ListHit]:
        if not self.by_first:
            return []
        words = _words(normalised.text)
        firsts = self.by_first.keys() & words
        candidates = [term for first in firsts for term in self.by_first[first]
                      if all(w in words for w in term[0][1:])]
        if not candidates:
            return []
        spans = [(m.group(), m.start(), m.end()) for m in _WORD.finditer(normalised.text)]
        at: dict[str, list[int]] = {}
        for i, (word, _, _) in enumerate(spans):
            at.setdefault(word, []).append(i)
        found = []
        for words_, profile, list_name, entry, route in candidates:
            n = len(words_)
            for i in at.get(words_[0], ()):
                if tuple(w for w, _, _ in spans[i:i + n]) == words_:
                    span = normalised.folded_span(spans[i][1], spans[i + n - 1][2])
                    if _long_enough(letter_runs(normalised.substituted[span[0]:span[1]]), profile):
                        found.append(ListHit(list_name, entry, route, span, action=self.action))
        return found


class _PatternIndex:
    """Every pattern of some lists (all with one action): one RE2 set pass per text, then spans."""

    def __init__(self, action: str) -> None:
        self.action = action
        self._entries: list[tuple[re2._Regexp, str, str, str | None]] = []
        self._set = re2.Set.SearchSet(re2_options())

    def add(self, pattern: str, list_name: str, entry: str, route: str | None) -> None:
        index = self._set.Add(pattern)
        assert index == len(self._entries)
        self._entries.append((compile_pattern(pattern), list_name, entry, route))

    def compile(self) -> None:
        if self._entries:
            self._set.Compile()

    def hits(self, folded: str, allowed: list[tuple[int, int]] | None = None) -> list[ListHit]:
        """One hit per pattern that matches outside every ``allowed`` span (its first such match).

        With ``allowed`` None (no allow list) a hit carries no span: the set pass alone decides.
        """
        if not self._entries:
            return []
        found = []
        for index in self._set.Match(folded) or ():
            regexp, list_name, entry, route = self._entries[index]
            if allowed is None:
                found.append(ListHit(list_name, entry, route, action=self.action))
                continue
            for match in regexp.finditer(folded):
                start, end = match.span()
                if not any(a <= start and end <= b for a, b in allowed):
                    found.append(ListHit(list_name, entry, route, (start, end), action=self.action))
                    break
        return found


class TermMatcher:
    """The block and allow lists of one route set, compiled once, matched over batches."""

    def __init__(self, lists: Sequence[TermList]) -> None:
        self.lists = tuple(lists)
        # by action: accept and review (block lists), allow (allow lists)
        actions = ("accept", "review", "allow")
        self._terms = {action: _TermIndex(action) for action in actions}
        self._patterns = {action: _PatternIndex(action) for action in actions}
        for term_list in self.lists:
            action = "allow" if term_list.kind == "allow" else term_list.action or "accept"
            for entry in term_list.entries:
                if entry.term is not None:
                    self._terms[action].add(entry.term, term_list.name, entry.id, term_list.route)
                else:
                    assert entry.pattern is not None
                    self._patterns[action].add(entry.pattern, term_list.name, entry.id, term_list.route)
        for patterns in self._patterns.values():
            patterns.compile()
        self._allows = any(term_list.kind == "allow" for term_list in self.lists)

    def __bool__(self) -> bool:
        return bool(self.lists)

    def match(self, text: str) -> list[ListHit]:
        """The block hits (either action) of one text that no allowed span masks, one per (list, entry)."""
        folded = fold(text)
        normalised = normalise(folded)
        allowed: list[tuple[int, int]] | None = None
        if self._allows:
            allowed = [h.span for h in self._terms["allow"].hits(normalised)
                       + self._patterns["allow"].hits(folded, []) if h.span is not None]
        blocks = [hit for action in ("accept", "review") for hit in
                  self._terms[action].hits(normalised) + self._patterns[action].hits(folded, allowed)]
        kept: dict[tuple[str, str], ListHit] = {}
        for hit in blocks:
            start, end = hit.span or (0, 0)
            if hit.span is None or not any(a <= start and end <= b for a, b in allowed or ()):
                kept.setdefault((hit.list, hit.entry), hit)
        return list(kept.values())

    def match_batch(self, texts: Sequence[str | None]) -> list[list[ListHit]]:
        """``match`` for each text of a batch (``None``, an image event: no hits)."""
        return [self.match(text) if text else [] for text in texts]
