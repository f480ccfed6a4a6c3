"""The one harness that tests, the benchmark, the soak and the demo start the pool with.

    pool.py         `python supervisor.py` in its own session: settings, logs, stop/kill
      notify.py       its sd_notify socket: READY=1 (and when it came), STOPPING=1, WATCHDOG=1
      procfs.py       /proc: its children, their titles, session members, CPU
    segments.py     shared-memory segments made as producers make them, unlinked if left
    photos.py       real photos (scikit-image) at any size
    results.py      results.json read while the ledger appends to it
    http_server.py  a loopback HTTP server for URL tasks
    hostile_images.py  images built to cost a decoder more than their size says

Not part of the service: the Dockerfile does not COPY it and pyproject.toml
packages only image_result_client. Nothing here imports from tests/.
"""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


class PoolFailed(AssertionError):
    """The pool did not do what the harness waited for (it exited early, sent no
    READY=1, would not stop, left results.json torn). An AssertionError, so that a
    test meeting it fails with the message; the bench, soak and demo catch it."""
