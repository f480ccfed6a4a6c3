"""Transient failures are retried through Redis's delayed-retry set; permanent
ones fail at once. A waiting retry does not hold a worker."""

from __future__ import annotations

import json

import cv2

from image_result_client.protocol import QueueKeys
from tests.helpers import push, wait_for_records, wait_until


def url_task(request_id: str, url: str) -> dict:
    return {"request_id": request_id, "image_id": request_id, "image_url": url}


def png_of(photo) -> bytes:
    ok, encoded = cv2.imencode(".png", photo)
    assert ok
    return encoded.tobytes()


def test_server_error_then_success_completes_once(pool_factory, redis_client, queue_name, http_server, photos):
    url = http_server.add("/flaky.png", b"busy", status=503)
    push(redis_client, queue_name, url_task("flaky", url))
    pool = pool_factory(workers=1)
    wait_until(lambda: pool.events("task_retry_scheduled"), 20, "no retry was scheduled")
    # The worker logs the retry when it sends the record; the ledger parks the
    # task in the delayed set a moment later, once the batch is committed.
    wait_until(lambda: redis_client.zcard(QueueKeys(queue_name).delayed) == 1, 10, "retry not in the delayed set")
    http_server.add("/flaky.png", png_of(photos["astronaut"]), content_type="image/png")
    (record,) = wait_for_records(pool.output_dir, 1, timeout=30, pool=pool)
    assert pool.stop() == 0
    assert record["status"] == "completed" and record["attempts"] >= 2
    assert redis_client.zcard(QueueKeys(queue_name).delayed) == 0
    assert redis_client.llen(QueueKeys(queue_name).dead) == 0


def test_retry_waits_without_holding_a_worker(pool_factory, redis_client, queue_name, http_server, photos):
    """With one worker, tasks behind a 429 are served while it waits out Retry-After."""
    throttled = http_server.add("/throttled.png", b"slow down", status=429, headers={"Retry-After": "3"})
    good = http_server.add("/good.png", png_of(photos["chelsea"]), content_type="image/png")
    push(redis_client, queue_name, url_task("throttled", throttled))
    for index in range(3):
        push(redis_client, queue_name, url_task(f"good_{index}", good))
    pool = pool_factory(workers=1, env={"MAX_ATTEMPTS": "2"})
    records = wait_for_records(pool.output_dir, 4, timeout=30, pool=pool)
    assert pool.stop() == 0
    assert [r["request_id"] for r in records[:3]] == ["good_0", "good_1", "good_2"]
    (scheduled,) = pool.events("task_retry_scheduled")
    assert scheduled["retry_in"] >= 3
    throttled_record = records[3]
    assert throttled_record["status"] == "failed"
    assert "gave up after 2 attempts" in throttled_record["error"] and "429" in throttled_record["error"]
    assert throttled_record["attempts"] == 2
    (dead,) = [json.loads(entry) for entry in redis_client.lrange(QueueKeys(queue_name).dead, 0, -1)]
    assert dead["request_id"] == "throttled" and dead["attempts"] == 2


def test_client_error_fails_at_once(pool_factory, redis_client, queue_name, http_server):
    push(redis_client, queue_name, url_task("gone", http_server.add("/gone.png", b"no", status=404)))
    pool = pool_factory(workers=1)
    (record,) = wait_for_records(pool.output_dir, 1, timeout=30, pool=pool)
    assert pool.stop() == 0
    assert record["status"] == "failed" and record["attempts"] == 1 and "HTTP 404" in record["error"]
    assert not pool.events("task_retry_scheduled")
    assert redis_client.zcard(QueueKeys(queue_name).delayed) == 0


def test_link_local_address_is_refused(pool_factory, redis_client, queue_name):
    """Cloud metadata (169.254.169.254) is never fetched, whatever the settings."""
    push(redis_client, queue_name, url_task("metadata", "http://169.254.169.254/latest/meta-data/"))
    push(redis_client, queue_name, url_task("mapped", "http://[::ffff:169.254.169.254]/latest/"))
    pool = pool_factory(workers=1)
    records = {r["request_id"]: r for r in wait_for_records(pool.output_dir, 2, timeout=30, pool=pool)}
    assert pool.stop() == 0
    assert all("link-local" in record["error"] and record["attempts"] == 1 for record in records.values())


def test_hosts_outside_the_allowlist_are_refused_also_after_a_redirect(
    pool_factory, redis_client, queue_name, http_server, photos
):
    good = http_server.add("/ok.png", png_of(photos["coffee"]), content_type="image/png")
    bounce = http_server.redirect("/bounce", good.replace("127.0.0.1", "localhost"))
    push(redis_client, queue_name, url_task("unlisted", good.replace("127.0.0.1", "localhost")))
    push(redis_client, queue_name, url_task("redirected", bounce))
    push(redis_client, queue_name, url_task("listed", good))
    pool = pool_factory(workers=1, env={"URL_ALLOWED_HOSTS": "127.0.0.1"})
    records = {r["request_id"]: r for r in wait_for_records(pool.output_dir, 3, timeout=30, pool=pool)}
    assert pool.stop() == 0
    assert "URL_ALLOWED_HOSTS" in records["unlisted"]["error"]
    assert "URL_ALLOWED_HOSTS" in records["redirected"]["error"]
    assert records["listed"]["status"] == "completed"
    assert http_server.hits("/ok.png") == 1


def test_dead_letter_list_keeps_only_the_newest(pool_factory, redis_client, queue_name):
    """DEAD_LETTER_MAX bounds the list, so a flood of garbage cannot fill Redis."""
    for index in range(5):
        push(redis_client, queue_name, {"request_id": f"bad_{index}", "image_id": "x"})
    pool = pool_factory(workers=1, env={"DEAD_LETTER_MAX": "2"})
    wait_for_records(pool.output_dir, 5, timeout=30, pool=pool)
    wait_until(lambda: not redis_client.llen(queue_name), 10, "queue not drained")
    assert pool.stop() == 0
    dead = [json.loads(entry)["request_id"] for entry in redis_client.lrange(QueueKeys(queue_name).dead, 0, -1)]
    assert dead == ["bad_3", "bad_4"]
