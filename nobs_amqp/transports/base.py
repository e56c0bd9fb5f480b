"""The transport seam: the little a producer and a consumer need from a broker.

Two implementations: `amqp.AmqpTransport` (RabbitMQ) and the in-memory broker.
Everything above this seam (producing, consuming, retrying, dead-lettering) is
written once against it and never knows which broker it talks to.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from contextvars import ContextVar
from datetime import datetime
from typing import Any, Literal, Protocol, runtime_checkable

from ..errors import MessageTooLargeError
from ..message import Message
from ..topology import ServerVersion, Topology

#: What RabbitMQ takes unless its `max_message_size` says otherwise: 128 MiB on 3.x, 16 MiB from 4.0.
MAX_MESSAGE_SIZE_3 = 128 * 1024 * 1024
MAX_MESSAGE_SIZE_4 = 16 * 1024 * 1024

#: Seconds: the heartbeat a RabbitMQ connection asks for, unless its URL says `?heartbeat=N`.
DEFAULT_HEARTBEAT = 10


def default_max_message_size(version: ServerVersion) -> int:
    """The broker's default `max_message_size` for its version."""
    return MAX_MESSAGE_SIZE_4 if version >= (4,) else MAX_MESSAGE_SIZE_3


def check_size(destination: str, message: Message, limit: int | None, version: ServerVersion) -> None:
    """MessageTooLargeError, before anything is sent, for a body over `limit` bytes (the project's
    own limit), else over the broker's default for its `version`."""
    most = limit or default_max_message_size(version)
    if len(message.body) > most:
        source = "Project(max_message_size=...)" if limit else "RabbitMQ's default max_message_size for its version"
        error = MessageTooLargeError(destination, len(message.body), most, source)
        error.message_id = message.message_id or None
        raise error


class Delivery(Protocol):
    """A message handed to a consumer, to be settled exactly once."""

    @property
    def message(self) -> Message: ...

    @property
    def queue(self) -> str: ...

    @property
    def redelivered(self) -> bool:
        """The broker handed this message out before (so its delivery count is the broker's)."""

    async def ack(self) -> None: ...

    async def nack(self, *, requeue: bool) -> None: ...


Handler = Callable[[Delivery], Coroutine[Any, Any, None]]


class Inbox(Protocol):
    """Who a transport tells about the replies to the requests it published (a session's results)."""

    def replied(self, reply: Message) -> None:
        """A reply came (its `correlation_id` says to what); it may be for no one waiting now."""

    def lost(self, why: str) -> None:
        """Replies to the requests published so far can no longer come (their channel closed)."""


#: A lease after `Transport.lease`: "taken" by this connection just now, "held" by it already,
#: or "busy": another connection holds it.
LeaseState = Literal["taken", "held", "busy"]


class Subscription(Protocol):
    async def cancel(self) -> None:
        """Stop deliveries; those already sent still reach the handler before this returns."""

    async def flush(self) -> None:
        """Send the acks that are waiting to be batched, now."""

    async def close(self) -> None:
        """Flush acks, then give every message still unsettled back to the queue."""


class Transport(Protocol):
    @property
    def server_version(self) -> ServerVersion: ...

    @property
    def vhost(self) -> str: ...

    @property
    def url(self) -> str:
        """The URL this transport reached (with credentials: never show it unredacted)."""

    def check_size(self, destination: str, message: Message) -> None:
        """MessageTooLargeError if `message` is larger than the broker takes (checked by `publish`
        too; `queue_many` checks every message before it sends any)."""

    def now(self) -> datetime:
        """The broker side's clock: what every message's times and the retry policy read."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def declare(self, topology: Topology) -> None:
        """Declare idempotently; raise TopologyMismatchError for an object with other arguments."""

    async def publish(self, exchange: str, routing_key: str, message: Message) -> None:
        """Publish persistent and mandatory; return once the broker confirmed it."""

    async def take_permit(self, queue: str) -> bool:
        """Put one transient marker into `queue` (a rate limiter, `topology.rate_limit_topology`):
        True when the broker confirmed it (a permit), False when the queue refused it (full: no
        permit now). Never sent again on a refusal. UnroutableError when the queue is gone (declare
        it again), BrokerUnavailableError when the broker stays unreachable until the deadline."""

    async def request(self, exchange: str, routing_key: str, message: Message, inbox: Inbox) -> None:
        """Publish as `publish` does, asking for a reply (RabbitMQ's direct reply-to): its reply,
        or the loss of its channel, is told to `inbox` (the last one given)."""

    async def reply(self, address: str, reply: Message) -> None:
        """Publish `reply` transient and not mandatory to the direct reply-to `address` on the
        default exchange (anything else is refused: logged, nothing sent). Unconfirmed; one that
        cannot be delivered is dropped (logged at DEBUG), never raised."""

    async def consume(
        self, queue: str, prefetch: int, handler: Handler, *, ack_timeout: float | None = None
    ) -> Subscription:
        """Deliver messages of `queue` to `handler`, at most `prefetch` unsettled at once.
        Once its `close()` returns, what it gave back is ready in the queue again.
        `ack_timeout`: how long the broker may wait for a delivery's ack before it takes it
        back (None: the broker's own setting); see `fixed_ack_timeout`."""

    async def follow(self, stream: str, handler: Callable[[Message], None]) -> Subscription:
        """Hand `handler` every message of `stream` (a queue of type stream), from its first on,
        then each new one as it comes; after a reconnection from the first again."""

    async def claim(self, name: str, window: int, marker: Message) -> bool:
        """Take the claim `name` for `window` seconds: True if taken here, False if it is held
        (someone took it less than `window` seconds ago). Shared by every connection to the broker."""

    async def unclaim(self, name: str) -> None:
        """Give the claim `name` up, so that it can be taken again at once (best effort)."""

    def fixed_ack_timeout(self) -> float | None:
        """Seconds the broker waits for an ack when a consumer cannot choose (None: it can,
        through `consume(ack_timeout=...)`, or there is no such timeout)."""

    async def message_count(self, queue: str) -> int:
        """Messages ready in `queue` (not counting those delivered and unsettled)."""

    async def purge(self, queue: str) -> int:
        """Delete the messages ready in `queue`; return how many."""

    async def lease(self, name: str) -> LeaseState:
        """Take or keep the lease `name`: one connection holds it at a time, and loses it when
        the connection closes or drops (the scheduler's election)."""

    async def release(self, name: str) -> None:
        """Give up the lease `name` if this connection holds it."""


@runtime_checkable
class VirtualClock(Protocol):
    """A capability only some transports have (memory://): time that moves when told to."""

    async def advance(self, seconds: float) -> None:
        """Move the clock `seconds` ahead, expiring what falls due on the way."""

    def seconds_to_next_expiry(self) -> float | None:
        """How far the clock is from the next message expiry (None: nothing waits)."""


@runtime_checkable
class ConnectionEvents(Protocol):
    """A capability of transports whose connection can drop (RabbitMQ): who to tell when it does."""

    #: Called with False when the connection is lost (once per outage), True when it is back.
    on_connection: list[Callable[[bool], None]]
    #: Called with the broker's reason when it blocks publishing (a resource alarm), None when it unblocks.
    on_blocked: list[Callable[[str | None], None]]


#: When the queue() (or retry, or dead letter) in progress gives up: declaring and publishing share it.
_DEADLINE: ContextVar[float | None] = ContextVar("nobs_amqp_deadline", default=None)


class one_deadline:  # noqa: N801 - used as a function: `with one_deadline(seconds):`
    """Everything a transport does inside waits for an unreachable broker until one deadline,
    `seconds` from now (unless an enclosing block set an earlier one)."""

    __slots__ = ("_seconds", "_token")

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds

    def __enter__(self) -> None:
        until = asyncio.get_running_loop().time() + self._seconds
        outer = _DEADLINE.get()
        self._token = _DEADLINE.set(until if outer is None or until < outer else outer)

    def __exit__(self, *exc: object) -> None:
        _DEADLINE.reset(self._token)


def deadline() -> float | None:
    """The event-loop time the operation in progress gives up at (None: no deadline set)."""
    return _DEADLINE.get()


#: Set while a worker places a delivery's retry or dead-letter copy (see `until_confirmed`).
_UNTIL_CONFIRMED: ContextVar[bool] = ContextVar("nobs_amqp_until_confirmed", default=False)


class until_confirmed:  # noqa: N801 - used as a function: `with until_confirmed():`
    """Publishes inside are pursued past the deadline once they may be in the queue: a copy that
    was sent (its confirm not come yet, or lost with the connection) is waited for and sent
    again until the broker confirms it, never given up. A worker places its copies so: giving
    one up would put the delivery back while the copy may run too (a forked task). The deadline
    still holds for a copy that could not be sent at all (nothing of it is anywhere)."""

    __slots__ = ("_token",)

    def __enter__(self) -> None:
        self._token = _UNTIL_CONFIRMED.set(True)

    def __exit__(self, *exc: object) -> None:
        _UNTIL_CONFIRMED.reset(self._token)


def pursued() -> bool:
    """Whether a publish in progress is pursued until confirmed once it may be in the queue."""
    return _UNTIL_CONFIRMED.get()
