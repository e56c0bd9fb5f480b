"""The Java client anchor's adapter: runs bench/java/Anchor.java's classes (built by bench/envs.py)
with the adapters' protocol; the anchor speaks it itself, so this only execs the JVM.

    java.py --queue-type classic|quorum produce|worker|count ...

Stdlib only: it runs with the harness's Python.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import envs


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[0] != "--queue-type":
        raise SystemExit("usage: java.py --queue-type classic|quorum COMMAND [OPTIONS]")
    queue_type, command = argv[1], argv[2:]
    java = shutil.which("java")
    if java is None:
        raise SystemExit(f"no java on PATH ({envs.JAVA_HINT})")
    sys.stdout.flush()
    os.execv(java, [java, "-cp", envs.java_classpath(), "Anchor", *command, "--queue-type", queue_type])


if __name__ == "__main__":
    main(sys.argv[1:])
