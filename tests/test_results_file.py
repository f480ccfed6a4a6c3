"""results.json: an append-only JSON array that stays parsable and survives torn appends."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.storage.results_file import ResultsFile, ResultsFileError

pytestmark = pytest.mark.fast  # in-process: make test-fast


def record(n: int) -> dict:
    return {"request_id": f"req-{n}", "image_id": f"이미지-{n}", "status": "completed", "n": n}


def opened(path: Path) -> ResultsFile:
    results = ResultsFile(path)
    results.open()
    return results


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "results.json"


@pytest.fixture
def results(path: Path) -> Iterator[ResultsFile]:
    results = ResultsFile(path)
    results.open()
    try:
        yield results
    finally:
        results.close()


def load(path: Path) -> list:
    return json.loads(path.read_bytes())


def file_with_records(path: Path, count: int) -> bytes:
    results = opened(path)
    try:
        results.append([record(n) for n in range(count)])
    finally:
        results.close()
    return path.read_bytes()


def test_new_file_is_an_empty_array(path: Path, results: ResultsFile) -> None:
    assert path.read_bytes() == b"[\n]\n"
    assert load(path) == []


def test_appended_batches_parse_in_order(path: Path, results: ResultsFile) -> None:
    results.append([record(0)])
    results.append([record(1), record(2)])
    results.append([])
    results.append([record(3)])
    assert load(path) == [record(n) for n in range(4)]


def test_file_is_valid_json_after_every_append(path: Path, results: ResultsFile) -> None:
    for n in range(20):
        results.append([record(n)])
        assert len(load(path)) == n + 1


def test_append_leaves_earlier_bytes_untouched(path: Path, results: ResultsFile) -> None:
    results.append([record(n) for n in range(5)])
    before = path.read_bytes()
    results.append([record(5)])
    # Everything but the closing "\n]\n" is kept byte for byte.
    assert path.read_bytes()[: len(before) - 3] == before[:-3]


def test_reopen_returns_recent_records(path: Path) -> None:
    file_with_records(path, 3)
    results = ResultsFile(path)
    try:
        assert results.open() == [record(n) for n in range(3)]
        results.append([record(3)])
    finally:
        results.close()
    assert load(path) == [record(n) for n in range(4)]


# ---------------------------------------------------------------- crash repair


def reopen_and_check(path: Path, expected: list[dict]) -> None:
    """open() repairs the file to exactly `expected`, and appending still works."""
    results = ResultsFile(path)
    try:
        results.open()
        assert load(path) == expected
        results.append([record(99)])
    finally:
        results.close()
    assert load(path) == [*expected, record(99)]


TORN_APPEND = (",\n" + json.dumps(record(3)) + "\n]\n").encode()


@pytest.mark.parametrize("cut", range(len(TORN_APPEND)))
def test_torn_append_is_repaired_at_every_offset(path: Path, cut: int) -> None:
    """A crash during the 4th append leaves its bytes cut anywhere after the 3rd record."""
    valid = file_with_records(path, 3)
    path.write_bytes(valid[:-3] + TORN_APPEND[:cut])
    whole_line = cut >= len(TORN_APPEND) - 3
    reopen_and_check(path, [record(n) for n in range(4 if whole_line else 3)])


@pytest.mark.parametrize("cut", [1, 2])
def test_torn_append_over_the_old_closing_keeps_earlier_records(path: Path, cut: int) -> None:
    """The append overwrites "\\n]\\n" in place: if only its first bytes reach the disk
    (a page boundary), the old closing bytes stay behind them. Record 3 was durable
    and acknowledged before this append began, so it must survive the repair."""
    valid = file_with_records(path, 3)
    path.write_bytes(valid[:-3] + TORN_APPEND[:cut] + valid[len(valid) - 3 + cut :])
    reopen_and_check(path, [record(n) for n in range(3)])


TORN_FIRST_APPEND = ("\n" + json.dumps(record(0)) + "\n]\n").encode()


@pytest.mark.parametrize("cut", range(len(TORN_FIRST_APPEND)))
def test_torn_first_append_is_repaired_at_every_offset(path: Path, cut: int) -> None:
    """The first append overwrites "\\n]\\n" of an empty "[\\n]\\n"; a crash can leave
    just "[" (also what a failed append's restore leaves if its rewrite fails)."""
    path.write_bytes(b"[" + TORN_FIRST_APPEND[:cut])
    whole_line = cut >= len(TORN_FIRST_APPEND) - 3
    reopen_and_check(path, [record(0)] if whole_line else [])


def test_file_cut_inside_second_record_keeps_first(path: Path) -> None:
    valid = file_with_records(path, 3)
    second = valid.index(b'{"request_id": "req-1"')
    path.write_bytes(valid[: second + 10])
    reopen_and_check(path, [record(0)])


# ---------------------------------------------------------------- migration


def test_original_indented_file_is_migrated(path: Path) -> None:
    old = [record(0), {"status": "failed", "error": "segment gone", "image_id": "ü"}]
    with open(path, "w", encoding="utf-8") as f:
        json.dump(old, f, indent=2, ensure_ascii=False)
    results = ResultsFile(path)
    try:
        assert results.open() == old
        assert load(path) == old
        results.append([record(1)])
    finally:
        results.close()
    assert load(path) == [*old, record(1)]
    assert not path.with_name("results.json.migrating").exists()


def test_original_empty_array_is_migrated(path: Path) -> None:
    path.write_text("[]")
    reopen_and_check(path, [])


@pytest.mark.parametrize("content", ['{"status": "completed"}', "not json at all"])
def test_non_array_file_is_refused(path: Path, content: str) -> None:
    path.write_text(content)
    with pytest.raises(ResultsFileError):
        ResultsFile(path).open()
    assert path.read_text() == content  # nothing destroyed
