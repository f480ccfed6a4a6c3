"""compute_backoff: capped exponential delay with jitter, for reconnects and respawns."""

from __future__ import annotations

import random

import pytest

from shared.backoff import compute_backoff

pytestmark = pytest.mark.fast


def test_grows_exponentially_without_jitter() -> None:
    delays = [compute_backoff(n, base=0.1, cap=100.0, jitter=0.0) for n in range(1, 6)]
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6])


def test_never_exceeds_cap() -> None:
    rng = random.Random(1)
    delays = [compute_backoff(n, base=0.1, cap=5.0, rng=rng) for n in range(1, 200)]
    assert max(delays) <= 5.0
    assert compute_backoff(50, base=0.1, cap=5.0, jitter=0.0) == 5.0


@pytest.mark.parametrize("attempt", [0, -1, -1000])
def test_no_wait_before_the_first_attempt(attempt: int) -> None:
    assert compute_backoff(attempt) == 0.0


@pytest.mark.parametrize("attempt", [63, 64, 1025, 10**6, 10**100])
def test_huge_attempt_numbers_do_not_overflow(attempt: int) -> None:
    assert compute_backoff(attempt, cap=7.0, jitter=0.0) == 7.0


@pytest.mark.parametrize("attempt", [1, 3, 8, 40])
def test_jitter_stays_within_its_fraction(attempt: int) -> None:
    rng = random.Random(7)
    full = compute_backoff(attempt, base=0.1, cap=10.0, jitter=0.0)
    delays = [compute_backoff(attempt, base=0.1, cap=10.0, jitter=0.3, rng=rng) for _ in range(500)]
    assert all(full * 0.7 <= d <= full for d in delays)
    # Jitter must actually spread processes apart, not give one value.
    assert max(delays) - min(delays) > full * 0.2


def test_same_seed_same_delays() -> None:
    first = [compute_backoff(n, rng=random.Random(42)) for n in range(1, 20)]
    second = [compute_backoff(n, rng=random.Random(42)) for n in range(1, 20)]
    assert first == second
