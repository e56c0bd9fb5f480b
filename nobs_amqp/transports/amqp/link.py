"""One connection of the RabbitMQ transport: failover over the nodes, what the broker says of it
(blocked, lost, back), and a heartbeat that notices a stall in seconds.

The transport keeps two (`amqp.AmqpTransport`): one it publishes on, and, once it consumes, one
it consumes, acks and declares on. RabbitMQ blocks a connection that publishes while a resource
alarm is on (memory, disk): it stops reading from its socket, so acks sent on it would wait too.
A worker whose retry copies block its publishing connection keeps acking what succeeds on the
other one, which is what drains the queues that set the alarm off.

Blocked is not down: `blocked` says why (the broker's reason, e.g. "low on memory") from the
broker's `connection.blocked` until its `connection.unblocked`. The broker sends it only once
the connection publishes during the alarm, so the first publish of an alarm is always written.

A stall (the peer stops answering and closes nothing: a dead NAT entry, a frozen proxy) is a
loss found by the heartbeat: the broker sends a frame at least every `heartbeat / 2` seconds,
so a connection that received nothing for `heartbeat + 1` seconds is closed and reconnected.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
from collections.abc import Callable, Sequence
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractRobustConnection
from yarl import URL

from ...errors import BrokerConnectionError
from ...urls import describe_error, redact
from ..base import DEFAULT_HEARTBEAT
from .failover import RECONNECT_MAX_SECONDS, FailoverConnection

log = logging.getLogger("nobs_amqp")

#: The role of the connection a process always has (its reconnection attempts are logged at INFO).
PUBLISHING = "publishing"
#: How long closing waits for the broker's answer before it drops the connection (a stalled peer).
CLOSE_SECONDS = 5.0
#: aiormq's private attributes used here (aiormq is pinned to 7.x; tests/test_link.py checks them).
GRACE_ATTRIBUTE = "_Connection__heartbeat_grace_timeout"
LAST_FRAME_ATTRIBUTE = "_Connection__last_frame_time"
BLOCKED_HANDLER = "_Connection__handle_connection_blocked"
UNBLOCKED_HANDLER = "_Connection__handle_connection_unblocked"


def with_heartbeat(url: str, heartbeat: int) -> str:
    """`url` asking for `heartbeat` seconds, unless it names its own (the rest as it is)."""
    if "heartbeat" in URL(url).query:
        return url
    return f"{url}{'&' if '?' in url else '?'}heartbeat={heartbeat}"


def heartbeat_of(url: str) -> int:
    """The heartbeat `url` asks for (0: none)."""
    try:
        return max(0, int(URL(url).query.get("heartbeat", DEFAULT_HEARTBEAT)))
    except ValueError:
        return DEFAULT_HEARTBEAT


class Link:
    """One robust connection to the first of `urls` that answers, reconnecting round them.

    `on_change()` is called when it is lost, back, blocked or unblocked; `up` and `blocked`
    say what it is now. Constructing it does no I/O.
    """

    def __init__(
        self, urls: Sequence[str], *, name: str, role: str, heartbeat: int, on_change: Callable[[], None]
    ) -> None:
        #: As given (shown redacted); they are connected to with the heartbeat asked for.
        self.urls = tuple(urls)
        self._connect = tuple(with_heartbeat(url, heartbeat) for url in urls)
        self.role = role
        self._name = name
        self._on_change = on_change
        self.connection: FailoverConnection | None = None
        self.url = self.urls[0]
        self.up = False
        #: The broker's reason while it blocks publishing on this connection (None: it does not).
        self.blocked: str | None = None
        self._unblocked = asyncio.Event()
        self._refusal = ""  # the broker's last answer to a reconnection, said once per outage
        #: Why it was lost last (for the outage's one warning).
        self.lost_because = ""

    @property
    def heartbeat(self) -> int:
        """The heartbeat asked for: a stall is found within `heartbeat + 1` seconds."""
        return heartbeat_of(self._connect[self.urls.index(self.url)])

    async def open(self) -> AbstractRobustConnection:
        failures: list[str] = []
        refusals = 0
        last: BaseException | None = None
        for index, url in enumerate(self.urls):
            try:
                connection = await aio_pika.connect_robust(
                    self._connect[index],
                    client_properties={
                        "connection_name": f"{self._name} {self.role} {socket.gethostname()} pid {os.getpid()}"
                    },
                    connection_class=FailoverConnection,
                )
                break
            except (ConnectionError, aiormq.exceptions.AMQPError, OSError, StopAsyncIteration) as exc:
                # StopAsyncIteration: aiormq's frame reader when the peer closed before the broker's
                # first frame (a proxy or load balancer in front of a broker that is down).
                last = exc
                refusals += refused_login(exc)
                failures.append(login_failure(exc) if len(self.urls) == 1 else f"{redact(url)}: {login_failure(exc)}")
        else:
            where = ", ".join(redact(u) for u in self.urls)
            raise BrokerConnectionError(where, "; ".join(failures), refused=refusals == len(self.urls)) from last
        assert isinstance(connection, FailoverConnection)
        connection.follow(self._connect, index, shown=self.urls, quiet=self.role != PUBLISHING)
        connection.on_transport = self._watch
        self.connection, self.url, self.up = connection, url, True
        self._watch(connection.transport.connection if connection.transport is not None else None)
        connection.close_callbacks.add(self._on_lost)
        connection.reconnect_callbacks.add(self._on_reconnect)
        return connection

    def require(self) -> AbstractRobustConnection:
        if self.connection is None:
            raise RuntimeError("transport is not open")
        return self.connection

    async def connected(self) -> aiormq.abc.AbstractConnection:
        """The live underlying connection, once there is one (after a reconnect: the new one)."""
        connection = self.require()
        await connection.ready()
        transport = connection.transport
        if transport is None or transport.connection.is_closed:
            raise ConnectionError("the connection to the broker is being reestablished")
        return transport.connection

    async def until_unblocked(self) -> None:
        """Return once the broker does not block publishing here (at once, mostly)."""
        if self.blocked is not None:
            await self._unblocked.wait()

    async def close(self) -> None:
        """Close it, waiting for the broker's answer up to CLOSE_SECONDS; past that (a stalled
        peer), drop it without one: the broker returns what it held when it notices."""
        connection, self.connection = self.connection, None
        self.up = False
        if connection is None:
            return
        try:
            async with asyncio.timeout(CLOSE_SECONDS):
                await connection.close()
        except TimeoutError:
            log.warning(
                "the broker did not answer the close of the %s connection within %.0f s; dropped it",
                self.role,
                CLOSE_SECONDS,
            )
            _abort(connection)

    # -- what the broker says ---------------------------------------------------------------

    def _watch(self, underlay: aiormq.abc.AbstractConnection | None) -> None:
        """A new underlying connection: unblocked, its stall found within `heartbeat + 1` s, and
        the broker's `connection.blocked` / `unblocked` reported."""
        self.blocked = None
        self._unblocked.set()
        if underlay is None:
            return
        heartbeat = heartbeat_of(str(underlay.url))
        if heartbeat and hasattr(underlay, GRACE_ATTRIBUTE):
            setattr(underlay, GRACE_ATTRIBUTE, heartbeat + 1)
        blocked, unblocked = getattr(underlay, BLOCKED_HANDLER, None), getattr(underlay, UNBLOCKED_HANDLER, None)
        if blocked is None or unblocked is None:
            return

        async def on_blocked(frame: Any) -> None:
            await blocked(frame)
            self._set_blocked(str(getattr(frame, "reason", "") or "no reason given"))

        async def on_unblocked(frame: Any) -> None:
            await unblocked(frame)
            self._set_blocked(None)

        setattr(underlay, BLOCKED_HANDLER, on_blocked)
        setattr(underlay, UNBLOCKED_HANDLER, on_unblocked)

    def _set_blocked(self, reason: str | None) -> None:
        was, self.blocked = self.blocked, reason
        if reason is None:
            self._unblocked.set()
            if was is not None:
                log.warning("the broker unblocked the %s connection to %s", self.role, redact(self.url))
        else:
            self._unblocked.clear()
            log.warning(
                "the broker blocked the %s connection to %s (%s): it takes no message until the alarm clears; "
                "publishes wait up to publish_timeout (rabbitmq-diagnostics alarms on the broker says why)",
                self.role,
                redact(self.url),
                reason,
            )
        self._on_change()

    def _on_lost(self, connection: object, exc: BaseException | None = None) -> None:
        """Said once per outage: aio-pika calls this again for every failed reconnection attempt."""
        if self.connection is None or exc is None:
            return
        if not isinstance(connection, FailoverConnection) or connection.lost_at is not None:
            reason = describe_error(exc)
            if isinstance(exc, aiormq.exceptions.AMQPChannelError) and reason != self._refusal:
                self._refusal = reason  # e.g. a queue deleted during the outage: worth saying, once
                log.warning("the broker refused to restore a channel (%s); retrying until it accepts", reason)
            else:
                log.debug("reconnection attempt failed: %s", reason)
            return
        connection.lost_at = connection.loop.time()
        self.up = False
        if isinstance(exc, asyncio.CancelledError):  # aiormq cancels the reader of a stalled connection
            self.lost_because = f"it stalled: no frame from the broker for {self.heartbeat + 1} s"
        else:
            self.lost_because = describe_error(exc)
        self.blocked = None
        self._unblocked.set()
        log.debug("lost the %s connection: %s", self.role, self.lost_because)
        self._on_change()

    def _on_reconnect(self, connection: object) -> None:
        if isinstance(connection, FailoverConnection):
            self.url = self.urls[connection.node]  # of a cluster, maybe another node than before
            connection.lost_at = None
        self._refusal = ""
        self.up = True
        log.debug("reconnected the %s connection to %s", self.role, redact(self.url))
        self._on_change()

    def describe_loss(self) -> str:
        """The warning of an outage that begins with this connection's loss."""
        return (
            f"lost the connection to {redact(self.url)} ({self.lost_because}); reconnecting to "
            f"{'it' if len(self.urls) == 1 else f'the next of {len(self.urls)} nodes'} until one answers "
            f"(backoff up to {RECONNECT_MAX_SECONDS:.0f} s)"
        )


def _abort(connection: AbstractRobustConnection) -> None:
    """Drop `connection`'s socket without a word to the broker, as aiormq drops a stalled one."""
    transport = connection.transport
    underlay = transport.connection if transport is not None else None
    if underlay is None:
        return
    if hasattr(underlay, LAST_FRAME_ATTRIBUTE):
        setattr(underlay, LAST_FRAME_ATTRIBUTE, float("-inf"))  # stalled: no Connection.Close to wait for
    reader = getattr(underlay, "_reader_task", None)
    if isinstance(reader, asyncio.Task):
        reader.cancel()


def refused_login(exc: BaseException) -> bool:
    """The broker answered and refused the login (ACCESS_REFUSED: user or password), or its TLS
    certificate was not accepted: trying again gets the same answer. Not a connection closed at
    login (a missing vhost, but also a vhost that is down or a node shutting down)."""
    return isinstance(exc, aiormq.exceptions.ProbableAuthenticationError | ssl.SSLCertVerificationError)


def login_failure(exc: BaseException) -> str:
    if isinstance(exc, StopAsyncIteration):
        return "the connection was closed before the broker answered"
    text = describe_error(exc)
    if "Connection.Close" in text:
        return "the broker closed the connection at login: the vhost does not exist or the user may not use it"
    if isinstance(exc, ssl.SSLError) or "CERTIFICATE_VERIFY_FAILED" in text:
        return (
            f"{text}; the broker's TLS certificate was not accepted: give its CA with ?cafile=/path/ca.pem "
            f"in the amqps:// URL and connect by a host name the certificate names"
        )
    return text
