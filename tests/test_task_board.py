"""The task board: what a worker publishes of its task in hand, and how the
supervisor finds that task's entry in the worker's processing list."""

from __future__ import annotations

import multiprocessing

import pytest

from image_result_client.protocol import QueueKeys
from shared.ipc.task_board import ENCODE, LOAD, TaskBoard, describe_task
from shared.state.task_lists import TaskLists


def envelope(task_id: str, deliveries: int, message: bytes) -> bytes:
    return b"irw2 %s %d %d s\n%s" % (task_id.encode(), deliveries, len(message), message)


@pytest.fixture
def board() -> TaskBoard:
    return TaskBoard(multiprocessing.get_context("fork"))


@pytest.mark.fast
def test_a_board_shows_the_task_in_hand_and_nothing_between_tasks(board):
    assert board.read(unstarted=3) is None
    board.start()
    started = board.read(unstarted=3)
    assert started is not None and started.phase == "start" and started.index == -4
    assert not started.has_ids  # a message too large to read whole fails in "start"
    board.enter(LOAD)
    loading = board.read(unstarted=3)
    assert loading.phase == "load" and loading.has_ids and loading.since == started.since
    assert board.still(loading)
    board.end()
    assert board.read(unstarted=3) is None and not board.still(loading)
    board.start()
    board.enter(ENCODE)
    assert not board.still(loading)  # the next task: ids read for the last one are dropped


@pytest.mark.fast
def test_describe_task_names_its_ids_when_its_entry_is_known(board):
    board.start()
    board.enter(LOAD)
    reading = board.read(unstarted=0)
    now = reading.since + 2.5
    entry = envelope("abc123", 2, b'{"request_id": "r1", "image_id": 7, "image_url": "http://x/a.jpg"}')
    task = describe_task(reading, entry, now=now, wall_now=1000.0)
    assert task == {"phase": "load", "age": 2.5, "started_at": 997.5, "task_id": "abc123", "attempt": 2,
                    "request_id": "r1", "image_id": "7"}
    assert describe_task(reading, None, now=now, wall_now=1000.0) == {"phase": "load", "age": 2.5, "started_at": 997.5}
    assert describe_task(reading, b"not an envelope", now=now, wall_now=1000.0)["phase"] == "load"


def test_the_task_in_hand_is_found_from_the_tail_of_the_processing_list(redis_client, queue_name):
    """Done tasks the ledger has not acknowledged yet lie before it, the claimed
    but unstarted ones after it; the ledger's removals leave its place from the tail."""
    key = QueueKeys(queue_name).processing("inst", "w1")
    done = [envelope(f"done{i}", 1, b"{}") for i in range(3)]
    in_hand = envelope("hand", 1, b'{"request_id": "mine"}')
    unstarted = [envelope(f"later{i}", 1, b"{}") for i in range(2)]
    redis_client.rpush(key, *done, in_hand, *unstarted)
    read_entries = TaskLists(redis_client, QueueKeys(queue_name)).entries_at
    assert read_entries({0: (key, -(len(unstarted) + 1))}) == {0: in_hand}
    redis_client.lrem(key, 1, done[1])  # the ledger acknowledges
    assert read_entries({0: (key, -3), 1: (key + "x", -1)}) == {0: in_hand, 1: None}
    assert read_entries({}) == {}
