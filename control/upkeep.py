"""The supervisor's chores in Redis, one call each per pass of its loop.

    supervisor pass --renew_lease--> {Q}:lease:<instance> (the pool's state for
                                     `status`), {Q}:live_host:<HOST_ID>
                    --watch_replicas--> INFO replication, under Sentinel
                    --requeue_lists--> a dead worker's processing list --> Q
                    --recover_orphaned_lists--> lists of instances whose lease
                                     expired --> Q
                    --promote_due_retries--> {Q}:delayed --> Q
                    --expire_requests--> a request silent for REQUEST_TTL ends
                                     "incomplete" (shared.state.request_state), onto this
                                     host's unwritten list, for its ledger to write
                    --report_progress--> a `progress` log line (control/progress.py)

The supervisor decides (which child died, when the state changed); this class
does what those decisions ask of Redis and remembers what is still to do.

Hazards handled here:
- Redis away: every chore is one call that logs the failure (once per outage
  and chore, not once a second) and returns; what was not done is kept and
  tried on the next pass. The supervisor never waits on Redis for long and
  never dies of it.
- A dead worker's list is requeued only once Redis has taken it: the list and
  the count of its never-started tasks stay queued here until then.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import structlog

from control.progress import ProgressMeter
from image_result_client.protocol import QueueKeys
from shared.config import Settings
from shared.ipc.sdnotify import Notifier
from shared.ipc.task_board import TaskBoard, describe_task
from shared.state.pool_registry import PoolRegistry
from shared.state.redis_queue import REDIS_ERRORS, RedisRefused, ReliableQueue, is_refusal
from shared.state.request_state import EXPIRE_BATCH, RequestState

REDIS_FAILED = object()
# How long one pass may spend ending requests whose REQUEST_TTL ran out.
EXPIRY_PASS_SECONDS = 0.2


class WorkerInHand(Protocol):
    """What tasks_in_hand reads of a worker (supervisor.Child)."""

    processing_key: str | None
    unstarted: Any  # a multiprocessing Value("i"): its .value
    board: TaskBoard | None


class PoolUpkeep:
    def __init__(
        self, settings: Settings, *, instance: str, queue: ReliableQueue, registry: PoolRegistry, notifier: Notifier
    ) -> None:
        self.settings = settings
        self.instance = instance
        self.queue = queue
        self.registry = registry
        self.keys: QueueKeys = queue.keys
        self.notifier = notifier
        self.log = structlog.get_logger()
        # Processing lists to requeue, with how many tasks at their end were never started.
        self.lists_to_requeue: list[tuple[str, int]] = []
        self.replicas: int | None = None  # connected to the master, under Sentinel
        self.lease_due = 0.0  # 0: renew on the next pass (the state `status` shows has changed)
        self.orphan_scan_due = 0.0
        self.progress = ProgressMeter()
        self.redis_failing: set[str] = set()
        # Until the supervisor's first pass is done (before any child is forked),
        # a permanent refusal (a command the ACL lacks) stops the start: RedisRefused.
        self.refusals_fatal = True
        self.requests_due = 0.0
        self.requests = self._request_state()

    def _request_state(self) -> RequestState:
        return RequestState.for_pool(self.queue.client, self.keys, self.settings)

    def reload(self, settings: Settings) -> None:
        """Take a SIGHUP's settings (the supervisor keeps those only a restart changes)."""
        self.settings = settings
        self.requests = self._request_state()

    # -- the lease -----------------------------------------------------------

    def state_changed(self) -> None:
        """What `status` shows changed (readiness, a child, the desired count):
        renew the lease with it on this pass, not up to LEASE_TTL/3 later."""
        self.lease_due = 0.0

    def renew_lease(self, state: Callable[[], bytes], *, serving_host: str | None) -> None:
        """Every LEASE_TTL/3, or at once after state_changed(). With serving_host,
        that host's live key is kept with it (producers with a fallback URL look at it)."""
        if time.monotonic() < self.lease_due:
            return
        renewed = self.redis_call(
            "lease_renewal_failed",
            self.registry.leases.renew,
            self.instance,
            self.settings.lease_ttl,
            state(),
            serving_host=serving_host,
        )
        if renewed is not REDIS_FAILED:
            self.lease_due = time.monotonic() + self.settings.lease_ttl / 3

    def drop_lease(self) -> None:
        """At a clean stop. The host's live key stays: another supervisor with our
        HOST_ID may be serving the host queue too. Ours expires within LEASE_TTL."""
        self.redis_call("lease_drop_failed", self.registry.leases.drop, self.instance)

    def tasks_in_hand(self, workers: Mapping[int, WorkerInHand], now: float) -> dict[int, dict]:
        """Slot -> the task that worker is on: its phase and age from the
        worker's board, its ids from its entry in the worker's processing list,
        read only here, once per lease renewal (shared/ipc/task_board.py)."""
        readings = {}
        for slot, child in workers.items():
            if child.board is not None and child.unstarted is not None:
                reading = child.board.read(unstarted=child.unstarted.value)
                if reading is not None:
                    readings[slot] = reading
        wanted = {slot: (workers[slot].processing_key, reading.index) for slot, reading in readings.items() if reading.has_ids}
        entries = self.redis_call("task_lookup_failed", self.registry.task_lists.entries_at, wanted)
        if entries is REDIS_FAILED:
            entries = {}
        wall_now = time.time()
        return {
            slot: describe_task(
                reading,
                entries.get(slot) if workers[slot].board.still(reading) else None,
                now=now,
                wall_now=wall_now,
            )
            for slot, reading in readings.items()
        }

    # -- replicas ------------------------------------------------------------

    def watch_replicas(self) -> None:
        """Under Sentinel, say when the master has no replica left to copy
        claims to (claims then go on unreplicated, or pause with
        CLAIM_MIN_REPLICAS), and when it has one again."""
        if not self.queue.replicated_claims:
            return
        counted = self.redis_call("replica_count_failed", self.queue.replicas_connected)
        if counted is REDIS_FAILED or counted == self.replicas:
            return
        self.replicas = counted
        required = self.settings.claim_min_replicas
        if counted >= max(1, required):
            self.log.info("replicas_connected", replicas=counted)
            self.notifier.notify(f"STATUS=serving {self.settings.queue}; claims copied to {counted} replicas")
        elif required:
            self.log.warning("claims_paused", replicas=counted, required=required)
            self.notifier.notify(f"STATUS=paused: {counted} replicas connected, CLAIM_MIN_REPLICAS={required}")
        else:
            self.log.warning("claims_unreplicated", replicas=counted)
            self.notifier.notify(f"STATUS=serving {self.settings.queue}; no replica connected, claims not replicated")

    # -- tasks back onto the queue ---------------------------------------------

    def requeue_later(self, processing_key: str, unstarted: int) -> None:
        """A dead worker's list, with how many tasks at its end it never started."""
        self.lists_to_requeue.append((processing_key, unstarted))

    def requeue_lists(self) -> None:
        while self.lists_to_requeue:
            key, unstarted = self.lists_to_requeue[0]
            moved = self.redis_call("requeue_failed", self.queue.requeue, key, unstarted)
            if moved is REDIS_FAILED:
                return  # Redis is away; try again next pass
            self.lists_to_requeue.pop(0)
            if moved:
                self.log.warning("tasks_requeued", processing_list=key, tasks=moved)

    def recover_orphaned_lists(self) -> None:
        """Every LEASE_TTL: the lists of instances whose lease expired (a host
        that died) go back onto the queue."""
        if time.monotonic() < self.orphan_scan_due:
            return
        orphans = self.redis_call("orphan_scan_failed", self.registry.orphaned_lists)
        if orphans is REDIS_FAILED:
            return
        self.orphan_scan_due = time.monotonic() + self.settings.lease_ttl
        for key in orphans:
            self.log.warning("orphaned_list_found", processing_list=key)
        # Nothing says which tasks of a dead instance were started: all count.
        self.lists_to_requeue.extend((key, 0) for key in orphans)
        self.requeue_lists()

    def promote_due_retries(self) -> None:
        moved = self.redis_call("retry_promotion_failed", self.queue.promote_due_retries, time.time())
        if moved is not REDIS_FAILED and moved:
            self.log.info("retries_due", tasks=moved)

    # -- requests --------------------------------------------------------------

    def expire_requests(self) -> None:
        """About once a second: end as "incomplete" the requests with no image
        recorded for REQUEST_TTL. Every supervisor looks; the script checks and
        ends in one step, so each such request ends once, on the host that got
        there first, whose ledger writes it (shared/state/lua/request_expire.lua)."""
        if time.monotonic() < self.requests_due:
            return
        # Batch after batch for a bounded time: producers can open requests far
        # faster than one batch a second would end them. What is left after
        # the time is up is taken at the next pass, not a second later.
        stop_at = time.monotonic() + EXPIRY_PASS_SECONDS
        total, backlog = 0, False
        while True:
            ended = self.redis_call("request_expiry_failed", self.requests.expire_due, time.time())
            if ended is REDIS_FAILED:
                break
            total += len(ended)
            backlog = len(ended) >= EXPIRE_BATCH
            if not backlog or time.monotonic() >= stop_at:
                break
        self.requests_due = time.monotonic() + (0.0 if backlog else 1.0)
        if total:
            self.log.info("requests_expired", requests=total)

    # -- progress --------------------------------------------------------------

    def report_progress(self) -> None:
        """While there is work, a `progress` line every PROGRESS_SECONDS, from
        the counts the ledger's acknowledgements keep in Redis (control/progress.py)."""
        fields = self.redis_call(
            "progress_read_failed",
            self.progress.step,
            self.registry.stats,
            every=self.settings.progress_seconds,
            # A worker claims from its host's queue first, with HOST_QUEUE or not.
            waiting_lists=(self.keys.queue, self.keys.host(self.settings.host_id)),
            now=time.monotonic(),
            wall_now=time.time(),
        )
        if fields is not REDIS_FAILED and fields is not None:
            self.log.info("progress", **fields)

    # -- every call ------------------------------------------------------------

    def redis_call(self, failure_event: str, func: Callable[..., Any], *args: Any, **options: Any) -> Any:
        """Run one Redis command; on a connection problem log it and return REDIS_FAILED."""
        try:
            result = func(*args, **options)
        except REDIS_ERRORS as exc:
            if self.refusals_fatal and is_refusal(exc):
                raise RedisRefused(str(exc)) from None
            # One warning per outage and chore, not one per second.
            level = self.log.debug if failure_event in self.redis_failing else self.log.warning
            level(failure_event, error=str(exc), redis=self.settings.redacted_redis_url())
            self.redis_failing.add(failure_event)
            return REDIS_FAILED
        if self.redis_failing:
            self.log.info("redis_reconnected", recovered=sorted(self.redis_failing))
            self.redis_failing.clear()
        return result
