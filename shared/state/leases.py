"""Each supervisor's lease, and the live key of the host it serves.

    {Q}:lease:<instance>     string, expires after LEASE_TTL: the supervisor's
                             state (children, beats, tasks in hand) as JSON,
                             renewed every LEASE_TTL/3 (control/upkeep.py)
    {Q}:live_host:<HOST_ID>  string, the instance serving that host's queue,
                             with the same expiry (producers with a fallback
                             URL look at it)

Read by `status`, `check`, `host drain`, `task`, the dashboard, and
PoolRegistry.orphaned_lists (a processing list whose instance holds no lease
is requeued). Leases are found only by SCAN: their number is that of running
supervisors, but the keyspace around them may be large.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import redis

from image_result_client.protocol import PUSH_FOR_HOST_SCRIPT, QueueKeys
from shared.state.reading import json_object, scan_prefix


def lease_states(values: Iterable[bytes | None]) -> list[dict]:
    """The lease values that are states: a value that is not a JSON object is
    skipped (whoever can write to Redis may have put anything there)."""
    return [state for state in map(json_object, values) if state is not None]


class Leases:
    """The supervisors' leases and live-host keys, on one client."""

    def __init__(self, client: redis.Redis, keys: QueueKeys) -> None:
        self.client = client
        self.keys = keys

    def renew(self, instance: str, ttl: float, state: bytes = b"{}", *, serving_host: str | None = None) -> None:
        """Renew this instance's lease; its value is the supervisor's state for
        `status`. With `serving_host`, also say for as long that a pool serves
        that host's queue (its live key, holding this instance's id).

        Also loads the producers' script (push_for_host.lua): producers may
        only run it (EVALSHA), never load a script of their own, so the pool
        puts it there and puts it back within LEASE_TTL/3 after a Redis
        restart, a SCRIPT FLUSH or a failover. In the same transaction as the
        live key, so a live key set here never stands without the script.
        Loading a cached script again is cheap and changes nothing."""
        with self.client.pipeline(transaction=True) as pipe:
            pipe.script_load(PUSH_FOR_HOST_SCRIPT)
            pipe.set(self.keys.lease(instance), state, px=int(ttl * 1000))
            if serving_host is not None:
                pipe.set(self.keys.live_host(serving_host), instance, px=int(ttl * 1000))
            pipe.execute()

    def drop(self, instance: str) -> None:
        self.client.delete(self.keys.lease(instance))

    def held(self, instance: str) -> bool:
        """Whether this instance's lease has not expired."""
        return bool(self.client.exists(self.keys.lease(instance)))

    def state(self, instance: str) -> dict | None:
        """One supervisor's state as of its last renewal; None without a lease
        (or with a value that is not a state)."""
        return json_object(self.client.get(self.keys.lease(instance)))

    def states(self, *, max_calls: int | None = None) -> dict[str, dict]:
        """instance -> its supervisor's state, for every live lease that SCAN
        finds in `max_calls` calls (None: all)."""
        found = self.found(max_calls=max_calls)
        prefix = self.keys.lease("")
        states = {}
        for key, raw in zip(found, self.client.mget(found) if found else [], strict=True):
            state = json_object(raw)
            if state is not None:
                states[key.decode(errors="backslashreplace")[len(prefix) :]] = state
        return states

    def found(self, *, max_calls: int | None = None) -> list[bytes]:
        """The lease keys SCAN finds in `max_calls` calls (None: all)."""
        keys, _ = scan_prefix(self.client, self.keys.lease(""), max_calls=max_calls)
        return keys

    def states_at(self, lease_keys: Sequence[bytes]) -> list[dict]:
        """The states held under these lease keys (one MGET), those still there."""
        return lease_states(self.client.mget(lease_keys)) if lease_keys else []
