"""A small TCP proxy in front of the test broker, to cut connections (or slow them down) without
touching RabbitMQ."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit

CHUNK = 65536


def broker_address(url: str | None = None) -> tuple[str, int]:
    """The host and port of `url`, by default NOBS_AMQP_URL (the broker the tests run on)."""
    parts = urlsplit(url or os.environ.get("NOBS_AMQP_URL") or "amqp://127.0.0.1:5672/")
    return parts.hostname or "127.0.0.1", parts.port or (5671 if parts.scheme == "amqps" else 5672)


class Proxy:
    """Forwards 127.0.0.1:<ephemeral port> to the broker (NOBS_AMQP_URL's host and port unless
    given); `cut()` drops every open connection.

    While `refusing` is set, a new connection is closed as soon as it is accepted (and
    counted in `refused`), as if the broker were down.

    Between `hold()` and `release()`, what the broker sends waits in the proxy (what clients
    send still goes through): a confirm the broker sent, lost with a `cut()` meanwhile.

    `stall()` turns every open connection into a black hole, as a dead NAT entry or a frozen
    peer does: what either side sends is dropped and nothing is closed (not even when the other
    side closes); new connections go through as usual.

    With a `latency`, every chunk is delayed by that many seconds each way, as a network between
    a service and its broker does; order is kept and nothing waits for an earlier chunk's delay
    to end, so what a client pipelines stays pipelined.
    """

    def __init__(self, target_host: str | None = None, target_port: int | None = None, *, latency: float = 0.0) -> None:
        default_host, default_port = broker_address()
        self.target_host = target_host or default_host
        self.target_port = target_port or default_port
        self.latency = latency
        self.refusing = False
        self.accepted = 0
        self.refused = 0
        self._server: asyncio.Server | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._stalled: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._replies = asyncio.Event()
        self._replies.set()
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self._server is not None, "proxy is not started"
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def open_connections(self) -> int:
        return len(self._pairs)

    def url_for(self, amqp_url: str) -> str:
        """`amqp_url` (credentials, vhost) pointed at this proxy instead of the broker."""
        parts = urlsplit(amqp_url)
        credentials = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
        return urlunsplit(parts._replace(netloc=f"{credentials}127.0.0.1:{self.port}"))

    async def __aenter__(self) -> Proxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()
        self.cut()
        handlers = list(self._handlers)
        for handler in handlers:
            handler.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)

    def hold(self) -> None:
        """From now on, keep what the broker sends (not with a `latency`)."""
        assert not self.latency, "hold() is for a proxy without latency"
        self._replies.clear()

    def release(self) -> None:
        """Forward what the broker sends again, what was held first."""
        self._replies.set()

    def stall(self) -> int:
        """Stop forwarding on every open connection without closing it; return how many there were."""
        pairs = list(self._pairs)
        self._stalled.update(pairs)
        return len(pairs)

    def cut(self) -> int:
        """Close both sides of every open connection at once; return how many there were."""
        pairs = list(self._pairs)
        for client, upstream in pairs:
            client.transport.abort()
            upstream.transport.abort()
        return len(pairs)

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        try:
            if self.refusing:
                self.refused += 1
                client_writer.transport.abort()
                return
            try:
                upstream_reader, upstream_writer = await asyncio.open_connection(self.target_host, self.target_port)
            except OSError:
                client_writer.transport.abort()
                return
            self.accepted += 1
            pair = (client_writer, upstream_writer)
            self._pairs.add(pair)
            try:
                if self.latency:
                    await asyncio.gather(
                        _delayed_pump(client_reader, upstream_writer, self.latency),
                        _delayed_pump(upstream_reader, client_writer, self.latency),
                    )
                else:
                    stalled = lambda: pair in self._stalled  # noqa: E731
                    await asyncio.gather(
                        _pump(client_reader, upstream_writer, stalled=stalled),
                        _pump(upstream_reader, client_writer, self._replies, stalled=stalled),
                    )
            finally:
                self._pairs.discard(pair)
                self._stalled.discard(pair)
                client_writer.transport.abort()
                upstream_writer.transport.abort()
        finally:
            self._handlers.discard(handler)


async def _pump(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    flowing: asyncio.Event | None = None,
    *,
    stalled: Callable[[], bool] = lambda: False,
) -> None:
    """Copy bytes until either side goes away, then close both directions of `writer`; each
    chunk waits for `flowing`, if given, to be set. Once `stalled()`, bytes are dropped and
    nothing is closed."""
    with contextlib.suppress(ConnectionError, OSError):
        while data := await reader.read(CHUNK):
            if stalled():
                continue
            if flowing is not None:
                await flowing.wait()
            writer.write(data)
            await writer.drain()
    if not stalled():
        writer.transport.abort()


async def _delayed_pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, latency: float) -> None:
    """`_pump`, each chunk written `latency` seconds after it was read; the rest is written
    before `writer` is closed."""
    loop = asyncio.get_running_loop()
    chunks: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def forward() -> None:
        while (item := await chunks.get())[1]:
            await asyncio.sleep(max(0.0, item[0] - loop.time()))
            writer.write(item[1])
            await writer.drain()

    forwarder = asyncio.create_task(forward())
    try:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(CHUNK):
                chunks.put_nowait((loop.time() + latency, data))
        chunks.put_nowait((0.0, b""))
        with contextlib.suppress(ConnectionError, OSError):
            await forwarder
    finally:
        forwarder.cancel()
        writer.transport.abort()
