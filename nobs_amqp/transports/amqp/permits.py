"""A rate limiter's permit on RabbitMQ: one transient marker published to the limiter's queue
(`topology.rate_limit_topology`), with a publisher confirm.

The broker's ack is a permit; its nack (the queue is full: reject-publish) is the answer "not
now", never sent again; a return (mandatory: the queue is gone, `x-expires` deleted it) is
UnroutableError, for the caller to declare it again. A lost connection is waited for until the
deadline; a marker whose confirm was lost costs at worst a permit (fewer starts, never more).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

import aiormq
from pamqp.commands import Basic

from ...errors import BrokerBlockedError, BrokerConnectionError, BrokerUnavailableError, UnroutableError
from ...urls import describe_error, redact
from ..base import deadline
from .frames import Publisher
from .sending import CONNECTION_ERRORS, REFUSALS

log = logging.getLogger("nobs_amqp")


class Channels(Protocol):
    """What taking a permit needs of the transport that owns the publishing connection."""

    @property
    def url(self) -> str: ...
    @property
    def blocked(self) -> str | None: ...
    @property
    def publish_timeout(self) -> float: ...
    def unavailable(self, *, nacked: bool) -> str: ...
    async def publisher(self, index: int) -> Publisher: ...


async def take_permit(channels: Channels, index: int, queue: str) -> bool:
    """Publish one marker to `queue` on pool channel `index`: True on the broker's ack, False on its nack."""
    loop = asyncio.get_running_loop()
    until = deadline() or loop.time() + channels.publish_timeout
    pause = 0.05
    while True:
        try:
            async with asyncio.timeout_at(until):
                publisher = await channels.publisher(index)
                confirmation = await publisher.marker(queue)
            return isinstance(confirmation, Basic.Ack)
        except aiormq.exceptions.PublishError as exc:  # returned: the queue expired or was deleted
            raise UnroutableError(queue) from exc
        except aiormq.exceptions.DeliveryError:  # basic.nack: reject-publish, the window is full
            return False
        except REFUSALS as exc:
            refused = f"the broker refused {queue!r}: {describe_error(exc)}"
            raise BrokerConnectionError(redact(channels.url), refused) from exc
        except CONNECTION_ERRORS as exc:
            if loop.time() + pause >= until:
                if channels.blocked is not None:  # an alarm: the broker takes no marker until it clears
                    raise BrokerBlockedError(queue, channels.blocked, channels.publish_timeout) from exc
                raise BrokerUnavailableError(queue, channels.unavailable(nacked=False)) from exc
            log.debug("%s: the broker is unreachable (%s); retrying", queue, describe_error(exc))
            await asyncio.sleep(pause)
            pause = min(pause * 2, 1.0)
