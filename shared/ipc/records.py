"""The completion record: what a worker sends the ledger for each task it ends.

It carries both the results.json line and what the ledger needs to finish the
task after that line is durable: the partial file to publish, the envelope to
acknowledge, the segment to unlink and, for a failure, the dead letter.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from datetime import datetime

from shared.messages import EXPIRED_PREFIX

COMPLETED = "completed"
FAILED = "failed"
# Not a results.json status: the task goes to the delayed-retry set instead.
RETRY = "retry"
# Bytes of the message and of each id kept in a record too large to send.
TOO_LARGE_KEPT = 1024


@dataclass(slots=True)
class CompletionRecord:
    task_id: str | None
    delivery: int
    envelope: bytes
    processing_key: str
    request_id: str | None
    image_id: str | None
    status: str
    finished_at: datetime
    error: str | None = None
    source: str | None = None
    width: int | None = None
    height: int | None = None
    bytes: int | None = None
    duration_ms: float | None = None
    partial_path: str | None = None
    segment_name: str | None = None
    request_images: int | None = None  # its request's declared image count, when it is counted (docs/formats.md)
    retry_at: float | None = None  # epoch seconds, for RETRY
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase, for metrics
    sent_at: float = 0.0  # epoch seconds, when the worker sent it; the ledger's lag starts here
    backlog: bool = False  # its task came in a full claim: more are waiting in the queue
    file_path: str | None = None  # chosen by the ledger, set once the file has that name
    partial_inode: int | None = None  # set by the ledger when it syncs the partial file
    results_json: bytes | None = None  # set by the ledger: the line it appended, sent on to the results stream
    duplicate: bool = False  # set by the ledger: this task already has its record
    # The message gave no request id (not JSON, not an object, none in it): its
    # dead letter is capped apart, so a flood of junk keeps the real ones.
    junk: bool = False

    @property
    def expired(self) -> bool:
        """A task failed because its deadline passed before it could start or
        before its retry came due (the worker's errors for it start with
        shared.messages.EXPIRED_PREFIX)."""
        return self.status == FAILED and (self.error or "").startswith(EXPIRED_PREFIX)

    def too_large(self, size: int) -> CompletionRecord:
        """This task's failure, small enough to send, for a record of `size`
        bytes that is not. The envelope keeps its header and the start of the
        message: the acknowledgement finds the whole one by its header."""
        header, _, body = self.envelope.partition(b"\n")
        return CompletionRecord(
            task_id=self.task_id,
            delivery=self.delivery,
            envelope=header + b"\n" + body[:TOO_LARGE_KEPT],
            processing_key=self.processing_key,
            request_id=(self.request_id or "")[:TOO_LARGE_KEPT] or None,
            image_id=(self.image_id or "")[:TOO_LARGE_KEPT] or None,
            status=FAILED,
            finished_at=self.finished_at,
            error=f"its completion record ({size} bytes) is too large to send to the ledger",
            source=self.source,
            duration_ms=self.duration_ms,
            segment_name=self.segment_name,
            request_images=self.request_images,
            sent_at=self.sent_at,
        )

    def results_line(self) -> dict:
        """The record as results.json holds it; the seed's five fields come first."""
        line = {
            "timestamp": self.finished_at.isoformat(),
            "request_id": self.request_id,
            "image_id": self.image_id,
            "file_path": self.file_path,
            "status": self.status,
        }
        if self.error is not None:
            line["error"] = self.error
        line.update(
            task_id=self.task_id,
            attempts=self.delivery,
            source=self.source,
            width=self.width,
            height=self.height,
            bytes=self.bytes,
            duration_ms=self.duration_ms,
        )
        return line

    def dead_letter(self) -> bytes:
        """The dead-letter list entry: the raw message and why it failed."""
        return dead_letter_entry(
            failed_at=self.finished_at,
            task_id=self.task_id,
            request_id=self.request_id,
            image_id=self.image_id,
            attempts=self.delivery,
            error=self.error,
            # The message as the producer sent it: the envelope's body.
            message=self.envelope.partition(b"\n")[2],
        )


def dead_letter_entry(
    *,
    failed_at: datetime,
    task_id: str | None,
    request_id: str | None,
    image_id: str | None,
    attempts: int,
    error: str | None,
    message: bytes,
) -> bytes:
    """One entry of `{Q}:dead`, as `dead list` shows it and `dead requeue` replays it."""
    entry: dict = {
        "failed_at": failed_at.isoformat(),
        "task_id": task_id,
        "request_id": request_id,
        "image_id": image_id,
        "attempts": attempts,
        "error": error,
    }
    try:
        entry["message"] = message.decode("utf-8")
    except UnicodeDecodeError:
        entry["message_base64"] = base64.b64encode(message).decode("ascii")
    return json.dumps(entry, ensure_ascii=True).encode()
