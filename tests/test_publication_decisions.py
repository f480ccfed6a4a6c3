"""The publisher's choices about .partial in-process, in milliseconds: which
partial files a later delivery clears, and that the worker's path and the
ledger's names spell a partial file the same way. The whole path through a real
pool: test_output_dir_attacks.py, test_faults.py."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

import pytest

from image_result_client.protocol import PARTIAL_DIR, partial_name, partial_path
from shared.config import Settings
from shared.ipc.records import COMPLETED, CompletionRecord
from workers.publication import Publisher

pytestmark = pytest.mark.fast


def test_the_partial_path_ends_in_the_partial_name(tmp_path: Path) -> None:
    path = partial_path(tmp_path, "0123abcd-1-0", 2)
    assert path.parent == tmp_path / PARTIAL_DIR
    assert path.name == partial_name("0123abcd-1-0", 2) == "0123abcd-1-0.2.jpg"


def test_a_later_delivery_clears_the_partial_files_of_the_earlier_ones_only(tmp_path: Path) -> None:
    publisher = Publisher(Settings.from_env({"OUTPUT_DIR": str(tmp_path)}, dotenv_path=None))
    publisher.open()
    try:
        for delivery in (1, 2, 3):
            partial_path(tmp_path, "t1", delivery).write_bytes(b"jpeg")
        partial_path(tmp_path, "t2", 1).write_bytes(b"jpeg")
        record = CompletionRecord(
            task_id="t1",
            delivery=3,
            envelope=b"e",
            processing_key="p",
            request_id="r",
            image_id="img",
            status=COMPLETED,
            finished_at=datetime(2026, 1, 1),
        )
        publisher.remove_earlier_partials(record)
    finally:
        publisher.directories.close()
        os.close(publisher.journal._fd)
    assert sorted(path.name for path in (tmp_path / PARTIAL_DIR).iterdir()) == ["t1.3.jpg", "t2.1.jpg"]
