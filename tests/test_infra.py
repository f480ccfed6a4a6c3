"""The test harness itself: private Redis, HTTP routes, shared memory, photos, ledger
readers and the Pool process wrapper (driven by a stand-in script, not the supervisor)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
import redis

from harness import REPO_ROOT
from harness.http_server import HttpServer
from harness.photos import photo_of_size
from harness.procfs import pid_alive
from harness.results import read_results
from harness.segments import SegmentTracker, make_segment, read_segment, segment_exists, shm_message, unlink_segment
from tests.conftest import PoolFactory
from tests.helpers import psnr, wait_for_records
from tools.local_redis import LocalRedis, answers_ping, find_redis_server, free_port

# ---------------------------------------------------------------- Redis


@pytest.mark.fast
def test_find_redis_server_returns_an_executable() -> None:
    path = find_redis_server()
    assert os.access(path, os.X_OK)


def test_restart_keeps_port_and_queued_data(redis_server: LocalRedis, redis_client: redis.Redis) -> None:
    port = redis_server.port
    redis_client.rpush("q", b"task")
    redis_server.restart()
    assert redis_server.port == port
    assert redis_client.lrange("q", 0, -1) == [b"task"]


def test_stopped_server_refuses_then_start_brings_it_back(redis_server: LocalRedis, redis_client: redis.Redis) -> None:
    redis_server.stop()
    try:
        assert not answers_ping(redis_server.url)
    finally:
        redis_server.start()
    assert redis_client.ping()


def test_context_manager_stops_the_server(tmp_path: Path) -> None:
    with LocalRedis(data_dir=tmp_path) as server:
        assert answers_ping(server.url)
        pid = server.pid
    assert not answers_ping(server.url)
    assert not Path(f"/proc/{pid}").exists()


def test_start_failure_includes_the_log_tail(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = LocalRedis(port=taken.getsockname()[1], data_dir=tmp_path)
        with pytest.raises(RuntimeError, match="in use"):
            server.start()
    assert not server.is_running()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tools.local_redis", *args],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=30,
    )


def test_cli_ensure_starts_once_and_stop_stops(tmp_path: Path) -> None:
    url = f"redis://:s3cret@127.0.0.1:{free_port()}/0"
    data_dir = tmp_path / "redis"
    try:
        first = _cli("ensure", "--url", url, "--data-dir", str(data_dir))
        assert first.returncode == 0, first.stderr
        assert first.stdout.startswith("no Redis answered at redis://127.0.0.1:")
        assert "stop it with: make stop-redis" in first.stdout
        assert "s3cret" not in first.stdout + first.stderr
        assert answers_ping(url)
        assert not answers_ping(url.replace(":s3cret@", ""))  # the password is enforced

        second = _cli("ensure", "--url", url, "--data-dir", str(data_dir))
        assert (second.returncode, second.stdout) == (0, "")
    finally:
        stopped = _cli("stop", "--data-dir", str(data_dir))
    assert stopped.returncode == 0, stopped.stderr
    assert not answers_ping(url)
    assert not (data_dir / "redis.pid").exists()


def test_cli_ensure_does_not_start_for_a_remote_host(tmp_path: Path) -> None:
    """Not ours to start: a warning, and make run goes on to the pool, which retries."""
    # 127.0.0.2 is loopback but not "localhost": it stands in for a remote host.
    done = _cli("ensure", "--url", f"redis://user:pw@127.0.0.2:{free_port()}", "--data-dir", str(tmp_path))
    assert done.returncode == 0
    assert done.stdout == ""
    assert not (tmp_path / "redis.pid").exists()
    assert len(done.stderr.strip().splitlines()) == 1
    assert "pw" not in done.stderr.replace("127.0.0.2", "")


# ---------------------------------------------------------------- HTTP


def _get(url: str, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def test_http_routes_redirects_and_404(http_server: HttpServer) -> None:
    http_server.add("/a.jpg", b"jpegbytes")
    http_server.redirect("/old", http_server.url("/a.jpg"))
    http_server.add("/gone", b"nope", status=410, content_type="text/plain")

    assert _get(http_server.url("/a.jpg"))[::2] == (200, b"jpegbytes")
    assert _get(http_server.url("/old"))[::2] == (200, b"jpegbytes")
    assert _get(http_server.url("/gone"))[0] == 410
    assert _get(http_server.url("/missing"))[0] == 404
    assert http_server.hits("/a.jpg") == 2


def test_http_headers_override_and_none_omits(http_server: HttpServer) -> None:
    http_server.add("/big", b"abc", headers={"content-length": None, "X-Extra": "1"})
    status, headers, body = _get(http_server.url("/big"))
    assert (status, body) == (200, b"abc")
    assert "Content-Length" not in headers and headers["X-Extra"] == "1"


def test_trickle_starves_the_client_and_stop_does_not_hang() -> None:
    server = HttpServer().start()
    try:
        url = server.trickle("/slow", interval=0.5)
        with urllib.request.urlopen(url, timeout=0.3) as response:
            with pytest.raises(TimeoutError):
                response.read()
        # A second client still connected when we stop.
        hanging = urllib.request.urlopen(url, timeout=5)
    finally:
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < 2.0
    hanging.close()


# ---------------------------------------------------------------- shared memory and photos


@pytest.mark.fast
def test_make_segment_holds_the_array(segments: SegmentTracker, photos: dict[str, np.ndarray]) -> None:
    image = photos["astronaut"]
    name = make_segment(image)
    assert name.startswith("img_shm_") and "/" not in name
    assert segment_exists(name)
    assert os.path.getsize(f"/dev/shm/{name}") == image.nbytes
    np.testing.assert_array_equal(read_segment(name, image.shape, image.dtype), image)
    assert segments.names == {name}
    assert segments.leftovers() == [name]

    unlink_segment(name)
    unlink_segment(name)  # a second unlink is harmless
    assert not segment_exists(name)


def test_segment_outlives_a_process_that_created_it(tmp_path: Path) -> None:
    # The producer's resource tracker must not unlink a segment at exit.
    code = (
        "import numpy as np; from harness.segments import make_segment; "
        "print(make_segment(np.arange(12, dtype=np.uint8).reshape(3, 4)))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
    name = done.stdout.strip()
    try:
        assert done.returncode == 0 and "leaked" not in done.stderr, done.stderr
        assert segment_exists(name)
    finally:
        unlink_segment(name)


@pytest.mark.fast
def test_shm_message_describes_its_segment(photos: dict[str, np.ndarray]) -> None:
    image = photos["camera"]
    message = shm_message("req-1", "img-1", image)
    info = message["shm_info"]
    assert (message["request_id"], message["image_id"]) == ("req-1", "img-1")
    assert info["shape"] == [512, 512] and info["dtype"] == "uint8" and info["size"] == image.nbytes
    assert segment_exists(info["shm_name"])
    json.dumps(message)  # must be serializable as-is


@pytest.mark.fast
def test_photos_are_real_read_only_images(photos: dict[str, np.ndarray]) -> None:
    assert photos["astronaut"].shape == (512, 512, 3)
    assert photos["camera"].ndim == 2
    for image in photos.values():
        assert image.dtype == np.uint8 and image.std() > 20  # not blank
        assert not image.flags.writeable


@pytest.mark.fast
@pytest.mark.parametrize("size", [(1024, 1024), (2160, 3840), (7, 5)])
def test_photo_of_size(size: tuple[int, int]) -> None:
    image = photo_of_size(*size)
    assert image.shape == (*size, 3) and image.dtype == np.uint8
    assert image.flags.writeable


@pytest.mark.fast
def test_psnr_tells_a_jpeg_round_trip_from_noise(photos: dict[str, np.ndarray]) -> None:
    image = photos["coffee"]
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 80])
    assert ok
    decoded = cv2.imdecode(encoded, cv2.IMREAD_COLOR)
    noise = np.random.default_rng(0).integers(0, 256, image.shape, dtype=np.uint8)
    assert psnr(image, image) == float("inf")
    assert psnr(image, decoded) > 30
    assert psnr(image, noise) < 12


# ---------------------------------------------------------------- ledger readers


@pytest.mark.fast
def test_read_results_missing_file_is_empty(tmp_path: Path) -> None:
    assert read_results(tmp_path) == []


@pytest.mark.fast
def test_read_results_retries_a_torn_tail(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    whole = json.dumps([{"image_id": "a"}, {"image_id": "b"}])
    path.write_text(whole[:-7])
    finisher = threading.Timer(0.3, path.write_text, args=(whole,))
    finisher.start()
    try:
        assert [record["image_id"] for record in read_results(tmp_path)] == ["a", "b"]
    finally:
        finisher.join()


@pytest.mark.fast
def test_read_results_gives_up_on_a_file_that_stays_torn(tmp_path: Path) -> None:
    (tmp_path / "results.json").write_text('[{"image_id": "a"')
    with pytest.raises(AssertionError, match="unparsable"):
        read_results(tmp_path, timeout=0.2)


@pytest.mark.fast
def test_wait_for_records_says_how_many_it_saw(tmp_path: Path) -> None:
    (tmp_path / "results.json").write_text(json.dumps([{"image_id": "a"}]))
    assert len(wait_for_records(tmp_path, 1, timeout=1)) == 1
    with pytest.raises(AssertionError, match="saw 1 of 3 records"):
        wait_for_records(tmp_path, 3, timeout=0.3)


# ---------------------------------------------------------------- Pool wrapper

STAND_IN = '''
import json, os, signal, socket, sys, time

mode = os.environ.get("FAKE_MODE", "normal")

def log(event, **fields):
    print(json.dumps({"event": event, **fields}), file=sys.stderr, flush=True)

def notify(message):
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(message.encode(), os.environ["NOTIFY_SOCKET"])

if mode == "crash":
    print("boom: bad configuration", file=sys.stderr)
    sys.exit(2)
print("not json", file=sys.stderr, flush=True)
children = []
for _ in range(int(sys.argv[sys.argv.index("--workers") + 1])):
    pid = os.fork()
    if pid == 0:
        if mode == "stubborn":
            os.setpgid(0, 0)  # leaves the process group; only the session scan finds it
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(600)
        os._exit(0)
    children.append(pid)
log("pool_started", env={k: os.environ.get(k) for k in
    ("REDIS_URL", "HOSTING_TASKS_QUEUE", "OUTPUT_DIR", "LOG_FORMAT", "JPEG_QUALITY", "EXTRA")})

def on_term(signum, frame):
    notify("STOPPING=1")
    for pid in children:
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)
    log("pool_stopped")
    sys.exit(0)

signal.signal(signal.SIGTERM, signal.SIG_IGN if mode == "stubborn" else on_term)
notify("READY=1\\nSTATUS=serving")
while True:
    time.sleep(1)
'''


@pytest.fixture
def stand_in(tmp_path: Path) -> str:
    path = tmp_path / "fake_supervisor.py"
    path.write_text(STAND_IN)
    return str(path)


def test_pool_wrapper_ready_children_logs_and_stop(
    pool_factory: PoolFactory, stand_in: str, queue_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JPEG_QUALITY", "1")  # a leaked setting must not reach the pool
    pool = pool_factory(script=stand_in, workers=2, env={"EXTRA": "yes"})
    pool.wait_ready(timeout=10)

    assert "READY=1\nSTATUS=serving" in pool.notifications()
    assert len(pool.child_pids()) == 2
    assert all("fake_supervisor.py" in title for title in pool.children_by_title().values())
    started = pool.events("pool_started")[0]["env"]
    assert started == {
        "REDIS_URL": pool.redis_url, "HOSTING_TASKS_QUEUE": queue_name, "OUTPUT_DIR": str(tmp_path / "out"),
        "LOG_FORMAT": "json", "JPEG_QUALITY": None, "EXTRA": "yes",
    }
    assert "not json" in pool.stderr_text()

    children = pool.child_pids()
    assert pool.stop() == 0
    assert "STOPPING=1" in pool.notifications()
    assert pool.events("pool_stopped")
    assert not any(pid_alive(pid) for pid in children)


def test_pool_wrapper_reports_an_early_exit(pool_factory: PoolFactory, stand_in: str) -> None:
    pool = pool_factory(script=stand_in, env={"FAKE_MODE": "crash"})
    with pytest.raises(AssertionError, match="exited with 2 before READY=1(.|\n)*boom"):
        pool.wait_ready(timeout=10)


def test_pool_wrapper_kills_a_stubborn_session(pool_factory: PoolFactory, stand_in: str) -> None:
    pool = pool_factory(script=stand_in, workers=2, env={"FAKE_MODE": "stubborn"})
    pool.wait_ready(timeout=10)
    children = pool.child_pids()
    with pytest.raises(AssertionError, match="still running"):
        pool.stop(signal.SIGTERM, timeout=0.5)
    assert pool.poll() == -signal.SIGKILL
    assert pool.session_pids() == []
    assert not any(pid_alive(pid) for pid in children)
