"""`supervisor.py task REQUEST_ID`: where a task is, in each place it can be.

Redis-backed tests put a task in each place by hand (queued, in flight,
delayed, dead, recorded in results.json or only in the results stream) and
ask `find_task`; one runs the real command against a real pool, with a
hostile request id whose control characters must reach the terminal escaped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import redis

from control.lookup import Budget, describe, find_task
from harness import REPO_ROOT
from harness.pool import POOL_ENV_VARS
from image_result_client.protocol import QueueKeys
from shared.config import Settings
from shared.ipc.records import dead_letter_entry
from shared.state.pool_registry import PoolRegistry
from shared.state.redis_queue import ReliableQueue
from shared.storage.results_file import ResultsFile
from tests.helpers import push, wait_for_records

pytestmark = pytest.mark.timeout(60)


def settings_for(redis_url: str, queue: str, output_dir: Path, **extra: str) -> Settings:
    env = {"REDIS_URL": redis_url, "HOSTING_TASKS_QUEUE": queue, "OUTPUT_DIR": str(output_dir), **extra}
    return Settings.from_env(env, dotenv_path=None)


def message(request_id: str, image_id: str = "img") -> dict:
    return {"request_id": request_id, "image_id": image_id, "image_url": "http://images.invalid/a.png"}


@pytest.fixture
def setup(redis_server, redis_client: redis.Redis, queue_name: str, tmp_path: Path):
    settings = settings_for(redis_server.url, queue_name, tmp_path / "out")
    (tmp_path / "out").mkdir()
    queue = ReliableQueue(redis_client, QueueKeys(queue_name), max_message_bytes=settings.max_message_bytes)
    return settings, queue


def states(search) -> list[str]:
    return [place["state"] for place in search.found]


def test_queued_with_its_position_in_the_shared_queue_and_a_host_queue(setup, redis_client) -> None:
    settings, queue = setup
    for index in range(5):
        push(redis_client, queue.keys.queue, message(f"other-{index}"))
    push(redis_client, queue.keys.queue, message("wanted"))
    push(redis_client, queue.keys.host("host-b"), message("wanted", "on-host-b"))

    search = find_task(redis_client, settings, "wanted")

    assert states(search) == ["queued", "queued"]
    shared, host = search.found
    assert (shared["list"], shared["position"], shared["length"], shared["image_id"]) == (queue.keys.queue, 5, 6, "img")
    assert (host["list"], host["position"], host["image_id"]) == (queue.keys.host("host-b"), 0, "on-host-b")


def test_in_flight_names_the_supervisor_worker_and_the_task_in_hand(setup, redis_client) -> None:
    settings, queue = setup
    push(redis_client, queue.keys.queue, message("busy"))
    processing = queue.keys.processing("inst1", "w4242")
    queue.register(processing)
    [envelope] = queue.claim(processing, count=1)
    task_id = envelope.split(b" ")[1].decode()
    started = time.time() - 12
    state = {
        "instance": "inst1", "host": "box", "host_id": "box-1", "pid": 1, "ready": True, "updated_at": time.time(),
        "workers": [{
            "slot": 3, "pid": 4242, "heartbeat_age": 0.2, "processing_list": processing,
            "task": {"phase": "encode", "age": 12, "started_at": started, "task_id": task_id, "request_id": "busy"},
        }],
        "ledger": None,
    }
    PoolRegistry(redis_client, queue.keys).leases.renew("inst1", 30, json.dumps(state).encode())

    [place] = find_task(redis_client, settings, "busy").found

    assert place["state"] == "in_flight"
    assert (place["host"], place["host_id"], place["instance"], place["list"]) == ("box", "box-1", "inst1", processing)
    assert place["worker"] == {"slot": 3, "pid": 4242, "heartbeat_age": 0.2}
    assert place["task_id"] == task_id and place["deliveries"] == 1
    assert place["since"] == started and 11 <= place["age"] <= 20
    assert place["current"]["phase"] == "encode"
    # Found by its task id too, as `dead list` and records name it.
    assert states(find_task(redis_client, settings, task_id)) == ["in_flight"]


def test_in_flight_of_a_supervisor_that_is_gone_says_so(setup, redis_client) -> None:
    settings, queue = setup
    push(redis_client, queue.keys.queue, message("orphan"))
    processing = queue.keys.processing("deadinst", "w1")
    queue.register(processing)
    queue.claim(processing, count=1)

    [place] = find_task(redis_client, settings, "orphan").found

    assert place["state"] == "in_flight" and place["supervisor_alive"] is False and place["worker"] is None
    assert "lease has expired" in describe(find_task(redis_client, settings, "orphan"), now=time.time())[1]


def test_delayed_retry_says_when_it_is_due(setup, redis_client) -> None:
    settings, queue = setup
    body = json.dumps(message("later")).encode()
    envelope = b"irw2 t-1 2 %d s\n%s" % (len(body), body)
    due = time.time() + 30
    redis_client.zadd(queue.keys.delayed, {envelope: due})

    [place] = find_task(redis_client, settings, "later").found

    assert place["state"] == "delayed"
    assert (place["task_id"], place["deliveries"], place["due_at"]) == ("t-1", 2, due)
    assert 25 < place["due_in"] <= 30


def test_dead_letter_with_its_error_found_among_many(setup, redis_client) -> None:
    settings, queue = setup
    for index in range(2500):  # more than a page
        redis_client.rpush(queue.keys.dead, _dead(f"filler-{index}", "HTTP 404"))
    redis_client.lpush(queue.keys.dead, _dead("gone", "shm_info.shm_name 'x y' is not a valid segment name"))

    [place] = find_task(redis_client, settings, "gone").found

    assert place["state"] == "dead"
    assert place["error"] == "shm_info.shm_name 'x y' is not a valid segment name"
    assert place["attempts"] == 1 and place["message"] == json.dumps(message("gone"))
    # The dashboard's budget stops early and says what it did not search.
    limited = find_task(redis_client, settings, "gone", budget=Budget(list_entries=1000, file_bytes=1 << 20))
    assert limited.found == [] and any("dead" in what for what in limited.not_searched)


def test_recorded_in_results_json_with_its_file(setup, redis_client) -> None:
    settings, _ = setup
    results = ResultsFile(settings.output_dir / "results.json")
    results.open()
    jpeg = settings.output_dir / "img_20250101_000000.jpg"
    jpeg.write_bytes(b"\xff\xd8\xff")
    records = [_record(f"r{index}", None) for index in range(3000)]
    records.insert(10, _record("kept", str(jpeg)))
    results.append(records)
    results.close()

    [place] = find_task(redis_client, settings, "kept").found

    assert place["state"] == "recorded" and place["source"] == str(settings.output_dir / "results.json")
    assert place["record"]["status"] == "completed" and place["file"] == str(jpeg) and place["file_here"] is True


def test_recorded_only_in_the_stream_when_results_json_is_not_here(setup, redis_client) -> None:
    settings, _ = setup  # OUTPUT_DIR exists but holds no results.json: another host's pool
    for index in range(1500):
        redis_client.xadd(settings.results_stream, {"record": json.dumps(_record(f"s{index}", None))})
    redis_client.xadd(settings.results_stream, {"record": json.dumps(_record("streamed", "/elsewhere/a_1.jpg"))})
    for index in range(1500):
        redis_client.xadd(settings.results_stream, {"record": json.dumps(_record(f"t{index}", None))})

    [place] = find_task(redis_client, settings, "streamed").found

    assert place["state"] == "recorded" and place["source"].startswith(f"stream {settings.results_stream} entry ")
    assert place["file"] == "/elsewhere/a_1.jpg" and place["file_here"] is False


def test_messages_that_are_anything_do_not_break_the_search(setup, redis_client) -> None:
    settings, queue = setup
    junk = [
        b"\xff\xfe not utf-8", b"[1, 2]", b"null", b"{\"request_id\": {\"nested\": 1}}", b"[" * 100_000,
        b"{\"request_id\": \"wan\\u0074ed\", \"image_id\": \"escaped\"}",  # the id spelt with an escape
        b"{\"request_id\": \"wanted\", \"image_id\": \"cut",  # not JSON: salvaged from the text
        b"irw2 not an envelope\n", b"",
    ]
    for raw in junk:
        redis_client.rpush(queue.keys.queue, raw)
    processing = queue.keys.processing("i", "w1")
    redis_client.sadd(queue.keys.registry, processing)
    redis_client.rpush(processing, b"garbage", b"irw2 x 1 3 s\n[1]")
    redis_client.zadd(queue.keys.delayed, {b"nonsense": 1})
    redis_client.rpush(queue.keys.dead, b"not json", b"[]")

    search = find_task(redis_client, settings, "wanted")

    assert [(p["state"], p["position"]) for p in search.found] == [("queued", 5), ("queued", 6)]


def test_the_command_on_a_real_pool_escapes_what_it_prints(pool_factory, redis_client, queue_name, tmp_path) -> None:
    hostile = "req\x1b]0;owned\x07\r\u202e"
    pool = pool_factory(workers=1)
    pool.wait_ready()
    push(redis_client, queue_name, {"request_id": hostile, "image_id": "x\x1b[2J", "shm_info": "not a name!"})
    wait_for_records(pool.output_dir, 1, pool=pool)

    result = run_task_command(pool, hostile)
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout and "\r" not in result.stdout and "\u202e" not in result.stdout
    assert "req\\x1b]0;owned\\x07\\r\\u202e" in result.stdout
    assert "recorded failed" in result.stdout and "dead letter" in result.stdout

    as_json = json.loads(run_task_command(pool, hostile, "--json").stdout)
    assert as_json["request_id"] == hostile
    assert sorted(place["state"] for place in as_json["found"]) == ["dead", "recorded"]

    missing = run_task_command(pool, "never-sent")
    assert missing.returncode == 1 and "no task with request id never-sent" in missing.stdout


def run_task_command(pool, request_id: str, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {name: value for name, value in os.environ.items() if name not in POOL_ENV_VARS}
    env.update(REDIS_URL=pool.redis_url, HOSTING_TASKS_QUEUE=pool.queue, OUTPUT_DIR=str(pool.output_dir))
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "supervisor.py"), "task", request_id, *extra],
        cwd=pool.workdir, env=env, capture_output=True, text=True, timeout=30, check=False,
    )


def _dead(request_id: str, error: str) -> bytes:
    return dead_letter_entry(
        failed_at=datetime.now(), task_id=f"t-{request_id}", request_id=request_id, image_id="img",
        attempts=1, error=error, message=json.dumps(message(request_id)).encode(),
    )


def _record(request_id: str, file_path: str | None) -> dict:
    return {
        "timestamp": datetime.now().isoformat(), "request_id": request_id, "image_id": "img",
        "file_path": file_path, "status": "completed" if file_path else "failed", "task_id": f"t-{request_id}",
        "attempts": 1,
    }
