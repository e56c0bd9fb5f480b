"""One virtualenv per benchmarked system, under bench/.envs/<system>, created on first use.

`python bench/envs.py [SYSTEM ...]` creates (or checks) the environments ahead of a run.

Besides the Python systems: the Java client anchor (`java_classic`, `java_quorum`: one program,
bench/java/Anchor.java, compiled with javac against Debian's librabbitmq-client-java into
bench/.envs/java/classes) and `plot`, the env with matplotlib that draws the plots (not a system).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
ENVS = BENCH / ".envs"
REQUIREMENTS = BENCH / "requirements"
SYSTEMS = ("nobs_amqp", "aiopika", "dramatiq", "celery", "faststream", "taskiq")
ANCHORS = ("java_classic", "java_quorum")  # the Java client against a classic / a quorum queue
TOOLS = ("plot",)
INSTALL_TIMEOUT = 900.0
JAVA_SOURCE = BENCH / "java" / "Anchor.java"
#: Where Debian's packages put their jars (librabbitmq-client-java, libslf4j-java); or set
#: BENCH_JAVA_CLASSPATH to the amqp-client and slf4j-api jars (os.pathsep-separated).
JAVA_JARS = Path("/usr/share/java")
JAVA_HINT = "apt-get install default-jdk-headless librabbitmq-client-java"


class EnvError(Exception):
    """A system's environment could not be created or used; the message says why."""


@dataclass(frozen=True)
class Env:
    system: str
    path: Path

    @property
    def java(self) -> bool:
        return self.system in ANCHORS

    @property
    def python(self) -> Path:
        """The env's Python; the anchor's adapter is stdlib only and runs with the harness's."""
        return Path(sys.executable) if self.java else self.path / "bin" / "python"

    @property
    def marker(self) -> Path:
        """Written once every package installed, so a half-made env is never taken for a good one."""
        return self.path / ".bench-ready"

    def exists(self) -> bool:
        """Created, and installed from the requirements as they are now."""
        return self.python.is_file() and self.marker.is_file() and self.marker.read_text() == _fingerprint(self.system)

    def adapter(self) -> Path:
        return BENCH / "systems" / ("java.py" if self.java else f"{self.system}.py")

    def command(self) -> list[str]:
        """How to run the system's adapter: then its command and options."""
        queue_type = ["--queue-type", self.system.removeprefix("java_")] if self.java else []
        return [str(self.python), str(self.adapter()), *queue_type]


def env_for(system: str) -> Env:
    if system in ANCHORS:
        return Env(system, ENVS / "java")
    if system not in (*SYSTEMS, *TOOLS):
        raise EnvError(f"unknown system {system!r} (known: {', '.join((*SYSTEMS, *ANCHORS))})")
    return Env(system, ENVS / system)


def _fingerprint(system: str) -> str:
    """What the env was installed from: a changed requirements file (or the anchor's source, or the
    jars it is compiled against) makes a new env."""
    if system in ANCHORS:
        try:
            jars = os.pathsep.join(str(j) for j in java_jars())
        except EnvError:
            jars = "?"
        text = JAVA_SOURCE.read_text() + jars
    else:
        text = (REQUIREMENTS / f"{system}.txt").read_text()
    return hashlib.sha256(text.encode()).hexdigest() + "\n"


def java_jars() -> list[Path]:
    """The jars the anchor needs: Debian's amqp-client and slf4j-api (plus slf4j-nop, if there, to
    silence slf4j's warning); EnvError naming what is missing."""
    given = os.environ.get("BENCH_JAVA_CLASSPATH")
    if given:
        return [Path(p) for p in given.split(os.pathsep) if p]
    jars = [JAVA_JARS / "amqp-client.jar", JAVA_JARS / "slf4j-api.jar"]
    missing = [j.name for j in jars if not j.is_file()]
    if missing:
        raise EnvError(f"no {' or '.join(missing)} in {JAVA_JARS} ({JAVA_HINT})")
    quiet = JAVA_JARS / "slf4j-nop.jar"
    return [*jars, *([quiet] if quiet.is_file() else [])]


def java_classpath() -> str:
    return os.pathsep.join([str(ENVS / "java" / "classes"), *(str(j) for j in java_jars())])


def _ensure_java(env: Env) -> Env:
    missing = [tool for tool in ("java", "javac") if shutil.which(tool) is None]
    if missing:
        raise EnvError(f"no {' or '.join(missing)} on PATH ({JAVA_HINT})")
    jars = java_jars()
    classes = env.path / "classes"
    shutil.rmtree(classes, ignore_errors=True)
    classes.mkdir(parents=True)
    env.marker.unlink(missing_ok=True)
    command = ["javac", "-d", str(classes), "-cp", os.pathsep.join(map(str, jars)), str(JAVA_SOURCE)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    except subprocess.TimeoutExpired:
        raise EnvError("javac timed out after 300 s") from None
    if done.returncode != 0:
        raise EnvError(f"javac failed: {' | '.join(done.stderr.strip().splitlines()[-3:])}")
    env.marker.write_text(_fingerprint(env.system))
    return env


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
    if env.java:
        return _ensure_java(env)
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


def _java_versions() -> dict[str, str]:
    found: dict[str, str] = {}
    done = subprocess.run(["java", "-version"], capture_output=True, text=True, timeout=60, check=False)
    found["java"] = (done.stderr.strip().splitlines() or ["?"])[0]
    for jar in java_jars():
        try:
            with zipfile.ZipFile(jar) as archive:
                manifest = archive.read("META-INF/MANIFEST.MF").decode(errors="replace")
        except (OSError, KeyError, zipfile.BadZipFile):
            continue
        for line in manifest.splitlines():
            if line.startswith(("Implementation-Version:", "Bundle-Version:")):
                found[jar.stem] = line.partition(":")[2].strip()
                break
    return found


def versions(env: Env) -> dict[str, str]:
    """name -> version of every package installed in `env`."""
    if env.java:
        try:
            return _java_versions()
        except (OSError, EnvError, subprocess.SubprocessError):
            return {}
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
    for system in argv or [*SYSTEMS, *ANCHORS, *TOOLS]:
        try:
            env = ensure(system)
        except EnvError as exc:
            print(f"{system}: unavailable: {exc}")
            status = 1
            continue
        print(f"{system}: {env.path.relative_to(BENCH)}")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
