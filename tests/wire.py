"""A raw AMQP 0-9-1 publisher: hand-built frames over a plain socket.

Normal clients refuse to encode what this sends (out-of-range timestamps, non-UTF-8
strings, tables nested thousands deep, garbage property blocks), which is the point:
it publishes what a broken or hostile producer could. The property block of a message
is either a `Basic.Properties` (encoded by pamqp) or raw bytes, sent as they are::

    async with RawPublisher(url) as publisher:
        await publisher.publish("", "queue", properties(timestamp=2**63 - 1), b"{}")
        await publisher.publish("", "queue", b"...", b"{}", flags=TIMESTAMP)

With confirms (the default) `publish` returns once the broker acked the message and raises
`RefusedError` when it nacked it or closed the channel or the connection over it; the next
publish then opens a new channel (or connection) by itself, so one publisher can send
thousands of hostile messages. `send` is the same without waiting, for pipelining.
Every wait is bounded by `timeout`.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import pamqp.frame
from pamqp import commands, encode
from pamqp.base import Frame

FRAME_METHOD, FRAME_HEADER, FRAME_BODY, FRAME_HEARTBEAT = 1, 2, 3, 8
FRAME_END = 0xCE
PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"

# Property flag bits (AMQP 0-9-1, Basic.Properties), in wire order.
CONTENT_TYPE = 0x8000
CONTENT_ENCODING = 0x4000
HEADERS = 0x2000
DELIVERY_MODE = 0x1000
PRIORITY = 0x0800
CORRELATION_ID = 0x0400
REPLY_TO = 0x0200
EXPIRATION = 0x0100
MESSAGE_ID = 0x0080
TIMESTAMP = 0x0040
TYPE = 0x0020
USER_ID = 0x0010
APP_ID = 0x0008
CLUSTER_ID = 0x0004


class RefusedError(Exception):
    """The broker nacked a message, or closed the channel or connection over it."""

    def __init__(self, scope: str, code: int, text: str) -> None:
        super().__init__(f"{scope} {code}: {text}")
        self.scope = scope  # "nack", "channel" or "connection"
        self.code = code
        self.text = text


# -- encoding helpers for hand-built property blocks ------------------------------------------


def shortstr(raw: bytes) -> bytes:
    """An AMQP short string of any bytes (up to 255), valid UTF-8 or not."""
    return bytes([len(raw)]) + raw


def longstr(raw: bytes) -> bytes:
    return struct.pack(">I", len(raw)) + raw


def table(entries: Iterable[tuple[bytes, bytes]]) -> bytes:
    """A field table of (raw key, tagged value) pairs, e.g. (b"k", b"S" + longstr(b"v"))."""
    body = b"".join(shortstr(key) + value for key, value in entries)
    return longstr(body)


def array(values: Iterable[bytes]) -> bytes:
    """A field array of tagged values."""
    return longstr(b"".join(values))


def timestamp(value: int) -> bytes:
    return struct.pack(">Q", value)


def value(item: object) -> bytes:
    """A tagged field value as pamqp encodes it (ints, strings, tables, ...)."""
    return encode.encode_table_value(item)  # type: ignore[arg-type]


def block(flags: int, *values: bytes) -> bytes:
    """A whole property block: the flag word, then each present property in wire order."""
    return struct.pack(">H", flags) + b"".join(values)


FLAGS = {
    "content_type": CONTENT_TYPE,
    "content_encoding": CONTENT_ENCODING,
    "headers": HEADERS,
    "delivery_mode": DELIVERY_MODE,
    "priority": PRIORITY,
    "correlation_id": CORRELATION_ID,
    "reply_to": REPLY_TO,
    "expiration": EXPIRATION,
    "message_id": MESSAGE_ID,
    "timestamp": TIMESTAMP,
    "type": TYPE,
    "user_id": USER_ID,
    "app_id": APP_ID,
    "cluster_id": CLUSTER_ID,
}


def raw_properties(**values: bytes) -> bytes:
    """A whole property block from encoded values by AMQP property name, put in wire order:
    `raw_properties(type=shortstr(b"a\\xff"), timestamp=timestamp(2**63 - 1))`."""
    unknown = set(values) - set(FLAGS)
    if unknown:
        raise TypeError(f"no such property: {sorted(unknown)}")
    flags = sum(flag for name, flag in FLAGS.items() if name in values)
    return struct.pack(">H", flags) + b"".join(values[name] for name in FLAGS if name in values)


def properties(**kwargs: object) -> commands.Basic.Properties:
    return commands.Basic.Properties(**kwargs)  # type: ignore[arg-type]


# -- the connection ---------------------------------------------------------------------------


@dataclass
class _Frame:
    kind: int
    channel: int
    payload: bytes


def _frame(kind: int, channel: int, payload: bytes) -> bytes:
    return struct.pack(">BHI", kind, channel, len(payload)) + payload + bytes([FRAME_END])


def _method(channel: int, method: Frame) -> bytes:
    return pamqp.frame.marshal(method, channel)


class RawPublisher:
    """One AMQP connection and channel that publish hand-built content headers."""

    def __init__(self, url: str, *, confirms: bool = True, timeout: float = 10.0) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 5672
        self.user = unquote(parts.username or "guest")
        self.password = unquote(parts.password or "guest")
        self.vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
        self.confirms = confirms
        self.timeout = timeout
        self.frame_max = 131072
        self.connections = 0  # how many connections it opened (a refusal costs one)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._listener: asyncio.Task[None] | None = None
        self._channel = 0
        self._next_tag = 0
        self._pending: dict[int, asyncio.Future[None]] = {}
        self._replies: asyncio.Queue[Frame] = asyncio.Queue()
        self._failure: RefusedError | None = None

    async def __aenter__(self) -> RawPublisher:
        await self._ensure()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- publishing -------------------------------------------------------------------------

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        properties: commands.Basic.Properties | bytes,
        body: bytes,
        *,
        flags: int | None = None,
        mandatory: bool = False,
    ) -> None:
        """Publish one message and wait for its confirm (with confirms on)."""
        confirmed = await self.send(exchange, routing_key, properties, body, flags=flags, mandatory=mandatory)
        async with asyncio.timeout(self.timeout):
            await confirmed

    async def send(
        self,
        exchange: str,
        routing_key: str,
        properties: commands.Basic.Properties | bytes,
        body: bytes,
        *,
        flags: int | None = None,
        mandatory: bool = False,
    ) -> asyncio.Future[None]:
        """Write one message; the future resolves on its confirm (at once without confirms).
        Await every future it returns: when the broker closes the channel over one message,
        all confirms still pending fail with that refusal (the broker dropped them too).

        `properties` as bytes is the property block after the flag word when `flags` is
        given, else the whole block, flag word(s) included, sent exactly as it is.
        """
        await self._ensure()
        assert self._writer is not None
        if isinstance(properties, commands.Basic.Properties):
            encoded = properties.marshal()
        elif flags is not None:
            encoded = struct.pack(">H", flags) + properties
        else:
            encoded = properties
        channel = self._channel
        publish = commands.Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=mandatory)
        header = struct.pack(">HHQ", 60, 0, len(body)) + encoded
        frames = [_method(channel, publish), _frame(FRAME_HEADER, channel, header)]
        step = self.frame_max - 8
        frames += [_frame(FRAME_BODY, channel, body[i : i + step]) for i in range(0, len(body), step)]
        confirmed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.confirms:
            self._next_tag += 1
            self._pending[self._next_tag] = confirmed
        else:
            confirmed.set_result(None)
        self._writer.write(b"".join(frames))
        await self._writer.drain()
        return confirmed

    # -- lifecycle --------------------------------------------------------------------------

    async def close(self) -> None:
        listener, writer = self._listener, self._writer
        if writer is not None and not writer.is_closing() and listener is not None and not listener.done():
            with contextlib.suppress(OSError, TimeoutError):
                close = commands.Connection.Close(reply_code=200, reply_text="bye", class_id=0, method_id=0)
                writer.write(_method(0, close))
                async with asyncio.timeout(2):
                    await writer.drain()
                    if listener is not None:
                        await asyncio.shield(listener)  # until the broker's CloseOk ends the stream
        if listener is not None and not listener.done():
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        self._listener = self._writer = self._reader = None
        self._fail(RefusedError("connection", 320, "publisher closed"))
        self._channel = 0

    async def _ensure(self) -> None:
        if self._writer is None or self._writer.is_closing() or self._listener is None or self._listener.done():
            await self.close()
            async with asyncio.timeout(self.timeout):
                await self._connect()
        if not self._channel:
            async with asyncio.timeout(self.timeout):
                await self._open_channel()

    async def _connect(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        self.connections += 1
        self._failure = None
        self._replies = asyncio.Queue()
        self._writer.write(PROTOCOL_HEADER)
        await self._expect(commands.Connection.Start, direct=True)
        response = f"\x00{self.user}\x00{self.password}"
        self._writer.write(
            _method(0, commands.Connection.StartOk(client_properties={"product": "nobs raw wire"}, response=response))
        )
        tune = await self._expect(commands.Connection.Tune, direct=True)
        self.frame_max = tune.frame_max or self.frame_max
        self._writer.write(
            _method(0, commands.Connection.TuneOk(channel_max=tune.channel_max, frame_max=self.frame_max, heartbeat=0))
        )
        self._writer.write(_method(0, commands.Connection.Open(virtual_host=self.vhost)))
        await self._expect(commands.Connection.OpenOk, direct=True)
        self._listener = asyncio.get_running_loop().create_task(self._listen())

    async def _open_channel(self) -> None:
        assert self._writer is not None
        channel = 1  # reused: a closed channel's number is free again once we sent CloseOk
        self._writer.write(_method(channel, commands.Channel.Open()))
        await self._expect(commands.Channel.OpenOk)
        if self.confirms:
            self._writer.write(_method(channel, commands.Confirm.Select()))
            await self._expect(commands.Confirm.SelectOk)
        self._next_tag = 0
        self._channel = channel

    # -- reading ----------------------------------------------------------------------------

    async def _read_frame(self) -> _Frame:
        assert self._reader is not None
        kind, channel, size = struct.unpack(">BHI", await self._reader.readexactly(7))
        payload = await self._reader.readexactly(size + 1)
        if payload[-1] != FRAME_END:
            raise RefusedError("connection", 501, f"bad frame end {payload[-1]:#x}")
        return _Frame(kind, channel, payload[:-1])

    async def _expect(self, kind: type[Frame], *, direct: bool = False) -> Frame:
        """The next method from the broker (read here while connecting, else from the listener)."""
        if direct:
            frame = await self._read_frame()
            method = _decode_method(frame)
            if isinstance(method, commands.Connection.Close):
                raise RefusedError("connection", method.reply_code, method.reply_text)
        else:
            method = await self._replies.get()
            if self._failure is not None and not isinstance(method, kind):
                raise self._failure
        if not isinstance(method, kind):
            raise RefusedError("connection", 503, f"expected {kind.name}, got {method.name}")
        return method

    async def _listen(self) -> None:
        """Confirms, returns (skipped undecoded) and closes, until the connection ends."""
        try:
            while True:
                frame = await self._read_frame()
                if frame.kind != FRAME_METHOD:
                    continue  # a returned message's header and body, or a heartbeat
                self._dispatch(frame, _decode_method(frame))
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
            self._fail(RefusedError("connection", 320, f"connection lost: {exc!r}"))
        except RefusedError as exc:
            self._fail(exc)
        finally:
            self._replies.put_nowait(commands.Connection.CloseOk())  # wakes a pending _expect

    def _write(self, data: bytes) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(data)

    def _dispatch(self, frame: _Frame, method: Frame) -> None:
        if isinstance(method, commands.Basic.Ack):
            self._settle(method.delivery_tag, method.multiple, None)
        elif isinstance(method, commands.Basic.Nack):
            self._settle(method.delivery_tag, method.multiple, RefusedError("nack", 0, "the broker nacked it"))
        elif isinstance(method, commands.Channel.Close):
            self._write(_method(frame.channel, commands.Channel.CloseOk()))
            self._channel = 0
            self._fail(RefusedError("channel", method.reply_code, method.reply_text))
        elif isinstance(method, commands.Connection.Close):
            self._write(_method(0, commands.Connection.CloseOk()))
            self._channel = 0
            self._fail(RefusedError("connection", method.reply_code, method.reply_text))
            raise RefusedError("connection", method.reply_code, method.reply_text)
        elif isinstance(method, commands.Connection.CloseOk):
            raise RefusedError("connection", 200, "closed")
        elif not isinstance(method, commands.Basic.Return):
            self._replies.put_nowait(method)

    def _settle(self, tag: int, multiple: bool, error: RefusedError | None) -> None:
        tags = [t for t in self._pending if t <= tag] if multiple else [tag]
        for t in tags:
            future = self._pending.pop(t, None)
            if future is not None and not future.done():
                if error is None:
                    future.set_result(None)
                else:
                    future.set_exception(error)

    def _fail(self, error: RefusedError) -> None:
        """Fail every confirm still pending: the channel or connection is gone."""
        self._failure = error
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(error)


def _decode_method(frame: _Frame) -> Frame:
    if frame.kind != FRAME_METHOD:
        raise RefusedError("connection", 505, f"expected a method frame, got type {frame.kind}")
    _, _, method = pamqp.frame.unmarshal(_frame(frame.kind, frame.channel, frame.payload))
    assert isinstance(method, Frame)
    return method
