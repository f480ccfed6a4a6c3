"""The worker process: one task at a time, CPU-bound, as many as there are cores.

Data flow of one task:

    HOSTING_TASKS_QUEUE --claim (up to CLAIM_BATCH per round trip)--> my processing list
      -> validate the message
      -> pixels: a read-only view on the shared-memory mapping (or a URL download)
      -> JPEG -> OUTPUT_DIR/.partial/<task>.<delivery>.jpg, write-back started
      -> completion record over my own socket to the ledger
    The ledger then makes the JPEG and the record durable, publishes the file,
    removes the task from my processing list and unlinks the segment.

Hazards handled here:
- Bad input of any kind ends as a failed record, never as a dead worker.
- A transient failure (timeout, connection reset, HTTP 5xx or 429) becomes a
  retry record: the ledger parks the task in the delayed-retry set, so the
  wait holds no worker. After MAX_ATTEMPTS deliveries it fails for good.
- A full disk (or an I/O error) while writing the JPEG is waited out with
  backoff: the pool slows down; nothing is recorded that is not durable.
- Redis going away: capped backoff, then carry on; nothing claimed is lost
  because it sits in my processing list until the ledger acknowledges it,
  and a claim whose reply was lost is handed back after the outage.
- The ledger going away: records already sent may be lost with it, so this
  worker exits (LEDGER_LOST) and its processing list is requeued on reaping.
- A task whose deliveries exceed MAX_ATTEMPTS (it killed or hung its worker
  each time) is failed without being run again.
- A decode past DECODE_CPU_SECONDS cannot be stopped but by ending the
  process: the decode watchdog fails the task, waits for the ledger to
  acknowledge it (so it is not redelivered), and this worker exits
  (DECODE_OVERRAN); the tasks claimed with it go back uncounted.
- A task past its `deadline` when it would start (any delivery) is failed
  as expired without being fetched or decoded; one whose retry would come due
  after its deadline is failed then, not retried.
- The supervisor dying: PDEATHSIG plus a getppid() check each turn.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Callable
from datetime import datetime
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path

import cv2
import structlog

from image_result_client.protocol import QueueKeys, partial_path
from shared import exitcodes, process
from shared.backoff import compute_backoff
from shared.config import Settings
from shared.crash_points import crash_point
from shared.imaging.images import (
    EncodedImage,
    ImageError,
    decode_image,
    encode_pixels,
    encode_segment,
)
from shared.imaging.rendering import Rendering
from shared.imaging.segments import SegmentAccess
from shared.imaging.url_fetch import UrlFetcher
from shared.ipc import channel
from shared.ipc.records import COMPLETED, FAILED, RETRY, CompletionRecord
from shared.ipc.task_board import ENCODE, LOAD, WRITE, TaskBoard
from shared.logs import configure_logging
from shared.messages import (
    Envelope,
    InvalidMessage,
    Task,
    expired_before_retry_reason,
    expired_reason,
    parse_envelope,
    parse_task,
    salvage,
)
from shared.state.redis_queue import BLOCK_SECONDS, REDIS_ERRORS, ReliableQueue, connect
from shared.storage import files
from workers.decode_watchdog import DecodeWatchdog

log = structlog.get_logger()
# How long an idle worker waits on its host queue before it looks at the shared one.
HOST_QUEUE_BLOCK_SECONDS = 0.25
# Tasks claimed per round trip when the queue holds twice that many (a claim
# never takes more than half of what waits, so the last tasks spread over the
# workers). A claim costs a worker far more than its Python: on two cores its
# round trip switches Redis in and the worker out and back, cooling the caches
# (why 32 and not 8: docs/performance.md).
CLAIM_BATCH = 32
# A claim of at least this many tasks means at least as many are still waiting
# (a claim takes at most half): a backlog, in which records may wait a moment
# to be sent and committed together.
BACKLOG_CLAIM = 8
# Under a backlog, records wait to be sent together for at most this long, and
# carry at most this many message bytes in one datagram.
OUTBOX_SECONDS = 0.005
OUTBOX_BYTES = 256 * 1024
# How often a worker whose decode overran asks whether its failed record is
# acknowledged.
ACK_POLL_SECONDS = 0.05


def processing_name(pid: int) -> str:
    """This worker's part of its processing list key; the supervisor derives it too."""
    return f"w{pid}"


class Worker:
    def __init__(
        self,
        settings: Settings,
        *,
        slot: int,
        instance: str,
        heartbeat: Synchronized,
        unstarted: Synchronized,
        board: TaskBoard,
    ) -> None:
        self.settings = settings
        self.slot = slot
        self.instance = instance
        self.heartbeat = heartbeat
        # How many tasks at the end of my processing list I claimed but have not
        # started; the supervisor reads it when I die, to requeue them uncounted.
        self.unstarted = unstarted
        # What I am doing, for `status`: a few stores per task (shared/ipc/task_board.py).
        self.board = board
        self.parent = os.getppid()
        self.stopping = False
        self.processing_key = QueueKeys(settings.queue).processing(instance, processing_name(os.getpid()))
        self._registered = False
        self._redis_failures = 0
        self._fetch_seconds: float | None = None
        self._timings: dict[str, float] = {}  # of the task in hand, per phase, for metrics
        self._backlog = False
        self._waiting_idle = False  # in the blocking wait for work, where a stop may interrupt
        self._encoded = 0
        self._encode_cpu_seconds = 0.0
        self.segment_access = SegmentAccess.from_settings(settings)
        self.rendering = Rendering.from_settings(settings)
        self._outbox = Outbox(backlog=False)  # the current claim's
        self._ledger_lost = False
        self.decode_watchdog = DecodeWatchdog(
            budget=min(settings.decode_cpu_seconds, settings.task_timeout / 2), heartbeat=heartbeat
        )

    def run(self) -> int:
        """Boot, then loop until told to stop. Returns the exit code."""
        try:
            self.directories = files.prepare_output_dir(self.settings.output_dir)
        except OSError as exc:
            log.error("worker_boot_failed", reason=f"OUTPUT_DIR unusable: {exc}")
            return exitcodes.BOOT_FAILED
        self.queue = ReliableQueue(
            connect(self.settings),
            QueueKeys(self.settings.queue),
            max_message_bytes=self.settings.max_message_bytes,
            # An idle worker must beat well within TASK_TIMEOUT or it looks hung;
            # with a host queue the wait is on it, and the shared queue is looked
            # at between waits, so they are short.
            block_seconds=min(HOST_QUEUE_BLOCK_SECONDS if self.settings.host_queue else BLOCK_SECONDS,
                              self.settings.task_timeout / 4),
            # Claims look at this host's queue first even without HOST_QUEUE: a
            # task whose record this host's ledger may hold is sent back there.
            host_queue=QueueKeys(self.settings.queue).host(self.settings.host_id),
            wait_on_host_queue=self.settings.host_queue,
            replicated_claims=bool(self.settings.redis_sentinels),
            min_replicas=self.settings.claim_min_replicas,
        )
        self.fetcher = UrlFetcher(self.settings)
        self.ledger = self._connect_ledger()
        if self.ledger is None:
            return exitcodes.LEDGER_LOST
        self.decode_watchdog.start()
        log.info("worker_started", processing_list=self.processing_key)
        while not self.stopping:
            self.heartbeat.value = time.monotonic()
            if not process.parent_alive(self.parent):
                log.warning("worker_orphaned")
                return exitcodes.ORPHANED
            claimed = self._fetch()
            self.unstarted.value = len(claimed)
            self._backlog = len(claimed) >= BACKLOG_CLAIM
            if not self._work_through(claimed):
                return exitcodes.LEDGER_LOST
        return exitcodes.OK

    def log_stop(self, code: int) -> None:
        """The last line of every worker's life, whatever ended it: how many
        frames it encoded and the CPU the encoder took."""
        log.info(
            "worker_stopped", exit_code=code, encoded=self._encoded, encode_cpu_s=round(self._encode_cpu_seconds, 6)
        )

    def _work_through(self, claimed: list[bytes]) -> bool:
        """Run the claimed tasks in order and send their records (see Outbox);
        False if the ledger is gone."""
        outbox = self._outbox = Outbox(backlog=self._backlog)
        for position, envelope in enumerate(claimed, 1):
            if self.stopping:
                break  # the rest go back to the queue when the supervisor requeues my list
            self.unstarted.value -= 1
            self.heartbeat.value = time.monotonic()  # TASK_TIMEOUT is per task, not per claim
            crash_point("worker_after_claim")
            self.board.start()
            try:
                record = self._handle(envelope)
            except StopRequested:
                break
            finally:
                self.board.end()
            ready = outbox.add(record, more_coming=position < len(claimed), now=time.monotonic())
            if ready and not self._send(ready):
                return False
        rest = outbox.take()
        return not self._ledger_lost and (not rest or self._send(rest))

    def _send_held_records(self) -> None:
        """Before a download, which may take up to URL_READ_TIMEOUT (or hang its
        worker until TASK_TIMEOUT): the records held for a batch go first, so
        that if this task kills the worker, the tasks done before it are not
        done again, nor charged a delivery for it."""
        held = self._outbox.take()
        if held and not self._send(held):
            self._ledger_lost = True
            raise StopRequested

    def _connect_ledger(self) -> socket.socket | None:
        """The ledger may still be starting; give it a few seconds."""
        address = channel.ledger_address(self.instance)
        for attempt in range(1, 50):
            try:
                return channel.connect(address)
            except OSError:
                if self.stopping:
                    return None
                time.sleep(compute_backoff(attempt, base=0.01, cap=0.5))
        log.error("ledger_unreachable")
        return None

    def _fetch(self) -> list[bytes]:
        """Claimed envelopes; [] after a quiet wait or while Redis is away."""
        try:
            if not self._registered:
                self._hand_back_unanswered_claims()
                self.queue.register(self.processing_key)
                self._registered = True
            claim_started = time.perf_counter()
            envelopes = self.queue.claim(self.processing_key, count=CLAIM_BATCH)
            # The round trip's share of each task it brought.
            self._fetch_seconds = (time.perf_counter() - claim_started) / max(1, len(envelopes))
            if not envelopes:
                # An idle pool's every task comes this way: its fetch is the claim
                # once the message arrived, never the wait for it.
                claimed = self._wait_for_a_task()
                envelopes = [claimed[0]] if claimed is not None else []
                self._fetch_seconds = claimed[1] if claimed is not None else None
        except REDIS_ERRORS as exc:
            self._redis_failures += 1
            delay = compute_backoff(self._redis_failures, base=0.2, cap=10.0)
            log.warning("redis_unavailable", error=str(exc), retry_in=round(delay, 2), attempt=self._redis_failures)
            self._sleep(delay)
            self._registered = False  # Redis may come back empty: register again
            return []
        if self._redis_failures:
            log.info("redis_reconnected", after_attempts=self._redis_failures)
            self._redis_failures = 0
        return envelopes

    def _wait_for_a_task(self) -> tuple[bytes, float] | None:
        """Block on the queue for one task; None after a quiet wait or a stop
        request. The stop signal ends the wait at once (request_stop raises into
        it) rather than after up to BLOCK_SECONDS: whatever the server moved
        meanwhile sits in my incoming list, which is requeued with my processing
        list when I exit."""
        self._waiting_idle = True
        try:
            if self.stopping:  # after the flag: a stop from now on raises, one before it is seen here
                return None
            return self.queue.wait_and_claim(self.processing_key)
        except WaitInterrupted:
            return None
        finally:
            self._waiting_idle = False

    def _hand_back_unanswered_claims(self) -> None:
        """A claim whose reply was lost when Redis went away sits in my processing
        list unseen; requeue the list (records already sent are dropped as
        duplicates by the ledger)."""
        if self._redis_failures:
            moved = self.queue.requeue(self.processing_key)
            if moved:
                log.warning("tasks_requeued", processing_list=self.processing_key, tasks=moved)

    def _handle(self, raw: bytes) -> CompletionRecord:
        """Run one task to a completion record. Never raises for bad input."""
        started = time.perf_counter()
        self._timings = {"fetch": self._fetch_seconds} if self._fetch_seconds is not None else {}
        try:
            envelope = parse_envelope(raw)
        except InvalidMessage as exc:
            return self._failed(None, raw, None, str(exc), started, unparsed=True)
        structlog.contextvars.bind_contextvars(task_id=envelope.task_id)
        try:
            return self._run_task(envelope, started)
        except StopRequested:
            raise
        except Exception as exc:  # the one place an unforeseen error becomes a failed task
            log.exception("task_crashed")
            return self._failed(envelope, raw, None, f"internal error: {exc.__class__.__name__}: {exc}", started)
        finally:
            structlog.contextvars.unbind_contextvars("task_id", "request_id", "image_id")

    def _run_task(self, envelope: Envelope, started: float) -> CompletionRecord:
        if envelope.deliveries > self.settings.max_attempts:
            reason = (
                f"gave up after {envelope.deliveries - 1} deliveries: its worker died each time "
                f"(MAX_ATTEMPTS={self.settings.max_attempts})"
            )
            return self._failed(envelope, envelope.raw, None, reason, started)
        try:
            task = parse_task(envelope, max_pixels=self.settings.max_pixels)
        except InvalidMessage as exc:
            return self._failed(envelope, envelope.raw, None, str(exc), started, unparsed=True)
        structlog.contextvars.bind_contextvars(request_id=task.request_id, image_id=task.image_id)
        # Here, where every delivery starts (the first, a retry come due, a
        # redelivery after a crash), and before anything is fetched or decoded.
        if task.deadline is not None and (now := time.time()) >= task.deadline:
            return self._failed(envelope, envelope.raw, task, expired_reason(task.deadline, now), started)
        log.debug("task_started", source=task.source, attempt=envelope.deliveries)
        try:
            image, source = self._load_and_encode(envelope, task, started)
        except ImageError as exc:
            if exc.transient and envelope.deliveries < self.settings.max_attempts:
                return self._retry_later(envelope, task, exc, started)
            reason = str(exc)
            if exc.transient:
                reason = f"gave up after {envelope.deliveries} attempts: {reason}"
            return self._failed(envelope, envelope.raw, task, reason, started)
        partial = partial_path(self.settings.output_dir, envelope.task_id, envelope.deliveries)
        write_started = time.perf_counter()
        self.board.enter(WRITE)
        if not self._write_partial(partial, image.jpeg):
            raise StopRequested  # the task stays in my processing list and is requeued
        self._timings["write"] = time.perf_counter() - write_started
        crash_point("worker_after_partial")
        record = self._record(
            envelope,
            envelope.raw,
            COMPLETED,
            started,
            request_id=task.request_id,
            image_id=task.image_id,
            source=source,
            width=image.width,
            height=image.height,
            bytes=len(image.jpeg),
            partial_path=str(partial),
            segment_name=self._segment_to_unlink(task, envelope),
            request_images=task.request_images,
        )
        # DEBUG, as task_started: at INFO no log line is formatted for a task that
        # went well (results.json and the metrics have it).
        log.debug("task_finished", status=COMPLETED, source=source, duration_ms=record.duration_ms)
        return record

    def _write_partial(self, partial: Path, jpeg: bytes) -> bool:
        """Write the JPEG (the ledger makes it durable), waiting out a full disk or
        an I/O error: the pool slows down rather than failing tasks. False if told
        to stop meanwhile."""
        failures = 0
        while True:
            try:
                self.directories.follow_partial()
                files.write_partial(partial.name, jpeg, dir_fd=self.directories.partial_fd)
                return True
            except OSError as exc:
                files.remove_quietly(partial.name, dir_fd=self.directories.partial_fd)
                failures += 1
                delay = compute_backoff(failures, base=0.5, cap=30.0)
                log.error("jpeg_write_failed", error=str(exc), path=str(partial), retry_in=round(delay, 2))
                self._sleep(delay)
                if self.stopping:
                    return False

    def _retry_later(self, envelope: Envelope, task: Task, exc: ImageError, started: float) -> CompletionRecord:
        """A transient failure: back to Redis's delayed-retry set, not holding this worker."""
        delay = compute_backoff(envelope.deliveries, base=1.0, cap=300.0, jitter=0.25)
        if exc.retry_after is not None:
            delay = max(delay, min(exc.retry_after, 3600.0))
        retry_at = time.time() + delay
        if task.deadline is not None and retry_at >= task.deadline:
            # It would expire while it waits: end it now, not at the retry.
            reason = expired_before_retry_reason(task.deadline, retry_at, exc)
            return self._failed(envelope, envelope.raw, task, reason, started)
        log.warning("task_retry_scheduled", error=str(exc), retry_in=round(delay, 2), attempt=envelope.deliveries)
        return self._record(
            envelope,
            envelope.raw,
            RETRY,
            started,
            request_id=task.request_id,
            image_id=task.image_id,
            error=str(exc),
            source=task.source,
            retry_at=retry_at,
        )

    def _segment_to_unlink(self, task: Task, envelope: Envelope) -> str | None:
        """The producer handed the segment over even if its shm_info was unusable."""
        if task.segment is not None:
            return self._ours(task.segment.name)
        return self._ours(salvage(envelope.body).segment_name) if task.segment_error else None

    def _ours(self, name: str | None) -> str | None:
        """A segment name the ledger may unlink: only the pipeline's (it checks
        again, with the file in hand); any other name a message gives is left alone."""
        return name if name is not None and self.segment_access.check_name(name) is None else None

    def _load_and_encode(self, envelope: Envelope, task: Task, started: float) -> tuple[EncodedImage, str]:
        """SHM first; the URL when there is no segment or the segment failed."""
        rendering = self.rendering
        if task.segment is not None:
            try:
                # Attaching costs microseconds; the phase is the encode.
                return self._timed_encode(lambda: encode_segment(task.segment, rendering=rendering, access=self.segment_access)), "shm"
            except ImageError as exc:
                if task.image_url is None:
                    raise
                log.warning("shm_failed_trying_url", error=str(exc))
        elif task.segment_error:
            log.warning("shm_info_invalid_trying_url", error=task.segment_error)
        assert task.image_url is not None  # parse_task guarantees one source
        self._send_held_records()
        load_started = time.perf_counter()
        self.board.enter(LOAD)
        body = self.fetcher.fetch(task.image_url)
        self.heartbeat.value = time.monotonic()  # the decode is bounded by its own budget from here
        with self.decode_watchdog.watching(lambda cpu: self._decode_overran(envelope, task, started, cpu)):
            frame = decode_image(body, max_pixels=self.settings.max_pixels)
        self._timings["load"] = time.perf_counter() - load_started
        return self._timed_encode(lambda: encode_pixels(frame, rendering=rendering)), "url"

    def _decode_overran(self, envelope: Envelope, task: Task, started: float, cpu_seconds: float) -> None:
        """From the decode watchdog's thread, the main one still decoding: fail
        the task, wait until the ledger has acknowledged that (so that the
        requeue of my list does not bring the task back), and end the process,
        which alone stops the decoder. Never returns."""
        budget = self.decode_watchdog.budget
        setting = self.settings.decode_cpu_seconds
        bound_by = (
            f"DECODE_CPU_SECONDS={setting:g}" if budget == setting else f"TASK_TIMEOUT={self.settings.task_timeout:g} / 2"
        )
        reason = f"decoding the image took more than {budget:g} s of CPU ({bound_by}); an image that costs this much is refused"
        record = self._failed(envelope, envelope.raw, task, reason, started)
        acknowledged = self._send([record]) and self._wait_for_acknowledgement(envelope.task_id)
        log.error(
            "decode_overran",
            task_id=envelope.task_id,
            request_id=task.request_id,
            cpu_s=round(cpu_seconds, 2),
            acknowledged=acknowledged,
        )
        sys.stderr.flush()
        os._exit(exitcodes.DECODE_OVERRAN)

    def _wait_for_acknowledgement(self, task_id: str) -> bool:
        """Until the ledger acknowledged `task_id`'s final record, beating meanwhile,
        for at most TASK_TIMEOUT / 2, and not at all once the ledger is gone (its
        record went with it). Not acknowledged, the task is requeued with my
        list; a redelivery whose record was committed is dropped as a duplicate."""
        deadline = time.monotonic() + self.settings.task_timeout / 2
        while time.monotonic() < deadline and not (self.ledger is not None and channel.peer_gone(self.ledger)):
            self.heartbeat.value = time.monotonic()
            try:
                if self.queue.announced(task_id):
                    return True
            except REDIS_ERRORS:
                pass  # Redis away: keep waiting until the deadline
            time.sleep(ACK_POLL_SECONDS)
        return False

    def _timed_encode(self, encode: Callable[[], EncodedImage]) -> EncodedImage:
        """Run one encode; note its wall time (the task's encode phase) and add
        its CPU time to this worker's total, which `worker_stopped` logs: the
        share of the worker's CPU that went to the encoder, and so what the rest
        cost, whatever the encoder's own speed did meanwhile."""
        self.board.enter(ENCODE)
        wall_started, cpu_started = time.perf_counter(), time.thread_time()
        image = encode()
        self._timings["encode"] = time.perf_counter() - wall_started
        self._encode_cpu_seconds += time.thread_time() - cpu_started
        self._encoded += 1
        return image

    def _failed(
        self, envelope: Envelope | None, raw: bytes, task: Task | None, reason: str, started: float,
        *, unparsed: bool = False,
    ) -> CompletionRecord:
        found = salvage(envelope.body if envelope else b"")
        request_id = task.request_id if task else found.request_id
        image_id = task.image_id if task else found.image_id
        log.warning("task_failed", error=reason, request_id=request_id, image_id=image_id)
        return self._record(
            envelope,
            raw,
            FAILED,
            started,
            request_id=request_id,
            image_id=image_id,
            error=reason,
            source=task.source if task else None,
            segment_name=self._ours(found.segment_name),
            junk=unparsed and request_id is None,
            request_images=task.request_images if task else found.request_images,
        )

    def _record(
        self, envelope: Envelope | None, raw: bytes, status: str, started: float, **fields: object
    ) -> CompletionRecord:
        """A completion record with what every outcome shares filled in."""
        return CompletionRecord(
            task_id=envelope.task_id if envelope else None,
            delivery=envelope.deliveries if envelope else 1,
            envelope=raw,
            processing_key=self.processing_key,
            status=status,
            finished_at=datetime.now(),
            duration_ms=round((time.perf_counter() - started) * 1000, 2),
            timings=self._timings,
            backlog=self._backlog,
            **fields,
        )

    def _send(self, records: list[CompletionRecord]) -> bool:
        sent_at = time.time()
        for record in records:
            record.sent_at = sent_at
        try:
            channel.send_records(self.ledger, records)
        except OSError as exc:
            log.error("ledger_lost", error=str(exc))
            return False
        crash_point("worker_after_send")
        return True

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.stopping and (left := deadline - time.monotonic()) > 0:
            self.heartbeat.value = time.monotonic()
            time.sleep(min(left, 0.5))

    def request_stop(self, *_: object) -> None:
        self.stopping = True
        if self._waiting_idle:
            self._waiting_idle = False
            raise WaitInterrupted


class Outbox:
    """The records of one claim on their way to the ledger. Under a backlog the
    ledger lingers anyway, so they go together, in one datagram, within
    OUTBOX_SECONDS and OUTBOX_BYTES; otherwise each goes at once. A held record
    waits for the task after it (a slow download, say); if that task kills this
    worker, the held tasks are done again, never lost."""

    def __init__(self, *, backlog: bool) -> None:
        self.backlog = backlog
        self._held: list[CompletionRecord] = []
        self._held_since = 0.0
        self._held_bytes = 0

    def add(self, record: CompletionRecord, *, more_coming: bool, now: float) -> list[CompletionRecord]:
        """Hold `record`, or return it with those held before it: the records to send now."""
        if not self._held:
            self._held_since = now
        self._held.append(record)
        self._held_bytes += len(record.envelope)
        if (
            self.backlog
            and more_coming
            and now - self._held_since < OUTBOX_SECONDS
            and self._held_bytes < OUTBOX_BYTES
        ):
            return []
        return self.take()

    def take(self) -> list[CompletionRecord]:
        """Every record held, to send."""
        ready, self._held, self._held_bytes = self._held, [], 0
        return ready


class StopRequested(Exception):
    """Stop was asked for while a task could not be finished; it is left to redelivery."""


class WaitInterrupted(BaseException):
    """Raised by the stop signal's handler into an idle worker's blocking wait.
    A BaseException, so that no `except Exception` on the way (redis-py's
    included: it drops the connection and re-raises) swallows it."""


def worker_main(
    settings: Settings,
    *,
    slot: int,
    instance: str,
    heartbeat: Synchronized,
    unstarted: Synchronized,
    board: TaskBoard,
) -> None:
    """Entry point of a forked worker process."""
    worker = Worker(settings, slot=slot, instance=instance, heartbeat=heartbeat, unstarted=unstarted, board=board)
    process.reset_signals_in_child(worker.request_stop)
    process.die_with_parent(worker.parent)
    process.set_title(f"worker {slot}")
    configure_logging(settings, role="worker")
    structlog.contextvars.bind_contextvars(worker=slot, pid=os.getpid())
    # One core per worker: the pool, not OpenCV's thread pool, spreads the load.
    cv2.setNumThreads(1)
    code = worker.run()
    worker.log_stop(code)
    sys.exit(code)
