"""results.json and requests.json, read whole while the ledger appends to them,
with the client's read_records (a torn tail is read again, for a while)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness import PoolFailed
from image_result_client.protocol import REQUESTS_NAME, RESULTS_NAME
from image_result_client.results_files import UnreadableResults, read_records


def read_results(output_dir: Path, timeout: float = 5.0) -> list[dict[str, Any]]:
    """The records in OUTPUT_DIR/results.json; [] when there is none yet."""
    return read_results_file(Path(output_dir) / RESULTS_NAME, timeout)


def read_requests(output_dir: Path, timeout: float = 5.0) -> list[dict[str, Any]]:
    """The request records in OUTPUT_DIR/requests.json; [] when there is none yet."""
    return read_results_file(Path(output_dir) / REQUESTS_NAME, timeout)


def read_results_file(path: Path, timeout: float = 5.0) -> list[dict[str, Any]]:
    """The records of a results file; [] when it does not exist. PoolFailed if it
    stays unparsable for `timeout` seconds or holds something other than an array."""
    try:
        return read_records(path, timeout=timeout)
    except UnreadableResults as exc:
        raise PoolFailed(str(exc)) from exc
