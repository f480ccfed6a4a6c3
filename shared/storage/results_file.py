"""The ledger's durable writer of results.json (and requests.json, in the same form).

The format, its append rule and its readers are in image_result_client.results_files.
Each append is written and fdatasync'ed before append() returns. A crash mid-append
leaves a torn tail; `open()` repairs it before anything new is written: it
truncates after the last complete record line and writes the closing bracket
again. Records after that point were never acknowledged, so their tasks are
redelivered.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from image_result_client.results_files import (
    CLOSING,
    EMPTY,
    complete_records,
    encode_append,
    encode_file,
    encode_line,
    encoded_field,
    parse_line,
    starts_as_line_format,
)
from shared.crash_points import armed, crash_point
from shared.storage.files import fsync_directory, open_state_file

# How much of the end of the file is read at start for repair and for the
# ids of recent records (about 30,000 records).
TAIL_WINDOW = 8 * 1024 * 1024


class ResultsFileError(Exception):
    """results.json exists but is not a JSON array we can append to."""


class ResultsFile:
    """results.json, and requests.json in the same form (torn_point names the
    crash point that tears an append of this file)."""

    def __init__(self, path: Path, *, torn_point: str = "ledger_torn_append") -> None:
        self.path = path
        self.torn_point = torn_point
        self._fd = -1
        self._size = 0
        self._has_records = False

    def open(self) -> list[dict]:
        """Open (creating or repairing) the file; returns the records at its end."""
        self._fd = open_state_file(self.path, os.O_RDWR | os.O_CREAT)
        size = os.fstat(self._fd).st_size
        if size == 0:
            self._rewrite_empty()
            fsync_directory(self.path.parent)
            return []
        head = os.pread(self._fd, 3, 0)
        # A torn first append can leave just "[" or "[\n": ours, to be repaired.
        if not starts_as_line_format(head):
            self._migrate_foreign_array()
            size = os.fstat(self._fd).st_size
        return self._repair_tail(size)

    def append(self, records: list[dict]) -> None:
        """Append records durably (written and fdatasync'ed) before returning."""
        self.append_encoded([encode_line(r) for r in records])

    def append_encoded(self, lines: list[bytes]) -> None:
        """append() for records already made into lines by encode_line(): the
        ledger sends the same bytes on to the results stream."""
        if not lines:
            return
        text = encode_append(lines, after_records=self._has_records)
        offset = self._size - len(CLOSING)
        try:
            if armed(self.torn_point):
                _pwrite_all(self._fd, text[: len(text) // 2], offset)
                crash_point(self.torn_point)
            _pwrite_all(self._fd, text, offset)
            os.fdatasync(self._fd)
        except OSError:
            self._restore_closing(offset)
            raise
        self._size = offset + len(text)
        self._has_records = True

    def records_of_tasks(self, task_ids: set[str]) -> list[dict]:
        """Every record, anywhere in the file, of these task ids. A read of the
        whole file, for what open()'s tail window may not reach: at start, and
        only when the last ledger left something to decide by it."""
        needles = [encoded_field("task_id", task_id) for task_id in task_ids]
        found = []
        with open(self.path, "rb") as whole:
            for line in whole:
                if any(needle in line for needle in needles):
                    record = parse_line(line.rstrip(b"\n"))
                    if record is not None and record.get("task_id") in task_ids:
                        found.append(record)
        return found

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _repair_tail(self, size: int) -> list[dict]:
        window = min(size, TAIL_WINDOW)
        tail = os.pread(self._fd, window, size - window)
        records, end_of_last = complete_records(tail)
        if end_of_last is None:
            if window < size:
                raise ResultsFileError(f"{self.path}: no complete record in its last {window} bytes")
            self._rewrite_empty()
            return []
        good_size = size - window + end_of_last
        if good_size + len(CLOSING) != size or not tail.endswith(CLOSING):
            os.ftruncate(self._fd, good_size)
            _pwrite_all(self._fd, CLOSING, good_size)
            os.fsync(self._fd)
        self._size = good_size + len(CLOSING)
        self._has_records = True
        return records

    def _rewrite_empty(self) -> None:
        os.ftruncate(self._fd, 0)
        _pwrite_all(self._fd, EMPTY, 0)
        os.fsync(self._fd)
        self._size = len(EMPTY)
        self._has_records = False

    def _restore_closing(self, offset: int) -> None:
        """After a failed append (ENOSPC, EIO), put the file back as it was."""
        try:
            os.ftruncate(self._fd, offset)
            _pwrite_all(self._fd, CLOSING, offset)
        except OSError:
            pass  # open() repairs it on the next start

    def _migrate_foreign_array(self) -> None:
        """Rewrite a results.json from the original module (indented, whole-file)
        into our line format, once, atomically."""
        try:
            with open(self.path, "rb") as existing:
                records = json.load(existing)
        except (ValueError, OSError) as exc:
            raise ResultsFileError(f"{self.path} is not a JSON array of records: {exc}") from None
        if not isinstance(records, list):
            raise ResultsFileError(f"{self.path} holds JSON but not an array")
        staging = self.path.with_name(self.path.name + ".migrating")
        staging.write_bytes(encode_file([encode_line(r) for r in records]))
        fd = os.open(staging, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        os.replace(staging, self.path)
        fsync_directory(self.path.parent)
        os.close(self._fd)
        self._fd = open_state_file(self.path, os.O_RDWR)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written
