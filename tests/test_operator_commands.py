"""`python supervisor.py status|check|dead ...` against a real pool and Redis."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

import pytest

from control.commands import CLEAR_SCREEN
from harness import REPO_ROOT
from harness.pool import Pool
from image_result_client.protocol import QueueKeys
from shared.ipc.records import dead_letter_entry
from tests.helpers import (
    command,
    operator_command,
    operator_env,
    push,
    push_photos,
    wait_for_records,
    wait_until,
    worker_pids,
)

TITLE = "\x1b]0;pwned\x07"  # retitles a terminal window
RAW_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


@pytest.mark.parametrize(
    ("word", "said"),
    [
        ("stauts", "unknown command 'stauts'; did you mean 'status'?"),
        ("dashbaord", "unknown command 'dashbaord'; did you mean 'dashboard'?"),
        (
            "frobnicate",
            "unknown command 'frobnicate'; expected one of status, check, dead, host, task, dashboard, or options only",
        ),
    ],
)
def test_a_mistyped_command_is_one_line_naming_the_one_meant(tmp_path, word: str, said: str) -> None:
    """Not argparse's "unrecognized arguments", and no pool started on a typo."""
    done = operator_command(word, redis_url="redis://127.0.0.1:1/0", queue="q", output_dir=tmp_path / "out")
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [f"image-result-worker: {said}"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args", [(), ("status",)])
def test_an_interpreter_without_our_dependencies_is_one_line_not_a_traceback(tmp_path, args) -> None:
    """`python supervisor.py ...` outside .venv: a bare venv stands for a system Python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "bare")], check=True, timeout=60)
    python = tmp_path / "bare" / "bin" / "python"
    done = subprocess.run(
        [str(python), str(REPO_ROOT / "supervisor.py"), *args],
        cwd=tmp_path, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith(f"image-result-worker: {python} has no module ") and ".venv/bin/python" in line, line


def as_at_a_prompt() -> None:
    """In the child: Ctrl-C as a shell's foreground job has it. A suite started as
    a background job without job control (`(make test &)`) has SIGINT ignored,
    and an ignored signal stays ignored across exec."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def on_terminal(
    *args: str, env: dict[str, str], answer: str | None = None, interrupt_after_frames: int | None = None
) -> tuple[int, str]:
    """`python supervisor.py ARGS` with a pseudo-terminal for stdin, stdout and
    stderr, as at a shell prompt: types `answer` once asked [y/N], or sends
    SIGINT (Ctrl-C) once that many screens were drawn. Returns the exit code
    and everything shown, with the terminal's CR LF read back as LF."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "supervisor.py", *args], cwd=REPO_ROOT, env=env,
        stdin=slave, stdout=slave, stderr=slave, start_new_session=True, preexec_fn=as_at_a_prompt,
    )
    os.close(slave)
    shown, acted = b"", False
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            readable, _, _ = select.select([master], [], [], 0.1)
            if readable:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the program closed the terminal
                    break
                if not chunk:
                    break
                shown += chunk
            elif proc.poll() is not None:
                break
            if not acted and answer is not None and b"[y/N]" in shown:
                os.write(master, answer.encode())
                acted = True
            frames = shown.count(CLEAR_SCREEN.encode())
            if not acted and interrupt_after_frames is not None and frames >= interrupt_after_frames:
                proc.send_signal(signal.SIGINT)
                acted = True
        return proc.wait(timeout=10), shown.decode(errors="replace").replace("\r\n", "\n")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        os.close(master)


def test_status_reports_queue_workers_and_recent_outcomes(pool_factory, redis_client, queue_name, segments):
    pool = pool_factory(workers=2, env={"LEASE_TTL": "3"})
    pool.wait_ready()
    push_photos(redis_client, queue_name, segments, 5, size=(256, 256))
    push(redis_client, queue_name, b"not json")
    wait_for_records(pool.output_dir, 6, pool=pool)
    report = wait_until(
        lambda: (r := json.loads(command(pool, "status", "--json").stdout))["supervisors"]
        and r["supervisors"][0]["ready"] and r,
        10,
        "status never showed the ready supervisor",
    )
    assert report["queue_depth"] == 0 and report["in_flight"] == 0 and report["dead_letters"] == 0
    assert report["junk_dead_letters"] == 1, "not JSON, so no request_id: junk, capped apart"
    assert report["last_minute"] == {"completed": 5, "failed": 1, "retried": 0, "expired": 0}
    (supervisor,) = report["supervisors"]
    assert len(supervisor["workers"]) == 2 and supervisor["ledger"]["pid"] > 0
    assert all(worker["heartbeat_age"] < 10 for worker in supervisor["workers"])
    text = command(pool, "status")
    assert text.returncode == 0 and "0 waiting" in text.stdout and "worker 1" in text.stdout
    assert pool.stop() == 0
    redis_client.rpush(queue_name, b"{}")
    after = json.loads(command(pool, "status", "--json").stdout)
    assert after["queue_depth"] == 1 and after["supervisors"] == []


def test_check_is_healthy_only_while_the_pool_serves(pool_factory, redis_server):
    pool = pool_factory(workers=1)
    pool.wait_ready()
    healthy = wait_until(lambda: (done := command(pool, "check")).returncode == 0 and done, 10, "never healthy")
    assert healthy.stdout.strip() == "healthy"
    down = command(pool, "check", redis_url="redis://127.0.0.1:1/0")
    assert down.returncode == 1 and len(down.stderr.strip().splitlines()) == 1 and "Traceback" not in down.stderr
    assert pool.stop() == 0
    stopped = command(pool, "check")
    assert stopped.returncode == 1 and "not running" in stopped.stderr


def test_dead_letters_can_be_listed_requeued_and_purged(pool_factory, redis_client, queue_name):
    pool = pool_factory(workers=1)
    pool.wait_ready()
    for index in range(3):
        push(redis_client, queue_name, {"request_id": f"bad_{index}", "image_id": "x"})
    wait_for_records(pool.output_dir, 3, pool=pool)
    wait_until(lambda: redis_client.llen(QueueKeys(queue_name).dead) == 3, 10, "dead letters missing")
    listing = command(pool, "dead", "list", "--json")
    entries = [json.loads(line) for line in listing.stdout.splitlines()]
    assert [e["request_id"] for e in entries] == ["bad_0", "bad_1", "bad_2"]
    requeued = command(pool, "dead", "requeue", "--limit", "2")
    assert requeued.returncode == 0 and "requeued 2" in requeued.stdout
    # The replayed messages run again (and fail again, being still bad): new records, new dead letters.
    wait_for_records(pool.output_dir, 5, pool=pool)
    wait_until(lambda: redis_client.llen(QueueKeys(queue_name).dead) == 3, 10, "replayed tasks not dead-lettered")
    purged = command(pool, "dead", "purge", "--yes")
    assert purged.returncode == 0 and redis_client.llen(QueueKeys(queue_name).dead) == 0
    assert pool.stop() == 0


def test_watchdog_pings_reach_systemd(pool_factory):
    pool = pool_factory(workers=1, env={"WATCHDOG_USEC": "30000000"})
    pool.wait_ready()
    wait_until(lambda: "WATCHDOG=1" in pool.notifications(), 10, "no WATCHDOG=1")
    assert pool.stop() == 0


def test_unknown_subcommand_is_a_one_line_usage_error(pool_factory):
    pool = pool_factory(workers=1)
    done = command(pool, "dead", "resurrect")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1


def test_sighup_rereads_settings_and_replaces_workers_without_losing_tasks(
    pool_factory, redis_client, queue_name, segments, tmp_path
):
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    (workdir / ".env").write_text("WORKERS=1\nJPEG_QUALITY=20\n")
    pool = pool_factory(workers=None, cwd=workdir)
    pool.wait_ready()
    before = worker_pids(pool)
    assert len(before) == 1
    push_photos(redis_client, queue_name, segments, 20, size=(512, 512))
    (workdir / ".env").write_text("WORKERS=2\nJPEG_QUALITY=95\n")
    pool.send_signal(signal.SIGHUP)
    wait_until(lambda: len(pids := worker_pids(pool)) == 2 and not set(pids) & set(before), 15, "workers not replaced")
    push_photos(redis_client, queue_name, segments, 1, size=(512, 512))  # after the reload
    records = wait_for_records(pool.output_dir, 21, pool=pool)
    assert sorted(r["request_id"] for r in records) == sorted([f"req_{i:04d}" for i in range(20)] + ["req_0000"])
    assert all(r["status"] == "completed" for r in records)
    # The same photo: first at quality 20 (before the reload), last at 95.
    first, last = sorted((r for r in records if r["request_id"] == "req_0000"), key=lambda r: r["timestamp"])
    assert last["bytes"] > 1.5 * first["bytes"]
    (workdir / ".env").write_text("JPEG_QUALITY=500\n")
    pool.send_signal(signal.SIGHUP)
    wait_until(lambda: pool.events("reload_refused"), 10, "a bad reload was not refused")
    assert len(worker_pids(pool)) == 2
    assert pool.stop() == 0


# ---------------------------------------------------------------- status: tasks, freshness, --watch


def status_report(pool: Pool) -> dict:
    done = command(pool, "status", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_status_says_ready_as_soon_as_the_pool_is(pool_factory):
    """The lease is renewed every LEASE_TTL/3 (5 s by default); readiness is
    written at once, so `status` right after READY=1 does not say starting."""
    pool = pool_factory(workers=2)
    pool.wait_ready()
    (supervisor,) = status_report(pool)["supervisors"]
    assert supervisor["ready"] is True and len(supervisor["workers"]) == 2
    assert all(worker["task"] is None for worker in supervisor["workers"])
    text = command(pool, "status").stdout
    assert "(starting)" not in text and re.search(r"2/2 workers, as of \d\d:\d\d:\d\d \(\d+\.\ds ago\)", text), text
    assert pool.stop() == 0


def test_status_shows_each_workers_task_its_phase_and_age(pool_factory, redis_client, queue_name, http_server):
    """A worker in a slow download: `status` names its task, phase and age; the other is idle."""
    pool = pool_factory(workers=2, env={"LEASE_TTL": "3", "SHUTDOWN_GRACE": "1"})
    pool.wait_ready()
    url = http_server.trickle("/slow.jpg", interval=0.2)
    push(redis_client, queue_name, {"request_id": "slow" + TITLE, "image_id": "img_slow", "image_url": url})

    def busy_worker():
        workers = status_report(pool)["supervisors"][0]["workers"]
        busy = [w for w in workers if w["task"] and w["task"].get("request_id")]
        return busy and (busy[0], workers)

    worker, workers = wait_until(busy_worker, 15, "status never showed the task in hand")
    task = worker["task"]
    assert task["phase"] == "load" and task["image_id"] == "img_slow" and task["attempt"] == 1
    assert len(task["task_id"]) == 24 and 0 <= task["age"] < 15 and task["started_at"] <= time.time()
    assert [w["task"] for w in workers if w is not worker] == [None]
    later = wait_until(lambda: (b := busy_worker()) and b[0]["task"]["age"] > task["age"] and b[0], 10, "age stood")
    assert later["task"]["task_id"] == task["task_id"]
    text = command(pool, "status")
    assert text.returncode == 0 and not RAW_CONTROL.search(text.stdout), repr(text.stdout)
    assert re.search(r"load for \d+\.\ds: request slow\\x1b\]0;pwned\\x07, image img_slow", text.stdout), text.stdout
    assert "  idle" in text.stdout
    assert pool.stop() == 0


def test_status_watch_redraws_until_ctrl_c(redis_server, redis_client, queue_name, tmp_path):
    """--watch on a terminal clears and redraws; Ctrl-C ends it with 0 and no
    traceback; a hostile host queue name is escaped in every frame. Without a
    terminal, --json prints one report a line."""
    redis_client.rpush(QueueKeys(queue_name).host("gone" + TITLE), b"{}")
    env = operator_env(redis_url=redis_server.url, queue=queue_name, output_dir=tmp_path)
    code, shown = on_terminal("status", "--watch", "--interval", "0.2", env=env, interrupt_after_frames=3)
    assert code == 0 and "Traceback" not in shown and "KeyboardInterrupt" not in shown, shown
    frames = shown.split(CLEAR_SCREEN)[1:-1]  # the last may be cut short by Ctrl-C
    assert len(frames) >= 2
    assert all("every 0.2s, Ctrl-C to stop" in frame and "host gone\\x1b]0;pwned\\x07: 1 waiting" in frame
               for frame in frames), frames
    assert not RAW_CONTROL.search(shown.replace(CLEAR_SCREEN, ""))

    watch = subprocess.Popen(
        [sys.executable, "supervisor.py", "status", "--watch", "--json", "--interval", "0.2"],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=as_at_a_prompt,
    )
    try:
        reports = [json.loads(watch.stdout.readline()) for _ in range(2)]
        watch.send_signal(signal.SIGINT)
        assert watch.wait(timeout=10) == 0 and "Traceback" not in watch.stderr.read()
    finally:
        watch.kill()
        watch.wait()
        watch.stdout.close()
        watch.stderr.close()
    assert [r["host_queues"] for r in reports] == [{"gone" + TITLE: 1}] * 2
    assert reports[1]["collected_at"] > reports[0]["collected_at"]


# ---------------------------------------------------------------- dead letters


def dead_letter(client, queue: str, *, failed_at: datetime, request_id: str | None, error: str, message: bytes) -> None:
    client.rpush(QueueKeys(queue).dead, dead_letter_entry(
        failed_at=failed_at, task_id=None if request_id is None else "t_" + request_id, request_id=request_id,
        image_id=None if request_id is None else "img_" + request_id, attempts=1, error=error, message=message,
    ))


def test_dead_requeue_replays_what_it_can_and_leaves_entries_that_are_not_dead_letters(
    redis_server, redis_client, queue_name, tmp_path
):
    dead_key = QueueKeys(queue_name).dead
    redis_client.rpush(dead_key, b"not json at all")
    dead_letter(redis_client, queue_name, failed_at=datetime.now(), request_id="r1", error="HTTP 404 Not Found",
                message=b'{"request_id": "r1", "image_url": "http://x/a.jpg"}')
    redis_client.rpush(dead_key, b'{"error": "an entry without its message"}')

    done = operator_command("dead", "requeue", redis_url=redis_server.url, queue=queue_name, output_dir=tmp_path)

    assert done.returncode == 1, done
    assert done.stdout == "requeued 1 dead letters\n"
    assert done.stderr == (
        "image-result-worker: 2 entries hold no message the pool wrote and stay in the list (see `dead list`)\n"
    )
    assert redis_client.lrange(queue_name, 0, -1) == [b'{"request_id": "r1", "image_url": "http://x/a.jpg"}']
    assert redis_client.lrange(dead_key, 0, -1) == [b"not json at all", b'{"error": "an entry without its message"}']



def test_dead_requeue_refuses_a_limit_below_one_instead_of_requeuing_every_entry(
    redis_server, redis_client, queue_name, tmp_path
):
    for n in range(3):
        dead_letter(redis_client, queue_name, failed_at=datetime.now(), request_id=f"r{n}", error="HTTP 404 Not Found",
                    message=b'{"request_id": "r%d", "image_url": "http://x/a.jpg"}' % n)

    for limit in ("0", "-1"):
        done = operator_command(
            "dead", "requeue", "--limit", limit, redis_url=redis_server.url, queue=queue_name, output_dir=tmp_path
        )
        assert done.returncode == 2, done
        assert "is not a count; expected 1 or more" in done.stderr
    assert redis_client.llen(QueueKeys(queue_name).dead) == 3 and redis_client.llen(queue_name) == 0

def test_dead_list_filters_by_error_and_age_and_show_prints_one_whole(redis_server, redis_client, queue_name, tmp_path):
    def run(*args: str) -> subprocess.CompletedProcess:
        done = operator_command(*args, redis_url=redis_server.url, queue=queue_name, output_dir=tmp_path)
        assert "Traceback" not in done.stderr and "None" not in done.stdout, done
        return done

    dead_key = QueueKeys(queue_name).dead
    empty = run("dead", "list")
    assert empty.returncode == 0 and empty.stdout == f"no dead letters in {dead_key}\n"
    # As the ledger writes it: local time without a zone; and as a drain might: UTC with one.
    dead_letter(redis_client, queue_name, failed_at=datetime.now() - timedelta(hours=2), request_id="old",
                error="download timed out (URL_READ_TIMEOUT=30s)", message=b'{"request_id": "old", "image_id": 1}')
    dead_letter(redis_client, queue_name, failed_at=datetime.now(timezone.utc), request_id=None,
                error="message is not valid JSON", message=b"not json")
    dead_letter(redis_client, queue_name, failed_at=datetime.now(timezone.utc), request_id="new",
                error="HTTP 404 Not Found", message=b'{"request_id": "new", "image_url": "http://x/' + TITLE.encode() + b'"}')

    listing = run("dead", "list").stdout.splitlines()
    assert [line.split()[0] for line in listing] == ["0", "1", "2"]
    assert listing[1].split()[2:5] == ["-", "-", "attempts=1"] and listing[1].endswith("message is not valid JSON")
    assert [line.split()[0] for line in run("dead", "list", "--error", "TIMED OUT").stdout.splitlines()] == ["0"]
    assert [line.split()[0] for line in run("dead", "list", "--older-than", "1h").stdout.splitlines()] == ["0"]
    assert [line.split()[0] for line in run("dead", "list", "--newer-than", "30m").stdout.splitlines()] == ["1", "2"]
    assert [line.split()[0] for line in run("dead", "list", "--newer-than", "30m", "--limit", "1").stdout.splitlines()] == ["1"]
    assert run("dead", "list", "--error", "disk full").stdout == f"none of the 3 dead letters in {dead_key} match\n"
    assert [json.loads(line)["request_id"] for line in run("dead", "list", "--json", "--older-than", "90m").stdout.splitlines()] == ["old"]

    whole = run("dead", "show", "2").stdout
    assert whole.startswith(f"dead letter 2 of {dead_key}\n") and "error       HTTP 404 Not Found\n" in whole
    assert "request_id  new\n" in whole and "attempts    1\n" in whole
    # A raw control character makes it no JSON: shown on one line, escaped.
    assert 'message     {"request_id": "new", "image_url": "http://x/\\x1b]0;pwned\\x07"}\n' in whole
    assert not RAW_CONTROL.search(whole), whole
    assert 'message     {\n              "image_id": 1,\n              "request_id": "old"\n            }\n' in (
        run("dead", "show", "0").stdout
    )
    assert "message     not json" in run("dead", "show", "-2").stdout
    assert "request_id  -\n" in run("dead", "show", "1").stdout
    assert json.loads(run("dead", "show", "0", "--json").stdout)["request_id"] == "old"
    missing = run("dead", "show", "7")
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1 and f"{dead_key} holds 3" in missing.stderr
    bad_age = run("dead", "list", "--older-than", "soon")
    assert bad_age.returncode == 2 and bad_age.stderr.count("\n") == 1 and "--older-than" in bad_age.stderr


def test_dead_purge_asks_on_a_terminal_and_needs_yes_without_one(redis_server, redis_client, queue_name, tmp_path):
    dead_key = QueueKeys(queue_name).dead
    env = operator_env(redis_url=redis_server.url, queue=queue_name, output_dir=tmp_path)
    for request_id in ("a", "b"):
        dead_letter(redis_client, queue_name, failed_at=datetime.now(), request_id=request_id, error="x", message=b"{}")

    scripted = operator_command("dead", "purge", redis_url=redis_server.url, queue=queue_name, output_dir=tmp_path)
    assert scripted.returncode == 2 and scripted.stderr.count("\n") == 1 and "--yes" in scripted.stderr
    assert redis_client.llen(dead_key) == 2
    code, shown = on_terminal("dead", "purge", env=env, answer="n\n")
    assert code == 1 and f"delete 2 dead letters from {dead_key}? [y/N]" in shown and "nothing deleted" in shown
    assert redis_client.llen(dead_key) == 2
    code, shown = on_terminal("dead", "purge", env=env, answer="y\n")
    assert code == 0 and "purged 2 dead letters" in shown and redis_client.llen(dead_key) == 0

    dead_letter(redis_client, queue_name, failed_at=datetime.now(), request_id="c", error="x", message=b"{}")
    done = operator_command("dead", "purge", "--yes", redis_url=redis_server.url, queue=queue_name, output_dir=tmp_path)
    assert done.returncode == 0 and done.stdout == "purged 1 dead letters\n"
    again = operator_command("dead", "purge", redis_url=redis_server.url, queue=queue_name, output_dir=tmp_path)
    assert again.returncode == 0 and again.stdout == f"no dead letters in {dead_key}\n"


@pytest.mark.parametrize(
    "args",
    [("status",), ("check",), ("dead",), ("dead", "list"), ("dead", "show"), ("dead", "requeue"),
     ("dead", "purge"), ("host",), ("host", "drain")],
    ids=" ".join,
)
def test_every_operator_command_has_help(args, tmp_path):
    done = operator_command(*args, "--help", redis_url="redis://127.0.0.1:1", queue="q", output_dir=tmp_path)
    assert done.returncode == 0 and done.stdout.startswith(f"usage: supervisor.py {' '.join(args)}"), done
    description = done.stdout.split("\n\n")[1]
    assert description[0].isupper() and description.rstrip().endswith("."), done.stdout
    # Every option and every action listed says what it does.
    listed = re.findall(r"^  (\S.*)$", done.stdout, flags=re.MULTILINE)
    assert all(re.search(r"\S\s{2,}\S", line) or line.strip() in ("ACTION", "N", "HOST_ID") for line in listed), listed


# ---------------------------------------------------------------- SIGHUP and the worker count


def test_sighup_keeps_the_count_sigttin_set_unless_workers_changed(pool_factory, tmp_path):
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    (workdir / ".env").write_text("WORKERS=1\n")
    pool = pool_factory(workers=None, cwd=workdir)
    pool.wait_ready()
    pool.send_signal(signal.SIGTTIN)
    first = wait_until(lambda: len(pids := worker_pids(pool)) == 2 and pids, 15, "SIGTTIN added no worker")
    pool.send_signal(signal.SIGHUP)
    (reloaded,) = wait_until(lambda: pool.events("settings_reloaded"), 10, "no reload")
    assert reloaded["workers"] == 2 and reloaded["workers_from"] == "kept"
    wait_until(lambda: len(pids := worker_pids(pool)) == 2 and not set(pids) & set(first), 15, "not replaced by 2")
    time.sleep(1)  # a count put back to WORKERS=1 would retire one by now
    assert len(worker_pids(pool)) == 2 and status_report(pool)["supervisors"][0]["desired_workers"] == 2
    (workdir / ".env").write_text("WORKERS=3\n")
    pool.send_signal(signal.SIGHUP)
    wait_until(lambda: len(pool.events("settings_reloaded")) == 2, 10, "no second reload")
    assert pool.events("settings_reloaded")[1]["workers"] == 3
    assert pool.events("settings_reloaded")[1]["workers_from"] == "WORKERS"
    wait_until(lambda: len(worker_pids(pool)) == 3, 15, "WORKERS=3 not taken")
    assert pool.stop() == 0


def test_a_flood_of_junk_keeps_the_dead_letters_of_real_tasks_and_counts_what_it_pushed_out(
    pool_factory, redis_client, queue_name
):
    """One-byte pushes, many more than DEAD_LETTER_MAX, used to push every real
    dead letter out. Junk (no request_id: not JSON, not an object, none in it)
    now has a list and a cap of its own; what the caps push out is counted in
    Redis (`status`, the metrics) and logged, once for the whole flood."""
    keys = QueueKeys(queue_name)
    cap, flood = 20, 300
    pool = pool_factory(workers=2, env={"DEAD_LETTER_MAX": str(cap)})
    pool.wait_ready()
    real = [f"real_{index}" for index in range(5)]
    for request_id in real:  # real tasks that fail: a segment that is not there
        push(redis_client, queue_name, {"request_id": request_id, "image_id": request_id,
                                        "shm_info": {"shm_name": f"img_shm_gone_{request_id}", "shape": [8, 8, 3],
                                                     "dtype": "uint8"}})
    wait_until(lambda: redis_client.llen(keys.dead) == len(real), 30, "the real tasks were not dead-lettered")
    with redis_client.pipeline(transaction=False) as pipe:
        for index in range(flood):
            pipe.rpush(queue_name, b"x" if index % 3 else b"{}")
        pipe.execute()
    wait_for_records(pool.output_dir, len(real) + flood, timeout=120, pool=pool)
    wait_until(lambda: int(redis_client.hget(keys.dead_trimmed, "junk") or 0) == flood - cap, 30, "trim not counted")

    kept = [json.loads(entry)["request_id"] for entry in redis_client.lrange(keys.dead, 0, -1)]
    assert sorted(kept) == real, "a flood of junk pushed out the dead letters of real tasks"
    assert redis_client.llen(keys.dead_junk) == cap
    listing = command(pool, "dead", "list")
    assert listing.returncode == 0 and all(request_id in listing.stdout for request_id in real)
    junk = command(pool, "dead", "list", "--junk", "--json", "--limit", "1000")
    assert len(junk.stdout.splitlines()) == cap
    assert all(json.loads(line)["request_id"] is None for line in junk.stdout.splitlines())
    status = json.loads(command(pool, "status", "--json").stdout)
    assert status["dead_letters"] == len(real) and status["junk_dead_letters"] == cap
    assert status["dead_letters_trimmed"] == {"junk": flood - cap}
    assert f"{flood - cap} of junk" in command(pool, "status").stdout
    assert pool.stop() == 0
    logged = pool.events("dead_letters_trimmed")
    assert logged and sum(event["junk"] for event in logged) <= flood - cap
    assert len(logged) < 5, "one line per batch is a flood of its own"
