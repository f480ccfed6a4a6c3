"""The console log's width: long values cut in the middle to fit the terminal
(120 columns off a terminal), ids and JSON untouched."""

from __future__ import annotations

import json
import re

import pytest
import structlog

from shared.config import Settings
from shared.logs import CONSOLE_COLUMNS, FittedConsoleRenderer, configure_logging

pytestmark = pytest.mark.fast
COLOUR = re.compile(r"\x1b\[[0-9;]*m")
LONG_PATH = "/var/lib/image-result-worker/translated/" + "deep/" * 20
OOM = "killed by SIGKILL from outside (the out-of-memory killer, if no operator sent it)"


@pytest.fixture
def logged(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
    """Log one event as a process configured with LOG_FORMAT would; returns what stderr got."""
    monkeypatch.delenv("COLUMNS", raising=False)

    def log(log_format: str, event: str, **fields: object) -> str:
        configure_logging(Settings(log_format=log_format, log_level="DEBUG"), role="supervisor")
        structlog.get_logger().info(event, **fields)
        return capsys.readouterr().err

    try:
        yield log
    finally:
        structlog.reset_defaults()
        structlog.contextvars.clear_contextvars()


def test_a_long_value_is_cut_to_fit_and_the_json_line_keeps_it(logged):
    line = logged("console", "tasks_requeued", processing_list=LONG_PATH, tasks=3)
    assert len(line.rstrip("\n")) == CONSOLE_COLUMNS and line.count("\n") == 1, line
    assert "processing_list=/var/lib/ima\u2026p/deep/deep/ " in line and "tasks=3" in line
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[info\s*\] tasks_requeued ", line), line
    assert json.loads(logged("json", "tasks_requeued", processing_list=LONG_PATH))["processing_list"] == LONG_PATH


def test_why_is_cut_last_and_least_and_ids_never(logged):
    """A line of many fields may stay wider: no value is cut below a readable length."""
    line = logged("console", "child_died", cause=OOM, exit_code=-9, pid=12345, slot=0, processing_list=LONG_PATH)
    fields = dict(re.findall(r"(\w+)=(\S+(?: (?!\w+=)\S+)*)", line))
    assert len(fields["processing_list"]) == 24 and len(fields["cause"]) == 40, fields
    assert fields["cause"].startswith("killed by") and fields["cause"].endswith("operator sent it)")
    assert "\u2026" in fields["cause"] and "exit_code=-9 pid=12345" in line
    request_id = "req_" + "7" * 60
    line = logged("console", "task_failed", request_id=request_id, error="HTTP 404 " * 20)
    assert f"request_id={request_id} " in line and "error=HTTP 404 HTTP 404" in line


def test_a_short_line_is_left_alone(logged):
    line = logged("console", "pool_ready", workers=2)
    assert "\u2026" not in line and line.rstrip("\n").endswith("role=supervisor workers=2")


def test_colour_codes_take_no_columns():
    render = FittedConsoleRenderer(colors=True)
    line = render(None, "info", {"event": "supervisor_starting", "timestamp": "2026-12-02 06:19:00",
                                 "level": "info", "output_dir": LONG_PATH, "role": "supervisor"})
    assert COLOUR.search(line) and len(COLOUR.sub("", line)) <= CONSOLE_COLUMNS
