"""Mistakes fail where they are made, with a message that says what to do."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest

from nobs_amqp import (
    ConfigurationError,
    NotInProjectError,
    PayloadTypeError,
    Project,
    ProjectNotOpenError,
    Schedule,
    TaskDefinitionError,
    TaskNotAllowedError,
    Worker,
)

from ..apps import tasks
from ..support import ROOT, run_cli, take_messages


def project_with(worker: Worker, **options: object) -> Project:
    return Project(name="nobs-test", workers=[worker], **options)  # type: ignore[arg-type]


async def test_worker_in_no_project() -> None:
    worker = Worker("lonely")
    with pytest.raises(NotInProjectError, match=r"worker 'lonely' is in no project: add it with Project"):
        await worker.queue(tasks.record, tasks.Job(key="x"))


async def test_project_not_open() -> None:
    worker = Worker("closed")
    project_with(worker)
    with pytest.raises(ProjectNotOpenError, match=r"async with project"):
        await worker.queue(tasks.record, tasks.Job(key="x"))


async def test_lambda_nested_and_main_functions_are_refused() -> None:
    worker = Worker("refuse")
    project_with(worker, packages=["tests"])

    async def nested(job: tasks.Job) -> None: ...

    with pytest.raises(TaskDefinitionError, match="lambda"):
        await worker.queue(lambda job: None, tasks.Job(key="x"))
    with pytest.raises(TaskDefinitionError, match="inside another function; move it to module level"):
        await worker.queue(nested, tasks.Job(key="x"))

    def in_main(job: tasks.Job) -> None: ...

    in_main.__module__ = "__main__"
    in_main.__qualname__ = "in_main"
    with pytest.raises(TaskDefinitionError, match=r"defined in __main__, which a worker process cannot import"):
        await worker.queue(in_main, tasks.Job(key="x"))
    with pytest.raises(TaskDefinitionError, match="plain function"):
        await worker.queue(print, tasks.Job(key="x"))  # type: ignore[arg-type]


async def test_payload_must_match_the_annotation() -> None:
    worker = Worker("typed")
    project_with(worker, packages=["tests"])
    with pytest.raises(PayloadTypeError, match=r"does not match Job: got dict; pass a Job\(...\)"):
        await worker.queue(tasks.record, {"key": "x"})
    with pytest.raises(PayloadTypeError, match="SyncJob"):
        await worker.queue(tasks.record_sync, tasks.Job(key="x"))


async def test_task_outside_the_project_is_refused() -> None:
    worker = Worker("outside")
    project_with(worker, packages=["somewhere_else"])
    with pytest.raises(TaskNotAllowedError, match=r"Project\(tasks=\[...\]\)"):
        await worker.queue(tasks.record, tasks.Job(key="x"))


def test_default_allowlist_is_the_callers_top_level_package() -> None:
    project = project_with(Worker("default-packages"))
    assert project.allowlist.packages == frozenset({"tests"})
    assert project.allowlist.allows("tests.apps.tasks:record")
    assert not project.allowlist.allows("os:system")
    assert not project.allowlist.allows("testsuite.x:y")


def test_explicit_tasks_are_allowed() -> None:
    project = Project(name="p", workers=[Worker("explicit")], packages=[], tasks=[tasks.record])
    assert project.allowlist.allows("tests.apps.tasks:record")
    assert not project.allowlist.allows("tests.apps.tasks:record_sync")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"concurrency": 0}, "concurrency must be at least 1"),
        ({"max_priority": 0}, "max_priority must be 1..255"),
        ({"rate_limit": "10 per s"}, "rate_limit '10 per s' is not usable"),
        ({"rate_limit": "0/s"}, "rate_limit '0/s' is not usable"),
        ({"rate_limit": "5/d"}, "write 'N/s', 'N/m' or 'N/h'"),
        ({"queue_type": "stream"}, "queue_type must be 'quorum' or 'classic'"),
        ({"delivery_limit": 0}, "delivery_limit must be at least 1"),
    ],
)
def test_worker_options_are_checked(options: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        Worker("w", **options)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["", "a b", "amq.x", "a.#", "a*", "x" * 201, "a..b"])
def test_worker_names_are_checked(bad: str) -> None:
    with pytest.raises(ConfigurationError, match="is not usable"):
        Worker(bad)


def test_a_worker_belongs_to_one_project() -> None:
    worker = Worker("shared")
    Project(name="one", workers=[worker])
    with pytest.raises(ConfigurationError, match="already in project 'one'"):
        Project(name="two", workers=[worker])


def test_bad_url_scheme() -> None:
    with pytest.raises(ConfigurationError, match="use amqp://, amqps:// or memory://"):
        Project(name="p", workers=[], url="redis://localhost")


async def test_priority_needs_a_priority_queue() -> None:
    worker = Worker("noprio")
    project_with(worker, packages=["tests"])
    with pytest.raises(ConfigurationError, match=r"create it with Worker\('noprio', max_priority=N\)"):
        await worker.queue(tasks.record, tasks.Job(key="x"), priority=3)


@dataclasses.dataclass
class Plain:
    n: int


async def test_non_model_annotations_are_validated_strictly() -> None:
    from nobs_amqp.tasks import TaskSpec

    def takes_int(n: int) -> None: ...

    spec = TaskSpec(takes_int, "m:takes_int")
    assert spec.encode(3) == b"3"
    with pytest.raises(PayloadTypeError, match="int"):
        spec.encode("3")


# -- NaN and infinity (issue 17, item 10): JSON has neither; they used to be sent as null ----------

NON_FINITE = [pytest.param(math.nan, id="nan"), pytest.param(math.inf, id="inf"), pytest.param(-math.inf, id="-inf")]


@pytest.mark.parametrize("bad", NON_FINITE)
async def test_nan_and_infinity_fail_at_the_call_site_in_every_form(bad: float) -> None:
    worker = Worker("finite")
    project_with(worker, packages=["tests"], tasks=[tasks.total, tasks.scale])
    point = tasks.Point(x=0.0, y=bad)
    cases: list[tuple[object, object, str]] = [
        (tasks.record, tasks.Job(key="x", sleep=bad), "sleep"),  # a pydantic model
        (tasks.hang_sync, tasks.Hang(key="x", seconds=bad), "seconds"),  # a dataclass
        (tasks.store_readings, tasks.Readings(values=[1.0, bad]), "values[1]"),  # a list in a model
        (tasks.store_readings, tasks.Readings(by_name={"a": 1.0, "b": bad}), "by_name.b"),  # a dict in a model
        (tasks.store_readings, tasks.Readings(points=[point]), "points[0].y"),  # a dataclass in a list
        (tasks.store_readings, tasks.Readings(latest=tasks.Job(key="x", sleep=bad)), "latest.sleep"),  # a model
        (tasks.total, {"a": [1.0], "b": [2.0, bad]}, "b[1]"),  # a plain dict of lists, no model
        (tasks.scale, bad, "the payload"),  # a bare float
    ]
    for fn, payload, path in cases:
        expected = rf"{re.escape(path)} is {re.escape(repr(bad))}; JSON has no NaN or infinity"
        with pytest.raises(PayloadTypeError, match=expected):
            await worker.queue(fn, payload)  # type: ignore[arg-type]
    with pytest.raises(PayloadTypeError, match=r"sleep is"):
        Schedule(tasks.record, tasks.Job(key="x", sleep=bad), worker=worker, every=60)
    assert tasks.Job(key="x", sleep=1e308) and tasks.Readings(values=[-0.0, 5e-324])  # finite: fine


@pytest.mark.timeout(30)
async def test_queue_many_with_one_nan_sends_nothing(url: str, name: str) -> None:
    worker = Worker(name)
    project = Project(name="nobs-test", workers=[worker], packages=["tests"], url=url)
    async with project:
        await worker.queue(tasks.record, tasks.Job(key="first"))  # declares the queue
        payloads = [tasks.Job(key="a"), tasks.Job(key="b", sleep=math.nan), tasks.Job(key="c")]
        with pytest.raises(PayloadTypeError, match=r"sleep is nan"):
            await worker.queue_many(tasks.record, payloads)
        with pytest.raises(PayloadTypeError, match=r"sleep is inf"):
            await worker.queue(tasks.record, tasks.Job(key="d", sleep=math.inf))
        assert await project.session.transport.message_count(name) == 1, "only the first one"
        [first] = await take_messages(project, name)
    assert first.body == b'{"key":"first","fail_times":0,"sleep":0.0}'


@pytest.mark.timeout(30)
async def test_enqueue_refuses_nan_and_infinity_before_connecting(amqp_url: str, name: str) -> None:
    env = {"NOBS_AMQP_URL": amqp_url, "NOBS_TEST_WORKER": name, "PYTHONPATH": str(ROOT)}
    app = ("--app", "tests.apps.cli_app:project")
    for value, shown in (('"NaN"', "nan"), ('"-Infinity"', "-inf"), ('"inf"', "inf")):
        payload = f'{{"key": "k", "sleep": {value}}}'
        code, output = await run_cli(*app, "enqueue", name, "tests.apps.tasks:record", payload, env=env)
        assert code == 2, output
        assert "payload does not fit tests.apps.tasks:record" in output
        assert f"sleep is {shown}; JSON has no NaN or infinity" in output
    project = Project(name="nobs-test", workers=[worker := Worker(name)], packages=["tests"], url=amqp_url)
    async with project:
        await worker.queue(tasks.record, tasks.Job(key="declares"))
        assert await project.session.transport.message_count(name) == 1, "nothing was sent"
