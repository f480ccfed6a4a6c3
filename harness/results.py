"""results.json and requests.json, read while the ledger appends to them.

An append rewrites the file's tail (the closing "]" moves on), so a reader can
catch a torn tail: it reads again until the file parses, for a while.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from harness import PoolFailed
from image_result_client.protocol import REQUESTS_NAME, RESULTS_NAME


def read_results(output_dir: Path, timeout: float = 5.0) -> list[dict[str, Any]]:
    """The records in OUTPUT_DIR/results.json; [] when there is none yet."""
    return read_results_file(Path(output_dir) / RESULTS_NAME, timeout)


def read_requests(output_dir: Path, timeout: float = 5.0) -> list[dict[str, Any]]:
    """The request records in OUTPUT_DIR/requests.json; [] when there is none yet."""
    return read_results_file(Path(output_dir) / REQUESTS_NAME, timeout)


def read_results_file(path: Path, timeout: float = 5.0) -> list[dict[str, Any]]:
    """The records of a results file; [] when it does not exist. PoolFailed if it
    stays unparsable for `timeout` seconds or holds something other than an array."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return []
        try:
            records = json.loads(raw)  # ValueError covers a torn UTF-8 sequence too
        except ValueError as exc:
            if time.monotonic() >= deadline:
                raise PoolFailed(f"{path} stayed unparsable for {timeout}s: {exc}; tail: {raw[-200:]!r}") from exc
            time.sleep(0.02)
            continue
        if not isinstance(records, list):
            raise PoolFailed(f"{path} holds {type(records).__name__}, not a JSON array")
        return records
