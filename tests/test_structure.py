"""The package's structure, checked: no import cycles, nothing above the transport seam that
knows which broker it has, and `queue()` typed so that mypy catches a payload of the wrong type."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "nobs_amqp"
#: The modules that may name a transport class: the two transports and the one place that picks one.
TRANSPORT_OWNERS = {"amqp", "memory", "session"}


def _relative_imports() -> dict[str, set[str]]:
    """For every module of the package, the modules it imports: at the top, in a function, or
    under TYPE_CHECKING alike."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.glob("*.py"):
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    imported.add(node.module.split(".")[0])
                else:
                    imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("nobs_amqp."):
                imported.add((node.module or "").split(".")[1])
        graph[path.stem] = imported
    return graph


def test_no_module_imports_a_module_that_imports_it_back() -> None:
    graph = _relative_imports()

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
    assert {"project", "session", "asgi", "outcome", "consumer"} <= set(graph)


def test_nothing_above_the_seam_knows_its_broker() -> None:
    leaks = []
    for path in PACKAGE.glob("*.py"):
        if path.stem in TRANSPORT_OWNERS:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            named = {"MemoryTransport", "AmqpTransport"} | ({"MEMORY_SCHEME"} if path.stem != "urls" else set())
            if isinstance(node, ast.Name) and node.id in named:
                leaks.append(f"{path.name}:{node.lineno} {node.id}")
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and path.stem != "urls":
                code_literal = node.value.startswith("memory://") and len(node.value) < 40
                if code_literal:
                    leaks.append(f"{path.name}:{node.lineno} {node.value!r}")
    assert not leaks, leaks


def test_dead_letter_reasons_are_one_typed_set() -> None:
    """Reasons are written as `Reason.X`, never as string literals, outside message.py."""
    from nobs_amqp.message import Reason

    values = {reason.value for reason in Reason}
    found = []
    for path in PACKAGE.glob("*.py"):
        if path.stem in {"message", "memory"}:  # memory.py writes the broker's own x-death reasons
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in values:
                found.append(f"{path.name}:{node.lineno} {node.value!r}")
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
