"""A three-node RabbitMQ cluster that a test owns, built of tests/nodes.py's `Node`s.

    async with Cluster() as cluster:            # three nodes, started at once, then clustered
        project = Project(url=cluster.urls_for(vhost, first=1), ...)
        leader = await cluster.leader(vhost, "my-queue")
        await cluster.kill9(cluster.index_of(leader))
        await cluster.start(cluster.index_of(leader))   # same data: it rejoins the cluster

Each node is a `Node` of the installed RabbitMQ 3.10 on its own free ports and data dir, with
the management plugin (any node's API describes the whole cluster: a quorum queue's
`members`, `leader` and `online`). Nodes 2 and 3 join node 1 with `rabbitmqctl stop_app`,
`join_cluster`, `start_app`. Everything is killed by the nodes' markers and pids on the way
out; the shared broker on 5672 is never touched (the nodes share only its Erlang cookie and epmd).

Under `scripts/rabbitmq4.sh run` (NOBS_AMQP_NODE_GENERATION=4) the nodes are RabbitMQ 4.x nodes
chrooted in the script's root (tests/nodes.py). A lone 4.x node has an epmd of its own; the
three of a cluster share one, on a port the cluster picks, so that they find each other, and
a node killed and started again registers with it again. Stopping or killing a node spares that
epmd; `close()` kills it with the nodes. Their ERL_ARGS and advanced.config reach the chrooted
server through node.env (`ERL_ARGS`, `ADVANCED_CONFIG`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .nodes import Node, generation, node_or_skip
from .support import free_port

SIZE = 3
#: The management API's statistics (a queue's `leader`, `online`) are refreshed this often (ms).
#: RabbitMQ's default of 5 s would leave a test reading a leader that was just killed.
STATS_INTERVAL_MS = 1000
#: Erlang schedulers that spin while idle burn the CPU three nodes share on a small machine:
#: these flags let idle schedulers sleep (RabbitMQ's advice for containers with few cores).
ERL_ARGS = "+sbwt none +sbwtdcpu none +sbwtdio none"
#: A quorum queue's at-least-once dead-lettering (the delay ladder's every hop, retries, W -> W.dlq)
#: publishes each dead letter again only if its confirm has not come within RabbitMQ's
#: `dead_letter_worker_publisher_confirm_timeout`: 3 min by default. A confirm lost when the target
#: queue's leader went away holds those messages (as `messages_dlx` of the source queue) that
#: long; nothing is lost, but a test cannot wait for it. The cluster's nodes use this instead
#: (None: RabbitMQ's default). docs/RELIABILITY.md says what it means for users.
DLX_CONFIRM_TIMEOUT_MS = 5000
_AUTH = "Basic " + base64.b64encode(b"guest:guest").decode()


def cluster_or_skip() -> None:
    """Skip where no cluster can be made here: where no node can start (fails instead under CI)."""
    node_or_skip()


class ClusterNode(Node):
    """A `Node` tuned to share a small machine with two others and to report queue leaders promptly."""

    def __init__(self, *, dlx_confirm_timeout_ms: int | None, **options: Any) -> None:
        self.dlx_confirm_timeout_ms = dlx_confirm_timeout_ms
        super().__init__(**options)

    @property
    def advanced_config(self) -> Path:
        return self.dir / "advanced.config"

    def _settings(self) -> dict[str, object]:
        # A 4.x node's server runs with `env -i` in the root: these reach it through node.env only.
        return {**super()._settings(), "ERL_ARGS": ERL_ARGS, "ADVANCED_CONFIG": self._inside(self.advanced_config)}

    def _configure(self) -> None:
        super()._configure()
        with (self.dir / "rabbitmq.conf").open("a") as conf:
            conf.write(f"collect_statistics_interval = {STATS_INTERVAL_MS}\n")
        settings = []
        if self.dlx_confirm_timeout_ms is not None:
            settings.append(f"{{dead_letter_worker_publisher_confirm_timeout, {self.dlx_confirm_timeout_ms}}}")
        self.advanced_config.write_text(f"[{{rabbit, [{', '.join(settings)}]}}].\n")

    def _env(self) -> dict[str, str]:
        if self.generation == 4:
            return super()._env()  # rabbitmq4.sh sets them from node.env (`_settings`)
        return {
            **super()._env(),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": ERL_ARGS,
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.advanced_config),
        }


class Cluster:
    """Three nodes clustered with node 1; stop, kill -9 and start any of them by index."""

    def __init__(
        self,
        size: int = SIZE,
        *,
        start_timeout: float = 120.0,
        dlx_confirm_timeout_ms: int | None = DLX_CONFIRM_TIMEOUT_MS,
    ) -> None:
        # 4.x: one epmd for the cluster's nodes (each lone 4.x node has its own); 3.10: the host's.
        self.epmd_port = free_port() if generation() == 4 else None
        self.nodes = [
            ClusterNode(
                management=True,
                start_timeout=start_timeout,
                dlx_confirm_timeout_ms=dlx_confirm_timeout_ms,
                epmd_port=self.epmd_port,
            )
            for _ in range(size)
        ]
        self.start_timeout = start_timeout

    # -- addresses ------------------------------------------------------------------------

    @property
    def urls(self) -> list[str]:
        """The AMQP URL of each node (vhost `/`), in node order."""
        return [node.url for node in self.nodes]

    def urls_for(self, vhost: str = "/", *, first: int = 0) -> list[str]:
        """Every node's URL for `vhost`, rotated so that node `first` comes first (a client's "own" node)."""
        path = "" if vhost == "/" else quote(vhost, safe="")
        urls = [f"{url}{path}" for url in self.urls]
        return urls[first:] + urls[:first]

    def names(self) -> list[str]:
        return [node.name for node in self.nodes]

    def index_of(self, name: str) -> int:
        """The index of the node called `name` (as the management API and rabbitmqctl spell it)."""
        return self.names().index(name)

    # -- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> Cluster:
        try:
            # Concurrently: each start is mostly the Erlang VM booting, and the budget is tight.
            await asyncio.gather(*(node.start() for node in self.nodes))
            await self._join()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Kill every node (by its marker and pid) and remove its data."""
        await asyncio.gather(*(node.close() for node in self.nodes), return_exceptions=True)

    async def _join(self) -> None:
        seed = self.nodes[0]
        joiners = self.nodes[1:]
        await asyncio.gather(*(node.ctl("stop_app") for node in joiners))
        for node in joiners:  # one at a time: both change the seed's schema
            await node.ctl("join_cluster", seed.name)
        await asyncio.gather(*(node.ctl("start_app") for node in joiners))
        await self._wait_formed(time.monotonic() + self.start_timeout)

    async def _wait_formed(self, deadline: float) -> None:
        """Until `rabbitmqctl cluster_status` on node 1 shows every node running."""
        want = set(self.names())
        running: set[str] = set()
        while time.monotonic() < deadline:
            running = set(_json(await self.nodes[0].ctl("cluster_status", "--formatter", "json"))["running_nodes"])
            if running >= want:
                return
            await asyncio.sleep(0.5)
        raise AssertionError(f"the cluster did not form: running {sorted(running)}, want {sorted(want)}")

    async def stop(self, index: int) -> None:
        """Stop node `index` gracefully (`rabbitmqctl stop`)."""
        await self.nodes[index].stop()

    async def kill9(self, index: int) -> int:
        """SIGKILL node `index`'s Erlang VM; the pid killed."""
        return await self.nodes[index].kill9()

    async def start(self, index: int) -> None:
        """Start node `index` again on its data; return once every node runs in the cluster again."""
        await self.nodes[index].start()
        await self.wait_running(timeout=self.start_timeout)

    async def wait_running(self, timeout: float = 60.0) -> None:
        """Until the management API of a running node shows every node running."""
        want = set(self.names())

        async def all_running() -> bool:
            nodes = await self.api("GET", "/api/nodes?columns=name,running")
            return {n["name"] for n in nodes if n.get("running")} >= want

        await _poll(all_running, timeout, "every node running in the cluster")

    # -- the management API (of whichever node answers) ----------------------------------

    async def api(self, method: str, path: str, body: object = None) -> Any:
        """Call the management API of the first running node that answers."""
        failures = []
        for node in self.nodes:
            if not node.running:
                continue
            try:
                return await asyncio.to_thread(_request, f"{node.management_url}{path}", method, body)
            except (urllib.error.URLError, OSError) as exc:
                if isinstance(exc, urllib.error.HTTPError) and exc.code != 503:
                    raise  # the API's answer, not a node going away
                failures.append(f"{node.name}: {exc}")
        raise ConnectionError(f"no node's management API answered {method} {path}: {failures}")

    async def create_vhost(self, vhost: str) -> None:
        """Create `vhost` with every permission for guest."""
        await self.api("PUT", f"/api/vhosts/{quote(vhost, safe='')}", {})
        permissions = {"configure": ".*", "write": ".*", "read": ".*"}
        await self.api("PUT", f"/api/permissions/{quote(vhost, safe='')}/guest", permissions)

    async def delete_vhost(self, vhost: str) -> None:
        with contextlib.suppress(urllib.error.HTTPError):  # 404: gone already
            await self.api("DELETE", f"/api/vhosts/{quote(vhost, safe='')}")

    async def queue(self, vhost: str, name: str) -> dict[str, Any]:
        """The management API's description of a queue (a quorum queue's `members`, `leader`, `online`)."""
        result = await self.api("GET", f"/api/queues/{quote(vhost, safe='')}/{quote(name, safe='')}")
        assert isinstance(result, dict), result
        return result

    async def leader(self, vhost: str, name: str) -> str:
        """The node name of the quorum queue's leader, once the API names one that is running."""

        async def running_leader() -> str | None:
            leader = (await self.queue(vhost, name)).get("leader")
            running = {n.name for n in self.nodes if n.running}
            return leader if isinstance(leader, str) and leader in running else None

        leader = await _poll(running_leader, 30, f"a running leader of queue {name}")
        assert isinstance(leader, str)
        return leader

    async def wait_members_online(self, vhost: str, name: str, timeout: float = 30.0) -> None:
        """Until every member of the quorum queue is online (a restarted one has rejoined)."""

        async def all_online() -> bool:
            info = await self.queue(vhost, name)
            return bool(info.get("members")) and set(info.get("online", [])) >= set(info["members"])

        await _poll(all_online, timeout, f"every member of queue {name} online")


async def _poll(check: Any, timeout: float, what: str, interval: float = 0.25) -> Any:
    """Poll the coroutine function `check` until it returns something truthy; fail after `timeout`.
    A node that does not answer yet (it is starting or just died) counts as not yet."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            result = await check()
        except (ConnectionError, urllib.error.URLError, OSError) as exc:
            last, result = exc, None
        if result:
            return result
        await asyncio.sleep(interval)
    raise AssertionError(f"no {what} within {timeout} s (last error: {last})")


def _request(url: str, method: str, body: object) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Authorization", _AUTH)
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=5) as response:
        text = response.read()
    return json.loads(text) if text else None


def _json(text: str) -> dict[str, Any]:
    """The JSON object in rabbitmqctl's output (which may start with a notice line)."""
    result = json.loads(text[text.index("{") :])
    assert isinstance(result, dict), text
    return result
