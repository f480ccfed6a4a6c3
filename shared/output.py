"""Files in OUTPUT_DIR: safe names, durable partial files, publication.

A worker writes each JPEG as OUTPUT_DIR/.partial/<task_id>.<delivery>.jpg and
starts its write-back; the ledger makes a whole batch of them durable before
it records them (one group commit instead of an fdatasync per task in the
workers). Only the ledger gives a file its final name, after
the record naming it is durable, with a rename that never replaces an existing
file (renameat2 RENAME_NOREPLACE, or link(2) where that is missing) and so
never writes through a symlink planted under the final name. One delivery,
one partial file: a redelivered task never touches the file of an earlier
delivery that the ledger may be publishing at that very moment.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import unicodedata
from datetime import datetime
from pathlib import Path

# Where files and records are, as readers of OUTPUT_DIR (the client) rely on it.
from image_result_client.protocol import PARTIAL_DIR
from image_result_client.protocol import RESULTS_NAME as RESULTS_NAME
from image_result_client.protocol import awaiting_publication as awaiting_publication
from image_result_client.protocol import partial_path as partial_path

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


def prepare_output_dir(output_dir: Path) -> None:
    """Create OUTPUT_DIR and its partial-file folder; raises OSError if unusable."""
    (output_dir / PARTIAL_DIR).mkdir(parents=True, exist_ok=True)
    probe = output_dir / PARTIAL_DIR / f".probe-{os.getpid()}"
    probe.write_bytes(b"")
    probe.unlink()


def write_partial(path: Path, data: bytes) -> None:
    """Write a new file and start its write-back without waiting for it, so that
    the ledger's fdatasync finds the data on its way; an old file at `path` is
    replaced. Not durable until sync_data()."""
    _write_new(path, data, durable=False)


def write_durably(path: Path, data: bytes) -> None:
    """Write a new file and fdatasync it; an old file at `path` is replaced."""
    _write_new(path, data, durable=True)


def sync_data(path: str | Path) -> None:
    """fdatasync the file at `path` (an error means its data may be lost)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def _write_new(path: Path, data: bytes, *, durable: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o644)
    except FileExistsError:  # left by an earlier attempt of this very delivery
        os.unlink(path)
        fd = os.open(path, flags, 0o644)
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


def publish(partial: str | Path, final: str | Path) -> None:
    """Give a durable partial file its final name. FileExistsError if taken.

    renameat2(RENAME_NOREPLACE) moves the name in one step and frees no inode:
    on ext4 without a journal, every inode freed in the last 30 s slows each
    later file creation (the allocator skips recently deleted inodes one by
    one), which link + unlink per task made a quarter of the pool's CPU.
    Where the file system cannot do it (NFS, say), link + unlink.
    """
    if _renameat2 is not None:
        if _renameat2(AT_FDCWD, os.fsencode(partial), AT_FDCWD, os.fsencode(final), RENAME_NOREPLACE) == 0:
            return
        error = ctypes.get_errno()
        if error not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(error, os.strerror(error), str(partial), None, str(final))
    os.link(partial, final, follow_symlinks=False)
    os.unlink(partial)


def fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_quietly(path: str | Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
