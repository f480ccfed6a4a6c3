"""Message validation: every untrusted message becomes a Task or an InvalidMessage, nothing else."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.ipc.records import FAILED, CompletionRecord
from shared.messages import (
    InvalidMessage,
    SegmentRef,
    Task,
    expired_before_retry_reason,
    expired_reason,
    parse_envelope,
    parse_task,
    salvage,
)

pytestmark = pytest.mark.fast

MAX_PIXELS = 100_000_000
URL = "http://images.example/cat.jpg"


def wrap(body: bytes, *, task_id: str = "t-1", deliveries: int = 1, original_length: int | None = None) -> bytes:
    """An envelope as the Lua claim script writes it."""
    length = len(body) if original_length is None else original_length
    return b"irw2 %s %d %d s\n" % (task_id.encode(), deliveries, length) + body


def parse(message: Any, *, max_pixels: int = MAX_PIXELS) -> Task:
    body = message if isinstance(message, bytes) else json.dumps(message).encode()
    return parse_task(parse_envelope(wrap(body)), max_pixels=max_pixels)


def shm_info(**overrides: Any) -> dict[str, Any]:
    info = {"shm_name": "img_shm_abc", "shape": [480, 640, 3], "dtype": "uint8", "size": 480 * 640 * 3}
    info.update(overrides)
    return info


def message(**overrides: Any) -> dict[str, Any]:
    msg: dict[str, Any] = {"request_id": "req-1", "image_id": "img-1", "shm_info": shm_info()}
    msg.update(overrides)
    return {k: v for k, v in msg.items() if v is not None}


# ---------------------------------------------------------------- envelope


def test_envelope_fields() -> None:
    raw = wrap(b'{"a": 1}', task_id="abc-123", deliveries=3)
    envelope = parse_envelope(raw)
    assert (envelope.task_id, envelope.deliveries, envelope.body) == ("abc-123", 3, b'{"a": 1}')
    assert not envelope.truncated
    assert envelope.raw == raw


@pytest.mark.parametrize(
    "raw",
    [
        b'{"request_id": "r"}', b"irw2 t 1 5 s", b"irw2 t 1 2\n{}", b"irw2 t x 2 s\n{}", b"irw2 t 0 2 s\n{}",
        b"irw2 a/b 1 2 s\n{}", b"irw1 t 1 2 s\n{}",
    ],
    ids=["bare-json", "no-newline", "no-origin", "bad-deliveries", "zero-deliveries", "bad-task-id", "old-version"],
)
def test_malformed_envelope_is_invalid(raw: bytes) -> None:
    with pytest.raises(InvalidMessage):
        parse_envelope(raw)


def test_truncated_envelope_is_invalid() -> None:
    """The claim script keeps at most MAX_MESSAGE_BYTES and records the original length."""
    body = json.dumps(message()).encode()
    envelope = parse_envelope(wrap(body[:20], original_length=len(body)))
    assert envelope.truncated
    with pytest.raises(InvalidMessage, match="larger than MAX_MESSAGE_BYTES"):
        parse_task(envelope, max_pixels=MAX_PIXELS)


# ---------------------------------------------------------------- valid messages


def test_shm_message() -> None:
    task = parse(message())
    assert task == Task("req-1", "img-1", SegmentRef("img_shm_abc", (480, 640, 3), "uint8"), None)
    assert task.source == "shm"


def test_url_message() -> None:
    task = parse(message(shm_info=None, image_url=URL))
    assert (task.segment, task.image_url, task.source) == (None, URL, "url")


def test_both_sources_prefers_shm_and_keeps_url() -> None:
    task = parse(message(image_url=URL))
    assert task.segment is not None and task.image_url == URL
    assert task.source == "shm"


def test_legacy_bare_segment_name() -> None:
    task = parse(message(shm_info="img_shm_old"))
    assert task.segment == SegmentRef("img_shm_old", (1024, 1024, 3), "uint8", legacy=True)


def test_leading_slash_is_stripped_from_segment_name() -> None:
    assert parse(message(shm_info=shm_info(shm_name="/img_shm_abc"))).segment.name == "img_shm_abc"


def test_integer_request_id_is_accepted_as_text() -> None:
    assert parse(message(request_id=42)).request_id == "42"


def test_request_images_is_read_and_absent_means_no_request() -> None:
    assert parse(message(request_images=12)).request_images == 12
    assert parse(message(request_images=10_000)).request_images == 10_000
    assert parse(message()).request_images is None


def test_a_failed_message_still_names_its_request_images_when_valid() -> None:
    """An image whose message fails for another reason still counts for its request."""
    bad_shape = json.dumps(message(request_images=4, shm_info=shm_info(shape=[0, 1]))).encode()
    assert salvage(bad_shape).request_images == 4
    assert salvage(json.dumps(message(request_images=True)).encode()).request_images is None
    assert salvage(b'{"request_id": "r", "image_id": "i", "request_images": 7, "shm_info": {"sh').request_images == 7
    assert salvage(b'{"request_images": 7, "x": 1, "request_images": 8, "y": ').request_images is None


def test_bad_shm_info_with_valid_url_falls_back_to_url() -> None:
    task = parse(message(shm_info=shm_info(shm_name="../etc/passwd"), image_url=URL))
    assert task.segment is None and task.image_url == URL
    assert task.segment_error is not None and "shm_name" in task.segment_error


# ---------------------------------------------------------------- invalid messages


INVALID = {
    "malformed-json": (b'{"request_id": "r", ', "not valid JSON"),
    "json-array": (b'["r", "i"]', "list"),
    "json-string": (b'"hello"', "str"),
    "missing-request-id": (message(request_id=None), "request_id"),
    "missing-image-id": (message(image_id=None), "image_id"),
    "request-id-list": (message(request_id=["r"]), "request_id"),
    "request-id-bool": (message(request_id=True), "request_id"),
    "empty-request-id": (message(request_id=""), "request_id"),
    "no-source": (message(shm_info=None), "neither shm_info nor image_url"),
    "name-with-slash": (message(shm_info=shm_info(shm_name="a/b")), "shm_name"),
    "name-dotdot": (message(shm_info=shm_info(shm_name="..")), "shm_name"),
    "name-not-string": (message(shm_info=shm_info(shm_name=123)), "shm_name"),
    "name-missing": (message(shm_info=shm_info(shm_name=None)), "shm_name"),
    "shape-4-dims": (message(shm_info=shm_info(shape=[1, 2, 3, 4], size=None)), "shape"),
    "shape-negative": (message(shm_info=shm_info(shape=[-480, 640, 3], size=None)), "shape"),
    "shape-zero": (message(shm_info=shm_info(shape=[0, 640, 3], size=None)), "shape"),
    "shape-float": (message(shm_info=shm_info(shape=[480.0, 640, 3], size=None)), "integers"),
    "shape-string": (message(shm_info=shm_info(shape=["480", 640, 3], size=None)), "integers"),
    "shape-bool": (message(shm_info=shm_info(shape=[True, 640, 3], size=None)), "integers"),
    "five-channels": (message(shm_info=shm_info(shape=[480, 640, 5], size=None)), "channels"),
    "dtype-int64": (message(shm_info=shm_info(dtype="int64", size=None)), "dtype"),
    "dtype-complex64": (message(shm_info=shm_info(dtype="complex64", size=None)), "dtype"),
    "size-mismatch": (message(shm_info=shm_info(size=480 * 640)), "size"),
    "shm-info-list": (message(shm_info=[1, 2]), "shm_info"),
    "url-not-string": (message(shm_info=None, image_url=5), "image_url"),
    "request-images-zero": (message(request_images=0), "request_images must be an integer 1..10000, got 0"),
    "request-images-negative": (message(request_images=-3), "request_images"),
    "request-images-over-cap": (message(request_images=10_001), "got 10001"),
    "request-images-bool": (message(request_images=True), "got bool"),
    "request-images-float": (message(request_images=3.0), "got float"),
    "request-images-string": (message(request_images="3"), "got str"),
    "request-images-null": (b'{"request_id": "r", "image_id": "i", "image_url": "http://x/y", "request_images": null}',
                            "got NoneType"),
}


@pytest.mark.parametrize(("msg", "reason"), INVALID.values(), ids=INVALID.keys())
def test_invalid_message_has_readable_reason(msg: Any, reason: str) -> None:
    with pytest.raises(InvalidMessage) as caught:
        parse(msg)
    assert reason in str(caught.value)


def test_pixel_count_above_max_pixels_is_invalid() -> None:
    with pytest.raises(InvalidMessage, match="MAX_PIXELS=100 "):
        parse(message(shm_info=shm_info(shape=[20, 20, 3], size=None)), max_pixels=100)


def test_integer_too_long_for_python_is_invalid_message() -> None:
    """Python refuses to parse ints over 4300 digits with a plain ValueError; a
    message of 5 KB (well under MAX_MESSAGE_BYTES) must still be an InvalidMessage."""
    body = b'{"request_id": ' + b"9" * 5000 + b', "image_id": "i", "image_url": "http://x/y"}'
    with pytest.raises(InvalidMessage):
        parse(body)


# ---------------------------------------------------------------- properties

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=10,
)
shm_infos = st.fixed_dictionaries(
    {},
    optional={
        "shm_name": st.text(max_size=20) | json_values,
        "shape": st.lists(st.integers(-5, 70_000), max_size=4) | json_values,
        "dtype": st.sampled_from(["uint8", "uint16", "float32", "float64", "int64"]) | json_values,
        "size": st.integers() | json_values,
    },
)
task_like = st.fixed_dictionaries(
    {},
    optional={
        "request_id": st.text(max_size=10) | json_values,
        "image_id": st.text(max_size=10) | json_values,
        "shm_info": shm_infos | st.text(max_size=20) | json_values,
        "image_url": st.text(max_size=20) | json_values,
        "request_images": st.integers(-2, 10_002) | json_values,
    },
)


def parses_or_is_invalid(body: bytes) -> None:
    try:
        task = parse_task(parse_envelope(wrap(body)), max_pixels=MAX_PIXELS)
    except InvalidMessage as exc:
        assert str(exc)
    else:
        assert isinstance(task, Task)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_are_a_task_or_invalid(body: bytes) -> None:
    parses_or_is_invalid(body)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_arbitrary_json_is_a_task_or_invalid(value: Any) -> None:
    parses_or_is_invalid(json.dumps(value).encode())


@settings(max_examples=300, deadline=None)
@given(task_like)
def test_task_shaped_json_is_a_task_or_invalid(value: dict[str, Any]) -> None:
    parses_or_is_invalid(json.dumps(value).encode())


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=100))
def test_arbitrary_envelope_bytes_are_an_envelope_or_invalid(raw: bytes) -> None:
    try:
        parse_envelope(b"irw2 " + raw)
    except InvalidMessage:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | task_like.map(lambda v: json.dumps(v).encode()))
def test_salvage_never_raises(body: bytes) -> None:
    found = salvage(body)
    request_id, image_id = found.request_id, found.image_id
    assert request_id is None or isinstance(request_id, str)
    assert image_id is None or isinstance(image_id, str)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        # Cut short by a producer that died mid-write, or at MAX_MESSAGE_BYTES.
        (
            b'{"request_id": "r1", "image_id": 42, "shm_info": {"shm_name": "img_shm_abc", "shape": [48',
            ("r1", "42", "img_shm_abc"),
        ),
        # The seed's short form, then a stray byte.
        (b'{"request_id": "r1", "shm_info": "/img_shm_abc", "x": \xff}', ("r1", None, "img_shm_abc")),
        (b'{"request_id": "caf\\u00e9", "x": }', ("caf\u00e9", None, None)),
        # Two different names: neither is ours for sure, so nothing is unlinked.
        (b'{"shm_info": {"shm_name": "a"}, "copy": {"shm_name": "b"}', (None, None, None)),
        (b'{"shm_info": {"shm_name": "../etc/passwd"', (None, None, None)),
        (b'{"shm_info": {"shm_name": 12}', (None, None, None)),
        (b'{"request_id": "r\\x", "shm_info": "ok"', (None, None, "ok")),
        (b"{not json", (None, None, None)),
    ],
)
def test_salvage_reads_ids_and_segment_from_text_that_is_not_json(body: bytes, expected: tuple) -> None:
    found = salvage(body)
    assert (found.request_id, found.image_id, found.segment_name) == expected


# ---------------------------------------------------------------- deadline


def test_deadline_is_kept_as_unix_seconds() -> None:
    assert parse(message(deadline=1_800_000_000)).deadline == 1_800_000_000.0
    assert parse(message(deadline=1_800_000_000.25)).deadline == 1_800_000_000.25


def test_no_deadline_or_null_means_none() -> None:
    assert parse(message()).deadline is None
    assert parse(b'{"request_id": "r", "image_id": "i", "image_url": "%s", "deadline": null}' % URL.encode()).deadline is None


@pytest.mark.parametrize(
    "raw",
    [b'"soon"', b"NaN", b"Infinity", b"-Infinity", b"[1]", b"{}", b"true", b"1e400", b"9" * 400],
)
def test_deadline_that_is_not_a_finite_number_is_invalid(raw: bytes) -> None:
    body = b'{"request_id": "r", "image_id": "i", "image_url": "%s", "deadline": %s}' % (URL.encode(), raw)
    with pytest.raises(InvalidMessage, match="deadline"):
        parse(body)


def failed_with(error: str) -> CompletionRecord:
    return CompletionRecord(
        task_id="t1",
        delivery=2,
        envelope=b"e",
        processing_key="p",
        request_id="r",
        image_id="i",
        status=FAILED,
        finished_at=datetime(2026, 1, 1),
        error=error,
    )


@pytest.mark.parametrize(
    "error",
    [
        expired_reason(1_000.0, 1_002.5),
        expired_before_retry_reason(1_000.0, 1_030.0, "HTTP 503"),
    ],
)
def test_both_errors_of_a_task_past_its_deadline_count_it_as_expired(error: str) -> None:
    assert failed_with(error).expired
    assert not failed_with("HTTP 404").expired


def test_the_error_of_a_retry_past_the_deadline_names_both_times_and_the_last_error() -> None:
    assert expired_before_retry_reason(1_000.0, 1_030.0, "HTTP 503") == (
        "expired: its deadline 1000.000 comes 30.000s before its retry is due; last error: HTTP 503"
    )
