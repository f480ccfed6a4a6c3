"""A `.env` file read as the pool reads it: the pool (shared.config) and the
producer's CLI take their settings from the same file the same way. Also the
rule for names that are probably misspelt settings (unknown_settings)."""

from __future__ import annotations

import difflib
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

# How alike a name in `.env` must be to a setting's to count as a misspelling of
# it (WORKER: WORKERS 0.92, JPEG_QUALTY: JPEG_QUALITY 0.96), and how alike a
# setting must be to be offered as the one meant.
LOOKS_LIKE_OURS = 0.8
SUGGESTION = 0.6


class SettingsFileError(ValueError):
    """A `.env` that is there but cannot be used; the message names the file."""


def read_dotenv(path: Path) -> dict[str, str]:
    """The settings a `.env` file holds; none if there is no such file. One that
    is there but cannot be read is an error, not a silent fall back to defaults.
    Needs python-dotenv only when the file exists (ImportError otherwise)."""
    try:
        if not path.is_file():
            return {}
        from dotenv import dotenv_values

        with path.open(encoding="utf-8") as stream:
            values = dotenv_values(stream=stream)
    except OSError as exc:
        raise SettingsFileError(f"{path} cannot be read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise SettingsFileError(f"{path} is not UTF-8 text (byte {exc.start})") from None
    return {name: value for name, value in values.items() if value is not None}


@dataclass(frozen=True, slots=True)
class UnknownSetting:
    """A name that is not a setting but looks meant as one."""

    name: str
    source: str  # the .env file's path, or "environment"
    did_you_mean: str | None


def unknown_settings(
    dotenv: Mapping[str, str], environ: Mapping[str, str], known: Collection[str], *, dotenv_source: str = ".env"
) -> list[UnknownSetting]:
    """Names that are probably misspelt settings, for a warning (never a refusal:
    a `.env` or an environment may hold other programs' names).

    In `.env`, a name is suspect when it starts with one of our prefixes (the
    first word of a setting with one: REDIS_, URL_, SHM_ ...) or is close to a
    setting's name; in the environment, which holds every program's names, only
    when it starts with one of our prefixes."""
    prefixes = tuple(sorted({name.split("_", 1)[0] + "_" for name in known if "_" in name}))
    found = []
    for source, names, close_counts in ((dotenv_source, dotenv, True), ("environment", environ, False)):
        for name in sorted(set(names) - set(known)):
            close = difflib.get_close_matches(name, known, n=1, cutoff=SUGGESTION)
            looks_ours = name.startswith(prefixes) or (
                close_counts and bool(difflib.get_close_matches(name, known, n=1, cutoff=LOOKS_LIKE_OURS))
            )
            if looks_ours:
                found.append(UnknownSetting(name, source, close[0] if close else None))
    return found
