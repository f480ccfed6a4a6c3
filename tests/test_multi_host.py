"""Several supervisors, one per host, on one Redis: shared-memory tasks go to
each host's own queue, URL tasks to the shared one. When a whole host dies, its
URL tasks move on to the others once its lease expires; its shared-memory tasks,
and the tasks whose records it was committing, wait in its own queue until it
comes back. Every task ends exactly once."""

from __future__ import annotations

import json
from collections import Counter

import cv2

from harness.photos import photo_of_size
from harness.results import read_results
from image_result_client.protocol import QueueKeys
from shared.state.pool_registry import PoolRegistry
from tests.helpers import command, push, wait_for_records, wait_until


def test_a_dead_hosts_url_tasks_move_on_and_its_shared_memory_tasks_wait(
    pool_factory, redis_client, queue_name, segments, http_server, tmp_path
):
    ok, png = cv2.imencode(".png", photo_of_size(1024, 1024))
    url = http_server.add("/page.png", png.tobytes(), content_type="image/png")
    keys = QueueKeys(queue_name)
    outputs = {host: tmp_path / f"out-{host}" for host in "abc"}

    def start(host: str):
        env = {"HOST_ID": host, "HOST_QUEUE": "true", "LEASE_TTL": "2"}
        return pool_factory(workers=1, env=env, output_dir=outputs[host])

    pools = {host: start(host) for host in "abc"}
    for pool in pools.values():
        pool.wait_ready()
    frame = photo_of_size(512, 512)
    shm_tasks = {host: [f"shm_{host}_{i}" for i in range(3)] for host in "abc"}
    for host, request_ids in shm_tasks.items():
        for request_id in request_ids:
            push(redis_client, keys.host(host), segments.message(request_id, request_id, frame))
    url_tasks = [f"url_{i}" for i in range(120)]
    for request_id in url_tasks:
        push(redis_client, queue_name, {"request_id": request_id, "image_id": request_id, "image_url": url})

    wait_until(lambda: len(read_results(outputs["b"])) >= 8, 60, "host b did not get going")
    pools["b"].kill_all()  # the whole host: supervisor, ledger and workers, kill -9
    stranded = sum(redis_client.llen(key) for key in redis_client.smembers(keys.registry))
    later = [f"shm_b_late_{i}" for i in range(2)]  # for b, while it is down
    for request_id in later:
        push(redis_client, keys.host("b"), segments.message(request_id, request_id, frame))

    def waiting_for_b() -> set[str]:
        return {json.loads(raw.partition(b"\n")[2] or raw)["request_id"] for raw in redis_client.lrange(keys.host("b"), 0, -1)}

    def done_elsewhere() -> bool:
        finished = {r["request_id"] for host in "abc" for r in read_results(outputs[host])}
        # A URL task b's ledger was committing when b died may be recorded on b's
        # disk: it waits for b, like b's shared-memory tasks.
        return set(url_tasks) <= finished | waiting_for_b()

    wait_until(done_elsewhere, 90, "the survivors did not finish the URL tasks")
    for request_id in later:
        assert all(r["request_id"] != request_id for host in "ac" for r in read_results(outputs[host]))
    assert set(later) <= waiting_for_b(), "b's shared-memory tasks did not wait for it"
    assert all(not any(r["request_id"].startswith("shm_b") for r in read_results(outputs[h])) for h in "ac")

    revived = start("b")  # the host comes back
    wait_until(lambda: redis_client.llen(keys.host("b")) == 0, 60, "b did not take back its tasks")
    wait_until(
        lambda: {r["request_id"] for h in "abc" for r in read_results(outputs[h])} >= set(url_tasks + later),
        60, "b did not finish its tasks",
    )
    for pool in (pools["a"], pools["c"], revived):
        assert pool.stop() == 0

    records = [r for host in "abc" for r in read_results(outputs[host])]
    counts = Counter(r["request_id"] for r in records)
    expected = url_tasks + later + [t for ids in shm_tasks.values() for t in ids]
    assert sorted(counts) == sorted(expected), "a task was lost"
    assert max(counts.values()) == 1, f"doubled: {[k for k, v in counts.items() if v > 1]}"
    assert all(r["status"] == "completed" for r in records)
    assert redis_client.llen(queue_name) == 0 and redis_client.llen(keys.host("b")) == 0
    if stranded:  # b died holding a task: exactly one survivor took its list over
        takeovers = [e for host in "ac" for e in pools[host].events("tasks_requeued")]
        assert len(takeovers) == 1 and takeovers[0]["tasks"] >= 1


def test_a_host_lost_right_after_its_commit_point_does_not_double_its_tasks(
    pool_factory, redis_client, queue_name, http_server, tmp_path
):
    """Host b loses power just after its ledger made a batch of records durable,
    before acknowledging them. The survivor must not do those tasks again (their
    records are on b's disk): they wait in b's queue, and b drops them as
    duplicates when it returns. The rest of b's tasks move on at once."""
    ok, png = cv2.imencode(".png", photo_of_size(256, 256))
    url = http_server.add("/small.png", png.tobytes(), content_type="image/png")
    keys = QueueKeys(queue_name)
    outputs = {host: tmp_path / f"out-{host}" for host in "ab"}
    request_ids = [f"url_{i}" for i in range(40)]
    for request_id in request_ids:
        push(redis_client, queue_name, {"request_id": request_id, "image_id": request_id, "image_url": url})
    crash = {"IRW_CRASH_AT": "ledger_after_append", "IRW_CRASH_HOST": "true",
             "IRW_CRASH_MARKER": str(tmp_path / "crashed")}
    base = {"LEASE_TTL": "2", "HOST_QUEUE": "false"}
    b = pool_factory(workers=2, env={**base, "HOST_ID": "b", **crash}, output_dir=outputs["b"])
    wait_until(lambda: b.poll() is not None, 30, "host b never reached its commit point")
    recorded_by_b = {r["request_id"] for r in read_results(outputs["b"])}
    assert recorded_by_b, "b died before its first commit"

    a = pool_factory(workers=2, env={**base, "HOST_ID": "a"}, output_dir=outputs["a"])
    a.wait_ready()
    def done_by_a() -> set[str]:
        return {r["request_id"] for r in read_results(outputs["a"])}

    # b's list comes back at the head of the queue: a would take b's recorded tasks first.
    wait_until(lambda: set(request_ids) - recorded_by_b <= done_by_a(), 60, "a did not finish b's other tasks")
    assert not recorded_by_b & done_by_a(), "a did b's recorded tasks again"
    assert redis_client.llen(keys.host("b")) == len(recorded_by_b), "b's recorded tasks did not wait for b"

    revived = pool_factory(workers=1, env={**base, "HOST_ID": "b"}, output_dir=outputs["b"])
    revived.wait_ready()
    wait_until(lambda: redis_client.llen(keys.host("b")) == 0 and not redis_client.hlen(keys.committing), 30,
               "b did not take back its tasks")
    wait_until(lambda: len(revived.events("duplicate_dropped")) == len(recorded_by_b), 30, "b redid a task")
    for pool in (a, revived):
        assert pool.stop() == 0
    counts = Counter(r["request_id"] for host in "ab" for r in read_results(outputs[host]))
    assert sorted(counts) == sorted(request_ids), "a task was lost"
    assert max(counts.values()) == 1, f"doubled: {[k for k, v in counts.items() if v > 1]}"
    assert redis_client.llen(queue_name) == 0


def test_a_host_gone_for_good_is_drained_by_the_operator(
    pool_factory, redis_client, queue_name, segments, http_server, tmp_path
):
    """Host b will never return. `host drain b` sends what can still run
    elsewhere to the shared queue (its URL tasks, the task whose record it was
    committing, a message no host can parse), dead-letters the shared-memory task
    that had no URL, and clears b's marks. Host a then ends each task once."""
    ok, png = cv2.imencode(".png", photo_of_size(300, 400))
    url = http_server.add("/page.png", png.tobytes(), content_type="image/png")
    keys = QueueKeys(queue_name)
    outputs = {host: tmp_path / f"out-{host}" for host in "ab"}
    frame = photo_of_size(512, 512)

    b = pool_factory(workers=1, env={"HOST_ID": "b", "LEASE_TTL": "2"}, output_dir=outputs["b"])
    b.wait_ready()
    wait_until(lambda: json.loads(command(b, "status", "--json").stdout)["supervisors"], 10, "b has no lease")
    refused = command(b, "host", "drain", "b")
    assert refused.returncode == 1 and "running supervisor" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert b.stop() == 0

    # What a dead b leaves: tasks in its queue, and a processing list of its
    # instance (lease gone) holding a URL task its ledger was committing.
    push(redis_client, keys.host("b"), segments.message("shm_only", "shm_only", frame))
    push(redis_client, keys.host("b"), {**segments.message("shm_and_url", "shm_and_url", frame), "image_url": url})
    push(redis_client, keys.host("b"), b"not json")
    committing = json.dumps({"request_id": "committing", "image_id": "committing", "image_url": url}).encode()
    processing = keys.processing("deadinstance", "w1")
    redis_client.rpush(processing, b"irw2 b-7-1 1 %d s\n%s" % (len(committing), committing))
    redis_client.sadd(keys.registry, processing)
    redis_client.hset(keys.wait_sources, processing, f"{keys.queue} {keys.host('b')}")
    redis_client.hset(keys.committing, "b-7-1", keys.host("b"))

    before = command(b, "status")
    assert "host b: 3 waiting in its own queue  (no supervisor" in before.stdout, before.stdout
    assert "1 records being committed" in before.stdout
    drained = command(b, "host", "drain", "b")
    assert drained.returncode == 0, drained.stderr
    assert "requeued 1 processing lists" in drained.stdout
    assert "3 tasks to the shared queue" in drained.stdout and "1 shared-memory tasks to the dead letters" in drained.stdout
    assert redis_client.llen(keys.host("b")) == 0 and redis_client.hlen(keys.committing) == 0
    (letter,) = [json.loads(raw) for raw in redis_client.lrange(keys.dead, 0, -1)]
    assert letter["request_id"] == "shm_only" and "host b was drained" in letter["error"]
    assert json.loads(letter["message"])["shm_info"]["shm_name"] in segments.names

    a = pool_factory(workers=1, env={"HOST_ID": "a"}, output_dir=outputs["a"])
    records = wait_for_records(outputs["a"], 3, pool=a)
    assert a.stop() == 0
    by_id = {r["request_id"]: r for r in records}
    assert sorted(Counter(r["request_id"] for r in records).values()) == [1, 1, 1]
    assert by_id["shm_and_url"]["status"] == "completed" and by_id["shm_and_url"]["source"] == "url"
    assert (by_id["shm_and_url"]["width"], by_id["shm_and_url"]["height"]) == (400, 300)
    assert by_id["committing"]["status"] == "completed" and by_id["committing"]["task_id"] == "b-7-1"
    assert by_id["committing"]["attempts"] == 2  # b's delivery counts: it had started it
    assert by_id[None]["status"] == "failed" and "not valid JSON" in by_id[None]["error"]
    assert redis_client.llen(queue_name) == 0


def test_a_supervisor_serving_its_host_queue_keeps_the_hosts_live_key(
    pool_factory, redis_client, queue_name, tmp_path
):
    """With HOST_QUEUE=true the supervisor keeps `{Q}:live_host:<HOST_ID>` alive
    with its lease, for producers to look at; with HOST_QUEUE=false it does not.
    After a stop the key is left to expire (another supervisor may share the id)."""
    keys = QueueKeys(queue_name)
    serving = pool_factory(workers=1, env={"HOST_ID": "a", "HOST_QUEUE": "true", "LEASE_TTL": "2"},
                           output_dir=tmp_path / "out-a")
    shared_only = pool_factory(workers=1, env={"HOST_ID": "b", "HOST_QUEUE": "false", "LEASE_TTL": "2"},
                               output_dir=tmp_path / "out-b")
    serving.wait_ready()
    shared_only.wait_ready()
    instance = redis_client.get(keys.live_host("a"))
    assert instance is not None, "the serving supervisor set no live key"
    assert redis_client.exists(keys.lease(instance.decode())), "the live key names no leased instance"
    assert 0 < redis_client.pttl(keys.live_host("a")) <= 2000
    assert not redis_client.exists(keys.live_host("b"))
    # Not taken for a host queue by `status` and `host drain`.
    assert PoolRegistry(redis_client, keys).host_queues().listed == {}
    assert serving.stop() == 0
    wait_until(lambda: not redis_client.exists(keys.live_host("a")), 30, "the live key outlived its supervisor")
    assert shared_only.stop() == 0
