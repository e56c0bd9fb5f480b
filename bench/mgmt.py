"""The few RabbitMQ management API calls the harness needs (stdlib only: runs under any Python >= 3.11).

The same idea as nobs_amqp.management, copied so the harness depends on no benchmarked package.
"""

from __future__ import annotations

import base64
import json
import socket
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit


class ManagementError(Exception):
    """The management API could not be reached or refused a call."""


class Management:
    def __init__(self, amqp_url: str, api: str | None = None, *, timeout: float = 10.0) -> None:
        parts = urlsplit(amqp_url)
        self.base = (api or f"http://{parts.hostname or '127.0.0.1'}:15672").rstrip("/")
        self.user = unquote(parts.username or "guest")
        password = unquote(parts.password or "guest")
        self._auth = "Basic " + base64.b64encode(f"{self.user}:{password}".encode()).decode()
        self._timeout = timeout

    def call(self, method: str, path: str, body: object = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, method=method)
        request.add_header("Authorization", self._auth)
        request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as response:
                text = response.read()
        except urllib.error.HTTPError as exc:
            if exc.code == 404 and method in ("GET", "DELETE"):
                return None
            raise ManagementError(f"{method} {path}: {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise ManagementError(f"management API at {self.base}: {exc}") from None
        return json.loads(text) if text else None

    def overview(self) -> dict[str, Any]:
        result = self.call("GET", "/api/overview")
        return result if isinstance(result, dict) else {}

    def create_vhost(self, vhost: str) -> None:
        name = quote(vhost, safe="")
        self.call("PUT", f"/api/vhosts/{name}", {})
        perms = {"configure": ".*", "write": ".*", "read": ".*"}
        self.call("PUT", f"/api/permissions/{name}/{quote(self.user, safe='')}", perms)

    def delete_vhost(self, vhost: str) -> None:
        self.call("DELETE", f"/api/vhosts/{quote(vhost, safe='')}")

    def queue(self, vhost: str, name: str) -> dict[str, Any] | None:
        result = self.call("GET", f"/api/queues/{quote(vhost, safe='')}/{quote(name, safe='')}")
        return result if isinstance(result, dict) else None

    def queue_names(self, vhost: str) -> list[str]:
        result = self.call("GET", f"/api/queues/{quote(vhost, safe='')}?columns=name")
        return [q["name"] for q in result or []]

    def delete_queues(self, vhost: str, prefix: str) -> int:
        """Delete every queue of `vhost` whose name starts with `prefix`; how many."""
        names = [n for n in self.queue_names(vhost) if n.startswith(prefix)]
        for name in names:
            self.call("DELETE", f"/api/queues/{quote(vhost, safe='')}/{quote(name, safe='')}")
        return len(names)


def amqp_answers(amqp_url: str, timeout: float = 5.0) -> bool:
    """Whether the broker starts an AMQP handshake (sends connection.start) within `timeout` s.

    A broker can accept TCP connections and still start no AMQP connection (for example when its
    file handle cache is exhausted); every phase would then wait for its full deadline.
    """
    parts = urlsplit(amqp_url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5672), timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(b"AMQP\x00\x00\x09\x01")
            frame = sock.recv(7)
    except OSError:
        return False
    return len(frame) == 7 and frame[0] == 1  # a METHOD frame: connection.start


def with_vhost(amqp_url: str, vhost: str) -> str:
    """`amqp_url` pointing at `vhost` instead of its own."""
    parts = urlsplit(amqp_url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + quote(vhost, safe=""), parts.query, ""))
