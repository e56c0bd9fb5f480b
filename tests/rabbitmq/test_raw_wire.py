"""Messages whose properties a normal client cannot even encode, published as raw AMQP frames.

One such message used to take the consumer's whole connection down on every delivery
(pamqp raised in the connection's reader). Now the property decoding is total
(nobs_amqp.transports.amqp.decoding): the message goes to W.dlq as `decode_error`, the worker keeps its
one connection, and the healthy tasks around it run exactly once.
"""

from __future__ import annotations

import logging
import random
import struct
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import aio_pika
import aiormq
import orjson
import pamqp.frame
import pytest
from pamqp import base
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from nobs_amqp import Project, Worker
from nobs_amqp.message import UNDECODABLE
from nobs_amqp.ops import dlq as dead
from nobs_amqp.transports.amqp import decoding

from .. import wire
from ..apps import tasks
from ..support import Broker, eventually, run_cli, underlay_connections
from ..wire import RawPublisher, RefusedError, longstr, raw_properties, shortstr, table, timestamp

PROJECT = "nobs-test"
APP = "tests.apps.cli_app:project"
RECORD = b"tests.apps.tasks:record"
REJECT = b"tests.apps.tasks:reject"
VALID = 50


def make(name: str, **options: Any) -> tuple[Project, Worker]:
    worker = Worker(name, **options)
    return Project(name=PROJECT, workers=[worker], packages=["tests"]), worker


def deep(levels: int) -> bytes:
    """A tagged field table nested `levels` deep."""
    value = b"b\x01"
    for _ in range(levels):
        value = b"F" + table([(b"k", value)])
    return value


def attempt_header(*more: tuple[bytes, bytes]) -> bytes:
    return table([(b"x-nobs-attempt", b"b\x01"), *more])


def message_properties(message_id: str, task: bytes = RECORD, **override: bytes) -> bytes:
    """The property block nobs_amqp would send, with `override` (raw values) on top."""
    values = {
        "content_type": shortstr(b"application/json"),
        "headers": attempt_header(),
        "delivery_mode": b"\x02",
        "message_id": shortstr(message_id.encode()),
        "timestamp": timestamp(1_732_860_000),
        "type": shortstr(task),
        "app_id": shortstr(PROJECT.encode()),
    }
    return raw_properties(**{**values, **override})


@dataclass(frozen=True)
class Case:
    """A hostile message: raw property values over a normal task message, and what must become of it."""

    id: str
    override: dict[str, bytes]
    outcome: str  # "decode_error": dead-lettered unrun; "rejected": ran, then dead-lettered; "ran"
    says: str = ""  # in the x-nobs-undecodable text (and so in the dead letter's error message)
    task: bytes = RECORD


CASES = [
    # pamqp reads a timestamp above 2**32 as milliseconds: this one decodes, the task just runs.
    Case("timestamp-milliseconds", {"timestamp": timestamp(1_732_860_000_000)}, "ran"),
    Case(
        "timestamp-microseconds",
        {"timestamp": timestamp(1_732_860_000_000_000)},
        "decode_error",
        "timestamp: 1732860000000000 is out of range, left out (AMQP timestamps are seconds since 1970; "
        "this looks like microseconds)",
    ),
    Case("timestamp-2**63-1", {"timestamp": timestamp(2**63 - 1)}, "decode_error", "9223372036854775807 is out of"),
    Case(
        "type-not-utf8",
        {"type": shortstr(b"tests.apps.tasks:rec\xfford")},
        "decode_error",
        "type: 'tests.apps.tasks:rec\\xfford' is not UTF-8",
    ),
    Case(
        "header-key-not-utf8",
        {"headers": attempt_header((b"x-\xff\xfe", b"S" + longstr(b"v")))},
        "decode_error",
        "header 'x-\\xff\\xfe': key is not UTF-8",
    ),
    Case(
        "header-timestamp-out-of-range",
        {"headers": attempt_header((b"x-when", b"T" + timestamp(2**63 - 1)))},
        "decode_error",
        "header 'x-when': year 292278994 is out of range",
    ),
    Case(
        "headers-5000-deep",
        {"headers": attempt_header((b"x-deep", deep(5000)))},
        "decode_error",
        "header 'x-deep': nested too deep to decode",
    ),
    # These decode (pamqp gives bytes for a non-UTF-8 long string, and a double is a double);
    # the task runs and rejects it: its dead-letter copy must still be publishable.
    Case(
        "header-array-not-utf8",
        {"headers": attempt_header((b"x-nobs-raw", b"A" + wire.array([b"S" + longstr(b"\xff\xfe")])))},
        "rejected",
        task=REJECT,
    ),
    Case(
        "header-double-1e300",
        {"headers": attempt_header((b"x-nobs-big", b"d" + struct.pack(">d", 1e300)))},
        "rejected",
        task=REJECT,
    ),
]


# -- the decoder alone ------------------------------------------------------------------------


def split(block: bytes) -> tuple[int, bytes]:
    """A property block as ContentHeader.unmarshal hands it on: flags, then the values."""
    consumed, flags = ContentHeader._get_flags(block)
    return flags, block[consumed:]


def pamqp_decode(block: bytes) -> Basic.Properties:
    properties = Basic.Properties()
    base.BasicProperties.unmarshal(properties, *split(block))
    return properties


def incoming(properties: Basic.Properties) -> aio_pika.IncomingMessage:
    """What aio-pika makes of a delivery with `properties` (its constructor converts some)."""
    header = ContentHeader(body_size=2, properties=properties)
    delivery = Basic.Deliver(consumer_tag="c", delivery_tag=1, exchange="", routing_key="q")
    return aio_pika.IncomingMessage(aiormq.abc.DeliveredMessage(delivery, header, b"{}", None))  # type: ignore[arg-type]


VALID_PROPERTIES = [
    Basic.Properties(),
    Basic.Properties(
        content_type="application/json",
        content_encoding="utf-8",
        headers={
            "x-nobs-attempt": 3,
            "text": "blåbærsyltetøy",
            "big": 2**62,
            "negative": -40000,
            "flag": True,
            "nested": {"list": [1, "two", {"three": None}], "when": datetime(2024, 11, 29, tzinfo=UTC)},
            "decimal": Decimal("3.14"),
        },
        delivery_mode=2,
        priority=7,
        correlation_id="c" * 255,
        reply_to="amq.rabbitmq.reply-to",
        expiration="60000",
        message_id=uuid.uuid4().hex,
        timestamp=datetime(2024, 11, 29, 6, tzinfo=UTC),
        message_type="tests.apps.tasks:record",
        user_id="guest",
        app_id="nobs-test",
    ),
]


def random_properties(rng: random.Random) -> Basic.Properties:
    def text() -> str:
        return "".join(rng.choice("aøZ:-_ 9€") for _ in range(rng.randrange(0, 40)))

    candidates: dict[str, Any] = {
        "content_type": text(),
        "headers": {text()[:20] or "k": rng.choice([1, -1, 2**40, text(), True, None, [text()], {"a": 1}])},
        "delivery_mode": rng.choice([1, 2]),
        "priority": rng.randrange(0, 256),
        "message_id": text(),
        "timestamp": datetime.fromtimestamp(rng.randrange(0, 2**32), UTC),
        "message_type": text(),
        "expiration": str(rng.randrange(0, 10**9)),
    }
    return Basic.Properties(**{k: v for k, v in candidates.items() if rng.random() < 0.6})


@pytest.mark.timeout(30)
def test_valid_properties_decode_exactly_as_pamqp_decodes_them() -> None:
    rng = random.Random(20241129)
    examples = VALID_PROPERTIES + [random_properties(rng) for _ in range(500)]
    for properties in examples:
        block = properties.marshal()
        ours = decoding.unmarshal(*split(block))
        assert ours == pamqp_decode(block), properties
        assert not (ours.headers or {}).get(UNDECODABLE)


@pytest.mark.timeout(60)
def test_the_fast_path_decodes_exactly_as_pamqp_or_not_at_all() -> None:
    """decoding's fast path (usual shapes only) agrees with pamqp wherever it answers, and
    answers for the properties nobs_amqp itself sends."""
    rng = random.Random(11)
    valid = [p.marshal() for p in VALID_PROPERTIES] + [random_properties(rng).marshal() for _ in range(300)]
    valid += [message_properties(uuid.uuid4().hex), message_properties("x", headers=attempt_header(
        (b"x-nobs-enqueued-at", b"S" + longstr(b"2024-11-29T06:00:00.000Z")),
        (b"x-delivery-count", b"l" + struct.pack(">q", 3)),
        (b"raw", b"S" + longstr(b"\xff\xfe")),
        (b"flag", b"t\x01"), (b"none", b"V"), (b"big", b"i" + struct.pack(">I", 2**32 - 1)),
    ))]  # fmt: skip
    x_death = Basic.Properties(
        headers={
            "x-nobs-attempt": 2,
            "x-death": [
                {
                    "count": 1,
                    "reason": "expired",
                    "queue": "p.delay.00",
                    "time": datetime(2024, 11, 29, tzinfo=UTC),
                    "exchange": "p.delay.00",
                    "routing-keys": ["1.w"],
                    "original-expiration": None,
                }
            ],
        },
        message_id="m",
    )
    valid.append(x_death.marshal())
    taken = 0
    for i in range(6000):
        block = bytearray(rng.choice(valid))
        if i % 3:
            for _ in range(rng.randrange(1, 4)):
                block[rng.randrange(len(block))] = rng.randrange(256)
            block = block[: rng.randrange(2, len(block) + 1)]
        if block[1] & 1:  # a continued flag word: not a property block ContentHeader would hand on
            continue
        fresh = Basic.Properties()
        if not decoding._fast(fresh, *split(bytes(block))):
            assert fresh == Basic.Properties()  # untouched
            continue
        taken += 1
        assert fresh == pamqp_decode(bytes(block)), bytes(block)
    assert taken > 1000, taken
    for block in valid[-3:]:
        assert decoding._fast(Basic.Properties(), *split(block))


@pytest.mark.timeout(30)
def test_deliver_frames_decode_exactly_as_pamqp_decodes_them() -> None:
    decoding.install()
    rng = random.Random(3)
    for i in range(3000):
        frame = Basic.Deliver(
            consumer_tag=f"ctag-{rng.random()}"[: rng.randrange(0, 30)],
            delivery_tag=rng.choice([1, 2**63 - 1, rng.randrange(2**63)]),
            redelivered=rng.random() < 0.5,
            exchange=rng.choice(["", "p.delay.00", "x" * 127]),
            routing_key=rng.choice(["", "w", "0.1.w"]),
        )
        _decodes_as_pamqp(Basic.Deliver, frame.marshal(), rng, mangle=bool(i % 2))


@pytest.mark.timeout(30)
def test_publisher_confirms_decode_exactly_as_pamqp_decodes_them() -> None:
    decoding.install()
    rng = random.Random(5)
    for i in range(2000):
        frame = Basic.Ack(delivery_tag=rng.randrange(2**63), multiple=rng.random() < 0.5)
        _decodes_as_pamqp(Basic.Ack, frame.marshal(), rng, mangle=bool(i % 2))


def _decodes_as_pamqp(kind: type[base.Frame], marshalled: bytes, rng: random.Random, *, mangle: bool) -> None:
    """Our decoding of `marshalled` (mangled and cut short if `mangle`) gives what pamqp's gives,
    or raises what pamqp's raises."""
    data = bytearray(marshalled)
    if mangle:
        data[rng.randrange(len(data))] = rng.randrange(256)
        data = data[: rng.randrange(len(data) + 1)]
    ours, theirs = kind(), kind()
    try:
        base.Frame.unmarshal(theirs, bytes(data))
    except Exception as exc:  # noqa: BLE001 - then ours raises the same
        with pytest.raises(type(exc)):
            ours.unmarshal(bytes(data))
        return
    ours.unmarshal(bytes(data))
    assert [getattr(ours, n) for n in ours.__slots__] == [getattr(theirs, n) for n in theirs.__slots__]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", [c for c in CASES if c.outcome == "decode_error"], ids=lambda c: c.id)
def test_undecodable_properties_are_left_out_and_marked(case: Case) -> None:
    block = message_properties("m-1", **case.override)
    with pytest.raises((ValueError, RecursionError)):
        pamqp_decode(block)  # what used to kill the connection
    properties = decoding.unmarshal(*split(block))
    headers = properties.headers or {}
    assert case.says in str(headers[UNDECODABLE])
    # Everything else is still there.
    assert properties.message_id == "m-1"
    assert properties.app_id == PROJECT
    assert properties.delivery_mode == 2
    assert headers["x-nobs-attempt"] == 1
    failed = {"timestamp": "timestamp", "type": "message_type"}.get(next(iter(case.override)))
    if failed:
        assert getattr(properties, failed) is None
    message = incoming(properties)  # aio-pika takes it
    assert message.headers[UNDECODABLE] == headers[UNDECODABLE]


@pytest.mark.timeout(30)
def test_a_bad_header_costs_only_its_own_entry() -> None:
    headers = table(
        [
            (b"before", b"S" + longstr(b"kept")),
            (b"x-\xff", b"b\x01"),
            (b"deep", deep(3000)),
            (b"when", b"T" + timestamp(2**64 - 1)),
            (b"after", b"I" + struct.pack(">i", 5)),
        ]
    )
    properties = decoding.unmarshal(*split(raw_properties(headers=headers, app_id=shortstr(b"app"))))
    assert properties.app_id == "app"
    assert properties.headers is not None
    note = str(properties.headers.pop(UNDECODABLE))
    assert properties.headers == {"before": "kept", "after": 5}
    for says in ("header 'x-\\xff': key is not UTF-8", "header 'deep': nested too deep", "header 'when': year"):
        assert says in note, note


@pytest.mark.timeout(30)
def test_an_unreadable_table_keeps_the_entries_before_it_and_the_properties_after_it() -> None:
    headers = table([(b"a", b"b\x01"), (b"bad", b"Z\x00\x00\x00"), (b"c", b"b\x02")])
    properties = decoding.unmarshal(*split(raw_properties(headers=headers, app_id=shortstr(b"app"))))
    assert properties.app_id == "app"
    assert properties.headers == {
        "a": 1,
        UNDECODABLE: "undecodable properties: headers from 'bad' on: cannot be read, left out",
    }


@pytest.mark.timeout(30)
def test_truncated_properties_keep_what_came_before() -> None:
    block = raw_properties(message_id=shortstr(b"id"), timestamp=b"\x00\x01", app_id=shortstr(b"app"))
    properties = decoding.unmarshal(*split(block))
    assert properties.message_id == "id"
    assert properties.timestamp is None
    assert properties.app_id is None
    assert properties.headers == {
        UNDECODABLE: "undecodable properties: timestamp and what follows: truncated, not decoded"
    }


@pytest.mark.timeout(30)
def test_values_aio_pika_would_raise_on_are_left_out_too() -> None:
    # RabbitMQ refuses both at publish (see test_what_rabbitmq_itself_refuses); another broker may not.
    block = raw_properties(delivery_mode=b"\x07", expiration=shortstr(b"soon"))
    properties = decoding.unmarshal(*split(block))
    assert properties.delivery_mode is None
    assert properties.expiration is None
    note = str((properties.headers or {})[UNDECODABLE])
    assert "delivery_mode: 7 is not 1 or 2" in note
    assert "expiration: 'soon' is not a number" in note
    incoming(properties)


@pytest.mark.timeout(60)
def test_garbage_never_raises_and_aio_pika_takes_whatever_comes_out() -> None:
    decoding.install()
    rng = random.Random(7)
    valid = [p.marshal() for p in VALID_PROPERTIES] + [message_properties("x", **c.override) for c in CASES]
    for i in range(3000):
        if i % 2:
            block = bytearray(rng.choice(valid))
            for _ in range(rng.randrange(1, 6)):
                block[rng.randrange(len(block))] = rng.randrange(256)
            block = block[: rng.randrange(0, len(block) + 1)]
        else:
            block = bytearray(rng.randbytes(rng.randrange(60)))
        header = ContentHeader()
        header.unmarshal(struct.pack(">HHQ", 60, 0, 2) + block)
        assert header.body_size == 2
        message = incoming(header.properties)
        note = message.headers.get(UNDECODABLE)
        if note is not None:
            assert isinstance(note, str) and len(note) <= decoding.MAX_NOTE and note.isprintable(), note


@pytest.mark.timeout(30)
def test_installed_pamqp_decodes_such_a_frame() -> None:
    decoding.install()
    decoding.install()  # idempotent
    block = message_properties("m-2", timestamp=timestamp(2**63 - 1))
    frame = wire._frame(wire.FRAME_HEADER, 1, struct.pack(">HHQ", 60, 0, 2) + block)
    _, _, header = pamqp.frame.unmarshal(frame)
    assert isinstance(header, ContentHeader)
    assert header.properties.timestamp is None
    assert "9223372036854775807" in str((header.properties.headers or {})[UNDECODABLE])


@pytest.mark.timeout(30)
def test_the_note_is_capped_and_printable() -> None:
    entries = [(bytes([0xFF, i]) + b"\x1b[2J" * 20, b"b\x01") for i in range(200)]
    properties = decoding.unmarshal(*split(raw_properties(headers=table(entries))))
    note = str((properties.headers or {})[UNDECODABLE])
    assert len(note) <= decoding.MAX_NOTE
    assert note.isprintable()
    assert "\x1b" not in note


# -- against RabbitMQ ---------------------------------------------------------------------------


def job_body(key: str) -> bytes:
    return orjson.dumps({"key": key})


def lost_connections(records: list[logging.LogRecord]) -> list[str]:
    return [
        r.getMessage() for r in records if "lost the connection" in r.getMessage() or "reconnected" in r.getMessage()
    ]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("queue_type", ["quorum", "classic"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
async def test_a_hostile_message_costs_nothing_else(
    case: Case, queue_type: str, amqp_url: str, name: str, broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    project, worker = make(name, queue_type=queue_type)
    keys = [f"{name}-{i}" for i in range(VALID)]
    bad_key = f"{name}-bad"
    bad_id = uuid.uuid4().hex
    async with project:
        await project.session.declare(worker, delayed=False)
        await worker.queue_many(tasks.record, [tasks.Job(key=k) for k in keys[: VALID // 2]])
        async with RawPublisher(amqp_url) as publisher:
            block = message_properties(bad_id, case.task, **case.override)
            await publisher.publish("", name, block, job_body(bad_key))
        await worker.queue_many(tasks.record, [tasks.Job(key=k) for k in keys[VALID // 2 :]])

        [connection] = underlay_connections(project)
        async with project.consuming(worker):
            await eventually(lambda: all(tasks.calls(k) for k in keys), timeout=30)
            if case.outcome != "ran":
                await eventually(lambda: broker.count(f"{name}.dlq"), timeout=15)
            await eventually(lambda: _empty(broker, name), timeout=15)
        # The publishing connection is the one from before; the consuming one was never lost (the log).
        connections = underlay_connections(project)
        assert connections[0] is connection and len(connections) == 2
        assert not any(c.is_closed for c in connections)

    assert lost_connections(caplog.records) == []
    assert {k: len(tasks.calls(k)) for k in keys} == dict.fromkeys(keys, 1), "a healthy task ran twice or not at all"
    assert len(tasks.calls(bad_key)) == (0 if case.outcome == "decode_error" else 1)
    if case.outcome == "ran":
        assert await broker.count(f"{name}.dlq") == 0
        return
    [dead_letter] = await broker.take(f"{name}.dlq")
    headers = dict(dead_letter.headers)
    assert headers.get("x-nobs-reason") == case.outcome, headers
    assert dead_letter.message_id == bad_id
    assert orjson.loads(dead_letter.body) == {"key": bad_key}
    if case.outcome == "decode_error":
        assert case.says in str(headers.get("x-nobs-error-message")), headers
    assert await broker.count(f"{name}.dlq") == 0, "more than the one dead letter"


async def _empty(broker: Broker, queue: str) -> bool:
    return await broker.count(queue) == 0


BROKER_REFUSES = [
    ("truncated-timestamp", {"timestamp": b"\x00\x01"}, "connection", 541),
    ("shortstr-longer-than-block", {"type": b"\x40abc"}, "connection", 541),
    ("unknown-table-tag", {"headers": table([(b"x", b"Z\x00")])}, "connection", 541),
    ("table-longer-than-block", {"headers": struct.pack(">I", 1000) + b"\x01k"}, "connection", 541),
    ("delivery-mode-7", {"delivery_mode": b"\x07"}, "channel", 406),
    ("expiration-not-a-number", {"expiration": shortstr(b"soon")}, "channel", 406),
    ("user-id-of-someone-else", {"user_id": shortstr(b"mallory")}, "channel", 406),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("override", "scope", "code"), [c[1:] for c in BROKER_REFUSES], ids=[c[0] for c in BROKER_REFUSES]
)
async def test_what_rabbitmq_itself_refuses(
    override: dict[str, bytes], scope: str, code: int, amqp_url: str, name: str, broker: Broker
) -> None:
    project, worker = make(name, queue_type="classic")
    async with project:
        await project.session.declare(worker, delayed=False)
        version = project.session.transport.server_version
    if "delivery_mode" in override and version >= (4,):
        pytest.skip("RabbitMQ 4 accepts any delivery mode (3.x refuses 7 with 406)")
    async with RawPublisher(amqp_url) as publisher:
        with pytest.raises(RefusedError) as refused:
            await publisher.publish("", name, message_properties("refused", **override), b"{}")
        assert (refused.value.scope, refused.value.code) == (scope, code), refused.value
        # The publisher goes on, on a new channel or connection.
        await publisher.publish("", name, message_properties("fine"), job_body("fine"))
        assert publisher.connections == (2 if scope == "connection" else 1)
    [taken] = await broker.take(name)
    assert taken.message_id == "fine"


@pytest.mark.timeout(90)
async def test_dlq_tools_read_and_replay_undecodable_dead_letters(amqp_url: str, name: str, broker: Broker) -> None:
    """Dead letters the broker moved as they were (e.g. by its delivery limit) keep their bad
    properties: listing, showing and replaying them works, each once."""
    project, worker = make(name)
    bad = [c for c in CASES if c.outcome == "decode_error"]
    ids = {f"bad-{i}": c for i, c in enumerate(bad)} | {"good-0": None, "good-1": None}
    async with project:
        await project.session.declare(worker, delayed=False)
        async with RawPublisher(amqp_url) as publisher:
            for message_id, case in ids.items():
                rejected = {"headers": attempt_header((b"x-nobs-reason", b"S" + longstr(b"rejected")))}
                block = message_properties(message_id, **(case.override if case else rejected))
                await publisher.publish("", f"{name}.dlq", block, job_body(message_id))

        peeked = await dead.peek(project.session, worker)
        assert sorted(m.message_id for m in peeked) == sorted(ids)
        for message in peeked:
            assert (UNDECODABLE in message.headers) == message.message_id.startswith("bad-")
        assert await dead.count(project.session, worker) == len(ids)

    env = {"NOBS_AMQP_URL": amqp_url, "NOBS_TEST_WORKER": name}
    code, listed = await run_cli("--app", APP, "dlq", "list", name, env=env)
    assert code == 0, listed
    for message_id in ids:
        assert sum(line.startswith(f"{message_id} ") for line in listed.splitlines()) == 1, listed
    assert f"{len(ids)} dead letter(s) shown" in listed

    code, shown = await run_cli("--app", APP, "dlq", "show", name, "bad-1", env=env)
    assert code == 0, shown
    assert f"{UNDECODABLE}: undecodable properties: timestamp: 9223372036854775807" in shown, shown
    assert all(line.isprintable() for line in shown.splitlines()), shown

    code, replayed = await run_cli("--app", APP, "dlq", "replay", name, env=env)
    assert code == 0, replayed
    assert f"replayed {len(ids)} message(s)" in replayed, replayed
    assert "lost the connection" not in listed + shown + replayed
    assert await broker.count(f"{name}.dlq") == 0
    assert await broker.count(name) == len(ids)
