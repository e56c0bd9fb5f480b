"""Optional message signing: publish rights alone do not let anyone run a task.

With `Project(signing_key=...)` (or NOBS_AMQP_SIGNING_KEY) every message a project
publishes carries `x-nobs-signature`, an HMAC-SHA256 over the queue it is meant for (its
destination: the worker's queue, or `W.dlq` for a dead letter), the task reference, the
message id, the `x-nobs-*` headers and the body. A worker with a key dead-letters an
unsigned or forged message as `bad_signature` before it looks at anything else, and a
message signed for another queue is forged there: a captured task cannot be sent to another
worker, nor a dead letter straight back to its worker.

What a signature cannot stop is a captured message published again, unchanged, to its own
queue: it verifies. A worker acks a verified copy of an attempt it settled (among its last
`settled.REMEMBERED`) without running it; another worker process, or the same one after a
restart, runs it again. Publish rights are the boundary there (RabbitMQ permissions).

Several keys rotate: the first signs, every one verifies. Roll a new key out as
`"new old"` everywhere, then drop the old one once no message signed with it is left
(in queues, the delay ladder or the DLQ).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace

import orjson

from .errors import ConfigurationError
from .message import RESENT, SIGNATURE, Message

KEY_ENV = "NOBS_AMQP_SIGNING_KEY"
MIN_KEY_BYTES = 16
#: v2 signs the destination too; v1 (without it) is no longer accepted.
_SCHEME = "v2="
#: Headers outside the signature: the signature itself, and the mark a producer adds when it
#: sends a signed message again.
_UNSIGNED = frozenset({SIGNATURE, RESENT})

SigningKeys = str | bytes | Sequence[str | bytes]


class Signer:
    """Signs with the first key, verifies with any. Holds keys; never prints them."""

    def __init__(self, keys: Sequence[bytes]) -> None:
        if not keys:
            raise ConfigurationError("signing needs at least one key")
        for key in keys:
            if len(key) < MIN_KEY_BYTES:
                raise ConfigurationError(
                    f"a signing key must have at least {MIN_KEY_BYTES} bytes; "
                    f'make one with: python -c "import secrets; print(secrets.token_urlsafe(32))"'
                )
        self._keys = tuple(keys)

    def __repr__(self) -> str:
        return f"Signer({len(self._keys)} key(s))"

    @classmethod
    def configured(cls, setting: SigningKeys | None) -> Signer | None:
        """The signer for `Project(signing_key=...)`, else NOBS_AMQP_SIGNING_KEY (keys separated
        by spaces, newest first), else None: no signing."""
        if setting is None:
            setting = os.environ.get(KEY_ENV, "").split() or None
            if setting is None:
                return None
        values = [setting] if isinstance(setting, str | bytes) else list(setting)
        return cls([v.encode() if isinstance(v, str) else bytes(v) for v in values])

    def sign(self, message: Message, destination: str) -> Message:
        """`message` signed for the queue `destination` (a worker's queue, or its `W.dlq`)."""
        headers = {k: v for k, v in message.headers.items() if k != SIGNATURE}
        unsigned = replace(message, headers=headers)
        signature = _SCHEME + _mac(self._keys[0], _canonical(unsigned, destination)).hex()
        return replace(message, headers={**headers, SIGNATURE: signature})

    def problem(self, message: Message, destination: str) -> str | None:
        """Why `message` is not signed by one of our keys for the queue `destination`; None when it is."""
        given = message.headers.get(SIGNATURE)
        if not isinstance(given, str) or not given:
            return "the message is not signed, and this worker only runs signed messages"
        if given.startswith("v1="):
            return "the signature is of an older kind (v1, which does not bind the queue): sign it again"
        if not given.startswith(_SCHEME):
            return "the signature is not of a kind this worker knows"
        try:
            expected = bytes.fromhex(given.removeprefix(_SCHEME))
            content = _canonical(message, destination)
        except (ValueError, TypeError, orjson.JSONEncodeError):
            return "the signature or the signed headers cannot be read"
        from hmac import compare_digest

        if any(compare_digest(_mac(key, content), expected) for key in self._keys):
            return None
        return (
            f"the signature does not match: signed with another key, for another queue than {destination!r}, "
            f"or changed after signing"
        )


def _mac(key: bytes, content: bytes) -> bytes:
    import hashlib  # here: a project without a signing key never loads hashlib and hmac
    import hmac

    return hmac.new(key, content, hashlib.sha256).digest()


def _canonical(message: Message, destination: str) -> bytes:
    headers = {k: v for k, v in message.headers.items() if k.startswith("x-nobs-") and k not in _UNSIGNED}
    head = orjson.dumps([destination, message.task, message.message_id, headers], option=orjson.OPT_SORT_KEYS)
    return head + b"\n" + message.body
