"""`dlq list|show|replay|purge` as a new user met them (issue 8).

Reading a quorum DLQ hands messages out and takes them back: RabbitMQ (3.10 and 4.0) puts each
one it gets back behind the rest and raises its `x-delivery-count`. Each test here failed
before its fix: a list out of order after a peek, a replay --limit that did not take the
oldest, peeks shown as deliveries, a multi-line error breaking the one-line table, a show that
could not find a message past the first 10,000, and a purge prompt that named nothing.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import pytest

from nobs_amqp import Project, Worker
from nobs_amqp import message as wire
from nobs_amqp.cli.dlq import ERROR_WIDTH, _summary
from nobs_amqp.ops import dlq
from nobs_amqp.topology import dead_letter_queue
from nobs_amqp.transports.base import Delivery

from ..support import Broker, eventually, publish_raw_message, run_cli, take_messages

APP = "tests.apps.cli_app:project"
TASK = "tests.apps.tasks:record"
EPOCH = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def make(url: str | None, name: str) -> tuple[Project, Worker]:
    """The project the CLI loads (tests.apps.cli_app with NOBS_TEST_WORKER=name), in-process."""
    worker = Worker(name)
    return Project(name="nobs-test", workers=[worker], packages=["tests.apps"], url=url), worker


def dead_letter(message_id: str, failed_at: datetime, error: str = "boom") -> wire.Message:
    """A dead letter as the worker writes it."""
    headers = {
        wire.ATTEMPT: 1,
        wire.REASON: "rejected",
        wire.FAILED_AT: wire.format_time(failed_at),
        wire.ERROR_MESSAGE: error,
    }
    return wire.Message(b'{"key": "x"}', TASK, message_id, "nobs-test", failed_at, headers)


async def put(project: Project, worker: Worker, messages: list[wire.Message]) -> None:
    """Publish `messages` to the DLQ: the first 500 one after the other, in this order; then
    chunks of 500, each after the one before. Within a chunk the publishes run at once over the
    transport's channels, so the broker may take them in any order (12,000 take seconds)."""
    await project.session.declare(worker, delayed=False)
    queue = dead_letter_queue(worker.name)
    for message in messages[:500]:
        await project.session.transport.publish("", queue, message)
    for start in range(500, len(messages), 500):
        await asyncio.gather(*(project.session.transport.publish("", queue, m) for m in messages[start : start + 500]))
    await eventually(lambda: dlq.count(project.session, worker), timeout=15)
    assert await dlq.count(project.session, worker) == len(messages)


async def hand_out_and_take_back(project: Project, queue: str, n: int) -> None:
    """Take the first `n` messages of `queue` and give them back unsettled, as the old
    `dlq list --limit n` did: RabbitMQ puts them behind the rest."""
    got: list[Delivery] = []

    async def hold(delivery: Delivery) -> None:
        got.append(delivery)

    subscription = await project.session.transport.consume(queue, n, hold)
    try:
        await eventually(lambda: len(got) >= n)
    finally:
        await subscription.cancel()
        await subscription.close()
    await eventually(lambda: project.session.transport.message_count(queue))


async def cli(name: str, url: str, *args: str, stdin: bytes = b"", timeout: float = 30) -> tuple[int, str]:
    env = {"NOBS_AMQP_URL": url, "NOBS_TEST_WORKER": name}
    return await run_cli("--app", APP, "dlq", *args, env=env, stdin=stdin, timeout=timeout)


def ids(listing: str) -> list[str]:
    return [line.split()[0] for line in listing.splitlines() if line.startswith("dead-")]


# -- bug 4: oldest first, whatever a peek did to the order -----------------------------------


@pytest.mark.timeout(60)
async def test_peek_and_replay_limit_take_the_oldest_after_a_peek_moved_them(url: str, name: str) -> None:
    project, worker = make(url, name)
    names = [f"dead-{i}" for i in range(5)]
    async with project:
        await put(project, worker, [dead_letter(n, EPOCH + timedelta(minutes=i)) for i, n in enumerate(names)])
        await hand_out_and_take_back(project, f"{name}.dlq", 2)  # on RabbitMQ: dead-2..4, dead-0, dead-1

        assert [m.message_id for m in await dlq.peek(project.session, worker)] == names
        assert [m.message_id for m in await dlq.peek(project.session, worker, limit=2)] == names[:2]
        assert [m.message_id for m in await dlq.peek(project.session, worker)] == names  # a full read keeps it so

        assert await dlq.replay(project.session, worker, limit=2) == 2
        replayed = await take_messages(project, name, 2)
        assert sorted(m.message_id for m in replayed) == names[:2]
        assert [m.message_id for m in await dlq.peek(project.session, worker)] == names[2:]


@pytest.mark.timeout(60)
async def test_dlq_list_is_oldest_first_after_a_peek_the_brokers_own_by_their_x_death_time(
    amqp_url: str, name: str, broker: Broker
) -> None:
    project, worker = make(amqp_url, name)
    async with project:
        await project.session.declare(worker, delayed=False)
        # First in the DLQ: one the broker dead-lettered just now (it expired in the worker's queue).
        await broker.publish_raw(name, b'{"key": "x"}', expiration=0.001, message_id="dead-expired", type=TASK)
        await eventually(lambda: dlq.count(project.session, worker), timeout=15)
        # Then the worker's own, which failed two hours and an hour ago, the newer one first.
        now = wire.wall_clock()
        for message in (
            dead_letter("dead-b", now - timedelta(hours=1)),
            dead_letter("dead-a", now - timedelta(hours=2)),
        ):
            await project.session.transport.publish("", f"{name}.dlq", message)
        await eventually(lambda: _count_is(project, worker, 3), timeout=10)
        await hand_out_and_take_back(project, f"{name}.dlq", 2)

    expected = ["dead-a", "dead-b", "dead-expired"]
    for args in (["list", name], ["list", name, "--limit", "2"], ["list", name]):
        code, listing = await cli(name, amqp_url, *args)
        assert code == 0, listing
        assert ids(listing) == expected[: 2 if "--limit" in args else 3], listing
    [expired] = [line for line in listing.splitlines() if line.startswith("dead-expired ")]
    assert "expired (by the broker)" in expired and "  ?  " not in expired, expired


async def _count_is(project: Project, worker: Worker, n: int) -> bool:
    return await dlq.count(project.session, worker) == n


def test_dead_at_is_the_brokers_time_for_what_the_broker_dead_lettered() -> None:
    forged = {wire.FAILED_AT: "2000-01-01T00:00:00.000Z"}
    assert dlq.dead_at(dead_letter("a", EPOCH)) == EPOCH
    broker = wire.Message(b"", TASK, "b", "x", EPOCH, {**forged, "x-death": [{"time": EPOCH.replace(tzinfo=None)}]})
    assert dlq.dead_at(broker) == EPOCH  # a naive AMQP timestamp is UTC; the publisher's failed-at is not used
    assert dlq.dead_at(wire.Message(b"", TASK, "c", "x", EPOCH, {"x-death": [{"reason": "expired"}]})) is None
    assert dlq.dead_at(wire.Message(b"", TASK, "d", "x", EPOCH, {wire.FAILED_AT: ["not", "a", "time"]})) is None


# -- bug 5: peeks are not deliveries ---------------------------------------------------------


@pytest.mark.timeout(60)
async def test_dlq_show_counts_peeks_apart_from_the_tasks_deliveries(amqp_url: str, name: str) -> None:
    project, worker = make(amqp_url, name)
    async with project:
        await put(project, worker, [dead_letter("dead-0", EPOCH)])
    for _ in range(2):
        code, listing = await cli(name, amqp_url, "list", name)
        assert code == 0, listing
    code, shown = await cli(name, amqp_url, "show", name, "dead-0")
    assert code == 0, shown
    assert "x-delivery-count" not in shown, shown
    assert f"peeked: 2 time(s) before (reads of {name}.dlq; the task did not run)" in shown, shown
    assert "x-nobs-attempt: 1" in shown


# -- bug 9: one line per dead letter ---------------------------------------------------------


@pytest.mark.timeout(60)
async def test_dlq_list_shows_the_first_line_of_a_validation_error_and_show_all_of_it(amqp_url: str, name: str) -> None:
    project, worker = make(amqp_url, name)
    async with project:
        await project.session.declare(worker, delayed=False)
        await publish_raw_message(project, name, b'{"fail_times": "many"}', TASK, message_id="dead-invalid")
        async with project.consuming(worker, grace_period=5):
            await eventually(lambda: dlq.count(project.session, worker), timeout=15)
        long_one = dead_letter("dead-long", EPOCH, "x" * 5000)
        await project.session.transport.publish("", f"{name}.dlq", long_one)
        await eventually(lambda: _count_is(project, worker, 2), timeout=10)

    code, listing = await cli(name, amqp_url, "list", name)
    assert code == 0, listing
    assert len(listing.splitlines()) == 3, listing  # two rows and the summary
    [invalid] = [line for line in listing.splitlines() if line.startswith("dead-invalid ")]
    assert "validation_error" in invalid and "validation error" in invalid, invalid
    assert "\\n" not in invalid and "Field required" not in invalid, invalid
    assert invalid.endswith("... (see dlq show)"), invalid
    [long_row] = [line for line in listing.splitlines() if line.startswith("dead-long ")]
    assert "x" * ERROR_WIDTH in long_row and "x" * (ERROR_WIDTH + 1) not in long_row, long_row

    code, shown = await cli(name, amqp_url, "show", name, "dead-invalid")
    assert code == 0, shown
    assert "Field required" in shown and "fail_times" in shown, shown


def test_summary_keeps_a_multi_line_error_to_one_escaped_line() -> None:
    row = _summary(dead_letter("a", EPOCH, "\x1b[2J first line\nsecond\r\nthird"))
    assert "\n" not in row and "\x1b" not in row and "second" not in row
    assert row.endswith("\\x1b[2J first line ... (see dlq show)"), row
    assert _summary(dead_letter("b", EPOCH, "short")).endswith("  short")


# -- bug 11: show finds a message at any depth, and stops there -------------------------------

DEEP = 12_000


@pytest.mark.timeout(180)
async def test_dlq_show_finds_a_dead_letter_behind_12000_others_in_bounded_time(amqp_url: str, name: str) -> None:
    project, worker = make(amqp_url, name)
    messages = [dead_letter(f"dead-{i}", EPOCH + timedelta(seconds=i)) for i in range(DEEP)]
    async with project:
        await put(project, worker, messages)
    started = time.monotonic()
    code, shown = await cli(name, amqp_url, "show", name, f"dead-{DEEP - 10}", timeout=60)
    took = time.monotonic() - started
    assert code == 0, shown
    assert f"message id: dead-{DEEP - 10}" in shown
    assert took < 30, f"dlq show took {took:.1f} s"
    async with project:
        assert await dlq.count(project.session, worker) == DEEP  # every one given back


@pytest.mark.timeout(180)
async def test_find_reads_no_further_than_its_windows(url: str, name: str) -> None:
    """A dead letter near the head of a long DLQ is found without handing out the rest; one
    that is not there is looked for in all of them; either way every one is given back."""
    project, worker = make(url, name)
    async with project:
        await put(project, worker, [dead_letter(f"dead-{i}", EPOCH + timedelta(seconds=i)) for i in range(DEEP)])
        found = await dlq.find(project.session, worker, "dead-20")
        assert found is not None and found.message_id == "dead-20"
        assert await dlq.count(project.session, worker) == DEEP
        redelivered = await read_all(project, f"{name}.dlq")
        assert 0 < sum(redelivered.values()) <= dlq.FIRST_WINDOW, sum(redelivered.values())

        await put(project, worker, [dead_letter(f"dead-{i}", EPOCH + timedelta(seconds=i)) for i in range(DEEP)])
        assert await dlq.find(project.session, worker, "no-such-id") is None
        assert await dlq.count(project.session, worker) == DEEP
        redelivered = await read_all(project, f"{name}.dlq")
        assert set(redelivered) == {f"dead-{i}" for i in range(DEEP)} and all(redelivered.values())


async def read_all(project: Project, queue: str) -> dict[str, bool]:
    """Take (ack) every message of `queue`: message id -> whether it had been handed out before."""
    seen: dict[str, bool] = {}
    count = await project.session.transport.message_count(queue)

    async def note(delivery: Delivery) -> None:
        seen[delivery.message.message_id] = delivery.redelivered
        await delivery.ack()

    subscription = await project.session.transport.consume(queue, 1000, note)
    try:
        await eventually(lambda: len(seen) >= count, timeout=60)
    finally:
        await subscription.cancel()
        await subscription.close()
    return seen


# -- friction: purge says what it deletes ----------------------------------------------------


@pytest.mark.timeout(60)
async def test_dlq_purge_names_the_worker_and_the_count(amqp_url: str, name: str) -> None:
    project, worker = make(amqp_url, name)
    async with project:
        await put(project, worker, [dead_letter(f"dead-{i}", EPOCH) for i in range(3)])

    code, output = await cli(name, amqp_url, "purge", name, stdin=b"n\n")
    assert code == 1, output  # declined: nothing happens
    assert f"Delete all 3 dead letters of {name} ({name}.dlq) for good?" in output, output
    code, output = await cli(name, amqp_url, "purge", name, stdin=b"y\n")
    assert code == 0, output
    assert f"purged 3 message(s) from {name}.dlq" in output, output
    code, output = await cli(name, amqp_url, "purge", name)  # no input: it must not ask
    assert code == 0, output
    assert f"nothing to purge: {name}.dlq is empty" in output and "Delete" not in output, output
    async with project:
        await put(project, worker, [dead_letter("dead-0", EPOCH)])
    code, output = await cli(name, amqp_url, "purge", name, "--yes")
    assert code == 0, output
    assert f"purged 1 message(s) from {name}.dlq" in output and "Delete" not in output, output
