"""The batched-ack writer of the RabbitMQ transport (`nobs_amqp.transports.amqp.acks.Acker`), against a fake channel.

The fake records the frames `Acker` writes (basic_ack and basic_nack, the only channel methods it
calls) and plays them against a model of what RabbitMQ accepts on a channel: a frame whose tag is
not an unacked delivery (acked twice, or after a multiple ack covered it) would close the channel
with PRECONDITION_FAILED "unknown delivery tag"; a `multiple=True` ack settles every unacked
delivery up to its tag. Besides that the frames must say what the consumer decided: an ack covers
only deliveries the consumer acked, a nack only the one it nacked, with its requeue flag.

No broker: these run in `pytest -m "not rabbitmq"`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nobs_amqp.transports.amqp import acks
from nobs_amqp.transports.amqp.acks import Acker

from ..support import eventually

HOUR = 3600.0  # an ACK_LINGER_SECONDS that never ends within a test: only the threshold or a flush sends


@dataclass(frozen=True)
class Frame:
    ack: bool  # basic_ack, else basic_nack
    tag: int
    multiple: bool
    requeue: bool = False  # of a nack

    def __str__(self) -> str:
        if self.ack:
            return f"ack({self.tag}{', multiple' if self.multiple else ''})"
        return f"nack({self.tag}{', multiple' if self.multiple else ''}, requeue={self.requeue})"


def ack(tag: int, multiple: bool = False) -> Frame:
    return Frame(True, tag, multiple)


def nack(tag: int, requeue: bool) -> Frame:
    return Frame(False, tag, False, requeue)


@dataclass
class FakeChannel:
    """The two aiormq channel methods `Acker` calls, recording each frame in the order written
    and checking it against what the broker and the consumer know at that moment.

    `delays` makes writes slow: the n-th write yields to the loop delays[n % len] times first, so
    frames pile up behind it as they would behind a busy socket. After `dies_after` frames every
    write raises, as on a channel that closed.
    """

    decided: dict[int, tuple[bool, bool]] = field(default_factory=dict)  # tag -> (acked, requeue), by the consumer
    delays: list[int] = field(default_factory=lambda: [0])
    dies_after: int | None = None
    frames: list[Frame] = field(default_factory=list)
    unacked: set[int] = field(default_factory=set)  # delivered, not settled by any frame yet
    settled: dict[int, tuple[bool, bool]] = field(default_factory=dict)  # tag -> (acked, requeue), by the frames
    problems: list[str] = field(default_factory=list)

    def deliver(self, tag: int) -> None:
        self.unacked.add(tag)

    async def basic_ack(self, delivery_tag: int, multiple: bool = False, wait: bool = True) -> None:
        await self._write(Frame(True, delivery_tag, multiple))

    async def basic_nack(self, delivery_tag: int, multiple: bool = False, requeue: bool = True) -> None:
        await self._write(Frame(False, delivery_tag, multiple, requeue))

    async def _write(self, frame: Frame) -> None:
        written = len(self.frames)
        for _ in range(self.delays[written % len(self.delays)]):
            await asyncio.sleep(0)
        if self.dies_after is not None and written >= self.dies_after:
            raise ConnectionError("the channel is closed")
        self.frames.append(frame)
        self._check(frame)

    def _check(self, frame: Frame) -> None:
        """What RabbitMQ does with `frame`, noting every way it is wrong."""
        if frame.tag not in self.unacked:
            self.problems.append(f"{frame} after {[str(f) for f in self.frames[:-1]]}: unknown delivery tag")
            return
        covered = sorted(t for t in self.unacked if t <= frame.tag) if frame.multiple else [frame.tag]
        for tag in covered:
            outcome = (frame.ack, frame.requeue)
            if self.decided.get(tag) != outcome:
                self.problems.append(f"{frame} settles {tag}, which the consumer settled as {self.decided.get(tag)}")
            self.unacked.discard(tag)
            self.settled[tag] = outcome


@dataclass
class Consumer:
    """Deliveries on one channel, settled the way the consumer's tasks would settle them."""

    acker: Acker
    channel: FakeChannel
    next_tag: int = 1
    nacks: list[asyncio.Task[None]] = field(default_factory=list)

    @classmethod
    def make(cls, prefetch: int, channel: FakeChannel | None = None) -> Consumer:
        channel = channel or FakeChannel()
        return cls(Acker(cast(Any, channel), prefetch), channel)

    def deliver(self, n: int = 1) -> list[int]:
        tags = list(range(self.next_tag, self.next_tag + n))
        for tag in tags:
            self.channel.deliver(tag)
            self.acker.delivered(tag)
        self.next_tag += n
        return tags

    def ack(self, *tags: int) -> None:
        for tag in tags:
            self.channel.decided[tag] = (True, False)
            self.acker.ack(tag)

    def nack(self, tag: int, *, requeue: bool) -> Awaitable[None]:
        self.channel.decided[tag] = (False, requeue)
        return self.acker.nack(tag, requeue=requeue)

    def nack_in_background(self, tag: int, *, requeue: bool) -> None:
        """As a task of the consumer does: it waits for its nack while the others go on."""
        self.nacks.append(asyncio.ensure_future(self.nack(tag, requeue=requeue)))

    async def finish(self) -> None:
        """Wait for the nacks in flight, then flush: everything the consumer settled is written."""
        await asyncio.wait_for(asyncio.gather(*self.nacks), 10)
        await asyncio.wait_for(self.acker.flush(), 10)

    def check(self) -> None:
        """Every delivery settled exactly once, as the consumer decided, by frames the broker accepts."""
        assert self.channel.problems == []
        assert self.channel.unacked == set(), "deliveries the frames never settled"
        assert self.channel.settled == self.channel.decided


@pytest.fixture
def linger(monkeypatch: pytest.MonkeyPatch) -> Callable[[float], None]:
    """Sets ACK_LINGER_SECONDS for this test."""
    return lambda seconds: monkeypatch.setattr(acks, "ACK_LINGER_SECONDS", seconds)


async def loop_turns(n: int = 10) -> None:
    """Let the loop run `n` turns: call_soon callbacks and the writer task, but no timer that is not due."""
    for _ in range(n):
        await asyncio.sleep(0)


# -- each rule, by hand -----------------------------------------------------------------------------


@pytest.mark.timeout(10)
async def test_a_single_ack_never_follows_a_multiple_ack_that_covered_it(linger: Callable[[float], None]) -> None:
    linger(HOUR)
    c = Consumer.make(prefetch=100, channel=FakeChannel(delays=[3]))  # slow writes: frames queue up
    c.deliver(5)
    c.ack(2, 4)  # behind 1 and 3, still running: single acks
    flushing = asyncio.ensure_future(c.acker.flush())
    await loop_turns(2)
    assert c.channel.frames == [], "the writer is still busy with the single ack of 2"
    c.ack(1, 3)  # a multiple ack of 3 covers 2: it must wait for the single one
    await c.acker.flush()
    await asyncio.wait_for(flushing, 10)
    c.ack(5)
    await c.finish()
    assert c.channel.frames == [ack(2), ack(4), ack(3, multiple=True), ack(5, multiple=True)]
    c.check()


@pytest.mark.timeout(10)
async def test_a_nack_goes_out_before_a_multiple_ack_that_spans_its_tag(linger: Callable[[float], None]) -> None:
    linger(HOUR)
    c = Consumer.make(prefetch=100)
    c.deliver(4)
    c.ack(1, 3, 4)  # pending: 2 still runs
    await loop_turns()
    assert c.channel.frames == []
    await c.nack(2, requeue=False)  # a nack goes out at once, and takes the acks waiting behind it along
    assert c.channel.frames == [nack(2, requeue=False), ack(4, multiple=True)]
    c.check()


@pytest.mark.timeout(10)
async def test_acks_around_a_nacked_delivery_go_out_after_its_nack(
    linger: Callable[[float], None],
) -> None:
    linger(HOUR)
    c = Consumer.make(prefetch=100)
    c.deliver(3)
    await c.nack(2, requeue=True)
    c.ack(1)
    await c.acker.flush()
    c.ack(3)
    await c.finish()
    assert c.channel.frames == [nack(2, requeue=True), ack(1, multiple=True), ack(3, multiple=True)]
    c.check()


@pytest.mark.timeout(10)
async def test_acks_settled_out_of_order_make_one_multiple_ack_of_the_prefix(linger: Callable[[float], None]) -> None:
    linger(HOUR)
    c = Consumer.make(prefetch=100)
    c.deliver(6)
    c.ack(3, 1, 6, 2)  # 1..3 settled in any order; 4 and 5 still run; 6 done
    await c.acker.flush()
    assert c.channel.frames == [ack(3, multiple=True), ack(6)]
    c.ack(5, 4)
    await c.acker.flush()
    assert c.channel.frames[2:] == [ack(5, multiple=True)]  # 6 is acked already: the prefix ends at 5
    c.check()


@pytest.mark.timeout(10)
async def test_flush_sends_what_is_pending_and_nothing_twice(linger: Callable[[float], None]) -> None:
    linger(HOUR)
    c = Consumer.make(prefetch=100)
    c.deliver(3)
    c.ack(1, 3)
    await loop_turns()
    assert c.channel.frames == [], "below the threshold, acks wait for the linger"
    await c.acker.flush()
    assert c.channel.frames == [ack(1, multiple=True), ack(3)]
    await c.acker.flush()
    await loop_turns()
    assert len(c.channel.frames) == 2, "a second flush sent something again"
    c.ack(2)
    await c.finish()
    assert c.channel.frames[2:] == [ack(2, multiple=True)]
    c.check()


@pytest.mark.timeout(10)
async def test_a_quarter_of_the_prefetch_settled_is_sent_at_once(linger: Callable[[float], None]) -> None:
    linger(HOUR)
    c = Consumer.make(prefetch=12)  # a quarter: 3
    c.deliver(12)
    c.ack(1, 2)
    await loop_turns()
    assert c.channel.frames == []
    c.ack(4)  # the third settled: sent without waiting for the linger (or a flush)
    await eventually(lambda: len(c.channel.frames) == 2, timeout=5, interval=0)
    assert c.channel.frames == [ack(2, multiple=True), ack(4)]
    c.ack(5, 3)
    await loop_turns()
    assert len(c.channel.frames) == 2, "two settled are below the threshold of 3"
    c.ack(*range(6, 13))
    await c.finish()
    assert c.channel.frames[2:] == [ack(12, multiple=True)]
    c.check()


@pytest.mark.timeout(10)
async def test_the_linger_sends_acks_below_the_threshold(linger: Callable[[float], None]) -> None:
    linger(0.01)
    c = Consumer.make(prefetch=100)
    c.deliver(2)
    c.ack(1)
    await eventually(lambda: c.channel.frames, timeout=5, interval=0.005)
    assert c.channel.frames == [ack(1, multiple=True)]
    c.ack(2)
    await c.finish()
    c.check()


@pytest.mark.timeout(10)
async def test_acks_to_a_closed_channel_are_dropped_with_one_warning_per_batch(
    linger: Callable[[float], None], caplog: pytest.LogCaptureFixture
) -> None:
    """The broker returns a closed channel's unacked deliveries by itself: what could not be written
    is dropped with a warning, nothing raises into the consumer, and a flush or a nack does not hang."""
    linger(HOUR)
    c = Consumer.make(prefetch=100, channel=FakeChannel(delays=[1], dies_after=1))
    c.deliver(5)
    c.ack(1)
    await c.acker.flush()
    assert c.channel.frames == [ack(1, multiple=True)]
    c.ack(3, 4)  # behind 2: two single acks, queued together, lost together
    await c.acker.flush()
    assert "2 ack(s) not sent (the channel is closed); the broker will redeliver those messages" in caplog.text
    await asyncio.wait_for(c.nack(2, requeue=False), 5)
    c.ack(5)
    await c.finish()
    assert c.channel.frames == [ack(1, multiple=True)]
    assert c.channel.problems == []
    warnings = [r for r in caplog.records if r.name == "nobs_amqp" and r.levelno == logging.WARNING]
    assert len(warnings) == 3, [r.getMessage() for r in warnings]


# -- any order, any timing: the invariant ----------------------------------------------------------


@dataclass(frozen=True)
class Step:
    kind: str  # deliver, ack, nack, turns, linger, flush
    tag: int = 0
    requeue: bool = False
    wait: bool = False  # a nack: await it here, or let it run in the background
    n: int = 0  # turns: how many


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[int, list[int], list[Step]]:
    """A prefetch, write delays, and steps: tags delivered in order, each settled once (acked, or
    nacked with or without requeue) in any order after its delivery, with loop turns, lingers
    and flushes in between."""
    n = draw(st.integers(1, 40))
    prefetch = draw(st.integers(1, 60))
    delays = draw(st.lists(st.integers(0, 3), min_size=1, max_size=5))
    order = draw(st.permutations(range(1, n + 1)))
    steps: list[Step] = []
    delivered = 0
    for tag in order:
        while delivered < tag or (delivered < n and draw(st.booleans())):
            delivered += 1
            steps.append(Step("deliver", delivered))
        how = draw(st.sampled_from(["ack"] * 4 + ["requeue", "reject"]))
        if how == "ack":
            steps.append(Step("ack", tag))
        else:
            steps.append(Step("nack", tag, requeue=how == "requeue", wait=draw(st.booleans())))
        pause = draw(st.sampled_from(["none"] * 4 + ["turns", "linger", "flush"]))
        if pause == "turns":
            steps.append(Step("turns", n=draw(st.integers(1, 4))))
        elif pause != "none":
            steps.append(Step(pause))
    return prefetch, delays, steps


async def play(prefetch: int, delays: list[int], steps: list[Step]) -> Consumer:
    c = Consumer.make(prefetch, FakeChannel(delays=delays))
    for step in steps:
        if step.kind == "deliver":
            assert c.deliver() == [step.tag]
        elif step.kind == "ack":
            c.ack(step.tag)
        elif step.kind == "nack" and step.wait:
            await asyncio.wait_for(c.nack(step.tag, requeue=step.requeue), 10)
        elif step.kind == "nack":
            c.nack_in_background(step.tag, requeue=step.requeue)
        elif step.kind == "turns":
            await loop_turns(step.n)
        elif step.kind == "linger":
            # The linger timer was scheduled before this sleep began, so it is due first.
            await asyncio.sleep(acks.ACK_LINGER_SECONDS * 2)
        else:
            await asyncio.wait_for(c.acker.flush(), 10)
    await c.finish()
    return c


@pytest.mark.timeout(120)
@settings(
    max_examples=300, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(scenarios())
def test_every_delivery_is_settled_exactly_once_as_decided_in_frames_the_broker_accepts(
    scenario: tuple[int, list[int], list[Step]],
) -> None:
    prefetch, delays, steps = scenario
    with mock.patch.object(acks, "ACK_LINGER_SECONDS", 0.001), asyncio.Runner(loop_factory=asyncio.new_event_loop) as r:
        c = r.run(play(prefetch, delays, steps))
    c.check()
    decided_acks = sum(1 for s in steps if s.kind == "ack")
    assert sum(1 for f in c.channel.frames if f.ack) <= decided_acks, "more ack frames than acks"
