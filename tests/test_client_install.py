"""The producer client as an upstream stage gets it: `pip install` of this
repository into a fresh venv (no system site packages), used from a directory
outside the repository with nothing of it on the path, against a real pool.

The venv is made once for the module. pip installs with this machine's own
configuration (its index or mirrors, its cache), as a producer's pip would; it
builds the wheel with flit_core, which pyproject.toml names. Also here: the
version that `--version` reports, the pool's and the client's alike.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

import image_result_client
from harness import REPO_ROOT
from harness.http_server import HttpServer
from harness.pool import POOL_ENV_VARS
from image_result_client.protocol import SHM_DIR
from tests.conftest import PoolFactory
from tools.local_redis import LocalRedis

VENV_TIMEOUT = 60.0
# Bounded, so that an unreachable index fails the test with pip's words instead of hanging it.
PIP_TIMEOUT = 150.0
RUN_TIMEOUT = 60.0
WAIT = 30.0
# The first test to use the venv pays for making it (about 10 s here; more on a slow index).
pytestmark = pytest.mark.timeout(300)
# Top-level names of this repository that must never reach a producer's site-packages.
REPOSITORY_PACKAGES = ("shared", "client", "workers", "control", "tools", "tests", "bench", "soak", "supervisor")

# Run in the venv from outside the repository: what the installed distribution
# holds, and what can and cannot be imported there.
INSPECT = """
import importlib.metadata, importlib.util, json, sys
import image_result_client
from image_result_client import Producer
files = importlib.metadata.files("image-result-client")
print(json.dumps({
    "version": importlib.metadata.version("image-result-client"),
    "module_version": image_result_client.__version__,
    "module_file": image_result_client.__file__,
    "prefix": sys.prefix,
    "top_levels": sorted({f.parts[0] for f in files if f.parts[0] != ".."}),
    "importable": [n for n in sys.argv[1:] + ["cv2", "dotenv"] if importlib.util.find_spec(n)],
}))
"""

# Submits one frame through shared memory and waits for its record in OUTPUT_DIR.
SUBMIT_AND_WAIT = """
import json, sys
from pathlib import Path
import numpy as np
from image_result_client import Producer

redis_url, queue, output_dir, prefix = sys.argv[1:]
frame = np.zeros((48, 64, 3), np.uint8)
frame[:, :32] = (0, 128, 255)
with Producer.from_url(redis_url, queue=queue) as producer:
    submission = producer.submit_array(frame, image_id="installed", prefix=prefix)
    [record] = producer.wait([submission], output_dir=Path(output_dir), timeout=30)
print(json.dumps({"segment": submission.segment, "record": record}))
"""


def clean_env(venv: Path | None = None) -> dict[str, str]:
    """The environment less the pool's settings and anything pointing Python at
    this repository or at another venv."""
    drop = {*POOL_ENV_VARS, "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV"}
    env = {name: value for name, value in os.environ.items() if name not in drop}
    if venv is not None:
        env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


def run(command: list[str], *, cwd: Path, timeout: float, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the client pip-installed from this repository."""
    root = tmp_path_factory.mktemp("producer")
    venv = root / "venv"
    made = run([sys.executable, "-m", "venv", str(venv)], cwd=root, timeout=VENV_TIMEOUT, env=clean_env())
    assert made.returncode == 0, made.stderr
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", "--no-input"]
    installed = run([*pip, "--timeout", "30", str(REPO_ROOT)], cwd=root, timeout=PIP_TIMEOUT, env=clean_env(venv))
    assert installed.returncode == 0, f"pip install {REPO_ROOT} failed:\n{installed.stdout[-2000:]}{installed.stderr[-3000:]}"
    return venv


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A working directory with nothing of the repository in it."""
    path = tmp_path / "producer-stage"
    path.mkdir()
    return path


# ---------------------------------------------------------------- one version


def test_the_pool_and_the_client_report_the_packages_version(outside: Path) -> None:
    env = {**clean_env(), "PYTHONPATH": str(REPO_ROOT)}
    pool = run([sys.executable, str(REPO_ROOT / "supervisor.py"), "--version"], cwd=outside, timeout=RUN_TIMEOUT, env=env)
    client = run([sys.executable, "-m", "image_result_client", "--version"], cwd=outside, timeout=RUN_TIMEOUT, env=env)

    version = image_result_client.__version__
    assert (pool.returncode, pool.stdout, pool.stderr) == (0, f"image-result-worker {version}\n", "")
    assert (client.returncode, client.stdout, client.stderr) == (0, f"image-result-client {version}\n", "")


# ---------------------------------------------------------------- installed alone


def test_the_installed_client_is_its_package_alone_without_opencv(venv: Path, outside: Path) -> None:
    script = outside / "inspect_install.py"
    script.write_text(INSPECT)

    # -I: no PYTHONPATH, no user site, not even the script's own directory on sys.path.
    done = run([str(venv / "bin" / "python"), "-I", str(script), *REPOSITORY_PACKAGES],
               cwd=outside, timeout=RUN_TIMEOUT, env=clean_env(venv))

    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    version = image_result_client.__version__
    assert found["version"] == found["module_version"] == version  # pyproject's version is the package's
    assert Path(found["module_file"]).is_relative_to(found["prefix"]), found["module_file"]
    assert found["top_levels"] == ["image_result_client", f"image_result_client-{version}.dist-info"]
    assert found["importable"] == [], f"importable in the producer's venv: {found['importable']}"
    command = run([str(venv / "bin" / "image-result-client"), "--version"], cwd=outside, timeout=RUN_TIMEOUT,
                  env=clean_env(venv))
    assert (command.returncode, command.stdout) == (0, f"image-result-client {version}\n"), command.stderr


def test_the_installed_client_hands_a_frame_to_a_real_pool(
    venv: Path, outside: Path, pool_factory: PoolFactory, redis_server: LocalRedis, queue_name: str, shm_prefix: str
) -> None:
    pool = pool_factory(workers=1)
    script = outside / "submit_and_wait.py"
    script.write_text(SUBMIT_AND_WAIT)
    pool.wait_ready()

    done = run([str(venv / "bin" / "python"), "-I", str(script), redis_server.url, queue_name, str(pool.output_dir),
                shm_prefix], cwd=outside, timeout=RUN_TIMEOUT, env=clean_env(venv))

    assert done.returncode == 0, done.stderr
    sent = json.loads(done.stdout)
    record = sent["record"]
    assert record["status"] == "completed", record
    assert record["image_id"] == "installed"
    image = cv2.imread(record["file_path"])
    assert image is not None and image.shape == (48, 64, 3)
    assert not (SHM_DIR / sent["segment"]).exists()  # the pool read it and unlinked it
    assert pool.stop() == 0


def test_the_installed_command_queues_urls_without_opencv_and_names_the_extra_for_files(
    venv: Path,
    outside: Path,
    pool_factory: PoolFactory,
    redis_server: LocalRedis,
    queue_name: str,
    http_server: HttpServer,
    photos: dict[str, np.ndarray],
) -> None:
    pool = pool_factory(workers=1)
    ok, png = cv2.imencode(".png", photos["chelsea"])
    assert ok
    url = http_server.add("/chelsea.png", png.tobytes(), content_type="image/png")
    (outside / "photo.png").write_bytes(png.tobytes())
    env = {**clean_env(venv), "REDIS_URL": redis_server.url, "HOSTING_TASKS_QUEUE": queue_name,
           "OUTPUT_DIR": str(pool.output_dir)}
    command = str(venv / "bin" / "image-result-client")
    pool.wait_ready()

    queued = run([command, "enqueue", "--wait", "--timeout", str(WAIT), url], cwd=outside, timeout=RUN_TIMEOUT, env=env)
    refused = run([command, "enqueue", "photo.png"], cwd=outside, timeout=RUN_TIMEOUT, env=env)

    assert queued.returncode == 0, queued.stdout + queued.stderr
    [line] = queued.stdout.splitlines()
    assert line.split()[0] == "completed" and Path(line.split()[2]).is_file(), line
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert len(refused.stderr.splitlines()) == 1, refused.stderr
    assert "needs OpenCV" in refused.stderr and "image-result-client[cli]" in refused.stderr, refused.stderr
    assert pool.stop() == 0


def test_a_dotenv_without_the_cli_extra_is_a_usage_error_naming_it(venv: Path, outside: Path) -> None:
    """Without the cli extra, a `.env` in the working directory is a usage error naming
    the extra: ignoring it would send the tasks to another Redis or queue."""
    (outside / ".env").write_text("REDIS_URL=redis://127.0.0.1:1/0\n")
    command = str(venv / "bin" / "image-result-client")

    done = run([command, "enqueue", "https://example.com/a.jpg"], cwd=outside, timeout=RUN_TIMEOUT, env=clean_env(venv))

    assert done.returncode == 2, done.stdout + done.stderr
    assert "python-dotenv" in done.stderr and "image-result-client[cli]" in done.stderr, done.stderr

