"""Chains: run B after A succeeded, then C after B, as `queue(a, payload, then=[Step(...)])` asks.

The steps after a task travel in its `x-nobs-chain` header (JSON, signed like every `x-nobs-*`
header): `{"step": 1, "of": 3, "next": [{"worker": ..., "task": ..., "body": ...}, ...]}`, each
`body` the JSON of that step's payload, or null for "the previous step's result". Everything
is checked at the call site as `queue()` checks a task: each worker is one of the project's,
each function a task it allows, each payload of its type. When a step succeeds, its worker
queues the next one (confirmed) to the named worker, only if that is one of its project's
workers, carrying the rest; the receiving worker checks the task and payload as it checks any
message. A step that fails for good ends the chain there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import orjson

from .errors import ChainError, ConfigurationError, NobsAmqpError
from .message import CHAIN, MAX_CHAIN_HEADER, Message
from .tasks import TaskFunction, TaskSpec


class Named(Protocol):
    """A step's worker (a `Worker`)."""

    @property
    def name(self) -> str: ...


class Home(Protocol):
    """What checking a chain needs of the project (a `Project`)."""

    def spec(self, fn: TaskFunction) -> TaskSpec: ...

    def worker(self, name: str) -> Any: ...


P = TypeVar("P")


class _Previous:
    def __repr__(self) -> str:
        return "PREVIOUS"


#: A step's payload when it is the previous step's result (what `Step(worker, fn)` means).
PREVIOUS: Any = _Previous()


class Step(Generic[P]):
    """`fn(payload)` on `worker`, after the step before it succeeded. Without `payload`, the
    previous step's return value is its payload (validated by its worker as `fn`'s input)."""

    __slots__ = ("fn", "payload", "worker")

    def __init__(self, worker: Named, fn: Callable[[P], object], payload: P = PREVIOUS) -> None:
        self.worker = worker
        self.fn = fn
        self.payload = payload

    def __repr__(self) -> str:
        return f"Step({self.worker!r}, {getattr(self.fn, '__qualname__', self.fn)!r})"


@dataclass(frozen=True, slots=True)
class Next:
    worker: str
    task: str
    body: bytes | None  # None: the previous step's result


@dataclass(frozen=True, slots=True)
class Chain:
    """Where a message is in its chain (step `step` of `of`) and the steps after it."""

    step: int
    of: int
    rest: tuple[Next, ...]

    @property
    def place(self) -> str:
        return f"{self.step} of {self.of}"

    def header(self) -> str:
        steps = [
            {"worker": n.worker, "task": n.task, "body": None if n.body is None else n.body.decode()} for n in self.rest
        ]
        return orjson.dumps({"step": self.step, "of": self.of, "next": steps}).decode()

    def after(self) -> Chain:
        """The chain as the next step's message carries it."""
        return Chain(self.step + 1, self.of, self.rest[1:])


def build(home: Home, steps: Sequence[Step[Any]]) -> tuple[Chain, Callable[[bytes], Any] | None]:
    """The chain of a first step followed by `steps`, checked as `queue()` checks a task; and how
    its caller reads the last step's result."""
    rest = []
    decode = None
    for number, step in enumerate(steps, start=2):
        if not isinstance(step, Step):
            raise ChainError(f"step {number} of the chain is a {type(step).__name__}: pass Step(worker, fn, payload)")
        try:
            known = home.worker(step.worker.name)
        except ConfigurationError:
            known = None
        if known is not step.worker:
            raise ChainError(
                f"step {number}: worker {step.worker.name!r} is not one of the project's workers: add it to "
                f"Project(workers=[...])"
            )
        spec = home.spec(step.fn)
        body = None if step.payload is PREVIOUS else spec.encode(step.payload)
        rest.append(Next(step.worker.name, spec.reference, body))
        decode = spec.decode_result()
    chain = Chain(1, len(rest) + 1, tuple(rest))
    if len(chain.header()) > MAX_CHAIN_HEADER:
        raise ChainError(
            f"the chain's steps take {len(chain.header())} bytes, more than {MAX_CHAIN_HEADER}: pass smaller "
            f"payloads (an id to look up, not the data)"
        )
    return chain, decode


def read(message: Message) -> Chain | None:
    """The chain `message` is in, from its header; None without one. NobsAmqpError if unreadable."""
    raw = message.headers.get(CHAIN)
    if raw is None:
        return None
    try:
        found = orjson.loads(raw) if isinstance(raw, str) else None
        step, of, steps = found["step"], found["of"], found["next"]  # type: ignore[index]
        rest = tuple(
            Next(s["worker"], s["task"], None if s["body"] is None else str(s["body"]).encode()) for s in steps
        )
        names = [name for n in rest for name in (n.worker, n.task)]
        if not (isinstance(step, int) and isinstance(of, int) and all(isinstance(n, str) for n in names)):
            raise TypeError("not numbers and names")
    except (orjson.JSONDecodeError, TypeError, KeyError) as exc:
        raise NobsAmqpError(f"its {CHAIN} header cannot be read ({exc})") from exc
    return Chain(step, of, rest)
