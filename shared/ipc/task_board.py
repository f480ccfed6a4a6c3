"""What each worker is doing, for `status`: a board in shared memory.

    worker: as a task starts, its start time; as it enters each phase, the
        phase; as it ends, nothing (plain stores into memory the supervisor
        mapped before fork: no lock, no system call, no Redis)
    supervisor: at each lease renewal, reads every board, and for each worker
        with a task past "start" reads that task's entry of its processing
        list (one LINDEX each, in one round trip: TaskLists.entries_at in
        shared/state/task_lists.py) for its ids
    --> the lease value --> `status`

The task in hand is the entry `unstarted + 1` from the tail of the worker's
processing list (`unstarted`: the tasks it claimed but has not started, which
it publishes already). The worker appends to its list only when it claims,
between tasks, and the ledger removes only finished tasks, which lie before
the one in hand, so that position holds still while the task runs.

Hazards handled here:
- The worker moves on while the supervisor reads: `since` is written last as a
  task starts and first as it ends, so a board with `since` set belongs to the
  task in hand; the supervisor reads `since` again after the lookup and drops
  ids read for a task that has ended meanwhile.
- A huge entry: an entry holds the producer's whole message, which may be far
  beyond MAX_MESSAGE_BYTES. Such a task fails while in "start", and no entry
  is read for a task in "start"; past it, the message has been parsed whole.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from multiprocessing.context import BaseContext

from shared.messages import InvalidMessage, parse_envelope, salvage

PHASES = ("idle", "start", "load", "encode", "write")
IDLE, START, LOAD, ENCODE, WRITE = range(len(PHASES))


@dataclass(frozen=True, slots=True)
class Reading:
    """One look at a busy worker's board."""

    phase: str
    since: float  # time.monotonic() when the task started
    index: int  # the task's entry in the processing list, from its tail (-1: the last)

    @property
    def has_ids(self) -> bool:
        return self.phase != PHASES[START]


class TaskBoard:
    """One worker's board: made by the supervisor before fork, written by the worker."""

    __slots__ = ("_since", "_phase")

    def __init__(self, context: BaseContext) -> None:
        self._since = context.Value("d", 0.0, lock=False)
        self._phase = context.Value("i", IDLE, lock=False)

    # -- the worker's side: a few stores per task --------------------------

    def start(self) -> None:
        self._phase.value = START
        self._since.value = time.monotonic()

    def enter(self, phase: int) -> None:
        self._phase.value = phase

    def end(self) -> None:
        self._since.value = 0.0
        self._phase.value = IDLE

    # -- the supervisor's side ---------------------------------------------

    def read(self, *, unstarted: int) -> Reading | None:
        """The task in hand, or None when the worker has none (or is between two)."""
        since = self._since.value
        if since == 0.0:
            return None
        phase = self._phase.value
        if self._since.value != since:
            return None
        return Reading(PHASES[phase] if 0 <= phase < len(PHASES) else "?", since, -(unstarted + 1))

    def still(self, reading: Reading) -> bool:
        """Whether the task read is still the one in hand."""
        return self._since.value == reading.since


def describe_task(reading: Reading, entry: bytes | None, *, now: float, wall_now: float) -> dict:
    """The task in hand as the lease shows it: phase, age, and its ids when known."""
    age = max(0.0, now - reading.since)
    task: dict = {"phase": reading.phase, "age": round(age, 2), "started_at": round(wall_now - age, 3)}
    if entry is None:
        return task
    try:
        envelope = parse_envelope(entry)
    except InvalidMessage:
        return task
    found = salvage(envelope.body)
    task.update(
        task_id=envelope.task_id,
        attempt=envelope.deliveries,
        request_id=found.request_id,
        image_id=found.image_id,
    )
    return task
