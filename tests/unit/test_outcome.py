"""`outcome.decide`, alone: every kind of event a delivery can meet, and the one outcome it gets.
A pure function, so these need no broker."""

from __future__ import annotations

from datetime import timedelta

import pytest
import tenacity
from pydantic import BaseModel, ValidationError

from nobs_amqp.errors import (
    BadSignatureError,
    BrokerUnavailableError,
    DeliveryLimitExceeded,
    ForeignTaskError,
    NotFoundError,
    RetryNotPlacedError,
    TaskDefinitionError,
    TimeLimitExceeded,
    UndecodableMessageError,
    UnknownTaskError,
)
from nobs_amqp.message import Reason, wall_clock
from nobs_amqp.observe import TaskRun
from nobs_amqp.observe.observer import Fate
from nobs_amqp.outcome import (
    Ack,
    DeadLetter,
    Duplicate,
    GivenBack,
    NotPlaced,
    Raised,
    Refused,
    RejectToDlx,
    Requeue,
    RetryLater,
    Succeeded,
    WorkerFailed,
    decide,
    fate,
    record,
)
from nobs_amqp.retry import Reject, Retry, RetryPolicy

NOW = wall_clock()
POLICY = RetryPolicy(stop=tenacity.stop_after_attempt(3), wait=tenacity.wait_fixed(2.2))


class Model(BaseModel):
    n: int


def _validation_error() -> ValidationError:
    try:
        Model.model_validate({"n": "x"})
    except ValidationError as exc:
        return exc
    raise AssertionError("validated")


def raised(error: BaseException, attempt: int = 1, age: float = 0.0) -> Raised:
    return Raised(error, attempt, NOW - timedelta(seconds=age))


def test_success_is_acked() -> None:
    assert decide(Succeeded(), POLICY, NOW) == Ack()


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (UndecodableMessageError("x"), Reason.DECODE_ERROR),
        (BadSignatureError("x"), Reason.BAD_SIGNATURE),
        (DeliveryLimitExceeded("x"), Reason.DELIVERY_LIMIT),
        (UnknownTaskError("x"), Reason.UNKNOWN_TASK),
        (ForeignTaskError("x"), Reason.UNKNOWN_TASK),
        (TaskDefinitionError(print, "x"), Reason.UNKNOWN_TASK),
        (_validation_error(), Reason.VALIDATION_ERROR),
    ],
)
def test_a_refused_message_is_dead_lettered_at_once_whatever_the_policy(error: Exception, reason: Reason) -> None:
    outcome = decide(Refused(error), RetryPolicy(stop=tenacity.stop_never), NOW)  # type: ignore[arg-type]
    assert outcome == DeadLetter(reason, error)


def test_what_went_wrong_in_the_worker() -> None:
    failure, unreachable = ValueError("the task's"), NotFoundError("W", "no queue")
    outcome = decide(NotPlaced(unreachable, RetryLater(3, failure)), POLICY, NOW)
    assert isinstance(outcome, DeadLetter) and outcome.reason == Reason.RETRY_FAILED
    assert isinstance(outcome.error, RetryNotPlacedError) and outcome.error.__cause__ is failure
    assert str(outcome.error) == f"the task's; and its retry could not be published: {unreachable}"
    letter = DeadLetter(Reason.MAX_ATTEMPTS, failure)
    assert decide(NotPlaced(unreachable, letter), POLICY, NOW) == RejectToDlx(Reason.MAX_ATTEMPTS, failure)
    bug = KeyError("bug")
    assert decide(WorkerFailed(bug), POLICY, NOW) == DeadLetter(Reason.WORKER_ERROR, bug)
    assert decide(WorkerFailed(BrokerUnavailableError("W", "gone")), POLICY, NOW) == Requeue()


def test_duplicates_and_shutdowns_are_decided_too_and_each_outcome_has_one_fate() -> None:
    assert decide(Duplicate(), POLICY, NOW) == Ack(ran=False)
    assert decide(GivenBack(), POLICY, NOW) == Requeue()
    error = ValueError("x")
    fates = {
        Ack(): Fate.SUCCEEDED,
        Ack(ran=False): Fate.DUPLICATE,
        RetryLater(1, error): Fate.RETRIED,
        DeadLetter(Reason.REJECTED, error): Fate.DEAD_LETTERED,
        RejectToDlx(Reason.REJECTED, error): Fate.REJECTED,
        Requeue(): Fate.REQUEUED,
    }
    assert {outcome: fate(outcome) for outcome in fates} == fates
    assert set(fates.values()) == set(Fate)
    run = TaskRun("w", "t", "id", 1)
    record(run, RejectToDlx(Reason.MAX_ATTEMPTS, error))
    assert (run.outcome, run.reason, run.error) == (Fate.REJECTED, "max_attempts", error)
    record(run, RetryLater(4, error))
    assert (run.outcome, run.delay) == (Fate.RETRIED, 4)


def test_a_failure_is_retried_after_whole_seconds_until_the_policy_stops() -> None:
    error = RuntimeError("boom")
    assert decide(raised(error, 1), POLICY, NOW) == RetryLater(3, error)  # 2.2 s rounded up, once
    assert decide(raised(error, 2), POLICY, NOW) == RetryLater(3, error)
    assert decide(raised(error, 3), POLICY, NOW) == DeadLetter(Reason.MAX_ATTEMPTS, error)


def test_the_last_attempt_over_its_time_limit_says_so() -> None:
    error = TimeLimitExceeded("slow")
    assert decide(raised(error, 3), POLICY, NOW) == DeadLetter(Reason.TIME_LIMIT, error)
    assert isinstance(decide(raised(error, 1), POLICY, NOW), RetryLater)


def test_reject_and_retry_from_the_task() -> None:
    reject = Reject("not for us")
    assert decide(raised(reject, 1), POLICY, NOW) == DeadLetter(Reason.REJECTED, reject)
    retry = Retry(delay=0.5)
    assert decide(raised(retry, 1), POLICY, NOW) == RetryLater(1, retry)
    assert decide(raised(retry, 3), POLICY, NOW) == DeadLetter(Reason.MAX_ATTEMPTS, retry)
    plain = Retry()  # no delay of its own: the policy's wait
    assert decide(raised(plain, 1), POLICY, NOW) == RetryLater(3, plain)


def test_an_error_the_policy_does_not_retry_is_rejected() -> None:
    policy = RetryPolicy(retry=tenacity.retry_if_exception_type(ConnectionError))
    error = ValueError("bad input")
    assert decide(raised(error, 1), policy, NOW) == DeadLetter(Reason.REJECTED, error)
    assert isinstance(decide(raised(ConnectionError("flaky"), 1), policy, NOW), RetryLater)


def test_elapsed_time_is_read_on_the_clock_passed_in() -> None:
    """The same attempt, 10 minutes after its first enqueue by the broker's clock, stops."""
    policy = RetryPolicy(stop=tenacity.stop_after_delay(600), wait=tenacity.wait_fixed(30))
    error = RuntimeError("x")
    assert isinstance(decide(raised(error, 5, age=599), policy, NOW), RetryLater)
    assert decide(raised(error, 5, age=600), policy, NOW) == DeadLetter(Reason.MAX_ATTEMPTS, error)
    later = NOW + timedelta(hours=1)  # a virtual clock an hour ahead
    assert decide(raised(error, 2, age=0), policy, later) == DeadLetter(Reason.MAX_ATTEMPTS, error)


def test_an_absurd_wait_is_capped_at_the_ladders_longest() -> None:
    policy = RetryPolicy(wait=lambda state: 1e30)
    outcome = decide(raised(RuntimeError("x"), 1), policy, NOW)
    assert isinstance(outcome, RetryLater)
    assert outcome.delay == 2**28 - 1
