"""How an encode call's texts become model batches: length-sorted plans, padding, prefetch.

A call's texts are tokenised once, sorted by token length and cut into batches
(:func:`plan_batches`), each padded only to its own longest text
(:func:`pad_token_ids`); the next batch is prepared on a helper thread while the
current one runs (:func:`prefetched`). :class:`PaddingStats` counts what padding cost.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class PaddingStats:
    """Tokens of one encode call: ``real`` (the texts' own) and ``padded`` (what the model ran on)."""

    real: int = 0
    padded: int = 0

    @property
    def waste(self) -> float:
        """Share of the model's token positions that were padding (0 when nothing ran)."""
        return 1.0 - self.real / self.padded if self.padded else 0.0


# What one model call costs beyond its tokens, in tokens: the planner splits a group only
# where the padding it saves is worth more than another call (docs/benchmarks.md: the choice).
CALL_COST_TOKENS = 48


def plan_batches(
    lengths: Sequence[int], batch_size: int, *, by_length: bool = True,
    call_cost: int = CALL_COST_TOKENS,
) -> list[np.ndarray]:
    """Index groups of at most ``batch_size`` texts; each batch is padded only to its own longest text.

    ``by_length``: the texts are sorted by token length (longest first, ties in the
    caller's order) and cut into consecutive groups at the cheapest places: each
    group costs its size times its longest text's length (the token positions the
    model runs) plus ``call_cost`` tokens for the call itself, and the cuts minimise
    the total (dynamic programming over the sorted lengths, O(n x batch_size)). So a
    small batch with a long tail (a 300-word post among 10-word chats) runs the post
    alone instead of padding every chat to its length, and a full batch of similar
    texts still runs in groups of ``batch_size``. Without ``by_length`` the groups
    follow the caller's order. Together the groups hold every index exactly once.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    if not by_length:
        order = np.arange(len(lengths))
        return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    array = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-array, kind="stable")
    longest = array[order].astype(np.float64)  # descending: a group's first text is its longest
    count = len(order)
    # best[end]: the cheapest plan of the first `end` sorted texts; cut[end]: where its last group starts
    best = np.zeros(count + 1)
    cut = np.zeros(count + 1, dtype=np.int64)
    sizes = np.arange(min(batch_size, count), 0, -1, dtype=np.float64)  # group size by start, tail-aligned
    for end in range(1, count + 1):
        first = max(0, end - batch_size)
        costs = best[first:end] + sizes[len(sizes) - (end - first):] * longest[first:end] + call_cost
        pick = int(np.argmin(costs))  # the first minimum: the larger group on a tie
        best[end], cut[end] = costs[pick], first + pick
    groups: list[np.ndarray] = []
    end = count
    while end > 0:
        groups.append(order[cut[end]:end])
        end = int(cut[end])
    groups.reverse()
    return groups


def padding_stats(lengths: Sequence[int], plan: Sequence[np.ndarray]) -> PaddingStats:
    """Real and padded token counts of running ``plan`` over texts of these token lengths."""
    array = np.asarray(lengths, dtype=np.int64)
    padded = sum(len(group) * int(array[group].max()) for group in plan if len(group))
    return PaddingStats(real=int(array.sum()), padded=padded)


def pad_token_ids(
    rows: Sequence[Sequence[int]], *, pad_id: int = 0, left: bool = False, token_types: bool = True
) -> dict[str, np.ndarray]:
    """One batch of token-id rows padded to its longest row, as int64 model inputs.

    ``input_ids``, ``attention_mask`` (1 on real tokens) and, when ``token_types``,
    ``token_type_ids`` (zeros: one segment).
    """
    width = max(len(row) for row in rows)
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for r, row in enumerate(rows):
        cols = slice(width - len(row), width) if left else slice(0, len(row))
        input_ids[r, cols] = row
        mask[r, cols] = 1
    out = {"input_ids": input_ids, "attention_mask": mask}
    if token_types:
        out["token_type_ids"] = np.zeros_like(input_ids)
    return out


def prefetched(
    plan: Sequence[np.ndarray], prepare: Callable[[np.ndarray], T]
) -> Iterator[tuple[np.ndarray, T]]:
    """``(group, prepare(group))`` for each group; group *k + 1* is prepared on a helper thread.

    While the caller runs batch *k* (on the GPU, or on the CPU's compute threads),
    the next batch is padded (and pinned) in the background. A single group is
    prepared in the caller's thread: no thread for one-batch (latency) calls.
    """
    if len(plan) == 1:
        yield plan[0], prepare(plan[0])
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sieve-encode-prefetch") as pool:
        future = pool.submit(prepare, plan[0])
        for k, group in enumerate(plan):
            ready = future.result()
            if k + 1 < len(plan):
                future = pool.submit(prepare, plan[k + 1])
            yield group, ready
