"""The request count's decisions in-process, in milliseconds: which records the
ledger counts and with what, how it tells a request record already written,
how ids reach Redis, and what the command line refuses. The same on a real
Redis and a real pool: test_request_state.py, test_requests.py."""

from __future__ import annotations

import json
from datetime import datetime
from multiprocessing import Value
from pathlib import Path

import pytest

from image_result_client.__main__ import Item, UsageError, request_of
from shared.config import Settings
from shared.ipc.records import COMPLETED, FAILED, RETRY, CompletionRecord
from shared.state.request_state import id_json, record_id_of
from workers.ledger import Ledger, RememberedIds

pytestmark = pytest.mark.fast


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    settings = Settings.from_env({"OUTPUT_DIR": str(tmp_path), "HOST_ID": "gpu-1"}, dotenv_path=None)
    return Ledger(settings, instance="i1", heartbeat=Value("d", 0.0))


def record(status: str = COMPLETED, *, request_images: int | None = 3, task_id: str | None = "t1", **fields) -> CompletionRecord:
    made = CompletionRecord(task_id=task_id, delivery=1, envelope=b"e", processing_key="p", request_id="r",
                            image_id="img", status=status, finished_at=datetime(2026, 1, 1), request_images=request_images)
    for name, value in fields.items():
        setattr(made, name, value)
    return made


def test_a_final_record_with_request_images_is_counted_with_its_file(ledger):
    image = ledger._counted_image(record(file_path="/out/img.jpg"))
    assert (image.request_id, image.image_id, image.request_images, image.completed, image.record_id) == (
        "r", "img", 3, True, "t1")
    assert json.loads(image.entry) == {"image_id": "img", "status": "completed", "file_path": "/out/img.jpg",
                                       "task_id": "t1", "host_id": "gpu-1"}
    assert ledger._counted_image(record(FAILED)).completed is False


@pytest.mark.parametrize("counted", [
    record(request_images=None),  # a task as before
    record(RETRY),  # not final: its later delivery counts
    record(task_id=None),  # an envelope too broken to say which task
    record(image_id=None),  # no image id: nothing to count it as
])
def test_records_that_are_not_counted(ledger, counted):
    assert ledger._counted_image(counted) is None


def test_a_duplicate_counts_as_its_first_record_was_written(ledger):
    ledger.recorded.learn_from_last_run([{"task_id": "t1", "status": "failed", "file_path": None}])
    again = record(COMPLETED, duplicate=True, file_path="/out/other.jpg")
    image = ledger._counted_image(again)
    assert image.completed is False and json.loads(image.entry)["file_path"] is None


def test_remembered_ids_are_bounded_and_ignore_what_is_not_an_id():
    ids = RememberedIds(2)
    ids.learn(["a", None, 7, "b", "c"])
    assert (ids.holds("a"), ids.holds("b"), ids.holds("c")) == (False, True, True)


@pytest.mark.parametrize("line", [b"", b"{", b"[]", b'{"record_id": 5}', b'"x"'])
def test_a_line_that_is_not_a_request_record_has_no_record_id(line):
    assert record_id_of(line) is None


def test_ids_reach_redis_as_distinct_ascii_json_strings():
    ids = ["a", 'a"', "a\\", "\ud800", "é", "a:b", "{q}", "1"]
    tokens = [id_json(value) for value in ids]
    assert len(set(tokens)) == len(ids) and all(token.isascii() for token in tokens)
    assert [json.loads(token) for token in tokens] == ids


def test_the_command_line_refuses_a_request_whose_image_ids_repeat():
    items = [Item("a.png", path=Path("a.png")), Item("x/a.jpg", path=Path("x/a.jpg")), Item("b.png", path=Path("b.png"))]
    with pytest.raises(UsageError, match="these repeat: a"):
        request_of("book", items)
    assert request_of("book", items[1:]) == {"request_id": "book", "request_images": 2}
    assert request_of(None, items) == {}
