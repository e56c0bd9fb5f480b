"""Calling webhooks with retries, backoff, Retry-After and a dead-letter queue."""
