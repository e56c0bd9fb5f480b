"""Total decoding of message properties, below aio-pika.

pamqp decodes a content header in the connection's reader: one property it cannot
decode (a `timestamp` beyond Python's datetime, a non-UTF-8 `type` or header key,
headers nested deeper than the recursion limit) raises there and takes the whole
connection down, on every delivery of that message. `install()` makes the decoding
total: pamqp's own decoding first, unchanged; only when it fails, property by property,
each undecodable value skipped by its wire width and left out, and the message marked
with the `x-nobs-undecodable` header, which says what failed and why (the consumer
dead-letters such a message).

It is also faster: properties of the usual shapes, `Basic.Deliver` and `Basic.Ack` frames are decoded by
a fast path here that gives exactly what pamqp gives (pamqp's generic decoders, a dispatch and
a copy of the rest of the data per value, are most of a worker's decoding time); anything else
goes to pamqp as before.
"""

from __future__ import annotations

import datetime
import struct
from collections.abc import Callable

from pamqp import base, common, decode
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from ...message import UNDECODABLE

MAX_NOTE = 1000
MAX_QUOTE = 60

_PAMQP_UNMARSHAL = base.BasicProperties.unmarshal
_PAMQP_HEADER_UNMARSHAL = ContentHeader.__dict__["unmarshal"]  # the original, even after install()
_PAMQP_METHOD_UNMARSHAL = base.Frame.unmarshal
_DELIVER_FIXED = struct.Struct(">qB")  # delivery tag (signed, as pamqp reads it), then the redelivered bit
_FIXED = {"bit": 0, "octet": 1, "short": 2, "long": 4, "longlong": 8, "timestamp": 8}
_LENGTH_PREFIX = {"shortstr": 1, "longstr": 4, "table": 4}
# Field value widths by type tag (RabbitMQ's errata); None: a 4-byte length follows.
_TAGGED: dict[bytes, int | None] = {
    b"t": 1, b"b": 1, b"B": 1, b"s": 2, b"u": 2, b"I": 4, b"i": 4, b"l": 8, b"L": 8,
    b"f": 4, b"d": 8, b"D": 5, b"T": 8, b"V": 0, b"\x00": 0,
    b"S": None, b"A": None, b"F": None, b"x": None,
}  # fmt: skip
_NAMES = {"message_type": "type"}  # the AMQP name where pamqp's differs
_LOOKS_LIKE = (("milliseconds", 10**3), ("microseconds", 10**6), ("nanoseconds", 10**9))


def install() -> None:
    """Make every `Basic.Properties` decode totally in this process, and `Basic.Deliver` and
    `Basic.Ack` (the publisher confirm) through the fast path (idempotent)."""
    Basic.Properties.unmarshal = _unmarshal  # type: ignore[method-assign,assignment]
    ContentHeader.unmarshal = _unmarshal_content_header  # type: ignore[method-assign]
    Basic.Deliver.unmarshal = _unmarshal_deliver  # type: ignore[method-assign,assignment]
    Basic.Ack.unmarshal = _unmarshal_ack  # type: ignore[method-assign,assignment]


def _unmarshal_ack(self: Basic.Ack, data: bytes) -> None:
    """A Basic.Ack (a publisher confirm: delivery tag, multiple) as pamqp decodes it."""
    try:
        delivery_tag, bits = _DELIVER_FIXED.unpack_from(data)
    except struct.error:
        _PAMQP_METHOD_UNMARSHAL(self, data)
        return
    self.delivery_tag = delivery_tag
    self.multiple = bits & 1 != 0


def _unmarshal_deliver(self: Basic.Deliver, data: bytes) -> None:
    """A Basic.Deliver (consumer tag, delivery tag, redelivered, exchange, routing key) as pamqp
    decodes it; pamqp's own decoding for one that does not add up."""
    try:
        tag_at = 1 + data[0]
        exchange_at = tag_at + 9
        key_at = exchange_at + 1 + data[exchange_at]
        end = key_at + 1 + data[key_at]
        if end > len(data):
            raise IndexError(end)
        consumer_tag = data[1:tag_at].decode()
        delivery_tag, bits = _DELIVER_FIXED.unpack_from(data, tag_at)
        exchange = data[exchange_at + 1 : key_at].decode()
        routing_key = data[key_at + 1 : end].decode()
    except (IndexError, UnicodeDecodeError, struct.error):
        _PAMQP_METHOD_UNMARSHAL(self, data)
        return
    self.consumer_tag = consumer_tag
    self.delivery_tag = delivery_tag
    self.redelivered = bits & 1 != 0
    self.exchange = exchange
    self.routing_key = routing_key


def unmarshal(flags: int, data: bytes) -> Basic.Properties:
    """The properties of a content header (`flags`, then the property block `data`); never raises."""
    properties = Basic.Properties()
    _unmarshal(properties, flags, data)
    return properties


def _unmarshal(self: Basic.Properties, flags: int, data: bytes) -> None:
    problems: list[str] = []
    if not _fast(self, flags, data):
        try:
            _PAMQP_UNMARSHAL(self, flags, data)
        except Exception:  # noqa: BLE001 - any failure: decode again, one property at a time
            problems = _decode_each(self, flags, data)
    problems += _refused_by_aio_pika(self)
    if problems:
        note = "undecodable properties: " + "; ".join(problems)
        self.headers = {**(self.headers or {}), UNDECODABLE: _cap(note, MAX_NOTE)}


# -- the fast path: what pamqp decodes, the same, for properties of the usual shapes -------------

_UINT32 = struct.Struct(">I")
_TIMESTAMP_VALUE = struct.Struct(">Q")


class _UnusualShapeError(Exception):
    """Not a shape the fast path decodes: pamqp's own decoding takes it."""


def _shortstr(data: bytes, offset: int) -> tuple[int, object]:
    stop = offset + 1 + data[offset]
    if stop > len(data):
        raise _UnusualShapeError
    return stop, data[offset + 1 : stop].decode()


def _octet(data: bytes, offset: int) -> tuple[int, object]:
    return offset + 1, data[offset]


def _timestamp(data: bytes, offset: int) -> tuple[int, object]:
    seconds: float = _TIMESTAMP_VALUE.unpack_from(data, offset)[0]
    if seconds > 0xFFFFFFFF:  # pamqp's reading: probably milliseconds
        seconds /= 1000.0
    return offset + 8, datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC)


def _table(data: bytes, offset: int) -> tuple[int, object]:
    """A field table of usual values (strings, integers, booleans, voids, times, and tables and
    arrays of them: what RabbitMQ's x-death is made of), as pamqp decodes it."""
    stop = offset + 4 + _UINT32.unpack_from(data, offset)[0]
    if stop > len(data):
        raise _UnusualShapeError
    table: dict[str, object] = {}
    at = offset + 4
    while at < stop:
        key_end = at + 1 + data[at]
        if key_end >= stop:
            raise _UnusualShapeError
        key = data[at + 1 : key_end].decode()
        at, table[key] = _field_value(data, key_end)
        if at > stop:
            raise _UnusualShapeError
    return stop, table


def _array(data: bytes, offset: int) -> tuple[int, object]:
    stop = offset + 4 + _UINT32.unpack_from(data, offset)[0]
    if stop > len(data):
        raise _UnusualShapeError
    array: list[object] = []
    at = offset + 4
    while at < stop:
        at, value = _field_value(data, at)
        array.append(value)
    if at != stop:
        raise _UnusualShapeError
    return stop, array


def _longstr(data: bytes, at: int) -> tuple[int, object]:
    end = at + 4 + _UINT32.unpack_from(data, at)[0]
    raw = data[at + 4 : end]
    try:
        return end, raw.decode()
    except UnicodeDecodeError:
        return end, raw


def _boolean(data: bytes, at: int) -> tuple[int, object]:
    return at + 1, bool(data[at])


def _void(data: bytes, at: int) -> tuple[int, object]:
    return at, None


def _number(number: struct.Struct) -> Callable[[bytes, int], tuple[int, object]]:
    def decoded(data: bytes, at: int) -> tuple[int, object]:
        return at + number.size, number.unpack_from(data, at)[0]

    return decoded


# Field values by tag, as pamqp decodes them (integer widths as in pamqp, 'L' signed as there).
_FIELDS: dict[int, Callable[[bytes, int], tuple[int, object]]] = {
    **{ord(tag): _number(struct.Struct(form)) for tag, form in (
        ("b", ">b"), ("B", ">B"), ("s", ">h"), ("u", ">H"), ("I", ">l"), ("i", ">L"), ("l", ">q"), ("L", ">q"),
    )},
    ord("S"): _longstr, ord("t"): _boolean, ord("V"): _void, ord("T"): _timestamp, ord("F"): _table, ord("A"): _array,
}  # fmt: skip


def _field_value(data: bytes, at: int) -> tuple[int, object]:
    """The tagged value at `at`."""
    decoder = _FIELDS.get(data[at])
    if decoder is None:
        raise _UnusualShapeError
    return decoder(data, at + 1)


_DECODERS = {"shortstr": _shortstr, "octet": _octet, "table": _table, "timestamp": _timestamp}
_LAYOUT = tuple(
    (name, Basic.Properties.flags[name], _DECODERS[getattr(Basic.Properties, "_" + name)])
    for name in Basic.Properties.__slots__
)


def _fast(properties: Basic.Properties, flags: int, data: bytes) -> bool:
    """Decode `data` as pamqp would, for properties of the shapes messages normally have: short
    strings, octets, a timestamp, a header table of plain values, all of them whole. True when it
    did; False (and `properties` untouched) for anything else, which pamqp's own decoding (and,
    if that fails, the total one) then handles."""
    if flags & 0x3 or not -0x8000 <= flags < 0x8000:  # one flag word (pamqp reads it signed), no more
        return False
    decoded: list[tuple[str, object]] = []
    offset = 0
    try:
        for name, bit, decoder in _LAYOUT:
            if flags & bit:
                offset, value = decoder(data, offset)
                decoded.append((name, value))
    except (_UnusualShapeError, IndexError, ValueError, OverflowError, OSError, RecursionError, struct.error):
        return False  # UnicodeDecodeError is a ValueError
    for name, value in decoded:
        setattr(properties, name, value)
    return True


def _unmarshal_content_header(self: ContentHeader, data: bytes) -> None:
    try:
        _PAMQP_HEADER_UNMARSHAL(self, data)
    except ValueError:
        if self.class_id is None:
            raise  # not even a body size: the frame stream itself is broken
        # The flag words are cut short; the body size before them is good.
        self.properties = Basic.Properties(headers={UNDECODABLE: "undecodable properties: the flags are truncated"})


def _decode_each(properties: Basic.Properties, flags: int, data: bytes) -> list[str]:
    """Decode what can be decoded; say why for the rest."""
    fresh = Basic.Properties()
    for name in properties.__slots__:
        setattr(properties, name, getattr(fresh, name))
    problems: list[str] = []
    offset = 0
    for name in properties.__slots__:
        if not flags & properties.flags[name]:
            continue
        kind: str = getattr(type(properties), "_" + name)
        label = _NAMES.get(name, name)
        width = _width(kind, data, offset)
        if width is None:
            problems.append(f"{label} and what follows: truncated, not decoded")
            break
        raw = data[offset : offset + width]
        offset += width
        if kind == "table":  # the headers: entry by entry, so one bad entry costs only itself
            properties.headers, lost = _partial_table(raw)
            problems += lost
            continue
        try:
            setattr(properties, name, decode.by_type(raw, kind)[1])
        except Exception as exc:  # noqa: BLE001 - OverflowError, ValueError, ...
            problems.append(f"{label}: {_why(kind, raw, exc)}")
    return problems


def _width(kind: str, data: bytes, offset: int) -> int | None:
    """How many bytes the value of `kind` at `offset` takes; None when `data` ends first."""
    if kind in _FIXED:
        width = _FIXED[kind]
    else:
        prefix = _LENGTH_PREFIX[kind]
        if offset + prefix > len(data):
            return None
        width = prefix + int.from_bytes(data[offset : offset + prefix], "big")
    return width if offset + width <= len(data) else None


def _value_width(data: bytes, offset: int, end: int) -> int | None:
    """How many bytes the tagged field value at `offset` takes, tag included; None if unknown."""
    if offset >= end or (size := _TAGGED.get(data[offset : offset + 1], -1)) == -1:
        return None
    if size is None:
        if offset + 5 > end:
            return None
        size = 4 + int.from_bytes(data[offset + 1 : offset + 5], "big")
    return 1 + size if offset + 1 + size <= end else None


def _partial_table(raw: bytes) -> tuple[common.FieldTable, list[str]]:
    """The top-level entries of a field table that decode, and why the others did not."""
    table: common.FieldTable = {}
    problems: list[str] = []
    offset, end = 4, len(raw)
    while offset < end:
        key = raw[offset + 1 : offset + 1 + raw[offset]]
        offset += 1 + raw[offset]
        width = _value_width(raw, offset, end)
        if width is None:
            problems.append(f"headers from {_quote(key)} on: cannot be read, left out")
            break
        value = raw[offset : offset + width]
        offset += width
        try:
            table[key.decode()] = decode.embedded_value(value)[1]
        except Exception as exc:  # noqa: BLE001 - this entry only: the next one starts at `offset`
            why = "key is not UTF-8, left out" if isinstance(exc, UnicodeError) else _why("", value, exc)
            problems.append(f"header {_quote(key)}: {why}")
    return table, problems


def _why(kind: str, raw: bytes, exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deep to decode, left out"
    if kind == "timestamp":
        return _timestamp_why(int.from_bytes(raw, "big"))
    if isinstance(exc, UnicodeError):
        return f"{_quote(raw[_LENGTH_PREFIX.get(kind, 0) :])} is not UTF-8, left out"
    return f"{_safe(str(exc) or type(exc).__name__)}, left out"


def _timestamp_why(value: int) -> str:
    why = f"{value} is out of range, left out (AMQP timestamps are seconds since 1970"
    for unit, per_second in _LOOKS_LIKE:
        if 1971 <= _year(value // per_second) <= 2200:
            return f"{why}; this looks like {unit})"
    return why + ")"


def _year(seconds: int) -> int:
    try:
        return datetime.datetime.fromtimestamp(seconds, datetime.UTC).year
    except (OverflowError, ValueError, OSError):
        return 0


def _refused_by_aio_pika(properties: Basic.Properties) -> list[str]:
    """Values pamqp decodes but aio-pika's IncomingMessage raises on: left out too."""
    problems = []
    if properties.delivery_mode not in (None, 0, 1, 2):
        problems.append(f"delivery_mode: {properties.delivery_mode} is not 1 or 2, left out")
        properties.delivery_mode = None
    if properties.expiration is not None:
        try:
            float(properties.expiration)
        except ValueError:
            problems.append(f"expiration: {_quote(properties.expiration.encode())} is not a number, left out")
            properties.expiration = None
    return problems


def _quote(raw: bytes) -> str:
    """`raw` as safe, readable text in quotes: invalid UTF-8 and control characters escaped, capped."""
    return f"'{_safe(raw.decode('utf-8', 'backslashreplace'))}'"


def _safe(text: str) -> str:
    text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)
    return _cap(text, MAX_QUOTE)


def _cap(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
