"""Throwaway RabbitMQ nodes that a test owns: started, killed and restarted at will.

A `Node` runs the installed RabbitMQ as a second node beside the shared broker, with its
own name, free ports, data and logs in a temp dir; it shares only the Erlang cookie and
epmd, so `rabbitmqctl -n <node.name>` reaches it. The shared broker is never touched.

    async with Node(management=True) as node:
        project = Project(url=node.url, ...)
        await node.kill9()          # SIGKILL this node's beam process only
        await node.start()          # same data dir: durable queues and persistent messages survive

Starting one needs root (the node runs as the `rabbitmq` user, whose cookie it shares)
or to be the `rabbitmq` user; otherwise `node_or_skip()` skips the test (fails under CI).

Under `scripts/rabbitmq4.sh run` (NOBS_AMQP_NODE_GENERATION=4) a `Node` runs RabbitMQ 4.x from
the script's Debian root instead, through `rabbitmq4.sh exec-node` (mounts, limits, chroot) and
`rabbitmq4.sh ctl` (the root's rabbitmqctl, cookie and epmd), with its dir inside that root.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shlex
import shutil
import signal
import socket
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from .support import free_port

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
RABBITMQ_USER = "rabbitmq"
MARKER = "NOBS_AMQP_NODE_ID"
OWNER = "NOBS_AMQP_NODE_OWNER"  # the pid of the test process that started the node
NOFILE = 65536
SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "rabbitmq4.sh"
GENERATION = "NOBS_AMQP_NODE_GENERATION"  # "4" under scripts/rabbitmq4.sh run
NODES_IN_ROOT = "var/lib/nobs-nodes"  # where rabbitmq4.sh keeps its nodes' dirs, inside the root


def generation() -> int:
    """The RabbitMQ generation of this run: 4 under `scripts/rabbitmq4.sh run`, else 3."""
    return 4 if os.environ.get(GENERATION) == "4" else 3


def rabbitmq4_root() -> Path:
    """The Debian root that scripts/rabbitmq4.sh runs RabbitMQ 4.x from (it exports it in `run`)."""
    root = os.environ.get("NOBS_AMQP_RABBITMQ4_ROOT")
    if root:
        return Path(root)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "nobs-amqp" / os.environ.get("NOBS_AMQP_DEBIAN_SUITE", "trixie")


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for a TLS listener (the node verifies peers against `cacert`)."""

    cacert: Path
    cert: Path
    key: Path


def cannot_start_reason() -> str | None:
    """Why this machine cannot start a throwaway node, or None."""
    if generation() == 4:
        if os.geteuid() != 0:
            return "starting a throwaway RabbitMQ 4 node needs root (chroot and mount do)"
        if not (rabbitmq4_root() / ".nobs-ready").exists():
            return f"no RabbitMQ 4 root at {rabbitmq4_root()} (make it with: scripts/rabbitmq4.sh build)"
        return None
    if not (RABBITMQ_BIN / "rabbitmq-server").exists():
        return f"RabbitMQ is not installed ({RABBITMQ_BIN} is missing)"
    try:
        pwd.getpwnam(RABBITMQ_USER)
    except KeyError:
        return f"there is no {RABBITMQ_USER!r} user"
    if os.geteuid() != 0 and pwd.getpwuid(os.geteuid()).pw_name != RABBITMQ_USER:
        return f"starting a throwaway RabbitMQ node needs root or the {RABBITMQ_USER!r} user"
    return None


def node_or_skip() -> None:
    """Skip the test when no node can be started here; fail instead when CI is set."""
    reason = cannot_start_reason()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so this fails instead of skipping)")
    pytest.skip(reason)


def _environments() -> dict[int, dict[str, str]]:
    """The marker and owner variables of every process that has them."""
    found: dict[int, dict[str, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        pairs = dict(v.decode(errors="replace").split("=", 1) for v in environ.split(b"\0") if b"=" in v)
        if MARKER in pairs:
            found[int(entry.name)] = {MARKER: pairs[MARKER], OWNER: pairs.get(OWNER, "")}
    return found


def _pids_with_marker(node_id: str) -> list[int]:
    """The processes started for this node (they inherit the marker in their environment)."""
    return [pid for pid, env in _environments().items() if env[MARKER] == node_id]


def reap_orphans() -> list[int]:
    """SIGKILL the processes of nodes whose test process is gone (killed before it could clean up)."""
    killed = []
    for pid, env in _environments().items():
        owner = env[OWNER]
        if owner.isdigit() and not Path(f"/proc/{owner}").exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
    if generation() == 4:
        # Their dirs inside the root (rabbitmq4.sh's own `run-*` nodes have no OWNER_PID line).
        for settings in (rabbitmq4_root() / NODES_IN_ROOT).glob("*/node.env"):
            with contextlib.suppress(OSError):
                values = dict(line.split("=", 1) for line in settings.read_text().splitlines() if "=" in line)
                started_by = values.get("OWNER_PID", "")
                gone = started_by.isdigit() and not Path(f"/proc/{started_by}").exists()
                if gone and not _pids_with_marker(settings.parent.name):
                    shutil.rmtree(settings.parent, ignore_errors=True)
    return killed


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


class Node:
    """A RabbitMQ node owned by a test, on free loopback ports, with data in a temp dir."""

    def __init__(
        self,
        *,
        management: bool = False,
        tls: TlsFiles | None = None,
        start_timeout: float = 90.0,
        epmd_port: int | None = None,
    ) -> None:
        """`epmd_port` (4.x only): an epmd port this node shares with other nodes (a cluster's),
        instead of an epmd of its own; only `close()` then kills that epmd, never a stop or a kill."""
        self.id = uuid.uuid4().hex[:10]
        self.generation = generation()
        self.name = f"nobs{'4' if self.generation == 4 else ''}-{self.id}@localhost"
        self.management = management
        self.tls = tls
        self.start_timeout = start_timeout
        self.port = free_port()
        self.dist_port = free_port()
        self.management_port = free_port() if management else None
        self.tls_port = free_port() if tls else None
        # A 4.x node has an epmd of its own, unless it shares one (a 3.10 node uses the host's).
        self.shares_epmd = self.generation == 4 and epmd_port is not None
        self.epmd_port = (epmd_port or free_port()) if self.generation == 4 else None
        if self.generation == 4:
            # Inside the root, where the chrooted server sees it (as /var/lib/nobs-nodes/ID).
            self.dir = rabbitmq4_root() / NODES_IN_ROOT / self.id
            self.dir.mkdir(parents=True)
        else:
            self.dir = Path(tempfile.mkdtemp(prefix=f"nobs-node-{self.id}-"))
        self._process: asyncio.subprocess.Process | None = None
        self._log: Any = None
        self._configure()

    # -- addresses ------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def management_url(self) -> str:
        assert self.management_port is not None, "this node was made without management=True"
        return f"http://127.0.0.1:{self.management_port}"

    def tls_url(self, host: str = "localhost", **query: str) -> str:
        assert self.tls_port is not None, "this node was made without tls="
        params = urlencode(query, safe="/")
        return f"amqps://guest:guest@{host}:{self.tls_port}/" + (f"?{params}" if params else "")

    # -- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> Node:
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    async def start(self) -> None:
        """Start the node (again, on the same ports and data) and wait until it answers."""
        if self.running:
            return
        node_or_skip()
        reap_orphans()
        env = self._env()
        self._log = (self.dir / "console.log").open("ab")
        user: dict[str, Any] = {}
        if self.generation == 4:
            # The script mounts /proc and /dev in the root, raises the limit and chroots.
            command = ["bash", str(SCRIPT), "exec-node", self.id]
        else:
            if os.geteuid() == 0:
                user = {"user": RABBITMQ_USER, "group": RABBITMQ_USER, "extra_groups": []}
            # Raise the soft open-files limit as far as the hard one allows; fine if it cannot.
            script = f'ulimit -n {NOFILE} 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null; exec "$@"'
            command = ["sh", "-c", script, "sh", str(RABBITMQ_BIN / "rabbitmq-server")]
        self._process = await asyncio.create_subprocess_exec(
            *command,
            cwd=self.dir,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=self._log,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
            **user,
        )
        started = time.monotonic()
        try:
            await self._wait_until_up(started + self.start_timeout)
        except BaseException:
            await self._kill_all(epmd=not self.shares_epmd)
            raise

    async def stop(self, timeout: float = 60.0) -> None:
        """Stop gracefully (`rabbitmqctl stop`); SIGKILL whatever is left after `timeout`."""
        if not self.running:
            return
        with contextlib.suppress(AssertionError, TimeoutError):
            await self.ctl("stop", timeout=timeout)
        try:
            await self._wait_exited(timeout)
        except TimeoutError:
            await self._kill_all(epmd=not self.shares_epmd)

    async def kill9(self) -> int:
        """SIGKILL this node's Erlang VM, as the OOM killer would; return the pid killed."""
        pid = self.beam_pid()
        os.kill(pid, signal.SIGKILL)
        await self._wait_exited(30)
        return pid

    async def restart(self, *, kill: bool = False) -> None:
        """Stop (gracefully, or by SIGKILL) and start again on the same data dir and ports."""
        if kill:
            await self.kill9()
        else:
            await self.stop()
        await self.start()

    async def close(self) -> None:
        """Stop the node if it runs (by SIGKILL: its data is thrown away) and remove its dir. This kills
        the epmd the node started too, shared or not (a cluster closes all its nodes at once)."""
        await self._kill_all()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- looking inside -------------------------------------------------------------------

    def beam_pid(self) -> int:
        """The pid of this node's beam.smp (from its pid file, checked against its marker)."""
        mine = set(_pids_with_marker(self.id))
        with contextlib.suppress(OSError, ValueError):
            pid = int((self.dir / ("pid" if self.generation == 4 else "rabbit.pid")).read_text().strip())
            if pid in mine:
                return pid
        beams = [pid for pid in mine if _comm(pid).startswith("beam")]
        assert len(beams) == 1, f"expected one beam process of node {self.name}, found {beams}"
        return beams[0]

    async def ctl(self, *args: str, timeout: float = 60.0) -> str:
        """`rabbitmqctl -n <node> ARGS`; its output (fails the test if it exits non-zero)."""
        user: dict[str, Any] = {}
        if self.generation == 4:
            command = ["bash", str(SCRIPT), "ctl", self.id]  # the root's rabbitmqctl, cookie and epmd
        else:
            if os.geteuid() == 0:
                user = {"user": RABBITMQ_USER, "group": RABBITMQ_USER, "extra_groups": []}
            command = [str(RABBITMQ_BIN / "rabbitmqctl"), "-n", self.name]
        process = await asyncio.create_subprocess_exec(
            *command,
            *args,
            cwd=self.dir,
            env=self._env(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            **user,
        )
        try:
            output, _ = await asyncio.wait_for(process.communicate(), timeout)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        text = output.decode(errors="replace")
        assert process.returncode == 0, f"rabbitmqctl {' '.join(args)} exited {process.returncode}: {text}"
        return text

    def log_tail(self, chars: int = 4000) -> str:
        parts = []
        for path in [self.dir / "console.log", *sorted((self.dir / "log").glob("*.log"))]:
            with contextlib.suppress(OSError):
                parts.append(f"--- {path.name}\n" + path.read_text(errors="replace")[-chars:])
        return "\n".join(parts)

    # -- internals ------------------------------------------------------------------------

    def _inside(self, path: Path) -> Path:
        """`path` as the node sees it: from inside the root for a 4.x node."""
        if self.generation == 4:
            return Path("/") / path.relative_to(rabbitmq4_root())
        return path

    def _configure(self) -> None:
        (self.dir / "mnesia").mkdir()
        (self.dir / "log").mkdir()
        lines = ["loopback_users = none", "log.console = false", "log.file.level = info"]
        if self.management_port is not None:
            lines += ["management.tcp.ip = 127.0.0.1", f"management.tcp.port = {self.management_port}"]
        if self.tls is not None:
            # The node reads the certificates as the rabbitmq user: keep copies in its dir.
            tls_dir = self.dir / "tls"
            tls_dir.mkdir()
            for field in ("cacert", "cert", "key"):
                shutil.copyfile(getattr(self.tls, field), tls_dir / f"{field}.pem")
            lines += [
                f"listeners.ssl.1 = 127.0.0.1:{self.tls_port}",
                f"ssl_options.cacertfile = {self._inside(tls_dir / 'cacert.pem')}",
                f"ssl_options.certfile = {self._inside(tls_dir / 'cert.pem')}",
                f"ssl_options.keyfile = {self._inside(tls_dir / 'key.pem')}",
                "ssl_options.verify = verify_peer",
                "ssl_options.fail_if_no_peer_cert = false",
            ]
        (self.dir / "rabbitmq.conf").write_text("\n".join(lines) + "\n")
        plugins = "[rabbitmq_management]." if self.management else "[]."
        (self.dir / "enabled_plugins").write_text(plugins + "\n")
        if self.generation == 4:
            # What `rabbitmq4.sh exec-node` and `ctl` read (the script chowns the dir itself); the
            # script sources it, so values are quoted for the shell.
            settings = self._settings()
            (self.dir / "node.env").write_text("".join(f"{k}={shlex.quote(str(v))}\n" for k, v in settings.items()))
        elif os.geteuid() == 0:
            account = pwd.getpwnam(RABBITMQ_USER)
            for path in [self.dir, *self.dir.rglob("*")]:
                os.chown(path, account.pw_uid, account.pw_gid)

    def _settings(self) -> dict[str, object]:
        """A 4.x node's node.env: what `rabbitmq4.sh` sets the node's environment in the root from."""
        return {
            "NODENAME": self.name,
            "AMQP_PORT": self.port,
            "DIST_PORT": self.dist_port,
            "EPMD_PORT": self.epmd_port,
            "MGMT_PORT": self.management_port or "",
            "OWNER_PID": os.getpid(),
        }

    def _env(self) -> dict[str, str]:
        if self.generation == 4:
            # The script sets the node's own environment inside the root from node.env.
            passed = ("NOBS_AMQP_RABBITMQ4_NOFILE",)
            return {
                "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
                "LANG": "C.UTF-8",
                "LC_ALL": "C.UTF-8",
                MARKER: self.id,
                OWNER: str(os.getpid()),
                "NOBS_AMQP_RABBITMQ4_ROOT": str(rabbitmq4_root()),
                **{k: os.environ[k] for k in passed if k in os.environ},
            }
        home = pwd.getpwnam(RABBITMQ_USER).pw_dir  # where the Erlang cookie is
        return {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "HOME": home,
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            MARKER: self.id,
            OWNER: str(os.getpid()),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.dir / "rabbit.pid"),
        }

    async def _wait_until_up(self, deadline: float) -> None:
        ports = [self.port, *(p for p in (self.management_port, self.tls_port) if p is not None)]
        while True:
            if not self.running:
                raise AssertionError(f"node {self.name} exited while starting:\n{self.log_tail()}")
            if all(_answers(p) for p in ports) and await self._management_answers():
                return
            if time.monotonic() > deadline:
                waited = f"node {self.name} did not answer within {self.start_timeout} s"
                raise AssertionError(f"{waited}:\n{self.log_tail()}")
            await asyncio.sleep(0.2)

    async def _management_answers(self) -> bool:
        if self.management_port is None:
            return True
        return await asyncio.to_thread(_http_ok, f"{self.management_url}/api/overview")

    async def _wait_exited(self, timeout: float) -> None:
        """Wait for the rabbitmq-server process and every process of this node to be gone."""
        deadline = time.monotonic() + timeout
        # A 4.x node's epmd (its own or a cluster's) outlives it, as the host's does a 3.10 node's;
        # a restart reuses it.
        while self.running or [pid for pid in _pids_with_marker(self.id) if _comm(pid) != "epmd"]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"node {self.name} still runs after {timeout} s")
            await asyncio.sleep(0.05)
        self._close_log()

    async def _kill_all(self, *, epmd: bool = True) -> None:
        """SIGKILL every process of this node (found by its marker), then reap ours. With `epmd`
        False, spare the epmd it may have started (one its cluster's other nodes still use)."""
        for _ in range(50):
            pids = [pid for pid in _pids_with_marker(self.id) if epmd or _comm(pid) != "epmd"]
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            await asyncio.sleep(0.1)
        if self._process is not None and self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._process.kill()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._process.wait(), 10)
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _http_ok(url: str) -> bool:
    request = urllib.request.Request(url)
    request.add_header("Authorization", "Basic Z3Vlc3Q6Z3Vlc3Q=")  # guest:guest
    try:
        with urllib.request.urlopen(request, timeout=3) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False
