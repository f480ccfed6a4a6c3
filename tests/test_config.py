"""Settings: defaults, .env overlay, one-line errors, and the supervisor's exit 2 on bad input,
OUTPUT_DIR (checked before any fork) and a METRICS_PORT it cannot listen on included."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import pytest

from harness import REPO_ROOT
from harness.pool import POOL_ENV_VARS
from image_result_client.redact import redact_url
from shared.config import ConfigError, Settings, misspelt_settings, read_dotenv
from shared.storage.output_dir import check_output_dir
from tests.conftest import PoolFactory

SUPERVISOR = REPO_ROOT / "supervisor.py"
# Never the developer's Redis on 6379: should a bad value slip through, the
# supervisor would try this closed port instead.
UNREACHABLE_REDIS = "redis://127.0.0.1:1"


def settings(env: Mapping[str, str], dotenv_path: Path | None = None) -> Settings:
    return Settings.from_env(env, dotenv_path=dotenv_path)


# ---------------------------------------------------------------- from_env


@pytest.mark.fast
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


@pytest.mark.fast
def test_environment_wins_over_dotenv(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("JPEG_QUALITY=50\nLOG_LEVEL=DEBUG\n")
    s = settings({"JPEG_QUALITY": "90"}, dotenv_path=dotenv)
    assert s.jpeg_quality == 90
    assert s.log_level == "DEBUG"  # not in the environment: .env still counts


@pytest.mark.fast
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
        ("JPEG_SUBSAMPLING", "411", "444, 422, 420"),
        ("JPEG_SUBSAMPLING", "4:4:4", "444, 422, 420"),
        ("JPEG_PROGRESSIVE", "maybe", "true or false"),
        ("ALPHA_BACKGROUND", "red", "#RRGGBB"),
        ("ALPHA_BACKGROUND", "#fff", "#RRGGBB"),
    ],
)
@pytest.mark.fast
def test_invalid_value_names_variable_and_accepted_range(name: str, value: str, accepted: str) -> None:
    with pytest.raises(ConfigError) as caught:
        settings({name: value})
    message = str(caught.value)
    assert name in message
    assert accepted in message
    assert "\n" not in message


@pytest.mark.fast
def test_error_for_bad_redis_url_hides_password() -> None:
    with pytest.raises(ConfigError) as caught:
        settings({"REDIS_URL": "redis://:secret@host:99999"})
    assert "secret" not in str(caught.value)


@pytest.mark.fast
def test_redact_url_hides_password() -> None:
    redacted = redact_url("redis://user:pw@h:6379/0")
    assert "pw" not in redacted
    assert redacted == "redis://user:***@h:6379/0"


@pytest.mark.fast
def test_misspelt_setting_names_are_found_with_the_name_meant(tmp_path: Path) -> None:
    """In .env, a name close to a setting's or with our prefix; in the environment
    (every program's names), only one with our prefix. Others' names pass."""
    dotenv = tmp_path / ".env"
    dotenv.write_text("WORKER=3\nJPEG_QUALTY=95\nCOMPOSE_PROJECT_NAME=x\nWORKERS=2\n")
    environ = {"PATH": "/bin", "LOGNAME": "me", "HOSTNAME": "h", "SHM_PREFIX": "img_", "WORKR": "2"}

    found = {(u.name, u.source, u.did_you_mean) for u in misspelt_settings(environ, dotenv_path=dotenv)}

    assert found == {
        ("WORKER", str(dotenv), "WORKERS"),
        ("JPEG_QUALTY", str(dotenv), "JPEG_QUALITY"),
        ("SHM_PREFIX", "environment", "SHM_NAME_PREFIX"),
    }


def test_pool_warns_about_misspelt_settings_and_runs(pool_factory: PoolFactory, tmp_path: Path) -> None:
    """WORKER=3 and JPEG_QUALTY=95 in .env, URL_MAX_REDIRECT in the environment:
    the pool starts (with the defaults) and says, for each, which setting was meant."""
    workdir = tmp_path / "here"
    workdir.mkdir()
    (workdir / ".env").write_text("WORKER=3\nJPEG_QUALTY=95\n")
    pool = pool_factory(cwd=workdir, env={"URL_MAX_REDIRECT": "5"})
    pool.wait_ready()

    warned = {(e["name"], e["source"], e["did_you_mean"]) for e in pool.events("unknown_setting")}

    assert warned == {
        ("WORKER", ".env", "WORKERS"),
        ("JPEG_QUALTY", ".env", "JPEG_QUALITY"),
        ("URL_MAX_REDIRECT", "environment", "URL_MAX_REDIRECTS"),
    }
    assert all(e["level"] == "warning" for e in pool.events("unknown_setting"))
    assert pool.stop() == 0


# ---------------------------------------------------------------- supervisor.py


def run_supervisor(
    tmp_path: Path,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    *,
    wrapper: Sequence[str] = (),
    popen: Mapping[str, Any] | None = None,
) -> tuple[int, str, float]:
    """Run supervisor.py from tmp_path (so no developer .env is read); returns (code, stderr, seconds).

    `wrapper` goes before the command (e.g. unshare), `popen` into Popen (e.g. user=).
    Its own session, killed in `finally`: a bad value that slipped through would
    otherwise leave a pool running.
    """
    child_env = {k: v for k, v in os.environ.items() if k not in POOL_ENV_VARS}
    child_env.update(REDIS_URL=UNREACHABLE_REDIS, OUTPUT_DIR=str(tmp_path / "out"))
    child_env.update(env or {})
    started = time.monotonic()
    proc = subprocess.Popen(
        [*wrapper, sys.executable, str(SUPERVISOR), *args],
        cwd=tmp_path,
        env=child_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
        **(popen or {}),
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
        ({"JPEG_SUBSAMPLING": "411"}, (), "JPEG_SUBSAMPLING"),
        ({"ALPHA_BACKGROUND": "transparent"}, (), "ALPHA_BACKGROUND"),
        ({}, ("--workers", "abc"), "--workers"),
        ({}, ("--bogus-flag",), "--bogus-flag"),
        # str.isdigit() takes superscripts, which int() refuses: these were tracebacks.
        ({"REDIS_SENTINELS": "h:\u00b2"}, (), "REDIS_SENTINELS"),
        ({"SHM_OWNER_UIDS": "\u00b2"}, (), "SHM_OWNER_UIDS"),
    ],
    ids=["quality-0", "quality-500", "workers-0", "workers-abc", "redis-foo", "subsampling-411", "background-transparent",
         "flag-workers-abc", "flag-bogus", "sentinel-port-superscript", "uid-superscript"],
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


@pytest.mark.parametrize("args", [(), ("status",), ("dead", "list")], ids=["pool", "status", "dead-list"])
def test_a_dotenv_that_is_not_text_is_one_line_naming_it_and_exit_2(tmp_path: Path, args: tuple[str, ...]) -> None:
    (tmp_path / ".env").write_bytes(b"\xff\xfeWORKERS=2\n")  # UTF-16 saved by an editor
    code, stderr, _ = run_supervisor(tmp_path, args)
    assert code == 2, stderr
    assert stderr.strip() == "image-result-worker: .env is not UTF-8 text (byte 0)"
    assert not (tmp_path / "out").exists()


@pytest.mark.fast
def test_dotenv_reading_gives_its_settings_or_a_one_line_error(tmp_path: Path) -> None:
    assert read_dotenv(tmp_path / "absent.env") == {}
    (tmp_path / "a.env").write_text("# a comment\nWORKERS=3\nEMPTY\n")
    assert read_dotenv(tmp_path / "a.env") == {"WORKERS": "3"}
    (tmp_path / "dir.env").mkdir()
    assert read_dotenv(tmp_path / "dir.env") == {}  # not a file: as if absent, like python-dotenv
    (tmp_path / "latin1.env").write_bytes("OUTPUT_DIR=/srv/caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.env is not UTF-8 text \(byte 19\)"):
        read_dotenv(tmp_path / "latin1.env")


# ---------------------------------------------------------------- OUTPUT_DIR and METRICS_PORT


def assert_refused(code: int, stderr: str, *named: str) -> None:
    """Exit 2 and one line naming the setting: what systemd's RestartPreventExitStatus=2 and an operator need."""
    assert code == 2, stderr
    assert len(stderr.splitlines()) == 1, stderr
    assert stderr.startswith("image-result-worker: "), stderr
    for text in named:
        assert text in stderr, stderr
    assert "Traceback" not in stderr


@pytest.mark.fast
def test_output_dir_and_its_missing_parents_are_created(tmp_path: Path) -> None:
    output_dir = tmp_path / "a" / "b" / "out"
    assert check_output_dir(output_dir) == [tmp_path / "a", tmp_path / "a" / "b", output_dir]
    assert (output_dir / ".partial").is_dir()
    assert [path.name for path in output_dir.rglob("*")] == [".partial"], "the probe files are gone"
    assert check_output_dir(output_dir) == [], "nothing to create the second time"


@pytest.mark.parametrize(
    ("layout", "output_dir", "named"),
    [
        ({"afile": "x"}, "afile", "is not a directory"),
        ({"afile": "x"}, "afile/sub/out", "cannot be created: '{tmp}/afile' is not a directory"),
        ({}, "/proc/image-result-worker-test/out", "cannot be created: mkdir '/proc/image-result-worker-test'"),
        ({"out/.partial": "x"}, "out", "cannot be used: '{tmp}/out/.partial' is not a directory"),
        ({"out/results.json/": None}, "out", "cannot be used: '{tmp}/out/results.json' is not a regular file"),
    ],
    ids=["a-file", "parent-a-file", "proc", "partial-a-file", "results-a-directory"],
)
def test_supervisor_refuses_an_unusable_output_dir(
    tmp_path: Path, layout: dict[str, str | None], output_dir: str, named: str
) -> None:
    for relative, content in layout.items():
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir() if content is None else path.write_text(content)
    target = tmp_path / output_dir
    code, stderr, seconds = run_supervisor(tmp_path, env={"OUTPUT_DIR": str(target)})
    assert_refused(code, stderr, f"OUTPUT_DIR='{target}'", named.format(tmp=tmp_path))
    assert seconds < 5


@dataclass
class Unwritable:
    """Makes paths the supervisor, run as this test's user, cannot write; undone at teardown.

    Permission bits bind an ordinary user (EACCES). Root ignores them, and the venv's
    interpreter may not be runnable by another user (here it lives under /root), so
    as root the path is made immutable instead (chattr +i, EPERM), which binds root too."""

    made: list[Path] = field(default_factory=list)

    def __call__(self, path: Path) -> Path:
        if os.geteuid() == 0:
            done = subprocess.run(["chattr", "+i", str(path)], check=False, capture_output=True, text=True, timeout=10)
            if done.returncode != 0:
                pytest.skip(f"running as root, and chattr +i fails here: {done.stderr.strip()}")
        else:
            path.chmod(0o555 if path.is_dir() else 0o444)
        self.made.append(path)
        return path

    def undo(self) -> None:
        for path in self.made:
            if os.geteuid() == 0:
                subprocess.run(["chattr", "-i", str(path)], check=True, capture_output=True, timeout=10)
            else:
                path.chmod(0o755 if path.is_dir() else 0o644)


@pytest.fixture
def unwritable() -> Iterator[Unwritable]:
    if os.geteuid() == 0 and shutil.which("chattr") is None:
        pytest.skip("running as root without chattr (e2fsprogs): no way to make a path root cannot write")
    made = Unwritable()
    try:
        yield made
    finally:
        made.undo()


DENIED = re.compile(r"(Permission denied|Operation not permitted) \(as user .+, uid \d+\)")


def test_supervisor_refuses_an_output_dir_it_cannot_write(tmp_path: Path, unwritable: Unwritable) -> None:
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    unwritable(output_dir)
    code, stderr, _ = run_supervisor(tmp_path, env={"OUTPUT_DIR": str(output_dir)})
    assert_refused(code, stderr, f"OUTPUT_DIR='{output_dir}' is not writable: create a file in '{output_dir}'")
    assert DENIED.search(stderr), stderr


def test_supervisor_refuses_a_missing_parent_it_cannot_create(tmp_path: Path, unwritable: Unwritable) -> None:
    parent = tmp_path / "read-only"
    parent.mkdir()
    unwritable(parent)
    output_dir = parent / "missing" / "out"
    code, stderr, _ = run_supervisor(tmp_path, env={"OUTPUT_DIR": str(output_dir)})
    assert_refused(code, stderr, f"OUTPUT_DIR='{output_dir}' cannot be created: mkdir '{output_dir.parent}'")
    assert DENIED.search(stderr), stderr


def test_supervisor_refuses_results_it_cannot_append_to(tmp_path: Path, unwritable: Unwritable) -> None:
    """A pool once started as root leaves a results.json the service's user cannot
    append to; without the check the ledger failed to boot at every restart."""
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    results = output_dir / "results.json"
    results.write_text("")
    unwritable(results)
    code, stderr, _ = run_supervisor(tmp_path, env={"OUTPUT_DIR": str(output_dir)})
    assert_refused(code, stderr, f"OUTPUT_DIR='{output_dir}' cannot be used: open '{results}' for writing")


NOBODY = 65534


def test_output_dir_refusal_names_the_unprivileged_user(tmp_path: Path) -> None:
    """What the unit's User= sees in a directory root owns: EACCES, and who it ran as.
    As root, a forked child drops to nobody first (no exec: the venv's interpreter may
    not be reachable by nobody, but the modules are already loaded)."""
    if os.geteuid() == 0:
        home = Path(tempfile.mkdtemp(prefix="irw-root-owned-"))  # pytest's tmp is 0700: nobody cannot reach it
        home.chmod(0o755)
        user, uid = pwd.getpwuid(NOBODY).pw_name, NOBODY
    else:
        home = tmp_path / "read-only"
        home.mkdir(mode=0o555)
        user, uid = pwd.getpwuid(os.geteuid()).pw_name, os.geteuid()
    try:
        message = _as_nobody(home / "out") if os.geteuid() == 0 else _refusal(home / "out")
    finally:
        home.chmod(0o755)
        if os.geteuid() == 0:
            shutil.rmtree(home)
    assert message == (
        f"OUTPUT_DIR='{home / 'out'}' cannot be created: mkdir '{home / 'out'}': Permission denied"
        f" (as user {user}, uid {uid})"
    )


def _refusal(output_dir: Path) -> str:
    try:
        check_output_dir(output_dir)
    except ConfigError as exc:
        return str(exc)
    return "no ConfigError"


def _as_nobody(output_dir: Path) -> str:
    """_refusal(output_dir) in a forked child running as uid/gid 65534."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            os.write(write_end, _refusal(output_dir).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        message = reader.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, message
    return message


BIND_READ_ONLY = ["unshare", "--mount", "--propagation", "private", "sh", "-c", 'mount --bind -o ro "$0" "$0" && exec "$@"']


def test_supervisor_refuses_an_output_dir_on_a_read_only_mount(tmp_path: Path) -> None:
    """The systemd case: under ProtectSystem=strict all but ReadWritePaths= is mounted
    read-only, e.g. ./output/translated under WorkingDirectory=/opt/image-result-worker."""
    install = tmp_path / "install"
    install.mkdir()
    probe = subprocess.run(
        [*BIND_READ_ONLY, str(install), "touch", str(install / "x")],
        check=False, capture_output=True, text=True, timeout=30,
    )
    if "Read-only file system" not in probe.stderr:
        pytest.skip(f"cannot make a read-only bind mount here (needs CAP_SYS_ADMIN): {probe.stderr.strip()[-200:]}")
    output_dir = install / "output" / "translated"
    code, stderr, _ = run_supervisor(
        tmp_path, env={"OUTPUT_DIR": str(output_dir)}, wrapper=[*BIND_READ_ONLY, str(install)]
    )
    assert_refused(code, stderr, f"OUTPUT_DIR='{output_dir}' cannot be created", "Read-only file system", "ReadWritePaths=")


def test_supervisor_refuses_a_metrics_port_in_use(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()  # nothing to create, so nothing logged before the error
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        code, stderr, seconds = run_supervisor(tmp_path, env={"METRICS_PORT": str(port), "METRICS_ADDRESS": "127.0.0.1"})
    assert_refused(code, stderr, f"METRICS_PORT={port}", "METRICS_ADDRESS='127.0.0.1'", "Address already in use")
    assert seconds < 5


# ---------------------------------------------------------------- configs/example.env

EXAMPLE_ENV = REPO_ROOT / "configs" / "example.env"
# A setting, commented out: "# NAME=value". Prose comments never start with NAME=.
COMMENTED_SETTING = re.compile(r"^# ([A-Z][A-Z0-9_]*)=(.*)$")


def commented_settings(text: str) -> dict[str, str]:
    shown = [match.groups() for line in text.splitlines() if (match := COMMENTED_SETTING.match(line))]
    names = [name for name, _ in shown]
    assert len(names) == len(set(names)), f"shown twice: {sorted({name for name in names if names.count(name) > 1})}"
    return dict(shown)


@pytest.mark.fast
def test_example_env_sets_nothing() -> None:
    """Under systemd, EnvironmentFile= overrides the unit's Environment=: a value set
    here, even a default, would replace the unit's (OUTPUT_DIR once did, and the pool
    restart-looped on the read-only /opt). Every setting is shown commented out."""
    from dotenv import dotenv_values

    assert dotenv_values(EXAMPLE_ENV) == {}
    active = [line for line in EXAMPLE_ENV.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert active == []


@pytest.mark.fast
def test_example_env_lists_every_setting_with_its_default(tmp_path: Path) -> None:
    """configs/example.env is the documented list: uncommented, it must parse to the
    defaults and name every field of Settings."""
    shown = commented_settings(EXAMPLE_ENV.read_text())
    assert Settings.from_env(shown, dotenv_path=None) == Settings.from_env({}, dotenv_path=None)
    assert len(shown) == len(fields(Settings)), sorted(shown)
    # The same file with every setting uncommented reads the same, as an operator would find it.
    uncommented = tmp_path / "uncommented.env"
    uncommented.write_text("\n".join(f"{name}={value}" for name, value in shown.items()) + "\n")
    assert Settings.from_env({}, dotenv_path=uncommented) == Settings.from_env({}, dotenv_path=None)
