"""Results without a broker: the wire (frames, headers, copies, signatures) and the registry."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime

import pytest
from pamqp.commands import Basic

from nobs_amqp import message as wire
from nobs_amqp import results
from nobs_amqp.errors import ResultLostError, ResultUnreadableError, TaskFailedError
from nobs_amqp.handle import Queued
from nobs_amqp.signing import Signer
from nobs_amqp.transports.amqp import frames

NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
ADDRESS = "amq.rabbitmq.reply-to.g1h2AA5yZXBseUAxMjM0NTY3OAAAAAAAAAAB.ZXhhbXBsZQ=="


def request() -> wire.Message:
    message = wire.new_message(b'{"a":1}', "tests.apps.results_tasks:add", "p", now=NOW)
    headers = {**message.headers, wire.REPLY: message.message_id, wire.CHAIN: '{"step":1,"of":1,"next":[]}'}
    return replace(message, headers=headers, reply_to=ADDRESS)


def test_reply_to_and_correlation_id_encode_as_pamqp_encodes_them() -> None:
    message = replace(request(), correlation_id="abc")
    expected = Basic.Properties(
        content_type="application/json",
        delivery_mode=2,
        message_id=message.message_id,
        timestamp=message.timestamp,
        message_type=message.task,
        app_id=message.app_id,
        headers=dict(message.headers),  # type: ignore[arg-type]
        correlation_id="abc",
        reply_to=ADDRESS,
    )
    assert frames.properties(message) == expected.marshal()


@pytest.mark.parametrize(
    "address", ["victim", "", "amq.rabbitmq.reply-to", "amq.direct", "amq.rabbitmq.reply-to.a\nb", None]
)
def test_only_a_direct_reply_to_address_is_replied_to(address: str | None) -> None:
    assert replace(request(), reply_to=address).reply is None
    assert not wire.is_reply_address(address)


def test_a_reply_needs_its_header() -> None:
    message = request()
    assert message.reply == (ADDRESS, message.message_id)
    assert replace(message, headers={wire.ATTEMPT: 1}).reply is None
    assert replace(message, headers={**message.headers, wire.REPLY: "bad id with spaces"}).reply is None


def test_a_retry_carries_the_reply_and_the_chain_and_a_replay_drops_them() -> None:
    message = request()
    retry = wire.retry_copy(message, 5, now=NOW)
    assert retry.reply == message.reply and retry.headers[wire.CHAIN] == message.headers[wire.CHAIN]
    dead = wire.dead_letter_copy(message, wire.Reason.MAX_ATTEMPTS, ValueError("x"), now=NOW)
    assert dead.headers[wire.CHAIN] == message.headers[wire.CHAIN]
    replayed = wire.replay_copy(dead, now=NOW)
    assert replayed.reply is None and wire.CHAIN not in replayed.headers and replayed.reply_to is None


def test_the_reply_header_is_signed_and_old_signatures_stay_valid() -> None:
    signer = Signer([b"k" * 32])
    plain = wire.new_message(b"{}", "m:f", "p", now=NOW)
    signed_plain = signer.sign(plain, "q")
    asked = signer.sign(replace(plain, headers={**plain.headers, wire.REPLY: plain.message_id}), "q")
    assert signer.problem(signed_plain, "q") is None and signer.problem(asked, "q") is None
    forged = replace(signed_plain, headers={**signed_plain.headers, wire.REPLY: plain.message_id})
    assert signer.problem(forged, "q") is not None, "a reply cannot be added to a signed message"


async def test_the_registry_drops_unknown_and_forged_replies_and_fails_on_loss() -> None:
    signer = Signer([b"k" * 32])
    registry = results.Results(signer)
    waiting = registry.expect("id-1")
    other = registry.expect("id-2")
    good = signer.sign(results.success("m:f", "id-1", b"3", "p", NOW), wire.DIRECT_REPLY_TO)
    registry.replied(results.success("m:f", "id-1", b"4", "p", NOW))  # unsigned: dropped
    registry.replied(signer.sign(results.success("m:f", "nobody", b"5", "p", NOW), wire.DIRECT_REPLY_TO))
    assert not waiting.done() and len(registry) == 2
    registry.replied(replace(good, correlation_id="id-2"))  # signed for another id: dropped
    assert not other.done()
    registry.replied(good)
    assert results.value_of(await waiting, None) == 3 and len(registry) == 1
    registry.lost("gone")
    with pytest.raises(ResultLostError, match="gone"):
        await other
    assert len(registry) == 0


def test_failure_and_unreadable_replies_raise_typed_errors() -> None:
    failed = results.failure("m:f", "i", "p", NOW, "max_attempts", ValueError("boom"), "2 of 3")
    with pytest.raises(TaskFailedError) as raised:
        results.value_of(failed, None)
    assert (raised.value.reason, raised.value.error_type, raised.value.step) == (
        "max_attempts",
        "builtins.ValueError",
        "2 of 3",
    )
    with pytest.raises(ResultUnreadableError):
        results.value_of(results.unreadable("m:f", "i", "p", NOW, "not JSON"), None)
    with pytest.raises(ResultUnreadableError):
        results.value_of(results.success("m:f", "i", b"{", "p", NOW), None)


async def test_a_handle_is_its_message_id() -> None:
    handle = Queued("abc", "w", results=results.Results(None), waiting=asyncio.get_running_loop().create_future())
    assert handle == "abc" and hash(handle) == hash("abc") and f"{handle}" == "abc"
    assert {handle: 1}["abc"] == 1 and handle.worker == "w"
    import pickle

    assert pickle.loads(pickle.dumps(handle)) == "abc"
