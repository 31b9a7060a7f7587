"""Shared fixtures: the real MiniLM encoder, shipped route sets, and the dev broker."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import hypothesis  # noqa: F401  (import before Faust runs: see below)
import pytest

from sieve.encoders.clip import OpenClipEncoder, save_tiny_clip
from sieve.encoders.sentence_transformers import SentenceTransformerEncoder
from sieve.encoders.trivial import TrivialEncoder
from sieve.flow.match import RouteIndex
from sieve.kafka.broker import start_dev_broker, stop_process
from sieve.routeset import RouteSet, load_route_set

# hypothesis is imported here, at collection, on purpose: its pytest plugin imports it
# lazily at the end of the session, and on CPython 3.11 that late import's ast.parse
# failed ("AST constructor recursion depth mismatch") after the Faust agent tests.

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO / "data"  # the public labelled data sets (data/README.md)
# Workers on the CPU run MiniLM exported to ONNX (backend auto: OpenVINO): every process of the
# session, in-process or a `sieve worker` subprocess in a temporary folder, shares one export.
os.environ.setdefault("SIEVE_ONNX_CACHE_DIR", str(REPO / ".sieve" / "cache" / "onnx"))


def copy_shipped_routes(name: str, folder: Path) -> Path:
    """A shipped route file copied into ``folder`` with the list files it names (they resolve beside it)."""
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    shutil.copy(REPO / "routes" / name, path)
    for listed in load_route_set(REPO / "routes" / name).lists:
        target = folder / listed
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / "routes" / listed, target)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def minilm() -> SentenceTransformerEncoder:
    """The real all-MiniLM-L6-v2, loaded once per test session (1 thread: steadier)."""
    return SentenceTransformerEncoder(batch_size=32, device="cpu")


@pytest.fixture(scope="session")
def cached_minilm(minilm, tmp_path_factory: pytest.TempPathFactory):
    """MiniLM behind an embedding cache for the eval/fit/build tests: each text encoded once a session."""
    from sieve.encoders.cache import CachedEncoder

    return CachedEncoder(minilm, tmp_path_factory.mktemp("embeddings"))


@pytest.fixture(scope="session")
def moderation_bench(cached_minilm):
    """openai-moderation, seeded split, 150 examples per split (long texts: ~450 encodes)."""
    from sieve.quality.workbench import open_workbench

    return open_workbench("openai-moderation", cached_minilm, datasets_dir=DATASETS, seed=0,
                          sample=150)


@pytest.fixture(scope="session")
def trivial_encoder() -> TrivialEncoder:
    return TrivialEncoder()


@pytest.fixture(scope="session")
def moderation_set() -> RouteSet:
    return load_route_set(REPO / "routes" / "moderation.yaml")


@pytest.fixture(scope="session")
def support_set() -> RouteSet:
    return load_route_set(REPO / "routes" / "support.yaml")


@pytest.fixture(scope="session")
def moderation_index(minilm, moderation_set) -> RouteIndex:
    """The shipped moderation set encoded with MiniLM, once per session."""
    return RouteIndex.build(moderation_set, minilm)


@pytest.fixture(scope="session")
def support_index(minilm, support_set) -> RouteIndex:
    return RouteIndex.build(support_set, minilm)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny open_clip model with seeded random weights, saved once per session."""
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


@pytest.fixture(scope="session")
def tiny_clip(tiny_clip_dir: Path) -> OpenClipEncoder:
    return OpenClipEncoder(f"local-dir:{tiny_clip_dir}", None, device="cpu")


@pytest.fixture(scope="session")
def dev_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A tansu broker on a free loopback port for the whole session; yields bootstrap servers."""
    port = free_port()
    log = tmp_path_factory.mktemp("broker") / "tansu.log"
    process = start_dev_broker(port=port, log_path=log)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        stop_process(process)


def worker_env(bootstrap: str, qdrant_path: Path, **extra: str) -> dict[str, str]:
    """Environment for a `sieve worker` subprocess in tests (fast group joins)."""
    env = {
        **os.environ,
        "SIEVE_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
        "SIEVE_QDRANT__PATH": str(qdrant_path),
        "SIEVE_KAFKA__SESSION_TIMEOUT_S": "4",
        "SIEVE_KAFKA__HEARTBEAT_INTERVAL_S": "1",
        "SIEVE_KAFKA__REBALANCE_TIMEOUT_S": "10",
        "SIEVE_KAFKA__COMMIT_INTERVAL_S": "0.5",
        "SIEVE_ROUTE_REFRESH_S": "1",
        "SIEVE_METRICS_PORT": "0",
        "SIEVE_TORCH_THREADS": "1",
        "SIEVE_LOG_LEVEL": "INFO",
    }
    env.update(extra)
    return env
