"""Another uid in OUTPUT_DIR cannot make a record name a file the pool did not write.

The attacker is a real second uid (nobody, 65534: the tests run as root and a
forked child drops to it). Its directories live under a 0755 directory of
their own, because pytest's tmp_path is 0700 and nobody could not reach it.
- At start the pool refuses a .partial that is a symbolic link or another uid's,
  and an OUTPUT_DIR others may write without the sticky bit, unless
  OUTPUT_DIR_ALLOW_SHARED=true.
- A symlink planted on a record's final name while the ledger is down never
  becomes the recorded file, and the pool's own JPEG is not deleted.
- A publication that fails retries the task: no completed record names a file
  that is not there.
- A ledger killed between publishing and appending leaves no file without a record.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import pytest
import redis

from harness.pool import environment_without
from harness.results import read_results
from harness.segments import SegmentTracker
from shared.storage.results_file import ResultsFile
from tests.conftest import PoolFactory
from tests.helpers import (
    REPO_ROOT,
    assert_exactly_once,
    push_photos,
    wait_for_queue_drained,
    wait_for_records,
    wait_until,
)

NOBODY = 65534
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as a second uid")


def as_nobody(action: Callable[[], None]) -> str:
    """Run action in a forked child as uid/gid 65534; returns '' or the error it raised."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            action()
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            os.write(write_end, f"{exc.__class__.__name__}: {exc}".encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        error = reader.read().decode()
    os.waitpid(pid, 0)
    return error


@pytest.fixture
def shared_home() -> Iterator[Path]:
    """A 0755 directory that nobody can reach, removed afterwards."""
    home = Path(tempfile.mkdtemp(prefix="irw-shared-"))
    home.chmod(0o755)
    try:
        yield home
    finally:
        shutil.rmtree(home, ignore_errors=True)


def start_supervisor(output_dir: Path, redis_url: str, queue: str, **env: str) -> subprocess.CompletedProcess:
    """The supervisor as an operator starts it; these tests expect it to refuse, at once."""
    environment = environment_without()
    environment.update(REDIS_URL=redis_url, HOSTING_TASKS_QUEUE=queue, OUTPUT_DIR=str(output_dir), WORKERS="1", **env)
    return subprocess.run([sys.executable, "supervisor.py"], cwd=REPO_ROOT, env=environment, capture_output=True,
                          text=True, timeout=30)


def assert_refused(result: subprocess.CompletedProcess, *fragments: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, (result.returncode, result.stderr[-2000:])
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ---------------------------------------------------------------- at start


def test_a_partial_folder_that_is_a_link_elsewhere_is_refused(
    shared_home: Path, redis_server, queue_name: str
) -> None:
    output_dir = shared_home / "out"
    output_dir.mkdir(mode=0o755)
    elsewhere = shared_home / "elsewhere"
    elsewhere.mkdir(mode=0o777)
    (output_dir / ".partial").symlink_to(elsewhere)
    result = start_supervisor(output_dir, redis_server.url, queue_name)
    assert_refused(result, "OUTPUT_DIR=", ".partial' is a symbolic link")
    assert list(elsewhere.iterdir()) == [], "nothing was written through the link"


def test_a_partial_folder_of_another_uid_is_refused(shared_home: Path, redis_server, queue_name: str) -> None:
    output_dir = shared_home / "out"
    output_dir.mkdir(mode=0o755)
    (output_dir / ".partial").mkdir(mode=0o755)
    os.chown(output_dir / ".partial", NOBODY, NOBODY)
    assert_refused(start_supervisor(output_dir, redis_server.url, queue_name), f"owned by uid {NOBODY}")


@pytest.mark.parametrize("mode", [0o777, 0o775])
def test_an_output_dir_others_may_write_is_refused_unless_allowed(
    mode: int, shared_home: Path, redis_server, queue_name: str, pool_factory: PoolFactory
) -> None:
    output_dir = shared_home / "out"
    output_dir.mkdir()
    output_dir.chmod(mode)
    assert_refused(start_supervisor(output_dir, redis_server.url, queue_name), "OUTPUT_DIR_ALLOW_SHARED=true",
                   f"mode {mode:o} without the sticky bit")
    pool = pool_factory(workers=1, output_dir=output_dir, env={"OUTPUT_DIR_ALLOW_SHARED": "true"})
    pool.wait_ready()
    assert pool.stop() == 0
    assert stat.S_IMODE((output_dir / ".partial").stat().st_mode) == 0o755, "the pool's own folder is its own"


def test_a_sticky_output_dir_is_accepted(shared_home: Path, pool_factory: PoolFactory) -> None:
    output_dir = shared_home / "out"
    output_dir.mkdir()
    output_dir.chmod(0o1777)
    pool = pool_factory(workers=1, output_dir=output_dir)
    pool.wait_ready()
    assert pool.stop() == 0


# ---------------------------------------------------------------- while running


def test_a_symlink_planted_on_a_final_name_never_becomes_the_recorded_file(
    shared_home: Path, pool_factory: PoolFactory, redis_client: redis.Redis, queue_name: str,
    segments: SegmentTracker,
) -> None:
    """The whole host dies right after the ledger appended its first batch. Before
    the pool is back, nobody (OUTPUT_DIR is sticky and world-writable, as /tmp)
    plants a symlink on each completed record's final name, where it can."""
    output_dir = shared_home / "out"
    output_dir.mkdir()
    output_dir.chmod(0o1777)
    target = shared_home / "attacker.jpg"
    target.write_bytes(b"not the pool's")
    os.chown(target, NOBODY, NOBODY)
    request_ids = push_photos(redis_client, queue_name, segments, 6, size=(256, 256))
    crash = {"IRW_CRASH_AT": "ledger_after_append", "IRW_CRASH_HOST": "true",
             "IRW_CRASH_MARKER": str(shared_home / "crashed"), "LEASE_TTL": "2"}
    first = pool_factory(workers=2, env=crash, output_dir=output_dir)
    wait_until(lambda: first.poll() is not None, 30, "the host never reached its commit point")
    recorded = [r for r in read_results(output_dir) if r["status"] == "completed"]
    assert recorded, "the host died before its first commit"
    for record in recorded:
        final = Path(record["file_path"])
        if not os.path.lexists(final):  # a name the pool had not taken yet: plant it
            assert as_nobody(lambda final=final: final.symlink_to(target)) == ""

    second = pool_factory(workers=2, env={"LEASE_TTL": "2"}, output_dir=output_dir)
    second.wait_ready()
    wait_for_records(output_dir, len(request_ids), timeout=60, pool=second)
    wait_for_queue_drained(redis_client, queue_name)
    assert second.stop() == 0
    for record in read_results(output_dir):
        final = Path(record["file_path"])
        assert not final.is_symlink(), f"{final.name} is the attacker's symlink"
        status = final.stat()
        assert stat.S_ISREG(status.st_mode) and status.st_uid == os.geteuid(), final
        assert cv2.imread(str(final)) is not None, f"{final.name} is not the pool's JPEG"
    assert target.read_bytes() == b"not the pool's", "the symlink's target was written through"
    assert_exactly_once(output_dir, request_ids, redis_client, queue_name)


def test_a_publication_that_fails_retries_the_task_instead_of_recording_it(
    tmp_path: Path, pool_factory: PoolFactory, redis_client: redis.Redis, queue_name: str,
    segments: SegmentTracker,
) -> None:
    """OUTPUT_DIR is made immutable (chattr +i) under a running pool: no file can
    get its final name. The tasks wait as retries, never as completed records;
    once the directory is writable again they complete, each exactly once."""
    if shutil.which("chattr") is None:
        pytest.skip("chattr is not installed")
    output_dir = tmp_path / "out"
    pool = pool_factory(workers=1, output_dir=output_dir, env={"MAX_ATTEMPTS": "20"})
    pool.wait_ready()
    subprocess.run(["chattr", "+i", str(output_dir)], check=True)
    try:
        request_ids = push_photos(redis_client, queue_name, segments, 3, size=(128, 128))
        wait_until(lambda: len(pool.events("publish_failed")) >= 3, 30, "no publication was tried")
        assert [r for r in read_results(output_dir) if r["status"] == "completed"] == [], (
            "a completed record names a file that has no such name"
        )
    finally:
        subprocess.run(["chattr", "-i", str(output_dir)], check=True)
    records = wait_for_records(output_dir, len(request_ids), timeout=90, pool=pool)
    assert all(r["status"] == "completed" and Path(r["file_path"]).is_file() for r in records), records
    wait_for_queue_drained(redis_client, queue_name)
    assert pool.stop() == 0
    assert_exactly_once(output_dir, request_ids, redis_client, queue_name)


def test_a_ledger_killed_between_publishing_and_appending_leaves_no_file_without_a_record(
    tmp_path: Path, pool_factory: PoolFactory, redis_client: redis.Redis, queue_name: str,
    segments: SegmentTracker,
) -> None:
    request_ids = push_photos(redis_client, queue_name, segments, 8, size=(256, 256))
    env = {"IRW_CRASH_AT": "ledger_after_publish", "IRW_CRASH_MARKER": str(tmp_path / "crashed")}
    pool = pool_factory(workers=2, env=env)
    wait_for_records(pool.output_dir, len(request_ids), timeout=60, pool=pool)
    wait_for_queue_drained(redis_client, queue_name)
    assert pool.stop() == 0
    assert (tmp_path / "crashed").exists()
    assert pool.events("unrecorded_file_removed"), "the killed batch published no file"
    assert_exactly_once(pool.output_dir, request_ids, redis_client, queue_name)


def test_a_restart_never_removes_a_file_a_record_names(
    pool_factory: PoolFactory, redis_client: redis.Redis, queue_name: str, segments: SegmentTracker
) -> None:
    """.publishing kept the last batch that published a file after its records
    were appended, and a start removed each listed file whose record it did not
    see in results.json's tail: after a rotation of results.json, or 8 MiB of
    failures since, a completed record's JPEG was deleted (red team)."""
    request_ids = push_photos(redis_client, queue_name, segments, 3, size=(256, 256))
    pool = pool_factory(workers=1)
    pool.wait_ready()
    records = wait_for_records(pool.output_dir, 3, pool=pool)
    assert pool.stop() == 0
    (pool.output_dir / "results.json").rename(pool.output_dir / "results-archived.json")  # an operator's rotation

    again = pool_factory(workers=1)
    again.wait_ready()
    assert again.stop() == 0
    assert not again.events("unrecorded_file_removed")
    assert all(Path(record["file_path"]).is_file() for record in records), request_ids


@pytest.mark.fast
def test_a_record_beyond_the_tail_read_at_start_keeps_its_file(tmp_path: Path) -> None:
    """What start-up reads of results.json is its end; a record further back is
    still found, by reading the whole file, before anything is removed for it."""
    results = ResultsFile(tmp_path / "results.json")
    results.open()
    results.append([{"task_id": "t-old", "attempts": 1, "status": "completed", "request_id": "r"}])
    results.append([{"task_id": f"t{n}", "attempts": 1, "status": "failed", "request_id": "x" * 100} for n in range(2000)])
    results.close()
    assert [r["task_id"] for r in results.records_of_tasks({"t-old", "t-missing"})] == ["t-old"]


# ---------------------------------------------------------------- found by attacking the fixes


@pytest.mark.parametrize("name", [".lock", "results.json", "requests.json", ".publishing", ".unlink-pending"])
def test_a_state_file_another_uid_planted_in_a_sticky_output_dir_is_refused(
    name: str, shared_home: Path, redis_server, queue_name: str
) -> None:
    """A sticky OUTPUT_DIR (accepted) lets anyone create a name the pool has not
    made yet. A symlink there used to be followed (the lock file was truncated
    through it, as root); a file of theirs would be trusted."""
    output_dir = shared_home / "out"
    output_dir.mkdir()
    output_dir.chmod(0o1777)
    precious = shared_home / "precious"
    precious.write_bytes(b"root's own data")
    assert as_nobody(lambda: (output_dir / name).symlink_to(precious)) == ""
    assert_refused(start_supervisor(output_dir, redis_server.url, queue_name), f"{name}' is not a regular file")
    assert precious.read_bytes() == b"root's own data", "written through the link"
    (output_dir / name).unlink()
    assert as_nobody(lambda: (output_dir / name).write_bytes(b"")) == ""
    assert_refused(start_supervisor(output_dir, redis_server.url, queue_name), f"owned by uid {NOBODY}")


def test_a_partial_folder_swapped_for_a_link_after_start_receives_nothing(
    shared_home: Path, pool_factory: PoolFactory, redis_client: redis.Redis, queue_name: str,
    segments: SegmentTracker,
) -> None:
    """With OUTPUT_DIR_ALLOW_SHARED=true and a world-writable OUTPUT_DIR, nobody
    moves .partial aside once the pool runs and puts a link to a folder of its
    own there. The workers and the ledger keep the folder they checked."""
    if shutil.which("chattr") is None:
        pytest.skip("chattr is not installed")
    output_dir = shared_home / "out"
    output_dir.mkdir()
    output_dir.chmod(0o777)
    theirs = shared_home / "theirs"
    theirs.mkdir()
    os.chown(theirs, NOBODY, NOBODY)
    pool = pool_factory(workers=2, output_dir=output_dir, env={"OUTPUT_DIR_ALLOW_SHARED": "true"})
    pool.wait_ready()

    def swap() -> None:
        os.rename(output_dir / ".partial", output_dir / ".partial-aside")
        (output_dir / ".partial").symlink_to(theirs)

    assert as_nobody(swap) == ""
    # Nothing may be created in their folder, not even by root: a write through the link fails loudly.
    subprocess.run(["chattr", "+i", str(theirs)], check=True)
    try:
        request_ids = push_photos(redis_client, queue_name, segments, 6, size=(256, 256))
        wait_until(lambda: len(read_results(output_dir)) == len(request_ids), 30, "the tasks did not complete")
    finally:
        subprocess.run(["chattr", "-i", str(theirs)], check=True)
    assert pool.stop() == 0
    assert not pool.events("jpeg_write_failed"), "a JPEG was written through the link"
    assert list(theirs.iterdir()) == []
    for record in read_results(output_dir):
        final = Path(record["file_path"])
        assert record["status"] == "completed" and final.is_file() and not final.is_symlink(), record
        assert cv2.imread(str(final)) is not None


def test_a_record_left_naming_its_partial_file_is_published_over_whatever_was_planted(
    shared_home: Path, pool_factory: PoolFactory, photos,
) -> None:
    """The state a ledger of the previous version (record first, then publish)
    leaves when killed in between, or a power cut that undid a rename: a
    completed record, its JPEG still under .partial. nobody plants a symlink on
    the recorded name of one, and leaves the other free. At start the pool
    publishes both under their recorded names (the record claims the name; the
    symlink's target is untouched) instead of deleting its own JPEG."""
    output_dir = shared_home / "out"
    output_dir.mkdir()
    output_dir.chmod(0o1777)
    (output_dir / ".partial").mkdir(mode=0o755)
    target = shared_home / "attacker.jpg"
    target.write_bytes(b"not the pool's")
    os.chown(target, NOBODY, NOBODY)
    records = []
    for index, name in enumerate(["planted", "free"]):
        task_id = f"{index:024x}"
        jpeg = cv2.imencode(".jpg", photos["coffee"])[1].tobytes()
        (output_dir / ".partial" / f"{task_id}.1.jpg").write_bytes(jpeg)
        records.append({"timestamp": "2026-12-08T00:00:00", "request_id": name, "image_id": name,
                        "file_path": str(output_dir / f"{name}_20261208_000000.jpg"), "status": "completed",
                        "task_id": task_id, "attempts": 1})
    results = ResultsFile(output_dir / "results.json")
    results.open()
    results.append(records)
    results.close()
    planted = Path(records[0]["file_path"])
    assert as_nobody(lambda: planted.symlink_to(target)) == ""

    pool = pool_factory(workers=1, output_dir=output_dir)
    pool.wait_ready()
    assert pool.stop() == 0
    for record in records:
        final = Path(record["file_path"])
        assert not final.is_symlink() and final.stat().st_uid == os.geteuid(), final
        assert cv2.imread(str(final)) is not None, f"{final.name} is not the pool's JPEG"
    assert list((output_dir / ".partial").iterdir()) == []
    assert target.read_bytes() == b"not the pool's"
    assert [e["request_id"] for e in pool.events("publication_restored")] == ["planted"]
    assert [e["request_id"] for e in pool.events("publication_finished")] == ["free"]
