"""The ledger's JPEGs, from .partial to their final names: steps 1 and 2 of the
durable-step order (docs/design.md), and their recovery at start.

    worker --> OUTPUT_DIR/.partial/<task>.<delivery>.jpg
    make_durable(batch):  fdatasync each, then .partial itself
    publish(batch):       the names listed in .publishing (fdatasync'ed), then
                          each file renamed to a free final name, never replacing
    --> the ledger appends the records (step 3): committed()
    finish_interrupted(): at start, what a ledger killed in between left

Hazards handled here:
- OUTPUT_DIR may be shared with another uid: every path is opened relative to
  the directories' descriptors, a rename never replaces and never follows a
  link, and a name taken meanwhile moves on to the next free one. A completed
  record names only a file the pool put there.
- A ledger killed after renaming and before appending leaves files no record
  names: .publishing lists them, and the next start removes each one that is
  still the very file published (inode, owner), nothing else.
- A JPEG that cannot be made durable or given its name is not recorded: its
  task runs again, from its segment, or fails after MAX_ATTEMPTS.
"""

from __future__ import annotations

import os
import re
import stat
import time
from pathlib import Path

import structlog

from image_result_client.protocol import PARTIAL_DIR, partial_name
from shared.backoff import compute_backoff
from shared.config import Settings
from shared.ipc.records import COMPLETED, FAILED, RETRY, CompletionRecord
from shared.storage import files
from shared.storage.results_file import ResultsFile

log = structlog.get_logger()

PUBLISHING_NAME = ".publishing"
# Final names tried for one JPEG before its task is retried instead.
PUBLISH_RACES = 8
DIGITS = re.compile(r"[0-9]+")
FILE_NAME = re.compile(r"[^/\x00]+\.jpg")


class Publisher:
    """Moves a batch's JPEGs from .partial to their final names, durably."""

    def __init__(self, settings: Settings) -> None:
        self.output_dir = settings.output_dir
        self.max_attempts = settings.max_attempts
        self.journal = PublicationJournal(settings.output_dir / PUBLISHING_NAME)

    def open(self) -> None:
        """Open OUTPUT_DIR, .partial and .publishing (OSError if they are not the pool's)."""
        self.directories = files.prepare_output_dir(self.output_dir)
        self.journal.open()

    def committed(self) -> None:
        """The batch's records are appended: its names need no listing any more."""
        self.journal.committed()

    def discard_partial(self, record: CompletionRecord) -> None:
        """A duplicate's JPEG: its task has its record and file already."""
        if record.partial_path:
            files.remove_quietly(os.path.basename(record.partial_path), dir_fd=self.directories.partial_fd)

    def make_durable(self, records: list[CompletionRecord]) -> None:
        """Step 1, once for the whole batch. OSError if the names cannot be made
        durable: the batch is tried again later."""
        # A record published by an earlier try of this batch has no partial file left.
        completed = [r for r in records if r.status == COMPLETED and r.file_path is None]
        if completed and self.directories.follow_partial():
            log.warning("partial_dir_reopened", path=str(self.output_dir / PARTIAL_DIR))
        for record in completed:
            try:
                record.partial_inode = files.sync_data(
                    os.path.basename(record.partial_path), dir_fd=self.directories.partial_fd
                )
            except OSError as exc:
                self._retry_without_jpeg(record, f"could not make the JPEG durable: {exc}", "jpeg_sync_failed")
        if completed:
            files.fsync_directory(self.directories.partial_fd)

    def _retry_without_jpeg(self, record: CompletionRecord, error: str, event: str) -> None:
        """A JPEG that may not be on disk, or could not be given its name, is not
        recorded: the task runs again (or fails, after MAX_ATTEMPTS), from its
        segment, which is kept."""
        files.remove_quietly(os.path.basename(record.partial_path), dir_fd=self.directories.partial_fd)
        log.error(event, error=error, task_id=record.task_id, request_id=record.request_id)
        record.partial_path = record.width = record.height = record.bytes = record.file_path = None
        if record.delivery < self.max_attempts:
            record.status, record.error = RETRY, error
            record.retry_at = time.time() + compute_backoff(record.delivery, base=1.0, cap=300.0)
        else:
            record.status, record.error = FAILED, f"gave up after {record.delivery} attempts: {error}"

    def publish(self, records: list[CompletionRecord]) -> None:
        """Step 2, before the append: give each completed record's JPEG a free
        final name, with a rename that never replaces. The names are listed in
        .publishing first, durably, so that a crash before the append lets the
        next start remove the files no record names. A name taken meanwhile (a
        writer of another uid in a shared OUTPUT_DIR) moves on to the next
        free one; any other failure retries the task: a completed record names
        only a file the pool put there."""
        pending = [r for r in records if r.status == COMPLETED and r.file_path is None]
        if not pending:
            return
        names = self._free_names(pending)
        self.journal.note(pending, names)
        for record in pending:
            self._publish_one(record, names)
        files.fsync_directory(self.directories.output_fd)

    def _free_names(self, records: list[CompletionRecord], *, after: dict[int, int] | None = None) -> dict[int, tuple[int, str]]:
        """id(record) -> (collision number, final name) of a name free right now."""
        names: dict[int, tuple[int, str]] = {}
        taken: set[str] = set()
        for record in records:
            collision = (after or {}).get(id(record), -1) + 1
            while True:
                name = files.final_name(record.image_id or "image", record.finished_at, collision)
                if name not in taken and not self._exists(name):
                    break
                collision += 1
            taken.add(name)
            names[id(record)] = (collision, name)
        return names

    def _exists(self, name: str) -> bool:
        try:
            os.stat(name, dir_fd=self.directories.output_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return True

    def _publish_one(self, record: CompletionRecord, names: dict[int, tuple[int, str]]) -> None:
        partial = os.path.basename(record.partial_path)
        for _ in range(PUBLISH_RACES):
            collision, name = names[id(record)]
            try:
                files.publish(partial, name, src_dir_fd=self.directories.partial_fd,
                               dst_dir_fd=self.directories.output_fd)
            except FileExistsError:
                log.warning("final_name_taken", file_name=name, task_id=record.task_id, request_id=record.request_id)
                names.update(self._free_names([record], after={id(record): collision}))
                self.journal.note_again(record, names[id(record)][1])
                continue
            except OSError as exc:
                self._retry_without_jpeg(record, f"could not publish the JPEG as {name}: {exc}", "publish_failed")
                return
            record.file_path = os.path.join(os.fspath(self.output_dir), name)
            return
        self._retry_without_jpeg(
            record, f"could not publish the JPEG: {PUBLISH_RACES} final names in a row were taken", "publish_failed"
        )

    def remove_earlier_partials(self, record: CompletionRecord) -> None:
        """A worker killed between writing its partial file and sending the record
        leaves that file behind; the task's later delivery clears it."""
        if record.task_id is None:
            return
        for delivery in range(1, record.delivery):
            files.remove_quietly(partial_name(record.task_id, delivery), dir_fd=self.directories.partial_fd)

    def finish_interrupted(self, recent: list[dict], results: ResultsFile) -> None:
        """At start, what the last ledger left between publishing and recording.
        `recent` is the end of results.json; an entry of .publishing whose record
        is not there is looked for in the whole file before its file is removed:
        a file a durable record names is never removed."""
        recorded = _completed_by_task(recent)
        entries = self.journal.entries()
        unseen = {task_id for task_id, delivery, _, _ in entries if (task_id, delivery) not in recorded}
        if unseen:
            recorded.update(_completed_by_task(results.records_of_tasks(unseen)))
        for task_id, delivery, inode, name in entries:
            if (task_id, delivery) not in recorded:
                self._remove_unrecorded(task_id, inode, name)
        self.journal.clear()
        for (task_id, attempts), line in recorded.items():
            self._publish_recorded(task_id, attempts, line)
        files.fsync_directory(self.directories.output_fd)

    def _remove_unrecorded(self, task_id: str, inode: int, name: str) -> None:
        """A file published for a record that was never appended: its task is
        redelivered and makes another. Only the very file published goes (same
        inode, ours): anything else under that name is not the pool's."""
        try:
            found = os.stat(name, dir_fd=self.directories.output_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISREG(found.st_mode) and found.st_ino == inode and found.st_uid == os.geteuid():
            files.remove_quietly(name, dir_fd=self.directories.output_fd)
            log.info("unrecorded_file_removed", file_name=name, task_id=task_id)
        else:
            log.warning("unrecorded_file_not_ours", file_name=name, task_id=task_id)

    def _publish_recorded(self, task_id: str, attempts: int, line: dict) -> None:
        """A record whose JPEG is still under .partial (a power cut undid the
        rename, or a ledger of the previous version, which appended first, died)."""
        partial = partial_name(task_id, attempts)
        partial_fd, output_fd = self.directories.partial_fd, self.directories.output_fd
        try:
            kept = os.stat(partial, dir_fd=partial_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        final = Path(line.get("file_path") or "")
        if final.parent != self.output_dir:
            files.remove_quietly(partial, dir_fd=partial_fd)
            return
        fields = {"file_path": str(final), "task_id": task_id, "request_id": line.get("request_id")}
        try:
            there = os.stat(final.name, dir_fd=output_fd, follow_symlinks=False)
        except FileNotFoundError:
            try:
                files.publish(partial, final.name, src_dir_fd=partial_fd, dst_dir_fd=output_fd)
            except OSError as exc:  # a name planted meanwhile: the next start replaces it
                log.error("publication_failed", error=str(exc), **fields)
                return
            log.info("publication_finished", **fields)
            return
        if (there.st_dev, there.st_ino) == (kept.st_dev, kept.st_ino):
            files.remove_quietly(partial, dir_fd=partial_fd)  # published, only the old name was left
            return
        # The durable record claims this name, and the pool never puts a second
        # file under a name it gave: whatever is there was put by someone else.
        # A rename replaces that entry without following it (a symlink's target
        # is untouched).
        try:
            os.rename(partial, final.name, src_dir_fd=partial_fd, dst_dir_fd=output_fd)
        except OSError as exc:
            log.error("publication_failed", error=str(exc), **fields)
            return
        log.warning("publication_restored", replaced=stat.filemode(there.st_mode), owner_uid=there.st_uid, **fields)


class PublicationJournal:
    """OUTPUT_DIR/.publishing: the final names a batch is about to be published
    under, written and fdatasync'ed before the renames. A ledger killed between
    publishing and appending leaves files that no record names; the next one
    finds them here. One line per file: `<task id> <delivery> <inode> <name>`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = -1
        self._lines: dict[int, str] = {}  # id(record) -> its line, for the batch being published

    def open(self) -> None:
        self._fd = files.open_state_file(self.path, os.O_RDWR | os.O_CREAT, 0o600)

    def note(self, records: list[CompletionRecord], names: dict[int, tuple[int, str]]) -> None:
        """Before the renames: kept with those of an earlier try of the same
        batch (an append that failed), whose files are published already."""
        self._lines.update({id(r): f"{r.task_id} {r.delivery} {r.partial_inode} {names[id(r)][1]}" for r in records})
        self._write()

    def committed(self) -> None:
        """The batch is recorded: its listing goes, in memory and on disk. Not
        synced: should a power cut bring it back, it lists only the batch at the
        end of results.json, whose records the next start finds."""
        if self._lines:
            self._lines = {}
            os.ftruncate(self._fd, 0)

    def note_again(self, record: CompletionRecord, name: str) -> None:
        """The record's name was taken before its rename: the next one it tries."""
        self._lines[id(record)] = f"{record.task_id} {record.delivery} {record.partial_inode} {name}"
        self._write()

    def entries(self) -> list[tuple[str, int, int, str]]:
        text = os.pread(self._fd, 1 << 22, 0).decode("utf-8", errors="replace")
        found = []
        for line in text.splitlines():
            fields = line.split(" ", 3)
            if len(fields) == 4 and DIGITS.fullmatch(fields[1] + fields[2]) and FILE_NAME.fullmatch(fields[3]):
                found.append((fields[0], int(fields[1]), int(fields[2]), fields[3]))
        return found

    def clear(self) -> None:
        os.ftruncate(self._fd, 0)

    def _write(self) -> None:
        listing = "\n".join(self._lines.values()).encode()
        os.pwrite(self._fd, listing, 0)
        os.ftruncate(self._fd, len(listing))
        os.fdatasync(self._fd)


def _completed_by_task(lines: list[dict]) -> dict[tuple[str, int], dict]:
    """(task id, attempts) -> its completed record line."""
    return {
        (line["task_id"], line["attempts"]): line
        for line in lines
        if line.get("status") == COMPLETED and isinstance(line.get("task_id"), str)
        and isinstance(line.get("attempts"), int)
    }
