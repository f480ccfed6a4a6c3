"""The socket a pool started by the harness sends its sd_notify datagrams to,
as systemd's NOTIFY_SOCKET would be: READY=1 (and when it came), STATUS=,
STOPPING=1, WATCHDOG=1.

The one readiness signal the harness waits for is READY=1, the one systemd
waits for. Its time is taken as the datagram is received, so that start-up is
measured to it, not to whenever a waiter next looked.
"""

from __future__ import annotations

import select
import socket
import tempfile
import time
from pathlib import Path

# AF_UNIX paths are capped at 107 bytes; pytest's tmp paths and a deep --tmp can be longer.
MAX_SOCKET_PATH = 100


class NotifySocket:
    """A bound datagram socket in `directory` (or a short temp directory) that keeps
    every datagram received, decoded, oldest first."""

    def __init__(self, directory: Path) -> None:
        self._own_directory = len(str(directory / "notify.sock")) > MAX_SOCKET_PATH
        self._directory = Path(tempfile.mkdtemp(prefix="pool-notify-")) if self._own_directory else directory
        self.path = self._directory / "notify.sock"
        self._socket: socket.socket | None = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._socket.bind(str(self.path))
        self._socket.setblocking(False)
        self._datagrams: list[str] = []
        self.ready_at: float | None = None  # perf_counter() when READY=1 was received

    def receive(self, timeout: float) -> None:
        """Take in whatever has arrived, waiting up to timeout for the first datagram."""
        if self._socket is None:
            return
        readable, _, _ = select.select([self._socket], [], [], timeout)
        while readable:
            try:
                datagram = self._socket.recv(65536).decode(errors="replace")
            except BlockingIOError:
                return
            if self.ready_at is None and "READY=1" in datagram.splitlines():
                self.ready_at = time.perf_counter()
            self._datagrams.append(datagram)

    def datagrams(self) -> list[str]:
        """Every datagram received so far."""
        self.receive(timeout=0)
        return list(self._datagrams)

    def close(self) -> None:
        """Keep what has arrived, then close and remove the socket; safe to repeat."""
        if self._socket is None:
            return
        self.receive(timeout=0)
        self._socket.close()
        self._socket = None
        self.path.unlink(missing_ok=True)
        if self._own_directory:
            self._directory.rmdir()
