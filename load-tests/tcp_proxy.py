"""A TCP proxy on loopback that can delay, stall, drop and reset connections, per direction.

The chaos run (chaos.py) puts it between the workers and the dev broker: the broker
advertises the proxy's address, so every connection a worker opens goes through it. The
proxy runs its own asyncio loop on a thread; the test controls it from ordinary code:

    with ChaosProxy(("127.0.0.1", broker_port)) as proxy:     # listens on proxy.port
        proxy.delay(200)                 # 200 ms more on every chunk, both directions
        proxy.partition()                # stall: nothing moves, connections stay open
        proxy.heal()                     # everything held moves on, in order
        proxy.partition("reset")         # close every connection, refuse new ones
        proxy.partition("drop", "up")    # client->server bytes thrown away (stream cut at heal)

Directions: ``up`` is client to server, ``down`` server to client, ``both`` both. Modes:

* ``stall``: bytes are held (not read from the socket, so TCP back-pressure builds) and
  delivered when healed, as a network partition with retransmission looks to both ends.
  New connections are accepted and stalled too.
* ``drop``: bytes are read and thrown away; since the Kafka stream is then corrupt, every
  connection that lost bytes is closed at :meth:`heal`.
* ``reset``: every open connection is closed at once and new ones are closed on accept,
  until healed.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal

Direction = Literal["up", "down", "both"]
Mode = Literal["pass", "stall", "drop", "reset"]
CHUNK = 64 * 1024


@dataclass
class _Way:
    """State of one direction."""

    mode: Mode = "pass"
    delay_s: float = 0.0
    flowing: asyncio.Event = field(default_factory=asyncio.Event)
    bytes: int = 0
    dropped: int = 0


@dataclass(eq=False)  # hashed by identity: kept in a set
class _Conn:
    client: asyncio.StreamWriter
    server: asyncio.StreamWriter
    lost_bytes: bool = False

    def close(self) -> None:
        for writer in (self.client, self.server):
            with contextlib.suppress(Exception):
                sock = writer.get_extra_info("socket")
                if sock is not None:  # RST rather than FIN: an abrupt reset
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                writer.transport.abort()


class ChaosProxy:
    """Forwards ``127.0.0.1:<port>`` to ``target``; faults switched on and off from any thread."""

    def __init__(self, target: tuple[str, int], host: str = "127.0.0.1", port: int = 0) -> None:
        self.target, self.host, self._want_port = target, host, port
        self.port = 0
        self.accepted = 0
        self.refused = 0
        self.resets = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="chaos-proxy", daemon=True)
        self._conns: set[_Conn] = set()
        self._server: asyncio.base_events.Server | None = None
        self._ways: dict[str, _Way] = {}

    # -- life ------------------------------------------------------------------------------------

    def start(self) -> ChaosProxy:
        """Listen (on ``port``, 0: a free one) and start forwarding."""
        self._thread.start()
        self._call(self._start())
        return self

    async def _start(self) -> None:
        self._ways = {"up": _Way(), "down": _Way()}
        for way in self._ways.values():
            way.flowing.set()
        self._server = await asyncio.start_server(self._accept, self.host, self._want_port)
        self.port = self._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        """Close every connection and the listener; stop the loop."""
        if not self._thread.is_alive():
            return
        self._call(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            conn.close()
        self._conns.clear()
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    def __enter__(self) -> ChaosProxy:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _call(self, coro):  # noqa: ANN001, ANN202
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    # -- control ---------------------------------------------------------------------------------

    def partition(self, mode: Mode = "stall", direction: Direction = "both") -> None:
        """Cut the path: ``stall`` (hold bytes), ``drop`` (throw them away) or ``reset`` (close all)."""
        self._call(self._set(mode, direction))

    def heal(self) -> None:
        """Back to forwarding in both directions (delays kept); drop-cut connections are closed."""
        self._call(self._heal())

    def delay(self, ms: float, direction: Direction = "both") -> None:
        """Hold every chunk ``ms`` milliseconds before forwarding it (0: no delay)."""
        self._call(self._delay(ms / 1000, direction))

    def reset_connections(self) -> int:
        """Close every open connection now (RST); new ones are accepted as usual. How many closed."""
        return self._call(self._reset())

    @property
    def cut(self) -> bool:
        """Whether a partition is in force in some direction."""
        return any(w.mode != "pass" for w in self._ways.values())

    def stats(self) -> dict[str, int]:
        """Connections accepted, refused and reset, open now, and bytes forwarded/dropped each way."""
        return {
            "accepted": self.accepted,
            "refused": self.refused,
            "resets": self.resets,
            "open": len(self._conns),
            "up_bytes": self._ways["up"].bytes,
            "down_bytes": self._ways["down"].bytes,
            "up_dropped": self._ways["up"].dropped,
            "down_dropped": self._ways["down"].dropped,
        }

    def _named(self, direction: Direction) -> list[_Way]:
        return list(self._ways.values()) if direction == "both" else [self._ways[direction]]

    async def _set(self, mode: Mode, direction: Direction) -> None:
        for way in self._named(direction):
            way.mode = mode
            if mode == "pass":
                way.flowing.set()
            else:
                way.flowing.clear()
        if mode == "reset":
            await self._reset()

    async def _heal(self) -> None:
        for conn in [c for c in self._conns if c.lost_bytes]:
            self._drop_conn(conn)
        await self._set("pass", "both")

    async def _delay(self, seconds: float, direction: Direction) -> None:
        for way in self._named(direction):
            way.delay_s = max(0.0, seconds)

    async def _reset(self) -> int:
        closed = list(self._conns)
        for conn in closed:
            self._drop_conn(conn)
        return len(closed)

    def _drop_conn(self, conn: _Conn) -> None:
        conn.close()
        self._conns.discard(conn)
        self.resets += 1

    # -- forwarding ------------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if any(w.mode == "reset" for w in self._ways.values()):
            self.refused += 1
            _Conn(writer, writer).close()
            return
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.target)
        except OSError:
            self.refused += 1
            writer.transport.abort()
            return
        self.accepted += 1
        conn = _Conn(writer, server_writer)
        self._conns.add(conn)
        await asyncio.gather(
            self._pump(reader, server_writer, self._ways["up"], conn),
            self._pump(server_reader, writer, self._ways["down"], conn),
            return_exceptions=True,
        )
        if conn in self._conns:
            self._conns.discard(conn)
            conn.close()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, way: _Way, conn: _Conn
    ) -> None:
        try:
            while conn in self._conns:
                if way.mode == "stall":
                    await way.flowing.wait()  # hold: read nothing, so the sender's buffers fill
                    continue
                data = await reader.read(CHUNK)
                if not data:
                    break
                if way.mode == "stall":  # cut while this chunk was in flight: deliver it at heal
                    await way.flowing.wait()
                if way.mode in ("drop", "reset"):
                    way.dropped += len(data)
                    conn.lost_bytes = True
                    continue
                if way.delay_s:
                    await asyncio.sleep(way.delay_s)
                writer.write(data)
                await writer.drain()
                way.bytes += len(data)
        finally:
            if conn in self._conns:
                self._conns.discard(conn)
                conn.close()
