"""Acks of one AMQP channel, batched: the RabbitMQ transport's ack writer."""

from __future__ import annotations

import asyncio
import logging
from collections import deque

import aiormq

log = logging.getLogger("nobs_amqp")

#: How long a settled delivery's ack may wait to go out with others.
ACK_LINGER_SECONDS = 0.005


class Acker:
    """Acks of one channel, sent together: every few milliseconds (or as soon as a quarter
    of the prefetch window is settled), one `multiple=True` ack covers the settled prefix of the
    deliveries, and single acks the settled rest.

    Every ack and nack frame goes out through one ordered writer: a single ack must never
    follow a multiple ack that already covered it (the broker would close the channel),
    and a nack must reach the broker before a multiple ack that spans its tag.

    A crash loses at most the acks of the last ACK_LINGER_SECONDS: those messages are
    redelivered and run again, which at-least-once delivery allows.
    """

    def __init__(self, channel: aiormq.abc.AbstractChannel, prefetch: int) -> None:
        self.channel = channel
        # A quarter of the prefetch window settled: ack now, or the broker's window
        # runs dry while acks wait (with prefetch 10 that is almost every ack).
        self._enough = max(1, prefetch // 4)
        self._outstanding: deque[int] = deque()  # delivered, not yet acked, in delivery order
        self._settled: set[int] = set()
        self._timer: asyncio.Handle | None = None
        self._frames: deque[tuple[bool, int, bool]] = deque()  # (is_ack, tag, multiple or requeue)
        self._writer: asyncio.Task[None] | None = None

    def delivered(self, tag: int) -> None:
        self._outstanding.append(tag)

    @property
    def held(self) -> int:
        """Delivered and not yet acked or nacked: what closing the channel gives back."""
        return len(self._outstanding)

    def ack(self, tag: int) -> None:
        self._settled.add(tag)
        if len(self._settled) >= self._enough:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = asyncio.get_running_loop().call_soon(self._flush)
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(ACK_LINGER_SECONDS, self._flush)

    async def nack(self, tag: int, *, requeue: bool) -> None:
        self._outstanding.remove(tag)
        self._write((False, tag, requeue))
        await self.flush()

    def _flush(self) -> None:
        self._timer = None
        last = None
        while self._outstanding and self._outstanding[0] in self._settled:
            last = self._outstanding.popleft()
            self._settled.discard(last)
        if last is not None:
            self._write((True, last, True))
        for tag in sorted(self._settled):  # settled behind a delivery still running
            self._outstanding.remove(tag)
            self._write((True, tag, False))
        self._settled.clear()

    def _write(self, frame: tuple[bool, int, bool]) -> None:
        self._frames.append(frame)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._drain_frames())

    async def _drain_frames(self) -> None:
        try:
            while self._frames:
                is_ack, tag, flag = self._frames.popleft()
                if is_ack:
                    # Into the connection's write queue, in order; not waiting for the socket to drain.
                    await self.channel.basic_ack(tag, multiple=flag, wait=False)
                else:
                    await self.channel.basic_nack(tag, requeue=flag)
        except Exception as exc:  # noqa: BLE001 - any way the channel died: the broker redelivers
            log.warning("%d ack(s) not sent (%s); the broker will redeliver those messages", len(self._frames) + 1, exc)
            self._frames.clear()

    async def flush(self) -> None:
        """Send what is pending now, and wait until it is in the connection's write queue (behind
        it, a channel close goes out after it)."""
        if self._timer is not None:
            self._timer.cancel()
            self._flush()
        while self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)
