"""A stream flooded with cancellations costs a worker a bounded number of ids, the newest."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from nobs_amqp import cancellation
from nobs_amqp.cancellation import Cancellations, cancel_message
from nobs_amqp.message import wall_clock


def test_a_process_keeps_only_the_newest_cancelled_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cancellation, "MAX_CANCELLED", 3)
    session: Any = SimpleNamespace(signer=None)
    known = Cancellations(session, "w")
    for i in range(5):
        known._read(cancel_message(f"id-{i}", "p", wall_clock()))
    assert len(known) == 3
    assert "id-0" not in known and "id-1" not in known
    assert all(f"id-{i}" in known for i in (2, 3, 4))
