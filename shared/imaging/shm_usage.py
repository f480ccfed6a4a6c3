"""The frames waiting in this host's /dev/shm against SHM_BUDGET_BYTES, as the
supervisor reports them (metrics, the lease that `status` and the dashboard read).

    /dev/shm/<SHM_NAME_PREFIX>* --one listing, at most every READ_SECONDS--> ShmUsage

Counted as producers count it (image_result_client.flow.shm_bytes_waiting), so
the figure an operator sees is the one the client refuses at.

Hazard handled here: the listing runs in the supervisor's loop, so anyone who
can write /dev/shm could slow the loop (reaping, the lease) with a flood of
files. At most MAX_ENTRIES entries are looked at (a few tens of milliseconds);
beyond them the figure is a lower bound.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from image_result_client.flow import shm_bytes_waiting
from shared.config import Settings

# A listing costs about a microsecond a segment; the figures are read every few seconds.
READ_SECONDS = 5.0
# Thousands of frames wait at most (a 1080p frame is 6 MB); a flood of files is cut short.
MAX_ENTRIES = 20_000


@dataclass(frozen=True, slots=True)
class ShmUsage:
    waiting_bytes: int
    budget_bytes: int  # 0: no budget

    def as_dict(self) -> dict[str, int]:
        return {"waiting_bytes": self.waiting_bytes, "budget_bytes": self.budget_bytes}


class ShmMeter:
    """The latest ShmUsage, read again once it is READ_SECONDS old."""

    def __init__(self, *, read_seconds: float = READ_SECONDS) -> None:
        self.read_seconds = read_seconds
        self._usage: ShmUsage | None = None
        self._read_at = float("-inf")

    def read(self, settings: Settings) -> ShmUsage | None:
        """None when /dev/shm cannot be listed (not Linux, say): nothing to report."""
        if time.monotonic() - self._read_at >= self.read_seconds:
            self._read_at = time.monotonic()
            try:
                waiting = shm_bytes_waiting(settings.shm_name_prefix, max_entries=MAX_ENTRIES)
            except OSError:
                self._usage = None
            else:
                self._usage = ShmUsage(waiting, settings.shm_budget_bytes)
        return self._usage
