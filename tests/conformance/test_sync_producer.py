"""The sync producer (`project.sync()`): queueing from sync code through one I/O thread, with the
guarantees of `await worker.queue()`: confirmed, checked at the call site, typed errors. Run on
RabbitMQ and memory:// alike (the `url` fixture), except what only one of them can show."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import math
import os
import threading
import uuid
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from nobs_amqp import (
    BlockingCallError,
    BrokerConnectionError,
    BrokerUnavailableError,
    MessageTooLargeError,
    Observer,
    PayloadTypeError,
    ProducerClosedError,
    Project,
    Publish,
    PublishInterruptedError,
    PublishUnconfirmedError,
    TaskDefinitionError,
    TaskNotAllowedError,
    Worker,
)
from nobs_amqp import sync as sync_module
from nobs_amqp.errors import MemoryBrokerLoopError
from nobs_amqp.message import Message
from nobs_amqp.testing import drain, drain_sync

from ..apps import tasks
from ..proxy import Proxy
from ..support import run_module

pytest_plugins = ["pytester"]

THREADS = 8
PER_THREAD = 25


def make(url: str, name: str, **options: Any) -> tuple[Project, Worker]:
    worker = Worker(name)
    return Project(name="nobs-test", workers=[worker], packages=["tests"], url=url, **options), worker


def key() -> str:
    return uuid.uuid4().hex


def test_queue_is_confirmed_and_the_task_runs(url: str, name: str) -> None:
    project, worker = make(url, name)
    k = key()
    with project.sync() as producer:
        message_id = producer.queue(worker, tasks.record, tasks.Job(key=k))
        ids = producer.queue_many(worker, tasks.record, [tasks.Job(key=k), tasks.Job(key=k)])
        assert drain_sync(producer) == 3
    assert len(message_id) == 32 and len(set([message_id, *ids])) == 3
    assert len(tasks.calls(k)) == 3
    assert not producer.is_open and producer.closed


async def test_a_script_thread_queues_and_an_async_worker_runs_it(url: str, name: str) -> None:
    """Queued from another thread (as a sync route in a thread pool is), drained on this loop."""
    project, worker = make(url, name)
    k = key()
    producer = project.sync()
    try:
        await asyncio.to_thread(producer.queue, worker, tasks.record, tasks.Job(key=k), delay=1)
    finally:
        await asyncio.to_thread(producer.close)
    async with project:
        assert await drain(project, timeout=30) == 1
    assert len(tasks.calls(k)) == 1


def test_call_site_errors_are_raised_in_the_callers_thread(url: str, name: str) -> None:
    project, worker = make(url, name, max_message_size=1000)
    producer = project.sync()
    try:
        with pytest.raises(PayloadTypeError, match="does not match Job"):
            producer.queue(worker, tasks.record, tasks.SyncJob(key="x", numbers=[]))  # type: ignore[arg-type]
        with pytest.raises(PayloadTypeError, match="sleep is nan"):
            producer.queue_many(worker, tasks.record, [tasks.Job(key="a"), tasks.Job(key="b", sleep=math.nan)])
        with pytest.raises(TaskDefinitionError, match="lambda"):
            producer.queue(worker, lambda job: None, tasks.Job(key="x"))
        with pytest.raises(TaskNotAllowedError, match="outside project"):
            producer.queue(worker, os.path.basename, "x")
        assert not producer.is_open  # checked here: nothing was handed to the I/O thread, not even opened
        with pytest.raises(MessageTooLargeError, match="more than the broker takes"):
            producer.queue_many(worker, tasks.record, [tasks.Job(key="small"), tasks.Job(key="x" * 2000)])
        assert drain_sync(producer) == 0  # none of them was sent
    finally:
        producer.close()


def test_many_threads_each_message_confirmed_and_run_once(url: str, name: str) -> None:
    project, worker = make(url, name)
    keys = [[key() for _ in range(PER_THREAD)] for _ in range(THREADS)]
    producer = project.sync()
    started = threading.Barrier(THREADS)

    def queue_all(mine: list[str]) -> list[str]:
        started.wait(timeout=10)
        return [producer.queue(worker, tasks.record, tasks.Job(key=k)) for k in mine]

    try:
        with ThreadPoolExecutor(THREADS) as pool:
            ids = [i for found in pool.map(queue_all, keys) for i in found]
        assert len(set(ids)) == THREADS * PER_THREAD
        assert drain_sync(producer) == THREADS * PER_THREAD
    finally:
        producer.close()
    assert all(len(tasks.calls(k)) == 1 for mine in keys for k in mine)


async def test_inside_a_running_event_loop_it_says_to_await_instead() -> None:
    project, worker = make(f"memory://{key()}", "in-loop")
    producer = project.sync()
    with pytest.raises(BlockingCallError, match=r"use `await worker.queue\(fn, payload\)` there instead"):
        producer.queue(worker, tasks.record, tasks.Job(key="x"))
    with pytest.raises(BlockingCallError, match=r"producer.open\(\) blocks"):
        producer.open()
    assert not producer.is_open


def test_a_closed_producer_says_so_and_project_sync_makes_a_new_one(url: str, name: str) -> None:
    project, worker = make(url, name)
    k = key()
    producer = project.sync()
    assert project.sync() is producer
    producer.open()
    producer.close()
    with pytest.raises(ProducerClosedError, match=r"is closed: get an open one with `project.sync\(\)`"):
        producer.queue(worker, tasks.record, tasks.Job(key=k))
    with project.sync() as again:
        assert again is not producer
        again.queue(worker, tasks.record, tasks.Job(key=k))
        assert drain_sync(again) == 1
    assert len(tasks.calls(k)) == 1


def test_close_lets_calls_in_flight_finish(url: str, name: str) -> None:
    """Threads queueing while another closes: each call returns a confirmed id, or raises
    ProducerClosedError (nothing sent); every returned id ran."""
    project, worker = make(url, name)
    producer = project.sync().open()
    sent: list[str] = []
    enough, refused = threading.Event(), threading.Event()

    def keep_queueing() -> None:
        while True:
            try:
                sent.append(producer.queue(worker, tasks.record, tasks.Job(key=key())))
                if len(sent) >= 20:
                    enough.set()
            except ProducerClosedError:
                refused.set()
                return

    threads = [threading.Thread(target=keep_queueing) for _ in range(4)]
    for thread in threads:
        thread.start()
    assert enough.wait(30)
    producer.close()
    for thread in threads:
        thread.join(timeout=30)
    assert refused.is_set() and not any(thread.is_alive() for thread in threads)
    with project.sync() as again:
        assert drain_sync(again) == len(sent)


def test_a_call_that_outlasts_its_timeout_may_have_been_sent(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The I/O thread not answering in time (a hung connection, a blocked loop) is a typed,
    maybe-sent error in the caller, not a hang."""
    monkeypatch.setattr(sync_module, "GRACE_SECONDS", 0.1)
    project, _ = make(url, "timeout")
    with project.sync() as producer:

        async def hangs(session: object) -> None:
            await asyncio.sleep(30)

        with pytest.raises(PublishInterruptedError, match="did not finish within") as raised:
            producer._call("somewhere", hangs, 0.2)
        assert raised.value.maybe_sent


async def test_memory_broker_consumed_on_another_loop_is_refused(name: str) -> None:
    """memory:// lives on one event loop: a sync producer's thread may queue while nothing consumes
    on another loop (then drain), and is told so, not corrupted, when something does."""
    project, worker = make(f"memory://{key()}", name)
    producer = project.sync()
    try:
        async with project, project.consuming(worker):
            with pytest.raises(MemoryBrokerLoopError, match="is being consumed on another event loop"):
                await asyncio.to_thread(producer.queue, worker, tasks.record, tasks.Job(key="x"))
    finally:
        await asyncio.to_thread(producer.close)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_opens_its_own_connection(url: str, name: str) -> None:
    """Opened before a fork (gunicorn --preload): the child queues on a connection of its own,
    and the parent's connection still works."""
    if url.startswith("memory://"):
        pytest.skip("a forked child's memory:// broker is its own copy")
    project, worker = make(url, name, publish_timeout=3.0)
    k = key()
    producer = project.sync().open()
    try:
        producer.queue(worker, tasks.record, tasks.Job(key=k))
        read, write = os.pipe()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads: what is tested here
            pid = os.fork()
        if pid == 0:  # the child: report, never return into pytest
            code = 1
            try:
                os.close(read)
                answer = producer.queue(worker, tasks.record, tasks.Job(key=k))
                os.write(write, answer.encode())
                code = 0
            except BaseException as exc:  # noqa: BLE001 - reported to the parent
                os.write(write, f"error {type(exc).__name__}: {exc}".encode())
            finally:
                os._exit(code)
        os.close(write)
        with os.fdopen(read, "rb") as answer:
            said = answer.read().decode()
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, said
        assert len(said) == 32
        producer.queue(worker, tasks.record, tasks.Job(key=k))  # the parent's connection is intact
        assert drain_sync(producer) == 3
    finally:
        producer.close()
    assert len(tasks.calls(k)) == 3


async def test_a_script_exits_cleanly_without_closing(amqp_url: str, name: str) -> None:
    """A script that never closes its producer: interpreter exit closes it (atexit), the calls
    it made were confirmed, and nothing is reported on the way out."""
    code, output = await run_module(
        "tests.apps.sync_script", env={"NOBS_AMQP_URL": amqp_url, "SYNC_WORKER": name, "SYNC_COUNT": "3"}
    )
    assert code == 0, output
    *ids, last = output.split("\n")[:-1]
    assert len(ids) == 3 and all(len(line) == 32 for line in ids) and last == "closed", output
    project, _ = make(amqp_url, name)
    async with project:
        assert await drain(project, timeout=30) == 3


USER_TASKS = """
from pydantic import BaseModel
from nobs_amqp import Project, Worker

priority_queue = Worker("priority_queue")
project = Project(name="userapp", workers=[priority_queue], url="amqp://app:secret@127.0.0.1:1/prod")
producer = project.sync()  # module level, as a Flask or Django app has it
SENT = []

class SendEmail(BaseModel):
    email: str

async def send_email(request: SendEmail) -> None:
    SENT.append(request.email)
"""

USER_CONFTEST = """
import pytest
from nobs_amqp.testing import use_broker
from userapp.tasks import project

@pytest.fixture(autouse=True)
def test_broker(nobs_amqp_memory):
    with use_broker(project):
        yield
"""

USER_SYNC_TESTS = """
from nobs_amqp.testing import drain_sync
from userapp.tasks import SENT, SendEmail, priority_queue, producer, send_email

def test_sends():  # a plain sync test, as Django's and Flask's are
    producer.queue(priority_queue, send_email, SendEmail(email="ola@nordmann.no"), delay=60)
    assert drain_sync(producer) == 1
    assert SENT == ["ola@nordmann.no"]

def test_each_test_gets_its_own_broker(nobs_amqp_memory):
    producer.queue(priority_queue, send_email, SendEmail(email="kari@nordmann.no"))
    assert len(nobs_amqp_memory.messages("priority_queue")) == 1  # this test's broker, not the last one's
    assert drain_sync(producer) == 1
"""


@pytest.mark.timeout(120)
def test_a_user_project_tests_its_sync_code_on_memory(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        **{
            "userapp/__init__": "",
            "userapp/tasks": USER_TASKS,
            "conftest": USER_CONFTEST,
            "test_userapp": USER_SYNC_TESTS,
        }
    )
    pytester.makepyprojecttoml(
        '[tool.pytest.ini_options]\nasyncio_default_fixture_loop_scope = "function"\nfilterwarnings = ["error"]\n'
    )
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)


def test_an_unreachable_broker_is_a_typed_error_and_leaves_nothing_running() -> None:
    project, worker = make("amqp://guest:guest@127.0.0.1:1/", "unreachable", publish_timeout=2.0)
    producer = project.sync()
    for _ in range(2):  # nothing half open: the next call tries again
        with pytest.raises(BrokerConnectionError, match=r"cannot connect to amqp://guest:\*\*\*@127.0.0.1:1/"):
            producer.queue(worker, tasks.record, tasks.Job(key="x"))
        assert not producer.is_open
        assert not [thread for thread in threading.enumerate() if thread.name.startswith("nobs-amqp sync")]
    producer.close()


REQUEST: contextvars.ContextVar[str] = contextvars.ContextVar("request", default="none")


class SeesTheCaller(Observer):
    """Records the caller's context variable as each publish sees it (a trace's span is one)."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    @contextlib.contextmanager
    def publishing(self, publish: Publish) -> Iterator[Message]:
        self.seen.append(REQUEST.get())
        yield publish.message


def test_a_publish_runs_in_the_callers_context(url: str, name: str) -> None:
    """What the caller's context carries (an OpenTelemetry span: the trace of the web request)
    reaches the publish on the I/O thread, as it does with `await worker.queue()`."""
    observer = SeesTheCaller()
    project, worker = make(url, name, observers=[observer], tracing=False)

    def queue_as(request: str) -> None:
        REQUEST.set(request)
        producer.queue(worker, tasks.record, tasks.Job(key=key()))

    with project.sync() as producer:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(queue_as, ["first", "second"]))
        assert sorted(observer.seen) == ["first", "second"]
        assert drain_sync(producer) == 2


class LostConnection(Observer):
    def __init__(self) -> None:
        self.event = threading.Event()

    def connection(self, up: bool) -> None:
        if not up:
            self.event.set()


@pytest.mark.timeout(90)
async def test_broker_errors_reach_the_caller_with_their_types(amqp_url: str, name: str) -> None:
    """A publish the broker never confirms is `PublishUnconfirmedError` (maybe sent, with its id);
    an unreachable broker is `BrokerUnavailableError` (not sent): raised in the calling thread."""
    lost = LostConnection()
    async with Proxy() as proxy:
        project, worker = make(proxy.url_for(amqp_url), name, publish_timeout=2.0, observers=[lost])
        producer = project.sync()
        try:
            await asyncio.to_thread(producer.queue, worker, tasks.record, tasks.Job(key=key()))
            proxy.stall()  # written, never confirmed
            with pytest.raises(PublishUnconfirmedError) as unconfirmed:
                await asyncio.to_thread(producer.queue, worker, tasks.record, tasks.Job(key=key()))
            assert unconfirmed.value.maybe_sent and unconfirmed.value.message_id
            proxy.refusing = True
            proxy.cut()
            assert await asyncio.to_thread(lost.event.wait, 10)  # nothing can be written now
            with pytest.raises(BrokerUnavailableError) as unavailable:
                await asyncio.to_thread(producer.queue, worker, tasks.record, tasks.Job(key=key()))
            assert not unavailable.value.maybe_sent
        finally:
            proxy.refusing = False
            await asyncio.to_thread(producer.close)
