"""Tasks: how a function becomes a reference on the wire, and back, safely.

A message names its task as `module:function`. A worker only imports and calls a
reference that the project allows: a module-level function defined in one of the
project's packages, or one listed explicitly. Anything else (`os:system`, a module
outside the project, a builtin, something re-exported from elsewhere) is never
imported or called.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, is_dataclass
from functools import cached_property
from typing import Any

import orjson
from pydantic import TypeAdapter, ValidationError

from .errors import PayloadTypeError, TaskDefinitionError

TaskFunction = Callable[[Any], Any]

_REFERENCE = re.compile(r"^([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):([A-Za-z_]\w*)$")


class UnknownTaskError(Exception):
    """A message names a task the project does not allow or that does not exist."""


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


@dataclass(frozen=True, slots=True)
class Allowlist:
    """What a worker may import: whole packages, and single references."""

    packages: frozenset[str]
    references: frozenset[str]

    @classmethod
    def build(cls, packages: Iterable[str], tasks: Iterable[TaskFunction]) -> Allowlist:
        return cls(frozenset(packages), frozenset(reference_of(fn) for fn in tasks))

    def allows(self, reference: str) -> bool:
        if reference in self.references:
            return True
        module = reference.partition(":")[0]
        return any(module == p or module.startswith(p + ".") for p in self.packages)


def resolve(reference: str, allowlist: Allowlist) -> TaskFunction:
    """The function a message names, imported only if the allowlist allows it."""
    match = _REFERENCE.match(reference)
    if match is None:
        raise UnknownTaskError(f"{reference!r} is not a task reference (module:function)")
    if not allowlist.allows(reference):
        raise UnknownTaskError(f"{reference} is outside the project's allowed tasks; it was not imported")
    module_name, name = match.groups()
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UnknownTaskError(f"{reference}: module cannot be imported ({exc})") from exc
    fn = getattr(module, name, None)
    if not inspect.isfunction(fn) or fn.__module__ != module_name or fn.__qualname__ != name:
        raise UnknownTaskError(f"{reference} is not a function defined in {module_name}")
    return fn


class TaskSpec:
    """A task function with its payload type: encodes at the call site, decodes in the worker."""

    def __init__(self, fn: TaskFunction, reference: str) -> None:
        self.fn = fn
        self.reference = reference
        self.payload_type = _payload_type(fn)
        self.is_async = inspect.iscoroutinefunction(fn)

    @cached_property
    def adapter(self) -> TypeAdapter[Any]:
        return TypeAdapter(self.payload_type)  # type: ignore[arg-type]

    def encode(self, payload: object) -> bytes:
        expected = self.payload_type
        if isinstance(expected, type) and (_is_model(expected) or is_dataclass(expected)):
            if not isinstance(payload, expected):
                raise PayloadTypeError(
                    self.reference,
                    expected,
                    f"got {type(payload).__qualname__}; pass a {expected.__qualname__}(...)",
                )
        else:
            try:
                payload = self.adapter.validate_python(payload, strict=True)
            except ValidationError as exc:
                raise PayloadTypeError(self.reference, expected, _first_error(exc)) from None
        return self.adapter.dump_json(payload)

    def decode(self, body: bytes) -> object:
        """Raises orjson.JSONDecodeError for bad JSON, ValidationError for a bad payload."""
        return self.adapter.validate_python(orjson.loads(body))


def _is_model(tp: type) -> bool:
    return hasattr(tp, "model_validate")


def _payload_type(fn: TaskFunction) -> object:
    params = list(inspect.signature(fn).parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required_other = [p for p in params if p not in positional and p.default is p.empty and p.kind is p.KEYWORD_ONLY]
    if len(positional) != 1 or required_other:
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
