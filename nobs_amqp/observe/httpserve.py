"""A small HTTP/1.1 server for the metrics and health endpoint: GET only, one answer per connection.

It runs an asyncio event loop of its own in one thread, so it answers while the worker's loop is
blocked by a task, and takes no thread per connection. It keeps at most MAX_CONNECTIONS open: a
new one past that closes the oldest that has not sent its request yet (or, when none is idle,
itself), so probes get through a flood of idle connections and file descriptors stay bounded. A
connection has IDLE_SECONDS to send a request head of at most MAX_HEAD_BYTES (slow or half-sent
heads are cut off), and as long again to take the answer; then it is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import logging
import re
import socket
import threading
from collections.abc import Callable, Iterator
from typing import cast

import orjson

log = logging.getLogger("nobs_amqp")

#: Connections kept open at once; past it, the oldest idle one (or the new one) is closed.
MAX_CONNECTIONS = 32
#: Seconds a connection has to send a complete request head, and then to take the answer.
IDLE_SECONDS = 5.0
#: The longest request head (request line and headers) read; longer ones get 431.
MAX_HEAD_BYTES = 8192
#: Connections the kernel queues for accepting (they hold no file descriptor of the process yet).
BACKLOG = 128
#: Seconds to wait before accepting again after accepting failed (no file descriptor left, say).
ACCEPT_RETRY_SECONDS = 0.5
#: Seconds to wait for the thread to stop when the block ends.
STOP_SECONDS = 5.0

#: (path, Accept header) -> status, body, content type. An exception becomes a 500.
Respond = Callable[[str, str], tuple[int, bytes, str]]

_END_OF_HEAD = re.compile(rb"\r?\n\r?\n")
#: The target is visible ASCII (as URLs are): it goes into log lines as it came.
_REQUEST_LINE = re.compile(r"([A-Z]+) ([!-~]+) HTTP/1\.[01]")


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on `host:port` (IPv6 when `host` has a colon; port 0: any free one).
    OSError when it cannot."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


@contextlib.contextmanager
def serving(sock: socket.socket, respond: Respond, *, name: str = "nobs-metrics") -> Iterator[None]:
    """Answer requests on the listening `sock` with `respond` from a thread named `name` until the
    block ends; then close every connection and `sock`, and join the thread."""
    server = _Server(sock, respond)
    thread = threading.Thread(target=server.run, name=name, daemon=True)
    thread.start()
    try:
        if not server.started.wait(STOP_SECONDS) or server.failed is not None:
            raise server.failed or RuntimeError("the metrics endpoint did not start")
        yield
    finally:
        server.stop()
        thread.join(STOP_SECONDS)
        sock.close()


def answer(head: bytes, respond: Respond) -> bytes:
    """The whole HTTP response to a request `head` (up to its blank line, which is not included)."""
    try:
        method, target, accept = _parse(head)
    except ValueError as exc:
        return _response(400, {"error": str(exc)})
    if method != "GET":
        return _response(405, {"error": f"{method} is not allowed: use GET"}, ("Allow", "GET"))
    try:
        status, body, content_type = respond(target, accept)
    except Exception as exc:  # noqa: BLE001 - a bug here must not look like an unhealthy worker's silence
        log.error("metrics endpoint: %s failed: %s: %s", target, type(exc).__name__, exc)
        return _response(500, {"error": f"{type(exc).__name__}: {exc}"})
    return _encode(status, body, content_type)


def _parse(head: bytes) -> tuple[str, str, str]:
    """The method, the target and the Accept header of a request head; ValueError if it is none."""
    request_line, *lines = (line.removesuffix("\r") for line in head.decode("latin-1").split("\n"))
    matched = _REQUEST_LINE.fullmatch(request_line)
    if matched is None:
        raise ValueError(f"not an HTTP/1.x request line: {request_line[:100]!r}")
    accept = ""
    for line in lines:
        name, colon, value = line.partition(":")
        if not colon:
            raise ValueError(f"not a header line: {line[:100]!r}")
        if name.strip().lower() == "accept":
            accept = value.strip()
    return matched[1], matched[2], accept


def _response(status: int, error: dict[str, str], *headers: tuple[str, str]) -> bytes:
    return _encode(status, orjson.dumps(error), "application/json", *headers)


def _encode(status: int, body: bytes, content_type: str, *headers: tuple[str, str]) -> bytes:
    lines = [
        f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
        "Connection: close",
        *(f"{name}: {value}" for name, value in headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class _Server:
    """The connections of one listening socket, on an event loop of its own (`run`, in its thread)."""

    def __init__(self, sock: socket.socket, respond: Respond) -> None:
        self.sock = sock
        self.respond = respond
        self.started = threading.Event()
        self.failed: BaseException | None = None
        self.open: dict[_Connection, None] = {}  # oldest first, until each is closed
        self.closed_at_bound = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._all_closed: asyncio.Event | None = None

    def run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # noqa: BLE001 - `serving` raises it, in the thread that started it
            self.failed = exc
            self.started.set()

    def stop(self) -> None:
        """From another thread: close every connection and stop accepting."""
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None:
            with contextlib.suppress(RuntimeError):  # its loop has ended already
                loop.call_soon_threadsafe(stopping.set)

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping, self._all_closed = asyncio.Event(), asyncio.Event()
        self._all_closed.set()
        self.sock.setblocking(False)
        accepting = asyncio.create_task(self._accept())
        self.started.set()
        await self._stopping.wait()
        accepting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await accepting
        for connection in list(self.open):
            connection.abort()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._all_closed.wait(), STOP_SECONDS)

    async def _accept(self) -> None:
        """One connection at a time: one past the bound holds no descriptor for longer than a loop turn."""
        loop = asyncio.get_running_loop()
        failing = False
        while True:
            try:
                client, _ = await loop.sock_accept(self.sock)
            except ConnectionError:  # the client gave up before it was accepted
                continue
            except OSError as exc:  # out of file descriptors, say: the connection waits in the backlog
                if not failing:
                    log.warning("metrics endpoint: cannot accept connections: %s; retrying", exc)
                failing = True
                await asyncio.sleep(ACCEPT_RETRY_SECONDS)
                continue
            failing = False
            if not self._make_room():
                client.close()
                continue
            try:
                await loop.connect_accepted_socket(lambda: _Connection(self), client)
            except OSError:  # gone already
                client.close()

    def _make_room(self) -> bool:
        """Whether a new connection can be kept: below the bound, or once the oldest idle one is closed."""
        if len(self.open) < MAX_CONNECTIONS:
            return True
        if not self.closed_at_bound:
            log.warning(
                "metrics endpoint: %d connections open, the most it keeps: closing the oldest idle one"
                " (or the new one) for each new one until fewer are open",
                len(self.open),
            )
        self.closed_at_bound += 1
        idle = next((c for c in self.open if not (c.answered or c.closing)), None)
        if idle is not None:
            idle.abort()
        return idle is not None

    def opened(self, connection: _Connection) -> None:
        assert self._all_closed is not None
        self.open[connection] = None
        self._all_closed.clear()

    def closed(self, connection: _Connection) -> None:
        self.open.pop(connection, None)
        if not self.open and self._all_closed is not None:
            self._all_closed.set()
        if self.closed_at_bound and len(self.open) <= MAX_CONNECTIONS // 2:
            log.info("metrics endpoint: closed %d connection(s) at the bound", self.closed_at_bound)
            self.closed_at_bound = 0


class _Connection(asyncio.Protocol):
    """One client: its request head is read (for IDLE_SECONDS at most) and answered, and it is closed."""

    def __init__(self, server: _Server) -> None:
        self.server = server
        self.head = bytearray()
        self.answered = False
        self.closing = False
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.timer = asyncio.get_running_loop().call_later(IDLE_SECONDS, self.abort)
        self.server.opened(self)

    def data_received(self, data: bytes) -> None:
        if self.answered:
            return  # what follows the head (a body, another request) is read and dropped
        self.head += data
        end = _END_OF_HEAD.search(self.head)
        if end is None and len(self.head) <= MAX_HEAD_BYTES:
            return
        if end is None or end.start() > MAX_HEAD_BYTES:
            self.send(_response(431, {"error": f"the request head is longer than {MAX_HEAD_BYTES} bytes"}))
        else:
            self.send(answer(bytes(self.head[: end.start()]), self.server.respond))

    def send(self, response: bytes) -> None:
        """Send `response` and the end of the stream; the client has IDLE_SECONDS to take it and close."""
        assert self.transport is not None
        assert self.timer is not None
        self.answered = True
        self.head.clear()
        self.timer.cancel()
        self.timer = asyncio.get_running_loop().call_later(IDLE_SECONDS, self.abort)
        self.transport.write(response)
        # Not close(): it would stop reading, and a request body still arriving would make the
        # kernel reset the connection, perhaps before the client read the answer.
        self.transport.write_eof()

    def eof_received(self) -> bool:
        return False  # the client is done: close (after sending what is left of the answer)

    def abort(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.server.closed(self)
