"""Files in OUTPUT_DIR: safe names, durable partial files, publication.

A worker writes each JPEG as OUTPUT_DIR/.partial/<task_id>.<delivery>.jpg and
starts its write-back; the ledger makes a whole batch of them durable before
it records them (one group commit instead of an fdatasync per task in the
workers). Only the ledger gives a file its final name, just before the record
naming it is appended, with a rename that never replaces an existing file
(renameat2 RENAME_NOREPLACE, or link(2) where that is missing): whatever
another uid plants under a final name stays its own, and the record names the
pool's file or the task is retried. One delivery, one partial file: a
redelivered task never touches the file of an earlier delivery that the ledger
may be publishing at that very moment.

Both directories are opened once per process (OutputDirectories) and used
through their descriptors, .partial without following a link: a path swapped
for a symlink after the check cannot send a JPEG elsewhere.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import stat
import unicodedata
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

# Where files and records are, as readers of OUTPUT_DIR (the client) rely on it.
from image_result_client.protocol import PARTIAL_DIR

LOCK_NAME = ".lock"
# Leaves room for "_YYYYMMDD_HHMMSS_NNN.jpg" within the 255-byte name limit.
MAX_STEM_BYTES = 160
UNSAFE_CHARS = re.compile(r"[^\w.\-]+")
AT_FDCWD = -100
RENAME_NOREPLACE = 1
SYNC_FILE_RANGE_WRITE = 2
_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)
if _renameat2 is not None:
    _renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    _renameat2.restype = ctypes.c_int
_sync_file_range = getattr(_libc, "sync_file_range", None)
if _sync_file_range is not None:
    _sync_file_range.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    _sync_file_range.restype = ctypes.c_int


def safe_stem(image_id: str) -> str:
    """A file-name stem from an untrusted image_id: one path component, never hidden."""
    text = unicodedata.normalize("NFC", image_id)
    stem = UNSAFE_CHARS.sub("_", text).strip("._")
    encoded = stem.encode("utf-8")[:MAX_STEM_BYTES]
    stem = encoded.decode("utf-8", errors="ignore").rstrip("._")
    return stem or "image"


def final_name(image_id: str, when: datetime, collision: int = 0) -> str:
    """`{image_id}_{YYYYMMDD_HHMMSS}.jpg`, with `_N` before the suffix on a collision."""
    name = f"{safe_stem(image_id)}_{when:%Y%m%d_%H%M%S}"
    if collision:
        name += f"_{collision}"
    return name + ".jpg"


@dataclass(slots=True)
class OutputDirectories:
    """OUTPUT_DIR and its .partial, held open for a process's life."""

    output_fd: int
    partial_fd: int

    def follow_partial(self) -> bool:
        """Take up a .partial made anew since it was opened (removed by hand, and
        made again by a worker that booted since), if it passes the same checks:
        the workers and the ledger must look at one folder. Two system calls
        when nothing changed."""
        try:
            now = os.stat(PARTIAL_DIR, dir_fd=self.output_fd, follow_symlinks=False)
        except OSError:
            return False
        held = os.fstat(self.partial_fd)
        if (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
            return False
        try:
            fd = os.open(PARTIAL_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.output_fd)
        except OSError:
            return False
        if partial_dir_problem(os.fstat(fd)):
            os.close(fd)
            return False
        os.close(self.partial_fd)
        self.partial_fd = fd
        return True

    def close(self) -> None:
        os.close(self.partial_fd)
        os.close(self.output_fd)


def prepare_output_dir(output_dir: Path) -> OutputDirectories:
    """Open OUTPUT_DIR and its partial-file folder (made if missing), check the
    folder is ours, and prove it writable; raises OSError if unusable."""
    output_dir.mkdir(mode=0o755, parents=True, exist_ok=True)  # the supervisor made it; a restart finds it gone
    output_fd = os.open(output_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            os.mkdir(PARTIAL_DIR, 0o755, dir_fd=output_fd)
        except FileExistsError:
            pass
        partial_fd = os.open(PARTIAL_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=output_fd)
    except OSError:
        os.close(output_fd)
        raise
    directories = OutputDirectories(output_fd, partial_fd)
    try:
        problem = partial_dir_problem(os.fstat(partial_fd))
        if problem:
            raise OSError(errno.EPERM, f"{output_dir / PARTIAL_DIR} {problem}")
        probe = f".probe-{os.getpid()}"
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=partial_fd))
        os.unlink(probe, dir_fd=partial_fd)
    except OSError:
        directories.close()
        raise
    return directories


# The pool's own files in OUTPUT_DIR, besides results.json: where another uid may
# create names (a sticky OUTPUT_DIR), one could be there first.
STATE_FILES = (LOCK_NAME, ".unlink-pending", ".publishing")


def open_state_file(path: str | Path, flags: int, mode: int = 0o644) -> int:
    """Open one of the pool's files in OUTPUT_DIR (results.json, .lock, ...),
    never through a link, and only if it is the pool's: a regular file of its
    uid (or root's) that no one else may write. Raises OSError otherwise."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    problem = state_file_problem(os.fstat(fd))
    if problem:
        os.close(fd)
        raise OSError(errno.EPERM, f"{path} {problem}")
    return fd


def state_file_problem(status: os.stat_result) -> str | None:
    """Why a file in OUTPUT_DIR cannot be one of the pool's own, or None."""
    if not stat.S_ISREG(status.st_mode):
        return "is not a regular file"
    if status.st_uid not in (os.geteuid(), 0):
        return f"is owned by uid {status.st_uid}, not by the pool's uid {os.geteuid()} or root"
    if status.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"is writable by others (mode {stat.S_IMODE(status.st_mode):o}): chmod go-w it"
    return None


def partial_dir_problem(status: os.stat_result) -> str | None:
    """Why .partial cannot be trusted with JPEGs before they are published, or
    None: it must be a directory of this uid that no one else may write in."""
    if not stat.S_ISDIR(status.st_mode):
        return "is not a directory"
    if status.st_uid != os.geteuid():
        return f"is owned by uid {status.st_uid}, not by the pool's uid {os.geteuid()}"
    if status.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"is writable by others (mode {stat.S_IMODE(status.st_mode):o}): chmod go-w it"
    return None


def write_partial(path: str | Path, data: bytes, *, dir_fd: int | None = None) -> None:
    """Write a new file and start its write-back without waiting for it, so that
    the ledger's fdatasync finds the data on its way; an old file at `path` is
    replaced. Not durable until sync_data()."""
    _write_new(path, data, durable=False, dir_fd=dir_fd)


def write_durably(path: Path, data: bytes) -> None:
    """Write a new file and fdatasync it; an old file at `path` is replaced."""
    _write_new(path, data, durable=True, dir_fd=None)


def sync_data(path: str | Path, *, dir_fd: int | None = None) -> int:
    """fdatasync the file at `path` (an error means its data may be lost); returns its inode number."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        os.fdatasync(fd)
        return os.fstat(fd).st_ino
    finally:
        os.close(fd)


def _write_new(path: str | Path, data: bytes, *, durable: bool, dir_fd: int | None) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o644, dir_fd=dir_fd)
    except FileExistsError:  # left by an earlier attempt of this very delivery
        os.unlink(path, dir_fd=dir_fd)
        fd = os.open(path, flags, 0o644, dir_fd=dir_fd)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if durable:
            os.fdatasync(fd)
        elif _sync_file_range is not None:
            # Only a hint: an error here shows again, and is handled, at the fdatasync.
            _sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE)
    finally:
        os.close(fd)


def publish(partial: str | Path, final: str | Path, *, src_dir_fd: int | None = None,
            dst_dir_fd: int | None = None) -> None:
    """Give a durable partial file its final name. FileExistsError if taken,
    whatever is there (a symlink included, which is never followed).

    renameat2(RENAME_NOREPLACE) moves the name in one step and frees no inode:
    on ext4 without a journal, every inode freed in the last 30 s slows each
    later file creation (the allocator skips recently deleted inodes one by
    one), which link + unlink per task made a quarter of the pool's CPU.
    Where the file system cannot do it (NFS, say), link + unlink.
    """
    if _renameat2 is not None:
        src = AT_FDCWD if src_dir_fd is None else src_dir_fd
        dst = AT_FDCWD if dst_dir_fd is None else dst_dir_fd
        if _renameat2(src, os.fsencode(partial), dst, os.fsencode(final), RENAME_NOREPLACE) == 0:
            return
        error = ctypes.get_errno()
        if error not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(error, os.strerror(error), str(partial), None, str(final))
    os.link(partial, final, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd, follow_symlinks=False)
    os.unlink(partial, dir_fd=src_dir_fd)


def fsync_directory(path: Path | int) -> None:
    """fsync a directory, given by its path or an open descriptor."""
    if isinstance(path, int):
        os.fsync(path)
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_quietly(path: str | Path, *, dir_fd: int | None = None) -> None:
    try:
        os.unlink(path, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
