"""`make bench-instructions` reads callgrind's files itself: check that reading
against real callgrind output, since its figures are only as good as it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from harness import REPO_ROOT

pytestmark = pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")

# zlib's compressor in a C library of its own: its count is easy to tell apart.
WORKLOAD = "import os, zlib\ndata = os.urandom(1) * 2_000_000\nfor _ in range({n}): zlib.compress(data, 6)\n"


@pytest.fixture(scope="module")
def instructions(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(REPO_ROOT / "bench"))  # where it finds bench.py, as when run as a script
        import instructions as module

        yield module


def counted(instructions: ModuleType, out_dir: Path, compressions: int):
    out_dir.mkdir()
    command = [*instructions.valgrind_command(out_dir), sys.executable, "-S", "-c", WORKLOAD.format(n=compressions)]
    subprocess.run(command, check=True, timeout=120)
    (tally,) = instructions.read_counts(out_dir).values()
    return tally


def test_callgrind_counts_add_up_and_follow_the_work(instructions: ModuleType, tmp_path: Path) -> None:
    once = counted(instructions, tmp_path / "once", 1)
    three_times = counted(instructions, tmp_path / "three", 3)

    for tally in (once, three_times):
        by_library = sum(value for key, value in tally.items() if key.startswith("in:"))
        by_function = sum(value for key, value in tally.items() if key.startswith("fn:"))
        # Every instruction is some function's own, and some library's: nothing
        # counted twice (a call's cost belongs to the callee), nothing lost.
        assert by_library == by_function == tally["Ir"] > 0, tally.most_common(5)
        assert tally["sysCount"] > 0
    # The difference of two runs is the work the second did more: two compressions,
    # nearly all in libz, however much the interpreter's start-up cost.
    per_compression = instructions.per_task(once, three_times, 2)
    assert per_compression["in:libz"] > 0.95 * per_compression["Ir"], per_compression
    assert per_compression["in:libz"] == pytest.approx(once["in:libz"], rel=0.02)
