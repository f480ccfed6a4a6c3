"""A queue message is untrusted input (docs/security.md). Each attack here is
one message, or a few, pushed into a real pool among good tasks, against real
shared memory and a real redis-server: none may read or remove what is not the
pipeline's, stop or stall the pool, take another task's identity or name a key
to write; each ends as a failed record and a dead letter, and the good tasks
are served.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from harness.photos import photo_of_size
from harness.segments import SegmentTracker
from image_result_client.protocol import SHM_DIR, QueueKeys
from shared.imaging.segments import SegmentAccess, SegmentRefused, open_segment, unlink_segment
from tests.conftest import PoolFactory
from tests.helpers import dead_letters, push, wait_for_records, wait_until

WAIT = 60.0
# A few seconds: what refusing a FIFO takes is a system call, not TASK_TIMEOUT.
TASK_TIMEOUT = "30"


class Planted:
    """Files in /dev/shm that are not the pipeline's segments; all removed at teardown."""

    def __init__(self) -> None:
        self.paths: list[Path] = []

    def file(self, name: str, data: bytes = b"victim state " * 1000, *, uid: int | None = None) -> Path:
        path = self._track(name)
        path.write_bytes(data)
        if uid is not None:
            os.chown(path, uid, -1)
        return path

    def directory(self, name: str) -> Path:
        path = self._track(name)
        path.mkdir()
        return path

    def fifo(self, name: str) -> Path:
        path = self._track(name)
        os.mkfifo(path)
        return path

    def symlink(self, name: str, target: Path) -> Path:
        path = self._track(name)
        path.symlink_to(target)
        return path

    def hardlink(self, name: str, target: Path) -> Path:
        path = self._track(name)
        os.link(target, path)
        return path

    def _track(self, name: str) -> Path:
        path = SHM_DIR / name
        self.paths.append(path)
        return path

    def cleanup(self) -> None:
        for path in self.paths:
            if path.is_dir() and not path.is_symlink():
                path.rmdir()
            elif os.path.lexists(path):
                path.unlink()


@pytest.fixture
def planted() -> Iterator[Planted]:
    files = Planted()
    try:
        yield files
    finally:
        files.cleanup()


def unique(stem: str) -> str:
    return f"{stem}_{uuid.uuid4().hex[:8]}"


def shm_task(request_id: str, name: str, *, shape: list[int] | None = None, dtype: str = "uint8") -> dict:
    return {"request_id": request_id, "image_id": request_id,
            "shm_info": {"shm_name": name, "shape": shape or [16, 16, 3], "dtype": dtype}}


# ------------------------------------------------------------ decisions, in-process


@pytest.mark.fast
def test_only_prefixed_regular_files_of_allowed_owners_are_opened(planted: Planted) -> None:
    access = SegmentAccess("img_shm_", frozenset({os.getuid()}))
    victim = planted.file(unique("victim_app_state"))
    with pytest.raises(SegmentRefused, match="SHM_NAME_PREFIX"):
        open_segment(victim.name, access)
    for path in (planted.directory(unique("img_shm_dir")), planted.fifo(unique("img_shm_fifo")),
                 planted.file(unique("img_shm_foreign"), uid=54321)):
        with pytest.raises(SegmentRefused):
            open_segment(path.name, access)
    with pytest.raises(SegmentRefused, match="symbolic link"):
        open_segment(planted.symlink(unique("img_shm_link"), victim).name, access)
    with pytest.raises(SegmentRefused, match="2 names"):
        open_segment(planted.hardlink(unique("img_shm_hardlink"), victim).name, access)
    fd, size = open_segment(planted.file(unique("img_shm_ok"), b"x" * 10).name, access)
    os.close(fd)
    assert size == 10


@pytest.mark.fast
def test_unlink_leaves_anything_not_ours_and_never_raises(planted: Planted) -> None:
    access = SegmentAccess("img_shm_", frozenset({os.getuid()}))
    victim = planted.file(unique("victim_app_state"))
    kept = [victim, planted.directory(unique("img_shm_dir")), planted.fifo(unique("img_shm_fifo")),
            planted.file(unique("img_shm_foreign"), uid=54321), planted.symlink(unique("img_shm_link"), victim)]
    for path in kept:
        assert unlink_segment(path.name, access) not in ("unlinked", "gone")
        assert os.path.lexists(path)
    # A second name of a file of ours: unlinking it removes that name only, and the file stays whole.
    link = planted.hardlink(unique("img_shm_hardlink"), victim)
    assert unlink_segment(link.name, access) == "unlinked" and not os.path.lexists(link)
    assert victim.read_bytes() == b"victim state " * 1000 and victim.stat().st_nlink == 1
    assert unlink_segment(unique("img_shm_missing"), access) == "gone"
    ours = planted.file(unique("img_shm_ours"))
    assert unlink_segment(ours.name, access) == "unlinked" and not ours.exists()


@pytest.mark.fast
def test_an_empty_prefix_accepts_any_name(planted: Planted) -> None:
    access = SegmentAccess("", frozenset({os.getuid()}))
    fd, _ = open_segment(planted.file(unique("any_name")).name, access)
    os.close(fd)


# ------------------------------------------------------------ a real pool


def test_no_message_reads_or_removes_another_programs_shared_memory(
    pool_factory: PoolFactory, redis_client: redis.Redis, queue_name: str, segments: SegmentTracker,
    planted: Planted, tmp_path: Path,
) -> None:
    victim_bytes = bytes(range(256)) * 3  # a 16x16x3 uint8 frame's worth: readable as an image
    victim = planted.file(unique("victim_app_state"), victim_bytes)
    semaphore = planted.file(unique("sem.app_lock"), b"\0" * 32)
    directory = planted.directory(unique("img_shm_dir"))
    fifo = planted.fifo(unique("img_shm_fifo"))
    foreign = planted.file(unique("img_shm_foreign"), victim_bytes, uid=54321)
    link = planted.symlink(unique("img_shm_link"), victim)
    # A ledger killed before it finished its unlinks left these names for the next one.
    out = tmp_path / "out"
    out.mkdir()
    (out / ".unlink-pending").write_text("\n".join([victim.name, directory.name, fifo.name, foreign.name]))

    attacks = {
        "victim": shm_task("victim", victim.name),
        "victim-slash": shm_task("victim-slash", "/" + victim.name),
        "semaphore": shm_task("semaphore", semaphore.name, shape=[4, 8]),
        "directory": shm_task("directory", directory.name),
        "fifo": shm_task("fifo", fifo.name),
        "foreign": shm_task("foreign", foreign.name),
        "link": shm_task("link", link.name),
        "bad-dtype": shm_task("bad-dtype", victim.name, dtype="int64"),
        "absurd-shape": shm_task("absurd-shape", victim.name, shape=[1, 10**9]),
        "legacy-name": {"request_id": "legacy-name", "image_id": "legacy-name", "shm_info": victim.name},
    }
    for message in attacks.values():
        push(redis_client, queue_name, message)
    push(redis_client, queue_name, '{"request_id": "not-json", "shm_info": {"shm_name": "%s"' % victim.name)
    push(redis_client, queue_name, segments.message("good", "good", photo_of_size(64, 64)))

    pool = pool_factory(workers=2, env={"TASK_TIMEOUT": TASK_TIMEOUT}, output_dir=out)
    records = {r["request_id"]: r for r in wait_for_records(out, len(attacks) + 2, WAIT, pool=pool)}
    assert pool.stop() == 0

    assert records["good"]["status"] == "completed"
    for request_id in [*attacks, "not-json"]:
        assert records[request_id]["status"] == "failed", records[request_id]
    assert "SHM_NAME_PREFIX" in records["victim"]["error"]
    assert "SHM_NAME_PREFIX" in records["semaphore"]["error"]
    assert "not a regular file" in records["directory"]["error"]
    assert "not a regular file" in records["fifo"]["error"]
    assert "owned by uid 54321" in records["foreign"]["error"]
    assert "symbolic link" in records["link"]["error"]
    # Nothing of theirs was encoded into OUTPUT_DIR or removed.
    assert [p.name for p in out.glob("*.jpg")] == [Path(records["good"]["file_path"]).name]
    assert victim.read_bytes() == victim_bytes and semaphore.exists() and foreign.exists()
    assert directory.is_dir() and stat.S_ISFIFO(fifo.lstat().st_mode) and link.is_symlink()
    assert len(dead_letters(redis_client, queue_name)) == len(attacks) + 1
    assert not [e for e in pool.events("child_died") if e.get("role") == "ledger"]
    assert pool.events("segment_not_unlinked")  # the replayed names, left alone and said so
    assert not segments.leftovers()  # the pipeline's own segment was unlinked as before


def test_messages_that_look_like_the_pools_envelopes_are_only_messages(
    pool_factory: PoolFactory, redis_client: redis.Redis, queue_name: str, segments: SegmentTracker,
) -> None:
    """Forged envelopes once took guessed task ids (so that later tasks were
    dropped as duplicates), named any key for a requeue to push onto, and
    slipped a 1.5 MB body past MAX_MESSAGE_BYTES into the ledger."""
    keys = QueueKeys(queue_name)
    pool = pool_factory(workers=2, env={"MAX_MESSAGE_BYTES": "4096"})
    pool.wait_ready()
    push(redis_client, queue_name, segments.message("first", "first", photo_of_size(32, 32)))
    (first,) = wait_for_records(pool.output_dir, 1, WAIT, pool=pool)
    guessed = first["task_id"]
    body = json.dumps(segments.message("stolen", "stolen", photo_of_size(32, 32))).encode()
    forged = [
        b"irw2 %s 1 %d s\n%s" % (guessed.encode(), len(body), body),
        b"irw1 %s 1 %d {other_app}:jobs\n%s" % (guessed.encode(), len(body), body),
        b"irw1 big-1-1 1 9999999 %s\n" % queue_name.encode() + b"x" * 1_500_000,
    ]
    for message in forged:
        push(redis_client, queue_name, message)
    push(redis_client, queue_name, segments.message("after", "after", photo_of_size(32, 32)))

    records = wait_for_records(pool.output_dir, 1 + len(forged) + 1, WAIT, pool=pool)
    assert pool.stop() == 0

    by_id = {r["task_id"]: r for r in records}
    assert len(by_id) == len(records) == 1 + len(forged) + 1  # every message its own task
    completed = [r["request_id"] for r in records if r["status"] == "completed"]
    assert completed == ["first", "after"]
    failed = [r for r in records if r["status"] == "failed"]
    assert len(failed) == len(forged)
    assert any("larger than MAX_MESSAGE_BYTES" in r["error"] for r in failed)
    assert all(r["task_id"] != guessed for r in records[1:])
    assert not redis_client.exists("{other_app}:jobs")
    assert redis_client.llen(queue_name) == 0 and redis_client.zcard(keys.delayed) == 0


def test_after_sigterm_under_load_the_queue_holds_exactly_the_producers_bytes(
    pool_factory: PoolFactory, redis_client: redis.Redis, queue_name: str, segments: SegmentTracker,
) -> None:
    frame = photo_of_size(1024, 1024)
    pushed = [json.dumps(segments.message(f"t{n}", f"t{n}", frame)).encode() for n in range(300)]
    redis_client.rpush(queue_name, *pushed)
    pool = pool_factory(workers=2)
    pool.wait_ready()
    wait_until(lambda: len(pool.output_dir.joinpath("results.json").read_bytes()) > 1000
               if pool.output_dir.joinpath("results.json").exists() else False, WAIT, "no records")
    assert pool.stop(signal.SIGTERM) == 0

    done = {r["request_id"] for r in wait_for_records(pool.output_dir, 1, WAIT)}
    left = redis_client.lrange(queue_name, 0, -1)
    assert 0 < len(left) and len(done) + len(left) == len(pushed)
    assert sorted(left) == sorted(m for m in pushed if json.loads(m)["request_id"] not in done)
    assert len(set(left)) == len(left)  # each once


def test_a_hanging_download_costs_the_tasks_done_before_it_nothing(
    pool_factory: PoolFactory, redis_client: redis.Redis, queue_name: str, segments: SegmentTracker, http_server,
) -> None:
    """Under a backlog a worker holds finished records a moment to send them
    together. A download that hangs its worker until TASK_TIMEOUT once took
    those records with it: the tasks were done again, each charged a delivery
    (with MAX_ATTEMPTS=1, failed as "gave up"). Records go before a download."""
    hang = http_server.trickle("/hang.png", interval=0.5)
    frame = photo_of_size(32, 32)
    for n in range(40):
        if n == 6:
            push(redis_client, queue_name, {"request_id": "hang", "image_id": "hang", "image_url": hang})
        push(redis_client, queue_name, segments.message(f"t{n}", f"t{n}", frame))
    pool = pool_factory(workers=1, env={"TASK_TIMEOUT": "2", "URL_READ_TIMEOUT": "120", "MAX_ATTEMPTS": "1"})
    records = {r["request_id"]: r for r in wait_for_records(pool.output_dir, 41, WAIT, pool=pool)}
    assert pool.stop() == 0
    assert pool.events("worker_hung")  # the download did hang its worker
    assert records["hang"]["status"] == "failed"
    done = {rid: (r["status"], r["attempts"]) for rid, r in records.items() if rid != "hang"}
    assert done == {f"t{n}": ("completed", 1) for n in range(40)}


NOBODY = 65534


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as a second uid")
def test_a_link_another_uid_made_to_a_segment_fails_its_task_and_leaks_nothing_of_ours(
    pool_factory: PoolFactory, redis_client: redis.Redis, queue_name: str, segments: SegmentTracker,
    planted: Planted,
) -> None:
    """A producer's segment is 0666; nobody (a real second uid) links it under a
    name of its own. The task is refused (a file with two names may be a link to
    anything of ours), and the name the producer handed over is unlinked all the
    same: unlinking removes that name alone. nobody's link, not ours, stays."""
    name = segments.make(photo_of_size(16, 16))
    os.chmod(SHM_DIR / name, 0o666)
    theirs = SHM_DIR / unique("their_link")
    planted.paths.append(theirs)
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 1
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            os.link(SHM_DIR / name, theirs)
            status = 0
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and theirs.exists(), "nobody could not link the segment"
    pool = pool_factory(workers=1)
    pool.wait_ready()
    push(redis_client, queue_name, shm_task("linked", name))
    (record,) = wait_for_records(pool.output_dir, 1, WAIT, pool=pool)
    assert record["status"] == "failed" and "has 2 names" in record["error"], record
    wait_until(lambda: not (SHM_DIR / name).exists(), 10, "the name handed over leaked")
    assert pool.stop() == 0
    assert theirs.exists() and theirs.stat().st_nlink == 1, "nobody's own link is not ours to remove"
