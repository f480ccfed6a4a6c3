"""Text from the queue reaches terminals escaped; Redis credentials never reach them.

Whoever can write to Redis picks image ids, request ids, errors, host ids and
list names. Fast tests pin the escaping function, the console log processor and
redact_url; real-process tests put hostile text into a private redis-server (and
through a real pool) and read what `status`, `dead list` and the pool print.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from datetime import datetime, timezone

import pytest
import structlog

import image_result_client.__main__ as client_main
from harness import REPO_ROOT
from harness.pool import environment_without
from image_result_client.protocol import QueueKeys
from image_result_client.redact import redact_url
from image_result_client.terminal import has_control, printable
from shared.config import Settings
from shared.ipc.records import dead_letter_entry
from shared.logs import configure_logging, escape_for_terminal
from shared.storage.files import LOCK_NAME
from tests.helpers import command, operator_command, push, wait_for_records, wait_until
from tools.local_redis import free_port

# Each would repaint an operator's terminal if printed raw.
HOSTILE = {
    "title": "\x1b]0;pwned\x07",
    "erase_line": "\x1b[2K",
    "carriage_return": "ok\rfake",
    "backspaces": "abc\x08\x08\x08xyz",
    "c1_csi": "\x9b31m",
    "delete": "a\x7fb",
    "bidi_override": "\u202egnp.exe",
    "bidi_isolate": "\u2066x\u2069",
}
# Raw control characters anywhere in a stream, except the newlines between lines.
RAW_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("\x1b]0;pwned\x07", "\\x1b]0;pwned\\x07"),
        ("\x1b[2K", "\\x1b[2K"),
        ("ok\rfake", "ok\\rfake"),
        ("a\nb\tc", "a\\nb\\tc"),
        ("abc\x08\x08", "abc\\x08\\x08"),
        ("\x00\x7f", "\\x00\\x7f"),
        ("\x9b31m\x85", "\\x9b31m\\x85"),
        ("\u202egnp.exe", "\\u202egnp.exe"),
        ("\u2066x\u2069\u200f", "\\u2066x\\u2069\\u200f"),
        ("photo_01 café 写真 ✓", "photo_01 café 写真 ✓"),
        ("C:\\x1b stays as typed", "C:\\x1b stays as typed"),
        ("\ud800-lone \udc9b2J", "\\ud800-lone \\udc9b2J"),
        ("a\u2028b\u2029", "a\\u2028b\\u2029"),
    ],
)
@pytest.mark.fast
def test_printable_shows_control_characters_as_escapes(text: str, shown: str) -> None:
    assert printable(text) == shown
    assert has_control(text) == (text != shown)


@pytest.mark.fast
def test_printable_leaves_no_control_character_in_the_first_planes() -> None:
    every = "".join(chr(code) for code in range(0x3000))
    assert not RAW_CONTROL.search(printable(every).replace("\n", ""))
    assert not has_control(printable(every))


@pytest.mark.fast
def test_printable_keeps_newlines_only_when_multiline() -> None:
    assert printable("Traceback\n  bad\x1b[2K\n", multiline=True) == "Traceback\n  bad\\x1b[2K\n"


# ---------------------------------------------------------------- the console log


@pytest.fixture
def console_log(capsys: pytest.CaptureFixture[str]):
    """structlog configured as a process would be, writing to captured stderr."""

    def configure(log_format: str) -> structlog.typing.FilteringBoundLogger:
        configure_logging(Settings(log_format=log_format, log_level="DEBUG"), role="test")
        return structlog.get_logger()

    try:
        yield configure
    finally:
        structlog.reset_defaults()
        structlog.contextvars.clear_contextvars()


@pytest.mark.fast
def test_console_log_shows_hostile_values_escaped(console_log, capsys) -> None:
    log = console_log("console")
    log.warning("task_failed", **HOSTILE, attempts=3, detail={"id": "\x1b[2K"})
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and not RAW_CONTROL.search(err)
    assert "title='\\x1b]0;pwned\\x07'" in err and "carriage_return='ok\\rfake'" in err
    assert "bidi_override='\\u202egnp.exe'" in err and "attempts=3" in err


@pytest.mark.fast
def test_console_log_escapes_a_traceback_but_keeps_its_lines(console_log, capsys) -> None:
    log = console_log("console")
    try:
        raise ValueError("bad image id \x1b]0;pwned\x07\r")
    except ValueError:
        log.exception("task_crashed")
    err = capsys.readouterr().err
    assert not RAW_CONTROL.search(err)
    assert "\nTraceback (most recent call last):\n" in err
    assert "ValueError: bad image id \\x1b]0;pwned\\x07\\r" in err


@pytest.mark.fast
def test_console_log_in_colour_adds_only_its_own_colour_codes() -> None:
    render = structlog.dev.ConsoleRenderer(colors=True)
    line = render(None, "warning", escape_for_terminal(None, "warning", {"event": "task_failed", **HOSTILE}))
    assert not RAW_CONTROL.search(re.sub(r"\x1b\[[0-9;]*m", "", line))


@pytest.mark.fast
def test_json_log_keeps_hostile_values_exact_and_escaped(console_log, capsys) -> None:
    log = console_log("json")
    log.warning("task_failed", **HOSTILE)
    err = capsys.readouterr().err
    assert not RAW_CONTROL.search(err)
    event = json.loads(err)
    assert {key: event[key] for key in HOSTILE} == HOSTILE


# ---------------------------------------------------------------- credentials in URLs


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://user:s3cret@host:6379/0", "redis://user:***@host:6379/0"),
        ("redis://:s3cret@host", "redis://:***@host"),
        # A lone userinfo goes to AUTH as a user name; people put passwords and tokens there.
        ("redis://s3cret@host:6379", "redis://***@host:6379"),
        ("rediss://default:s3cret@host:6380/1?ssl_cert_reqs=none", "rediss://default:***@host:6380/1?ssl_cert_reqs=none"),
        ("redis://host/0?password=s3cret", "redis://host/0?password=***"),
        ("redis://host/0?username=app&password=s3cret#x", "redis://host/0?username=app&password=***#x"),
        ("redis://host/0?PASSWORD=s3cret", "redis://host/0?PASSWORD=***"),
        ("redis://host/0?pass%77ord=s3cret", "redis://host/0?pass%77ord=***"),
        ("redis://host/0?db=1;password=s3cret", "redis://host/0?db=1;password=***"),
        ("redis://host/0?auth_token=s3cret&db=2", "redis://host/0?auth_token=***&db=2"),
        ("unix://:s3cret@/run/redis/redis.sock?db=0", "unix://:***@/run/redis/redis.sock?db=0"),
        ("unix:///run/redis/redis.sock?password=s3cret", "unix:///run/redis/redis.sock?password=***"),
        ("unix:///run/redis@main/redis.sock", "unix:///run/redis@main/redis.sock"),
        ("redis://us%3Aer:s3cr%40et@host", "redis://us%3Aer:***@host"),
        ("redis://:s3cret@[::1]:6379/0", "redis://:***@[::1]:6379/0"),
        # Unencoded / ? # in a password end the authority early: hide up to the last "@".
        ("redis://:s3/cret@host:6379/0", "redis://:***@host:6379/0"),
        ("redis://user:s3?cret@host", "redis://user:***@host"),
        ("redis://:s3#cret@host", "redis://:***@host"),
        ("redis://:s3cret@host:99999", "redis://:***@host:99999"),  # a bad port: still shown, for the error
        ("  redis://:s3c\tret@host", "redis://:***@host"),  # read as urlsplit reads it
        ("redis://host:6379/0", "redis://host:6379/0"),
        ("redis://user:@host", "redis://user:@host"),
        ("localhost:6379", "localhost:6379"),
        # Mistyped slashes: the password is hidden all the same.
        ("redis:/user:s3cret@host", "redis:/user:***@host"),
        ("redis:user:s3cret@host:6379/0", "redis:user:***@host:6379/0"),
        ("redis:///user:s3cret@host", "redis:///user:***@host"),
        ("REDIS:/:s3cret@host", "REDIS:/:***@host"),
        ("rediss:/s3cret@host", "rediss:/***@host"),
        ("redis:\\\\user:s3cret@host", "redis:\\\\user:***@host"),
        ("unix:/:s3cret@/run/redis.sock", "unix:/:***@/run/redis.sock"),
        # A "#" in the password, then the real query: its secret is hidden too.
        ("redis://user:s3#cret@host?password=s3cret", "redis://user:***@host?password=***"),
    ],
)
@pytest.mark.fast
def test_redact_url_hides_every_credential(url: str, shown: str) -> None:
    assert redact_url(url) == shown


# ---------------------------------------------------------------- real commands, real Redis


def hostile_lease(instance: str) -> bytes:
    """A lease as a supervisor writes it, with hostile text wherever a string goes."""
    worker = {"slot": 0, "pid": 4242, "heartbeat_age": 0.5, "processing_list": "p" + HOSTILE["erase_line"]}
    return json.dumps({
        "instance": instance, "host": "box" + HOSTILE["title"], "host_id": "box", "pid": 4242,
        "started_at": 0, "updated_at": 0, "ready": True, "desired_workers": 1, "task_timeout": 300,
        "lease_ttl": 15, "workers": [worker], "ledger": {**worker, "pid": 4243},
    }).encode()


def test_status_dead_list_and_check_show_hostile_text_escaped(redis_server, redis_client, queue_name, tmp_path):
    keys = QueueKeys(queue_name)
    redis_client.rpush(keys.dead, dead_letter_entry(
        failed_at=datetime.now(timezone.utc), task_id="t1", request_id="req" + HOSTILE["title"],
        image_id="img" + HOSTILE["erase_line"] + HOSTILE["carriage_return"], attempts=1,
        error="bad" + HOSTILE["c1_csi"] + HOSTILE["backspaces"] + HOSTILE["bidi_override"], message=b"{}",
    ))
    redis_client.rpush(keys.host("gone" + HOSTILE["title"]), b"{}")
    instance = "sup" + HOSTILE["erase_line"]
    redis_client.set(keys.lease(instance), hostile_lease(instance), ex=60)
    # `check` reads the instance from OUTPUT_DIR's lock; this test process is its live "supervisor".
    (tmp_path / LOCK_NAME).write_text(json.dumps({"instance": "other" + HOSTILE["title"], "pid": os.getpid()}))

    def run(*args: str):
        done = operator_command(*args, redis_url=redis_server.url, queue=queue_name, output_dir=tmp_path)
        assert "Traceback" not in done.stderr, done.stderr
        assert not RAW_CONTROL.search(done.stdout + done.stderr), repr(done.stdout + done.stderr)
        return done

    listing = run("dead", "list").stdout
    assert "req\\x1b]0;pwned\\x07" in listing and "img\\x1b[2Kok\\rfake" in listing
    assert "bad\\x9b31mabc\\x08\\x08\\x08xyz\\u202egnp.exe" in listing
    status = run("status").stdout
    assert "host gone\\x1b]0;pwned\\x07: 1 waiting" in status
    assert "supervisor sup\\x1b[2K on box\\x1b]0;pwned\\x07" in status
    unhealthy = run("check")
    assert unhealthy.returncode == 1 and "supervisor other\\x1b]0;pwned\\x07 has not renewed" in unhealthy.stderr
    # Scripts get the exact text, JSON-escaped.
    (entry,) = [json.loads(line) for line in run("dead", "list", "--json").stdout.splitlines()]
    assert entry["request_id"] == "req" + HOSTILE["title"]
    report = json.loads(run("status", "--json").stdout)
    assert report["supervisors"][0]["host"] == "box" + HOSTILE["title"]


def test_dead_list_shows_lone_surrogates_escaped(redis_server, redis_client, queue_name, tmp_path):
    """JSON can carry a lone surrogate ("\\ud800"), which UTF-8 cannot encode:
    printed raw it raised, or became the C1 byte 0x9b; `dead list` must go on."""
    keys = QueueKeys(queue_name)
    for request_id in ("\ud800-lone", "\udc9b2J\udc9b31mRED"):
        redis_client.rpush(keys.dead, dead_letter_entry(
            failed_at=datetime.now(timezone.utc), task_id="t", request_id=request_id, image_id="x", attempts=1,
            error="bad", message=json.dumps({"request_id": request_id}).encode(),
        ))
    done = operator_command("dead", "list", redis_url=redis_server.url, queue=queue_name, output_dir=tmp_path)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert "\\ud800-lone" in done.stdout and "\\udc9b2J\\udc9b31mRED" in done.stdout
    assert not RAW_CONTROL.search(done.stdout)


def test_hostile_ids_through_a_real_pool_reach_no_terminal_raw(pool_factory, redis_client, queue_name):
    pool = pool_factory(workers=1, env={"LOG_FORMAT": "console"})
    pool.wait_ready()
    # No shm_info and no image_url: the pool fails it and dead-letters it, ids and all.
    push(redis_client, queue_name, {"request_id": "req" + HOSTILE["title"], "image_id": "".join(HOSTILE.values())})
    wait_for_records(pool.output_dir, 1, pool=pool)
    wait_until(lambda: redis_client.llen(QueueKeys(queue_name).dead) == 1, 10, "no dead letter")
    listing = command(pool, "dead", "list")
    assert listing.returncode == 0 and not RAW_CONTROL.search(listing.stdout + listing.stderr)
    assert "req\\x1b]0;pwned\\x07" in listing.stdout and "\\x1b[2Kok\\rfake" in listing.stdout
    assert pool.stop() == 0
    log = pool.stderr_text()
    assert "req\\x1b]0;pwned\\x07" in log, log
    assert not RAW_CONTROL.search(log), repr(log)


@pytest.mark.fast
def test_client_prints_records_escaped(capsys, tmp_path) -> None:
    records = [
        {"status": "failed", "request_id": "req" + HOSTILE["title"], "error": "cannot decode" + HOSTILE["erase_line"]},
        {"status": "completed", "request_id": "ok", "file_path": str(tmp_path / ("a" + HOSTILE["bidi_override"]))},
    ]

    class RecordsAlreadyIn:
        def wait(self, submissions, *, output_dir, timeout, on_progress):
            on_progress(records, len(records))
            return records

    assert client_main.wait_and_report(RecordsAlreadyIn(), [None, None], output_dir=tmp_path, timeout=1) == 1
    out = capsys.readouterr().out
    assert not RAW_CONTROL.search(out)
    assert "req\\x1b]0;pwned\\x07 cannot decode\\x1b[2K" in out and "a\\u202egnp.exe" in out


@pytest.fixture
def protected_user(redis_client):
    """A user of the private Redis whose password is not s3cret, so AUTH with it really fails."""
    redis_client.acl_setuser("irw_app", enabled=True, passwords=["+right-pw"], keys=["*"], commands=["+@all"])
    try:
        yield "irw_app"
    finally:
        redis_client.acl_deluser("irw_app")


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:{port}/0?username=irw_app&password=s3cret",
        "redis://irw_app:s3cret@127.0.0.1:{port}/0",
        "redis://s3cret@127.0.0.1:{port}/0",  # redis-py sends it to AUTH
        "redis://:s3cret@127.0.0.1:{free}/0",  # nobody listens
        "redis://:s3cret@127.0.0.1:99999/0",  # a configuration error
        "redis:/irw_app:s3cret@127.0.0.1:{port}/0",  # one slash: a configuration error
        "redis:///irw_app:s3cret@127.0.0.1",  # three
    ],
)
def test_status_never_prints_the_password_in_redis_url(redis_server, protected_user, queue_name, tmp_path, url):
    url = url.format(port=redis_server.port, free=free_port())
    done = operator_command("status", redis_url=url, queue=queue_name, output_dir=tmp_path)
    assert done.returncode in (1, 2) and len(done.stderr.splitlines()) == 1, done.stderr
    assert "s3cret" not in done.stdout + done.stderr and "***" in done.stderr, done.stderr


def test_a_pool_refused_by_redis_never_logs_the_password(pool_factory, redis_server, protected_user):
    url = f"redis://127.0.0.1:{redis_server.port}/0?username={protected_user}&password=s3cret"
    pool = pool_factory(workers=1, env={"REDIS_URL": url})
    # A wrong password is a setting to correct: one line naming REDIS_URL, exit 2.
    assert pool.wait_exit(20) == 2
    shown = f"REDIS_URL='redis://127.0.0.1:{redis_server.port}/0?username={protected_user}&password=***'"
    assert shown in pool.stderr_text(), pool.stderr_text()
    assert "s3cret" not in pool.stderr_text() + pool.stdout_path.read_text(), pool.stderr_text()
    assert not any("s3cret" in notice for notice in pool.notifications())


def test_the_console_log_fits_a_wide_terminal_and_keeps_paths_whole(tmp_path) -> None:
    """On a 300-column terminal the pool's console lines use its width: a long
    OUTPUT_DIR is shown whole, not cut to fit 120 columns."""
    output_dir = tmp_path / "output" / "translated"
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 300, 0, 0))
    env = environment_without()
    env.pop("COLUMNS", None)
    env.update(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0", OUTPUT_DIR=str(output_dir), LOG_FORMAT="auto")
    proc = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "supervisor.py"), "--workers", "1"],
        cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave,
        start_new_session=True,
    )
    os.close(slave)
    seen = b""
    try:
        deadline = time.monotonic() + 30
        while b"redis_unavailable" not in seen and time.monotonic() < deadline:
            if select.select([master], [], [], 0.5)[0]:
                seen += os.read(master, 65536)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    text = re.sub(r"\x1b\[[0-9;]*m", "", seen.decode(errors="replace"))
    [line] = [line for line in text.splitlines() if "supervisor_starting" in line]
    assert f"output_dir={output_dir} " in line, line
    assert len(line) <= 300, line
