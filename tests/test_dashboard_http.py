"""The dashboard's HTTP layer, in-process, against a real socket and a real Redis:
who may change the queue (token, Origin, Sec-Fetch-Site, content type), the
Host check, thumbnails that cannot leave OUTPUT_DIR, and one shared read of
Redis for many clients. Request size caps, deadlines and floods are the HTTP
base's, tested once for both ports in tests/test_http_base.py.

The decisions themselves (authorize_change, check_host, thumbnail_name) are
also tested as pure functions, in milliseconds."""

from __future__ import annotations

import dataclasses
import http.client
import json
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from http import HTTPStatus
from pathlib import Path

import cv2
import numpy as np
import pytest
import redis

from control.dashboard import (
    CONTENT_SECURITY_POLICY,
    THUMB_BURST,
    THUMBS_PER_SECOND,
    Refused,
    Thumbnails,
    authorize_change,
    check_host,
    make_server,
    thumbnail_name,
)
from control.dashboard_data import Overview
from control.http_base import LIMITS
from image_result_client.protocol import QueueKeys
from shared.config import Settings
from shared.ipc.records import dead_letter_entry
from shared.storage.results_file import ResultsFile

pytestmark = pytest.mark.timeout(60)

TOKEN = "correct-horse-battery-staple"
HOST = "127.0.0.1"


# ---------------------------------------------------------------- pure decisions


def headers(**overrides: str | None) -> dict[str, str]:
    base = {
        "host": "127.0.0.1:8090",
        "origin": "http://127.0.0.1:8090",
        "content-type": "application/json",
        "sec-fetch-site": "same-origin",
        "x-dashboard-token": TOKEN,
    }
    base.update({key.replace("_", "-"): value for key, value in overrides.items()})
    return {key: value for key, value in base.items() if value is not None}


@pytest.mark.parametrize(
    ("overrides", "token", "status", "reason"),
    [
        ({}, None, HTTPStatus.FORBIDDEN, "read-only"),
        ({"x_dashboard_token": None}, TOKEN, HTTPStatus.FORBIDDEN, "enter the token"),
        ({"x_dashboard_token": TOKEN + "x"}, TOKEN, HTTPStatus.FORBIDDEN, "wrong token"),
        ({"x_dashboard_token": ""}, TOKEN, HTTPStatus.FORBIDDEN, "wrong token"),
        ({"origin": None}, TOKEN, HTTPStatus.FORBIDDEN, "Origin"),
        ({"origin": "http://evil.example"}, TOKEN, HTTPStatus.FORBIDDEN, "another site"),
        ({"origin": "http://127.0.0.1:8091"}, TOKEN, HTTPStatus.FORBIDDEN, "another site"),
        ({"origin": "https://127.0.0.1:8090"}, TOKEN, HTTPStatus.FORBIDDEN, "another site"),
        ({"origin": "null"}, TOKEN, HTTPStatus.FORBIDDEN, "another site"),
        ({"sec_fetch_site": "cross-site"}, TOKEN, HTTPStatus.FORBIDDEN, "Sec-Fetch-Site"),
        ({"sec_fetch_site": "same-site"}, TOKEN, HTTPStatus.FORBIDDEN, "Sec-Fetch-Site"),
        ({"content_type": "text/plain"}, TOKEN, HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "application/json"),
        ({"content_type": "application/x-www-form-urlencoded"}, TOKEN, HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "json"),
    ],
)
@pytest.mark.fast
def test_a_change_is_refused(overrides: dict, token: str | None, status: HTTPStatus, reason: str) -> None:
    with pytest.raises(Refused) as refused:
        authorize_change(headers(**overrides), token=token)
    assert refused.value.status == status and reason in refused.value.reason


@pytest.mark.fast
def test_a_change_with_token_same_origin_and_json_is_allowed() -> None:
    authorize_change(headers(), token=TOKEN)
    authorize_change(headers(sec_fetch_site=None, content_type="application/json; charset=utf-8"), token=TOKEN)


@pytest.mark.fast
@pytest.mark.parametrize("host", ["127.0.0.1:8090", "localhost:8090", "[::1]:8090", "127.0.0.2", "localhost"])
def test_loopback_host_names_are_served(host: str) -> None:
    check_host(host, bound_to_loopback=True)


@pytest.mark.fast
@pytest.mark.parametrize("host", ["evil.example:8090", "evil.example", "", None, "127.0.0.1.evil.example"])
def test_other_host_names_are_refused_on_loopback_only(host: str | None) -> None:
    with pytest.raises(Refused) as refused:
        check_host(host, bound_to_loopback=True)
    assert refused.value.status == HTTPStatus.MISDIRECTED_REQUEST
    check_host(host, bound_to_loopback=False)


@pytest.mark.fast
@pytest.mark.parametrize("name", ["", ".", "..", "../results.json", "a/b.jpg", ".lock", "a\\b", "x\0.jpg", ".partial"])
def test_thumbnail_names_with_a_path_are_refused(name: str) -> None:
    with pytest.raises(Refused):
        thumbnail_name(name)
    assert thumbnail_name("img_20250101_000000.jpg") == "img_20250101_000000.jpg"


# ---------------------------------------------------------------- a real server


@pytest.fixture
def output_dir(tmp_path: Path) -> Path:
    path = tmp_path / "out"
    path.mkdir()
    return path


def start_server(redis_url: str, queue: str, output_dir: Path, *, token: str | None = TOKEN, deadline: float = 10.0):
    env = {"REDIS_URL": redis_url, "HOSTING_TASKS_QUEUE": queue, "OUTPUT_DIR": str(output_dir)}
    if token is not None:
        env["DASHBOARD_TOKEN"] = token
    settings = Settings.from_env(env, dotenv_path=None)
    server = make_server(settings, address=HOST, port=0, limits=dataclasses.replace(LIMITS, deadline=deadline))
    server.start()
    return server


@pytest.fixture
def server(redis_server, redis_client: redis.Redis, queue_name: str, output_dir: Path) -> Iterator:
    server = start_server(redis_server.url, queue_name, output_dir)
    try:
        yield server
    finally:
        server.close()


def request(server, method: str, path: str, *, body: bytes | None = None, extra: dict | None = None):
    connection = http.client.HTTPConnection(HOST, server.port, timeout=10)
    try:
        connection.request(method, path, body=body, headers=extra or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def post(server, path: str, payload: dict, **overrides: str | None):
    origin = f"http://{HOST}:{server.port}"
    sent = {"Origin": origin, "Content-Type": "application/json", "X-Dashboard-Token": TOKEN}
    sent.update({key: value for key, value in overrides.items() if value is not None})
    for key in [key for key, value in overrides.items() if value is None]:
        sent.pop(key, None)
    status, _, body = request(server, "POST", path, body=json.dumps(payload).encode(), extra=sent)
    return status, json.loads(body)


def add_dead_letter(client: redis.Redis, queue: str, request_id: str) -> bytes:
    message = json.dumps({"request_id": request_id, "image_id": "i", "image_url": "http://x.invalid/a.png"})
    entry = dead_letter_entry(
        failed_at=datetime.now(), task_id="t1", request_id=request_id, image_id="i", attempts=1,
        error="HTTP 404 from http://x.invalid/a.png", message=message.encode(),
    )
    client.rpush(QueueKeys(queue).dead, entry)
    return entry


def test_the_page_and_its_assets_carry_a_strict_policy(server) -> None:
    for path, kind in [("/", "text/html"), ("/static/dashboard.js", "text/javascript"), ("/api/overview", "application/json")]:
        status, sent, body = request(server, "GET", path)
        assert status == 200 and sent["Content-Type"].startswith(kind), (path, body[:200])
        assert sent["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
        assert sent["X-Content-Type-Options"] == "nosniff" and sent["X-Frame-Options"] == "DENY"
        assert "Access-Control-Allow-Origin" not in sent
    assert "'unsafe-inline'" not in CONTENT_SECURITY_POLICY and "script-src 'self'" in CONTENT_SECURITY_POLICY
    status, _, _ = request(server, "GET", "/static/../control/dashboard.py")
    assert status == 404


def test_a_rebound_host_name_is_refused(server) -> None:
    status, _, body = request(server, "GET", "/api/overview", extra={"Host": "attacker.example"})
    assert status == 421 and b"loopback" in body


def test_a_requeue_needs_the_token_the_origin_and_json(server, redis_client, queue_name) -> None:
    entry = add_dead_letter(redis_client, queue_name, "r1")
    letter_id = json.loads(request(server, "GET", "/api/overview")[2])["dead_letters"][0]["id"]
    keys = QueueKeys(queue_name)

    refused = [
        post(server, "/api/dead/requeue", {"id": letter_id}, **{"X-Dashboard-Token": None}),
        post(server, "/api/dead/requeue", {"id": letter_id}, **{"X-Dashboard-Token": "wrong-token-wrong-token"}),
        post(server, "/api/dead/requeue", {"id": letter_id}, Origin="http://evil.example"),
        post(server, "/api/dead/requeue", {"id": letter_id}, Origin=None),
        post(server, "/api/dead/requeue", {"id": letter_id}, **{"Content-Type": "text/plain"}),
        post(server, "/api/dead/requeue", {"id": letter_id}, **{"Sec-Fetch-Site": "cross-site"}),
    ]
    assert [status for status, _ in refused] == [403, 403, 403, 403, 415, 403], refused
    assert redis_client.lrange(keys.dead, 0, -1) == [entry] and redis_client.llen(keys.queue) == 0

    status, answer = post(server, "/api/dead/requeue", {"id": letter_id})
    assert status == 200 and answer["ok"] and answer["moved"] == 1
    assert redis_client.llen(keys.dead) == 0
    assert json.loads(redis_client.lpop(keys.queue))["request_id"] == "r1"

    status, answer = post(server, "/api/dead/requeue", {"id": letter_id})
    assert status == 200 and not answer["ok"] and "no such dead letter" in answer["message"]


def test_requeue_all_and_purge(server, redis_client, queue_name) -> None:
    keys = QueueKeys(queue_name)
    for index in range(5):
        add_dead_letter(redis_client, queue_name, f"r{index}")
    redis_client.rpush(keys.dead, b"not a dead letter")
    status, answer = post(server, "/api/dead/requeue-all", {})
    assert status == 200 and answer["moved"] == 5 and answer["remaining"] == 1, answer
    assert [json.loads(m)["request_id"] for m in redis_client.lrange(keys.queue, 0, -1)] == [f"r{i}" for i in range(5)]
    status, answer = post(server, "/api/dead/purge", {})
    assert status == 200 and answer["moved"] == 1 and redis_client.llen(keys.dead) == 0


def test_a_read_only_dashboard_refuses_every_change(redis_server, redis_client, queue_name, output_dir) -> None:
    add_dead_letter(redis_client, queue_name, "r1")
    server = start_server(redis_server.url, queue_name, output_dir, token=None)
    try:
        overview = json.loads(request(server, "GET", "/api/overview")[2])
        assert overview["writable"] is False
        for path in ("/api/unlock", "/api/dead/requeue-all", "/api/dead/purge"):
            status, answer = post(server, path, {})
            assert status == 403 and answer["error"].startswith("read-only"), answer
        assert redis_client.llen(QueueKeys(queue_name).dead) == 1
    finally:
        server.close()


def test_thumbnails_only_for_files_a_record_names(server, output_dir, tmp_path) -> None:
    picture = np.full((400, 600, 3), 200, np.uint8)
    ok, jpeg = cv2.imencode(".jpg", picture)
    assert ok
    (output_dir / "named_1.jpg").write_bytes(jpeg.tobytes())
    (output_dir / "unnamed_1.jpg").write_bytes(jpeg.tobytes())
    outside = tmp_path / "secret.jpg"
    outside.write_bytes(jpeg.tobytes())
    (output_dir / "link_1.jpg").symlink_to(outside)
    results = ResultsFile(output_dir / "results.json")
    results.open()
    results.append([
        _record("a", str(output_dir / "named_1.jpg")),
        _record("b", str(output_dir / "link_1.jpg")),
        _record("c", str(output_dir / "../secret.jpg")),
    ])
    results.close()

    overview = json.loads(request(server, "GET", "/api/overview")[2])
    thumbs = {item["request_id"]: item["thumb"] for item in overview["records"]["items"]}
    assert thumbs == {"a": "named_1.jpg", "b": None, "c": None}

    status, sent, body = request(server, "GET", "/thumb?name=named_1.jpg")
    assert status == 200 and sent["Content-Type"] == "image/jpeg"
    small = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR)
    assert max(small.shape[:2]) <= 160
    for name in ("unnamed_1.jpg", "link_1.jpg", "..%2Fsecret.jpg", "%2Fetc%2Fpasswd", "results.json", ".lock"):
        assert request(server, "GET", f"/thumb?name={name}")[0] == 404, name


def test_many_clients_share_one_read_of_redis(redis_server, redis_client, queue_name) -> None:
    settings = Settings.from_env(
        {"REDIS_URL": redis_server.url, "HOSTING_TASKS_QUEUE": queue_name}, dotenv_path=None
    )
    overview = Overview(redis_client, settings)
    bodies: list[bytes] = []

    def client() -> None:
        for _ in range(20):
            bodies.append(overview.get())
            time.sleep(0.02)

    threads = [threading.Thread(target=client) for _ in range(20)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    assert len(bodies) == 400
    assert overview.refreshes <= elapsed / 1.0 + 1, (overview.refreshes, elapsed)
    assert all(json.loads(body)["queue"] == queue_name for body in bodies)


def _record(request_id: str, file_path: str) -> dict:
    return {
        "timestamp": datetime.now().isoformat(), "request_id": request_id, "image_id": "i",
        "file_path": file_path, "status": "completed", "task_id": f"t-{request_id}", "attempts": 1,
    }


def test_the_overview_reads_the_pool_as_redis_holds_it(redis_server, redis_client, queue_name) -> None:
    settings = Settings.from_env({"REDIS_URL": redis_server.url, "HOSTING_TASKS_QUEUE": queue_name}, dotenv_path=None)
    keys = QueueKeys(queue_name)
    now = time.time()
    processing = keys.processing("inst1", "w7")
    redis_client.sadd(keys.registry, processing)
    redis_client.rpush(processing, b"irw2 t1 1 2 s\n{}", b"irw2 t2 1 2 s\n{}")
    redis_client.rpush(keys.queue, b"a", b"b", b"c")
    redis_client.rpush(keys.host("box-2"), b"x", b"y")
    redis_client.zadd(keys.delayed, {b"irw2 t3 2 2 s\n{}": now + 42})
    redis_client.hset(keys.stats(now), mapping={"completed": 7, "failed": 2, "retried": 1})
    task = {"phase": "encode", "started_at": now - 3, "request_id": "<b>r</b>", "task_id": "t1"}
    state = {
        "instance": "inst1", "host": "box", "host_id": "box-1", "pid": 10, "ready": True, "desired_workers": 2,
        "updated_at": now - 1, "ledger": {"slot": 0, "pid": 11, "heartbeat_age": 0.1, "processing_list": None},
        "workers": [{"slot": 0, "pid": 12, "heartbeat_age": 0.2, "processing_list": processing, "task": task}],
    }
    redis_client.set(keys.lease("inst1"), json.dumps(state))
    redis_client.set(keys.lease("garbage"), b"\xff not json")

    overview = json.loads(Overview(redis_client, settings).get())

    assert overview["totals"] == {"waiting": 3, "in_flight": 2, "delayed": 1, "dead": 0, "committing": 0}
    assert overview["host_queues"] == {"box-2": 2}
    assert overview["last_minute"] == {"completed": 7, "failed": 2, "retried": 1}
    assert 40 < overview["next_retry_in"] <= 42
    [supervisor] = overview["supervisors"]
    assert (supervisor["host"], supervisor["instance"], supervisor["ready"]) == ("box", "inst1", True)
    [worker] = supervisor["workers"]
    assert worker["in_flight"] == 2 and worker["more"] == {"task": task}
    assert supervisor["ledger"]["pid"] == 11 and supervisor["ledger"]["in_flight"] is None
    assert overview["history"]["samples"][-1][1:] == [3, 2, 1, 0]


def test_an_outage_keeps_the_last_figures_and_says_so(redis_server, redis_client, queue_name) -> None:
    settings = Settings.from_env({"REDIS_URL": "redis://127.0.0.1:1", "HOSTING_TASKS_QUEUE": queue_name}, dotenv_path=None)
    clock = [0.0]
    client = redis.Redis.from_url(redis_server.url)
    overview = Overview(client, settings, clock=lambda: clock[0])
    redis_client.rpush(QueueKeys(queue_name).queue, b"a")
    assert json.loads(overview.get())["totals"]["waiting"] == 1
    client.connection_pool.reset()
    client.connection_pool.connection_kwargs.update(port=1)  # Redis "goes away"
    clock[0] += 5
    stale = json.loads(overview.get())
    assert stale["totals"]["waiting"] == 1 and "unreachable" in stale["error"] and "127.0.0.1:1" in stale["error"]
    assert overview.get() is overview.get()  # within the refresh period: no new attempt


@pytest.mark.fast
def test_thumbnails_are_made_at_a_bounded_rate_and_served_from_the_cache(tmp_path) -> None:
    """Each new thumbnail is a JPEG decode; a pool finishing 80 4K frames a
    second must not have the dashboard decode 80 a second beside it."""
    ok, jpeg = cv2.imencode(".jpg", np.full((400, 600, 3), 90, np.uint8))
    assert ok
    names = [f"frame_{n}.jpg" for n in range(THUMB_BURST + 3)]
    for name in names:
        (tmp_path / name).write_bytes(jpeg.tobytes())
    now = [100.0]
    thumbnails = Thumbnails(tmp_path, clock=lambda: now[0])

    made = [thumbnails.get(name) for name in names[:THUMB_BURST]]
    assert all(thumb.startswith(b"\xff\xd8") for thumb in made)
    with pytest.raises(Refused) as refused:
        thumbnails.get(names[THUMB_BURST])
    assert refused.value.status == HTTPStatus.SERVICE_UNAVAILABLE
    assert thumbnails.get(names[0]) == made[0]  # cached: no budget needed
    now[0] += 1 / THUMBS_PER_SECOND
    assert thumbnails.get(names[THUMB_BURST]).startswith(b"\xff\xd8")
