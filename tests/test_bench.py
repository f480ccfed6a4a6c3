"""`make bench` on a handful of tasks: the benchmark is only run by hand, before
performance changes, so this keeps it from rotting between those runs. It
checks what a user of it relies on, not its figures (speed is never asserted
in tests): it runs from a checkout set up by `make test`, prints the targets
table, verifies the pool's records, files and segments itself, and leaves
nothing behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from harness import REPO_ROOT
from image_result_client.protocol import SHM_DIR


def test_bench_runs_a_small_round_checks_its_output_and_cleans_up(tmp_path: Path) -> None:
    segments_before = set(os.listdir(SHM_DIR))
    command = [
        sys.executable, "bench/bench.py",
        "--sections", "throughput,startup",
        "--sizes", "512x512",
        "--rounds", "1",
        "--tasks", "20",  # 512x512 gets 2.5 times as many: 50
        "--tmp", str(tmp_path),
    ]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)

    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "correctness: every record, file, segment and queue checked: OK" in result.stdout, output
    assert "| 512x512 | 50 |" in result.stdout, output  # the throughput row, with its task count
    targets = result.stdout.split("# targets (issue 4)", 1)[1]
    for figure in ("pool / limit at 512x512", "CPU per task beyond the limit, 512x512", "start-up to READY, 8 workers"):
        assert figure in targets, output
    assert list(tmp_path.iterdir()) == [], "the benchmark left its temp directory behind"
    left = {name for name in set(os.listdir(SHM_DIR)) - segments_before if not name.startswith("PostgreSQL")}
    assert left == set(), f"the benchmark left segments in /dev/shm: {sorted(left)}"
