"""One virtualenv per benchmarked system, under bench/.envs/<system>, created on first use.

`python bench/envs.py [SYSTEM ...]` creates (or checks) the environments ahead of a run.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import venv
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
ENVS = BENCH / ".envs"
REQUIREMENTS = BENCH / "requirements"
SYSTEMS = ("nobs_amqp", "aiopika", "dramatiq", "celery", "faststream", "taskiq")
INSTALL_TIMEOUT = 900.0


class EnvError(Exception):
    """A system's environment could not be created or used; the message says why."""


@dataclass(frozen=True)
class Env:
    system: str
    path: Path

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    @property
    def marker(self) -> Path:
        """Written once every package installed, so a half-made env is never taken for a good one."""
        return self.path / ".bench-ready"

    def exists(self) -> bool:
        """Created, and installed from the requirements as they are now."""
        return self.python.is_file() and self.marker.is_file() and self.marker.read_text() == _fingerprint(self.system)

    def adapter(self) -> Path:
        return BENCH / "systems" / f"{self.system}.py"


def env_for(system: str) -> Env:
    if system not in SYSTEMS:
        raise EnvError(f"unknown system {system!r} (known: {', '.join(SYSTEMS)})")
    return Env(system, ENVS / system)


def _fingerprint(system: str) -> str:
    """What the env was installed from: a changed requirements file makes a new env."""
    text = (REQUIREMENTS / f"{system}.txt").read_text()
    return hashlib.sha256(text.encode()).hexdigest() + "\n"


def _pip_args(system: str) -> list[str]:
    args = ["-r", str(REQUIREMENTS / f"{system}.txt")]
    if system == "nobs_amqp":
        args += ["-e", str(REPO)]
    return args


def ensure(system: str, *, log: bool = True) -> Env:
    """The env of `system`, created and installed if missing; EnvError with pip's last words if that fails."""
    env = env_for(system)
    if env.exists():
        return env
    if log:
        print(f"[envs] creating {env.path.relative_to(BENCH)} for {system} (first use)", file=sys.stderr, flush=True)
    venv.EnvBuilder(with_pip=True, clear=True).create(env.path)
    command = [str(env.python), "-m", "pip", "install", "--quiet", *_pip_args(system)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=INSTALL_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise EnvError(f"pip install timed out after {INSTALL_TIMEOUT:.0f} s") from None
    if done.returncode != 0:
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise EnvError(f"pip install failed: {tail}")
    env.marker.write_text(_fingerprint(system))
    return env


def versions(env: Env) -> dict[str, str]:
    """name -> version of every package installed in `env`."""
    script = "import importlib.metadata as m, json; print(json.dumps({d.name: d.version for d in m.distributions()}))"
    done = subprocess.run(
        [str(env.python), "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        return {}
    return dict(sorted(json.loads(done.stdout).items()))


def main(argv: list[str]) -> int:
    status = 0
    for system in argv or list(SYSTEMS):
        try:
            env = ensure(system)
        except EnvError as exc:
            print(f"{system}: unavailable: {exc}")
            status = 1
            continue
        print(f"{system}: {env.python.relative_to(BENCH)}")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
