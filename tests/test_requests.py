"""A request is many images: once its messages' `request_images` distinct images
are recorded, the pool appends exactly one request record to requests.json and
the results stream (docs/formats.md#requestsjson), through a real pool on a
real Redis. The decisions one by one are in test_request_state.py."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import cv2
import pytest
import redis

from harness.photos import photo_of_size
from harness.results import read_requests, read_results
from image_result_client.protocol import QueueKeys
from tests.helpers import command, push, wait_for_queue_drained, wait_for_records, wait_until

FRAME = photo_of_size(256, 256)


def shm_image(segments, request_id: str, image_id: str, declared: int) -> dict[str, Any]:
    return {**segments.message(request_id, image_id, FRAME), "request_images": declared}


def broken_image(request_id: str, image_id: str, declared: int) -> dict[str, Any]:
    """Fails at once: its segment does not exist."""
    shm_info = {"shm_name": f"img_shm_missing_{image_id}", "shape": [8, 8, 3], "dtype": "uint8"}
    return {"request_id": request_id, "image_id": image_id, "shm_info": shm_info, "request_images": declared}


def stream_entries(client: redis.Redis, stream: str) -> tuple[list[dict], list[dict]]:
    """(task records, request records) on the results stream, oldest first."""
    tasks, requests = [], []
    for _, fields in client.xrange(stream):
        if b"record" in fields:
            tasks.append(json.loads(fields[b"record"]))
        else:
            requests.append(json.loads(fields[b"request"]))
    return tasks, requests


def wait_for_requests(output_dir, count: int, timeout: float = 60.0) -> list[dict]:
    return wait_until(lambda: len(r := read_requests(output_dir)) >= count and r, timeout,
                      f"fewer than {count} request records in {output_dir}/requests.json")


def test_each_request_ends_once_completed_failed_or_partial(pool_factory, redis_client, queue_name, segments):
    stream = f"{queue_name}:results"
    plain = segments.message("plain", "plain", FRAME)  # no request_images: a task as before
    for message in [
        *(shm_image(segments, "all-good", f"g{i}", 3) for i in range(3)),
        *(broken_image("all-bad", f"b{i}", 2) for i in range(2)),
        shm_image(segments, "mixed", "m0", 2), broken_image("mixed", "m1", 2),
        plain,
    ]:
        push(redis_client, queue_name, message)
    pool = pool_factory(workers=2, env={"RESULTS_STREAM": stream})
    records = wait_for_records(pool.output_dir, 8, pool=pool)
    requests = {r["request_id"]: r for r in wait_for_requests(pool.output_dir, 3)}
    assert pool.stop() == 0

    assert {k: r["status"] for k, r in requests.items()} == {"all-good": "completed", "all-bad": "failed",
                                                             "mixed": "partial"}
    mixed = requests["mixed"]
    assert (mixed["images"], mixed["completed"], mixed["failed"], mixed["request_images"]) == (2, 1, 1, 2)
    by_task = {r["task_id"]: r for r in records}
    for request in requests.values():
        for entry in request["image_results"]:  # each image as its task's record has it
            task = by_task[entry["task_id"]]
            assert (entry["image_id"], entry["status"], entry["file_path"]) == (
                task["image_id"], task["status"], task["file_path"])
    # The plain task's record is as it always was: the seed's fields and ours, nothing about requests.
    (plain_record,) = [r for r in records if r["request_id"] == "plain"]
    assert list(plain_record) == ["timestamp", "request_id", "image_id", "file_path", "status", "task_id",
                                  "attempts", "source", "width", "height", "bytes", "duration_ms"]
    # On the stream: every task record under "record", each request record once under "request".
    tasks, announced = stream_entries(redis_client, stream)
    assert sorted(t["task_id"] for t in tasks) == sorted(by_task)
    assert sorted(announced, key=lambda r: r["request_id"]) == sorted(requests.values(), key=lambda r: r["request_id"])
    keys = QueueKeys(queue_name)
    assert redis_client.zcard(keys.open_requests) == 0
    assert redis_client.keys(f"{keys.prefix}:request:*") == []
    assert redis_client.keys(f"{keys.prefix}:requests_unwritten:*") == [], "a request record was left unwritten"


def test_a_request_whose_last_image_never_comes_ends_incomplete_once(pool_factory, redis_client, queue_name, segments):
    """REQUEST_TTL after its last recorded image, the request ends "incomplete"
    and its Redis state is gone; its last image, coming after that, counts for
    nothing and starts nothing."""
    keys = QueueKeys(queue_name)
    stream = f"{queue_name}:results"
    push(redis_client, queue_name, shm_image(segments, "short", "p1", 3))
    push(redis_client, queue_name, broken_image("short", "p2", 3))
    pool = pool_factory(workers=1, env={"REQUEST_TTL": "3", "RESULTS_STREAM": stream})
    wait_for_records(pool.output_dir, 2, pool=pool)
    ended = wait_until(lambda: redis_client.zscore(keys.ended_requests, '"short"'), 30, "the request never ended")
    push(redis_client, queue_name, shm_image(segments, "short", "p3", 3))  # late, within REQUEST_TTL of the end
    wait_for_records(pool.output_dir, 3, pool=pool)
    (record,) = wait_for_requests(pool.output_dir, 1)
    assert (record["status"], record["images"], record["completed"], record["failed"], record["request_images"]) == (
        "incomplete", 2, 1, 1, 3)
    assert [i["image_id"] for i in record["image_results"]] == ["p1", "p2"]
    assert redis_client.keys(f"{keys.prefix}:request:*") == [] and redis_client.zcard(keys.open_requests) == 0
    assert redis_client.zscore(keys.ended_requests, '"short"') == ended
    assert [e["requests"] for e in pool.events("requests_expired")] == [1]
    assert pool.stop() == 0
    assert read_requests(pool.output_dir) == [record]
    assert stream_entries(redis_client, stream)[1] == [record]


def test_the_same_image_twice_counts_once(pool_factory, redis_client, queue_name, segments):
    """One worker takes them in order: without a set of image ids, the second
    "a" would end the request before "b" came."""
    for image_id in ("a", "a", "b"):
        push(redis_client, queue_name, shm_image(segments, "dup", image_id, 2))
    pool = pool_factory(workers=1)
    records = wait_for_records(pool.output_dir, 3, pool=pool)
    (record,) = wait_for_requests(pool.output_dir, 1)
    assert pool.stop() == 0
    assert [r["image_id"] for r in records] == ["a", "a", "b"]
    assert (record["status"], record["images"], record["completed"]) == ("completed", 2, 2)
    assert [i["image_id"] for i in record["image_results"]] == ["a", "b"]
    assert record["image_results"][1]["task_id"] == records[2]["task_id"]


def test_a_redis_restart_mid_request_loses_no_count(pool_factory, redis_client, redis_server, queue_name, segments):
    """The request's state is in Redis (AOF in the fixture, as in production):
    a restart between its images neither loses nor doubles a count, and its
    last image, late, ends it."""
    for index in range(2):
        push(redis_client, queue_name, shm_image(segments, "across", f"i{index}", 3))
    pool = pool_factory(workers=1)
    wait_for_records(pool.output_dir, 2, pool=pool)
    keys = QueueKeys(queue_name)
    wait_until(lambda: redis_client.hget(keys.request('"across"'), "recorded") == b"2", 10, "not counted")
    redis_server.restart()
    client = redis.Redis.from_url(redis_server.url)
    assert client.hget(keys.request('"across"'), "recorded") == b"2"
    push(client, queue_name, shm_image(segments, "across", "i2", 3))
    (record,) = wait_for_requests(pool.output_dir, 1, timeout=60)
    assert pool.stop() == 0
    assert (record["status"], record["images"]) == ("completed", 3)
    assert len(read_requests(pool.output_dir)) == 1


def test_one_request_recorded_on_two_hosts_ends_once(pool_factory, redis_client, queue_name, segments, tmp_path):
    """Two supervisors on one Redis, each with its own host queue and OUTPUT_DIR;
    every request has images on both. Each request ends once: one record on the
    stream, in exactly one host's requests.json (the host that recorded its
    last image), listing the images of both hosts."""
    keys = QueueKeys(queue_name)
    stream = f"{queue_name}:results"
    outputs = {host: tmp_path / f"out-{host}" for host in "ab"}
    env = {"HOST_QUEUE": "true", "LEASE_TTL": "2", "RESULTS_STREAM": stream}
    pools = {host: pool_factory(workers=2, env={**env, "HOST_ID": host}, output_dir=outputs[host]) for host in "ab"}
    for pool in pools.values():
        pool.wait_ready()
    requests = [f"spread_{n}" for n in range(6)]
    for index in range(4):
        for request_id in requests:
            host = "ab"[index % 2]
            push(redis_client, keys.host(host), shm_image(segments, request_id, f"{request_id}_{index}", 4))
    wait_until(lambda: sum(len(read_results(outputs[h])) for h in "ab") >= 24, 60, "not every image was recorded")
    wait_until(lambda: sum(len(read_requests(outputs[h])) for h in "ab") >= len(requests), 30, "a request did not end")
    for pool in pools.values():
        assert pool.stop() == 0

    written = {host: read_requests(outputs[host]) for host in "ab"}
    where = Counter(r["request_id"] for host in "ab" for r in written[host])
    assert where == Counter(requests), f"each request in exactly one requests.json: {where}"
    _, announced = stream_entries(redis_client, stream)
    assert Counter(r["request_id"] for r in announced) == Counter(requests), "each request once on the stream"
    for host, records in written.items():
        for record in records:
            assert (record["status"], record["images"]) == ("completed", 4)
            hosts = [i["host_id"] for i in record["image_results"]]
            assert sorted(hosts) == ["a", "a", "b", "b"]
            # The host that wrote it recorded its last image: that image's record is in its results.json.
            ours = {r["task_id"] for r in read_results(outputs[host])}
            assert any(i["task_id"] in ours for i in record["image_results"])
    assert {h: sum(1 for r in read_results(outputs[h])) for h in "ab"} == {"a": 12, "b": 12}


@pytest.mark.parametrize("point", [
    "worker_after_send", "ledger_after_append", "ledger_before_ack", "ledger_after_ack",
    "ledger_before_request_append", "ledger_after_request_append",
])
def test_a_kill_mid_request_still_ends_each_request_once(point, pool_factory, redis_client, queue_name, segments,
                                                          tmp_path):
    """Requests of four images each, their images spread over batches and
    redeliveries by a kill -9 at one point of the durable-step order."""
    stream = f"{queue_name}:results"
    requests = [f"req_{n}" for n in range(4)]
    frame = photo_of_size(512, 512)
    for index in range(4):
        for request_id in requests:
            message = {**segments.message(request_id, f"{request_id}_{index}", frame), "request_images": 4}
            push(redis_client, queue_name, message)
    env = {"IRW_CRASH_AT": point, "IRW_CRASH_MARKER": str(tmp_path / "crashed"), "RESULTS_STREAM": stream}
    pool = pool_factory(workers=2, env=env)
    records = wait_for_records(pool.output_dir, 16, pool=pool)
    written = wait_for_requests(pool.output_dir, 4)
    wait_for_queue_drained(redis_client, queue_name)
    assert pool.stop() == 0
    assert (tmp_path / "crashed").exists(), f"nothing reached {point}"
    assert Counter(r["image_id"] for r in records) == Counter(f"{r}_{i}" for r in requests for i in range(4))
    written = read_requests(pool.output_dir)
    assert Counter(r["request_id"] for r in written) == Counter(requests)
    assert all((r["status"], r["images"], r["completed"]) == ("completed", 4, 4) for r in written)
    _, announced = stream_entries(redis_client, stream)
    assert sorted(announced, key=lambda r: r["request_id"]) == sorted(written, key=lambda r: r["request_id"])


def test_task_shows_a_requests_progress_then_its_record(pool_factory, redis_client, queue_name, segments):
    for index in range(2):
        push(redis_client, queue_name, shm_image(segments, "pages", f"p{index}", 3))
    pool = pool_factory(workers=1, env={"REQUEST_TTL": "600"})
    wait_for_records(pool.output_dir, 2, pool=pool)
    wait_until(lambda: redis_client.hget(QueueKeys(queue_name).request('"pages"'), "recorded") == b"2", 10, "not counted")
    shown = command(pool, "task", "pages")
    assert shown.returncode == 0, shown.stderr
    assert "request: 2 of 3 recorded (2 completed, 0 failed); ends incomplete in" in shown.stdout
    as_json = json.loads(command(pool, "task", "pages", "--json").stdout)
    (open_place,) = [p for p in as_json["found"] if p["state"] == "request_open"]
    assert (open_place["recorded"], open_place["request_images"]) == (2, 3) and 590 < open_place["expires_in"] <= 600

    push(redis_client, queue_name, broken_image("pages", "p2", 3))
    wait_for_requests(pool.output_dir, 1)
    shown = command(pool, "task", "pages")
    assert "request record partial: 3 of 3 images (2 completed, 1 failed)" in shown.stdout
    found = json.loads(command(pool, "task", "pages", "--json").stdout)["found"]
    assert [p["record"]["status"] for p in found if p["state"] == "request_ended"] == ["partial"]
    assert not any(p["state"] == "request_open" for p in found)
    assert pool.stop() == 0


def test_the_client_submits_a_request_and_waits_for_its_record(pool_factory, redis_client, queue_name, tmp_path):
    """Producer: request_images on submit_array/submit_url, wait_request from the
    stream and from requests.json; the command line: enqueue --request, then
    wait-request, whose exit status says whether the request completed."""
    from image_result_client import Producer
    from tests.test_client import run_cli

    stream = f"{queue_name}:results"
    pool = pool_factory(workers=2, env={"RESULTS_STREAM": stream})
    pool.wait_ready()
    with Producer(redis_client, queue=queue_name, results_stream=stream) as producer:
        with pytest.raises(ValueError, match="request_images"):
            producer.submit_array(FRAME, request_id="lib", image_id="x", request_images=True)
        for index in range(2):
            producer.submit_array(FRAME, request_id="lib", image_id=f"page_{index}", request_images=3)
        producer.submit_url("http://127.0.0.1:9/gone.jpg", request_id="lib", image_id="page_2", request_images=3)
        from_stream = producer.wait_request("lib", timeout=60)
        from_file = producer.wait_request("lib", output_dir=pool.output_dir, timeout=10)
    assert from_stream == from_file
    assert (from_stream["status"], from_stream["images"], from_stream["failed"]) == ("partial", 3, 1)

    for name in ("cover", "back"):
        cv2.imwrite(str(tmp_path / f"{name}.png"), FRAME)
    env = {"REDIS_URL": pool.redis_url, "HOSTING_TASKS_QUEUE": queue_name, "RESULTS_STREAM": stream}
    queued = run_cli(["enqueue", "--request", "book-7", "cover.png", "back.png"], cwd=tmp_path, env=env)
    assert queued.returncode == 0, queued.stderr
    waited = run_cli(["wait-request", "--timeout", "60", "book-7"], cwd=tmp_path, env=env)
    assert (waited.returncode, waited.stdout) == (0, "completed book-7 2 of 2 images (2 completed, 0 failed)\n")
    doubled = run_cli(["enqueue", "--request", "dup", "cover.png", str(tmp_path / "cover.png")], cwd=tmp_path, env=env)
    assert doubled.returncode == 2 and "these repeat: cover" in doubled.stderr
    assert run_cli(["wait-request", "--timeout", "0.5", "never"], cwd=tmp_path, env=env).returncode == 1
    assert pool.stop() == 0


def test_two_supervisors_sharing_a_host_id_each_write_only_their_own_requests(
    pool_factory, redis_client, queue_name, segments, tmp_path
):
    """One host, two OUTPUT_DIRs, the same HOST_ID (the host name, by default):
    each ledger writes the requests it ended, never the other's."""
    stream = f"{queue_name}:results"
    outputs = {name: tmp_path / f"out-{name}" for name in "xy"}
    env = {"HOST_ID": "same-host", "RESULTS_STREAM": stream}
    pools = [pool_factory(workers=1, env=env, output_dir=outputs[name]) for name in "xy"]
    for pool in pools:
        pool.wait_ready()
    requests = [f"shared_{n}" for n in range(20)]
    for index in range(2):
        for request_id in requests:
            push(redis_client, queue_name, shm_image(segments, request_id, f"{request_id}_{index}", 2))
    wait_until(lambda: sum(len(read_results(outputs[h])) for h in "xy") >= 40, 60, "not every image was recorded")
    wait_until(lambda: sum(len(read_requests(outputs[h])) for h in "xy") >= len(requests), 30, "a request did not end")
    for pool in pools:
        assert pool.stop() == 0
    where = Counter(r["request_id"] for name in "xy" for r in read_requests(outputs[name]))
    assert where == Counter(requests), f"each request in exactly one requests.json: {where}"
    assert Counter(r["request_id"] for r in stream_entries(redis_client, stream)[1]) == Counter(requests)


def test_a_host_lost_before_writing_a_request_record_writes_it_when_back(
    pool_factory, redis_client, queue_name, segments, tmp_path
):
    """The whole host dies between ending a request (in Redis, on the stream)
    and appending its record: its requests.json gets the record, once, when a
    supervisor with the same HOST_ID and OUTPUT_DIR starts again."""
    stream = f"{queue_name}:results"
    for index in range(2):
        push(redis_client, queue_name, shm_image(segments, "lost", f"l{index}", 2))
    crash = {"IRW_CRASH_AT": "ledger_before_request_append", "IRW_CRASH_HOST": "true",
             "IRW_CRASH_MARKER": str(tmp_path / "crashed"), "HOST_ID": "h1", "RESULTS_STREAM": stream,
             "LEASE_TTL": "2"}
    first = pool_factory(workers=1, env=crash)
    wait_until(lambda: first.poll() is not None, 60, "the host never reached the point")
    assert read_requests(first.output_dir) == []
    (announced,) = stream_entries(redis_client, stream)[1]
    again = pool_factory(workers=1, env={"HOST_ID": "h1", "RESULTS_STREAM": stream, "LEASE_TTL": "2"})
    (written,) = wait_for_requests(again.output_dir, 1)
    assert written == announced
    wait_for_queue_drained(redis_client, queue_name)
    assert again.stop() == 0
    assert read_requests(again.output_dir) == [announced]
    assert len(stream_entries(redis_client, stream)[1]) == 1
