"""What every child process does first after fork."""

from __future__ import annotations

import ctypes
import os
import signal

import setproctitle

PR_SET_PDEATHSIG = 1
TITLE_PREFIX = "image-result-worker"
# A ledger whose heartbeat is older than this is wedged: not healthy, no
# watchdog ping, and `check` fails.
LEDGER_STALE_SECONDS = 30.0


def set_title(role: str) -> None:
    """Name the process after its role, as ps and top show it."""
    setproctitle.setproctitle(f"{TITLE_PREFIX}: {role}")


def die_with_parent(expected_parent: int) -> None:
    """Ask the kernel to SIGTERM us when the supervisor dies, even by kill -9.

    The loop also compares getppid() with `expected_parent`, which covers a
    supervisor that died before this call and kernels without prctl.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != expected_parent:
        os.kill(os.getpid(), signal.SIGTERM)


def parent_alive(expected_parent: int) -> bool:
    return os.getppid() == expected_parent


def reset_signals_in_child(on_terminate) -> None:
    """Children ignore Ctrl-C (it reaches the whole process group; only the
    supervisor decides) and take SIGTERM as "finish and stop"."""
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, on_terminate)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
