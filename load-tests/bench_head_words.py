"""What a head's words cost per event, against encoding the same texts with MiniLM (docs/benchmarks.md).

    .venv/bin/python load-tests/bench_head_words.py HEAD_WITH_WORDS.npz HEAD_WITHOUT.npz [TEXTS]

The heads are ``<routes>.head.npz`` files written by ``sieve routes build --head`` with and
without ``--head-words`` (their encoder must be MiniLM). TEXTS (default 400) test-split
texts of openai-moderation (long prompts) and of Davidson (tweets) are encoded, then
scored by each head; three rounds, medians per text.
"""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np

from sieve.cli.workbench import open_bench
from sieve.encoders.factory import encoders_for
from sieve.flow.head import LearnedHead
from sieve.settings import get_settings
from sieve.topology import EncoderSpec


def main() -> None:
    words, plain = LearnedHead.load(sys.argv[1]), LearnedHead.load(sys.argv[2])
    count = int(sys.argv[3]) if len(sys.argv) > 3 else 400
    assert words.words is not None and plain.words is None, "the first head has words, the second none"
    encoder, _ = encoders_for(EncoderSpec(kind="sentence-transformers"), None, get_settings())
    assert encoder is not None
    print("| texts | mean length | MiniLM encode | head | head with words |\n|---|---:|---:|---:|---:|")
    for data in ("openai-moderation", "davidson"):
        bench = open_bench(data, 0, None, "sentence-transformers", None, True, False)
        texts = [example.text or "" for example in bench.part("test").examples][:count]
        seconds: dict[str, list[float]] = {"encode": [], "head": [], "words": []}
        for _ in range(3):
            started = time.perf_counter()
            vectors = encoder.encode(texts)
            seconds["encode"].append(time.perf_counter() - started)
            started = time.perf_counter()
            plain.probabilities(vectors)
            seconds["head"].append(time.perf_counter() - started)
            started = time.perf_counter()
            words.probabilities(vectors, texts)
            seconds["words"].append(time.perf_counter() - started)
        per_text = {k: statistics.median(v) * 1000 / len(texts) for k, v in seconds.items()}
        print(f"| {len(texts)} {data} | {np.mean([len(t) for t in texts]):.0f} chars | "
              f"{per_text['encode']:.2f} ms | {per_text['head']:.3f} ms | {per_text['words']:.3f} ms |")


if __name__ == "__main__":
    main()
