"""The two compute modes: the pipeline on a thread, or in a spawned child process.

Both must publish the same decisions. The child is real (spawned, building its own
trivial encoder from the topology); its death is injected by killing it with SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from threadpoolctl import threadpool_info, threadpool_limits

from sieve.flow.match import RouteIndex
from sieve.flow.pipeline import RouterPipeline
from sieve.kafka.records import RawRecord
from sieve.settings import Settings
from sieve.topology import Topology
from sieve.worker.compute import ThreadCompute, summarise
from sieve.worker.compute_child import ChildDied, ProcessCompute
from sieve.worker.router import RouterWorker

REPO = Path(__file__).resolve().parents[1]
# Differ between two runs of the same batch: when (and how long after the event) it was decided or failed.
_RUN_FIELDS = ("decided_at", "latency_ms", "failed_at")


def _topology() -> Topology:
    return Topology.model_validate({
        "name": "compute", "input": {"topics": ["compute.in"]},
        "route_set": {"name": "moderation", "file": str(REPO / "routes" / "moderation.yaml")},
        "encoder": {"kind": "trivial"},
        "output": {"outcome_topics": {"clean": "c.clean", "violating": "c.violating",
                                      "needs_review": "c.review"},
                   "route_topic_prefix": "c.route.", "dead_letter_topic": "c.dead"},
    })


def _records(n: int, prefix: str = "ev") -> list[RawRecord]:
    texts = ["buy cheap pills now", "what a lovely morning", "i will hurt you", "let's get lunch"]
    records = [RawRecord("compute.in", 0, i, f"{prefix}-{i}".encode(),
                         json.dumps({"id": f"{prefix}-{i}", "text": texts[i % len(texts)]}).encode(),
                         time.time()) for i in range(n)]
    records.append(RawRecord("compute.in", 0, n, None, b"{not json", time.time()))
    return records


def _comparable(value: bytes) -> dict:
    decoded = json.loads(value)
    return {k: v for k, v in decoded.items() if k not in _RUN_FIELDS}


@pytest.fixture(scope="module")
def pipeline(trivial_encoder, moderation_set) -> RouterPipeline:
    index = RouteIndex.build(moderation_set, trivial_encoder)
    return RouterPipeline(_topology(), trivial_encoder, index, "t")


@pytest.fixture(scope="module")
def child(pipeline: RouterPipeline):
    # no repeat cache, like the fixture's pipeline it is compared with
    settings = Settings(metrics_port=0, worker_name="t", dedup_cache_mb=0)
    compute = ProcessCompute(pipeline.topology, settings, pipeline.indexes)
    yield compute
    compute.close()


async def test_the_child_publishes_what_the_thread_does(pipeline: RouterPipeline,
                                                        child: ProcessCompute) -> None:
    records = _records(40)
    # as in a worker, numpy's BLAS on one thread (settings.blas_threads): a matrix product's
    # last bits depend on how OpenBLAS splits it between threads
    with threadpool_limits(limits=1, user_api="blas"):
        on_thread = await ThreadCompute(pipeline).run(records)
    in_child = await child.run(records)
    assert child.pid != os.getpid()
    assert [(m.topic, m.key, m.headers) for m in in_child.outbound] == \
        [(m.topic, m.key, m.headers) for m in on_thread.outbound]
    assert [_comparable(m.value) for m in in_child.outbound] == \
        [_comparable(m.value) for m in on_thread.outbound]
    assert [d.reason for d in in_child.dead_letters] == ["not_json"]
    assert in_child.outcomes == on_thread.outcomes and sum(in_child.outcomes.values()) == 40
    assert len(in_child.event_times) == 40


def test_summary_counts_what_the_rows_say(pipeline: RouterPipeline) -> None:
    records = _records(12)
    result = pipeline.process(records)
    summary = summarise(result)
    assert summary.outbound is result.outbound
    expected: dict[tuple[str, str, str], int] = {}
    for row in result.rows:
        key = (row["outcome"], row["route"] or "", "router")
        expected[key] = expected.get(key, 0) + 1
    assert summary.outcomes == expected
    for t, record in zip(summary.event_times, records, strict=False):
        assert t == pytest.approx(record.timestamp, abs=1e-3)


async def test_a_dead_child_is_replaced_and_the_batch_raised_for_retry(child: ProcessCompute) -> None:
    await child.run(_records(4))
    os.kill(child.pid, signal.SIGKILL)  # fault injection: the child dies (as by the OOM killer)
    time.sleep(0.5)
    with pytest.raises(ChildDied):
        await child.run(_records(4))
    assert child.restarts == 1
    again = await child.run(_records(4, "after"))  # the new child decides
    assert sum(again.outcomes.values()) == 4


async def test_an_index_swap_reaches_the_child_and_survives_a_restart(
    child: ProcessCompute, trivial_encoder, moderation_set,
) -> None:
    first = await child.run(_records(2))
    assert {json.loads(m.value)["route_set_version"] for m in first.outbound if m.topic != "c.dead"} == \
        {child.indexes["text"].version}
    renamed = moderation_set.model_copy(update={"routes": moderation_set.routes[:-1]})
    index = RouteIndex.build(renamed, trivial_encoder)
    assert index.version != child.indexes["text"].version
    await child.swap_index(index)
    after = await child.run(_records(2))
    assert {json.loads(m.value)["route_set_version"] for m in after.outbound if m.topic != "c.dead"} == \
        {index.version}
    os.kill(child.pid, signal.SIGKILL)
    time.sleep(0.5)
    with pytest.raises(ChildDied):
        await child.run(_records(2))
    restarted = await child.run(_records(2))
    assert {json.loads(m.value)["route_set_version"] for m in restarted.outbound if m.topic != "c.dead"} == \
        {index.version}


async def test_router_retries_a_batch_whose_child_died_and_dead_letters_nothing(
    child: ProcessCompute,
) -> None:
    router = RouterWorker(_topology(), Settings(metrics_port=0), child)
    os.kill(child.pid, signal.SIGKILL)  # the child dies before the batch reaches it
    time.sleep(0.5)
    computed = await router._process(_records(30))
    assert sum(computed.outcomes.values()) == 30
    assert [d.reason for d in computed.dead_letters] == ["not_json"]  # only the bad record


def test_a_child_that_cannot_build_its_encoder_fails_the_start_clearly(pipeline: RouterPipeline,
                                                                       tmp_path: Path) -> None:
    broken = _topology().model_copy(update={"encoder": _topology().encoder.model_copy(
        update={"kind": "sentence-transformers", "model": str(tmp_path / "no-such-model")})})
    with pytest.raises(ValueError, match="could not build its pipeline"):
        ProcessCompute(broken, Settings(metrics_port=0, worker_name="t"), pipeline.indexes)


def _blas_threads() -> list[int]:
    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]


def test_the_child_caps_numpys_blas_threads(child: ProcessCompute) -> None:
    # OpenBLAS's idle threads spin: a worker's processes keep them to settings.blas_threads (1)
    pools = child._executor.submit(_blas_threads).result()
    assert pools and set(pools) == {1}  # every BLAS library loaded there (numpy's, scipy's, ...)


def test_limit_blas_threads_sets_this_process_pool() -> None:
    from sieve.worker.compute import limit_blas_threads

    before = _blas_threads()
    try:
        limit_blas_threads(Settings(metrics_port=0, blas_threads=1))
        assert _blas_threads() and set(_blas_threads()) == {1}
    finally:
        threadpool_limits(limits=max(before), user_api="blas")


# -- compute: auto ----------------------------------------------------------------------------


def _cgroup(tmp_path: Path, v2: str | None = None, v1: tuple[str, str] | None = None) -> Path:
    if v2 is not None:
        (tmp_path / "cpu.max").write_text(v2 + "\n")
    if v1 is not None:
        (tmp_path / "cpu").mkdir()
        (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text(v1[0] + "\n")
        (tmp_path / "cpu" / "cpu.cfs_period_us").write_text(v1[1] + "\n")
    return tmp_path


@pytest.mark.parametrize(("v2", "v1", "cap"), [
    (None, None, None),                          # no cgroup files: the affinity alone
    ("max 100000", None, None),                  # v2 without a quota
    ("100000 100000", None, 1),                  # v2: one CPU
    ("250000 100000", None, 2),                  # v2: 2.5 CPUs are two whole ones
    ("50000 100000", None, 1),                   # v2: half a CPU is still one
    (None, ("-1", "100000"), None),              # v1 without a quota
    (None, ("300000", "100000"), 3),             # v1: three CPUs
])
def test_usable_cpus_is_the_affinity_capped_by_the_container_quota(
        tmp_path: Path, v2: str | None, v1: tuple[str, str] | None, cap: int | None) -> None:
    from sieve.settings import usable_cpus

    affinity = len(os.sched_getaffinity(0))
    expected = affinity if cap is None else min(affinity, cap)
    assert usable_cpus(_cgroup(tmp_path, v2, v1)) == expected


@pytest.mark.parametrize(("cpus", "mode"), [(1, "thread"), (2, "process"), (16, "process")])
def test_compute_auto_is_a_child_process_from_two_cpus(monkeypatch: pytest.MonkeyPatch, cpus: int,
                                                       mode: str) -> None:
    import sieve.settings

    monkeypatch.setattr(sieve.settings, "usable_cpus", lambda: cpus)
    assert Settings(metrics_port=0).compute == "auto"  # the default
    assert Settings(metrics_port=0).compute_mode == mode
    # an explicit mode is kept whatever the CPUs
    assert Settings(metrics_port=0, compute="thread").compute_mode == "thread"
    assert Settings(metrics_port=0, compute="process").compute_mode == "process"


@pytest.mark.parametrize(("cpus", "kind"), [(1, ThreadCompute), (2, ProcessCompute)])
def test_build_compute_follows_the_resolved_mode(monkeypatch: pytest.MonkeyPatch, pipeline: RouterPipeline,
                                                 cpus: int, kind: type) -> None:
    import sieve.settings
    from sieve.worker.router import build_compute

    monkeypatch.setattr(sieve.settings, "usable_cpus", lambda: cpus)
    compute = build_compute(pipeline.topology, Settings(metrics_port=0, worker_name="t"), pipeline.indexes)
    try:
        assert type(compute) is kind and compute.mode == kind.mode
        assert compute.indexes == pipeline.indexes
    finally:
        compute.close()


def test_a_child_refuses_an_index_of_another_encoder(moderation_set) -> None:
    """The worker finds the index by the id the topology names; the child's loaded encoder checks it."""
    from sieve.encoders.trivial import TrivialEncoder
    from sieve.worker.compute import encoder_ids

    other = RouteIndex.build(moderation_set, TrivialEncoder(dim=32))
    assert encoder_ids(_topology()) == {"text": TrivialEncoder().id} != {"text": other.encoder_id}
    with pytest.raises(ValueError, match="could not build its pipeline"):
        ProcessCompute(_topology(), Settings(metrics_port=0, worker_name="t"), {"text": other})
