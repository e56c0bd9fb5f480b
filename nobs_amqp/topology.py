"""Broker topology as data: the names of every object and the arguments they carry.

Everything here is pure: no I/O. `amqp.py` (or the memory broker) declares what
these functions describe, in one place.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from .errors import ConfigurationError

QueueType = Literal["quorum", "classic"]
ExchangeType = Literal["direct", "fanout", "topic"]
ServerVersion = tuple[int, ...]
_T = TypeVar("_T")

#: Names users give workers and projects: they become queue and exchange names,
#: and they are words in topic routing keys, so `*` and `#` are out.
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}$")


def check_name(kind: str, name: str) -> str:
    """Return `name` if it can name a queue or project, else raise ConfigurationError."""
    if not _NAME.match(name) or name.startswith("amq.") or ".." in name or name.endswith("."):
        raise ConfigurationError(
            f"{kind} name {name!r} is not usable: use letters, digits, '_', '-' and '.' "
            f"(not starting with 'amq.', no empty words), at most 200 characters"
        )
    return name


def dead_letter_exchange(worker: str) -> str:
    return f"{worker}.dlx"


def dead_letter_queue(worker: str) -> str:
    return f"{worker}.dlq"


def cancellations(worker: str) -> str:
    """The stream of message ids cancelled with `Worker.cancel()` (a worker with `cancellable=True`)."""
    return f"{worker}.cancelled"


#: How long a cancellation is kept in `W.cancelled` (the stream's `x-max-age`), at least.
CANCEL_RETENTION = "7D"
#: Segments of `W.cancelled`: retention drops whole segments, so they are small (about 10,000 ids each).
CANCEL_SEGMENT_BYTES = 1_000_000


def unique_claim(worker: str, message_id: str, window: int) -> str:
    """The queue whose one message says `message_id` was queued to `worker` in the last `window`
    seconds (`queue(..., unique=...)`): the id is hashed, so any id makes a usable name."""
    digest = hashlib.sha256(message_id.encode()).hexdigest()[:32]
    return f"{worker}.unique.{window}.{digest}"


def unique_claim_arguments(window: int) -> dict[str, object]:
    """A classic queue holding at most one message for `window` seconds, refusing a second one
    (reject-publish nacks it), and gone a minute after the window once nobody uses it."""
    return {
        "x-queue-type": "classic",
        "x-max-length": 1,
        "x-overflow": "reject-publish",
        "x-message-ttl": window * 1000,
        "x-expires": window * 1000 + 60_000,
    }


@dataclass(frozen=True, slots=True)
class ExchangeSpec:
    name: str
    type: ExchangeType
    arguments: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class QueueSpec:
    name: str
    arguments: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Binding:
    """Bind `destination` (a queue, or an exchange when `to_exchange`) to `source`."""

    source: str
    destination: str
    routing_key: str
    to_exchange: bool = False


@dataclass(frozen=True, slots=True)
class Topology:
    """Exchanges first, then queues, then bindings: the order they must be declared in."""

    exchanges: tuple[ExchangeSpec, ...] = ()
    queues: tuple[QueueSpec, ...] = ()
    bindings: tuple[Binding, ...] = ()

    def __add__(self, other: Topology) -> Topology:
        """Both, each object once (by name; the first one's arguments win)."""
        return Topology(
            _unique(self.exchanges + other.exchanges, lambda e: e.name),
            _unique(self.queues + other.queues, lambda q: q.name),
            _unique(self.bindings + other.bindings, lambda b: b),
        )


def _unique(items: Iterable[_T], key: Callable[[_T], Hashable]) -> tuple[_T, ...]:
    return tuple({key(item): item for item in reversed(list(items))}.values())[::-1]


@dataclass(frozen=True, slots=True)
class QueueOptions:
    """What a Worker says about its queue."""

    queue_type: QueueType = "quorum"
    delivery_limit: int | None = 10
    max_priority: int | None = None
    #: Whether the worker follows a stream of cancelled ids (`W.cancelled`).
    cancellable: bool = False


def quorum_dead_letter_arguments() -> dict[str, object]:
    """At-least-once dead-lettering: the source keeps a message until the target confirmed it."""
    return {"x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}


#: From this version on, quorum queues take message priorities (two levels, no `x-max-priority`).
QUORUM_PRIORITIES = (4,)


def worker_topology(worker: str, options: QueueOptions, server: ServerVersion) -> Topology:
    """The queue `W`, its dead-letter exchange `W.dlx` and dead-letter queue `W.dlq`.
    ConfigurationError for priorities on a quorum queue of a broker older than 4.0."""
    dlx = dead_letter_exchange(worker)
    dlq = dead_letter_queue(worker)
    main: dict[str, object] = {"x-queue-type": options.queue_type, "x-dead-letter-exchange": dlx}
    dead: dict[str, object] = {"x-queue-type": options.queue_type}
    if options.queue_type == "quorum":
        main.update(quorum_dead_letter_arguments())
        if options.delivery_limit is not None:
            main["x-delivery-limit"] = options.delivery_limit
        elif server >= (4,):
            main["x-delivery-limit"] = -1
        if server >= (4,):
            # 4.0 gives quorum queues a delivery limit of 20 by default; a dead-letter
            # queue that drops messages after 20 peeks in the management UI loses them.
            dead["x-delivery-limit"] = -1
        if options.max_priority is not None and server < QUORUM_PRIORITIES:
            shown = ".".join(str(n) for n in server)
            raise ConfigurationError(
                f"worker {worker!r}: priorities on a quorum queue need RabbitMQ 4.0 or newer (the broker is "
                f"{shown}); use Worker({worker!r}, queue_type='classic', max_priority=N), or RabbitMQ 4.x"
            )
    elif options.max_priority is not None:
        main["x-max-priority"] = options.max_priority
    queues: tuple[QueueSpec, ...] = (QueueSpec(worker, main), QueueSpec(dlq, dead))
    if options.cancellable:
        stream = {
            "x-queue-type": "stream",
            "x-max-age": CANCEL_RETENTION,
            "x-stream-max-segment-size-bytes": CANCEL_SEGMENT_BYTES,
        }
        queues += (QueueSpec(cancellations(worker), stream),)
    return Topology(exchanges=(ExchangeSpec(dlx, "fanout"),), queues=queues, bindings=(Binding(dlx, dlq, ""),))


#: A rate limiter's queue outlives its last use by this many periods (at least RATE_EXPIRES_MIN_MS):
#: a marker lives one period, so a queue that expires holds none.
RATE_EXPIRES_PERIODS = 3
RATE_EXPIRES_MIN_MS = 60_000
#: AMQP names a queue in a short string: 255 bytes at most.
_QUEUE_NAME_BYTES = 255


def rate_limit_queue(project: str, name: str, calls: int, period_ms: int) -> str:
    """`P.rate.NAME.N-per-Tms`: the queue whose markers count the task starts of rate limit `name`.
    The limit is part of the name, so changing it (a new deploy) makes a new queue rather than
    one that exists with other arguments."""
    queue = f"{project}.rate.{name}.{calls}-per-{period_ms}ms"
    if len(queue.encode()) > _QUEUE_NAME_BYTES:
        raise ConfigurationError(
            f"rate limit {name!r}: its queue name {queue!r} is longer than RabbitMQ takes (255 bytes); "
            f"give the limit a shorter name with RateLimit(name, ...)"
        )
    return queue


def rate_limit_expires_ms(period_ms: int) -> int:
    """How long a rate limiter's queue lives on without being declared again (`x-expires`)."""
    return max(RATE_EXPIRES_PERIODS * period_ms, RATE_EXPIRES_MIN_MS)


def rate_limit_topology(queue: str, calls: int, period_ms: int) -> Topology:
    """A sliding window of `calls` permits per `period_ms`: a classic queue of at most `calls`
    markers that refuses more (basic.nack), each expiring after the period. It is durable (a
    transient queue is deprecated in RabbitMQ 4) and its markers transient (a broker restart
    empties it); it is deleted after some periods without a declaration."""
    arguments: dict[str, object] = {
        "x-queue-type": "classic",
        "x-max-length": calls,
        "x-overflow": "reject-publish",
        "x-message-ttl": period_ms,
        "x-expires": rate_limit_expires_ms(period_ms),
    }
    return Topology(queues=(QueueSpec(queue, arguments),))


#: Arguments that count only when a queue is created: how many nodes a quorum queue starts on.
#: Its members change with `rabbitmq-queues grow` and `shrink`, never by declaring it again.
INITIAL_GROUP_SIZE = "x-quorum-initial-group-size"
CREATION_ONLY = frozenset({INITIAL_GROUP_SIZE})


def difference(declared: Mapping[str, object], existing: Mapping[str, object]) -> str:
    """Every argument that differs, as `key: declared X, existing Y`; empty when equal. Arguments
    that count only at creation (CREATION_ONLY) are not compared."""

    def show(arguments: Mapping[str, object], key: str) -> str:
        return repr(arguments[key]) if key in arguments else "none"

    return "; ".join(
        f"{key}: declared {show(declared, key)}, existing {show(existing, key)}"
        for key in sorted((declared.keys() | existing.keys()) - CREATION_ONLY)
        if declared.get(key) != existing.get(key)
    )


def definitions(topology: Topology, vhost: str) -> dict[str, list[dict[str, object]]]:
    """`topology` as RabbitMQ definitions (importable in the management UI or with
    `rabbitmqctl import_definitions`)."""
    return {
        "exchanges": [
            {
                "name": e.name,
                "vhost": vhost,
                "type": e.type,
                "durable": True,
                "auto_delete": False,
                "internal": False,
                "arguments": dict(e.arguments),
            }
            for e in topology.exchanges
        ],
        "queues": [
            {"name": q.name, "vhost": vhost, "durable": True, "auto_delete": False, "arguments": dict(q.arguments)}
            for q in topology.queues
        ],
        "bindings": [
            {
                "source": b.source,
                "vhost": vhost,
                "destination": b.destination,
                "destination_type": "exchange" if b.to_exchange else "queue",
                "routing_key": b.routing_key,
                "arguments": {},
            }
            for b in topology.bindings
        ],
    }
