"""What /proc says about processes: the harness's one reader of it.

Every reading may race with the process exiting: a reader returns None, 0 or
leaves the process out rather than raise, and callers treat a zombie as gone
(an orphan waits a while for init to reap it).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")  # the unit of /proc/PID/stat's CPU times


@dataclass(frozen=True, slots=True)
class ProcStat:
    """The fields of /proc/PID/stat the harness uses."""

    state: str  # "R", "S", ... "Z" for a zombie
    ppid: int
    session: int
    cpu_ticks: int  # utime + stime, in CLOCK_TICKS

    @property
    def zombie(self) -> bool:
        return self.state == "Z"


def read_stat(pid: int) -> ProcStat | None:
    """pid's /proc/PID/stat; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            text = stat.read().decode(errors="replace")
    except OSError:
        return None
    # The fields after "(comm)": comm may itself hold spaces and parentheses.
    fields = text.rsplit(")", 1)[1].split()
    return ProcStat(
        state=fields[0], ppid=int(fields[1]), session=int(fields[3]), cpu_ticks=int(fields[11]) + int(fields[12])
    )


def all_pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def pid_alive(pid: int) -> bool:
    """True unless pid is gone or a zombie."""
    stat = read_stat(pid)
    return stat is not None and not stat.zombie


def children_of(parent: int) -> list[int]:
    """Live processes whose parent is `parent`, sorted (not every kernel has
    /proc/PID/task/TID/children)."""
    return sorted(pid for pid, stat in _live_stats() if stat.ppid == parent)


def session_members(sid: int) -> list[int]:
    """Live processes in session sid, including descendants that left its process group."""
    return [pid for pid, stat in _live_stats() if stat.session == sid]


def cmdline(pid: int) -> str | None:
    """/proc/PID/cmdline as text, NULs as spaces: the title setproctitle set; None once gone."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def cpu_ticks(pids: Iterable[int]) -> int:
    """User and system CPU of these processes so far, in CLOCK_TICKS (those gone count 0)."""
    return sum(stat.cpu_ticks for stat in map(read_stat, pids) if stat is not None)


def cpu_ns(pid: int) -> int:
    """CPU time of every thread of pid, in ns (the scheduler's exact runtime,
    not whole ticks); 0 once gone."""
    total = 0
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for tid in threads:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as schedstat:
                total += int(schedstat.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total


def _live_stats() -> Iterable[tuple[int, ProcStat]]:
    for pid in all_pids():
        stat = read_stat(pid)
        if stat is not None and not stat.zombie:
            yield pid, stat
