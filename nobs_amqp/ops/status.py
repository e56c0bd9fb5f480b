"""What an operator asks first: per worker, how deep, how busy, who consumes, what failed."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from .. import ladder
from ..errors import ConfigurationError
from ..management import MANAGEMENT_ENV, Management
from ..project import Project
from ..topology import Binding, Topology, dead_letter_queue, difference
from ..urls import vhost_of


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    name: str
    ready: int
    in_flight: int
    consumers: int
    dead: int
    exists: bool
    #: A quorum queue's replicas: the nodes it lives on, how many of them answer, and its leader.
    members: int = 0
    online: int = 0
    leader: str | None = None


@dataclass(frozen=True, slots=True)
class ProjectStatus:
    workers: list[WorkerStatus]
    delayed: int  # waiting in the project's delay ladder (retries and delayed tasks of all its workers)
    #: `host:port` of the node this status was read through (of a cluster: the one that answered).
    node: str = ""

    def as_dict(self, project: str) -> dict[str, object]:
        """For `status --json`: plain values only."""
        return {
            "project": project,
            "workers": [dataclasses.asdict(worker) for worker in self.workers],
            "delayed": self.delayed,
            "node": self.node,
        }


async def management_of(project: Project) -> tuple[Management, str]:
    """The management API of the broker the open project reached (of a cluster's URLs, the node
    that answered) and its vhost, checked to exist there (a management API of another broker, or
    a vhost nobody created, would read as empty)."""
    url = project.session.transport.url
    management = Management(url)
    vhost = vhost_of(url)
    if await management.vhost(vhost) is None:
        raise ConfigurationError(
            f"the management API at {management.base} has no vhost {vhost!r}: check the vhost in "
            f"NOBS_AMQP_URL (create it with `rabbitmqctl add_vhost {vhost}`), and that {MANAGEMENT_ENV} "
            f"points at the same broker as NOBS_AMQP_URL"
        )
    return management, vhost


async def project_status(project: Project) -> ProjectStatus:
    """Read through the management HTTP API (its figures are up to ~5 s old). Call it with the
    project open: that checks the AMQP side answers, not only the management API."""
    management, vhost = await management_of(project)

    async def queue(name: str) -> dict[str, object]:
        return await management.queue(vhost, name) or {}

    workers = []
    for name in project.workers:
        main, dead = await queue(name), await queue(dead_letter_queue(name))
        workers.append(
            WorkerStatus(
                name,
                _number(main, "messages_ready"),
                _number(main, "messages_unacknowledged"),
                _number(main, "consumers"),
                _number(dead, "messages"),
                bool(main),
                *_replicas(main),
            )
        )
    delayed = 0
    for level in range(ladder.LEVELS):
        delayed += _number(await queue(ladder.level_name(project.name, level)), "messages")
    return ProjectStatus(workers, delayed, project.session.node)


def _replicas(queue: Mapping[str, object]) -> tuple[int, int, str | None]:
    """Members, members online and leader of a quorum queue (0, 0, None for a classic one)."""
    members, online, leader = queue.get("members"), queue.get("online"), queue.get("leader")
    if not isinstance(members, list):
        return 0, 0, None
    return len(members), len(online) if isinstance(online, list) else 0, leader if isinstance(leader, str) else None


def _number(info: Mapping[str, object], key: str) -> int:
    value = info.get(key, 0)
    return value if isinstance(value, int) else 0


async def topology_diff(project: Project) -> list[str]:
    """How the broker differs from what the project declares: one line per missing exchange,
    queue or binding (one of a missing object is not repeated), or per object whose arguments
    differ. Needs an open project."""
    management, vhost = await management_of(project)
    lines = []
    missing = set()
    wanted = project.topology()
    for kind, specs in (("exchange", wanted.exchanges), ("queue", wanted.queues)):
        for spec in specs:
            found = await management.get(kind, vhost, spec.name)
            if found is None:
                lines.append(f"missing {kind} {spec.name}")
                missing.add((kind, spec.name))
            elif diff := difference(spec.arguments, found.get("arguments") or {}):
                lines.append(f"{kind} {spec.name} differs: {diff}")
    for binding in wanted.bindings:
        ends = {("exchange", binding.source), ("exchange" if binding.to_exchange else "queue", binding.destination)}
        if ends & missing:
            continue  # declaring the missing object declares its bindings
        keys = await management.routing_keys(
            vhost, binding.source, binding.destination, to_exchange=binding.to_exchange
        )
        if binding.routing_key not in keys:
            lines.append(f"missing binding {describe(binding)}")
    return lines


def describe(binding: Binding) -> str:
    """`source -> destination [key]`, saying when the destination is an exchange."""
    to = "exchange " if binding.to_exchange else ""
    return f"{binding.source} -> {to}{binding.destination} [{binding.routing_key}]"


def topology_table(topology: Topology) -> list[str]:
    """One line per object: kind, name, then the exchange type and arguments as key=value."""
    rows = [("exchange", e.name, " ".join([e.type, *_pairs(e.arguments)])) for e in topology.exchanges]
    rows += [("queue", q.name, " ".join(_pairs(q.arguments))) for q in topology.queues]
    rows += [("binding", describe(b).rpartition(" [")[0], f"[{b.routing_key}]") for b in topology.bindings]
    width = max((len(name) for kind, name, _ in rows if kind != "binding"), default=0)
    return [f"{kind:<8} {name:<{width}} {details}".rstrip() for kind, name, details in rows]


def _pairs(arguments: Mapping[str, object]) -> list[str]:
    return [f"{key}={value}" for key, value in arguments.items()]


def topology_json(topology: Topology) -> dict[str, list[dict[str, object]]]:
    """The same as `topology_table`, as data."""
    return {
        "exchanges": [{"name": e.name, "type": e.type, "arguments": dict(e.arguments)} for e in topology.exchanges],
        "queues": [{"name": q.name, "arguments": dict(q.arguments)} for q in topology.queues],
        "bindings": [
            {
                "source": b.source,
                "destination": b.destination,
                "destination_type": "exchange" if b.to_exchange else "queue",
                "routing_key": b.routing_key,
            }
            for b in topology.bindings
        ],
    }


@dataclass(frozen=True, slots=True)
class FoundQueue:
    name: str
    messages: int
    consumers: int


@dataclass(frozen=True, slots=True)
class Deletion:
    """The project's objects that exist on the broker, what `topology delete` removes."""

    vhost: str
    queues: list[FoundQueue]
    exchanges: list[str]

    @property
    def messages(self) -> int:
        return sum(q.messages for q in self.queues)

    @property
    def consumers(self) -> int:
        return sum(q.consumers for q in self.queues)


async def deletion(project: Project) -> Deletion:
    """Which of the project's queues (with their messages) and exchanges exist. Needs an open project."""
    management, vhost = await management_of(project)
    wanted = project.topology()
    queues = []
    for spec in wanted.queues:
        if (info := await management.queue(vhost, spec.name)) is not None:
            queues.append(FoundQueue(spec.name, _number(info, "messages"), _number(info, "consumers")))
    exchanges = [e.name for e in wanted.exchanges if await management.get("exchange", vhost, e.name) is not None]
    return Deletion(vhost, queues, exchanges)


async def delete(project: Project, found: Deletion) -> None:
    """Delete the queues (messages and all), then the exchanges, of `found`."""
    management, _ = await management_of(project)
    for queue in found.queues:
        await management.delete("queue", found.vhost, queue.name)
    for exchange in found.exchanges:
        await management.delete("exchange", found.vhost, exchange)


def task_options(project: Project) -> dict[str, str]:
    """The tasks that set options of their own (`@task(...)`) over their worker's, described
    (imports the project's task modules, as a worker does at start)."""
    specs = project.tasks().references
    return {reference: specs[reference].options.describe() for reference in sorted(specs) if specs[reference].options}
