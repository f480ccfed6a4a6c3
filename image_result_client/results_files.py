"""results.json and requests.json: the format, its one writer of a line, and its readers.

    [
    {"timestamp": ..., "request_id": ..., "status": "completed", ...},
    {"timestamp": ..., "request_id": ..., "status": "failed", "error": ...}
    ]

Each file is a JSON array with one record per line: "[\\n", the record lines
joined by ",\\n", then "\\n]\\n" (an empty file is "[\\n]\\n"). The pool's ledger
(shared/storage/results_file.py) is the only writer; everything here is what a reader
may rely on.

The append rule: an append overwrites only the closing "\\n]\\n", with
",\\n<record lines>\\n]\\n" (without the comma on the first append), in one
write, so its cost does not grow with the file. Hence:
- The bytes up to the "}" ending the last complete record line never change.
  A follower keeps the offset just past that "}" and reads from there on; it
  never moves past "]", where the next append begins.
- A reader racing an append may see a torn tail: the append's first bytes over
  the old closing (",]\\n" after one byte), or a record line without its
  newline yet. A record line followed by its newline is complete (the record
  and its newline come in the same write, in order); a line without one is
  read again later. A record line is "{...}" with the "," (or, in that
  one-byte tear, ",]") after it stripped.
- The file may shrink (the ledger cuts a torn tail left by a crash at its next
  start, or puts the closing back after a failed write) or be replaced (its
  one-off migration of an older whole-file array): a follower then starts again
  from the beginning.

Record lines are ASCII JSON (ensure_ascii), so a newline, or the text "\\n]\\n",
inside a string is escaped and never splits a line.

Only the standard library: the pool imports this module too.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

OPENING = b"[\n"
SEPARATOR = b",\n"
CLOSING = b"\n]\n"
EMPTY = OPENING + b"]\n"
# A follower reads at most this much at once, so a first read of a large file
# never holds all of it in memory.
READ_CHUNK = 4 * 1024 * 1024
# lines_from_end() reads backwards in pieces of this size.
BACKWARD_CHUNK = 1 << 20
# How long read_records() waits between two reads of a torn tail.
TORN_RETRY_SECONDS = 0.02


# -- writing --------------------------------------------------------------------------


def encode_line(record: dict) -> bytes:
    """One record as results.json holds it (ASCII JSON, one line)."""
    return json.dumps(record, ensure_ascii=True).encode()


def encoded_field(name: str, value: str) -> bytes:
    """The bytes encode_line writes for one string field, `"name": "value"`: a
    cheap test of a raw line before parse_line, for a search by id."""
    return json.dumps(name).encode() + b": " + json.dumps(value, ensure_ascii=True).encode()


def encode_file(lines: list[bytes]) -> bytes:
    """A whole file holding these record lines (made by encode_line)."""
    if not lines:
        return EMPTY
    return OPENING + SEPARATOR.join(lines) + CLOSING


def encode_append(lines: list[bytes], *, after_records: bool) -> bytes:
    """What an append of these record lines writes over the closing "\\n]\\n"
    (`after_records`: the file holds records already, so a comma comes first)."""
    return (SEPARATOR if after_records else b"\n") + SEPARATOR.join(lines) + CLOSING


def starts_as_line_format(head: bytes) -> bool:
    """Whether the first bytes of a file are this format's: a first record line,
    or a prefix of the empty array (all a torn first append may leave)."""
    return head.startswith(OPENING + b"{") or EMPTY.startswith(head)


# -- parsing --------------------------------------------------------------------------


def record_lines(data: bytes, *, through_end: bool = False) -> Iterator[tuple[bytes, int]]:
    """Each record line among the lines of `data` that a newline ends: its text
    (without the "," after it) and the offset in `data` just past its "}".

    With `through_end`, the last line counts too though no newline ends it; it
    may then be torn, and only parsing it (parse_line) tells.
    """
    pieces = data.split(b"\n")
    if not through_end:
        pieces.pop()  # no newline after it: torn, or empty
    position = 0
    for piece in pieces:
        start = position
        position += len(piece) + 1
        # _record_text() inlined: this loop is on the benchmark's measuring path.
        text = piece.rstrip(b",]")
        if text.startswith(b"{") and text.endswith(b"}"):
            yield text, start + len(text)


def parse_line(line: bytes) -> dict[str, Any] | None:
    """The record on one line of a results file (or in one results stream entry,
    which holds the same bytes); None for "[", "]", a torn line, or anything
    that is not a JSON object."""
    text = _record_text(line)
    return None if text is None else _object_of(text)


def complete_records(data: bytes) -> tuple[list[dict[str, Any]], int | None]:
    """The records on the complete lines of `data`, a file's tail, and the offset
    just past the last one's "}" (None: there is none). The last line counts
    when it parses, though a crash cut the newline after it."""
    records: list[dict[str, Any]] = []
    end_of_last: int | None = None
    for text, end in record_lines(data, through_end=True):
        record = _object_of(text)
        if record is not None:
            records.append(record)
            end_of_last = end
    return records, end_of_last


def _record_text(line: bytes) -> bytes | None:
    text = line.rstrip(b",]")
    return text if text.startswith(b"{") and text.endswith(b"}") else None


def _object_of(text: bytes) -> dict[str, Any] | None:
    """A record line's text (as record_lines gives it) parsed, if it is a JSON object."""
    try:
        record = json.loads(text)
    except (ValueError, RecursionError):  # ValueError covers a torn UTF-8 sequence too
        return None
    return record if isinstance(record, dict) else None


# -- reading --------------------------------------------------------------------------


class UnreadableResults(ValueError):
    """A results file that stays unparsable, or holds something other than an array."""


def read_records(path: Path, *, timeout: float = 5.0) -> list[dict[str, Any]]:
    """Every record of a results file, the whole file parsed as the JSON array it
    is; [] when it does not exist. A torn tail (an append racing this read) is
    read again for up to `timeout` seconds, then UnreadableResults."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return []
        try:
            records = json.loads(raw)  # ValueError covers a torn UTF-8 sequence too
        except ValueError as exc:
            if time.monotonic() >= deadline:
                raise UnreadableResults(
                    f"{path} stayed unparsable for {timeout}s: {exc}; tail: {raw[-200:]!r}"
                ) from exc
            time.sleep(TORN_RETRY_SECONDS)
            continue
        if not isinstance(records, list):
            raise UnreadableResults(f"{path} holds {type(records).__name__}, not a JSON array")
        return records


class ResultsFollower:
    """Follows a results file as the ledger appends to it: each poll() hands out
    the record lines appended since the last one, by the append rule above.

    `count` is the number of record lines handed out from the file as it is
    now (it starts again at 0 with a file that shrank or was replaced).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.count = 0
        self._offset = 0  # just past the "}" of the last record line handed out
        self._identity: tuple[int, int] | None = None
        self._size_read = -1  # the size last read through to a tail a newline ends; -1: none

    def poll(self) -> Iterator[bytes]:
        """The record lines appended since the last poll, in order, each without
        the "," after it; nothing while the file does not exist."""
        try:
            seen = os.stat(self.path)
        except FileNotFoundError:
            return
        # Past a tail that a newline ends, the file only changes by growing (an
        # append that completes is longer than any torn state of it), so the
        # same size means nothing new. A torn tail is read again whatever its
        # size: the next ledger cuts it and appends again, which can bring the
        # file back to the size last read with a whole record in it.
        if (seen.st_dev, seen.st_ino) == self._identity and seen.st_size == self._size_read:
            return
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            stat = os.fstat(fd)
            identity = (stat.st_dev, stat.st_ino)
            if identity != self._identity or stat.st_size < self._offset:
                self._identity, self._offset, self.count = identity, 0, 0
            ends_with_newline = False
            while self._offset < stat.st_size:
                base = self._offset
                chunk = os.pread(fd, min(READ_CHUNK, stat.st_size - base), base)
                ends_with_newline = base + len(chunk) == stat.st_size and chunk.endswith(b"\n")
                for text, end in record_lines(chunk):
                    self._offset = base + end
                    self.count += 1
                    yield text
                if self._offset == base:
                    break  # only a torn tail (or "]") is left; a later poll sees more
            self._size_read = stat.st_size if ends_with_newline else -1
        finally:
            os.close(fd)

    def records(self) -> Iterator[dict[str, Any]]:
        """poll(), each line parsed; a line that is not a JSON object is passed over."""
        for text in self.poll():
            record = _object_of(text)
            if record is not None:
                yield record


def lines_from_end(path: Path, *, limit: int | None) -> Iterator[bytes]:
    """The lines of a file, last first, reading at most `limit` bytes from its
    end (None: all of it); parse_line() tells the record lines. A symlink is
    not followed."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        size = os.fstat(fd).st_size
        position, carry, read = size, b"", 0
        while position > 0 and (limit is None or read < limit):
            size_now = min(BACKWARD_CHUNK, position) if limit is None else min(BACKWARD_CHUNK, position, limit - read)
            position -= size_now
            chunk = os.pread(fd, size_now, position) + carry
            read += size_now
            lines = chunk.split(b"\n")
            carry = lines[0]  # may continue before this chunk
            yield from reversed(lines[1:])
        if position == 0 and carry:
            yield carry
    finally:
        os.close(fd)
