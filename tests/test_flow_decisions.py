"""The producer's flow-control decisions, in-process, on the real /dev/shm:
what counts against SHM_BUDGET_BYTES, the settings, and that producers racing
for the last room never keep more than the budget between them."""

from __future__ import annotations

import os
import threading
import time

import pytest

from image_result_client.flow import (
    FlowLimits,
    PushRefused,
    create_segment,
    default_shm_budget,
    reserve_segment,
    shm_budget_room,
    shm_bytes_waiting,
)
from image_result_client.producer import _deadline_in, unlink_segment
from image_result_client.protocol import SHM_DIR

pytestmark = pytest.mark.fast

FRAME = 1 << 20


@pytest.fixture
def prefix(shm_prefix: str) -> str:
    """conftest's segment prefix of the test's own, unlinked afterwards."""
    return shm_prefix


def test_default_budget_is_half_the_tmpfs() -> None:
    info = os.statvfs(SHM_DIR)
    assert default_shm_budget() == info.f_blocks * info.f_frsize // 2
    assert FlowLimits.from_settings({}).shm_budget_bytes == default_shm_budget()


def test_a_segment_counts_its_size_before_its_pages_are_written(prefix: str) -> None:
    shm = create_segment(prefix + "a", FRAME)  # ftruncate only: no page written yet
    shm.close()
    assert shm_bytes_waiting(prefix) == FRAME
    assert shm_bytes_waiting(prefix + "b") == 0  # another prefix is not counted


def test_a_segment_counts_whole_pages_as_tmpfs_holds_them(prefix: str) -> None:
    shm = create_segment(prefix + "odd", 405_900)
    assert shm_bytes_waiting(prefix) == 409_600  # before a page is written
    shm.buf[:] = b"\x01" * 405_900
    shm.close()
    assert shm_bytes_waiting(prefix) == 409_600 == os.stat(SHM_DIR / (prefix + "odd")).st_blocks * 512


def test_room_is_the_budget_less_what_waits(prefix: str) -> None:
    limits = FlowLimits(shm_budget_bytes=3 * FRAME, shm_name_prefix=prefix)
    assert shm_budget_room(limits) == 3 * FRAME
    create_segment(prefix + "a", FRAME).close()
    assert shm_budget_room(limits) == 2 * FRAME
    assert shm_budget_room(FlowLimits(shm_budget_bytes=0, shm_name_prefix=prefix)) is None


def test_reserve_refuses_at_the_budget_and_leaves_nothing(prefix: str) -> None:
    limits = FlowLimits(shm_budget_bytes=2 * FRAME + 10, push_wait=0, shm_name_prefix=prefix)
    for name in ("a", "b"):
        reserve_segment(prefix + name, FRAME, limits, deadline=time.monotonic()).close()
    with pytest.raises(PushRefused, match=r"SHM_BUDGET_BYTES=2097162 reached: 2097152 bytes") as refused:
        reserve_segment(prefix + "c", FRAME, limits, deadline=time.monotonic())
    assert refused.value.limit == "SHM_BUDGET_BYTES"
    assert not (SHM_DIR / (prefix + "c")).exists()


def test_reserve_waits_for_room_the_pool_makes(prefix: str) -> None:
    limits = FlowLimits(shm_budget_bytes=FRAME, push_wait=5, shm_name_prefix=prefix)
    reserve_segment(prefix + "a", FRAME, limits, deadline=time.monotonic()).close()
    threading.Timer(0.3, unlink_segment, args=(prefix + "a",)).start()
    started = time.monotonic()
    reserve_segment(prefix + "b", FRAME, limits, deadline=started + 5).close()
    assert time.monotonic() - started >= 0.25


def test_producers_racing_for_the_last_room_never_keep_more_than_the_budget(prefix: str) -> None:
    """Each round, four threads reserve at once with room for one frame; the
    segments they keep are counted and given back before the next round."""
    limits = FlowLimits(shm_budget_bytes=FRAME, push_wait=0, shm_name_prefix=prefix)
    rounds, racers = 150, 4
    barrier = threading.Barrier(racers)
    kept: list[list[str]] = [[] for _ in range(rounds)]

    def race(racer: int) -> None:
        for round_ in range(rounds):
            barrier.wait()
            name = f"{prefix}{round_}_{racer}"
            try:
                reserve_segment(name, FRAME, limits, deadline=0).close()
                kept[round_].append(name)
            except PushRefused:
                pass
            barrier.wait()
            if racer == 0:
                for name in kept[round_]:
                    unlink_segment(name)
            barrier.wait()

    threads = [threading.Thread(target=race, args=(n,)) for n in range(racers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert max(len(names) for names in kept) == 1, [names for names in kept if len(names) > 1][:3]


@pytest.mark.parametrize(
    ("values", "problem"),
    [
        ({"SHM_BUDGET_BYTES": "lots"}, "SHM_BUDGET_BYTES='lots'"),
        ({"SHM_BUDGET_BYTES": "-1"}, "SHM_BUDGET_BYTES='-1'"),
        ({"PUSH_WAIT": "nan"}, "PUSH_WAIT='nan'"),
        ({"PUSH_WAIT": "-2"}, "PUSH_WAIT='-2'"),
        ({"MAX_QUEUE_LENGTH": "1.5"}, "MAX_QUEUE_LENGTH='1.5'"),
        ({"SHM_BUDGET_BYTES": "\u0661\u0662\u0660\u0660"}, "SHM_BUDGET_BYTES="),  # Arabic-Indic digits
        ({"MAX_QUEUE_LENGTH": "9" * 5000}, "MAX_QUEUE_LENGTH="),  # int() raises past 4,300 digits
    ],
)
def test_bad_flow_settings_name_the_variable(values: dict[str, str], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        FlowLimits.from_settings(values)


def test_flow_settings_and_their_defaults() -> None:
    limits = FlowLimits.from_settings({"SHM_BUDGET_BYTES": "1000", "PUSH_WAIT": "2.5", "MAX_QUEUE_LENGTH": "7",
                                       "SHM_NAME_PREFIX": "cam_"})
    assert limits == FlowLimits(1000, 2.5, 7, "cam_")
    defaults = FlowLimits.from_settings({"SHM_BUDGET_BYTES": "", "PUSH_WAIT": " "})
    assert (defaults.push_wait, defaults.max_queue_length, defaults.shm_name_prefix) == (30.0, 0, "img_shm_")


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), "60", True])
def test_expires_in_must_be_positive_seconds(bad: object) -> None:
    with pytest.raises(ValueError, match="expires_in"):
        _deadline_in(bad)  # type: ignore[arg-type]


def test_expires_in_becomes_a_deadline_from_now() -> None:
    assert _deadline_in(None) is None
    assert time.time() + 59 < _deadline_in(60) <= time.time() + 60.001  # kept to the millisecond


def test_a_frame_larger_than_the_budget_is_refused_at_once(prefix: str) -> None:
    limits = FlowLimits(shm_budget_bytes=FRAME - 1, push_wait=60, shm_name_prefix=prefix)
    started = time.monotonic()
    with pytest.raises(PushRefused, match="can never fit"):
        reserve_segment(prefix + "a", FRAME, limits, deadline=started + 60)
    assert time.monotonic() - started < 5 and not (SHM_DIR / (prefix + "a")).exists()


def test_a_bounded_listing_looks_at_no_more_entries_than_asked(prefix: str) -> None:
    for index in range(5):
        create_segment(f"{prefix}{index}", FRAME).close()
    assert shm_bytes_waiting(prefix) == 5 * FRAME
    # Other entries of /dev/shm count towards the bound too: at most 5 of ours are seen.
    assert shm_bytes_waiting(prefix, max_entries=5) <= 5 * FRAME
    assert shm_bytes_waiting(prefix, max_entries=0) == 0
