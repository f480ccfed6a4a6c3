"""What every command line of the project shares: usage errors are one line
on stderr and exit code 2, never a traceback or a usage screen."""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from shared import exitcodes

PROGRAM = "image-result-worker"


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"{PROGRAM}: {message}; see --help", file=sys.stderr)
        sys.exit(exitcodes.CONFIG_ERROR)


def complain(message: object) -> None:
    """One line on stderr, in the project's voice."""
    print(f"{PROGRAM}: {message}", file=sys.stderr)


def unknown_command(word: str, commands: Sequence[str]) -> str:
    """The one line for a mistyped command: `unknown command 'stauts'; did you mean 'status'?`."""
    close = difflib.get_close_matches(word, commands, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}?" if close else f"expected one of {', '.join(commands)}, or options only"
    return f"unknown command {word!r}; {hint}"


def explain_a_missing_package() -> None:
    """Make an uncaught ModuleNotFoundError one line and exit 2: `python
    supervisor.py` run by an interpreter without our dependencies (not .venv's)
    otherwise ends in a traceback from its first third-party import."""

    def hook(kind: type[BaseException], exc: BaseException, traceback: object) -> None:
        if not isinstance(exc, ModuleNotFoundError):
            sys.__excepthook__(kind, exc, traceback)  # type: ignore[arg-type]
            return
        complain(
            f"{sys.executable} has no module {exc.name!r}: run .venv/bin/python (`make venv` builds it), "
            "or pip install -r requirements.txt into this interpreter"
        )
        sys.stderr.flush()
        os._exit(exitcodes.CONFIG_ERROR)  # at import time: nothing to clean up

    sys.excepthook = hook
