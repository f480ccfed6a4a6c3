"""Cumulative task statistics: made by the ledger, served by the supervisor.

The ledger sees every record, so it counts outcomes and the time each phase of
a task took. It sends the whole cumulative snapshot to the supervisor about
once a second over a non-blocking pipe; a snapshot is small and fixed-size
(one pipe write, so it arrives whole or not at all), and a dropped one is
superseded by the next. The supervisor turns snapshots into Prometheus metrics.

Snapshots are JSON, not pickle: the supervisor, the one process that holds
every other, reads them, and nothing a child sends it may run as code there.
"""

from __future__ import annotations

import bisect
import json
from collections import Counter
from dataclasses import dataclass, field

# Seconds; the phases of one task, worker side then ledger side.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
PHASES = ("fetch", "load", "encode", "write", "ledger")
# A pipe write up to PIPE_BUF bytes is atomic.
MAX_SNAPSHOT_BYTES = 4096


@dataclass
class Histogram:
    buckets: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    total: float = 0.0
    count: int = 0

    def observe(self, seconds: float) -> None:
        self.buckets[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds
        self.count += 1

    def add(self, other: Histogram) -> None:
        self.buckets = [a + b for a, b in zip(self.buckets, other.buckets, strict=True)]
        self.total += other.total
        self.count += other.count


@dataclass
class TaskStats:
    outcomes: Counter = field(default_factory=Counter)  # (status, source) -> tasks
    phases: dict[str, Histogram] = field(default_factory=lambda: {phase: Histogram() for phase in PHASES})
    duplicates: int = 0
    expired: int = 0  # failed tasks whose deadline passed before they could start

    def observe(self, *, status: str, source: str | None, timings: dict[str, float], expired: bool = False) -> None:
        self.outcomes[(status, source or "none")] += 1
        self.expired += expired
        for phase, seconds in timings.items():
            if phase in self.phases:
                self.phases[phase].observe(seconds)

    def add(self, other: TaskStats) -> None:
        self.outcomes.update(other.outcomes)
        for phase, histogram in other.phases.items():
            self.phases[phase].add(histogram)
        self.duplicates += other.duplicates
        self.expired += other.expired

    def to_bytes(self) -> bytes:
        snapshot = {
            "outcomes": [[status, source, count] for (status, source), count in sorted(self.outcomes.items())],
            "phases": {phase: [h.buckets, h.total, h.count] for phase, h in self.phases.items()},
            "duplicates": self.duplicates,
            "expired": self.expired,
        }
        return json.dumps(snapshot, separators=(",", ":")).encode()

    @staticmethod
    def from_bytes(data: bytes) -> TaskStats:
        """A snapshot as to_bytes wrote it; ValueError for anything else."""
        try:
            snapshot = json.loads(data)
            stats = TaskStats(duplicates=int(snapshot["duplicates"]), expired=int(snapshot["expired"]))
            for status, source, count in snapshot["outcomes"]:
                stats.outcomes[(str(status), str(source))] = int(count)
            for phase, (buckets, total, count) in snapshot["phases"].items():
                if phase not in stats.phases or len(buckets) != len(BUCKETS) + 1:
                    raise ValueError(f"phase {phase!r} with {len(buckets)} buckets")
                stats.phases[phase] = Histogram([int(n) for n in buckets], float(total), int(count))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"not a stats snapshot: {exc!r}") from None
        return stats
