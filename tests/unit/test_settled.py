"""What a worker remembers of the attempts it settled (`nobs_amqp.settled`), without a broker."""

from __future__ import annotations

import asyncio

from nobs_amqp.settled import SettledAttempts

WHEN = "2026-11-29T06:30:15.123Z"


async def test_settled_attempts_are_seen_and_the_oldest_forgotten() -> None:
    attempts = SettledAttempts(size=3)
    for n in range(5):
        attempts.remember((f"id-{n}", 1, WHEN))
    attempts.remember(("id-4", 1, WHEN))  # again: still one entry
    assert [await attempts.seen((f"id-{n}", 1, WHEN)) for n in range(5)] == [False, False, True, True, True]
    assert not await attempts.seen(("id-4", 2, WHEN))  # another attempt
    assert not await attempts.seen(("id-4", 1, "2026-11-29T06:30:15.124Z"))  # a replay


async def test_no_two_identities_share_a_key() -> None:
    attempts = SettledAttempts()
    attempts.remember(("a1", 2, WHEN))
    assert not await attempts.seen(("a", 12, WHEN))
    assert not await attempts.seen(("a12", 2, WHEN[1:]))
    assert await attempts.seen(("a1", 2, WHEN))


async def test_a_copy_of_a_running_attempt_waits_for_its_end() -> None:
    attempts = SettledAttempts()
    identity = ("id", 1, WHEN)
    assert attempts.start(identity)
    assert not attempts.start(identity)  # a second copy running at once is not a second owner
    seen = asyncio.create_task(attempts.seen(identity))
    await asyncio.sleep(0.01)
    assert not seen.done()
    attempts.remember(identity)
    attempts.end(identity)
    assert await seen
