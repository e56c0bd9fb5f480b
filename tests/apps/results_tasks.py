"""Tasks whose results the tests await (results, groups, chains)."""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass

from pydantic import BaseModel

from nobs_amqp import Reject

_lock = threading.Lock()
ATTEMPTS: dict[str, int] = defaultdict(int)


class Number(BaseModel):
    value: int
    key: str = ""
    fail_times: int = 0


class Total(BaseModel):
    total: int
    attempts: int


@dataclass
class Pair:
    a: int
    b: int


def _attempt(key: str) -> int:
    with _lock:
        ATTEMPTS[key] += 1
        return ATTEMPTS[key]


async def add(pair: Pair) -> Total:
    """A pydantic model as the result."""
    return Total(total=pair.a + pair.b, attempts=1)


def add_sync(pair: Pair) -> int:
    """A sync task's result (run in a thread)."""
    return pair.a + pair.b


async def plus_one(number: Number) -> Number:
    """Fails `fail_times` times (retried), then returns the number plus one."""
    attempt = _attempt(number.key) if number.key else 1
    if attempt <= number.fail_times:
        raise ConnectionError(f"flaky failure {attempt} of {number.key}")
    return Number(value=number.value + 1, key=number.key)


async def double(number: Number) -> Number:
    return Number(value=number.value * 2, key=number.key)


async def always_fails(number: Number) -> Number:
    _attempt(number.key)
    raise ValueError(f"boom {number.value}")


async def rejects(number: Number) -> Number:
    raise Reject(f"no {number.value}")


async def untyped(number: Number):  # type: ignore[no-untyped-def]  # no return annotation: plain JSON
    return {"value": number.value, "list": [1, 2]}


async def unserializable(number: Number) -> object:
    return object()
