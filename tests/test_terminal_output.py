"""Text from the queue reaches terminals escaped; Redis credentials never reach them.

Whoever can write to Redis picks image ids, request ids, errors, host ids and
list names. Fast tests pin the escaping function, the console log processor and
redact_url; real-process tests put hostile text into a private redis-server (and
through a real pool) and read what `status`, `dead list` and the pool print.
"""

from __future__ import annotations

import json
import re

import pytest
import structlog

from shared.config import Settings
from shared.logs import configure_logging, escape_for_terminal
from shared.terminal import has_control, printable

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
