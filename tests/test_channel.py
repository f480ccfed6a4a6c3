"""The worker-to-ledger channel: what a worker sends always arrives whole, so
no record, however large its parts, can cut a datagram and crash the ledger."""

from __future__ import annotations

import socket
from datetime import datetime

import pytest

from shared.ipc import channel
from shared.ipc.records import COMPLETED, FAILED, CompletionRecord

pytestmark = pytest.mark.fast


def record(n: int, *, error: str | None = None) -> CompletionRecord:
    envelope = b"irw2 task%d 1 %d s\n" % (n, 2_000_000) + b"m" * 60_000
    return CompletionRecord(
        task_id=f"task{n}", delivery=1, envelope=envelope, processing_key="{q}:processing:i:w1",
        request_id=f"r{n}", image_id=f"i{n}", status=FAILED if error else COMPLETED,
        finished_at=datetime(2026, 12, 2), error=error,
    )


def received(sock: socket.socket) -> list[CompletionRecord]:
    records: list[CompletionRecord] = []
    sock.setblocking(False)
    while True:
        try:
            datagram = sock.recv(channel.MAX_DATAGRAM)
        except BlockingIOError:
            return records
        records += channel.decode_records(datagram)


def test_records_too_large_together_go_one_by_one_and_one_too_large_alone_fails() -> None:
    worker, ledger = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    worker.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, channel.SEND_BUFFER_BYTES)
    ledger.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * channel.MAX_DATAGRAM)
    with worker, ledger:
        batch = [record(n) for n in range(12)] + [record(99, error="e" * 3_000_000)]
        channel.send_records(worker, batch)
        got = received(ledger)
    assert [r.task_id for r in got] == [r.task_id for r in batch]
    assert [r.status for r in got[:12]] == [COMPLETED] * 12
    too_large = got[12]
    assert too_large.status == FAILED and "too large to send" in too_large.error
    # The acknowledgement finds the envelope by its header, kept whole.
    assert too_large.envelope.startswith(b"irw2 task99 1 2000000 s\n")
    assert too_large.dead_letter()


def test_a_worker_sees_at_once_that_the_ledger_is_gone() -> None:
    """A worker whose decode overran waits for its failed record's
    acknowledgement; with the ledger dead it must not wait out TASK_TIMEOUT / 2."""
    worker_end, ledger_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with worker_end:
        assert not channel.peer_gone(worker_end)
        ledger_end.close()
        assert channel.peer_gone(worker_end)
