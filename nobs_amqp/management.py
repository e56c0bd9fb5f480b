"""A small client of the RabbitMQ management HTTP API (vhosts, queues, exchanges, bindings), stdlib only."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from typing import Any
from urllib.parse import quote

from .errors import BrokerConnectionError
from .urls import http_base, parse

MANAGEMENT_ENV = "NOBS_AMQP_MANAGEMENT_URL"


def _management(amqp_url: str) -> tuple[str, str | None, str | None]:
    """The management API's base URL (safe to show), and the user name and password NOBS_AMQP_MANAGEMENT_URL carries."""
    configured = os.environ.get(MANAGEMENT_ENV, "").strip()
    if configured:
        base, user, password = http_base(configured, MANAGEMENT_ENV)
        return base.rstrip("/"), user, password
    parts = parse(amqp_url)
    scheme, port = ("https", 15671) if parts.scheme == "amqps" else ("http", 15672)
    host = parts.host or "localhost"
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}:{port}", None, None


class Management:
    """Calls the management API with the credentials of NOBS_AMQP_MANAGEMENT_URL, else those of the
    AMQP URL. No credential is ever part of `base` or of an error. Constructing it does no I/O."""

    def __init__(self, amqp_url: str, *, timeout: float = 10.0) -> None:
        self.base, user, password = _management(amqp_url)
        if user is None:
            broker = parse(amqp_url)
            user, password = broker.user, broker.password
        self.user = user or "guest"
        password = password if password is not None else "guest"
        self._auth = "Basic " + base64.b64encode(f"{self.user}:{password}".encode()).decode()
        self._timeout = timeout

    def __repr__(self) -> str:
        return f"Management({self.base!r}, user={self.user!r})"

    async def request(self, method: str, path: str, body: object = None) -> Any:
        return await asyncio.to_thread(self._request, method, path, body)

    def _request(self, method: str, path: str, body: object) -> Any:
        import urllib.error  # here: a worker that never calls the API never loads urllib.request (1 MiB)
        import urllib.request

        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, method=method)
        request.add_header("Authorization", self._auth)
        request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as response:
                text = response.read()
        except urllib.error.HTTPError as exc:
            if exc.code == 404 and method in ("GET", "DELETE"):
                return None  # nothing there (to delete)
            raise BrokerConnectionError(
                f"the management API at {self.base}", f"{method} {path} answered {exc.code} {exc.reason}"
            ) from None
        except (urllib.error.URLError, OSError) as exc:
            raise BrokerConnectionError(
                f"the management API at {self.base}",
                f"{exc}; enable it with `rabbitmq-plugins enable rabbitmq_management` or set {MANAGEMENT_ENV}",
            ) from None
        return json.loads(text) if text else None

    def create_vhost(self, vhost: str) -> None:
        """Create `vhost` and give the URL's user every permission on it (blocking)."""
        self._request("PUT", f"/api/vhosts/{quote(vhost, safe='')}", {})
        self._request(
            "PUT",
            f"/api/permissions/{quote(vhost, safe='')}/{quote(self.user, safe='')}",
            {"configure": ".*", "write": ".*", "read": ".*"},
        )

    def list_vhosts(self) -> list[dict[str, Any]]:
        """Every vhost (blocking)."""
        result = self._request("GET", "/api/vhosts", None)
        return result if isinstance(result, list) else []

    def delete_vhost(self, vhost: str) -> None:
        """Delete `vhost` and everything in it (blocking)."""
        self._request("DELETE", f"/api/vhosts/{quote(vhost, safe='')}", None)

    async def get(self, kind: str, vhost: str, name: str) -> dict[str, Any] | None:
        """A queue's or exchange's description (`kind` "queue" or "exchange"), None if it does not exist."""
        result = await self.request("GET", f"/api/{kind}s/{quote(vhost, safe='')}/{quote(name, safe='')}")
        return result if isinstance(result, dict) else None

    async def queue(self, vhost: str, name: str) -> dict[str, Any] | None:
        return await self.get("queue", vhost, name)

    async def vhost(self, vhost: str) -> dict[str, Any] | None:
        """The vhost's description, None if it does not exist."""
        result = await self.request("GET", f"/api/vhosts/{quote(vhost, safe='')}")
        return result if isinstance(result, dict) else None

    async def routing_keys(self, vhost: str, source: str, destination: str, *, to_exchange: bool) -> set[str]:
        """The routing keys that bind `destination` (a queue, or an exchange) to the exchange `source`."""
        kind = "e" if to_exchange else "q"
        path = "/".join(quote(part, safe="") for part in (vhost, "e", source, kind, destination))
        result = await self.request("GET", f"/api/bindings/{path}")
        return {str(b.get("routing_key")) for b in result if isinstance(b, dict)} if isinstance(result, list) else set()

    async def delete(self, kind: str, vhost: str, name: str) -> None:
        """Delete a queue or exchange (`kind` "queue" or "exchange"), whatever it holds; one already gone is fine."""
        await self.request("DELETE", f"/api/{kind}s/{quote(vhost, safe='')}/{quote(name, safe='')}")
