"""`nobs-amqp dlq`: read, replay and purge a worker's dead-letter queue."""

from __future__ import annotations

import re
import sys
from collections.abc import Awaitable, Callable

import click

from .. import message as wire
from ..message import Message, printable
from ..ops import dlq as dead
from ..session import Session
from ..worker import Worker
from .common import T, app_reference, load_project, refuse_memory, run_open, worker_of


@click.group()
def dlq() -> None:
    """Read, replay and purge a worker's dead-letter queue (WORKER.dlq)."""


def _dlq_run(app: str | None, worker: str, action: Callable[[Session, Worker], Awaitable[T]]) -> T:
    project = load_project(app_reference(app))
    refuse_memory(project, "dlq")
    target = worker_of(project, worker)
    return run_open(project, lambda p: action(p.session, target))


#: Characters of a dead letter's error `dlq list` shows (its first line); `dlq show` gives it all.
ERROR_WIDTH = 100


def _summary(message: Message) -> str:
    """One line per dead letter. A message the broker dead-lettered itself (it carries `x-death`;
    the worker's own dead letters never do) gets the broker's reason: its `x-nobs-*` values are
    whatever its publisher wrote. Of the error, the first line (a pydantic validation error has
    one per field), cut at ERROR_WIDTH."""
    headers = message.headers
    broker_reason = dead.broker_reason(headers)
    moment = dead.dead_at(message)
    when = wire.format_time(moment) if moment is not None else "?"
    reason, error = (
        (f"{broker_reason} (by the broker)", "")
        if broker_reason is not None
        else (str(headers.get(wire.REASON) or "?"), _first_line(headers.get(wire.ERROR_MESSAGE, "")))
    )
    line = f"{message.message_id}  {when}  {reason:<16}  attempt {message.attempt}  {message.task}  {error}"
    return printable(line, 2000)


def _first_line(value: object) -> str:
    lines = str(value).splitlines() or [""]
    first = lines[0].rstrip()
    if len(first) > ERROR_WIDTH or len(lines) > 1:
        return f"{first[:ERROR_WIDTH].rstrip()} ... (see dlq show)"
    return first


_TERMINAL_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # all but tab and newline
#: The quorum queue's delivery count: on a DLQ, how often the message was read and given back.
PEEK_COUNT = "x-delivery-count"


@dlq.command("list")
@click.argument("worker")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True)
@click.pass_obj
def dlq_list(app: str | None, worker: str, limit: int) -> None:
    """List WORKER's dead letters, oldest first: id, dead-lettered at, reason, attempt, task, error.

    Oldest by when they were dead-lettered, not by their place in the queue (reading a quorum
    queue moves what was read to its back); --limit N shows the N oldest, so it reads them all."""
    messages = _dlq_run(app, worker, lambda p, w: dead.peek(p, w, limit))
    for message in messages:
        click.echo(_summary(message))
    click.echo(f"{len(messages)} dead letter(s) shown, oldest first", err=True)


@dlq.command("show")
@click.argument("worker")
@click.argument("message_id")
@click.pass_obj
def dlq_show(app: str | None, worker: str, message_id: str) -> None:
    """Everything about one dead letter: properties, headers (traceback included) and body.

    Reads WORKER.dlq from its head until it finds the message, however long the queue."""
    message = _dlq_run(app, worker, lambda p, w: dead.find(p, w, message_id))
    if message is None:
        raise click.ClickException(
            f"no dead letter {printable(message_id)} in {worker}.dlq (see `nobs-amqp dlq list {worker}`)"
        )
    moment = dead.dead_at(message)
    lines = [f"message id: {message.message_id}", f"task: {message.task}", f"app: {message.app_id}"]
    lines.append(f"dead-lettered at: {wire.format_time(moment) if moment is not None else '?'}")
    # On a quorum DLQ the broker counts every read that gave the message back (dlq list, dlq
    # show, the management UI's "Get messages") in x-delivery-count: peeks, not runs of the task.
    peeks = message.headers.get(PEEK_COUNT)
    if isinstance(peeks, int) and not isinstance(peeks, bool) and peeks > 0:
        lines.append(f"peeked: {peeks} time(s) before (reads of {worker}.dlq; the task did not run)")
    lines += [f"{key}: {value}" for key, value in sorted(message.headers.items()) if key != PEEK_COUNT]
    lines.append(f"body: {message.body.decode(errors='replace')}")
    for line in lines:  # what a publisher wrote must not drive the operator's terminal
        click.echo(_TERMINAL_CONTROLS.sub(lambda m: m.group().encode("unicode_escape").decode(), line))


@dlq.command("replay")
@click.argument("worker")
@click.option("--limit", type=click.IntRange(min=1), help="At most this many [all].")
@click.option("--task", "task", metavar="MODULE:FUNCTION", help="Only dead letters of this task.")
@click.option("--reason", help="Only those dead-lettered for this reason (e.g. max_attempts).")
@click.option("--id", "ids", metavar="MESSAGE_ID", multiple=True, help="Only this message (repeatable).")
@click.option(
    "--sign-unverified",
    is_flag=True,
    help="With a signing key: also replay, and so sign, dead letters whose signature does not verify "
    "(bad_signature, unsigned, another key). Only for messages you have read and trust.",
)
@click.pass_obj
def dlq_replay(
    app: str | None,
    worker: str,
    limit: int | None,
    task: str | None,
    reason: str | None,
    ids: tuple[str, ...],
    sign_unverified: bool,
) -> None:
    """Move WORKER's dead letters back to its queue, attempt count reset, each acked once its copy is confirmed.

    Replays what is in the DLQ when the command starts (with --limit N, the N oldest by when
    they were dead-lettered; --task, --reason and --id pick which), each message once; what
    fails again or arrives meanwhile stays there. With a signing key, the copies are signed, so
    only dead letters whose signature verifies are replayed, unless --sign-unverified."""
    where = dead.matching(task=task, reason=reason, ids=ids) if task or reason or ids else None
    waiting = _dlq_run(app, worker, dead.count)
    total = min(waiting, limit) if limit is not None else waiting
    with click.progressbar(length=total, label=f"replaying {worker}.dlq", show_pos=True, file=sys.stderr) as bar:

        def plan(count: int) -> None:
            bar.length = count  # what the snapshot holds: fewer than `total` when filtered

        def refuse(count: int) -> None:
            refused.append(count)

        refused: list[int] = []
        moved = (
            _dlq_run(
                app,
                worker,
                lambda p, w: dead.replay(
                    p,
                    w,
                    total,
                    bar.update,
                    where=where,
                    planned=plan,
                    sign_unverified=sign_unverified,
                    unverified=refuse,
                ),
            )
            if total
            else 0
        )
    if sum(refused):
        click.echo(
            f"left {sum(refused)} dead letter(s) in {worker}.dlq whose signature does not verify (dead-lettered as "
            f"bad_signature, unsigned, or signed with another key): a replay would sign them. Read them with "
            f"`nobs-amqp dlq list {worker}`; replay those you trust with --id ID --sign-unverified",
            err=True,
        )
    planned = bar.length if bar.length is not None else total
    chosen = " matching" if where is not None else ""
    click.echo(f"replayed {moved}{chosen} message(s) to {worker}")
    if moved < planned:
        click.echo(
            f"{planned - moved} of the {planned}{chosen} dead letter(s) there at the start were not replayed: "
            f"another consumer of {worker}.dlq holds them; run the command again once it is done",
            err=True,
        )


@dlq.command("purge")
@click.argument("worker")
@click.option("--yes", is_flag=True, help="Do not ask first.")
@click.pass_obj
def dlq_purge(app: str | None, worker: str, yes: bool) -> None:
    """Delete every dead letter of WORKER (asks first, saying how many)."""
    waiting = _dlq_run(app, worker, dead.count)
    if waiting == 0:
        click.echo(f"nothing to purge: {worker}.dlq is empty")
        return
    if not yes:
        click.confirm(f"Delete all {waiting} dead letters of {worker} ({worker}.dlq) for good?", abort=True)
    count = _dlq_run(app, worker, dead.purge)
    click.echo(f"purged {count} message(s) from {worker}.dlq")
