"""The reliable queue in Redis: the connection, and the task path's atomic moves.

    HOSTING_TASKS_QUEUE  --claim (Lua) / BLMOVE-->  {queue}:processing:{instance}:{worker}
          ^                                                 |
          +---- requeue (Lua), when that worker is dead ----+---- LREM by the ledger,
                                                                 once the record is durable

A task is always in exactly one list. Claiming wraps a producer's message in an
envelope (see shared.messages) carrying a task id and a delivery count, so a
redelivered task keeps its identity. What the pool keeps about itself (leases,
orphaned lists, host queues, depths, dead letters, draining a host) is in
shared.state.pool_registry; the scripts are in shared/state/lua/, the keys in
image_result_client.protocol.QueueKeys (docs/design.md#redis-keys).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.commands.core import Script
from redis.retry import Retry
from redis.sentinel import Sentinel

# The keys and the producers' script are the client's to publish; here they are used.
from image_result_client.protocol import QueueKeys
from shared.config import Settings

# Blocking waits stay well under the socket timeout so a silent dead peer
# (Redis restarted behind a NAT, say) is noticed instead of hanging forever.
BLOCK_SECONDS = 2
SOCKET_TIMEOUT = 10.0
CONNECT_TIMEOUT = 5.0
CLAIM_REPLICATION_MS = 1000
# How long a worker trusts its count of the master's connected replicas.
REPLICA_COUNT_SECONDS = 5.0

# Everything Redis can answer with is waited out with backoff and logged, never
# a crash: an outage, a failover (READONLY from a demoted master, UNBLOCKED for
# a blocked call), OOM under maxmemory, even a queue key of the wrong type. A
# worker that died on them would be respawned straight into the same error.
REDIS_ERRORS = (redis.exceptions.RedisError,)
# Except, at start, the answers that no wait will change: wrong credentials, an
# ACL without a command the pool sends, a database index the server lacks. Those
# are settings to correct (exit 2), not an outage to wait out (see is_refusal).
_REFUSALS = (redis.exceptions.AuthenticationError, redis.exceptions.AuthorizationError, redis.exceptions.NoPermissionError)
_REFUSAL_TEXTS = ("DB index is out of range", "invalid DB index", "WRONGPASS", "NOAUTH", "NOPERM")


class RedisRefused(Exception):
    """Redis answered with a refusal that retrying cannot change (is_refusal)."""


def is_refusal(exc: BaseException) -> bool:
    """Whether a Redis error is a permanent refusal of our settings, rather
    than a network error or a busy or failing-over server."""
    if isinstance(exc, _REFUSALS):
        return True
    return isinstance(exc, redis.exceptions.ResponseError) and any(text in str(exc) for text in _REFUSAL_TEXTS)

# The Lua scripts, one file each in shared/state/lua/ with its KEYS and ARGV in its
# header; envelopes.lua holds what those that wrap and unwrap messages share.
LUA_DIR = Path(__file__).resolve().parent / "lua"


def load_script(name: str, *, envelopes: bool = False) -> str:
    source = (LUA_DIR / f"{name}.lua").read_text()
    return (LUA_DIR / "envelopes.lua").read_text() + "\n" + source if envelopes else source


CLAIM_SCRIPT = load_script("claim", envelopes=True)
STAMP_INCOMING_SCRIPT = load_script("stamp_incoming", envelopes=True)
REQUEUE_SCRIPT = load_script("requeue", envelopes=True)
PROMOTE_SCRIPT = load_script("promote", envelopes=True)
ACK_SCRIPT = load_script("ack")
REQUEUE_DEAD_SCRIPT = load_script("requeue_dead")  # run by shared.state.pool_registry
DRAIN_ENTRY_SCRIPT = load_script("drain_entry", envelopes=True)  # run by shared.state.pool_registry

# Of every CLAIM_CYCLE messages a worker claims while both its host's queue and
# the shared queue hold tasks, one comes from the shared queue and the rest from
# the host's (shared/state/lua/claim.lua): shared-memory tasks, which hold RAM and
# are latency-bound, keep most of the claims, and neither queue can starve.
CLAIM_CYCLE = 4

# Announced task ids kept at least this long in count, so a redelivered
# duplicate (seconds later) is still recognised.
MIN_ANNOUNCED_IDS = 100_000

def fresh_task_ids(count: int) -> list[str]:
    """Task ids for new tasks: 96 random bits each, so that none can be guessed
    from another (they appear in results.json) nor collide across hosts."""
    randomness = os.urandom(12 * count).hex()
    return [randomness[24 * i: 24 * (i + 1)] for i in range(count)]


@dataclass(frozen=True, slots=True)
class ScriptCall:
    """A script with its KEYS and ARGV, to run alone or in a transaction."""

    script: Script
    keys: list[str]
    args: list[Any]


@dataclass(frozen=True, slots=True)
class Acknowledgement:
    processing_key: str
    envelope: bytes
    kind: str  # "final", "junk" (final, for a message with no request id), "retry" or "ack"
    task_id: str
    dead_letter: bytes = b""
    retry_at: float = 0.0
    event: bytes = b""  # the record for the results stream


def connect(settings: Settings) -> redis.Redis:
    """A client for this process; build one per process, after fork.

    Retries are ours (capped backoff in each loop), not the client's, so a
    blocking call is never silently repeated. With REDIS_SENTINELS the client
    asks the sentinels for the master and asks again after a failover (a write
    refused by a demoted master surfaces as a ConnectionError, which every loop
    already waits out); REDIS_URL then only gives the user, password, database
    and whether to use TLS.
    """
    options: dict = {
        "socket_timeout": SOCKET_TIMEOUT,
        "socket_connect_timeout": CONNECT_TIMEOUT,
        "health_check_interval": 15,
        "retry": Retry(NoBackoff(), 0),
        "decode_responses": False,
    }
    if not settings.redis_url.startswith("unix://"):
        options["socket_keepalive"] = True  # TCP only: a Unix socket refuses the option
    if settings.redis_url.startswith("rediss://"):
        # TLS: verify the server against REDIS_TLS_CA_FILE (else the system's CAs),
        # and present a client certificate when the server asks for one.
        options.update(
            ssl_cert_reqs="required",
            ssl_ca_certs=_text(settings.redis_tls_ca_file),
            ssl_certfile=_text(settings.redis_tls_cert_file),
            ssl_keyfile=_text(settings.redis_tls_key_file),
        )
    if not settings.redis_sentinels:
        return redis.Redis.from_url(settings.redis_url, **options)
    parts = urlsplit(settings.redis_url)
    database = parts.path.strip("/")
    options.update(
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        db=int(database) if database.isascii() and database.isdigit() else 0,
    )
    if settings.redis_url.startswith("rediss://"):
        options["ssl"] = True
    sentinel = Sentinel(
        list(settings.redis_sentinels),
        sentinel_kwargs={"socket_timeout": CONNECT_TIMEOUT, "socket_connect_timeout": CONNECT_TIMEOUT},
    )
    return sentinel.master_for(settings.redis_sentinel_master, **options)


def _text(path: Path | None) -> str | None:
    return None if path is None else str(path)


class ReliableQueue:
    """The queue operations, on one client."""

    def __init__(
        self,
        client: redis.Redis,
        keys: QueueKeys,
        *,
        max_message_bytes: int,
        block_seconds: float = BLOCK_SECONDS,
        host_queue: str | None = None,
        wait_on_host_queue: bool = True,
        replicated_claims: bool = False,
        min_replicas: int = 0,
    ) -> None:
        self.client = client
        self._replicated_claims = replicated_claims
        self._min_replicas = min_replicas
        self._replicas: int | None = None  # connected to the master, as last counted
        self._replicas_counted_at = 0.0
        self.keys = keys
        self._max_bytes = max_message_bytes
        self._block_seconds = block_seconds
        self._host_queue = host_queue
        self._wait_on_host_queue = wait_on_host_queue
        self._claim = client.register_script(CLAIM_SCRIPT)
        self._claimed = 0  # messages this queue's worker claimed: its place in the CLAIM_CYCLE
        self._stamp_incoming = client.register_script(STAMP_INCOMING_SCRIPT)
        self._requeue = client.register_script(REQUEUE_SCRIPT)
        self._promote = client.register_script(PROMOTE_SCRIPT)
        self._ack = client.register_script(ACK_SCRIPT)

    def ping(self) -> None:
        """Raise unless Redis answers (the supervisor waits for it at start)."""
        self.client.ping()

    def register(self, processing_key: str) -> None:
        """List a worker's processing list, so that it is requeued if orphaned,
        with the list its blocking wait takes from (where a message not yet
        wrapped goes back) and its host's queue (where host-queue tasks do)."""
        with self.client.pipeline(transaction=True) as pipe:
            pipe.sadd(self.keys.registry, processing_key)
            pipe.hset(self.keys.wait_sources, processing_key, f"{self._wait_source()} {self._own_queue()}")
            pipe.execute()

    def claim(self, processing_key: str, *, count: int) -> list[bytes]:
        """Up to `count` envelopes moved into `processing_key`, without waiting:
        of every CLAIM_CYCLE, CLAIM_CYCLE-1 from this host's queue first and one
        from the shared queue first, each falling back to the other."""
        keys = [self.keys.queue, processing_key, self._own_queue(), self.keys.redelivery]
        args = [count, self._max_bytes, self._claimed % CLAIM_CYCLE, CLAIM_CYCLE, *fresh_task_ids(count)]
        claimed = self._claim(keys=keys, args=args)
        self._claimed += len(claimed)
        if claimed:
            self._wait_for_replica()
        return claimed

    def wait_and_claim(self, processing_key: str) -> tuple[bytes, float] | None:
        """Block up to block_seconds for one message; None when none came. With a
        host queue, the wait is on it (shared-memory tasks are the latency-bound
        ones); the shared queue is looked at on every turn by `claim`.

        Returns the envelope and the seconds its claim took once the message
        was there (stamping it, and the replicas under Sentinel): the task's
        fetch phase. The wait for it is idle time, not the task's."""
        source = self._wait_source()
        incoming = self.keys.incoming(processing_key)
        moved = self.client.blmove(source, incoming, self._block_seconds, "LEFT", "RIGHT")
        if moved is None:
            return None
        arrived = time.perf_counter()
        origin = "s" if source == self.keys.queue else "h"
        envelope = self._stamp_incoming(
            keys=[incoming, processing_key, self.keys.redelivery, source],
            args=[fresh_task_ids(1)[0], self._max_bytes, origin],
        )
        if not envelope:
            return None
        self._wait_for_replica()
        return envelope, time.perf_counter() - arrived

    def _own_queue(self) -> str:
        return self._host_queue or self.keys.queue

    def _wait_source(self) -> str:
        return self._host_queue if self._host_queue and self._wait_on_host_queue else self.keys.queue

    def _wait_for_replica(self) -> None:
        """Under Sentinel, work starts only once the replicas connected to the
        master (and at least CLAIM_MIN_REPLICAS) have the claim. A claim lost
        in a failover (taken on an old master after its replica was promoted)
        would leave the message in the new master's queue, to be claimed again
        under a new task id and done twice.

        With no replica connected (the one there was is now the master, say)
        there is nothing to wait for, and claims go on unreplicated: the pool
        keeps serving, and says so (`replicas_connected`). Unless the sentinels
        name another master by now: an old master loses its replica to the
        promotion before it is demoted, and a claim taken there is lost with
        its data. A replica that is connected but does not answer within
        CLAIM_REPLICATION_MS may mean a failover under way too. Either raises,
        and the worker waits like for any Redis outage, counting the replicas
        again on its next claim."""
        if not self._replicated_claims:
            return
        required = max(self._min_replicas, self.replicas_connected())
        if required == 0:
            if not self._master_unchanged():
                self._replicas_counted_at = 0.0
                raise redis.exceptions.ConnectionError("the sentinels name another master: the claim was on an old one")
            return
        acknowledged = self.client.execute_command("WAIT", required, CLAIM_REPLICATION_MS)
        if acknowledged < required:
            self._replicas_counted_at = 0.0
            raise redis.exceptions.ConnectionError(
                f"{acknowledged} of {required} replicas acknowledged the claim: the master may be failing over"
            )

    def _master_unchanged(self) -> bool:
        """Whether the sentinels still name the master our connections go to
        (asking them also sends idle connections to the new one, if any)."""
        pool = self.client.connection_pool
        proxy = getattr(pool, "proxy", None)
        if proxy is None:
            return True  # not through Sentinel
        connected_to = proxy.master_address
        return pool.get_master_address() == connected_to

    @property
    def replicated_claims(self) -> bool:
        return self._replicated_claims

    def replicas_connected(self) -> int:
        """The replicas connected to the master now (ROLE), counted again every
        REPLICA_COUNT_SECONDS."""
        if self._replicas is None or time.monotonic() - self._replicas_counted_at > REPLICA_COUNT_SECONDS:
            role = self.client.execute_command("ROLE")
            self._replicas = len(role[2]) if role and role[0] in (b"master", "master") else 0
            self._replicas_counted_at = time.monotonic()
        return self._replicas

    def requeue(self, processing_key: str, unstarted: int = 0) -> int:
        """Return every task in a processing list to the head of the list it
        came from, as its producer's bytes; the last `unstarted` of them were
        never started and are not counted as a delivery."""
        wait_source, host_queue = self._registered_lists(processing_key)
        keys = [
            processing_key, self.keys.queue, self.keys.registry, self.keys.committing, self.keys.wait_sources,
            self.keys.incoming(processing_key), host_queue, wait_source, self.keys.redelivery,
        ]
        return int(self._requeue(keys=keys, args=[unstarted]))

    def _registered_lists(self, processing_key: str) -> tuple[str, str]:
        """The wait source and host queue `register` wrote down for a list.
        Only a list of this queue is believed; anything else means the shared queue."""
        raw = self.client.hget(self.keys.wait_sources, processing_key) or b""
        names = raw.decode(errors="replace").split(" ")
        lists = [name if self.keys.is_producers_list(name) else self.keys.queue for name in names[:2]]
        wait_source = lists[0] if lists else self.keys.queue
        return wait_source, lists[1] if len(lists) > 1 else wait_source

    def mark_committing(self, task_ids: list[str], host_queue: str) -> None:
        """Say, before a ledger commits their records, that these tasks' records
        may be on this host's disk until they are acknowledged. Should the host
        die in between, a survivor requeues them to `host_queue`, for this
        host's ledger, which knows, rather than to any host, which would do
        them again."""
        if task_ids:
            self.client.hset(self.keys.committing, mapping=dict.fromkeys(task_ids, host_queue))

    def acknowledgement(
        self,
        acks: list[Acknowledgement],
        *,
        counts: dict[str, int],
        dead_letter_max: int,
        now: float,
        stream: str = "",
        stream_maxlen: int = 0,
    ) -> ScriptCall:
        """Remove tasks from their processing lists, announce their outcomes,
        schedule their retries and count the batch for `status`, atomically: a
        script call for the ledger's transaction, which counts requests in the
        same round trip (shared.state.request_state)."""
        keys = [
            self.keys.dead, self.keys.announced, self.keys.delayed, self.keys.stats(now), stream or self.keys.dead,
            self.keys.committing, self.keys.dead_junk, self.keys.dead_trimmed,
        ]
        args: list = [
            dead_letter_max,
            now,
            counts.get("completed", 0),
            counts.get("failed", 0),
            counts.get("retry", 0),
            stream_maxlen if stream else 0,
            max(MIN_ANNOUNCED_IDS, dead_letter_max, stream_maxlen),
            counts.get("expired", 0),
        ]
        for ack in acks:
            keys.append(ack.processing_key)
            args.extend([ack.envelope, ack.kind, ack.dead_letter, ack.retry_at, ack.task_id, ack.event])
        return ScriptCall(self._ack, keys, args)

    def announced(self, task_id: str) -> bool:
        """Whether the ledger has acknowledged this task's final record."""
        return self.client.zscore(self.keys.announced, task_id) is not None

    def promote_due_retries(self, now: float, *, limit: int = 1000) -> int:
        """Move retries whose time has come back onto the queue."""
        keys = [self.keys.delayed, self.keys.queue, self.keys.redelivery]
        return int(self._promote(keys=keys, args=[now, limit]))
