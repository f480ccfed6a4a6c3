"""OUTPUT_DIR made ready before the pool starts, or one line saying why it cannot be.

    supervisor main() --check_output_dir()--> OUTPUT_DIR/ and OUTPUT_DIR/.partial/
        exist and take a new file; results.json and .lock, if present, open for writing
        --ConfigError naming OUTPUT_DIR--> one line on stderr, exit 2

The supervisor calls this before it forks anything. A wrong OUTPUT_DIR used to
surface in the children, as a bare errno line and exit 3, which systemd restarts
every RestartSec= (only exit 2 is in RestartPreventExitStatus=).

Decisions and hazards handled here:
- Missing directories are created, parents included, as `mkdir -p` does and as
  daemons do for their state directory: `make run` starts from a fresh checkout
  (./output/translated), and a path that cannot be created (a parent that is a
  file, /proc, a read-only mount, no permission) is reported with the directory
  that failed. Those created are returned so that the supervisor logs them: a
  typo'd path that root could create does not go unnoticed.
- Writability is tried, not judged from permission bits: root, ACLs and a
  read-only mount (systemd's ProtectSystem=strict) answer truthfully only to a
  real attempt. The probe file has a hidden name and is removed at once.
- results.json and .lock left by a pool that ran as another user (root, once) are
  unwritable to this one, and the ledger would fail to boot at every restart.
- Another uid that may write OUTPUT_DIR can plant names where the pool
  publishes, and one that controls .partial can swap a JPEG before it is
  published. OUTPUT_DIR must belong to the pool's uid or root and be writable
  by no one else unless it has the sticky bit (OUTPUT_DIR_ALLOW_SHARED=true
  accepts it); .partial must be a directory of the pool's uid, not a symbolic
  link, that no one else may write (no setting). Directories made here are
  0755 whatever the umask, so the pool never refuses one it made.
- OUTPUT_DIR goes into every record's file_path, so it must be valid UTF-8.
"""

from __future__ import annotations

import errno
import os
import pwd
import stat
from pathlib import Path

from image_result_client.protocol import PARTIAL_DIR, REQUESTS_NAME, RESULTS_NAME
from shared.config import ConfigError
from shared.storage.files import STATE_FILES, partial_dir_problem, state_file_problem

PROBE_PREFIX = ".probe-"


class _Unusable(Exception):
    """What follows `OUTPUT_DIR='...'` in the one line."""


def check_output_dir(output_dir: Path, *, allow_shared: bool = False) -> list[Path]:
    """Create OUTPUT_DIR and OUTPUT_DIR/.partial as needed, check that no other
    uid may write them, and prove both writable; returns the directories created
    up to OUTPUT_DIR, outermost first. Raises ConfigError whose one-line message
    names OUTPUT_DIR and the path and reason that failed."""
    partial = output_dir / PARTIAL_DIR
    try:
        _check_utf8(output_dir)
        created = _make_directories(_missing_directories(output_dir), failure="cannot be created")
        _probe(output_dir)  # first: an unwritable OUTPUT_DIR is the whole story, not a failed mkdir .partial
        if not allow_shared:
            _check_not_shared(output_dir)
        _check_partial_not_a_link(partial)
        _make_directories(_missing_directories(partial, within=output_dir), failure="cannot be used")
        _check_partial_ours(partial)
        _probe(partial)
        for name in (RESULTS_NAME, REQUESTS_NAME, *STATE_FILES):
            _check_state_file_if_present(output_dir / name)
    except _Unusable as reason:
        raise ConfigError(f"OUTPUT_DIR={str(output_dir)!r} {reason}") from None
    return created


def _missing_directories(path: Path, *, within: Path | None = None) -> list[Path]:
    """path and its ancestors that do not exist, outermost first. The nearest that
    exists must be a directory: for OUTPUT_DIR itself that is the whole complaint;
    for one of its parents, the reason it cannot be created; for .partial
    (`within` OUTPUT_DIR), the reason OUTPUT_DIR cannot be used."""
    missing: list[Path] = []
    for candidate in (path, *path.parents):
        try:
            mode = os.stat(candidate).st_mode
        except (FileNotFoundError, NotADirectoryError):  # ENOTDIR: a file further up
            missing.append(candidate)
            continue
        except OSError as exc:
            raise _Unusable(f"cannot be reached: {_failed(f'stat {str(candidate)!r}', exc)}") from None
        if stat.S_ISDIR(mode):
            return missing[::-1]
        if within is not None:
            raise _Unusable(f"cannot be used: {str(candidate)!r} is not a directory")
        if candidate == path:
            raise _Unusable("is not a directory")
        raise _Unusable(f"cannot be created: {str(candidate)!r} is not a directory")
    return missing[::-1]


def _make_directories(missing: list[Path], *, failure: str) -> list[Path]:
    created = []
    for directory in missing:
        try:
            os.mkdir(directory, 0o755)  # not the umask's 0o777: never group-writable
        except FileExistsError:
            continue  # made meanwhile; the probe below finds out what it is
        except OSError as exc:
            raise _Unusable(f"{failure}: {_failed(f'mkdir {str(directory)!r}', exc)}") from None
        created.append(directory)
    return created


def _check_utf8(output_dir: Path) -> None:
    try:
        os.fsencode(output_dir).decode("utf-8")
    except UnicodeDecodeError:
        raise _Unusable("is not valid UTF-8: every record names its file by it") from None


def _check_not_shared(output_dir: Path) -> None:
    status = os.stat(output_dir)
    writers = []
    if status.st_uid not in (os.geteuid(), 0):
        writers.append(f"its owner, uid {status.st_uid}")
    if status.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not status.st_mode & stat.S_ISVTX:
        writers.append(f"mode {stat.S_IMODE(status.st_mode):o} without the sticky bit")
    if writers:
        raise _Unusable(
            f"may be written by another uid ({', '.join(writers)}), who could plant names where JPEGs are "
            "published; chmod go-w it, or set OUTPUT_DIR_ALLOW_SHARED=true to accept that"
        )


def _check_partial_not_a_link(partial: Path) -> None:
    try:
        status = os.lstat(partial)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(status.st_mode):
        raise _Unusable(f"cannot be used: {str(partial)!r} is a symbolic link; remove it, the pool makes its own")


def _check_partial_ours(partial: Path) -> None:
    problem = partial_dir_problem(os.lstat(partial))
    if problem:
        raise _Unusable(f"cannot be used: {str(partial)!r} {problem}")


def _probe(directory: Path) -> None:
    probe = directory / f"{PROBE_PREFIX}{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise _Unusable(f"is not writable: {_failed(f'create a file in {str(directory)!r}', exc)}") from None


def _check_state_file_if_present(path: Path) -> None:
    """A file of the pool's that is there already must be the pool's (where
    another uid may create names, it could have been first) and writable."""
    try:
        problem = state_file_problem(os.lstat(path))
    except FileNotFoundError:
        return
    except OSError as exc:
        raise _Unusable(f"cannot be used: {_failed(f'stat {str(path)!r}', exc)}") from None
    if problem:
        raise _Unusable(f"cannot be used: {str(path)!r} {problem}")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise _Unusable(f"cannot be used: {_failed(f'open {str(path)!r} for writing', exc)}") from None
    os.close(fd)


def _failed(action: str, exc: OSError) -> str:
    reason = exc.strerror or str(exc)
    if exc.errno == errno.EROFS:
        return f"{action}: {reason} (under systemd, ProtectSystem=strict leaves only ReadWritePaths= writable)"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"{action}: {reason} (as {_whoami()})"
    return f"{action}: {reason}"


def _whoami() -> str:
    uid = os.geteuid()
    try:
        return f"user {pwd.getpwuid(uid).pw_name}, uid {uid}"
    except KeyError:
        return f"uid {uid}"
