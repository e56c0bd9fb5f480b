"""Publishing on an aiormq channel, with the frames built here.

aiormq's `basic_publish` does, per message: pamqp marshals a `Basic.Publish` method frame and
the properties with its generic encoders (a loop over all fourteen properties, a dispatch per
value), a BytesIO joins the frames, and a lock, a timeout, a drain future and the confirm future
are made and awaited. `Publisher` sends the same bytes for less: the method frame is made once
per route, the properties are encoded here for the values messages carry (pamqp's encoders for
anything else), and the frames go on aiormq's write queue with the confirm registered as
aiormq's channel expects it: its reader settles the confirm (ack, nack, or the return of an
unroutable message), and closing the channel rejects it.

Publishes on one channel take its delivery tags in the order their frames reach the write
queue (the broker numbers them so when it confirms): when the queue is full, publishes wait
here in tag order and go into it together, as one write.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Mapping
from datetime import UTC, datetime

import aiormq
from aiormq.abc import ChannelFrame, ConfirmationFrameType
from pamqp import encode
from pamqp.commands import Basic
from pamqp.constants import FRAME_BODY, FRAME_END_CHAR, FRAME_HEADER, FRAME_METHOD

from ...message import CONTENT_TYPE, Message

PERSISTENT = 2
_FRAME = struct.Struct(">BHI")  # type, channel, payload size
_CONTENT_HEADER = struct.Struct(">HHQ")  # class id, weight (0), body size
_UINT32 = struct.Struct(">I")
_TIMESTAMP = struct.Struct(">Q")
_PUBLISH = struct.pack(">IH", Basic.Publish.index, 0)  # the method, ticket 0
_MANDATORY = b"\x01"  # mandatory, not immediate
# Property flags, in the order of the values in the block (pamqp's Basic.Properties.flags).
_FLAGS = Basic.Properties.flags
_CONSTANT_FLAGS = _FLAGS["content_type"] | _FLAGS["headers"] | _FLAGS["delivery_mode"] | _FLAGS["timestamp"]
_TYPED_INTEGERS = (
    (-(2**7), 2**7 - 1, b"b", struct.Struct(">b")),
    (-(2**15), 2**15 - 1, b"s", struct.Struct(">h")),
    (0, 2**16 - 1, b"u", struct.Struct(">H")),
    (-(2**31), 2**31 - 1, b"I", struct.Struct(">l")),
    (0, 2**32 - 1, b"i", struct.Struct(">L")),
    (-(2**63), 2**63 - 1, b"l", struct.Struct(">q")),
)  # pamqp's table_integer: the smallest type that holds the value


class _Unusual(Exception):  # noqa: N818 - not an error: pamqp encodes what this module does not
    """A value this module does not encode itself."""


def frame(kind: int, channel: int, payload: bytes) -> bytes:
    return _FRAME.pack(kind, channel, len(payload)) + payload + FRAME_END_CHAR


def _shortstr(text: str) -> bytes:
    raw = text.encode()
    if len(raw) > 255:
        raise _Unusual  # pamqp refuses it, with its own words
    return bytes((len(raw),)) + raw


def _integer(value: int) -> bytes:
    if encode.DEPRECATED_RABBITMQ_SUPPORT:
        raise _Unusual
    for low, high, tag, packer in _TYPED_INTEGERS:
        if low <= value <= high:
            return tag + packer.pack(value)
    raise _Unusual


def _value(value: object) -> bytes:
    if type(value) is str:
        raw = value.encode()
        return b"S" + _UINT32.pack(len(raw)) + raw
    if type(value) is int:
        return _integer(value)
    if type(value) is bool:
        return b"t\x01" if value else b"t\x00"
    if value is None:
        return b"V"
    raise _Unusual


def _table(headers: Mapping[str, object]) -> bytes:
    """The header table as pamqp's field_table encodes it (keys sorted) for strings, integers,
    booleans and None; _Unusual for anything else."""
    parts = []
    for key, value in sorted(headers.items()):
        raw = key.encode()
        if len(raw) > 128:  # pamqp truncates it, and says so
            raise _Unusual
        parts.append(bytes((len(raw),)) + raw + _value(value))
    body = b"".join(parts)
    return _UINT32.pack(len(body)) + body


def properties(message: Message) -> bytes:
    """The property block of `message` as pamqp marshals `Basic.Properties` for it: persistent,
    JSON, its id, timestamp, type (the task), app id, headers and priority."""
    try:
        return _properties(message)
    except _Unusual:
        return pamqp_properties(message).marshal()


def _properties(message: Message) -> bytes:
    flags = _CONSTANT_FLAGS
    parts = [_JSON, _table(message.headers), b"\x02"]
    if message.priority is not None:
        if not 0 <= message.priority <= 255:
            raise _Unusual
        flags |= _FLAGS["priority"]
        parts.append(bytes((message.priority,)))
    if message.correlation_id is not None:
        flags |= _FLAGS["correlation_id"]
        parts.append(_shortstr(message.correlation_id))
    if message.reply_to is not None:
        flags |= _FLAGS["reply_to"]
        parts.append(_shortstr(message.reply_to))
    if message.message_id:
        flags |= _FLAGS["message_id"]
        parts.append(_shortstr(message.message_id))
    parts.append(_TIMESTAMP.pack(int(_aware(message.timestamp).timestamp())))
    if message.task:
        flags |= _FLAGS["message_type"]
        parts.append(_shortstr(message.task))
    if message.app_id:
        flags |= _FLAGS["app_id"]
        parts.append(_shortstr(message.app_id))
    return struct.pack(">H", flags) + b"".join(parts)


_JSON = _shortstr(CONTENT_TYPE)


def _aware(moment: datetime) -> datetime:
    """pamqp takes a naive time for UTC."""
    if moment.tzinfo is None or moment.tzinfo.utcoffset(moment) is None:
        return moment.replace(tzinfo=UTC)
    return moment


def pamqp_properties(message: Message, *, delivery_mode: int = PERSISTENT) -> Basic.Properties:
    """`message`'s AMQP properties as pamqp makes them (persistent unless told otherwise)."""
    return Basic.Properties(
        content_type=CONTENT_TYPE,
        delivery_mode=delivery_mode,
        message_id=message.message_id,
        timestamp=message.timestamp,
        message_type=message.task,
        app_id=message.app_id,
        headers=dict(message.headers),  # type: ignore[arg-type]
        priority=message.priority,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
    )


def publish_frames(channel: int, method: bytes, message: Message, max_body: int) -> bytes:
    """Every frame of one publish on `channel` (`method`: the Basic.Publish frame of its route),
    the bytes aiormq's basic_publish would write."""
    body = message.body
    header = _CONTENT_HEADER.pack(Basic.frame_id, 0, len(body)) + properties(message)
    frames = [method, frame(FRAME_HEADER, channel, header)]
    for start in range(0, len(body), max_body):
        frames.append(frame(FRAME_BODY, channel, body[start : start + max_body]))
    return b"".join(frames)


def method_frame(channel: int, exchange: str, routing_key: str) -> bytes:
    """The Basic.Publish frame of a mandatory publish to `exchange` with `routing_key`."""
    return frame(FRAME_METHOD, channel, _PUBLISH + _shortstr(exchange) + _shortstr(routing_key) + _MANDATORY)


#: aiormq's channel state the direct path takes part in (tags, confirm futures, returns, writes).
_AIORMQ_CHANNEL_STATE = ("delivery_tag", "confirmations", "message_id_delivery_tag", "write_queue", "number")


class Publisher:
    """Publishes on one aiormq channel with publisher confirms (made again for a new channel)."""

    def __init__(self, channel: aiormq.Channel) -> None:
        self.channel = channel
        # The direct path uses what aiormq 7 keeps per channel; an aiormq without it gets its own way.
        self._direct = all(hasattr(channel, name) for name in _AIORMQ_CHANNEL_STATE)
        self._methods: dict[tuple[str, str], bytes] = {}
        # Publishes waiting for room in the write queue, in tag order; one task puts them there.
        self._waiting: list[bytes] = []
        self._putting: asyncio.Task[None] | None = None

    async def publish(self, exchange: str, routing_key: str, message: Message) -> ConfirmationFrameType | None:
        """Publish `message` persistent and mandatory; return the broker's confirm (raise what
        aiormq raises for a nack, a return, or a closed channel)."""
        return await self.send(exchange, routing_key, message)

    def send(self, exchange: str, routing_key: str, message: Message) -> asyncio.Future[ConfirmationFrameType | None]:
        """Send `message` persistent and mandatory; the future of the broker's confirm. Once this
        returns, the message is on its way (raises, sending nothing, on a closed channel)."""
        channel = self.channel
        if not self._direct or not message.message_id or not channel.publisher_confirms:
            return asyncio.ensure_future(self._through_aiormq(exchange, routing_key, message))
        if channel.is_closed:
            raise aiormq.exceptions.ChannelInvalidStateError(f"{channel!r} closed")
        method = self._methods.get((exchange, routing_key))
        if method is None:
            method = self._methods[exchange, routing_key] = method_frame(channel.number, exchange, routing_key)
        payload = publish_frames(channel.number, method, message, channel.max_content_size)
        # The tag is taken now, and the frames go out in the order tags are taken: straight into
        # the write queue when nothing waits and there is room, else behind what waits.
        channel.delivery_tag += 1
        tag = channel.delivery_tag
        confirmation: asyncio.Future[ConfirmationFrameType | None] = channel.create_future()
        channel.confirmations[tag] = confirmation
        message_id = message.message_id
        channel.message_id_delivery_tag[message_id] = tag

        def forget(_: object) -> None:
            if channel.message_id_delivery_tag.get(message_id) == tag:
                del channel.message_id_delivery_tag[message_id]

        confirmation.add_done_callback(forget)
        if self._putting is None and not channel.write_queue.full():
            channel.write_queue.put_nowait(ChannelFrame(payload, False))
        else:
            self._waiting.append(payload)
            if self._putting is None:
                self._putting = asyncio.get_running_loop().create_task(self._put_waiting())
        return confirmation

    async def _put_waiting(self) -> None:
        """Put what waits into the write queue, oldest first, as one frame group per turn."""
        channel = self.channel
        try:
            while self._waiting and not channel.is_closed:  # closed: their confirms are rejected with it
                frames, self._waiting = b"".join(self._waiting), []
                await channel.write_queue.put(ChannelFrame(frames, False))
        finally:
            self._waiting = []
            self._putting = None

    async def marker(self, queue: str) -> ConfirmationFrameType | None:
        """Publish an empty transient mandatory message to `queue` (a rate limiter's permit) through
        aiormq, once what waits here is in the write queue; the broker's confirm (aiormq raises
        DeliveryError for a nack, PublishError for a return)."""
        while self._putting is not None:
            await asyncio.shield(self._putting)
        return await self.channel.basic_publish(
            b"", routing_key=queue, properties=Basic.Properties(delivery_mode=1), mandatory=True
        )

    async def _through_aiormq(self, exchange: str, routing_key: str, message: Message) -> ConfirmationFrameType | None:
        """aiormq's own way, once what waits here is in the write queue (its tag comes after
        theirs). aiormq makes up a message id for a message without one: returns are told by it."""
        while self._putting is not None:
            await asyncio.shield(self._putting)
        return await self.channel.basic_publish(
            message.body,
            exchange=exchange,
            routing_key=routing_key,
            properties=pamqp_properties(message),
            mandatory=True,
        )
