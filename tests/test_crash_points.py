"""A kill -9 at each point of the durable-step order still ends every task
exactly once, with one file, no stray partial file and no leaked segment, and
every request (here, one image each) with one request record.

The order (workers/ledger.py): the worker writes the JPEG, sends its record;
the ledger syncs the batch's JPEGs, publishes the files, appends the records
(the commit point), acknowledges in Redis (ending requests), unlinks the
segments, appends the request records to requests.json. shared/crash_points.py arms one point;
the first process to reach it dies there, once.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest

from harness.results import read_requests
from harness.segments import segment_exists
from image_result_client.protocol import QueueKeys
from tests.helpers import assert_exactly_once, push, push_photos, wait_for_queue_drained, wait_for_records

CRASH_POINTS = [
    "worker_after_claim",  # claimed, nothing done
    "worker_after_partial",  # JPEG written under .partial, no record sent
    "worker_after_send",  # record sent, not yet durable
    "ledger_torn_append",  # half a batch written to results.json
    "ledger_after_publish",  # files published, their records not appended
    "ledger_after_append",  # records durable, files published
    "ledger_before_ack",  # files published, Redis not told
    "ledger_after_ack",  # acknowledged, segments not unlinked
    "ledger_before_request_append",  # requests ended in Redis, not in requests.json
    "ledger_torn_request_append",  # half a batch written to requests.json
    "ledger_after_request_append",  # request records durable, still on the unwritten list
]


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_kill_at_each_durable_step_ends_each_task_exactly_once(
    point, pool_factory, redis_client, queue_name, segments, tmp_path
):
    marker = tmp_path / "crashed"
    # Failures first, so that the first batch the ledger handles (where a ledger
    # crash point fires) holds them: each must still get exactly one dead letter.
    bad = {"bad_missing_segment": {"shm_name": "img_shm_gone", "shape": [8, 8, 3], "dtype": "uint8", "size": 192},
           "bad_dtype": {"shm_name": "img_shm_x", "shape": [8, 8, 3], "dtype": "int64"}}
    for request_id, shm_info in bad.items():
        message = {"request_id": request_id, "image_id": request_id, "shm_info": shm_info, "request_images": 1}
        push(redis_client, queue_name, message)
    request_ids = list(bad) + push_photos(redis_client, queue_name, segments, 12, size=(512, 512), request_images=1)
    stream = f"{queue_name}:results"
    redis_client.xgroup_create(stream, "downstream", id="$", mkstream=True)
    env = {"IRW_CRASH_AT": point, "IRW_CRASH_MARKER": str(marker), "RESULTS_STREAM": stream}
    pool = pool_factory(workers=2, env=env)
    wait_for_records(pool.output_dir, len(request_ids), timeout=60, pool=pool)
    # A ledger killed after its commit point leaves recorded tasks to be
    # redelivered; they must be dropped as duplicates, not stopped mid-way.
    wait_for_queue_drained(redis_client, queue_name)
    assert pool.stop() == 0
    assert marker.exists(), f"nothing reached {point}"
    # A test hook armed in a pool is said at start, never silent.
    assert [e["point"] for e in pool.events("crash_point_armed")] == [point]
    deaths = pool.events("child_died")
    killed = [e for e in deaths if e["cause"] != "lost its channel to the ledger"]
    assert [e["role"] for e in killed] == [point.split("_", 1)[0]]
    # After the ledger's death, workers whose records it took along exit and are replaced.
    assert all(e["role"] == "worker" for e in deaths if e not in killed)
    records = assert_exactly_once(pool.output_dir, request_ids, redis_client, queue_name)
    assert sorted(r["request_id"] for r in records if r["status"] == "failed") == sorted(bad)
    dead = [json.loads(entry)["request_id"] for entry in redis_client.lrange(QueueKeys(queue_name).dead, 0, -1)]
    assert sorted(dead) == sorted(bad), "each failed task has exactly one dead letter"
    # A consumer group downstream sees each outcome exactly once, as recorded.
    ((_, entries),) = redis_client.xreadgroup("downstream", "reader", {stream: ">"}, count=1000)
    events, ended = {}, Counter()
    for _, fields in entries:
        if b"request" in fields:
            ended[json.loads(fields[b"request"])["request_id"]] += 1
            continue
        event = json.loads(fields[b"record"])
        assert event["request_id"] not in events, f"{event['request_id']} announced twice"
        events[event["request_id"]] = event
    assert sorted(events) == sorted(request_ids)
    assert {r["request_id"]: r["status"] for r in records} == {k: e["status"] for k, e in events.items()}
    assert [name for name in segments.names if segment_exists(name)] == []
    # Each request ended once: one record in requests.json, one on the stream, its task's status.
    requests = read_requests(pool.output_dir)
    assert sorted(r["request_id"] for r in requests) == sorted(request_ids)
    assert ended == Counter(request_ids)
    assert {r["request_id"]: r["status"] for r in requests} == {k: e["status"] for k, e in events.items()}
    assert redis_client.keys(f"{QueueKeys(queue_name).prefix}:requests_unwritten:*") == []
