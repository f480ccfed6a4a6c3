"""The producer client (`image_result_client.Producer`) and its CLI (`python -m image_result_client enqueue`),
against the real pool on a private redis-server, real /dev/shm segments and a
loopback HTTP server.

What matters most to an upstream stage: the segment it creates must survive its
own exit (no resource-tracker unlinking) and must not leak when Redis is away.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import redis

from harness import REPO_ROOT
from harness.http_server import HttpServer
from harness.pool import POOL_ENV_VARS
from harness.procfs import pid_alive
from harness.segments import segment_exists, unlink_segment
from image_result_client import Producer, Submission, WaitTimeout
from image_result_client.producer import ResultsReader
from image_result_client.protocol import PUSH_FOR_HOST_SCRIPT, SHM_DIR, QueueKeys, partial_path
from shared.storage.files import prepare_output_dir, publish, write_partial
from shared.storage.results_file import ResultsFile
from tests.conftest import PoolFactory
from tests.helpers import psnr, wait_until
from tools.local_redis import LocalRedis, free_port

WAIT = 30.0
CLI_TIMEOUT = 60.0

# Submits one frame from a separate process, then exits; prints what the test needs.
SUBMIT_AND_EXIT = """
import json, sys
from multiprocessing import resource_tracker
import numpy as np
from image_result_client import Producer

frame = np.load(sys.argv[3])
with Producer.from_url(sys.argv[1], queue=sys.argv[2]) as producer:
    submission = producer.submit_array(frame, image_id="chelsea")
print(json.dumps({"request_id": submission.request_id, "segment": submission.segment,
                  "tracker": resource_tracker._resource_tracker._pid}))
"""


def png(image: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", image)
    assert ok
    return data.tobytes()


def read_jpeg(record: dict[str, Any], flags: int = cv2.IMREAD_COLOR) -> np.ndarray:
    image = cv2.imread(record["file_path"], flags)
    assert image is not None, f"{record['file_path']} does not decode"
    return image


def segments_with_prefix(prefix: str) -> list[str]:
    return sorted(name for name in os.listdir(SHM_DIR) if name.startswith(prefix))


def run_cli(args: list[str], *, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`python -m image_result_client ...` in cwd (no .env there), with only the settings given."""
    clean = {name: value for name, value in os.environ.items() if name not in POOL_ENV_VARS}
    clean.update(env, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run(
        [sys.executable, "-m", "image_result_client", *args],
        check=False,
        cwd=cwd,
        env=clean,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
    )


# ---------------------------------------------------------------- the library


def test_submit_array_and_url_complete_and_look_like_their_sources(
    pool_factory: PoolFactory,
    redis_server: LocalRedis,
    queue_name: str,
    http_server: HttpServer,
    photos: dict[str, np.ndarray],
    tmp_path: Path,
) -> None:
    pool = pool_factory()
    pool.wait_ready()
    url = http_server.add("/coffee.png", png(photos["coffee"]), content_type="image/png")
    with Producer.from_url(redis_server.url, queue=queue_name) as producer:
        color = producer.submit_array(photos["astronaut"], image_id="astronaut")
        gray = producer.submit_array(photos["camera"], image_id="camera", request_id="req-camera")
        fetched = producer.submit_url(url, image_id="coffee")
        records = producer.wait([color, gray, fetched], output_dir=tmp_path / "out", timeout=WAIT)

    assert [r["request_id"] for r in records] == [color.request_id, "req-camera", fetched.request_id]
    assert [r["status"] for r in records] == ["completed"] * 3, records
    assert [r["source"] for r in records] == ["shm", "shm", "url"]
    assert (color.source, color.segment is not None, fetched.source, fetched.segment) == ("shm", True, "url", None)
    assert psnr(read_jpeg(records[0]), photos["astronaut"]) > 30
    assert psnr(read_jpeg(records[1], cv2.IMREAD_GRAYSCALE), photos["camera"]) > 30
    assert psnr(read_jpeg(records[2]), photos["coffee"]) > 30
    # Ownership passed to the pool, which unlinks each segment once its record is durable.
    wait_until(lambda: not segment_exists(color.segment) and not segment_exists(gray.segment), 10, "segments left")


def test_wait_hands_out_a_record_only_once_its_file_has_its_final_name(
    redis_server: LocalRedis, queue_name: str, photos: dict[str, np.ndarray], tmp_path: Path
) -> None:
    """The record is the commit point, appended before the ledger gives the JPEG
    its final name (a ledger killed in between leaves the file under .partial/
    until the next one publishes it at start). wait() must not hand the record
    out in that window, or a caller that opens file_path at once finds nothing.
    Here the ledger's own steps run by hand, the publication 0.3 s late."""
    output_dir = tmp_path / "out"
    prepare_output_dir(output_dir)
    partial = partial_path(output_dir, "t1-1-0", 1)
    write_partial(partial, cv2.imencode(".jpg", photos["chelsea"])[1].tobytes())
    final = output_dir / "chelsea_20261128_120000.jpg"
    completed = {"timestamp": "t", "request_id": "r1", "image_id": "chelsea", "file_path": str(final),
                 "status": "completed", "task_id": "t1-1-0", "attempts": 1}
    failed = {"timestamp": "t", "request_id": "r2", "image_id": "x", "file_path": None, "status": "failed",
              "error": "shared memory segment 'img_shm_9' does not exist", "task_id": "t2-1-0", "attempts": 1}
    ledger = ResultsFile(output_dir / "results.json")
    ledger.open()
    ledger.append([completed, failed])
    ledger.close()
    assert ResultsReader(output_dir / "results.json").find(["r1", "r2"]) == {"r2": failed}

    publisher = threading.Timer(0.3, publish, args=(partial, final))
    publisher.start()
    try:
        with Producer.from_url(redis_server.url, queue=queue_name) as producer:
            submissions = [Submission("r1", "chelsea", "shm", None), Submission("r2", "x", "shm", None)]
            records = producer.wait(submissions, output_dir=output_dir, timeout=WAIT)
            file_there_at_return = final.is_file()
    finally:
        publisher.join()
    assert records == [completed, failed]
    assert file_there_at_return, "wait() returned the record before its file had its final name"
    assert psnr(read_jpeg(records[0]), photos["chelsea"]) > 30


def test_segment_outlives_the_producer_process_until_the_pool_reads_it(
    pool_factory: PoolFactory,
    redis_server: LocalRedis,
    queue_name: str,
    photos: dict[str, np.ndarray],
    tmp_path: Path,
) -> None:
    frame_path = tmp_path / "chelsea.npy"
    np.save(frame_path, photos["chelsea"])
    done = subprocess.run(
        [sys.executable, "-c", SUBMIT_AND_EXIT, redis_server.url, queue_name, str(frame_path)],
        check=False,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
    )
    assert done.returncode == 0, done.stderr
    sent = json.loads(done.stdout)
    try:
        # The producer's resource tracker is where an unlink-at-exit would come from:
        # wait until it has finished, then the segment must still be there.
        if sent["tracker"] is not None:
            wait_until(lambda: not pid_alive(sent["tracker"]), 10, "the producer's resource tracker did not exit")
        assert segment_exists(sent["segment"]), "the segment died with its producer"
        pool = pool_factory()
        pool.wait_ready()
        submission = Submission(sent["request_id"], "chelsea", "shm", sent["segment"])
        with Producer.from_url(redis_server.url, queue=queue_name) as producer:
            [record] = producer.wait([submission], output_dir=tmp_path / "out", timeout=WAIT)
        assert record["status"] == "completed", record
        assert psnr(read_jpeg(record), photos["chelsea"]) > 30
        wait_until(lambda: not segment_exists(sent["segment"]), 10, "the pool did not unlink the segment")
    finally:
        unlink_segment(sent["segment"])


def test_unreachable_redis_raises_and_leaves_no_segment(photos: dict[str, np.ndarray]) -> None:
    prefix = f"img_shm_test_{uuid.uuid4().hex[:8]}_"
    with Producer.from_url(f"redis://127.0.0.1:{free_port()}/0", queue="nowhere") as producer:
        with pytest.raises(redis.ConnectionError):
            producer.submit_array(photos["coffee"], image_id="coffee", prefix=prefix)
        with pytest.raises(redis.ConnectionError):
            producer.submit_url("http://127.0.0.1/x.jpg", image_id="x")
    with Producer.from_url(f"redis://127.0.0.1:{free_port()}/0", queue="nowhere", host_id="a") as producer:
        with pytest.raises(redis.ConnectionError):
            producer.submit_array(photos["coffee"], image_id="coffee", prefix=prefix, fallback_url="http://127.0.0.1/x")
    assert segments_with_prefix(prefix) == []


def test_frames_the_pool_would_refuse_are_refused_before_a_segment_exists(photos: dict[str, np.ndarray]) -> None:
    prefix = f"img_shm_test_{uuid.uuid4().hex[:8]}_"
    # No Redis is needed: validation comes first.
    producer = Producer(redis.Redis(host="127.0.0.1", port=free_port()), queue="nowhere")
    for frame in (photos["coffee"].astype(np.int32), np.zeros((4, 4, 2), np.uint8), np.zeros((0, 4), np.uint8)):
        with pytest.raises(ValueError, match="frame"):
            producer.submit_array(frame, image_id="bad", prefix=prefix)
    with pytest.raises(ValueError, match="image_id"):
        producer.submit_array(photos["camera"], image_id="", prefix=prefix)
    with pytest.raises(ValueError, match="scheme"):
        producer.submit_url("file:///etc/passwd", image_id="x")
    with pytest.raises(ValueError, match="scheme"):
        producer.submit_array(photos["camera"], image_id="x", prefix=prefix, fallback_url="file:///etc/passwd")
    assert segments_with_prefix(prefix) == []


@pytest.mark.fast
def test_results_reader_follows_appends_torn_at_every_byte_and_a_repaired_tear(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    ledger = ResultsFile(path)
    ledger.open()
    records = [{"timestamp": "t", "request_id": f"r{i}", "status": "completed", "n": i} for i in range(6)]
    wanted = [r["request_id"] for r in records]
    reader = ResultsReader(path)
    assert reader.find(wanted) == {}
    ledger.append(records[:2])
    assert reader.find(wanted) == {"r0": records[0], "r1": records[1]}
    # The next append as ResultsFile writes it, torn after every byte: seen by the
    # reader that follows the file and by one that first looks at that moment.
    size = path.stat().st_size
    text = b",\n" + b",\n".join(json.dumps(r).encode() for r in records[2:4]) + b"\n]\n"
    newcomers = []
    with open(path, "r+b") as raw:
        for cut in range(len(text) + 1):
            raw.seek(size - 3)
            raw.write(text[:cut])
            raw.flush()
            newcomers.append(ResultsReader(path))
            for each in (reader, newcomers[-1]):
                seen = each.find(wanted)
                assert all(seen[rid] == records[int(rid[1:])] for rid in seen), (cut, seen)
    for each in (reader, *newcomers):
        assert set(each.find(wanted)) == {"r0", "r1", "r2", "r3"}
    ledger.close()
    # A ledger killed mid-append: the next one cuts the torn record and carries on.
    with open(path, "r+b") as raw:
        raw.seek(path.stat().st_size - 3)
        raw.write(b",\n" + json.dumps(records[4]).encode()[:20])
    reader.find(wanted)
    ledger = ResultsFile(path)
    ledger.open()
    ledger.append([records[5]])
    ledger.append([records[4]])
    assert reader.find(wanted) == {r["request_id"]: r for r in records}
    ledger.close()


def test_wait_times_out_naming_how_many_are_missing(tmp_path: Path) -> None:
    ledger = ResultsFile(tmp_path / "results.json")
    ledger.open()
    ledger.append([{"timestamp": "t", "request_id": "here", "image_id": "a", "status": "completed"}])
    ledger.close()
    producer = Producer(redis.Redis(host="127.0.0.1", port=free_port()), queue="nowhere")
    submissions = [Submission("here", "a", "url", None), Submission("gone", "b", "url", None)]
    with pytest.raises(WaitTimeout, match="1 of 2 submissions have no record") as caught:
        producer.wait(submissions, output_dir=tmp_path, timeout=0.2)
    assert caught.value.missing == ["gone"]
    assert [r["request_id"] for r in caught.value.records] == ["here"]


# ---------------------------------------------------------------- several hosts


def test_a_frame_for_a_served_host_goes_to_its_queue_and_is_read_from_shared_memory(
    pool_factory: PoolFactory,
    redis_server: LocalRedis,
    queue_name: str,
    http_server: HttpServer,
    photos: dict[str, np.ndarray],
    tmp_path: Path,
    shm_prefix: str,
) -> None:
    """A pool serves host a's queue: the task goes there, and the pool reads the
    segment (the fallback URL, another picture, is never fetched) and unlinks it."""
    pool = pool_factory(workers=1, env={"HOST_ID": "a", "HOST_QUEUE": "true"})
    pool.wait_ready()
    url = http_server.add("/coffee.png", png(photos["coffee"]), content_type="image/png")
    with Producer.from_url(redis_server.url, queue=queue_name, host_id="a") as producer, \
            Producer.from_url(redis_server.url, queue=queue_name, host_id="b") as for_b:
        assert producer.host_is_served() and not for_b.host_is_served()
        sent = producer.submit_array(photos["astronaut"], image_id="astronaut", prefix=shm_prefix, fallback_url=url)
        assert (sent.source, sent.queue) == ("shm", QueueKeys(queue_name).host("a"))
        [record] = producer.wait([sent], output_dir=tmp_path / "out", timeout=WAIT)
    assert record["status"] == "completed" and record["source"] == "shm", record
    assert psnr(read_jpeg(record), photos["astronaut"]) > 30
    assert http_server.hits("/coffee.png") == 0
    wait_until(lambda: not segment_exists(sent.segment), 10, "the pool did not unlink the segment")
    assert pool.stop() == 0


def test_a_frame_for_an_unserved_host_goes_by_its_url_to_any_host(
    pool_factory: PoolFactory,
    redis_client: redis.Redis,
    redis_server: LocalRedis,
    queue_name: str,
    http_server: HttpServer,
    photos: dict[str, np.ndarray],
    tmp_path: Path,
    shm_prefix: str,
) -> None:
    """No pool serves host b: the task goes to the shared queue without its
    segment, which the producer unlinks at once, and a pool on host a
    downloads the picture."""
    keys = QueueKeys(queue_name)
    url = http_server.add("/coffee.png", png(photos["coffee"]), content_type="image/png")
    with Producer.from_url(redis_server.url, queue=queue_name, host_id="b") as producer:
        assert not producer.host_is_served()
        sent = producer.submit_array(photos["astronaut"], image_id="page", prefix=shm_prefix, fallback_url=url)
        assert (sent.source, sent.segment, sent.queue) == ("url", None, queue_name)
        assert segments_with_prefix(shm_prefix) == [], "a segment nobody will read was left"
        assert redis_client.llen(keys.host("b")) == 0
        [raw] = redis_client.lrange(queue_name, 0, -1)
        assert json.loads(raw) == {"request_id": sent.request_id, "image_id": "page", "image_url": url}
        pool = pool_factory(workers=1, env={"HOST_ID": "a", "HOST_QUEUE": "true"})
        pool.wait_ready()
        [record] = producer.wait([sent], output_dir=tmp_path / "out", timeout=WAIT)
    assert record["status"] == "completed" and record["source"] == "url", record
    assert psnr(read_jpeg(record), photos["coffee"]) > 30
    assert http_server.hits("/coffee.png") == 1
    assert pool.stop() == 0


def test_without_a_fallback_url_a_frame_waits_in_its_hosts_queue(
    pool_factory: PoolFactory,
    redis_client: redis.Redis,
    redis_server: LocalRedis,
    queue_name: str,
    photos: dict[str, np.ndarray],
    tmp_path: Path,
    shm_prefix: str,
) -> None:
    """No pool serves host b, and without a URL the task can only run there: it
    waits in b's queue, its segment kept, until b's pool is back."""
    keys = QueueKeys(queue_name)
    with Producer.from_url(redis_server.url, queue=queue_name, host_id="b") as producer:
        assert not producer.host_is_served()
        sent = producer.submit_array(photos["chelsea"], image_id="chelsea", prefix=shm_prefix)
        assert (sent.source, sent.queue) == ("shm", keys.host("b")) and segment_exists(sent.segment)
        assert redis_client.llen(keys.host("b")) == 1 and redis_client.llen(queue_name) == 0
        pool = pool_factory(workers=1, env={"HOST_ID": "b", "HOST_QUEUE": "true"})
        pool.wait_ready()
        assert producer.host_is_served()
        [record] = producer.wait([sent], output_dir=tmp_path / "out", timeout=WAIT)
    assert record["status"] == "completed" and record["source"] == "shm", record
    assert psnr(read_jpeg(record), photos["chelsea"]) > 30
    wait_until(lambda: not segment_exists(sent.segment), 10, "the pool did not unlink the segment")
    assert pool.stop() == 0


def test_without_a_host_id_the_fallback_url_rides_along_on_the_shared_queue(
    redis_client: redis.Redis, redis_server: LocalRedis, queue_name: str, photos: dict[str, np.ndarray], shm_prefix: str
) -> None:
    """One host: the message carries both, and the pool prefers the segment."""
    url = "http://127.0.0.1/camera.png"
    with Producer.from_url(redis_server.url, queue=queue_name) as producer:
        assert producer.host_is_served()
        sent = producer.submit_array(photos["camera"], image_id="camera", prefix=shm_prefix, fallback_url=url)
    assert (sent.source, sent.queue) == ("shm", queue_name) and segment_exists(sent.segment)
    [raw] = redis_client.lrange(queue_name, 0, -1)
    message = json.loads(raw)
    assert message["image_url"] == url and message["shm_info"]["shm_name"] == sent.segment


def test_a_push_to_a_served_hosts_queue_that_fails_leaves_no_segment(
    redis_client: redis.Redis, redis_server: LocalRedis, queue_name: str, photos: dict[str, np.ndarray], shm_prefix: str
) -> None:
    keys = QueueKeys(queue_name)
    redis_client.script_load(PUSH_FOR_HOST_SCRIPT)  # as a serving pool's lease renewal does
    redis_client.set(keys.live_host("a"), b"instance1", px=60_000)
    redis_client.set(keys.host("a"), b"not a list")  # the script's RPUSH fails with WRONGTYPE
    with Producer.from_url(redis_server.url, queue=queue_name, host_id="a") as producer:
        with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
            producer.submit_array(photos["coffee"], image_id="coffee", prefix=shm_prefix, fallback_url="http://x/c.png")
    assert segments_with_prefix(shm_prefix) == []
    assert redis_client.llen(queue_name) == 0


# ---------------------------------------------------------------- the CLI


def test_cli_enqueue_wait_reports_every_record(
    pool_factory: PoolFactory,
    redis_server: LocalRedis,
    queue_name: str,
    http_server: HttpServer,
    photos: dict[str, np.ndarray],
    tmp_path: Path,
) -> None:
    pool = pool_factory()
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    cv2.imwrite(str(inputs / "astronaut.png"), photos["astronaut"])
    cv2.imwrite(str(inputs / "camera.jpg"), photos["camera"])
    url = http_server.add("/chelsea.png", png(photos["chelsea"]), content_type="image/png")
    pool.wait_ready()
    env = {"REDIS_URL": redis_server.url, "HOSTING_TASKS_QUEUE": queue_name, "OUTPUT_DIR": str(tmp_path / "out")}
    args = ["enqueue", "--wait", "--timeout", str(WAIT), str(inputs / "astronaut.png"), str(inputs / "camera.jpg"), url]

    done = run_cli(args, cwd=inputs, env=env)

    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 3, done.stdout
    assert all(line.split()[0] == "completed" for line in lines), done.stdout
    files = [Path(line.split()[2]) for line in lines]
    assert [f.name.rsplit("_", 2)[0] for f in files] == ["astronaut", "camera", "chelsea"]
    assert all(f.is_file() for f in files)
    assert "3/3 done, 0 failed" in done.stderr.splitlines()[-1]


def test_cli_enqueue_wait_from_another_directory_follows_the_results_stream(
    pool_factory: PoolFactory, redis_server: LocalRedis, queue_name: str, photos: dict[str, np.ndarray], tmp_path: Path
) -> None:
    """The installed client, run anywhere but the pool's directory (OUTPUT_DIR is
    relative there, or not set at all), still sees its records: through the
    pool's results stream in Redis."""
    pool = pool_factory()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cv2.imwrite(str(elsewhere / "coffee.png"), photos["coffee"])
    pool.wait_ready()
    env = {"REDIS_URL": redis_server.url, "HOSTING_TASKS_QUEUE": queue_name}

    done = run_cli(["enqueue", "--wait", "--timeout", "20", "coffee.png"], cwd=elsewhere, env=env)

    assert done.returncode == 0, done.stdout + done.stderr
    [line] = done.stdout.splitlines()
    assert line.split()[0] == "completed" and Path(line.split()[2]).parent == pool.output_dir, line
    assert not (elsewhere / "output").exists()


@pytest.mark.parametrize("where", ["output_dir", "stream"])
def test_cli_enqueue_wait_says_at_once_where_it_sees_no_records(
    redis_client: redis.Redis, redis_server: LocalRedis, queue_name: str, tmp_path: Path, where: str
) -> None:
    """No results.json in --output-dir, or no results stream in Redis: a note
    before the wait, not a silent timeout."""
    env = {"REDIS_URL": redis_server.url, "HOSTING_TASKS_QUEUE": queue_name, "RESULTS_STREAM": f"{queue_name}:results"}
    options = ["--output-dir", str(tmp_path / "not-the-pools")] if where == "output_dir" else []

    done = run_cli(["enqueue", "--wait", "--timeout", "1", *options, "http://127.0.0.1:9/a.png"], cwd=tmp_path, env=env)

    assert done.returncode == 1, done.stdout + done.stderr
    first = done.stderr.splitlines()[0]
    expected = f"no results.json in {tmp_path / 'not-the-pools'}" if where == "output_dir" else "no results stream"
    assert expected in first, done.stderr
    assert redis_client.llen(queue_name) == 1


@pytest.mark.parametrize(
    ("argument", "message"),
    [
        ("missing.png", "not a readable file"),
        ("notes.png", "not an image"),
        ("ftp://host/a.png", "scheme"),
        ("\udcffbad.png", "not UTF-8"),  # the byte 0xff: OpenCV crashed (a segfault) on the name
    ],
)
def test_cli_usage_errors_exit_2_with_one_line_and_queue_nothing(
    redis_client: redis.Redis,
    redis_server: LocalRedis,
    queue_name: str,
    photos: dict[str, np.ndarray],
    tmp_path: Path,
    argument: str,
    message: str,
) -> None:
    cv2.imwrite(str(tmp_path / "good.png"), photos["camera"])
    (tmp_path / "notes.png").write_text("not a picture\n")
    os.link(tmp_path / "good.png", os.fsencode(tmp_path) + b"/\xffbad.png")
    env = {"REDIS_URL": redis_server.url, "HOSTING_TASKS_QUEUE": queue_name}

    done = run_cli(["enqueue", "good.png", argument], cwd=tmp_path, env=env)

    assert done.returncode == 2, done.stdout + done.stderr
    assert len(done.stderr.splitlines()) == 1 and message in done.stderr, done.stderr
    assert redis_client.llen(queue_name) == 0  # checked before anything was queued


def test_cli_dotenv_that_is_not_text_exits_2_with_one_line_and_queues_nothing(
    redis_client: redis.Redis, queue_name: str, photos: dict[str, np.ndarray], tmp_path: Path
) -> None:
    cv2.imwrite(str(tmp_path / "good.png"), photos["camera"])
    (tmp_path / ".env").write_bytes(b"\xff\xfeHOSTING_TASKS_QUEUE=" + queue_name.encode() + b"\n")

    done = run_cli(["enqueue", "good.png"], cwd=tmp_path, env={})

    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.strip() == "image-result-client: .env is not UTF-8 text (byte 0)"
    assert redis_client.llen(queue_name) == 0


def test_cli_unreachable_redis_exits_1_with_one_line_and_no_segment(
    photos: dict[str, np.ndarray], tmp_path: Path
) -> None:
    cv2.imwrite(str(tmp_path / "coffee.png"), photos["coffee"])
    prefix = f"img_shm_test_{uuid.uuid4().hex[:8]}_"
    url = f"redis://:secret@127.0.0.1:{free_port()}/0"

    done = run_cli(["enqueue", "--shm-prefix", prefix, "--redis-url", url, "coffee.png"], cwd=tmp_path, env={})

    assert done.returncode == 1, done.stdout + done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert "Traceback" not in done.stderr and "cannot reach Redis" in done.stderr, done.stderr
    assert "secret" not in done.stderr
    assert segments_with_prefix(prefix) == []


def test_wait_through_the_results_stream_from_any_host(
    pool_factory: PoolFactory, redis_server: LocalRedis, queue_name: str, photos: dict[str, np.ndarray]
) -> None:
    """Without access to OUTPUT_DIR, wait() follows the pool's RESULTS_STREAM,
    and only records after the first submission count."""
    stream = f"{queue_name}:results"
    pool = pool_factory(env={"RESULTS_STREAM": stream})
    pool.wait_ready()
    with Producer.from_url(redis_server.url, queue=queue_name, results_stream=stream) as producer:
        earlier = producer.submit_array(photos["chelsea"], image_id="earlier", request_id="req-1")
        producer.wait([earlier], timeout=WAIT)
    with Producer.from_url(redis_server.url, queue=queue_name, results_stream=stream) as producer:
        sent = [producer.submit_array(photos["coffee"], image_id=f"page_{i}", request_id=f"req-{i}") for i in (1, 2)]
        records = producer.wait(sent, timeout=WAIT)
    assert [r["request_id"] for r in records] == ["req-1", "req-2"]
    assert all(r["status"] == "completed" and r["image_id"].startswith("page_") for r in records)
    assert pool.stop() == 0


def test_wait_takes_the_first_record_of_the_submitted_image_not_a_later_copy(
    redis_client: redis.Redis, redis_server: LocalRedis, queue_name: str
) -> None:
    """Anyone who can push can reuse a request_id they saw in the results
    stream; the record of that copy, later or of another image, is not this
    submission's."""
    stream = f"{queue_name}:results"
    mine = Submission(request_id="req-1", image_id="page-1", source="url", segment=None)
    other = Submission(request_id="req-2", image_id="page-2", source="url", segment=None)
    with Producer.from_url(redis_server.url, queue=queue_name, results_stream=stream) as producer:
        producer.submit_url("http://127.0.0.1/never-fetched.png", image_id="page-0")  # notes where the stream starts
        for record in (
            {"request_id": "req-2", "image_id": "evil", "status": "completed"},  # an impostor first
            {"request_id": "req-1", "image_id": "page-1", "status": "completed"},
            {"request_id": "req-1", "image_id": "evil", "status": "completed"},  # an impostor later
            {"request_id": "req-2", "image_id": "page-2", "status": "failed"},
        ):
            redis_client.xadd(stream, {"record": json.dumps(record)})
        found = producer.wait([mine, other], timeout=WAIT)
    assert [(r["image_id"], r["status"]) for r in found] == [("page-1", "completed"), ("page-2", "failed")]
