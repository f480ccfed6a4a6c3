"""A worker's guard on decoding: a thread that ends a decode past its CPU budget.

    worker, main thread:  with watchdog.watching(on_overrun): cv2.imdecode(...)
    watchdog thread:      every poll, while a decode runs, reads the main
                          thread's CPU clock:
                            advancing  -> beats the worker's heartbeat
                            past budget -> on_overrun(cpu_seconds), which
                                           fails the task and ends the process

Why a thread, and why the process ends: a decoder is C code that Python cannot
interrupt, but OpenCV releases the GIL while it decodes, so a thread runs
beside it; the one way to stop the decoder is to end the process. Ending it
here, with the task's failed record sent first, makes a decode that runs too
long one failed task. Left to the supervisor's TASK_TIMEOUT, it would be a
kill, a redelivery and the same decode again, MAX_ATTEMPTS times.

Why CPU time: what an image costs to decode is CPU; on a busy machine the wall
clock would blame the image for the load. For the same reason the heartbeat is
beaten while the decode's CPU clock advances: such a worker is working, not
hung, and this budget, not TASK_TIMEOUT, is what ends it.

Hazards handled here:
- The decode ends just as the budget runs out: on_overrun runs under the lock
  that ending `watching` takes, after checking the same decode is still
  running, so a task never gets both its own record and a failed one.
- A thread does not survive fork: start() is called in the worker, after it.
- A signal the kernel hands to this thread would not interrupt the main
  thread's blocking wait for work (a stop would wait out the wait): the
  thread starts with every signal blocked, so they all go to the main thread.
"""

from __future__ import annotations

import contextlib
import contextvars
import signal
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.sharedctypes import Synchronized

# How often a running decode is looked at: a budget is met within a quarter
# of itself or POLL_SECONDS, whichever is less, but no thread wakes more
# often than every MIN_POLL_SECONDS for it.
POLL_SECONDS = 0.5
MIN_POLL_SECONDS = 0.01


class DecodeWatchdog:
    def __init__(self, *, budget: float, heartbeat: Synchronized) -> None:
        self.budget = budget
        self.heartbeat = heartbeat
        self._poll = max(MIN_POLL_SECONDS, min(POLL_SECONDS, budget / 4))
        self._lock = threading.Lock()
        self._watched: tuple[float, Callable[[float], None]] | None = None
        self._clock: int | None = None

    def start(self) -> None:
        """Watch the calling thread's decodes from now on (call it in the worker)."""
        self._clock = time.pthread_getcpuclockid(threading.get_ident())
        # The worker's log context (its slot and pid) goes with the thread.
        context = contextvars.copy_context()
        thread = threading.Thread(target=context.run, args=(self._run,), name="decode-watchdog", daemon=True)
        unblocked = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        try:
            thread.start()  # with the mask blocked: the thread keeps it
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, unblocked)

    @contextlib.contextmanager
    def watching(self, on_overrun: Callable[[float], None]) -> Iterator[None]:
        """Run the body as a watched decode. `on_overrun` is called from the
        watchdog thread with the CPU seconds used, and must not return."""
        if self._clock is None:
            yield
            return
        self._watched = (time.clock_gettime(self._clock), on_overrun)
        try:
            yield
        finally:
            with self._lock:
                self._watched = None

    def _run(self) -> None:
        assert self._clock is not None
        last_seen = 0.0
        while True:
            time.sleep(self._poll)
            watched = self._watched
            if watched is None:
                continue
            started, on_overrun = watched
            now = time.clock_gettime(self._clock)
            if now > last_seen:
                self.heartbeat.value = time.monotonic()
                last_seen = now
            if now - started >= self.budget:
                with self._lock:
                    if self._watched is watched:
                        on_overrun(now - started)
