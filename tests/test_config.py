"""Settings: defaults, .env overlay, one-line errors, and the supervisor's exit 2 on bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import fields
from pathlib import Path

import pytest

from shared.config import ConfigError, Settings, redact_url
from tests.helpers import POOL_ENV_VARS, REPO_ROOT

SUPERVISOR = REPO_ROOT / "supervisor.py"
# Never the developer's Redis on 6379: should a bad value slip through, the
# supervisor would try this closed port instead.
UNREACHABLE_REDIS = "redis://127.0.0.1:1"


def settings(env: Mapping[str, str], dotenv_path: Path | None = None) -> Settings:
    return Settings.from_env(env, dotenv_path=dotenv_path)


# ---------------------------------------------------------------- from_env


def test_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    s = settings({})
    assert s.redis_url == "redis://localhost:6379"
    assert s.queue == "hosting_tasks"
    assert s.output_dir == tmp_path.resolve() / "output" / "translated"
    assert s.output_dir.is_absolute()
    assert s.jpeg_quality == 80
    assert s.log_level == "INFO"
    assert s.workers == os.cpu_count()


def test_environment_wins_over_dotenv(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("JPEG_QUALITY=50\nLOG_LEVEL=DEBUG\n")
    s = settings({"JPEG_QUALITY": "90"}, dotenv_path=dotenv)
    assert s.jpeg_quality == 90
    assert s.log_level == "DEBUG"  # not in the environment: .env still counts


def test_missing_dotenv_is_fine(tmp_path: Path) -> None:
    assert settings({}, dotenv_path=tmp_path / "absent.env").jpeg_quality == 80


@pytest.mark.parametrize(
    ("name", "value", "accepted"),
    [
        ("JPEG_QUALITY", "0", "1..100"),
        ("JPEG_QUALITY", "500", "1..100"),
        ("JPEG_QUALITY", "abc", "1..100"),
        ("WORKERS", "0", "1..256"),
        ("WORKERS", "abc", "1..256"),
        ("REDIS_URL", "http://x", "redis://"),
        ("REDIS_URL", "ftp://h", "redis://"),
        ("REDIS_URL", "redis://:secret@host:99999", "redis://"),
        ("LOG_LEVEL", "LOUD", "INFO"),
        ("UNLINK_SHM", "maybe", "true or false"),
    ],
)
def test_invalid_value_names_variable_and_accepted_range(name: str, value: str, accepted: str) -> None:
    with pytest.raises(ConfigError) as caught:
        settings({name: value})
    message = str(caught.value)
    assert name in message
    assert accepted in message
    assert "\n" not in message


def test_error_for_bad_redis_url_hides_password() -> None:
    with pytest.raises(ConfigError) as caught:
        settings({"REDIS_URL": "redis://:secret@host:99999"})
    assert "secret" not in str(caught.value)


def test_redact_url_hides_password() -> None:
    redacted = redact_url("redis://user:pw@h:6379/0")
    assert "pw" not in redacted
    assert redacted == "redis://user:***@h:6379/0"


# ---------------------------------------------------------------- supervisor.py


def run_supervisor(tmp_path: Path, args: Sequence[str] = (), env: Mapping[str, str] | None = None) -> tuple[int, str, float]:
    """Run supervisor.py from tmp_path (so no developer .env is read); returns (code, stderr, seconds).

    Its own session, killed in `finally`: a bad value that slipped through would
    otherwise leave a pool running.
    """
    child_env = {k: v for k, v in os.environ.items() if k not in POOL_ENV_VARS}
    child_env.update(REDIS_URL=UNREACHABLE_REDIS, OUTPUT_DIR=str(tmp_path / "out"))
    child_env.update(env or {})
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, str(SUPERVISOR), *args],
        cwd=tmp_path,
        env=child_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        _, stderr = proc.communicate(timeout=10)
        return proc.returncode, stderr.decode(errors="replace"), time.monotonic() - started
    except subprocess.TimeoutExpired:
        pytest.fail("supervisor.py was still running after 10 s")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


@pytest.mark.parametrize(
    ("env", "args", "named"),
    [
        ({"JPEG_QUALITY": "0"}, (), "JPEG_QUALITY"),
        ({"JPEG_QUALITY": "500"}, (), "JPEG_QUALITY"),
        ({"WORKERS": "0"}, (), "WORKERS"),
        ({"WORKERS": "abc"}, (), "WORKERS"),
        ({"REDIS_URL": "foo://x"}, (), "REDIS_URL"),
        ({}, ("--workers", "abc"), "--workers"),
        ({}, ("--bogus-flag",), "--bogus-flag"),
    ],
    ids=["quality-0", "quality-500", "workers-0", "workers-abc", "redis-foo", "flag-workers-abc", "flag-bogus"],
)
def test_supervisor_rejects_bad_input_with_one_line_and_exit_2(
    tmp_path: Path, env: dict[str, str], args: tuple[str, ...], named: str
) -> None:
    code, stderr, seconds = run_supervisor(tmp_path, args, env)
    assert code == 2, stderr
    assert len(stderr.splitlines()) == 1, stderr
    assert named in stderr
    assert "Traceback" not in stderr
    assert seconds < 5
    assert not (tmp_path / "out").exists()  # refused before touching OUTPUT_DIR


def test_example_env_lists_every_setting_with_its_default() -> None:
    """configs/example.env is the documented list: it must parse to the defaults
    and name every field of Settings."""
    example = Path(__file__).resolve().parent.parent / "configs" / "example.env"
    assert Settings.from_env({}, dotenv_path=example) == Settings.from_env({}, dotenv_path=None)
    names = {line.split("=", 1)[0] for line in example.read_text().splitlines() if "=" in line and not line.startswith("#")}
    assert len(names) == len(fields(Settings))
