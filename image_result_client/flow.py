"""Flow control for producers: how much may wait for the pool on this host.

    producer --shm_budget_room() / reserve_segment()--> /dev/shm (<prefix>*)
             --queue_length() vs MAX_QUEUE_LENGTH--> the queue(s) in Redis
             --PushRefused after PUSH_WAIT s without room--> the caller

Every frame waiting for the pool is a segment in /dev/shm, which is RAM: a
stopped or slow pool must not let them pile up until the OOM killer picks the
GPU stage. SHM_BUDGET_BYTES bounds the bytes of segments under SHM_NAME_PREFIX
in this host's /dev/shm; MAX_QUEUE_LENGTH (off by default) bounds the queue.

A segment counts its size rounded up to whole pages, or the memory it holds
(st_blocks * 512) if that is more. The size, because it is there from the
moment the segment is created (ftruncate), before a page of it is written: a
producer still copying a frame is counted in full. Rounded up to pages,
because tmpfs holds whole pages: a written 405,900-byte frame holds 409,600.
The blocks, for a stranger's segment that holds more than its size says.

Hazards handled here:
- Two producers checking at once: reserve_segment creates the segment at its
  full size first and counts afterwards, itself included, and gives it back if
  the total is over the budget. Of two producers that race, the one whose
  segment was created later counts the other's, so a kept segment never takes
  the total over the budget; both may back off, and try again a moment later
  (a jittered moment, so that they do not collide again). A segment given back
  was never written: while it exists it is counted, but holds no memory.
- /dev/shm changing while it is counted (the pool unlinking segments): a file
  gone between the listing and its stat counts nothing.

Only the standard library: the pool imports this module too (its metrics,
`status` and the dashboard show the same count against the same budget).
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

from image_result_client.protocol import DEFAULT_SEGMENT_PREFIX, SHM_DIR

# sysexits.h: a temporary failure, try again later (what a full budget or queue is).
EX_TEMPFAIL = 75
DEFAULT_PUSH_WAIT = 30.0
DEFAULT_MAX_QUEUE_LENGTH = 0  # off
# The largest values the settings take (the pool's shared/config.py checks the same).
MAX_COUNT = 2**62
MAX_PUSH_WAIT = 86_400.0
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
# How often a producer waiting for room looks again.
ROOM_POLL_SECONDS = 0.1


class PushRefused(Exception):
    """Nothing was queued for this frame or URL: SHM_BUDGET_BYTES or
    MAX_QUEUE_LENGTH (named by `limit`) left no room within PUSH_WAIT seconds.
    No segment of it is left behind; what was queued before stays queued."""

    def __init__(self, message: str, *, limit: str) -> None:
        super().__init__(message)
        self.limit = limit


def default_shm_budget(shm_dir: Path = SHM_DIR) -> int:
    """Half the size of the tmpfs at shm_dir; 0 (no budget) when it cannot be read.

    Half, because /dev/shm is shared with everything else on the host that uses
    POSIX shared memory (CUDA IPC, NCCL, browsers, the pool's own decode does
    not), and a tmpfs that fills up fails every one of them, not only us."""
    try:
        info = os.statvfs(shm_dir)
    except OSError:
        return 0
    return info.f_blocks * info.f_frsize // 2


def segment_bytes(info: os.stat_result) -> int:
    """What one segment counts against the budget (see the module's docstring)."""
    return max(-(-info.st_size // PAGE_SIZE) * PAGE_SIZE, info.st_blocks * 512)


def shm_bytes_waiting(
    prefix: str = DEFAULT_SEGMENT_PREFIX, shm_dir: Path = SHM_DIR, *, max_entries: int | None = None
) -> int:
    """Bytes of the regular files under `prefix` in shm_dir (every file for an
    empty prefix): the frames waiting for the pool on this host. With
    `max_entries`, only that many directory entries are looked at (a lower
    bound, for a caller that must not be held up by a flooded /dev/shm)."""
    total = 0
    with os.scandir(shm_dir) as entries:
        for seen, entry in enumerate(entries, 1):
            if max_entries is not None and seen > max_entries:
                break
            if not entry.name.startswith(prefix):
                continue
            try:
                if entry.is_file(follow_symlinks=False):
                    total += segment_bytes(entry.stat(follow_symlinks=False))
            except FileNotFoundError:
                continue  # unlinked by the pool while we looked
    return total


@dataclass(frozen=True, slots=True)
class FlowLimits:
    """The producer's side of flow control, as the environment (and `.env`) sets it."""

    shm_budget_bytes: int  # 0: no budget
    push_wait: float = DEFAULT_PUSH_WAIT
    max_queue_length: int = DEFAULT_MAX_QUEUE_LENGTH  # 0: no limit
    shm_name_prefix: str = DEFAULT_SEGMENT_PREFIX  # the segments the budget counts

    @classmethod
    def from_settings(cls, values: Mapping[str, str] | None = None) -> FlowLimits:
        """SHM_BUDGET_BYTES, PUSH_WAIT, MAX_QUEUE_LENGTH and SHM_NAME_PREFIX from
        `values` (default: os.environ), each empty or unset meaning its default.
        ValueError naming the variable for a bad value."""
        values = os.environ if values is None else values

        def raw(name: str) -> str:
            return values.get(name, "").strip()

        budget = _whole_number("SHM_BUDGET_BYTES", raw("SHM_BUDGET_BYTES")) if raw("SHM_BUDGET_BYTES") else None
        return cls(
            shm_budget_bytes=default_shm_budget() if budget is None else budget,
            push_wait=_seconds("PUSH_WAIT", raw("PUSH_WAIT")) if raw("PUSH_WAIT") else DEFAULT_PUSH_WAIT,
            max_queue_length=(
                _whole_number("MAX_QUEUE_LENGTH", raw("MAX_QUEUE_LENGTH"))
                if raw("MAX_QUEUE_LENGTH") else DEFAULT_MAX_QUEUE_LENGTH
            ),
            # Not stripped to a default: the pool reads an empty SHM_NAME_PREFIX as "any name".
            shm_name_prefix=values.get("SHM_NAME_PREFIX", DEFAULT_SEGMENT_PREFIX).strip(),
        )


def shm_budget_room(limits: FlowLimits | None = None) -> int | None:
    """Bytes of frames that may still be put in /dev/shm before SHM_BUDGET_BYTES
    is reached (0 or less: none); None when there is no budget. The one call for
    producers that make their own segments: one listing of /dev/shm, no Redis.
    Room now is no promise: see reserve_segment for the race-free way."""
    limits = FlowLimits.from_settings() if limits is None else limits
    if limits.shm_budget_bytes == 0:
        return None
    return limits.shm_budget_bytes - shm_bytes_waiting(limits.shm_name_prefix)


def create_segment(name: str, size: int) -> SharedMemory:
    """A new segment of `size` bytes, owned by whoever will unlink it, not by
    this process: the resource tracker would unlink it when this process
    exits, maybe before the pool has read it."""
    if sys.version_info >= (3, 13):
        return SharedMemory(name=name, create=True, size=size, track=False)
    shm = SharedMemory(name=name, create=True, size=size)
    resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
    return shm


def reserve_segment(name: str, size: int, limits: FlowLimits, *, deadline: float) -> SharedMemory:
    """Create segment `name` of `size` bytes once the budget has room for it,
    waiting until `deadline` (time.monotonic()) at most; PushRefused after that.
    The segment is created before the count that decides, so that producers
    racing for the last room cannot together go over the budget. One listing
    of /dev/shm a frame while there is room (a few microseconds a segment
    waiting); while there is none, a listing every 50-100 ms, and a segment
    is created only when the listing shows room."""
    budget = limits.shm_budget_bytes
    if budget == 0:
        return create_segment(name, size)
    if size > budget:
        raise PushRefused(
            f"SHM_BUDGET_BYTES={budget} is smaller than this frame ({size} bytes): it can never fit",
            limit="SHM_BUDGET_BYTES",
        )
    counted_by_scan = name.startswith(limits.shm_name_prefix)
    waiting = 0  # not counted yet: the first try creates, then counts (one listing a frame)
    while True:
        if waiting + size <= budget:
            shm = create_segment(name, size)
            try:
                waiting = shm_bytes_waiting(limits.shm_name_prefix) + (0 if counted_by_scan else size)
            except BaseException:
                _give_back(shm, name)
                raise
            if waiting <= budget:
                return shm
            _give_back(shm, name)  # another producer took the room first
            waiting -= size
        if time.monotonic() >= deadline:
            raise PushRefused(
                f"SHM_BUDGET_BYTES={budget} reached: {max(0, waiting)} bytes of frames wait in {SHM_DIR} "
                f"under {limits.shm_name_prefix!r}, no room for {size} more after PUSH_WAIT={limits.push_wait:g}s",
                limit="SHM_BUDGET_BYTES",
            )
        # Jittered: producers that collided on the last room try again apart.
        time.sleep(min(random.uniform(0.5, 1.0) * ROOM_POLL_SECONDS, max(0.0, deadline - time.monotonic())))
        waiting = shm_bytes_waiting(limits.shm_name_prefix)


def _give_back(shm: SharedMemory, name: str) -> None:
    shm.close()
    try:
        os.unlink(SHM_DIR / name)
    except FileNotFoundError:
        pass


def _whole_number(name: str, raw: str) -> int:
    # ASCII digits only, as the pool's settings: int() also takes "١٢" and "1_000".
    digits = raw.strip()
    value = int(digits) if digits.isascii() and digits.isdigit() and len(digits) <= 19 else -1
    if not 0 <= value <= MAX_COUNT:
        raise ValueError(f"{name}={raw!r}: expected a whole number 0..{MAX_COUNT}, 0 for none")
    return value


def _seconds(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 0 <= value <= MAX_PUSH_WAIT:  # NaN too
        raise ValueError(f"{name}={raw!r}: expected seconds, 0..{MAX_PUSH_WAIT:g}")
    return value
