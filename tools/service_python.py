"""`make install`'s check that the service's user can run the interpreter the
install's venv is made from.

    python tools/service_python.py --user image-result-worker

A venv does not hold a Python: its bin/python links to the interpreter it was
made from (pyvenv.cfg's home), whose standard library stays where it is. One
from pyenv under root's home (mode 0700) is root's alone, and the service,
running as its own user, would fail at its first import. So the install
refuses it, in one line naming a Python that works, before anything is copied.

As root (or as the user itself), with the user present, the interpreter is
run as that user: the answer is exact. Otherwise (no such user yet, or not root) the directories on
the way to the interpreter and its standard library must be open to everyone
(o+x), as they must be for a user that does not exist yet.

Exit 0: usable; 2: not (the line says why). Standard library only: it runs
with the interpreter being checked.
"""

from __future__ import annotations

import argparse
import os
import pwd
import stat
import subprocess
import sys
import sysconfig
from pathlib import Path

SUGGESTION = "use a system Python: make install PYTHON=/usr/bin/python3"
# What the service imports first; the encodings package is the interpreter's own start-up.
PROBE = "import encodings, json, ssl"


def interpreter() -> Path:
    """The interpreter a venv made by this one links to, symlinks resolved."""
    return Path(os.path.realpath(getattr(sys, "_base_executable", sys.executable)))


def closed_directory(path: Path) -> Path | None:
    """The first directory on the way to `path` that others cannot enter, if any."""
    for directory in [*reversed(path.parents), path] if path.is_dir() else reversed(path.parents):
        if not directory.stat().st_mode & stat.S_IXOTH:
            return directory
    return None


def problem_for(user: str) -> str | None:
    """Why `user` cannot run this interpreter, or None."""
    executable = interpreter()
    try:
        account = pwd.getpwnam(user)
    except KeyError:
        account = None
    if account is not None and os.geteuid() in (0, account.pw_uid):
        switch = {} if account.pw_uid == os.geteuid() else {
            "user": account.pw_uid, "group": account.pw_gid, "extra_groups": []
        }
        try:
            done = subprocess.run(
                [str(executable), "-I", "-c", PROBE], **switch, cwd="/",
                env={"PATH": "/usr/bin:/bin"}, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
            )
        except OSError as exc:  # the exec itself, as the user
            reason = exc.strerror or str(exc)
        else:
            if done.returncode == 0:
                return None
            reason = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        where = closed_directory(executable) or closed_directory(Path(sysconfig.get_paths()["stdlib"]))
        mode = f" ({where} is mode {stat.S_IMODE(where.stat().st_mode):04o})" if where else ""
        return f"user {user} cannot run {executable}{mode}: {reason}"
    for path in (executable, Path(sysconfig.get_paths()["stdlib"])):
        where = closed_directory(path)
        if where is not None:
            return (
                f"{path} is inside {where} (mode {stat.S_IMODE(where.stat().st_mode):04o}), "
                f"which user {user} cannot enter"
            )
    if not executable.stat().st_mode & stat.S_IXOTH:
        return f"{executable} is not executable by others, such as user {user}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="service_python.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--user", required=True, help="the service's user (the unit's User=)")
    args = parser.parse_args(argv)
    problem = problem_for(args.user)
    if problem is None:
        return 0
    print(f"make install: the service's venv would link to an interpreter its user cannot run: {problem}; "
          f"{SUGGESTION} (the venv links to it, so --copies does not help)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
