"""Logs: one line per finished delivery (`TaskLog`), and the CLI's text or JSON formatting.

Every project's sessions have a `TaskLog`: when a worker has settled a delivery it logs one
record on the `nobs_amqp` logger, INFO for a success or a duplicate, WARNING for a retry or a
message given back, ERROR for a dead letter. The record's text is one readable line, and its
`extra` fields (`TASK_FIELDS`) say the same as data, for a logging config of your own
(`%(task)s`, a filter on `outcome`) and for `nobs-amqp --log-format json`, which writes one JSON
object a line through python-json-logger.
"""

from __future__ import annotations

import logging
import sys
import time
from datetime import UTC, datetime
from typing import IO, Literal

from ..errors import ConfigurationError
from ..message import format_time, printable
from .observer import Fate, Observer, TaskRun

log = logging.getLogger("nobs_amqp")

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
#: What every task line carries as `extra` (None where it does not apply).
TASK_FIELDS = (
    "worker",
    "task",
    "message_id",
    "attempt",
    "outcome",
    "duration",
    "error_type",
    "error",
    "reason",
    "retry_delay",
)
#: The fields of every JSON line, in this order, before the record's extras.
JSON_FIELDS = {"asctime": "time", "levelname": "level", "name": "logger", "message": "message"}

_LEVELS = {
    Fate.SUCCEEDED: logging.INFO,
    Fate.DUPLICATE: logging.INFO,
    Fate.RETRIED: logging.WARNING,
    Fate.REQUEUED: logging.WARNING,
    Fate.DEAD_LETTERED: logging.ERROR,
    Fate.REJECTED: logging.ERROR,
}


class TaskLog(Observer):
    """Logs how each delivery ended, once, with its fields as `extra`."""

    def finished(self, run: TaskRun) -> None:
        level = logging.WARNING if run.outcome is None else _LEVELS[run.outcome]
        if log.isEnabledFor(level):
            line, fields = task_line(run)
            # log.log(level, "%s", line, extra=fields), without looking for the caller up the stack
            # each time (it is this method: the record says so, as findCaller would) nor checking
            # the extra fields one by one.
            record = log.makeRecord(log.name, level, _FILE, _LINE, "%s", (line,), None, "finished")
            if clash := fields.keys() & record.__dict__.keys():  # a record factory of the application's
                raise KeyError(f"Attempt to overwrite {clash.pop()!r} in LogRecord")
            record.__dict__.update(fields)
            log.handle(record)


_FILE, _LINE = TaskLog.finished.__code__.co_filename, TaskLog.finished.__code__.co_firstlineno


def task_line(run: TaskRun) -> tuple[str, dict[str, object]]:
    """The text of `run`'s log line, and its fields."""
    error = run.error
    fields: dict[str, object] = {
        "worker": run.worker,
        "task": printable(run.task),
        "message_id": printable(run.message_id, 100),
        "attempt": run.attempt,
        "outcome": run.outcome or "unsettled",
        "duration": round(run.seconds, 6),
        "error_type": type(error).__name__ if error is not None else None,
        "error": printable(error, 500) if error is not None else None,
        "reason": run.reason,
        "retry_delay": run.delay,
    }
    head = f"task {fields['task'] or '?'} id {fields['message_id']} attempt {run.attempt}"
    failure = f"{fields['error_type']}: {fields['error']}" if error is not None else "no error"
    if run.outcome == Fate.SUCCEEDED:
        line = f"{head} succeeded in {run.seconds:.3f} s"
    elif run.outcome == Fate.RETRIED:
        line = f"{head} failed ({failure}); retry in {run.delay} s"
    elif run.outcome == Fate.DEAD_LETTERED:
        line = f"{head} dead-lettered to {run.worker}.dlq ({run.reason}: {fields['error'] or 'no error'})"
    elif run.outcome == Fate.REJECTED:
        line = f"{head} rejected to {run.worker}.dlx, its dead letter could not be placed ({run.reason}: {failure})"
    elif run.outcome == Fate.DUPLICATE:
        line = f"{head}: already settled here; acked this copy (redelivered, or sent again) without running it"
    elif run.outcome == Fate.REQUEUED:
        line = f"{head} given back to the queue unsettled"
    else:
        line = f"{head} ended unsettled ({failure})"
    return line, fields


# -- the CLI's handler ------------------------------------------------------------------------


def formatter(log_format: LogFormat) -> logging.Formatter:
    """Today's text lines, or one JSON object a line: time, level, logger, message, then the
    record's extras (a task line's `TASK_FIELDS`) and a traceback as `exc_info`."""
    if log_format == "text":
        return _TextFormatter(TEXT_FORMAT)
    try:
        from pythonjsonlogger.json import JsonFormatter
    except ImportError:
        raise ConfigurationError(
            "--log-format json needs python-json-logger: pip install 'nobs_amqp[json-logs]'"
        ) from None

    class _Json(JsonFormatter):
        def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
            return format_time(datetime.fromtimestamp(record.created, UTC))

    return _Json(list(JSON_FIELDS), rename_fields=JSON_FIELDS, json_ensure_ascii=False)


class _TextFormatter(logging.Formatter):
    """logging.Formatter, with `asctime` made once per second rather than once per line (a worker
    logs a line per task): the same text."""

    _second: int | None = None
    _text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        msec_format = self.default_msec_format
        if datefmt or not msec_format or self.converter is not time.localtime:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if second != self._second:
            self._second, self._text = second, time.strftime(self.default_time_format, time.localtime(second))
        return msec_format % (self._text, record.msecs)


def handler(log_format: LogFormat, stream: IO[str] | None = None) -> logging.Handler:
    """A stream handler (stderr by default) with `formatter(log_format)`."""
    out = logging.StreamHandler(stream if stream is not None else sys.stderr)
    out.setFormatter(formatter(log_format))
    return out
