"""structlog set-up, done once per process after fork.

JSON lines when stderr is not a terminal (journald, containers, log shippers),
readable console lines on a terminal; LOG_FORMAT forces either. Events are short
snake_case names with fields; the task loop binds request_id and image_id.

A console line is made to fit the terminal's width (CONSOLE_COLUMNS when
stderr is not a terminal and COLUMNS is not set) where it can: a shorter time
stamp, and long values cut in the middle with an ellipsis, so that a path keeps
its file name and an error its reason ("... Connection refused."), the longest
first, what says why (error, cause, reason) last, never below a readable
length, and never an id (request_id, image_id, task_id: what a line is
searched by). A line of many fields can still be wider. A JSON line always
carries every value whole.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

import structlog

from image_result_client.terminal import has_control, printable
from shared.config import Settings

_PLAIN_TYPES = (bool, int, float, type(None))
_MULTILINE_KEYS = ("exception", "stack")  # tracebacks: their own lines are real
CONSOLE_COLUMNS = 120
PAD_EVENT = 22
# Values that say why the line was logged: cut after every other, and less.
_REASON_KEYS = ("error", "cause", "reason")
_SHORTEST_CUT = 24  # characters a cut value keeps, ellipsis included
_SHORTEST_CUT_REASON = 40
# Never cut: what a line is searched by, and what a line cannot do without.
_FIXED_KEYS = ("timestamp", "level", "event", "request_id", "image_id", "task_id", *_MULTILINE_KEYS)


class _Shown:
    """A value already rendered: the console renderer shows its repr as is."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text

    __str__ = __repr__


def escape_for_terminal(
    _logger: object, _method: str, event_dict: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    """Before ConsoleRenderer: no value may carry a raw control character.

    A string with one is shown as its repr, quoted and escaped, as the renderer
    already shows a string with a line break; any other value's repr is escaped
    too, in case a class's __repr__ passes text through.
    """
    for key, value in event_dict.items():
        if key in _MULTILINE_KEYS and isinstance(value, str):
            event_dict[key] = printable(value, multiline=True)
        elif isinstance(value, _PLAIN_TYPES) or (isinstance(value, str) and not has_control(value)):
            continue
        else:
            shown = repr(value)
            if isinstance(value, str) or has_control(shown):
                event_dict[key] = _Shown(printable(shown))
    return event_dict


class FittedConsoleRenderer:
    """structlog's ConsoleRenderer, with long values cut (see the top of this
    module) so that the line fits `columns` where it can. Runs after
    escape_for_terminal: what it cuts is already printable."""

    def __init__(self, *, colors: bool, columns: int = CONSOLE_COLUMNS) -> None:
        self.columns = columns
        self._render = structlog.dev.ConsoleRenderer(colors=colors, pad_event_to=PAD_EVENT)
        # Measured without colour codes, which take no columns.
        self._measure = structlog.dev.ConsoleRenderer(colors=False, pad_event_to=PAD_EVENT) if colors else self._render

    def __call__(self, logger: object, method: str, event_dict: structlog.typing.EventDict) -> str:
        first_line = self._measure(logger, method, dict(event_dict)).split("\n", 1)[0]
        excess = len(first_line) - self.columns
        if excess > 0:
            _cut_values(event_dict, excess)
        return self._render(logger, method, event_dict)


def _cut_values(event_dict: structlog.typing.EventDict, excess: int) -> None:
    """Cut the longest values until `excess` characters are gone or none is left to cut."""
    shown = {key: _as_shown(value) for key, value in event_dict.items() if key not in _FIXED_KEYS}
    for reasons in (False, True):
        shortest = _SHORTEST_CUT_REASON if reasons else _SHORTEST_CUT
        keys = [key for key in shown if (key in _REASON_KEYS) == reasons]
        while excess > 0:
            key = max(keys, key=lambda k: len(shown[k]), default=None)
            if key is None or len(shown[key]) <= shortest:
                break
            keep = max(shortest, len(shown[key]) - excess)
            excess -= len(shown[key]) - keep
            shown[key] = cut_in_the_middle(shown[key], keep)
            event_dict[key] = _Shown(shown[key])


def cut_in_the_middle(text: str, keep: int) -> str:
    """`text` in `keep` characters: its start and its end, an ellipsis between.
    The end is where a path has its file name and an error message its reason."""
    head = (keep - 1) // 2
    tail = keep - 1 - head
    return text[:head] + "\u2026" + (text[-tail:] if tail else "")


def console_columns(stream: TextIO) -> int:
    """The width a console line should fit: the terminal's, else COLUMNS, else CONSOLE_COLUMNS."""
    try:
        if stream.isatty():
            return os.get_terminal_size(stream.fileno()).columns or CONSOLE_COLUMNS
    except (OSError, ValueError):
        pass
    columns = os.environ.get("COLUMNS", "")
    return int(columns) if columns.isdigit() and int(columns) > 0 else CONSOLE_COLUMNS


def _as_shown(value: object) -> str:
    """A value as the console renderer shows it: a string as it is, anything else by repr."""
    return value if isinstance(value, str) else repr(value)


class LogStream:
    """stderr as the logger writes to it: once the reader of a pipe is gone
    (`make run 2>&1 | tee log`, then Ctrl-C ends tee as well), a line is
    dropped rather than raised as BrokenPipeError into the code that logged,
    so that a drain still finishes: records flushed, tasks put back, the lease
    dropped. From then on the descriptor is /dev/null, so that neither this
    process's later lines nor the interpreter's flush at exit (exit code 120)
    meets the broken pipe again, nor the children forked afterwards."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> None:
        try:
            self._stream.write(text)
        except BrokenPipeError:
            self._to_devnull()

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._to_devnull()

    def _to_devnull(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.dup2(devnull, self._stream.fileno())
        finally:
            os.close(devnull)


def configure_logging(settings: Settings, *, role: str) -> None:
    """Configure structlog for this process; `role` is bound to every event."""
    level = logging.getLevelName(settings.log_level)
    use_json = settings.log_format == "json" or (
        settings.log_format == "auto" and not sys.stderr.isatty()
    )
    # JSON needs no escaping: json.dumps (ensure_ascii) writes control characters as \uXXXX.
    renderers: list[structlog.typing.Processor] = (
        [structlog.processors.JSONRenderer()]
        if use_json
        else [
            escape_for_terminal,
            FittedConsoleRenderer(colors=sys.stderr.isatty(), columns=console_columns(sys.stderr)),
        ]
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            # UTC either way; on a console to the second, eight columns fewer.
            structlog.processors.TimeStamper(fmt="iso" if use_json else "%Y-%m-%d %H:%M:%S", utc=True),
            structlog.processors.format_exc_info,
            *renderers,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.WriteLoggerFactory(file=LogStream(sys.stderr)),  # type: ignore[arg-type]
        # Caching is safe: configure runs once per process, after fork.
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(role=role)
