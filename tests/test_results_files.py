"""The results.json format as readers see it (image_result_client.results_files):
the line writer, the line parser, the follower, the whole-file read and the
backwards read, against what the ledger's ResultsFile writes and every torn
state an append or a repair can show them."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from image_result_client import results_files
from image_result_client.results_files import (
    EMPTY,
    ResultsFollower,
    UnreadableResults,
    complete_records,
    encode_append,
    encode_file,
    encode_line,
    encoded_field,
    lines_from_end,
    parse_line,
    read_records,
    record_lines,
)
from shared.storage.results_file import ResultsFile

pytestmark = pytest.mark.fast  # in-process: make test-fast


def record(n: int, **extra: object) -> dict:
    return {"request_id": f"req-{n}", "image_id": f"이미지-{n}", "status": "completed", "n": n, **extra}


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "results.json"


def ledger_file(path: Path, *batches: list[dict]) -> None:
    results = ResultsFile(path)
    results.open()
    try:
        for batch in batches:
            results.append(batch)
    finally:
        results.close()


def torn_states(before: bytes, records: list[dict]) -> list[bytes]:
    """The file after every prefix of an append of `records` to `before`, as a
    reader may see it: the append's first bytes over the old closing, whose
    remaining bytes stay behind them until overwritten."""
    has_records = before != EMPTY
    text = encode_append([encode_line(r) for r in records], after_records=has_records)
    offset = len(before) - 3
    states = []
    for cut in range(len(text) + 1):
        written = before[:offset] + text[:cut]
        states.append(written + before[len(written) :])
    return states


# ---------------------------------------------------------------- writing


def test_a_line_is_ascii_json_with_the_default_separators() -> None:
    line = encode_line({"image_id": "ü\n]\n", "n": 1, "x": None})
    assert line == b'{"image_id": "\\u00fc\\n]\\n", "n": 1, "x": null}'
    assert json.loads(line) == {"image_id": "ü\n]\n", "n": 1, "x": None}


def test_the_ledger_writes_exactly_encode_file_of_its_lines(path: Path) -> None:
    batches = [[record(0)], [record(1), record(2)], [record(3)]]
    ledger_file(path, *batches)
    assert path.read_bytes() == encode_file([encode_line(r) for batch in batches for r in batch])
    empty = path.with_name("empty.json")
    ledger_file(empty)
    assert empty.read_bytes() == encode_file([]) == EMPTY == b"[\n]\n"


# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b'{"a": 1}', {"a": 1}),
        (b'{"a": 1},', {"a": 1}),
        (b'{"a": 1},]', {"a": 1}),  # an append torn after its first byte
        (b"[", None),
        (b"]", None),
        (b"", None),
        (b",", None),
        (b'{"a": 1', None),  # torn
        (b'{"a": {"b": 1}', None),  # torn just after an inner "}"
        (b"{not json}", None),
        (b"[1, 2]", None),
        (b"{" * 100_000 + b"}", None),  # too deep for json: not ours
    ],
)
def test_parse_line(line: bytes, expected: dict | None) -> None:
    assert parse_line(line) == expected


def test_a_string_holding_the_closing_text_does_not_split_its_line() -> None:
    tricky = record(0, error='ends with \n]\n and ",\n{"x": 1}\n]\n"')
    data = encode_file([encode_line(tricky), encode_line(record(1))])
    assert [parse_line(text) for text, _ in record_lines(data)] == [tricky, record(1)]
    assert json.loads(data) == [tricky, record(1)]


def test_record_lines_stop_at_the_last_newline_unless_told_otherwise() -> None:
    data = b"[\n" + encode_line(record(0)) + b",\n" + encode_line(record(1))
    assert [json.loads(t) for t, _ in record_lines(data)] == [record(0)]
    assert [json.loads(t) for t, _ in record_lines(data, through_end=True)] == [record(0), record(1)]
    text, end = next(record_lines(data))
    assert data[:end].endswith(text) and data[end : end + 1] == b","


def test_complete_records_of_a_tail_cut_anywhere(path: Path) -> None:
    ledger_file(path, [record(0), record(1)])
    before = path.read_bytes()
    for state in torn_states(before, [record(2)]):
        records, end = complete_records(state)
        whole = b"\n" + encode_line(record(2)) in state
        assert records == [record(0), record(1), *([record(2)] if whole else [])], state
        assert state[:end].endswith(encode_line(records[-1]))


def test_complete_records_skip_a_line_that_only_looks_like_a_record() -> None:
    data = b"[\n" + encode_line(record(0)) + b',\n{not json},\n{"a": {"b": 1}'
    records, end = complete_records(data)
    assert records == [record(0)]
    assert end == len(b"[\n" + encode_line(record(0)))
    assert complete_records(EMPTY) == ([], None)


# ---------------------------------------------------------------- following


def test_the_follower_sees_nothing_before_the_file_exists_and_in_an_empty_array(path: Path) -> None:
    follower = ResultsFollower(path)
    assert list(follower.poll()) == []
    ledger_file(path)
    assert list(follower.poll()) == []
    assert follower.count == 0
    ledger_file(path, [record(0)])
    assert list(follower.records()) == [record(0)]
    assert follower.count == 1


def test_the_follower_hands_out_each_record_once_through_appends_torn_at_every_byte(path: Path) -> None:
    ledger_file(path, [record(0)])
    before = path.read_bytes()
    follower = ResultsFollower(path)
    assert list(follower.records()) == [record(0)]
    states = torn_states(before, [record(1), record(2)])
    for state in states:
        path.write_bytes(state)
        new = list(follower.records())
        seen_by_newcomer = list(ResultsFollower(path).records())
        # What a follower has is always a prefix of the records, never a torn one.
        assert new in ([], [record(1)], [record(2)], [record(1), record(2)]), state
        assert seen_by_newcomer == [record(n) for n in range(len(seen_by_newcomer))], state
    assert follower.count == 3
    assert list(ResultsFollower(path).records()) == [record(0), record(1), record(2)]


def test_the_follower_sees_the_record_before_an_append_torn_after_one_byte(path: Path) -> None:
    ledger_file(path, [record(0)])
    before = path.read_bytes()
    path.write_bytes(before[:-3] + b",]\n")
    assert list(ResultsFollower(path).records()) == [record(0)]


def test_the_follower_starts_again_when_a_repair_shrinks_the_file(path: Path) -> None:
    ledger_file(path, [record(0), record(1)])
    follower = ResultsFollower(path)
    # A ledger killed mid-append: two whole lines of its batch were already there.
    before = path.read_bytes()
    path.write_bytes(before[:-3] + b",\n" + encode_line(record(2)) + b",\n" + encode_line(record(3))[:7])
    assert list(follower.records()) == [record(0), record(1), record(2)]
    # The next ledger cuts the torn line; a failed write's restore cuts more.
    path.write_bytes(before)
    assert list(follower.records()) == [record(0), record(1)]
    assert follower.count == 2
    ledger_file(path, [record(4)])
    assert list(follower.records()) == [record(4)]
    assert follower.count == 3


def test_the_follower_reads_again_a_torn_tail_rewritten_to_the_same_size(path: Path) -> None:
    # A ledger killed mid-append leaves a line without its newline; the next
    # ledger cuts it, puts the closing back and appends the redelivered task's
    # record, whose line may be shorter: the file can come back to the very size
    # the follower last read, with a whole record in it now.
    ledger_file(path, [record(0)])
    before = path.read_bytes()
    follower = ResultsFollower(path)
    assert list(follower.records()) == [record(0)]
    redelivered = encode_line(record(1))
    torn = encode_line(record(1, error="x" * 40))[: len(redelivered) + len(b"\n]\n")]
    path.write_bytes(before[:-3] + b",\n" + torn)
    assert list(follower.records()) == []
    repaired = before[:-3] + b",\n" + redelivered + b"\n]\n"
    assert len(repaired) == path.stat().st_size  # the same size, the same inode
    path.write_bytes(repaired)
    assert list(follower.records()) == [record(1)]
    assert follower.count == 2


def test_the_follower_starts_again_when_the_file_is_replaced(path: Path) -> None:
    # A file of the original module, indented: not this format until the ledger migrates it.
    seed = [record(0), record(1)]
    path.write_text(json.dumps(seed, indent=2))
    follower = ResultsFollower(path)
    assert list(follower.records()) == []
    ledger_file(path, [record(2)])  # open() migrates it (os.replace), then appends
    assert list(follower.records()) == [*seed, record(2)]
    assert follower.count == 3
    # Replaced by a file of the same size: told apart by its inode.
    replacement = path.with_name("other.json")
    ledger_file(replacement, [record(5), record(6), record(7)])
    os.replace(replacement, path)
    assert list(follower.records()) == [record(5), record(6), record(7)]


def test_the_follower_reads_a_large_file_in_pieces(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(results_files, "READ_CHUNK", 100)  # smaller than two lines
    ledger_file(path, [record(n) for n in range(50)])
    follower = ResultsFollower(path)
    assert list(follower.records()) == [record(n) for n in range(50)]
    ledger_file(path, [record(50)])
    assert list(follower.records()) == [record(50)]


def test_a_poll_left_early_goes_on_from_the_last_line_handed_out(path: Path) -> None:
    ledger_file(path, [record(n) for n in range(5)])
    follower = ResultsFollower(path)
    poll = follower.poll()
    assert [json.loads(next(poll)) for _ in range(2)] == [record(0), record(1)]
    poll.close()
    assert follower.count == 2
    assert list(follower.records()) == [record(2), record(3), record(4)]


def test_the_follower_hands_out_lines_as_the_file_holds_them(path: Path) -> None:
    ledger_file(path, [record(0), record(1)])
    assert list(ResultsFollower(path).poll()) == [encode_line(record(0)), encode_line(record(1))]


# ---------------------------------------------------------------- whole-file and backwards reads


def test_read_records_of_a_missing_an_empty_and_a_full_file(path: Path) -> None:
    assert read_records(path) == []
    ledger_file(path)
    assert read_records(path) == []
    ledger_file(path, [record(0), record(1)])
    assert read_records(path) == [record(0), record(1)]


def test_read_records_reads_a_torn_tail_again_until_the_append_ends(path: Path) -> None:
    ledger_file(path, [record(0)])
    states = torn_states(path.read_bytes(), [record(1)])
    torn = states[10]
    path.write_bytes(torn)

    def finish_the_append() -> None:
        with open(path, "r+b") as raw:
            raw.seek(len(torn))
            raw.write(states[-1][len(torn) :])

    finisher = threading.Timer(0.1, finish_the_append)
    finisher.start()
    try:
        assert read_records(path, timeout=5.0) == [record(0), record(1)]
    finally:
        finisher.join()


def test_read_records_gives_up_on_a_tail_that_stays_torn_or_a_file_that_is_no_array(path: Path) -> None:
    path.write_bytes(b"[\n" + encode_line(record(0))[:9])
    with pytest.raises(UnreadableResults, match="stayed unparsable for 0.1s"):
        read_records(path, timeout=0.1)
    path.write_bytes(b'{"a": 1}')
    with pytest.raises(UnreadableResults, match="holds dict, not a JSON array"):
        read_records(path)


def test_lines_from_end_reads_back_to_front_within_its_budget(tmp_path: Path) -> None:
    path = tmp_path / "f"
    lines = [f"line {index}".encode() for index in range(300_000)]
    path.write_bytes(b"\n".join(lines))
    assert list(lines_from_end(path, limit=None)) == lines[::-1]
    assert list(lines_from_end(path, limit=30))[:2] == [b"line 299999", b"line 299998"]
    (tmp_path / "link").symlink_to(path)
    with pytest.raises(OSError):
        list(lines_from_end(tmp_path / "link", limit=None))


def test_lines_from_end_give_the_records_newest_first(path: Path) -> None:
    ledger_file(path, [record(n) for n in range(3)])
    parsed = [parse_line(line) for line in lines_from_end(path, limit=None)]
    assert [r for r in parsed if r is not None] == [record(2), record(1), record(0)]


def test_encoded_field_is_what_a_written_line_holds_for_an_id() -> None:
    for task_id in ["plain", 'quo"te', "back\\slash", "ünï 文字", "new\nline", "\x00"]:
        line = encode_line({"request_id": "r", "task_id": task_id, "status": "completed"})
        assert encoded_field("task_id", task_id) in line
        assert encoded_field("task_id", task_id + "x") not in line
        assert encoded_field("request_id", task_id) not in line or task_id == "r"
