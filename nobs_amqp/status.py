"""What an operator asks first: per worker, how deep, how busy, who consumes, what failed."""

from __future__ import annotations

from dataclasses import dataclass

from . import delay as ladder
from .amqp import vhost_of
from .management import Management
from .project import Project
from .topology import dead_letter_queue, difference


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    name: str
    ready: int
    in_flight: int
    consumers: int
    dead: int
    exists: bool


@dataclass(frozen=True, slots=True)
class ProjectStatus:
    workers: list[WorkerStatus]
    delayed: int  # waiting in the project's delay ladder (retries and delayed tasks of all its workers)


async def project_status(project: Project) -> ProjectStatus:
    """Read through the management HTTP API (its figures are up to ~5 s old)."""
    url = project.urls[0]
    management = Management(url)
    vhost = vhost_of(url)

    async def queue(name: str) -> dict[str, object]:
        return await management.queue(vhost, name) or {}

    def number(info: dict[str, object], key: str) -> int:
        value = info.get(key, 0)
        return value if isinstance(value, int) else 0

    workers = []
    for name in project.workers:
        main, dead = await queue(name), await queue(dead_letter_queue(name))
        workers.append(
            WorkerStatus(
                name,
                number(main, "messages_ready"),
                number(main, "messages_unacknowledged"),
                number(main, "consumers"),
                number(dead, "messages"),
                bool(main),
            )
        )
    delayed = 0
    for level in range(ladder.LEVELS):
        delayed += number(await queue(ladder.level_name(project.name, level)), "messages")
    return ProjectStatus(workers, delayed)


async def topology_diff(project: Project) -> list[str]:
    """How the broker differs from what the project declares: one line per missing object or
    per object whose arguments differ (bindings are not compared). Needs an open project."""
    url = project.urls[0]
    management = Management(url)
    vhost = vhost_of(url)
    lines = []
    wanted = project.topology()
    for kind, specs in (("exchange", wanted.exchanges), ("queue", wanted.queues)):
        for spec in specs:
            found = await management.get(kind, vhost, spec.name)
            if found is None:
                lines.append(f"missing {kind} {spec.name}")
            elif diff := difference(spec.arguments, found.get("arguments") or {}):
                lines.append(f"{kind} {spec.name} differs: {diff}")
    return lines
