"""The ledger writer: the only process that touches results.json.

Data flow, in the order that makes a task durable (the crash-safety contract):

    worker socket -> batch of completion records (a fuller one under a backlog)
      1. make the batch's JPEGs durable: fdatasync each partial file (the
         workers started their write-back), fsync OUTPUT_DIR/.partial
      2. mark the batch's task ids as being committed on this host, in Redis;
         publish each partial file under its final name (a rename that never
         replaces; the names listed in OUTPUT_DIR/.publishing first), fsync
         OUTPUT_DIR. A name another uid took moves on to the next free one, and
         a publication that fails retries the task: a record never names a
         file the pool did not put there
      3. append the batch to results.json, fdatasync       <- the commit point
      4. acknowledge in Redis, in one Lua script: LREM from the processing
         lists, each failure's dead letter (once per task id), each transient
         failure into the delayed-retry set, the counts `status` shows
      5. unlink the tasks' shared-memory segments (listed in OUTPUT_DIR/.unlink-pending
         before step 4, so a crash between 4 and 5 leaks none)
      6. append the request records that step 4 ended (shared.state.request_state:
         counted in the same transaction, and put on this host's unwritten list
         in Redis) to requests.json, fdatasync; skipped for a record id already
         in the file
      7. take them off the unwritten list. What a crash leaves there (and what
         the supervisor's upkeep ended as "incomplete") is written at start and
         every second

Steps 1 and 2, and their recovery at start, are workers/publication.py's.

A crash before 2 loses nothing: the tasks are still in their processing lists
and are redelivered. A JPEG whose fdatasync fails (EIO) is never trusted, even
if a later fdatasync would succeed: its task is retried like a transient error.
A crash between 2 and 3 leaves files no record names: the next
start removes each file .publishing lists whose task has no record, if it is
still the very file published (its inode). A record left naming a partial file
(a power cut, or a ledger of the previous version) is published at the next
start; an entry someone else put under its recorded name is replaced, since
the record already claims that name. A crash between 3 and 4 redelivers
tasks that are already recorded: the ledger knows the ids of the records it
holds (the end of results.json, read at start, and everything since) and drops
such a duplicate, deleting its partial file and acknowledging it. Another
host's ledger would not know them: the mark of step 2 sends those tasks back
to this host's queue when this host dies, and the acknowledgement removes it.
So each task ends as exactly one record and one file.

Hazards handled here:
- A torn results.json tail (kill -9 mid-append) is repaired before any append.
- ENOSPC or EIO while appending: the batch is kept and retried with backoff,
  and no worker socket is read meanwhile, so the pool slows down instead of
  acknowledging anything that is not durable.
- Redis away: commits and acknowledgements wait, with backoff (a commit must
  first be marked in Redis). Nothing is acknowledged twice or before its
  record is durable.
"""

from __future__ import annotations

import hashlib
import json
import os
import selectors
import signal
import socket
import struct
import sys
import time
from collections import Counter, deque
from collections.abc import Iterable
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path

import structlog

from image_result_client.protocol import REQUESTS_NAME, RESULTS_NAME, QueueKeys
from image_result_client.results_files import encode_line
from shared import exitcodes, process
from shared.backoff import compute_backoff
from shared.config import Settings
from shared.crash_points import crash_point
from shared.imaging.segments import SegmentAccess, unlink_segment
from shared.ipc import channel
from shared.ipc.records import COMPLETED, FAILED, RETRY, CompletionRecord
from shared.ipc.task_stats import MAX_SNAPSHOT_BYTES, TaskStats
from shared.logs import configure_logging
from shared.messages import InvalidMessage, segment_name
from shared.state.dead_letters import DeadLetters
from shared.state.redis_queue import REDIS_ERRORS, Acknowledgement, ReliableQueue, connect
from shared.state.request_state import CountedImage, RequestState, record_id_of
from shared.storage import files
from shared.storage.results_file import ResultsFile, ResultsFileError
from workers.publication import Publisher

log = structlog.get_logger()

MAX_BATCH = 1024
# And at most this many bytes of datagrams: a batch's lines in results.json
# (ids escaped, at most about 3 bytes for each of theirs) must fit well within
# the tail that a start reads back (shared.storage.results_file.TAIL_WINDOW), where the
# next ledger recognises a redelivery of an appended but unacknowledged task.
MAX_BATCH_BYTES = 1 << 20
# While the queue has a backlog, a batch is committed once it holds
# LINGER_RECORDS records or its first record is LINGER_SECONDS old.
LINGER_SECONDS = 0.025
LINGER_RECORDS = 64
WAKEUP = "wakeup"  # selector data of the signal wakeup pipe
# Task ids remembered for dropping redelivered duplicates; redeliveries go to
# the head of the queue, so they come back long before this many records.
REMEMBERED_IDS = 200_000
UCRED = struct.Struct("3i")
# Records a ledger may have made durable but not acknowledged when it died: its
# batch and what waited behind it.
LINES_KEPT_FROM_LAST_RUN = 4 * MAX_BATCH
TRIMMED_LOG_SECONDS = 10.0
# How often this host's unwritten request records are looked for in Redis.
REQUESTS_CHECK_SECONDS = 1.0


class Ledger:
    def __init__(
        self, settings: Settings, *, instance: str, heartbeat: Synchronized, metrics_fd: int | None = None
    ) -> None:
        self.settings = settings
        self.metrics_fd = metrics_fd
        self.stats = TaskStats()
        self.stats_sent_at = 0.0
        self.instance = instance
        self.heartbeat = heartbeat
        self.parent = os.getppid()
        self.stopping = False
        self.keys = QueueKeys(settings.queue)
        self.results = ResultsFile(settings.output_dir / RESULTS_NAME)
        self.requests = ResultsFile(settings.output_dir / REQUESTS_NAME, torn_point="ledger_torn_request_append")
        self.written_requests = RememberedIds(REMEMBERED_IDS)  # record ids in requests.json
        self.requests_due = 0.0
        # Written to requests.json, still on the unwritten list: they leave it in
        # the next acknowledgement's round trip, or the next check's.
        self.requests_to_forget: list[bytes] = []
        self.unlinks = SegmentUnlinks(settings.output_dir / ".unlink-pending", SegmentAccess.from_settings(settings))
        self.publisher = Publisher(settings)
        self.selector = selectors.DefaultSelector()
        self.connections = 0
        self.unwritten: list[CompletionRecord] = []  # read but not yet durable
        self.unwritten_bytes = 0  # the datagrams they came in
        self.batch_started_at = 0.0  # when the first of them arrived
        self.unacknowledged: list[CompletionRecord] = []  # durable, not yet acknowledged
        self.recorded = RecordedTasks()
        self.write_failures = 0
        self.write_retry_at = 0.0
        self.ack_failures = 0
        self.ack_retry_at = 0.0
        self.trimmed: dict[str, int] | None = None  # {Q}:dead:trimmed at the last look
        self.trimmed_logged_at = -TRIMMED_LOG_SECONDS

    def run(self) -> int:
        try:
            self.publisher.open()
            recent = self.results.open()
            self.written_requests.learn(record.get("record_id") for record in self.requests.open())
            self.unlinks.open()
        except (OSError, ResultsFileError) as exc:
            log.error("ledger_boot_failed", reason=str(exc))
            return exitcodes.BOOT_FAILED
        self.recorded.learn_from_last_run(recent)
        self.publisher.finish_interrupted(recent, self.results)
        self.unlinks.finish_interrupted()
        self.queue = ReliableQueue(connect(self.settings), self.keys, max_message_bytes=self.settings.max_message_bytes)
        self.request_state = RequestState.for_pool(self.queue.client, self.keys, self.settings)
        self.dead_letters = DeadLetters(self.queue.client, self.keys)
        self._note_trimmed(force=True)  # the counts so far: only what is trimmed from now on is logged
        listener = channel.listen(channel.ledger_address(self.instance))
        listener.setblocking(False)
        self.selector.register(listener, selectors.EVENT_READ, None)
        self._wake_on_signals()
        log.info("ledger_started", results=str(self.results.path), recent_records=len(recent))
        deadline: float | None = None
        while True:
            self.heartbeat.value = time.monotonic()
            if not process.parent_alive(self.parent):
                log.warning("ledger_orphaned")
                break
            if self.stopping and deadline is None:
                deadline = time.monotonic() + self.settings.shutdown_grace
            if self.stopping and (self.connections == 0 or time.monotonic() > deadline):
                break
            self._receive(timeout=self._wait_time())
            if self._batch_ready():
                self._commit()
            self._acknowledge()
            self._write_unwritten_requests()
            self._send_stats()
        self._drain_before_exit()
        self._note_trimmed(force=True)
        self._send_stats(force=True)
        self.results.close()
        self.requests.close()
        log.info("ledger_stopped", unacknowledged=len(self.unacknowledged))
        return exitcodes.OK

    # -- receiving ---------------------------------------------------------

    def _wait_time(self) -> float:
        """Wake for the next retry that is due or the end of a linger, else for the heartbeat."""
        due = []
        if self.unwritten:
            due.append(self.write_retry_at if self.write_failures else self.batch_started_at + LINGER_SECONDS)
        if self.unacknowledged:
            due.append(self.ack_retry_at)
        # At most a second: the heartbeat and a stop request are looked at each turn.
        return min(1.0, max(0.0, min(due) - time.monotonic())) if due else 1.0

    def _receive(self, *, timeout: float) -> None:
        if self.write_failures:
            time.sleep(timeout)  # back-pressure: nothing new until the last batch is durable
            return
        if self.unwritten and not self._batch_ready():
            # Lingering: the records gather in the sockets' buffers meanwhile.
            # Waking for each of them would take a core from a worker mid-encode.
            time.sleep(timeout)
            timeout = 0
        for key, _ in self.selector.select(timeout):
            if key.data is None:
                self._accept(key.fileobj)
            elif key.data == WAKEUP:
                os.read(key.fd, 64)  # the signal's handler has run; the loop looks at `stopping`
            else:
                self._read(key.fileobj)
            if self._batch_full():
                break

    def _wake_on_signals(self) -> None:
        """Let a signal end the wait in select() at once: Python resumes an
        interrupted select (PEP 475), so SIGTERM alone would be noticed only when
        the wait times out, up to a second later, on every stop."""
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        self.selector.register(read_end, selectors.EVENT_READ, WAKEUP)

    def _accept(self, listener: socket.socket) -> None:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return
        _pid, uid, _gid = UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, UCRED.size))
        if uid != os.getuid():
            log.warning("ledger_refused_connection", uid=uid)
            conn.close()
            return
        conn.setblocking(False)
        self.selector.register(conn, selectors.EVENT_READ, "worker")
        self.connections += 1

    def _read(self, conn: socket.socket) -> None:
        while not self._batch_full():
            try:
                datagram = conn.recv(channel.MAX_DATAGRAM)
            except BlockingIOError:
                return
            except OSError:
                datagram = b""
            if not datagram:
                # The worker exited or died: whatever it did not send is redelivered.
                self.selector.unregister(conn)
                conn.close()
                self.connections -= 1
                return
            if not self.unwritten:
                self.batch_started_at = time.monotonic()
            self.unwritten.extend(channel.decode_records(datagram))
            self.unwritten_bytes += len(datagram)

    def _batch_full(self) -> bool:
        return len(self.unwritten) >= MAX_BATCH or self.unwritten_bytes >= MAX_BATCH_BYTES

    def _batch_ready(self) -> bool:
        """Commit now, or wait a moment for a fuller batch?

        While the queue has a backlog (the newest record's task came in a full
        claim), records arrive back to back and their tasks wait in the queue
        anyway: waiting up to LINGER_SECONDS shares one round of fsyncs and one
        acknowledgement among many records, and the queue drains faster for it.
        Without a backlog a record is committed as soon as it arrives."""
        if not self.unwritten:
            return False
        if self.write_failures or self.stopping or len(self.unwritten) >= LINGER_RECORDS:
            return True
        return not self.unwritten[-1].backlog or time.monotonic() - self.batch_started_at >= LINGER_SECONDS

    # -- making durable ----------------------------------------------------

    def _commit(self) -> None:
        if not self.unwritten or time.monotonic() < self.write_retry_at:
            return
        fresh, duplicates = self.recorded.split_duplicates(self.unwritten)
        for record in duplicates:
            record.duplicate = True
        try:
            self.publisher.make_durable(fresh)
            # As late as can be: a task marked but not recorded when this host
            # dies waits for it instead of moving on.
            if not self._mark_committing(self.unwritten):
                return
            self.publisher.publish(fresh)
            crash_point("ledger_after_publish")
            for record in fresh:
                if record.status != RETRY:
                    record.results_json = encode_line(record.results_line())
            self.results.append_encoded([r.results_json for r in fresh if r.results_json is not None])
        except OSError as exc:
            log.error("results_write_failed", error=str(exc), records=len(fresh), attempt=self.write_failures + 1)
            self._postpone_commit(base=0.5, cap=30.0)
            return
        self.write_failures = 0
        self.publisher.committed()
        crash_point("ledger_after_append")
        self._note_committed(fresh)
        self._drop_duplicates(duplicates)
        for record in self.unwritten:
            self.publisher.remove_earlier_partials(record)
        self.unacknowledged.extend(self.unwritten)
        self.unwritten, self.unwritten_bytes = [], 0

    def _note_committed(self, fresh: list[CompletionRecord]) -> None:
        """Remember what is now recorded (for duplicates) and count it (for metrics)."""
        committed_at = time.time()
        for record in fresh:
            if record.status != RETRY:
                self.recorded.remember(record.task_id, record.status)
            if self.metrics_fd is not None:
                timings = {**record.timings, "ledger": max(0.0, committed_at - record.sent_at)}
                self.stats.observe(status=record.status, source=record.source, timings=timings, expired=record.expired)

    def _drop_duplicates(self, duplicates: list[CompletionRecord]) -> None:
        """A redelivered task that already has its record: only its partial file goes."""
        self.stats.duplicates += len(duplicates)
        for record in duplicates:
            self.publisher.discard_partial(record)
            log.info(
                "duplicate_dropped", task_id=record.task_id, request_id=record.request_id, image_id=record.image_id
            )

    def _postpone_commit(self, *, base: float, cap: float) -> None:
        """The batch stays unwritten and is tried again after a backoff."""
        self.write_failures += 1
        self.write_retry_at = time.monotonic() + compute_backoff(self.write_failures, base=base, cap=cap)

    def _mark_committing(self, records: list[CompletionRecord]) -> bool:
        """Step 2, first half: tell Redis these records may soon be on this host's
        disk, so that should this host die before acknowledging them, their tasks
        come back here (where this ledger drops them as duplicates) rather than
        being done again elsewhere. False while Redis is away: nothing is
        committed that the other hosts could not learn of."""
        task_ids = [r.task_id for r in records if r.task_id is not None and (r.status != RETRY or r.duplicate)]
        try:
            self.queue.mark_committing(task_ids, self.keys.host(self.settings.host_id))
        except REDIS_ERRORS as exc:
            log.warning("redis_unavailable", error=str(exc), records=len(records), attempt=self.write_failures + 1)
            self._postpone_commit(base=0.2, cap=10.0)
            return False
        return True

    # -- acknowledging -----------------------------------------------------

    def _acknowledge(self) -> None:
        if not self.unacknowledged or time.monotonic() < self.ack_retry_at:
            return
        batch = self.unacknowledged
        doomed = self._segments_to_unlink(batch)
        self.unlinks.note_pending(doomed)
        try:
            acks = [self._acknowledgement(record) for record in batch]
            counts = Counter(record.status for record in batch if not record.duplicate)
            counts["expired"] = sum(1 for record in batch if record.expired and not record.duplicate)
            images = [image for image in map(self._counted_image, batch) if image is not None]
            crash_point("ledger_before_ack")
            now = time.time()
            call = self.queue.acknowledgement(
                acks,
                counts=counts,
                dead_letter_max=self.settings.dead_letter_max,
                now=now,
                stream=self.settings.results_stream,
                stream_maxlen=self.settings.results_stream_maxlen,
            )
            if images:
                # The request count rides in the acknowledgement's transaction, and the
                # request records written since the last one leave the unwritten list
                # in it: one round trip.
                ended = self.request_state.count_with(call, images, now=now, forget=self.requests_to_forget)
                self.requests_to_forget = []
            else:
                call.script(keys=call.keys, args=call.args)
                ended = []
        except REDIS_ERRORS as exc:
            self.ack_failures += 1
            self.ack_retry_at = time.monotonic() + compute_backoff(self.ack_failures, base=0.2, cap=10.0)
            log.warning("redis_unavailable", error=str(exc), pending_acks=len(batch), attempt=self.ack_failures)
            return
        if self.ack_failures:
            log.info("redis_reconnected", after_attempts=self.ack_failures)
            self.ack_failures = 0
        self.unacknowledged = []
        self._note_trimmed()
        crash_point("ledger_after_ack")
        self.unlinks.unlink(doomed)
        self._write_requests(ended, forget_now=False)

    def _note_trimmed(self, *, force: bool = False) -> None:
        """Log the dead letters the caps pushed out since the last look (the ack
        script counts them in {Q}:dead:trimmed, for `status` and the metrics).
        One look every TRIMMED_LOG_SECONDS at most, after an acknowledgement:
        a flood that trims with every batch is one line, not thousands."""
        if not force and time.monotonic() - self.trimmed_logged_at < TRIMMED_LOG_SECONDS:
            return
        self.trimmed_logged_at = time.monotonic()
        try:
            counts = self.dead_letters.trimmed()
        except (*REDIS_ERRORS, ValueError):
            return  # the next look tells
        seen, self.trimmed = self.trimmed, counts
        if seen is not None and counts != seen:
            log.warning("dead_letters_trimmed", failed=counts.get("failed", 0) - seen.get("failed", 0),
                        junk=counts.get("junk", 0) - seen.get("junk", 0),
                        dead_letter_max=self.settings.dead_letter_max)

    def _acknowledgement(self, record: CompletionRecord) -> Acknowledgement:
        """What Redis must do for this record: announce a final outcome (a failure's
        dead letter, the results-stream event), schedule a retry, or only let go."""
        # An envelope too broken to carry a task id is identified by its bytes.
        task_id = record.task_id or "raw-" + hashlib.sha1(record.envelope).hexdigest()
        final_status = self.recorded.status_of(record.task_id) if record.duplicate else record.status
        if record.status == RETRY and not record.duplicate:
            return Acknowledgement(record.processing_key, record.envelope, "retry", task_id, retry_at=record.retry_at)
        if final_status not in (COMPLETED, FAILED):
            return Acknowledgement(record.processing_key, record.envelope, "ack", task_id)
        # A fresh record's event is the very line results.json got; a duplicate
        # announces the line its first delivery was recorded with.
        event = record.results_json
        if event is None:
            line = self.recorded.line_from_last_run(task_id) if record.duplicate else None
            event = encode_line(line if line is not None else {**record.results_line(), "status": final_status})
        return Acknowledgement(
            record.processing_key,
            record.envelope,
            "junk" if record.junk and final_status == FAILED else "final",
            task_id,
            dead_letter=record.dead_letter() if final_status == FAILED else b"",
            event=event,
        )

    def _counted_image(self, record: CompletionRecord) -> CountedImage | None:
        """What the request count needs of a record whose message declared
        request_images: its final outcome (a duplicate's is its first record's)."""
        if record.request_images is None or None in (record.request_id, record.image_id, record.task_id):
            return None
        status = self.recorded.status_of(record.task_id) if record.duplicate else record.status
        if status not in (COMPLETED, FAILED):
            return None
        file_path = record.file_path
        if record.duplicate:
            file_path = (self.recorded.line_from_last_run(record.task_id) or {}).get("file_path")
        entry = encode_line(
            {
                "image_id": record.image_id,
                "status": status,
                "file_path": file_path,
                "task_id": record.task_id,
                "host_id": self.settings.host_id,
            }
        )
        return CountedImage(
            record.request_id, record.image_id, record.request_images, status == COMPLETED, entry, record.task_id
        )

    # -- request records ---------------------------------------------------

    def _write_unwritten_requests(self, *, now: bool = False) -> None:
        """Every REQUESTS_CHECK_SECONDS: the request records this host ended and
        has not written: a crash's leftovers, and the upkeep's "incomplete" ones."""
        if not now and time.monotonic() < self.requests_due:
            return
        self.requests_due = time.monotonic() + REQUESTS_CHECK_SECONDS
        try:
            listed = self.request_state.unwritten()
        except REDIS_ERRORS:
            return  # the acknowledgements log the outage; the list waits in Redis
        self._write_requests(listed, forget_now=True)

    def _write_requests(self, listed: list[bytes], *, forget_now: bool) -> None:
        """Steps 6 and 7: append each record not yet in requests.json, durably,
        then take them all off this host's unwritten list: at once, or (after an
        acknowledgement, under load) in the next one's round trip."""
        fresh, ids = [], set()
        for line in listed:
            record_id = record_id_of(line)
            if record_id is None:
                log.warning("request_record_refused", record=line[:200].decode("ascii", errors="replace"))
            elif record_id not in ids and not self.written_requests.holds(record_id):
                ids.add(record_id)
                fresh.append(line)
        if fresh:
            crash_point("ledger_before_request_append")
            try:
                self.requests.append_encoded(fresh)
            except OSError as exc:
                # They stay on the list, and are tried again on the next check.
                log.error("requests_write_failed", error=str(exc), records=len(fresh))
                return
            self.written_requests.learn(ids)
            crash_point("ledger_after_request_append")
            for line in fresh:
                record = json.loads(line)
                log.info("request_ended", request_id=record.get("request_id"), status=record.get("status"),
                         images=record.get("images"), request_images=record.get("request_images"))
        if not forget_now:
            self.requests_to_forget.extend(listed)
            return
        try:
            self.request_state.forget_written(list(dict.fromkeys([*self.requests_to_forget, *listed])))
            self.requests_to_forget = []
        except REDIS_ERRORS as exc:
            # Written: the next check finds them in requests.json and only forgets them.
            log.warning("redis_unavailable", error=str(exc), unwritten_requests=len(listed))

    def _segments_to_unlink(self, records: list[CompletionRecord]) -> list[str]:
        if not self.settings.unlink_shm:
            return []
        # A retry still needs its pixels; a duplicate's segment went with its first record.
        return [r.segment_name for r in records if r.segment_name and (r.status != RETRY or r.duplicate)]

    def _drain_before_exit(self) -> None:
        """Make durable and acknowledge what is left, for a bounded time."""
        deadline = time.monotonic() + min(10.0, self.settings.shutdown_grace + 1)
        while (self.unwritten or self.unacknowledged) and time.monotonic() < deadline:
            self._commit()
            self._acknowledge()
            if self.unwritten or self.unacknowledged:
                time.sleep(min(1.0, max(0.05, self._wait_time())))
        self._write_unwritten_requests(now=True)

    def _send_stats(self, *, force: bool = False) -> None:
        """About once a second, the cumulative stats to the supervisor's metrics.
        Never blocks: a snapshot that does not fit in the pipe is dropped, and
        the next one carries the same counts and more."""
        if self.metrics_fd is None or (not force and time.monotonic() - self.stats_sent_at < 1.0):
            return
        self.stats_sent_at = time.monotonic()
        snapshot = self.stats.to_bytes()
        frame = len(snapshot).to_bytes(4, "big") + snapshot
        if len(frame) > MAX_SNAPSHOT_BYTES:
            log.warning("metrics_snapshot_too_large", bytes=len(frame))
            return
        try:
            os.write(self.metrics_fd, frame)
        except (BlockingIOError, BrokenPipeError):
            pass

    def request_stop(self, *_: object) -> None:
        self.stopping = True


class RecordedTasks:
    """The task ids this host has records for, to tell a redelivered duplicate
    from a task to record: the end of results.json, read at start, and every
    record since, up to REMEMBERED_IDS."""

    def __init__(self) -> None:
        self._status: dict[str, str] = {}  # task id -> status of its record
        self._order: deque[str] = deque()
        # The last lines the previous ledger wrote: a duplicate of one of those
        # announces the record as it was written.
        self._lines_from_last_run: dict[str, dict] = {}

    def learn_from_last_run(self, recent: list[dict]) -> None:
        for line in recent:
            task_id = line.get("task_id")
            self.remember(task_id if isinstance(task_id, str) else None, str(line.get("status")))
        for line in recent[-LINES_KEPT_FROM_LAST_RUN:]:
            if isinstance(line.get("task_id"), str):
                self._lines_from_last_run[line["task_id"]] = line

    def remember(self, task_id: str | None, status: str) -> None:
        if task_id is None or task_id in self._status:
            return
        self._status[task_id] = status
        self._order.append(task_id)
        if len(self._order) > REMEMBERED_IDS:
            self._status.pop(self._order.popleft(), None)

    def status_of(self, task_id: str | None) -> str | None:
        return self._status.get(task_id or "")

    def line_from_last_run(self, task_id: str) -> dict | None:
        return self._lines_from_last_run.get(task_id)

    def split_duplicates(self, records: list[CompletionRecord]) -> tuple[list, list]:
        """(to record, duplicates): a task recorded before, or twice in `records`
        (a retry does not count: it records nothing)."""
        fresh, duplicates, seen = [], [], set()
        for record in records:
            task_id = record.task_id
            if task_id is not None and (task_id in self._status or task_id in seen):
                duplicates.append(record)
            else:
                fresh.append(record)
                if task_id is not None and record.status != RETRY:
                    seen.add(task_id)
        return fresh, duplicates


class RememberedIds:
    """The last `size` ids seen, to tell one already written."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._ids: set[str] = set()
        self._order: deque[str] = deque()

    def learn(self, ids: Iterable[object]) -> None:
        for value in ids:
            if isinstance(value, str) and value not in self._ids:
                self._ids.add(value)
                self._order.append(value)
                if len(self._order) > self.size:
                    self._ids.discard(self._order.popleft())

    def holds(self, value: str) -> bool:
        return value in self._ids


class SegmentUnlinks:
    """Step 5: unlink the segments of acknowledged tasks, with the list of those
    about to go written down first, so that a ledger killed between
    acknowledging and unlinking leaks none: the next one unlinks what is listed.
    No fsync: /dev/shm does not survive a power cut. A name that is not the
    pipeline's, or a file that is not a segment we own, is left alone and
    logged (shared.imaging.segments): no name in a message can make this raise, so
    none can stop the ledger, now or on replay."""

    def __init__(self, path: Path, access: SegmentAccess) -> None:
        self.path = path
        self.access = access
        self._fd = -1  # kept open: it is rewritten for every batch

    def open(self) -> None:
        self._fd = files.open_state_file(self.path, os.O_RDWR | os.O_CREAT)

    def note_pending(self, names: list[str]) -> None:
        if names:
            listing = "\n".join(names).encode()
            os.pwrite(self._fd, listing, 0)
            os.ftruncate(self._fd, len(listing))

    def unlink(self, names: list[str], *, after_crash: bool = False) -> None:
        for name in names:
            outcome = unlink_segment(name, self.access)
            if outcome == "unlinked" and after_crash:
                log.info("segment_unlinked_after_crash", segment=name)
            elif outcome == "unlinked":
                log.debug("segment_unlinked", segment=name)
            elif outcome != "gone":
                log.warning("segment_not_unlinked", segment=name, reason=outcome)
        if names:
            os.ftruncate(self._fd, 0)

    def finish_interrupted(self) -> None:
        """Step 5 for the batch the last ledger acknowledged but did not finish."""
        listed = os.pread(self._fd, 1 << 20, 0).decode(errors="replace").split()
        names = []
        for value in listed:
            try:
                names.append(segment_name(value))
            except InvalidMessage:
                log.warning("segment_not_unlinked", segment=value[:80], reason="not a segment name")
        self.unlink(names, after_crash=True)
        os.ftruncate(self._fd, 0)


def ledger_main(
    settings: Settings, *, instance: str, heartbeat: Synchronized, metrics_fd: int | None = None
) -> None:
    """Entry point of the forked ledger-writer process."""
    ledger = Ledger(settings, instance=instance, heartbeat=heartbeat, metrics_fd=metrics_fd)
    process.reset_signals_in_child(ledger.request_stop)
    process.die_with_parent(ledger.parent)
    process.set_title("ledger")
    configure_logging(settings, role="ledger")
    structlog.contextvars.bind_contextvars(pid=os.getpid())
    sys.exit(ledger.run())
