"""Text from the queue, made safe to show on a terminal.

Whoever can RPUSH to Redis chooses image ids, request ids, error texts, host
ids and list names, and those reach operators' terminals through the commands'
output and the console log. A terminal obeys what it is sent: an OSC sequence
(ESC ] 0 ; ... BEL) retitles the window, ESC [ 2K erases the line, a carriage
return or backspaces overwrite what was printed, a C1 byte such as 0x9b is ESC [
to some terminals, and a bidi override (U+202E) reorders what is shown. So every
printer passes its text through `printable`, which shows each such character as
a visible escape (\\x1b, \\r, \\u202e) instead of sending it. Machine output
(`--json`, JSON log lines) needs nothing more: json.dumps escapes them already.
"""

from __future__ import annotations

import re
import sys
from typing import TextIO

_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}
_BIDI = [0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)]
# Line and paragraph separators break a line on some terminals. A lone
# surrogate (JSON's "\ud800") cannot be encoded as UTF-8: printed, it raises,
# or with surrogateescape becomes a raw byte such as 0x9b, a C1 control.
_BREAKS_AND_SURROGATES = [0x2028, 0x2029, *range(0xD800, 0xE000)]
_UNSAFE_CODES = [*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0), *_BIDI, *_BREAKS_AND_SURROGATES]


def _escape(code: int) -> str:
    char = chr(code)
    if char in _NAMED:
        return _NAMED[char]
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


_ESCAPES = {code: _escape(code) for code in _UNSAFE_CODES}
_ESCAPES_BUT_NEWLINE = {code: text for code, text in _ESCAPES.items() if code != ord("\n")}
_UNSAFE = re.compile("[" + "".join(re.escape(chr(code)) for code in _UNSAFE_CODES if code < 0xD800) + "\ud800-\udfff]")


def printable(text: str, *, multiline: bool = False) -> str:
    """`text` with every control character (C0, DEL, C1), bidi control, line
    separator and lone surrogate shown as an escape; newlines are kept when `multiline` (a traceback), escaped
    otherwise, so one value can never paint a line of its own."""
    return text.translate(_ESCAPES_BUT_NEWLINE if multiline else _ESCAPES)


def has_control(text: str) -> bool:
    """Whether `printable` would change `text`."""
    return _UNSAFE.search(text) is not None


def say(text: str, *, file: TextIO | None = None) -> None:
    """Print one line of a command's output for a person, made printable."""
    print(printable(text), file=sys.stdout if file is None else file)
