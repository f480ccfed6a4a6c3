"""structlog set-up, done once per process after fork.

JSON lines when stderr is not a terminal (journald, containers, log shippers),
readable console lines on a terminal; LOG_FORMAT forces either. Events are short
snake_case names with fields; the task loop binds request_id and image_id.
"""

from __future__ import annotations

import logging
import sys

import structlog

from shared.config import Settings
from shared.terminal import has_control, printable

_PLAIN_TYPES = (bool, int, float, type(None))
_MULTILINE_KEYS = ("exception", "stack")  # tracebacks: their own lines are real


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
        else [escape_for_terminal, structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())]
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            *renderers,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        # Caching is safe: configure runs once per process, after fork.
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(role=role)
