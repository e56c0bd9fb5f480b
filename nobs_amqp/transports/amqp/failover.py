"""Reconnecting over a cluster's nodes: which node to try next, and how long to wait.

aio-pika's robust connection reconnects to the one URL it was made with, at a fixed interval.
`FailoverConnection` goes round the project's URLs instead: when the connection is lost, each
attempt goes to the next node of the list (with one URL, to that one again). Within a round
over the nodes the next one is tried at once; after each round in which none answered, the
wait doubles from RECONNECT_MIN_SECONDS up to RECONNECT_MAX_SECONDS, less a random part of up
to half, so a fleet of workers that lost the same node does not come back in step.

Producers and consumers share the connection, so both follow it; aio-pika then reopens the
channels and the consumers on the node reached. A quorum queue is reachable from every node of
its cluster, so a worker consumes the same queue wherever it lands.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Sequence
from typing import Any

import aio_pika
from yarl import URL

from ...urls import describe_error, node_address, redact

log = logging.getLogger("nobs_amqp")

#: The first wait after a round of nodes that did not answer; it doubles each round after that.
RECONNECT_MIN_SECONDS = 0.5
#: The longest wait between two rounds: the most a worker waits once the broker is back.
RECONNECT_MAX_SECONDS = 3.0
#: Within a round, the pause before trying the next node.
NEXT_NODE_SECONDS = 0.05
#: aio-pika's one connection attempt (a private method of RobustConnection, so the package pins
#: aio-pika's major version; tests/test_failover.py checks that it is still there).
ATTEMPT_METHOD = "_RobustConnection__connect_transport"


def pause_after(failures: int, nodes: int, jitter: float) -> float:
    """Seconds to wait after the `failures`-th failed attempt in a row (from 1), going round
    `nodes` nodes; `jitter` in [0, 1) takes off up to half of a wait between rounds."""
    if failures % nodes:
        return NEXT_NODE_SECONDS
    rounds = failures // nodes
    full = min(RECONNECT_MAX_SECONDS, RECONNECT_MIN_SECONDS * 2.0 ** min(rounds - 1, 16))
    return full * (1.0 - jitter / 2.0)


class FailoverConnection(aio_pika.RobustConnection):
    """aio-pika's robust connection, reconnecting round a cluster's nodes with a backoff.

    The transport sets `nodes` (every URL of the cluster) and `node` (the index of the one
    reached), sets `lost_at` when the connection drops and clears it once it is back.
    """

    def __init__(self, url: URL, loop: asyncio.AbstractEventLoop | None = None, **kwargs: Any) -> None:
        super().__init__(url, loop, **kwargs)
        self.nodes: tuple[str, ...] = (str(url),)
        self.node = 0
        self.lost_at: float | None = None
        #: Failed attempts since the connection was lost.
        self.failures = 0
        self._pause = RECONNECT_MIN_SECONDS
        #: Told of each new underlying (aiormq) connection a reconnection made.
        self.on_transport: Callable[[Any], None] | None = None
        self._shown: tuple[str, ...] = self.nodes
        self._level = logging.INFO

    def follow(self, nodes: Sequence[str], node: int, *, shown: Sequence[str] = (), quiet: bool = False) -> None:
        """Reconnect round `nodes`, starting after `nodes[node]` (the one connected now); logs name
        each by `shown` (the same URLs as the user gave them), at DEBUG when `quiet` (a second
        connection of the same process, whose attempts the first one's lines say already)."""
        self.nodes, self.node = tuple(nodes), node
        self._shown = tuple(shown) or self.nodes
        self._level = logging.DEBUG if quiet else logging.INFO

    @property
    def current(self) -> str:
        """The URL of the node connected to, or tried last."""
        return self.nodes[self.node]

    @property
    def reconnect_interval(self) -> float:
        """aio-pika sleeps this long after each attempt (after a successful one too: harmless)."""
        return self._pause

    @reconnect_interval.setter
    def reconnect_interval(self, value: float) -> None:
        """aio-pika sets its fixed interval here (from the URL's reconnect_interval): the backoff replaces it."""

    async def _RobustConnection__connect_transport(self) -> None:  # noqa: N802 - overrides aio-pika's private name
        """One attempt: in an outage, to the next node; on failure, say so and work out the wait."""
        if self.lost_at is not None:
            self.node = (self.node + 1) % len(self.nodes)
            self.url = URL(self.current)
        try:
            await getattr(super(), ATTEMPT_METHOD)()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.failures += 1
            self._pause = pause_after(self.failures, len(self.nodes), random.random())
            if self.lost_at is not None:  # (a first connection that fails raises to the caller instead)
                log.log(
                    self._level,
                    "reconnecting: %s did not answer (%s); attempt %d to %s in %.2f s",
                    redact(self._shown[self.node]),
                    describe_error(exc),
                    self.failures + 1,
                    node_address(self.nodes[(self.node + 1) % len(self.nodes)]),
                    self._pause,
                )
            raise
        self.failures = 0
        self._pause = RECONNECT_MIN_SECONDS
        if self.on_transport is not None and self.transport is not None:
            self.on_transport(self.transport.connection)
