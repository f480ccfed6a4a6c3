"""Instructions per task, counted by callgrind: the pool's cost beyond the raw
limit as a figure that does not move with the machine (`make bench-instructions`).

    photos -> one /dev/shm segment per task, made as producers do
      limit: `python bench/instructions.py limit ...` under callgrind: W forked
             processes doing attach + encode + write + unlink (bench.run_limit)
      pool:  the tasks RPUSHed, then `python supervisor.py --workers W` under
             callgrind, until the Nth record is in results.json, then SIGTERM
    each at two task counts N1 < N2; every process of a tree writes its own
    count (callgrind.out.<pid>); the Redis server runs natively, uncounted.
        per task = (count at N2 - count at N1) / (N2 - N1)
    so imports, start-up and shutdown cancel out.

`make bench` measures CPU time, which moves by tens of percent with whatever
else the machine runs; this counts instructions, which do not. It answers "did
my change make the pool cheaper?": the limit repeats to a few instructions per
task, the pool to within about 60,000 of some 700,000 beyond the limit.

Hazards handled here:
- A forked child's count starts with all its parent counted before the fork.
  The difference cancels that only if the parent's work before the fork is the
  same every time: PYTHONHASHSEED=0, and one OpenBLAS thread (numpy's threads
  spin on the clock after import, a different amount each run).
- callgrind counts the instructions of user space only: what the kernel does
  for a syscall (an fsync, a socket write) is not in them. So the syscalls
  are counted too (--collect-systime), and reported beside the instructions.
- Under callgrind everything runs about 40x slower, timers do not: the
  supervisor's 1 s tick, the ledger's 25 ms linger and the workers' 5 ms hold
  expire sooner relative to the work, so batches (group commits, record
  datagrams) are smaller than natively and differ from run to run. The count
  is split by role so that this shows, and --repeat shows the spread.
- A process that callgrind did not see exit writes no count: the run fails
  rather than report a sum with a hole in it.
- Segments, temp directories, the pool and the private Redis are released in
  a `finally`, on Ctrl-C too.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from argparse import Namespace
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import redis

import bench as throughput  # bench/bench.py, beside this file
from harness import PoolFailed
from harness.pool import Pool
from harness.segments import SegmentTracker
from image_result_client.protocol import RESULTS_NAME
from shared.cli import OneLineParser, complain
from tools.local_redis import LocalRedis

# Task counts per size: N2 - N1 tasks are what the figure is the average of.
COUNTS = {"512x512": (16, 64), "1024x1024": (8, 32), "3840x2160": (2, 6)}
STARTUP_TIMEOUT = 600.0  # imports alone take about 20 s under callgrind


# A name in a callgrind.out file: "(12) name" the first time, "(12)" after.
COMPRESSED_NAME = re.compile(r"\((\d+)\)(?: (.*))?")
OBJECT_NAMES = (
    ("libpython", "the interpreter (libpython)"),
    ("cv2", "OpenCV + libjpeg-turbo"),
    ("libjpeg", "OpenCV + libjpeg-turbo"),
    ("libc.so", "libc"),
    ("ld-linux", "the dynamic linker"),
    ("_multiarray", "numpy"),
    ("libscipy_openblas", "numpy"),
)


def object_name(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    for prefix, label in OBJECT_NAMES:
        if name.startswith(prefix):
            return label
    return name.split(".", 1)[0]  # _json.cpython-311-x86_64-linux-gnu.so -> _json


def parse_args(argv: Sequence[str] | None) -> Namespace:
    parser = OneLineParser(
        prog="bench/instructions.py",
        description="Instructions per task of the pool beyond the raw limit, counted by callgrind.",
    )
    parser.add_argument("--size", choices=list(COUNTS), default="512x512", help="frame size (default 512x512)")
    parser.add_argument("--repeat", type=int, default=1, metavar="R", help="measure R times, show each (default 1)")
    parser.add_argument("--tmp", type=Path, metavar="DIR", help="where to make its temp directory (default: $TMPDIR or /tmp)")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


def valgrind_command(out_dir: Path) -> list[str]:
    return [
        "valgrind",
        "--tool=callgrind",
        "--collect-systime=nsec",  # adds sysCount (and time, which we do not trust)
        f"--callgrind-out-file={out_dir}/callgrind.out.%p",
        f"--log-file={out_dir}/valgrind.%p.log",
    ]


def read_counts(out_dir: Path) -> dict[int, Counter[str]]:
    """pid -> its counts, from every callgrind.out.<pid> in out_dir: "Ir" and
    "sysCount" for the whole process, "in:<library>" and "fn:<function> (<library>)"
    for where its instructions ran (their own, not those of what they call)."""
    return {int(path.name.rsplit(".", 1)[1]): read_callgrind_file(path) for path in out_dir.glob("callgrind.out.*")}


def read_callgrind_file(path: Path) -> Counter[str]:
    """The totals and each function's own instructions, from callgrind's format:
    `ob=`/`fn=` name the code the cost lines below belong to, and the cost line
    right after a `calls=` line is what that call cost, counted in the callee."""
    tally: Counter[str] = Counter()
    names: dict[str, dict[str, str]] = {"ob": {}, "fn": {}}
    library, function, events = "?", "?", ["Ir"]
    after_call = False
    with path.open(errors="replace") as lines:
        for line in lines:
            if line[:1].isdigit() or line[:1] in "+-*":
                costs = line.split()
                if not after_call and len(costs) > 1:
                    tally[f"fn:{function} ({library})"] += int(costs[1])
                    tally["in:" + library] += int(costs[1])
                after_call = False
                continue
            key, _, value = line.rstrip("\n").partition("=")
            if key in ("ob", "fn", "cob", "cfn"):
                kind = key[-2:]
                match = COMPRESSED_NAME.fullmatch(value)
                if match is not None:
                    ident, name = match.groups()
                    value = names[kind].setdefault(ident, name or "?")
                if key == "ob":
                    library = object_name(value)
                elif key == "fn":
                    function = value.split("'", 1)[0]  # "f'2" is f, recursing
            elif key == "calls":
                after_call = True
            elif line.startswith("events:"):
                events = line.split()[1:]
            elif line.startswith("summary:"):
                tally.update(dict(zip(events, map(int, line.split()[1:]), strict=False)))
    return tally


def roles_by_pid(pool: Pool) -> dict[int, str]:
    """pid -> role, from the supervisor's `child_started` log lines."""
    roles = {pool.pid: "supervisor"}
    for event in pool.events("child_started"):
        roles[int(event["pid"])] = "workers" if event["role"] == "worker" else str(event["role"])
    return roles


def by_role(counts: dict[int, Counter[str]], roles: dict[int, str]) -> dict[str, Counter[str]]:
    unknown = sorted(set(counts) - set(roles))
    silent = sorted(set(roles) - set(counts))
    if unknown or silent:
        raise throughput.CheckFailed(f"counts from unknown processes {unknown}, none from {silent}")
    summed: dict[str, Counter[str]] = defaultdict(Counter)
    for pid, tally in counts.items():
        summed[roles[pid]].update(tally)
    return dict(summed)


# ---------------------------------------------------------------- the two runs


def count_limit(tasks: list[throughput.BenchTask], tmp: Path) -> dict[str, Counter[str]]:
    """The limit under callgrind: this file's `limit` command, every process counted."""
    out_dir = Path(tempfile.mkdtemp(prefix="limit-", dir=tmp))
    tasks_file = out_dir / "tasks.json"
    tasks_file.write_text(json.dumps([[t.request_id, t.segment, list(t.shape)] for t in tasks]))
    command = [*valgrind_command(out_dir), sys.executable, __file__, "limit", str(tasks_file), str(out_dir / "jpegs")]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = process.communicate(timeout=STARTUP_TIMEOUT)
    except BaseException:
        process.kill()
        process.wait()
        raise
    if process.returncode != 0:
        raise throughput.CheckFailed(f"the limit exited with {process.returncode}: {stderr.strip()[-500:]}")
    counts = read_counts(out_dir)
    if len(counts) != throughput.WORKERS + 1:
        raise throughput.CheckFailed(f"{len(counts)} limit processes counted, expected {throughput.WORKERS + 1}")
    # Only the W children do the limit's work. The parent waits for them, polling on
    # a clock and scanning /proc for the machine's other load: not work per task.
    roles = {pid: "limit" for pid in counts}
    roles[process.pid] = "limit parent"
    return by_role(counts, roles)


def limit_main(tasks_file: Path, jpeg_dir: Path) -> int:
    """Run inside callgrind: bench.run_limit on the tasks the parent made."""
    tasks = [throughput.BenchTask(rid, name, tuple(shape)) for rid, name, shape in json.loads(tasks_file.read_text())]
    throughput.run_limit(tasks, jpeg_dir)
    return 0


def count_pool(
    tasks: list[throughput.BenchTask], tmp: Path, server: LocalRedis, client: redis.Redis
) -> dict[str, Counter[str]]:
    """The pool under callgrind, from start to SIGTERM, on tasks queued before it starts."""
    workdir = Path(tempfile.mkdtemp(prefix="pool-", dir=tmp))
    queue = "bench_instructions_" + workdir.name.replace("-", "_")
    client.rpush(queue, *(task.message() for task in tasks))
    pool = throughput.bench_pool(workdir, redis_url=server.url, queue=queue, wrapper=valgrind_command(workdir))
    with contextlib.ExitStack() as stack:
        stack.callback(pool.kill_all)
        pool.start()
        pool.wait_ready(timeout=STARTUP_TIMEOUT)
        tail = throughput.ResultsTail(pool.output_dir / RESULTS_NAME)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while tail.poll() < len(tasks):
            if pool.poll() is not None or time.monotonic() > deadline:
                raise throughput.CheckFailed(f"{tail.count} of {len(tasks)} records\n{pool.stderr_tail()}")
            time.sleep(0.05)
        code = pool.stop(timeout=STARTUP_TIMEOUT)
        throughput.verify_pool_output(pool, tasks, client, code)
    return by_role(read_counts(workdir), roles_by_pid(pool))


# ---------------------------------------------------------------- the figures


def per_task(low: Counter[str], high: Counter[str], tasks: int) -> dict[str, float]:
    """Each count per task, from the difference between a short and a long run."""
    return {key: (high[key] - low[key]) / tasks for key in high.keys() | low.keys()}


def native_ns_per_instruction(frames: list, segments: SegmentTracker, tmp: Path, limit_ir: float) -> float:
    """The limit's CPU time per task measured natively (median of 3), over its
    instructions per task: the encoder's own pace, to read instructions as time."""
    cpu_us = []
    for round_ in range(3):
        tasks = throughput.make_tasks(segments, frames, 32, f"native{round_}")
        cpu_us.append(throughput.run_limit(tasks, tmp / f"native-{round_}").cpu_us_per_task)
    return statistics.median(cpu_us) * 1000 / limit_ir


@dataclass(frozen=True, slots=True)
class Round:
    """One round's figures per task: the limit, the pool's roles, and the pool beyond the limit."""

    limit: dict[str, float]
    roles: dict[str, dict[str, float]]

    def beyond(self, key: str) -> float:
        # Workers and ledger: the supervisor does no work per task. Its loop runs
        # on a clock, and under callgrind's slowdown its ticks would pose as a
        # per-task cost; it is shown apart.
        return sum(self.roles[role].get(key, 0.0) for role in ("workers", "ledger")) - self.limit.get(key, 0.0)


def measure_round(number: int, counts: tuple[int, int], frames: list, run: throughput.PrivateRun) -> Round:
    """The limit and the pool, each counted at both task counts; per task, the difference."""
    low, high = counts
    limit, pool = {}, {}
    for count in counts:
        limit[count] = count_limit(throughput.make_tasks(run.segments, frames, count, "l"), run.tmp)["limit"]
        tasks = throughput.make_tasks(run.segments, frames, count, "p")
        pool[count] = count_pool(tasks, run.tmp, run.redis_server, run.client)
        print(f"  round {number}: {count} tasks counted", flush=True)
    return Round(
        limit=per_task(limit[low], limit[high], high - low),
        roles={
            role: per_task(pool[low].get(role, Counter()), pool[high].get(role, Counter()), high - low)
            for role in pool[low].keys() | pool[high].keys()
        },
    )


def report(size: str, rounds: list[Round], ns_per_ir: float, top: int = 8) -> None:
    def line(label: str, values: Sequence[float], digits: int = 0) -> None:
        print(f"  {label:34}" + "".join(f"{value:>14,.{digits}f}" for value in values))

    print(f"\nper task, {size}, W={throughput.WORKERS}, quality {throughput.QUALITY}; one column per round")
    for event, name, digits in (("Ir", "instructions", 0), ("sysCount", "syscalls", 1)):
        line(f"limit: {name}", [r.limit.get(event, 0) for r in rounds], digits)
        for role in ("workers", "ledger", "supervisor"):
            line(f"pool {role}: {name}", [r.roles.get(role, {}).get(event, 0) for r in rounds], digits)
        line(f"pool beyond the limit: {name}", [r.beyond(event) for r in rounds], digits)
    last = rounds[-1]
    for prefix, title in (("in:", "library"), ("fn:", "function")):
        keys = {key for key in last.limit.keys() | last.roles["workers"].keys() if key.startswith(prefix)}
        ranked = sorted(keys, key=last.beyond, reverse=True)[:top]
        print(f"\n  instructions beyond the limit by {title} (last round; pool workers + ledger - limit):")
        for key in ranked:
            print(f"    {last.beyond(key):>12,.0f}  {key[len(prefix):]}")
    median = statistics.median(r.beyond("Ir") for r in rounds)
    syscalls = statistics.median(r.beyond("sysCount") for r in rounds)
    print(
        f"\n  beyond the limit: {median:,.0f} instructions and {syscalls:.1f} syscalls per task (median of rounds);"
        f"\n  about {median * ns_per_ir / 1000:.0f} us at the encoder's native pace of {ns_per_ir:.3f} ns per"
        " instruction, measured here. The interpreter runs fewer instructions"
        "\n  per ns than the encoder, and the kernel's time in those syscalls is not counted: the time is a lower bound."
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["limit"]:
        return limit_main(Path(argv[1]), Path(argv[2]))
    args = parse_args(argv)
    # The same hashing in every counted process: set iteration orders change the counts.
    os.environ["PYTHONHASHSEED"] = "0"
    # numpy's OpenBLAS starts threads at import that spin, for a while, on the
    # clock, and a forked child's count starts with all its parent counted before
    # the fork: the spin would land in every worker's count, a different amount
    # each run. The pool's processes have no such threads after the first fork
    # (OpenBLAS stops them then), and call no BLAS: one thread changes nothing else.
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    if shutil.which("valgrind") is None:
        complain("make bench-instructions needs valgrind, which is not on PATH (Debian: apt-get install valgrind)")
        return 2
    low, high = COUNTS[args.size]
    height, width = next((h, w) for label, h, w, _ in throughput.SIZES if label == args.size)
    frames = throughput.natural_frames(height, width)
    started = time.perf_counter()
    with throughput.private_run("irw-instructions-", args.tmp) as run:
        print(f"counting {args.size} at {low} and {high} tasks, {args.repeat} round(s); each run takes a minute or so")
        try:
            rounds = [
                measure_round(number, (low, high), frames, run) for number in range(1, args.repeat + 1)
            ]
            limit_ir = statistics.median(r.limit["Ir"] for r in rounds)
            ns_per_ir = native_ns_per_instruction(frames, run.segments, run.tmp, limit_ir)
        except (throughput.CheckFailed, PoolFailed) as exc:
            print(f"FAILED: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("\ninterrupted; cleaning up", file=sys.stderr)
            return 130
        report(args.size, rounds, ns_per_ir)
        print(f"\nwall time {time.perf_counter() - started:.0f} s; every record, file and segment checked: OK")
        return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
