"""TEST HOOK, not a feature: the crash points of the fault-injection tests.
Inert unless IRW_CRASH_AT names one; the supervisor logs `crash_point_armed`
as a warning when it does, so an armed point never runs unnoticed.

The tests arm one point of the durable-step order (see workers/ledger.py) and
check that a SIGKILL exactly there still ends every task exactly once. With
IRW_CRASH_MARKER set, the point fires once: the first process to reach it
creates the marker file and dies; later ones (its replacement) pass. With
IRW_CRASH_HOST=true the whole process group dies there instead, as when a host
loses power. Read from the environment once, at import, before any fork.
"""

from __future__ import annotations

import os
import signal

ARMED_POINT = os.environ.get("IRW_CRASH_AT", "")
MARKER = os.environ.get("IRW_CRASH_MARKER", "")
WHOLE_HOST = os.environ.get("IRW_CRASH_HOST", "") == "true"


def crash_point(name: str) -> None:
    if name != ARMED_POINT:
        return
    if MARKER:
        try:
            os.close(os.open(MARKER, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    if WHOLE_HOST:
        os.killpg(0, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def armed(name: str) -> bool:
    return name == ARMED_POINT
