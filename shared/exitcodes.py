"""Exit codes: the contract between each child and the supervisor, and with systemd.

Kept in one place so a reaped status can be explained in a log line.
"""

from __future__ import annotations

OK = 0
# Bad configuration or usage. systemd's RestartPreventExitStatus=2 relies on it.
CONFIG_ERROR = 2
# A child could not get going (e.g. OUTPUT_DIR unwritable): the supervisor backs off.
BOOT_FAILED = 3
# A worker lost its channel to the ledger; records it had sent may be gone, so
# its in-flight tasks must be redelivered, which happens when it is reaped.
LEDGER_LOST = 4
# The parent went away; a child does not outlive its supervisor.
ORPHANED = 5
# Another supervisor owns OUTPUT_DIR (results.json has exactly one writer).
OUTPUT_DIR_BUSY = 6
# A worker's decode ran past DECODE_CPU_SECONDS: its task was failed, and the
# process, which alone can stop a decoder, ended (workers/decode_watchdog.py).
DECODE_OVERRAN = 7

DESCRIPTIONS = {
    OK: "clean exit",
    CONFIG_ERROR: "bad configuration",
    BOOT_FAILED: "failed to boot",
    LEDGER_LOST: "lost its channel to the ledger",
    ORPHANED: "its supervisor went away",
    OUTPUT_DIR_BUSY: "OUTPUT_DIR is owned by another supervisor",
    DECODE_OVERRAN: "a decode ran past DECODE_CPU_SECONDS; its task was failed",
}


def describe(code: int) -> str:
    return DESCRIPTIONS.get(code, f"exit code {code}")
