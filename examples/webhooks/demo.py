"""`python -m examples.webhooks.demo`: webhook calls against a flaky local endpoint.

It starts a receiver on 127.0.0.1 (endpoint.py), queues four calls, consumes the
`webhooks` worker in this process (`project.consuming(...)`) and prints what became
of each: delivered after how many attempts and waits, or dead-lettered and why.

- flaky:     503 twice, then 200          -> delivered on attempt 3, waits growing (~2 s, ~3 s)
- throttled: 429 with Retry-After: 1      -> delivered on attempt 2, 1 s later (`Retry(delay=...)`)
- broken:    always 500                   -> webhooks.dlq after 4 attempts, reason max_attempts
- gone:      410 Gone                     -> webhooks.dlq at once, reason rejected (`Reject(...)`)

It takes about 10 s. With NOBS_AMQP_URL=memory:// it runs on the in-memory broker.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any
from urllib.parse import quote

from nobs_amqp import message as wire
from nobs_amqp.management import Management
from nobs_amqp.transports.memory import MemoryBroker
from nobs_amqp.urls import in_process, redact, vhost_of

from .endpoint import Endpoint
from .tasks import WebhookCall, call_webhook, project, webhooks

DLQ = f"{webhooks.name}.dlq"
DEADLINE_SECONDS = 60

#: (name, path on the endpoint, what should happen)
CASES = (
    ("flaky", "/flaky?fails=2", "503 twice, then 200"),
    ("throttled", "/throttled?retry_after=1", "429 with Retry-After: 1, then 200"),
    ("broken", "/broken", "always 500"),
    ("gone", "/gone", "410 Gone"),
)


@dataclass(frozen=True, slots=True)
class Queued:
    name: str
    delivery_id: str
    message_id: str


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one webhook call: the endpoint's view, and the dead letter if there is one."""

    name: str
    delivery_id: str
    message_id: str
    statuses: list[int]
    times: list[float]
    dead: Mapping[str, object] | None

    @property
    def attempts(self) -> int:
        return len(self.statuses)

    @property
    def delivered(self) -> bool:
        return bool(self.statuses) and 200 <= self.statuses[-1] < 300

    @property
    def settled(self) -> bool:
        return self.delivered or self.dead is not None

    @property
    def gaps(self) -> list[float]:
        """Seconds between one attempt and the next."""
        return [round(b - a, 3) for a, b in pairwise(self.times)]

    def describe(self) -> str:
        calls = " ".join(map(str, self.statuses)) or "none"
        waits = ", ".join(f"{gap:.1f} s" for gap in self.gaps) or "none"
        if self.delivered:
            return f"delivered on attempt {self.attempts} (answers {calls}; waits {waits})"
        if self.dead is not None:
            reason, error = self.dead.get(wire.REASON), self.dead.get(wire.ERROR_MESSAGE)
            return f"in {DLQ} after {self.attempts} attempt(s): {reason}, {error!r} (answers {calls}; waits {waits})"
        return f"not settled yet (answers {calls})"

    def as_json(self) -> dict[str, Any]:
        dead = None
        if self.dead is not None:
            keys = (wire.REASON, wire.ATTEMPT, wire.ERROR_TYPE, wire.ERROR_MESSAGE)
            dead = {key: self.dead.get(key) for key in keys}
        return {
            "name": self.name,
            "delivery_id": self.delivery_id,
            "message_id": self.message_id,
            "statuses": self.statuses,
            "gaps": self.gaps,
            "delivered": self.delivered,
            "dead": dead,
        }


async def queue_calls(endpoint: Endpoint) -> list[Queued]:
    """Queue one call per case, aimed at `endpoint`; the project must be open."""
    queued = []
    for name, path, _ in CASES:
        call = WebhookCall(
            url=endpoint.url(path),  # type: ignore[arg-type]  # pydantic validates the str
            delivery_id=f"{name}-{uuid.uuid4().hex[:8]}",
            event="order.paid",
            data={"order": 42},
        )
        message_id = await webhooks.queue(call_webhook, call)
        queued.append(Queued(name, call.delivery_id, message_id))
    return queued


async def dead_letters(url: str) -> dict[str, Mapping[str, object]]:
    """Headers of the messages in the DLQ by message id, left there for an operator (a peek)."""
    if in_process(url):
        return {m.message_id: m.headers for m in MemoryBroker.named(url).messages(DLQ)}
    path = f"/api/queues/{quote(vhost_of(url), safe='')}/{quote(DLQ, safe='')}/get"
    peeked = await Management(url).request(
        "POST", path, {"count": 1000, "ackmode": "ack_requeue_true", "encoding": "auto"}
    )
    return {m["properties"].get("message_id"): m["properties"].get("headers") or {} for m in peeked or []}


async def outcomes(queued: list[Queued], endpoint: Endpoint) -> list[Outcome]:
    dead = await dead_letters(project.urls[0])
    return [
        Outcome(
            q.name,
            q.delivery_id,
            q.message_id,
            [call.status for call in endpoint.calls[q.delivery_id]],
            [call.at for call in endpoint.calls[q.delivery_id]],
            dead.get(q.message_id),
        )
        for q in queued
    ]


async def wait_until_settled(queued: list[Queued], endpoint: Endpoint, timeout: float) -> list[Outcome]:  # noqa: ASYNC109
    """Poll until every call was delivered or dead-lettered, or `timeout` seconds passed."""
    deadline = time.monotonic() + timeout
    while True:
        found = await outcomes(queued, endpoint)
        if all(o.settled for o in found) or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.5)  # the broker sends no event for "arrived in the DLQ"


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.webhooks.demo", description=__doc__)
    parser.add_argument("--json", metavar="PATH", help="also write the outcomes as JSON to PATH")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    url = project.urls[0]
    async with Endpoint() as endpoint, project, project.consuming(webhooks):
        print(f"demo: broker {redact(url)}; webhook receiver on {endpoint.url('/')}", flush=True)
        queued = await queue_calls(endpoint)
        for (name, path, behaviour), q in zip(CASES, queued, strict=True):
            print(f"demo: queued {name:<9} -> {path:<26} ({behaviour}); message id {q.message_id}", flush=True)
        print("demo: consuming in this process until every call is delivered or dead-lettered ...", flush=True)
        found = await wait_until_settled(queued, endpoint, DEADLINE_SECONDS)
    print("\ndemo: outcomes", flush=True)
    for outcome in found:
        print(f"  {outcome.name:<9} {outcome.describe()}", flush=True)
    if not in_process(url):
        ui = f"{Management(url).base}/#/queues/{quote(vhost_of(url), safe='')}/{DLQ}"
        print(f"\nThe dead letters stay in {DLQ}: {ui} -> 'Get messages' (guest/guest).", flush=True)
    if args.json:
        report = json.dumps([o.as_json() for o in found], indent=2)
        await asyncio.to_thread(Path(args.json).write_text, report)
    return 0 if all(o.settled for o in found) else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
