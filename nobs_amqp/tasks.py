"""Tasks: how a function becomes a reference on the wire, and which references a worker runs.

A message names its task as `module:function`. A worker runs only what its project
made runnable before the first message arrived: the project's task modules are
imported when the worker starts, and a message is looked up in the table built then.
A message never causes an import and never reaches anything outside that table.
`@task(...)` gives a function its own retry strategies and time limit (`TaskOptions`).

A task is a module-level function of one typed request model (a pydantic model or a
dataclass), defined in one of the project's packages; a function listed in
`Project(tasks=[...])` may take any type pydantic validates. Nothing else (`os:system`,
a helper taking an `int`, a CLI `main`, something re-exported from elsewhere, a
module the project never loaded) can be run by a message.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
import math
import pkgutil
import re
import sys
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import timedelta
from functools import cached_property
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, TypeAdapter, ValidationError

from .errors import PayloadTypeError, TaskDefinitionError, UnknownTaskError
from .ladder import checked_seconds
from .ratelimit import RateLimit, RateLimitOption
from .ratelimit import rate_limit as rate_limit_of
from .retry import RetryPolicy, RetryStrategy, StopStrategy, WaitStrategy, describe_strategy

TaskFunction = Callable[[Any], Any]
log = logging.getLogger("nobs_amqp")

_REFERENCE = re.compile(r"^([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):([A-Za-z_]\w*)$")


@dataclass(frozen=True, slots=True)
class TaskOptions:
    """What a task sets for itself over its worker's: retry strategies and time limit (None: the
    worker's), and a rate limit of its own (applied as well as its worker's)."""

    stop: StopStrategy | None = None
    wait: WaitStrategy | None = None
    retry: RetryStrategy | None = None
    time_limit: float | None = None
    rate_limit: RateLimit | None = None

    def policy(self, worker: RetryPolicy) -> RetryPolicy:
        """The worker's policy with this task's strategies in place of its own."""
        if self.stop is None and self.wait is None and self.retry is None:
            return worker
        return replace(
            worker,
            stop=self.stop or worker.stop,
            wait=self.wait or worker.wait,
            retry=self.retry or worker.retry,
        )

    def __bool__(self) -> bool:
        return any(v is not None for v in (self.stop, self.wait, self.retry, self.time_limit, self.rate_limit))

    def describe(self) -> str:
        """`stop=stop_after_attempt(max_attempt_number=8), time_limit=30s`: for status and logs."""
        parts = [f"{name}={describe_strategy(value)}" for name, value in self._strategies() if value is not None]
        if self.time_limit is not None:
            parts.append(f"time_limit={self.time_limit:g}s")
        if self.rate_limit is not None:
            parts.append(f"rate_limit={self.rate_limit.calls}/{self.rate_limit.seconds:g}s")
        return ", ".join(parts)

    def _strategies(self) -> list[tuple[str, object]]:
        return [("stop", self.stop), ("wait", self.wait), ("retry", self.retry)]


#: Where `@task(...)` keeps a function's options: on the function itself, so a worker and a
#: producer read the same, and `queue()` takes the function as it is.
OPTIONS_ATTRIBUTE = "__nobs_amqp_task_options__"
_F = TypeVar("_F", bound=Callable[..., Any])


def task(
    *,
    stop: StopStrategy | None = None,
    wait: WaitStrategy | None = None,
    retry: RetryStrategy | None = None,
    time_limit: float | timedelta | None = None,
    rate_limit: RateLimitOption = None,
) -> Callable[[_F], _F]:
    """Give a task its own retry strategies, time limit and rate limit, over its worker's:

        @task(stop=stop_after_attempt(8), wait=wait_exponential(max=300), time_limit=30, rate_limit="10/s")
        async def call_webhook(request: Webhook) -> None: ...

    `rate_limit` ("N/s", "N/m", "N/h", or a shared `RateLimit`) holds across every process of the
    project, on top of the worker's. The function is returned as it is (its name, signature and
    `queue()` unchanged)."""
    limit = checked_seconds(time_limit, "@task(time_limit=...)", positive=True) if time_limit is not None else None
    rate_limit_of(rate_limit, "task", "@task(rate_limit=...)")  # a bad one fails here, before the function

    def register(fn: _F) -> _F:
        if not inspect.isfunction(fn):
            raise TaskDefinitionError(
                fn, f"@task(...) takes a plain function defined with def, not a {type(fn).__name__}"
            )
        name = f"{fn.__module__}.{fn.__qualname__}".replace("<", "").replace(">", "")
        rate = rate_limit_of(rate_limit, name, f"@task(rate_limit=...) of {name}")
        setattr(fn, OPTIONS_ATTRIBUTE, TaskOptions(stop, wait, retry, limit, rate))
        return fn

    return register


def options_of(fn: object) -> TaskOptions:
    """The options `@task(...)` gave `fn` (none: all None)."""
    options = getattr(fn, OPTIONS_ATTRIBUTE, None)
    return options if isinstance(options, TaskOptions) else TaskOptions()


def reference_of(fn: object) -> str:
    """`module:name` of a function a worker process can import, or TaskDefinitionError."""
    if not inspect.isfunction(fn):
        kind = type(fn).__name__
        raise TaskDefinitionError(fn, f"a task must be a plain function defined with def, not a {kind}")
    module, qualname = fn.__module__, fn.__qualname__
    if qualname == "<lambda>" or qualname.endswith(".<lambda>"):
        raise TaskDefinitionError(fn, "a lambda has no name a worker can import; define it with def at module level")
    if "<locals>" in qualname:
        raise TaskDefinitionError(fn, "it is defined inside another function; move it to module level")
    if "." in qualname:
        raise TaskDefinitionError(fn, "it is a method; tasks are module-level functions")
    if module == "__main__":
        raise TaskDefinitionError(
            fn,
            "it is defined in __main__, which a worker process cannot import; "
            "move it into a module of your package (e.g. myapp/tasks.py)",
        )
    if getattr(sys.modules.get(module), qualname, None) is not fn:
        raise TaskDefinitionError(fn, f"{module}.{qualname} does not refer to it (was it replaced by a decorator?)")
    return f"{module}:{qualname}"


def in_packages(module: str, packages: Iterable[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


@dataclass(frozen=True, slots=True)
class Allowlist:
    """What a project's workers may run: functions of its packages, and functions listed by name."""

    packages: frozenset[str]
    references: frozenset[str]

    @classmethod
    def build(cls, packages: Iterable[str], tasks: Iterable[TaskFunction]) -> Allowlist:
        return cls(frozenset(packages), frozenset(reference_of(fn) for fn in tasks))

    def allows(self, reference: str) -> bool:
        """Whether `reference` lies where the project's tasks live (its kind is checked elsewhere)."""
        return reference in self.references or in_packages(reference.partition(":")[0], self.packages)


class TaskSpec:
    """A task function with its payload type: encodes at the call site, decodes in the worker."""

    def __init__(self, fn: TaskFunction, reference: str) -> None:
        self.fn = fn
        self.reference = reference
        self.payload_type = _payload_type(fn)
        #: What `@task(...)` set over the worker's retry policy and time limit.
        self.options = options_of(fn)
        self.is_async = inspect.iscoroutinefunction(fn)
        self._takes_model = is_request_model(self.payload_type)

    @cached_property
    def adapter(self) -> TypeAdapter[Any]:
        try:
            return TypeAdapter(self.payload_type)  # type: ignore[arg-type]
        except Exception as exc:
            raise TaskDefinitionError(self.fn, f"pydantic cannot validate its payload type ({exc})") from exc

    def encode(self, payload: object) -> bytes:
        expected = self.payload_type
        if self._takes_model:
            if not isinstance(payload, expected):  # type: ignore[arg-type]
                name = getattr(expected, "__qualname__", repr(expected))
                raise PayloadTypeError(
                    self.reference, expected, f"got {type(payload).__qualname__}; pass a {name}(...)"
                )
        else:
            try:
                payload = self.adapter.validate_python(payload, strict=True)
            except ValidationError as exc:
                raise PayloadTypeError(self.reference, expected, _first_error(exc)) from None
        # What adapter.dump_json(payload) does with its defaults, without its argument handling.
        body = self.adapter.serializer.to_json(payload)
        # JSON has no NaN or infinity: pydantic writes them as null, which the worker would then
        # dead-letter as a validation error. Only a body with a null is looked into: most
        # payloads cost one scan of their bytes (find: faster than `in` for short bodies).
        if body.find(b"null") >= 0:
            found = _non_finite(self.adapter.dump_python(payload))
            if found is not None:
                where, value = found
                raise PayloadTypeError(
                    self.reference, expected, f"{where} is {value!r}; JSON has no NaN or infinity: pass a finite number"
                )
        return body

    @cached_property
    def result_adapter(self) -> TypeAdapter[Any] | None:
        """Validates the task's result as its caller reads it: its return annotation, when it has
        one pydantic validates (None: the caller reads plain JSON)."""
        try:
            returns = typing.get_type_hints(self.fn).get("return", Any)
            return None if returns is Any else TypeAdapter(returns)
        except Exception:  # noqa: BLE001 - a forward reference, a type pydantic cannot validate: plain JSON
            return None

    def decode_result(self) -> Callable[[bytes], Any] | None:
        adapter = self.result_adapter
        return adapter.validate_json if adapter is not None else None

    def decode(self, body: bytes) -> object:
        """Raises orjson.JSONDecodeError for bad JSON, ValidationError for a bad payload."""
        return self.adapter.validate_python(orjson.loads(body))


def _non_finite(value: object) -> tuple[str, float] | None:
    """Where a NaN or infinity in `value` (a payload as pydantic dumps it to Python) is, as a path
    (`values[1]`, `by_name.b`; "the payload" for the whole), and what it is; None if there is none.
    Paths are put together only for what is found, and a list of numbers is summed in C first
    (a finite `math.fsum` means finite members), so a long vector costs little."""
    todo: list[tuple[object, tuple[Any, ...]]] = [(value, ())]  # (item, (parent's place, key))
    while todo:
        item, place = todo.pop()
        if isinstance(item, float):
            if not math.isfinite(item):
                return _path(place), item
        elif isinstance(item, dict):
            todo.extend((each, (place, key)) for key, each in item.items())
        elif isinstance(item, list | tuple | set | frozenset) and not _finite_numbers(item):
            todo.extend((each, (place, index)) for index, each in enumerate(item))
    return None


def _finite_numbers(items: Iterable[object]) -> bool:
    """Whether `items` are all numbers, and finite: one pass in C."""
    try:
        return math.isfinite(math.fsum(items))  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):  # not numbers; inf - inf; a sum too big to tell
        return False


def _path(place: tuple[Any, ...]) -> str:
    keys: list[object] = []
    while place:
        place, key = place
        keys.append(key)
    text = ""
    for key in reversed(keys):
        text += (f".{key}" if text else key) if isinstance(key, str) else f"[{key!r}]"
    return text or "the payload"


def is_request_model(tp: object) -> bool:
    """A pydantic model class or a dataclass: what a task of a project package takes."""
    return isinstance(tp, type) and (issubclass(tp, BaseModel) or dataclasses.is_dataclass(tp))


def task_spec(fn: TaskFunction, allowlist: Allowlist) -> TaskSpec:
    """The spec of `fn` if the project's workers would run it, else TaskDefinitionError/UnknownTaskError."""
    reference = reference_of(fn)
    if not allowlist.allows(reference):
        raise UnknownTaskError(reference)
    spec = TaskSpec(fn, reference)
    if reference not in allowlist.references and not is_request_model(spec.payload_type):
        name = getattr(spec.payload_type, "__qualname__", repr(spec.payload_type))
        raise TaskDefinitionError(
            fn,
            f"its parameter is a {name}, and a task takes one request model (a pydantic model or a "
            f"dataclass); to queue it anyway, list it in Project(tasks=[...])",
        )
    spec.adapter  # noqa: B018 - a type pydantic cannot validate fails here, not in the worker
    return spec


class TaskTable:
    """Every task a worker runs, by reference, built once when the worker starts.

    Imports the modules of the project's packages (or exactly `modules`, when given) so a
    message never causes an import later. A module that fails to import is logged once;
    a message naming one of its tasks is dead-lettered with that error.
    """

    def __init__(self, allowlist: Allowlist, explicit: Iterable[TaskFunction], modules: Iterable[str] | None) -> None:
        self._allowlist = allowlist
        self._specs: dict[str, TaskSpec] = {}
        self._broken: dict[str, str] = {}  # module -> why it did not import
        self._rejected: dict[str, str] = {}  # reference -> why it is not a task
        names = list(modules) if modules is not None else _package_modules(allowlist.packages, self._broken)
        for name in names:
            self._load(name)
        for fn in explicit:
            self._add(fn)

    def _load(self, name: str) -> None:
        try:
            module = importlib.import_module(name)
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - a task module's import error costs only its tasks
            self._broken[name] = f"{type(exc).__name__}: {exc}"
            log.warning("task module %s cannot be imported (%s); its tasks will be dead-lettered", name, exc)
            return
        for value in list(vars(module).values()):
            if inspect.isfunction(value) and value.__module__ == name and "." not in value.__qualname__:
                self._add(value)

    def _add(self, fn: TaskFunction) -> None:
        reference = f"{fn.__module__}:{fn.__qualname__}"
        if reference in self._specs:
            return
        try:
            self._specs[reference] = task_spec(fn, self._allowlist)
        except (TaskDefinitionError, UnknownTaskError) as exc:
            self._rejected[reference] = str(exc)

    def __len__(self) -> int:
        return len(self._specs)

    @property
    def references(self) -> Mapping[str, TaskSpec]:
        return self._specs

    def get(self, reference: str) -> TaskSpec:
        """The task `reference` names; UnknownTaskError (never an import) for anything else."""
        spec = self._specs.get(reference)
        if spec is not None:
            return spec
        match = _REFERENCE.match(reference)
        if match is None:
            raise UnknownTaskError(f"{reference!r} is not a task reference (module:function)")
        module = match.group(1)
        if reference in self._rejected:
            raise UnknownTaskError(f"{reference} is not a task: {self._rejected[reference]}")
        if module in self._broken:
            raise UnknownTaskError(f"{reference}: its module failed to import at worker start ({self._broken[module]})")
        if not self._allowlist.allows(reference):
            raise UnknownTaskError(f"{reference} is outside the project's tasks; nothing was imported")
        raise UnknownTaskError(f"{reference} is not a task this worker loaded; nothing was imported")


def _package_modules(packages: Iterable[str], broken: dict[str, str]) -> list[str]:
    """Every module of `packages` (importing each package to find its submodules)."""
    names: list[str] = []
    for package in sorted(packages):
        try:
            root = importlib.import_module(package)
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - reported as the package's tasks failing
            broken[package] = f"{type(exc).__name__}: {exc}"
            log.warning("task package %s cannot be imported (%s)", package, exc)
            continue
        names.append(package)
        path = getattr(root, "__path__", None)
        if path is None:
            continue

        def failed(name: str) -> None:
            broken[name] = "its package failed to import"

        for info in pkgutil.walk_packages(path, prefix=package + ".", onerror=failed):
            if info.name.rsplit(".", 1)[-1] != "__main__":
                names.append(info.name)
    return names


def _payload_type(fn: TaskFunction) -> object:
    params = list(inspect.signature(fn).parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required_other = [p for p in params if p not in positional and p.default is p.empty and p.kind is p.KEYWORD_ONLY]
    if len(positional) != 1 or required_other or any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        raise TaskDefinitionError(fn, "a task takes exactly one parameter, the payload")
    try:
        hints = typing.get_type_hints(fn)
    except Exception as exc:
        raise TaskDefinitionError(fn, f"its annotations cannot be evaluated ({exc})") from exc
    if positional[0].name not in hints:
        raise TaskDefinitionError(
            fn,
            f"annotate its parameter {positional[0].name!r} with the payload type (a pydantic model or dataclass)",
        )
    return hints[positional[0].name]


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(p) for p in error["loc"])
    return f"{where}: {error['msg']}" if where else error["msg"]
