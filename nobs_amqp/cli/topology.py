"""`nobs-amqp topology`: what the project declares, and what the broker has of it."""

from __future__ import annotations

import json
import sys

import click

from ..ops.status import delete, deletion, topology_diff, topology_json, topology_table
from ..project import Project
from ..topology import Topology, definitions
from .common import with_project


@click.group()
def topology() -> None:
    """The queues, exchanges and bindings the project declares."""


@topology.command("show")
@click.option("--json", "as_json", is_flag=True, help="The same as JSON.")
@click.pass_obj
def topology_show(app: str | None, as_json: bool) -> None:
    """List every exchange, queue (arguments as key=value) and binding (source -> destination [key])."""

    async def show(project: Project) -> Topology:
        return project.topology()

    wanted = with_project(app, show)
    if as_json:
        click.echo(json.dumps(topology_json(wanted), indent=2))
        return
    for line in topology_table(wanted):
        click.echo(line)


@topology.command("apply")
@click.pass_obj
def topology_apply(app: str | None) -> None:
    """Declare everything now (idempotent; a mismatch is reported, never changed)."""

    async def apply(project: Project) -> int:
        for worker in project.workers.values():
            await project.session.declare(worker, delayed=True)
        return len(project.workers)

    count = with_project(app, apply, refuse="topology apply")
    click.echo(f"declared the topology of {count} worker(s) and the delay ladder")


@topology.command("diff")
@click.pass_obj
def topology_diff_command(app: str | None) -> None:
    """What the broker lacks (queues, exchanges, bindings) or has with other arguments (exit 1 if anything)."""
    lines = with_project(app, topology_diff, refuse="topology diff")
    for line in lines:
        click.echo(line)
    if any(line.startswith("missing ") for line in lines):
        click.echo("declare what is missing with `nobs-amqp topology apply` (a worker also does when it starts)")
    if any(not line.startswith("missing ") for line in lines):
        click.echo(
            "an object with other arguments is never changed for you: `nobs-amqp topology apply` "
            "names it and says how to migrate it"
        )
    if lines:
        sys.exit(1)
    click.echo("the broker has everything, with the same arguments")


@topology.command("export")
@click.pass_obj
def topology_export(app: str | None) -> None:
    """Print RabbitMQ definitions JSON (import it in the management UI)."""

    async def export(project: Project) -> dict[str, list[dict[str, object]]]:
        return definitions(project.topology(), project.session.transport.vhost)

    click.echo(json.dumps(with_project(app, export, refuse="topology export"), indent=2))


@topology.command("delete")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_obj
def topology_delete(app: str | None, yes: bool) -> None:
    """Delete the project's queues (their messages too) and exchanges: every worker's and the delay ladder."""
    found = with_project(app, deletion, refuse="topology delete")
    if not found.queues and not found.exchanges:
        click.echo(f"nothing to delete: no queue or exchange of the project in vhost {found.vhost!r}")
        return
    if not yes:
        click.echo(f"in vhost {found.vhost!r} this deletes, with every message they hold:")
        for queue in found.queues:
            busy = f", {queue.consumers} consumer(s)" if queue.consumers else ""
            click.echo(f"  queue    {queue.name} ({queue.messages} message(s){busy})")
        for exchange in found.exchanges:
            click.echo(f"  exchange {exchange}")
        if found.consumers:
            click.echo(f"{found.consumers} consumer(s) are attached: stop the workers first, or they declare it again")
        click.confirm(
            f"delete {len(found.queues)} queue(s) holding {found.messages} message(s) "
            f"and {len(found.exchanges)} exchange(s)?",
            abort=True,
        )
    with_project(app, lambda project: delete(project, found))
    click.echo(
        f"deleted {len(found.queues)} queue(s) ({found.messages} message(s)) "
        f"and {len(found.exchanges)} exchange(s) from vhost {found.vhost!r}"
    )
