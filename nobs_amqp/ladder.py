"""The binary delay ladder: any delay from 1 s to ~8.5 years with a fixed topology.

Level `NN` is a queue whose messages expire after exactly 2**NN seconds and an
exchange in front of it. A delayed message's routing key spells the remaining
delay in bits, most significant first, followed by the destination queue:

    0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.1.0.1.priority_queue   (5 s)

Topic bindings send it through exactly the levels whose bit is set: the exchange of
level NN routes a key with bit NN set into its queue, and one with the bit clear on
to the exchange below. When a message expires in level NN's queue it is
dead-lettered, with its routing key unchanged, to the exchange of level NN-1, and
from level 0 to the delivery exchange, which hands it to the destination queue.
Every queue holds messages of one TTL, so expiry is FIFO and nothing blocks the
head; nothing waits in a worker's memory; and the ladder is durable, so a delay
survives restarts of workers and broker.

Two traps are designed out: messages are always published fresh (no `x-death`
history is carried into the ladder, so dead-letter cycle detection never drops
one), and the delivery exchange has an alternate exchange, so a message whose
destination queue was deleted lands in `P.delay.unroutable` instead of wedging
a level queue that dead-letters at least once.
"""

from __future__ import annotations

import math
import numbers
from datetime import timedelta

from .errors import ConfigurationError
from .topology import Binding, ExchangeSpec, QueueSpec, Topology, quorum_dead_letter_arguments

LEVELS = 28
MAX_DELAY_SECONDS = 2**LEVELS - 1


def level_name(project: str, level: int) -> str:
    return f"{project}.delay.{level:02d}"


def delivery_exchange(project: str) -> str:
    return f"{project}.delay.deliver"


def unroutable_name(project: str) -> str:
    return f"{project}.delay.unroutable"


def checked_seconds(value: float | timedelta, what: str = "delay", *, positive: bool = False) -> float:
    """`value` (a number of seconds or a timedelta) in seconds. ConfigurationError naming the allowed
    range for anything else: a string, a bool, nan, infinity, a negative value (zero too when
    `positive`), or more than the delay ladder holds (MAX_DELAY_SECONDS, about 8.5 years)."""
    span = "more than 0 and at most" if positive else "0 to"
    allowed = f"{what} must be {span} {MAX_DELAY_SECONDS} seconds (about 8.5 years), as a number or a timedelta"
    shown = repr(value)[:60]
    if isinstance(value, timedelta):
        result = value.total_seconds()
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        try:
            result = float(value)
        except OverflowError:
            raise ConfigurationError(f"{allowed} (got {shown})") from None
    else:
        raise ConfigurationError(f"{allowed} (got {type(value).__name__} {shown})")
    if not (result > 0 if positive else result >= 0) or not result <= MAX_DELAY_SECONDS:  # nan fails both
        raise ConfigurationError(f"{allowed} (got {shown})")
    return result


def delay_seconds(delay: float) -> int:
    """Whole seconds the ladder holds a message for `delay` seconds: never less than asked.
    The one place a delay is rounded; what it returns feeds both the ETA header and the ladder."""
    if delay <= 0:
        return 0
    seconds = math.ceil(delay - 1e-9)
    if seconds > MAX_DELAY_SECONDS:
        raise ConfigurationError(f"a delay of {delay:.0f} s is longer than the maximum {MAX_DELAY_SECONDS} s")
    return seconds


def ladder_delay(value: float | timedelta, what: str = "delay") -> int:
    """A user's delay (seconds or timedelta), checked (ConfigurationError), in the ladder's whole seconds."""
    return delay_seconds(checked_seconds(value, what))


def routing_key(seconds: int, destination: str) -> str:
    bits = format(seconds, f"0{LEVELS}b")
    return ".".join(bits) + "." + destination


def route(project: str, seconds: int, destination: str) -> tuple[str, str]:
    """The exchange and routing key that deliver into `destination` after `seconds` (>= 1)."""
    top = seconds.bit_length() - 1
    return level_name(project, top), routing_key(seconds, destination)


def _pattern(level: int, bit: str) -> str:
    return ".".join(["*"] * (LEVELS - 1 - level) + [bit, "#"])


def ladder_topology(project: str) -> Topology:
    """The levels, the delivery exchange and the unroutable catch-all of one project."""
    exchanges = [
        ExchangeSpec(unroutable_name(project), "fanout"),
        ExchangeSpec(
            delivery_exchange(project),
            "topic",
            {"alternate-exchange": unroutable_name(project)},
        ),
    ]
    queues = [QueueSpec(unroutable_name(project), {"x-queue-type": "quorum"})]
    bindings = [Binding(unroutable_name(project), unroutable_name(project), "")]
    for level in range(LEVELS):
        name = level_name(project, level)
        below = level_name(project, level - 1) if level else delivery_exchange(project)
        exchanges.append(ExchangeSpec(name, "topic"))
        queues.append(
            QueueSpec(
                name,
                {
                    "x-queue-type": "quorum",
                    "x-message-ttl": 1000 * 2**level,
                    "x-dead-letter-exchange": below,
                    **quorum_dead_letter_arguments(),
                },
            )
        )
        bindings.append(Binding(name, name, _pattern(level, "1")))
        bindings.append(Binding(name, below, _pattern(level, "0"), to_exchange=True))
    return Topology(tuple(exchanges), tuple(queues), tuple(bindings))


def delivery_binding(project: str, destination: str) -> Topology:
    """Bind a worker's queue to the delivery exchange: exactly LEVELS bit words, then its name."""
    key = ".".join(["*"] * LEVELS) + "." + destination
    return Topology(bindings=(Binding(delivery_exchange(project), destination, key),))
