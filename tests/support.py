"""Helpers shared by the tests: waiting with deadlines, reading queues, raw publishing."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aio_pika


async def eventually(check: Callable[[], Any], *, timeout: float = 10.0, interval: float = 0.02) -> Any:
    """Poll `check` (sync or async) until it returns something truthy; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {check}")
        await asyncio.sleep(interval)


class Broker:
    """A raw aio-pika connection to the test vhost, to look at queues as an operator would."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._connection: aio_pika.abc.AbstractConnection | None = None

    async def __aenter__(self) -> Broker:
        self._connection = await aio_pika.connect(self.url)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._connection is not None
        await self._connection.close()

    async def channel(self) -> aio_pika.abc.AbstractChannel:
        assert self._connection is not None
        return await self._connection.channel()

    async def count(self, queue: str) -> int:
        channel = await self.channel()
        try:
            declared = await channel.declare_queue(queue, passive=True)
            return int(declared.declaration_result.message_count or 0)
        finally:
            await channel.close()

    async def take(self, queue: str, n: int = 1, timeout: float = 15.0) -> list[aio_pika.abc.AbstractIncomingMessage]:
        """Wait for and consume (ack) `n` messages of `queue`."""
        channel = await self.channel()
        taken: list[aio_pika.abc.AbstractIncomingMessage] = []
        try:
            declared = await channel.declare_queue(queue, passive=True)

            async def get_one() -> bool:
                message = await declared.get(fail=False)
                if message is not None:
                    await message.ack()
                    taken.append(message)
                return len(taken) >= n

            await eventually(get_one, timeout=timeout)
            return taken
        finally:
            await channel.close()

    async def publish_raw(self, queue: str, body: bytes, **properties: Any) -> None:
        channel = await self.channel()
        try:
            await channel.default_exchange.publish(aio_pika.Message(body, delivery_mode=2, **properties), queue)
        finally:
            await channel.close()


async def take_messages(project: Any, queue: str, n: int = 1, timeout: float = 15.0) -> list[Any]:
    """Consume and ack `n` messages of `queue` through the project's own transport (any broker)."""
    taken: list[Any] = []

    async def handler(delivery: Any) -> None:
        taken.append(delivery.message)
        await delivery.ack()

    subscription = await project.session.transport.consume(queue, n, handler)
    try:
        await eventually(lambda: len(taken) >= n, timeout=timeout)
    finally:
        await subscription.cancel()
        await subscription.close()
    return taken[:n]


async def publish_raw_message(project: Any, queue: str, body: bytes, task: str, message_id: str = "raw") -> None:
    """Publish a message nobs_amqp did not make, as a foreign producer or an attacker would."""
    from nobs_amqp.message import Message, wall_clock

    await project.session.transport.publish("", queue, Message(body, task, message_id, "someone", wall_clock()))


def exception_chain(exc: BaseException) -> list[BaseException]:
    """`exc` and every exception it was raised from or during, each once."""
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or any(current is s for s in seen):
            continue
        seen.append(current)
        todo += [current.__cause__, current.__context__]
    return seen


ROOT = Path(__file__).resolve().parent.parent


async def run_cli(
    *args: str, env: dict[str, str], stdin: bytes = b"", timeout: float = 30, cwd: Path = ROOT
) -> tuple[int, str]:
    """Run `python -m nobs_amqp ARGS` from `cwd` (the repository root); its exit code and output."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "nobs_amqp",
        *args,
        cwd=cwd,
        env={**os.environ, **env},
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(stdin), timeout)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, output.decode()


async def run_demo(url: str, timeout: float = 100) -> tuple[int, str]:
    """Run `python -m examples.send_email.demo` against `url`, as `make demo` does; exit code and output."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "examples.send_email.demo",
        cwd=ROOT,
        env={**os.environ, "NOBS_AMQP_URL": url},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, output.decode()
