"""What a new user hit with the operator commands (issue 8): status, topology diff/show/delete,
memory://, finding the app from a subdirectory, options after the subcommand, the demo's vhost."""

from __future__ import annotations

import json
import textwrap
import uuid
from pathlib import Path

import pytest

from nobs_amqp.management import MANAGEMENT_ENV, Management
from nobs_amqp.urls import vhost_of, with_vhost

from ..support import Broker, eventually, free_port, http_server, run_cli

CLI_APP = ("--app", "tests.apps.cli_app:project")


async def run_in(
    cwd: Path, *args: str, env: dict[str, str], stdin: bytes = b"", timeout: float = 30
) -> tuple[int, str]:
    """`python -m nobs_amqp ARGS` run from `cwd`; its exit code and output."""
    return await run_cli(*args, env=env, stdin=stdin, timeout=timeout, cwd=cwd)


# -- Bug 2: topology diff compares bindings -------------------------------------------------------


@pytest.mark.timeout(60)
async def test_topology_diff_reports_missing_bindings_and_the_fix(amqp_url: str, name: str, broker: Broker) -> None:
    env = {"NOBS_AMQP_URL": amqp_url, "NOBS_TEST_WORKER": name}
    code, output = await run_cli(*CLI_APP, "topology", "apply", env=env)
    assert code == 0, output
    channel = await broker.channel()
    queue = await channel.declare_queue(name, passive=True)
    dlq = await channel.declare_queue(f"{name}.dlq", passive=True)
    await dlq.unbind(f"{name}.dlx", "")
    deliver_key = ".".join(["*"] * 28) + f".{name}"
    await queue.unbind("nobs-test.delay.deliver", deliver_key)
    await channel.close()

    code, output = await run_cli(*CLI_APP, "topology", "diff", env=env)
    assert code == 1, output
    assert f"missing binding {name}.dlx -> {name}.dlq []\n" in output
    assert f"missing binding nobs-test.delay.deliver -> {name} [{deliver_key}]\n" in output
    assert "the broker has everything" not in output
    assert "declare what is missing with `nobs-amqp topology apply`" in output

    code, output = await run_cli(*CLI_APP, "topology", "apply", env=env)
    assert code == 0, output
    code, output = await run_cli(*CLI_APP, "topology", "diff", env=env)
    assert code == 0, output
    assert "the broker has everything" in output


# -- Bug 3: status never reports another broker's numbers ----------------------------------------


@pytest.mark.timeout(60)
async def test_status_fails_when_the_amqp_broker_does_not_answer(amqp_url: str) -> None:
    # The management API on 15672 answers; nothing listens on the AMQP port.
    url = f"amqp://guest:guest@127.0.0.1:{free_port()}/{vhost_of(amqp_url)}"
    code, output = await run_cli(*CLI_APP, "status", env={"NOBS_AMQP_URL": url})
    assert code == 1, output
    assert "cannot connect to amqp://guest:***@127.0.0.1:" in output
    assert "ready" not in output and "Traceback" not in output


@pytest.mark.timeout(60)
async def test_status_fails_for_a_vhost_that_does_not_exist(amqp_url: str) -> None:
    url = with_vhost(amqp_url, f"nobs-amqp-absent-{uuid.uuid4().hex[:8]}")
    code, output = await run_cli(*CLI_APP, "status", env={"NOBS_AMQP_URL": url})
    assert code == 1, output
    assert "the vhost does not exist" in output
    assert "not declared yet" not in output and "Traceback" not in output


@pytest.mark.timeout(60)
async def test_status_fails_when_the_management_api_lacks_the_vhost(amqp_url: str, name: str) -> None:
    """The AMQP broker answers, the management API is another broker's: no zeros from there."""
    with http_server(404) as (port, _):  # another broker's: it knows no vhost, queue or exchange
        env = {"NOBS_AMQP_URL": amqp_url, "NOBS_TEST_WORKER": name, MANAGEMENT_ENV: f"http://127.0.0.1:{port}"}
        code, output = await run_cli(*CLI_APP, "status", env=env)
        assert code == 1, output
        assert f"the management API at http://127.0.0.1:{port} has no vhost {vhost_of(amqp_url)!r}" in output
        assert "not declared yet" not in output
        code, output = await run_cli(*CLI_APP, "topology", "diff", env=env)
        assert code == 1, output
        assert "has no vhost" in output and "missing queue" not in output


# -- Bug 8: commands that make no sense on memory:// refuse it ----------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "command",
    [
        ["status"],
        ["enqueue", "w", "tests.apps.tasks:record", '{"key": "k"}'],
        ["topology", "diff"],
        ["topology", "apply"],
        ["topology", "export"],
        ["topology", "delete", "--yes"],
        ["dlq", "list", "w"],
        ["dlq", "replay", "w"],
    ],
)
async def test_commands_that_need_rabbitmq_refuse_memory(command: list[str]) -> None:
    code, output = await run_cli(*CLI_APP, *command, env={"NOBS_AMQP_URL": "memory://", "NOBS_TEST_WORKER": "w"})
    assert code == 2, output
    assert f"{' '.join(command[:2]) if command[0] == 'topology' else command[0]} needs RabbitMQ" in output
    assert "memory://, a broker that lives inside one process" in output
    assert "Traceback" not in output


# -- Bug 10: the app of a parent directory's pyproject.toml ---------------------------------------


def make_project_tree(root: Path, module: str, project: str = "tree-app") -> Path:
    """A project folder with its pyproject.toml naming `module:project`, and a subdirectory."""
    (root / "pyproject.toml").write_text(f'[tool.nobs-amqp]\napp = "{module}:project"\n')
    (root / f"{module}.py").write_text(
        textwrap.dedent(f"""
            import os
            from nobs_amqp import Project, Worker

            tree_worker = Worker(os.environ.get("NOBS_TEST_WORKER", "tree_worker"))
            project = Project(name=os.environ.get("NOBS_TEST_PROJECT", {project!r}), workers=[tree_worker])
        """)
    )
    (root / "sub" / "deeper").mkdir(parents=True)
    return root / "sub" / "deeper"


@pytest.mark.timeout(60)
async def test_app_named_in_a_parent_pyproject_is_imported_from_there(tmp_path: Path) -> None:
    module = f"tree_app_{uuid.uuid4().hex[:8]}"
    subdirectory = make_project_tree(tmp_path, module)
    env = {"NOBS_AMQP_URL": f"memory://{uuid.uuid4().hex}", "NOBS_AMQP_APP": ""}
    code, output = await run_in(subdirectory, "topology", "show", env=env)
    assert code == 0, output
    assert "queue    tree_worker " in output
    code, output = await run_in(subdirectory, "consume", "tree_worker", "--burst", env=env)
    assert code == 0, output
    assert "stopped after 0 task(s)" in output


# -- Friction: options after the subcommand; topology show readable and --json -------------------


@pytest.mark.timeout(60)
async def test_app_and_log_level_also_after_the_subcommand() -> None:
    env = {"NOBS_AMQP_URL": "memory://", "NOBS_TEST_WORKER": "w"}
    code, output = await run_cli("topology", "show", "--log-level", "debug", *CLI_APP, env=env)
    assert code == 0, output
    assert "queue    w " in output
    assert "DEBUG" in output
    later = "--app=tests.apps.cli_app:project"
    code, output = await run_cli("--app", "nothing.here:project", "topology", "show", later, env=env)
    assert code == 0, output  # the subcommand's value wins
    code, output = await run_cli("status", "--app", env=env)
    assert code == 2
    assert "option '--app' requires an argument" in output


@pytest.mark.timeout(60)
async def test_topology_show_is_a_table_and_json() -> None:
    env = {"NOBS_AMQP_URL": "memory://", "NOBS_TEST_WORKER": "w"}
    code, output = await run_cli(*CLI_APP, "topology", "show", env=env)
    assert code == 0, output
    assert "{" not in output and "'" not in output  # no Python reprs
    lines = output.splitlines()
    [queue] = [line for line in lines if line.startswith("queue    w ")]
    assert "x-queue-type=quorum" in queue and "x-dead-letter-exchange=w.dlx" in queue
    assert "exchange nobs-test.delay.deliver" in output
    assert "alternate-exchange=nobs-test.delay.unroutable" in output
    assert any(line.startswith("binding  w.dlx -> w.dlq") and line.endswith("[]") for line in lines), output
    assert "binding  nobs-test.delay.00 -> exchange nobs-test.delay.deliver" in output

    code, output = await run_cli(*CLI_APP, "topology", "show", "--json", env=env)
    assert code == 0, output
    shown = json.loads(output)
    [queue_json] = [q for q in shown["queues"] if q["name"] == "w"]
    assert queue_json["arguments"]["x-dead-letter-exchange"] == "w.dlx"
    assert {"source": "w.dlx", "destination": "w.dlq", "destination_type": "queue", "routing_key": ""} in shown[
        "bindings"
    ]
    assert len(shown["queues"]) == 31 and len(shown["exchanges"]) == 31


# -- Friction: topology delete ---------------------------------------------------------------------


@pytest.mark.timeout(90)
async def test_topology_delete_asks_then_removes_the_projects_objects(
    amqp_url: str, name: str, broker: Broker, tmp_path: Path
) -> None:
    module = f"delete_app_{uuid.uuid4().hex[:8]}"
    make_project_tree(tmp_path, module)
    project = f"del-{uuid.uuid4().hex[:8]}"
    env = {"NOBS_AMQP_URL": amqp_url, "NOBS_TEST_WORKER": name, "NOBS_TEST_PROJECT": project, "NOBS_AMQP_APP": ""}
    code, output = await run_in(tmp_path, "topology", "apply", env=env)
    assert code == 0, output
    await broker.publish_raw(name, b"{}")
    await broker.publish_raw(name, b"{}")
    await broker.publish_raw(f"{name}.dlq", b"{}")
    channel = await broker.channel()
    bystander = await channel.declare_queue(f"{name}-bystander", durable=True)

    async def messages(queue: str) -> int | None:
        found = await Management(amqp_url).queue(vhost_of(amqp_url), queue)
        return None if found is None else int(found.get("messages", -1))

    async def counted() -> bool:  # the management API's figures lag a few seconds
        return await messages(name) == 2 and await messages(f"{name}.dlq") == 1

    await eventually(counted, timeout=20, interval=0.5)

    code, output = await run_in(tmp_path, "topology", "delete", env=env, stdin=b"n\n")
    assert code == 1, output  # declined: nothing deleted
    assert f"in vhost {vhost_of(amqp_url)!r} this deletes, with every message they hold:" in output
    assert f"  queue    {name} (2 message(s))" in output
    assert f"  queue    {project}.delay.27 (0 message(s))" in output
    assert f"  exchange {name}.dlx" in output
    assert "delete 31 queue(s) holding 3 message(s) and 31 exchange(s)?" in output
    assert await broker.count(name) == 2

    code, output = await run_in(tmp_path, "topology", "delete", "--yes", env=env)
    assert code == 0, output
    assert f"deleted 31 queue(s) (3 message(s)) and 31 exchange(s) from vhost {vhost_of(amqp_url)!r}" in output
    management = Management(amqp_url)
    vhost = vhost_of(amqp_url)
    for queue in (name, f"{name}.dlq", f"{project}.delay.00", f"{project}.delay.unroutable"):
        assert await management.queue(vhost, queue) is None, queue
    for exchange in (f"{name}.dlx", f"{project}.delay.deliver", f"{project}.delay.27"):
        assert await management.get("exchange", vhost, exchange) is None, exchange
    assert await management.queue(vhost, f"{name}-bystander") is not None  # not the project's: kept

    code, output = await run_in(tmp_path, "topology", "delete", env=env)
    assert code == 0, output
    assert "nothing to delete" in output
    await bystander.delete()
    await channel.close()


# -- Friction: the demo runs in a vhost of its own -------------------------------------------------
