"""The channel from each worker to the ledger: one Unix SOCK_SEQPACKET
connection per worker, on an abstract-namespace address private to one
supervisor instance.

Why not one shared multiprocessing.Queue: its writers share a lock and a pipe,
and a writer killed mid-send can leave the lock held or half a message in the
pipe, wedging or corrupting the channel for every other worker. Here each
worker owns its connection; SEQPACKET delivers whole messages or nothing, and
a worker's death is an end-of-file on its own connection only. A death costs
at most that worker's unsent records, which redelivery covers.
"""

from __future__ import annotations

import pickle
import select
import socket

from shared.ipc.records import CompletionRecord

SEND_BUFFER_BYTES = 1 << 20
# The largest datagram the ledger reads; one larger would be cut, and unpickling
# the rest would fail.
MAX_DATAGRAM = 1 << 20


def ledger_address(instance: str) -> str:
    # A leading NUL makes the name abstract: nothing on disk to clean up after a crash.
    return f"\0image-result-worker-{instance}"


def listen(address: str) -> socket.socket:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    server.bind(address)
    server.listen(256)
    return server


def connect(address: str) -> socket.socket:
    """Connect to the ledger; ConnectionRefusedError/FileNotFoundError while it is not up."""
    client = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        client.connect(address)
    except OSError:
        client.close()
        raise
    return client


def send_records(sock: socket.socket, records: list[CompletionRecord]) -> None:
    """One datagram: the ledger gets all of these records or none. Records that
    do not fit in one go one by one; a record that does not fit alone is sent
    as its failure (CompletionRecord.too_large), so nothing the ledger reads is
    ever cut short."""
    payload = pickle.dumps(records, protocol=pickle.HIGHEST_PROTOCOL)
    if len(payload) <= MAX_DATAGRAM:
        sock.sendall(payload)
        return
    for record in records:
        payload = pickle.dumps([record], protocol=pickle.HIGHEST_PROTOCOL)
        if len(payload) > MAX_DATAGRAM:
            payload = pickle.dumps([record.too_large(len(payload))], protocol=pickle.HIGHEST_PROTOCOL)
        sock.sendall(payload)


def decode_records(datagram: bytes) -> list[CompletionRecord]:
    # Anyone on the host can find an abstract address (/proc/net/unix); the
    # ledger accepts only connections of its own uid (SO_PEERCRED), a user who
    # could as well ptrace it, so unpickling what they send trusts no one new.
    return pickle.loads(datagram)


def peer_gone(sock: socket.socket) -> bool:
    """Whether the other end of a channel has closed (the ledger died), without
    waiting: the ledger never sends, so anything poll() reports is a hang-up."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))
