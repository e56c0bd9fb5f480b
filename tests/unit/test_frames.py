"""The publish frames nobs_amqp builds itself (`nobs_amqp.transports.amqp.frames`): byte for byte what aiormq's
basic_publish writes for the same message, and delivery tags taken in the order the frames are
queued, against a fake aiormq channel.

No broker: these run in `pytest -m "not rabbitmq"`.
"""

from __future__ import annotations

import asyncio
import random
from collections import OrderedDict
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, cast

import aiormq
import pamqp.frame
import pytest
from aiormq.abc import ChannelFrame
from pamqp import encode
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from nobs_amqp import message as wire
from nobs_amqp.message import Message, Reason
from nobs_amqp.transports.amqp import frames

NOW = datetime(2026, 11, 29, 6, 30, 15, 123456, tzinfo=UTC)


def aiormq_frames(channel: int, exchange: str, key: str, message: Message, max_body: int) -> bytes:
    """What aiormq's basic_publish writes (aiormq 7: ChannelFrame.marshall of these frames)."""
    properties = Basic.Properties(
        content_type="application/json",
        delivery_mode=2,
        message_id=message.message_id,
        timestamp=message.timestamp,
        message_type=message.task,
        app_id=message.app_id,
        headers=dict(message.headers),  # type: ignore[arg-type]
        priority=message.priority,
    )
    body = message.body
    parts: list[Any] = [
        Basic.Publish(exchange=exchange, routing_key=key, mandatory=True),
        ContentHeader(properties=properties, body_size=len(body)),
    ]
    parts += [ContentBody(body[i : i + max_body]) for i in range(0, len(body), max_body)]
    return ChannelFrame.marshall(channel_number=channel, frames=parts).payload


def ours(channel: int, exchange: str, key: str, message: Message, max_body: int) -> bytes:
    return frames.publish_frames(channel, frames.method_frame(channel, exchange, key), message, max_body)


def messages() -> list[Message]:
    first = wire.new_message(b'{"email":"a@b.c"}', "tests.apps.tasks:record", "nobs-test", now=NOW)
    delayed = wire.new_message(b"{}", "tests.apps.tasks:record", "nobs-test", now=NOW, delay=300, priority=7)
    retry = wire.retry_copy(replace(first, headers={**first.headers, "traceparent": "00-ab-cd-01"}), 4, now=NOW)
    dead = wire.dead_letter_copy(first, Reason.REJECTED, ValueError("blåbær\nsyltetøy"), now=NOW)
    odd_headers: dict[str, object] = {
        "x-nobs-attempt": 1,
        "flag": True,
        "off": False,
        "nothing": None,
        "small": -129,
        "short": 40000,
        "int32": -(2**31),
        "uint32": 2**32 - 1,
        "int64": 2**62,
        "unicode": "€ø",
        "": "empty key",
    }
    unusual: list[dict[str, object]] = [
        {"float": 1.5},
        {"decimal": Decimal("3.14")},
        {"nested": {"a": [1, "two"]}},
        {"when": NOW},
        {"k" * 200: "a key pamqp truncates"},
    ]
    return [
        first,
        delayed,
        retry,
        dead,
        replace(first, headers=odd_headers),
        replace(first, headers={}),
        replace(first, priority=0),
        replace(first, timestamp=datetime(2026, 1, 1, 12)),  # naive: UTC
        replace(first, timestamp=datetime(2026, 1, 1, 12, tzinfo=timezone(timedelta(hours=-5)))),
        replace(first, task="", app_id=""),
        replace(first, body=b""),
        replace(first, body=bytes(range(256)) * 600),  # several body frames
        *(replace(first, headers={**first.headers, **extra}) for extra in unusual),
    ]


@pytest.mark.parametrize("message", messages(), ids=lambda m: f"{len(m.headers)}h-{len(m.body)}b")
@pytest.mark.parametrize(("exchange", "key"), [("", "w"), ("p.delay.03", "0.0.1.1.w"), ("w.dlx", "")])
def test_the_frames_are_what_aiormq_writes(message: Message, exchange: str, key: str) -> None:
    for channel, max_body in ((1, 131064), (7, 4088), (65535, 1000)):
        assert ours(channel, exchange, key, message, max_body) == aiormq_frames(
            channel, exchange, key, message, max_body
        )


def test_random_headers_encode_as_pamqp_encodes_them() -> None:
    rng = random.Random(29)
    values = [0, 1, -1, 127, 128, -128, 255, 256, 65535, 65536, 2**31, -(2**31) - 1, 2**40, True, False, None]
    base = messages()[0]
    for _ in range(500):
        headers = {
            "".join(rng.choice("xnobs-é:") for _ in range(rng.randrange(0, 12))): rng.choice(
                [*values, "".join(rng.choice("aø€\n ") for _ in range(rng.randrange(0, 30)))]
            )
            for _ in range(rng.randrange(0, 6))
        }
        message = replace(base, headers=headers, message_id=f"{rng.random()}")
        assert ours(3, "", "q", message, 131064) == aiormq_frames(3, "", "q", message, 131064)


def test_pamqp_refuses_what_it_always_refused() -> None:
    base = messages()[0]
    for message in (replace(base, task="t" * 256), replace(base, headers={"big": 2**64})):
        with pytest.raises(TypeError):
            frames.properties(message)


def test_deprecated_integer_types_are_left_to_pamqp(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(encode, "DEPRECATED_RABBITMQ_SUPPORT", True)
    message = replace(messages()[0], headers={"n": 40000})
    assert ours(1, "", "w", message, 131064) == aiormq_frames(1, "", "w", message, 131064)


class FakeChannel:
    """What `Publisher` uses of an aiormq channel: the write queue (bounded, as aiormq's), the
    delivery tag, the confirms and the returns' message ids."""

    def __init__(self, room: int = 10) -> None:
        self.write_queue: asyncio.Queue[ChannelFrame] = asyncio.Queue(maxsize=room)
        self.delivery_tag = 0
        self.confirmations: OrderedDict[int, asyncio.Future[Any]] = OrderedDict()
        self.message_id_delivery_tag: dict[str, int] = {}
        self.publisher_confirms = True
        self.is_closed = False
        self.number = 1
        self.max_content_size = 131064
        self.basic_publishes: list[str] = []

    def create_future(self) -> asyncio.Future[Any]:
        return asyncio.get_running_loop().create_future()

    async def basic_publish(self, body: bytes, **kwargs: Any) -> Basic.Ack:
        self.basic_publishes.append(kwargs["routing_key"])
        return Basic.Ack()

    async def broker(self, count: int) -> list[str]:
        """Take `count` publishes off the write queue, slowly, as the broker numbers them (the
        n-th is tag n: its message id must be mapped to n) and confirm each; their message ids."""
        written: list[str] = []
        while len(written) < count:
            await asyncio.sleep(0)
            payload = (await self.write_queue.get()).payload
            while payload:
                consumed, _, frame = pamqp.frame.unmarshal(payload)
                payload = payload[consumed:]
                if isinstance(frame, ContentHeader):
                    tag = len(written) + 1
                    message_id = frame.properties.message_id or ""
                    assert self.message_id_delivery_tag[message_id] == tag
                    written.append(message_id)
                    self.confirmations.pop(tag).set_result(Basic.Ack(delivery_tag=tag))
        return written


async def test_tags_follow_the_order_on_the_wire_when_the_queue_is_full() -> None:
    channel = FakeChannel(room=3)
    publisher = frames.Publisher(cast(aiormq.Channel, channel))
    sent = [wire.new_message(b"{}", "m:f", "p", now=NOW) for _ in range(50)]
    broker = asyncio.create_task(channel.broker(len(sent)))
    results = await asyncio.gather(*(publisher.publish("", "w", m) for m in sent))
    assert all(isinstance(r, Basic.Ack) for r in results)
    written = await broker
    assert sorted(written) == sorted(m.message_id for m in sent)
    assert channel.delivery_tag == 50
    assert not channel.message_id_delivery_tag  # every return mapping forgotten once confirmed


async def test_publishes_that_wait_for_room_go_out_together_in_tag_order() -> None:
    channel = FakeChannel(room=2)
    publisher = frames.Publisher(cast(aiormq.Channel, channel))
    sent = [wire.new_message(b"{}", "m:f", "p", now=NOW) for _ in range(20)]
    publishing = [asyncio.create_task(publisher.publish("", "w", m)) for m in sent]
    await asyncio.sleep(0)
    assert channel.delivery_tag == 20 and channel.write_queue.qsize() == 2  # two alone, then one group
    written = await channel.broker(20)
    assert written == [m.message_id for m in sent]
    await asyncio.gather(*publishing)
    assert channel.write_queue.empty()


async def test_a_message_without_an_id_goes_through_aiormq_after_what_waits() -> None:
    channel = FakeChannel(room=1)
    publisher = frames.Publisher(cast(aiormq.Channel, channel))
    sent = [wire.new_message(b"{}", "m:f", "p", now=NOW) for _ in range(3)]
    publishing = [asyncio.create_task(publisher.publish("", "w", m)) for m in sent]
    await asyncio.sleep(0)
    anonymous = asyncio.create_task(publisher.publish("", "x", replace(sent[0], message_id="")))
    await asyncio.sleep(0)
    assert channel.basic_publishes == []  # behind the two that wait
    assert await channel.broker(3) == [m.message_id for m in sent]
    await asyncio.gather(*publishing, anonymous)
    assert channel.basic_publishes == ["x"] and channel.delivery_tag == 3


async def test_a_closed_channel_is_said_so_as_aiormq_says_it() -> None:
    channel = FakeChannel()
    channel.is_closed = True
    publisher = frames.Publisher(cast(aiormq.Channel, channel))
    with pytest.raises(aiormq.exceptions.ChannelInvalidStateError):
        await publisher.publish("", "w", wire.new_message(b"{}", "m:f", "p", now=NOW))
