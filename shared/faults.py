"""Crash points for the fault-injection tests: inert unless IRW_CRASH_AT names one.

The tests arm one point of the durable-step order (see workers/ledger.py) and
check that a SIGKILL exactly there still ends every task exactly once. With
IRW_CRASH_MARKER set, the point fires once: the first process to reach it
creates the marker file and dies; later ones (its replacement) pass.
Read from the environment once, at import, before any fork.
"""

from __future__ import annotations

import os
import signal

ARMED_POINT = os.environ.get("IRW_CRASH_AT", "")
MARKER = os.environ.get("IRW_CRASH_MARKER", "")


def crash_point(name: str) -> None:
    if name != ARMED_POINT:
        return
    if MARKER:
        try:
            os.close(os.open(MARKER, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    os.kill(os.getpid(), signal.SIGKILL)


def armed(name: str) -> bool:
    return name == ARMED_POINT
