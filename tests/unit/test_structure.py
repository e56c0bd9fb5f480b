"""The package's structure, checked: no import cycles, nothing above the transport seam that
knows which broker it has, and `queue()` typed so that mypy catches a payload of the wrong type."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

PACKAGE = Path(__file__).parents[2] / "nobs_amqp"
#: The layers below the core, each a folder; `core` is every module at the top.
LAYERS = ("transports", "observe", "ops", "cli")
#: What every layer may use: the words of the product (errors, the message, the topology, URLs,
#: the management API's client).
FOUNDATION = {"errors", "message", "topology", "urls", "management"}
#: Which layers each layer may import (besides itself and the foundation).
ALLOWED = {
    "transports": set(),
    "observe": set(),
    "core": {"transports", "observe"},
    "ops": {"core", "transports", "observe"},
    "cli": {"core", "transports", "observe", "ops"},
}
#: Outside `transports/`, what of it may be imported: the seam and the factory, nothing that
#: names a broker. The pytest plugin's `nobs_amqp_memory` fixture hands out the memory broker.
SEAM = {"transports", "transports.base"}
SEAM_EXCEPTIONS = {("pytest_plugin", "transports.memory")}


def _modules() -> dict[str, Path]:
    """Every module by its dotted name below the package (`transports.amqp.link`; `cli` for
    `cli/__init__.py`, `""` for the package's own `__init__`)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _imports() -> dict[str, set[str]]:
    """For every module, the package modules it imports (at the top, in a function or under
    TYPE_CHECKING alike), by dotted name: `from . import x` counts as module `x` where it is one."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        here = name.split(".") if path.name == "__init__.py" and name else name.split(".")[:-1]
        if not name:
            here = []
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                base = here[: len(here) - node.level + 1]
            elif (node.module or "").split(".")[0] == "nobs_amqp":
                base = []
            else:
                continue
            module = [*base, *(node.module or "").split(".")] if node.level else (node.module or "").split(".")[1:]
            module = [part for part in module if part]
            for alias in node.names:
                candidate = ".".join([*module, alias.name])
                imported.add(candidate if candidate in modules else ".".join(module))
        graph[name] = imported - {name}
    return graph


def _layer(module: str) -> str:
    top = module.split(".")[0]
    return top if top in LAYERS else "core"


def test_no_module_imports_a_module_that_imports_it_back() -> None:
    graph = _imports()

    def reachable(start: str) -> set[str]:
        seen: set[str] = set()
        todo = [start]
        while todo:
            for module in graph.get(todo.pop(), set()) - seen:
                seen.add(module)
                todo.append(module)
        return seen

    cycles = sorted(module for module in graph if module in reachable(module))
    assert not cycles, f"modules on an import cycle: {cycles}"
    assert {"project", "session", "asgi", "outcome", "consumer", "transports.amqp.transport"} <= set(graph)


def test_each_layer_imports_only_the_layers_below_it() -> None:
    crossings = []
    for module, imported in _imports().items():
        layer = _layer(module)
        for target in imported:
            if target in FOUNDATION or _layer(target) == layer or _layer(target) in ALLOWED[layer]:
                continue
            if module in {"", "__main__", "metrics", "tracing", "dlq"}:  # the package's entry points
                continue
            crossings.append(f"{module or '__init__'} ({layer}) imports {target} ({_layer(target)})")
    assert not crossings, crossings


def test_only_transports_names_a_transport_module() -> None:
    leaks = []
    for module, imported in _imports().items():
        if _layer(module) == "transports":
            continue
        for target in imported:
            if _layer(target) == "transports" and target not in SEAM and (module, target) not in SEAM_EXCEPTIONS:
                leaks.append(f"{module} imports {target}")
    assert not leaks, leaks


def test_nothing_above_the_seam_knows_its_broker() -> None:
    leaks = []
    for module, path in _modules().items():
        if _layer(module) == "transports":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            named = {"MemoryTransport", "AmqpTransport"} | ({"MEMORY_SCHEME"} if module != "urls" else set())
            if isinstance(node, ast.Name) and node.id in named:
                leaks.append(f"{module}:{node.lineno} {node.id}")
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and module != "urls":
                code_literal = node.value.startswith("memory://") and len(node.value) < 40
                if code_literal:
                    leaks.append(f"{module}:{node.lineno} {node.value!r}")
    assert not leaks, leaks


def test_the_documented_imports_work() -> None:
    """The README's imports and the entry points (console script, pytest plugin) keep working."""
    import importlib

    for module, names in {
        "nobs_amqp": [
            "Project",
            "Worker",
            "Observer",
            "TaskRun",
            "Publish",
            "Fate",
            "task",
            "Retry",
            "Reject",
            "Schedule",
            "SyncProducer",
        ],
        "nobs_amqp.models": ["Project", "Worker"],
        "nobs_amqp.testing": ["drain", "drain_sync", "use_broker"],
        "nobs_amqp.metrics": ["PrometheusMetrics"],
        "nobs_amqp.tracing": ["Tracing"],
        "nobs_amqp.dlq": ["peek", "find", "count", "replay", "purge"],
        "nobs_amqp.cli": ["main"],
        "nobs_amqp.pytest_plugin": ["nobs_amqp_memory"],
    }.items():
        imported = importlib.import_module(module)
        missing = [name for name in names if not hasattr(imported, name)]
        assert not missing, (module, missing)


def test_dead_letter_reasons_are_one_typed_set() -> None:
    """Reasons are written as `Reason.X`, never as string literals, outside message.py."""
    from nobs_amqp.message import Reason

    values = {reason.value for reason in Reason}
    found = []
    for module, path in _modules().items():
        if module in {"message", "transports.memory"}:  # the memory broker writes the broker's own x-death reasons
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in values:
                found.append(f"{module}:{node.lineno} {node.value!r}")
    assert not found, found


def test_mypy_flags_a_payload_of_another_task(tmp_path: Path) -> None:
    source = tmp_path / "service.py"
    source.write_text(
        textwrap.dedent(
            """
            from pydantic import BaseModel

            from nobs_amqp import Project, Worker


            class SendEmail(BaseModel):
                email: str


            class ResizeImage(BaseModel):
                url: str


            async def send_email(request: SendEmail) -> None: ...


            def resize(request: ResizeImage) -> int:
                return 1


            worker = Worker("w")
            project = Project(name="p", workers=[worker])


            async def main() -> None:
                await worker.queue(send_email, SendEmail(email="a@b.c"))
                await worker.queue(resize, ResizeImage(url="x"), delay=5)
                await worker.queue_many(send_email, [SendEmail(email="a@b.c")])
                await worker.queue(send_email, ResizeImage(url="x"))  # wrong payload
                await worker.queue_many(resize, [SendEmail(email="a@b.c")])  # wrong payload
            """
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-error-summary", "--hide-error-context", str(source)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=PACKAGE.parent,
        check=False,
    )
    flagged = sorted({int(line.split(":")[1]) for line in result.stdout.splitlines() if ": error:" in line})
    wrong = [n for n, line in enumerate(source.read_text().splitlines(), 1) if "wrong payload" in line]
    assert result.returncode == 1, result.stdout + result.stderr
    assert flagged == wrong, result.stdout
