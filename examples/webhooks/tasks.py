"""Calling webhooks: retry network errors and 5xx with growing waits, dead-letter what cannot succeed.

    nobs-amqp --app examples.webhooks.tasks:project consume webhooks

The `webhooks` worker has the library's defaults; `call_webhook` sets its own options with
`@task(...)` (another task on the same worker keeps the worker's):

- a connection error, a timeout or a 5xx (any `httpx.HTTPError`) is retried, up to
  4 attempts in all, waiting about 1, 2 and 4 s (plus jitter) in between, each attempt
  within 15 s;
- 429 Too Many Requests is retried after the endpoint's Retry-After (`Retry(delay=...)`);
- 410 Gone and other 4xx are dead-lettered at once (`Reject(...)`): retrying cannot help;
- any other exception (a bug) is not retried either: it goes straight to the DLQ.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
from pydantic import BaseModel, HttpUrl
from tenacity import retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from nobs_amqp import Project, Reject, Retry, Worker, task

log = logging.getLogger("examples.webhooks")

DELIVERY_HEADER = "X-Webhook-Delivery"
DEFAULT_RETRY_AFTER = 5.0

webhooks = Worker("webhooks", concurrency=50, time_limit=60)

project = Project(name="webhook-example", workers=[webhooks])


class WebhookCall(BaseModel):
    url: HttpUrl
    delivery_id: str  # the same on every attempt: receivers use it to drop duplicates
    event: str
    data: dict[str, Any] = {}


def retry_after(response: httpx.Response) -> float:
    """Seconds the endpoint asks us to wait: Retry-After as seconds or an HTTP date."""
    value = response.headers.get("Retry-After", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, (parsedate_to_datetime(value) - datetime.now(UTC)).total_seconds())
    except (TypeError, ValueError):
        return DEFAULT_RETRY_AFTER


@task(
    retry=retry_if_exception_type(httpx.HTTPError),
    wait=wait_exponential_jitter(initial=1, max=4),
    stop=stop_after_attempt(4),
    time_limit=15,
)
async def call_webhook(call: WebhookCall) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.post(
            str(call.url),
            json={"event": call.event, "data": call.data},
            headers={DELIVERY_HEADER: call.delivery_id},
        )
    status = response.status_code
    if status == 410:
        raise Reject("endpoint gone")
    if status == 429:
        raise Retry(delay=retry_after(response), reason="429 Too Many Requests")
    if 400 <= status < 500:
        raise Reject(f"endpoint refused the call: {status} {response.reason_phrase}")
    if status >= 500:  # an httpx.HTTPError, so the policy retries it
        raise httpx.HTTPStatusError(f"{status} {response.reason_phrase}", request=response.request, response=response)
    log.info("webhook %s delivered to %s (%d)", call.delivery_id, call.url, status)
