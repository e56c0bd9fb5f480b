"""What `nobs_amqp.transports.amqp.link` takes from aiormq's private parts (aiormq is pinned to 7.x): if an
upgrade renames them, these fail, not a stall that goes unnoticed or an alarm nobody hears of."""

from __future__ import annotations

import aiormq

from nobs_amqp.transports.amqp import link


async def test_aiormq_still_has_what_link_uses() -> None:
    connection = aiormq.Connection("amqp://guest:guest@127.0.0.1:1/?heartbeat=7")  # no I/O until connect()
    assert connection.heartbeat_timeout == 7
    for name in (link.GRACE_ATTRIBUTE, link.LAST_FRAME_ATTRIBUTE):
        assert isinstance(getattr(connection, name), float | int), name
    for name in (link.BLOCKED_HANDLER, link.UNBLOCKED_HANDLER):
        assert callable(getattr(connection, name)), name
    # The heartbeat loop reads the grace timeout when it runs, not once: setting it after connecting works.
    assert "_Connection__heartbeat_grace_timeout" in aiormq.Connection.is_connection_was_stuck.fget.__code__.co_names  # type: ignore[attr-defined]


def test_a_url_keeps_its_own_heartbeat() -> None:
    assert link.with_heartbeat("amqp://h/", 10) == "amqp://h/?heartbeat=10"
    assert link.with_heartbeat("amqp://h/v?name=x", 10) == "amqp://h/v?name=x&heartbeat=10"
    assert link.with_heartbeat("amqp://h/?heartbeat=3", 10) == "amqp://h/?heartbeat=3"
    assert link.heartbeat_of("amqp://h/?heartbeat=3") == 3
    assert link.heartbeat_of("amqp://h/?heartbeat=x") == link.DEFAULT_HEARTBEAT
