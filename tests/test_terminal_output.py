"""Text from the queue reaches terminals escaped; Redis credentials never reach them.

Whoever can write to Redis picks image ids, request ids, errors, host ids and
list names. Fast tests pin the escaping function, the console log processor and
redact_url; real-process tests put hostile text into a private redis-server (and
through a real pool) and read what `status`, `dead list` and the pool print.
"""

from __future__ import annotations

import json
import os
import re
from datetime import datetime, timezone

import pytest
import structlog

import client.__main__ as client_main
from shared.config import Settings
from shared.logs import configure_logging, escape_for_terminal
from shared.output import LOCK_NAME
from shared.records import dead_letter_entry
from shared.redis_queue import QueueKeys
from shared.terminal import has_control, printable
from tests.helpers import push, wait_for_records, wait_until
from tests.test_operator_commands import command, operator_command

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
    ],
)
def test_printable_shows_control_characters_as_escapes(text: str, shown: str) -> None:
    assert printable(text) == shown
    assert has_control(text) == (text != shown)


def test_printable_leaves_no_control_character_in_the_first_planes() -> None:
    every = "".join(chr(code) for code in range(0x3000))
    assert not RAW_CONTROL.search(printable(every).replace("\n", ""))
    assert not has_control(printable(every))


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


def test_console_log_shows_hostile_values_escaped(console_log, capsys) -> None:
    log = console_log("console")
    log.warning("task_failed", **HOSTILE, attempts=3, detail={"id": "\x1b[2K"})
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and not RAW_CONTROL.search(err)
    assert "title='\\x1b]0;pwned\\x07'" in err and "carriage_return='ok\\rfake'" in err
    assert "bidi_override='\\u202egnp.exe'" in err and "attempts=3" in err


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


def test_console_log_in_colour_adds_only_its_own_colour_codes() -> None:
    render = structlog.dev.ConsoleRenderer(colors=True)
    line = render(None, "warning", escape_for_terminal(None, "warning", {"event": "task_failed", **HOSTILE}))
    assert not RAW_CONTROL.search(re.sub(r"\x1b\[[0-9;]*m", "", line))


def test_json_log_keeps_hostile_values_exact_and_escaped(console_log, capsys) -> None:
    log = console_log("json")
    log.warning("task_failed", **HOSTILE)
    err = capsys.readouterr().err
    assert not RAW_CONTROL.search(err)
    event = json.loads(err)
    assert {key: event[key] for key in HOSTILE} == HOSTILE


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
