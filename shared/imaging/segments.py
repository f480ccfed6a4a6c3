"""The shared-memory boundary: which segments a message may make us read or remove.

A queue message names a segment, and whoever can push to the queue is not
trusted (docs/security.md). A name alone must never reach another program's
shared memory, so every open and every unlink goes through here:

- the name must start with SHM_NAME_PREFIX (the pipeline's producers name
  their segments `img_shm_<hex>`); anything else is refused before a system
  call touches it;
- the segment is opened without following a symbolic link and without
  blocking (a FIFO in /dev/shm would otherwise hang the worker in open());
- only a regular file owned by the pool's user or by a user in SHM_OWNER_UIDS
  is read or unlinked (a directory, a device, a socket or a root-owned file of
  another service is not ours);
- only a file with one name is read: another name may be a hard link that
  someone made to a private file of our uid (fs.protected_hardlinks=0 lets
  anyone), whose bytes must not end up in a JPEG. The name a message handed
  over is unlinked all the same: unlinking removes that name alone, never the
  file's other names or its data, so a link someone made to a 0666 segment
  costs that task, and leaks nothing of ours;
- an unlink that fails for any reason but "already gone" is logged and
  skipped: a name can fail its own task, never stop the ledger, now or when
  `.unlink-pending` is replayed at the next start.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from image_result_client.protocol import SHM_DIR
from shared.config import Settings


class SegmentRefused(Exception):
    """The segment may not be read; the message says why, for the failed record."""


@dataclass(frozen=True, slots=True)
class SegmentAccess:
    """Which segments are the pipeline's: a name prefix and the owners allowed."""

    prefix: str
    owner_uids: frozenset[int]

    @classmethod
    def from_settings(cls, settings: Settings) -> SegmentAccess:
        return cls(settings.shm_name_prefix, frozenset({os.getuid(), *settings.shm_owner_uids}))

    def check_name(self, name: str) -> str | None:
        """Why `name` is refused, or None. Names are already syntax-checked
        (shared.messages.segment_name): one file name, no '/'."""
        if not name.startswith(self.prefix):
            return f"segment name {name[:80]!r} does not start with SHM_NAME_PREFIX {self.prefix!r}"
        return None

    def check_file(self, name: str, info: os.stat_result, *, reading: bool = True) -> str | None:
        """Why the file behind `name` is not a segment we may read (or, with
        reading=False, unlink), or None."""
        if not stat.S_ISREG(info.st_mode):
            return f"{name[:80]!r} in {SHM_DIR} is not a shared memory segment (not a regular file)"
        if info.st_uid not in self.owner_uids:
            return f"segment {name[:80]!r} is owned by uid {info.st_uid}, not by the pool's user or SHM_OWNER_UIDS"
        if reading and info.st_nlink != 1:
            # A hard link under a pipeline name to some other file of ours: not a segment a producer made.
            return f"{name[:80]!r} in {SHM_DIR} has {info.st_nlink} names; a segment has one"
        return None


def segment_path(name: str) -> Path:
    return SHM_DIR / name


def open_segment(name: str, access: SegmentAccess) -> tuple[int, int]:
    """A read-only descriptor on the segment and its size. Raises
    FileNotFoundError when it does not exist and SegmentRefused when it is not
    one we may read; the caller closes the descriptor."""
    refusal = access.check_name(name)
    if refusal:
        raise SegmentRefused(refusal)
    try:
        fd = os.open(segment_path(name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SegmentRefused(f"{name[:80]!r} in {SHM_DIR} is a symbolic link, not a segment") from None
        raise
    try:
        info = os.fstat(fd)
        refusal = access.check_file(name, info)
        if refusal:
            raise SegmentRefused(refusal)
    except BaseException:
        os.close(fd)
        raise
    return fd, info.st_size


def unlink_segment(name: str, access: SegmentAccess) -> str:
    """Remove a segment the pipeline handed over. Never raises: returns
    "unlinked", "gone" (it was not there), or why it was left in place."""
    refusal = access.check_name(name)
    if refusal:
        return refusal
    path = segment_path(name)
    try:
        refusal = access.check_file(name, os.lstat(path), reading=False)
        if refusal:
            return refusal
        os.unlink(path)
    except FileNotFoundError:
        return "gone"
    except OSError as exc:
        return f"cannot unlink segment {name[:80]!r}: {exc.strerror}"
    return "unlinked"
