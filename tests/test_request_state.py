"""The request count's scripts on a real Redis (shared/state/request_state.py and its
Lua): each decision the end-to-end tests in test_requests.py rely on, named."""

from __future__ import annotations

import json

import pytest
import redis

from image_result_client.protocol import QueueKeys
from shared.state.redis_queue import ScriptCall
from shared.state.request_state import CountedImage, RequestState

NOW = 1_800_000_000.0
TTL = 60.0


@pytest.fixture
def state(redis_client: redis.Redis, queue_name: str) -> RequestState:
    return RequestState(redis_client, QueueKeys(queue_name), writer="h1:0123456789ab", request_ttl=TTL,
                        stream=f"{queue_name}:results", stream_maxlen=1000)


def image(request_id: str, image_id: str, declared: int, *, completed: bool = True, task: str = "") -> CountedImage:
    status = "completed" if completed else "failed"
    entry = json.dumps({"image_id": image_id, "status": status, "file_path": f"/out/{image_id}.jpg" if completed else None})
    return CountedImage(request_id, image_id, declared, completed, entry.encode(), task or f"t-{image_id.encode(errors='backslashreplace').hex()}")


def count(state: RequestState, *images: CountedImage, now: float = NOW) -> list[dict]:
    """Count in a transaction with a stand-in acknowledgement (a PING script)."""
    ping = state.client.register_script("return 1")
    return [json.loads(r) for r in state.count_with(ScriptCall(ping, [], []), list(images), now=now)]


def stream_requests(client: redis.Redis, stream: str) -> list[dict]:
    return [json.loads(f[b"request"]) for _, f in client.xrange(stream) if b"request" in f]


def test_the_image_that_reaches_request_images_ends_the_request_once(state, redis_client):
    assert count(state, image("r1", "a", 3), image("r1", "b", 3, completed=False)) == []
    assert state.progress("r1").recorded == 2
    (record,) = count(state, image("r1", "c", 3))
    assert record["status"] == "partial"
    assert (record["images"], record["completed"], record["failed"], record["request_images"]) == (3, 2, 1, 3)
    assert [i["image_id"] for i in record["image_results"]] == ["a", "b", "c"]
    assert record["record_id"] == "t-63"
    assert state.progress("r1") is None and state.ended_at("r1") == NOW
    assert stream_requests(redis_client, state.stream) == [record]
    assert [json.loads(r) for r in state.unwritten()] == [record]
    # A redelivered duplicate of any of its images counts nothing and starts nothing.
    assert count(state, image("r1", "c", 3), image("r1", "d", 3)) == []
    assert state.progress("r1") is None and len(stream_requests(redis_client, state.stream)) == 1


@pytest.mark.parametrize(("outcomes", "status"), [((True, True), "completed"), ((False, False), "failed")])
def test_status_is_completed_when_all_completed_and_failed_when_none_did(state, outcomes, status):
    (record,) = count(state, *(image("r", str(i), 2, completed=ok) for i, ok in enumerate(outcomes)))
    assert record["status"] == status


def test_the_same_image_twice_counts_once_and_a_later_completion_wins(state):
    count(state, image("r", "a", 2, completed=False), image("r", "a", 2, completed=False))
    assert (state.progress("r").recorded, state.progress("r").failed) == (1, 1)
    count(state, image("r", "a", 2))
    assert (state.progress("r").recorded, state.progress("r").completed, state.progress("r").failed) == (1, 1, 0)
    (record,) = count(state, image("r", "b", 2))
    assert record["status"] == "completed"


def test_the_first_declared_count_stands_and_other_declarations_are_counted(state):
    count(state, image("r", "a", 3), image("r", "b", 2))
    assert (state.progress("r").declared, state.progress("r").mismatched) == (3, 1)
    (record,) = count(state, image("r", "c", 5))
    assert (record["images"], record["request_images"], record["mismatched_declarations"]) == (3, 3, 2)


def test_a_request_id_is_counted_again_after_request_ttl_since_it_ended(state):
    (first,) = count(state, image("r", "a", 1))
    assert count(state, image("r", "b", 1), now=NOW + TTL - 1) == []
    (again,) = count(state, image("r", "c", 1, task="t-2"), now=NOW + TTL + 1)
    assert (first["image_results"][0]["image_id"], again["image_results"][0]["image_id"]) == ("a", "c")


def test_a_request_silent_for_request_ttl_ends_incomplete_once(state, redis_client, queue_name):
    count(state, image("r", "a", 3), image("r", "b", 3, completed=False))
    count(state, image("s", "a", 3), now=NOW + 30)
    assert state.expire_due(NOW + TTL - 1) == []
    (record,) = [json.loads(r) for r in state.expire_due(NOW + TTL)]
    assert (record["request_id"], record["status"], record["images"], record["completed"], record["failed"]) == (
        "r", "incomplete", 2, 1, 1)
    assert state.expire_due(NOW + TTL) == []  # a second host looking at once finds nothing
    assert state.progress("r") is None and state.progress("s") is not None
    assert not redis_client.exists(QueueKeys(queue_name).request(json.dumps("r")))
    # Its last image, late: not counted, nothing starts.
    assert count(state, image("r", "c", 3), now=NOW + TTL + 5) == []
    assert state.open_requests()[0] == 1


def test_hostile_ids_each_get_their_own_key_and_come_back_as_sent(state):
    ids = ['a"b', "a\\", "\ud800", "é", "x:y", "{hosting_tasks}", "1" * 512]
    for request_id in ids:
        count(state, image(request_id, request_id, 2))
    assert sorted(p.request_id for p in state.open_requests()[1]) == sorted(ids)
    for request_id in ids:
        (record,) = count(state, image(request_id, "second", 2))
        assert record["request_id"] == request_id


def test_the_written_records_leave_the_unwritten_list(state):
    count(state, image("r", "a", 1))
    count(state, image("s", "a", 1))
    listed = state.unwritten()
    state.forget_written(listed[:1])
    assert state.unwritten() == listed[1:]
