"""Capped exponential backoff with jitter, for Redis reconnects and respawn throttling."""

from __future__ import annotations

import random


def compute_backoff(
    attempt: int,
    *,
    base: float = 0.1,
    cap: float = 10.0,
    jitter: float = 0.5,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait before retry number `attempt` (1-based).

    base * 2**(attempt-1), capped, then shortened by up to `jitter` (a fraction)
    so that many processes failing together do not retry in lockstep.
    """
    if attempt < 1:
        return 0.0
    delay = min(cap, base * 2 ** min(attempt - 1, 62))
    spread = (rng or random).random() * jitter
    return delay * (1.0 - spread)
