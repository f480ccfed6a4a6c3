"""What every command line of the project shares: usage errors are one line
on stderr and exit code 2, never a traceback or a usage screen."""

from __future__ import annotations

import argparse
import sys
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
