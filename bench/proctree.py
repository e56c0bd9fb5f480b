"""CPU time and peak RSS of a process and all its descendants, sampled from /proc (Linux)."""

from __future__ import annotations

import os
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            text = (task / "children").read_text()
            kids += [int(k) for k in text.split()]
    except OSError:
        return kids
    return kids


def _cpu_seconds(pid: int) -> float | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rpartition(")")[2].split()
    # fields[0] is the state (field 3 of stat); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _peak_rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class TreeSampler:
    """Remembers, per process ever seen in the tree, its last CPU time and peak RSS.

    A process that exits keeps the values of its last sample, so short-lived children count
    (up to one sampling interval of their CPU time).
    """

    def __init__(self, root: int) -> None:
        self.root = root
        self._cpu: dict[int, float] = {}
        self._rss: dict[int, int] = {}

    def pids(self) -> list[int]:
        seen: list[int] = []
        todo = [self.root]
        while todo and len(seen) < 1000:
            pid = todo.pop()
            seen.append(pid)
            todo += _children(pid)
        return seen

    def sample(self) -> None:
        for pid in self.pids():
            cpu = _cpu_seconds(pid)
            if cpu is not None:
                self._cpu[pid] = max(cpu, self._cpu.get(pid, 0.0))
            rss = _peak_rss_kib(pid)
            if rss is not None:
                self._rss[pid] = max(rss, self._rss.get(pid, 0))

    @property
    def cpu_seconds(self) -> float:
        return sum(self._cpu.values())

    @property
    def peak_rss_mib(self) -> float:
        """Sum over the tree of each process's VmHWM (an upper bound of the tree's peak)."""
        return sum(self._rss.values()) / 1024

    @property
    def processes(self) -> int:
        return len(self._cpu)
