"""A `.env` file read as the pool reads it: the pool (shared.config) and the
producer's CLI take their settings from the same file the same way."""

from __future__ import annotations

from pathlib import Path


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
