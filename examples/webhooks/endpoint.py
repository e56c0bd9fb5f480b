"""A small, deliberately unreliable webhook receiver on 127.0.0.1, for the demo and tests.

Paths (POST, with an `X-Webhook-Delivery` header naming the delivery):

- `/flaky?fails=K`: 503 for the first K calls of a delivery, then 200;
- `/throttled?retry_after=S`: 429 with `Retry-After: S` on the first call of a delivery, then 200;
- `/broken`: always 500;
- `/gone`: always 410 Gone.

Every call is recorded (status and time, on `clock`) per delivery id.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from types import TracebackType
from urllib.parse import parse_qs, urlsplit

from .tasks import DELIVERY_HEADER

MAX_BODY = 1_000_000


@dataclass(frozen=True, slots=True)
class Call:
    path: str
    status: int
    at: float


class Endpoint:
    """`async with Endpoint() as endpoint:` serves on an ephemeral port of 127.0.0.1."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.calls: dict[str, list[Call]] = defaultdict(list)
        self._server: asyncio.Server | None = None
        self.port = 0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def __aenter__(self) -> Endpoint:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def answer(self, path: str, delivery: str) -> tuple[int, dict[str, str]]:
        """The status (and extra headers) for a call of `delivery` to `path`."""
        parts = urlsplit(path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        earlier = len(self.calls[delivery])
        if parts.path == "/flaky":
            return (503 if earlier < int(query.get("fails", "2")) else 200), {}
        if parts.path == "/throttled":
            return (429, {"Retry-After": query.get("retry_after", "1")}) if earlier == 0 else (200, {})
        if parts.path == "/broken":
            return 500, {}
        if parts.path == "/gone":
            return 410, {}
        return 404, {}

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = (await reader.readline()).decode("latin-1").split()
            headers: dict[str, str] = {}
            while (line := (await reader.readline()).decode("latin-1").strip()) != "":
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            length = min(int(headers.get("content-length", "0")), MAX_BODY)
            await reader.readexactly(length)
            extra: dict[str, str] = {}
            if len(request_line) < 2 or request_line[0] != "POST":
                status = 405
            else:
                delivery = headers.get(DELIVERY_HEADER.lower(), "")
                status, extra = self.answer(request_line[1], delivery)
                self.calls[delivery].append(Call(request_line[1], status, self.clock()))
            reason = HTTPStatus(status).phrase
            head = [f"HTTP/1.1 {status} {reason}", "Content-Length: 0", "Connection: close"]
            head += [f"{k}: {v}" for k, v in extra.items()]
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass  # a client that went away or spoke nonsense
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
