"""Helpers shared by the tests: waiting with deadlines, reading queues, raw publishing,
subprocesses and their logs, free ports, a stand-in HTTP server."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
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
    return await run_module("nobs_amqp", *args, env=env, stdin=stdin, timeout=timeout, cwd=cwd)


async def run_demo(url: str, timeout: float = 100) -> tuple[int, str]:
    """Run `python -m examples.send_email.demo` against `url`, as `make demo` does; exit code and output."""
    return await run_module("examples.send_email.demo", env={"NOBS_AMQP_URL": url}, timeout=timeout)


async def run_module(
    module: str, *args: str, env: dict[str, str], stdin: bytes = b"", timeout: float = 30, cwd: Path = ROOT
) -> tuple[int, str]:
    """Run `python -m MODULE ARGS` from `cwd` with `env` over this environment; killed after
    `timeout` seconds. Its exit code and output (stdout and stderr together)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
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


# -- subprocesses and their logs --------------------------------------------------------------

#: The project `nobs-amqp consume` loads in worker subprocesses (worker name and options from the environment).
APP = "tests.apps.cli_app:project"


def output(log: Path) -> str:
    """The end of a subprocess's log (its stdout and stderr): for checks and failure messages."""
    return log.read_text(errors="replace")[-6000:] if log.exists() else "(no output)"


@contextlib.contextmanager
def process(
    command: list[str], *, env: dict[str, str], log: Path, new_session: bool = True
) -> Iterator[subprocess.Popen[bytes]]:
    """`command` from the repository root with `env` over this environment, its output in `log`;
    killed on the way out whatever happened: with `new_session`, it leads a process group of its
    own (as a shell runs it) and the whole group is killed (a supervisor's workers too)."""
    with log.open("ab") as out:
        proc = subprocess.Popen(
            command,
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=new_session,
        )
    try:
        yield proc
    finally:
        if new_session:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        elif proc.poll() is None:
            proc.kill()
        proc.wait(10)


def worker_process(
    amqp_url: str,
    name: str,
    log: Path,
    *options: str,
    concurrency: int = 10,
    delivery_limit: int = 10,
    new_session: bool = False,
) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
    """`nobs-amqp consume name *options` of tests.apps.cli_app in a subprocess (see `process`)."""
    env = {
        "NOBS_AMQP_URL": amqp_url,
        "NOBS_TEST_WORKER": name,
        "NOBS_TEST_CONCURRENCY": str(concurrency),
        "NOBS_TEST_DELIVERY_LIMIT": str(delivery_limit),
        "PYTHONPATH": str(ROOT),
    }
    command = [sys.executable, "-m", "nobs_amqp", "--app", APP, "consume", name, *options]
    return process(command, env=env, log=log, new_session=new_session)


async def exit_code(proc: subprocess.Popen[bytes], log: Path, timeout: float) -> int:
    """Wait (polling, bounded) for `proc` to exit; fail with the end of its log if it does not."""
    try:
        await eventually(lambda: proc.poll() is not None, timeout=timeout, interval=0.05)
    except AssertionError:
        raise AssertionError(f"pid {proc.pid} still runs after {timeout} s; its output:\n{output(log)}") from None
    return proc.returncode


def pids(folder: Path, key: str, what: str) -> list[int]:
    """The pids of the processes that left `<key>.<what>.<pid>` in `folder` (tests.apps.tasks' file tasks)."""
    return sorted(int(p.name.rsplit(".", 1)[1]) for p in folder.glob(f"{key}.{what}.*"))


async def count_is(broker: Broker, queue: str, n: int) -> bool:
    """Whether `queue` holds `n` ready messages (for `eventually`)."""
    return await broker.count(queue) == n


# -- the network ----------------------------------------------------------------------------------


def free_port() -> int:
    """A loopback port nothing listens on (bound, then let go)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def http_server(status: int = 200, body: bytes = b"") -> Iterator[tuple[int, list[str]]]:
    """A stand-in for the management API on a free loopback port, in a thread: it answers every GET
    with `status` and `body`, and records each request's Authorization header. Yields (port, headers)."""
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("Authorization", ""))
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def underlay_connections(project: Any) -> tuple[Any, ...]:
    """The aiormq connections a RabbitMQ project's transport has open now, publishing and
    consuming (the tests check that a bad message closed none): private parts of the transport."""
    transport = project.session.transport
    opened = [link.connection for link in (transport._out, transport._in) if link.connection is not None]
    return tuple(c.transport.connection for c in opened if c.transport is not None)
