"""The wire format: hosting task messages and the envelope we keep them in.

Producers RPUSH the seed's JSON messages. When a worker claims one, a Lua script
wraps it, whatever its bytes, in an envelope
(`irw2 <task_id> <deliveries> <original_length> <origin>\\n<body>`) inside the
worker's processing list, a list only the pool writes (shared.state.redis_queue), so
the task keeps one identity and a delivery count across redeliveries. The
worker is handed at most MAX_MESSAGE_BYTES of the body. Everything in a message
is untrusted: this module turns bytes into a `Task` or raises `InvalidMessage`
with a reason a person can act on, and never lets another exception escape.

It is also the one door through which message text reaches what the pool
writes (results.json, the dead letters, the results stream, file names): JSON
can spell a lone surrogate (`"\\ud800"`, or its raw bytes) that no UTF-8 holds,
and jq or serde_json refuse a file that holds one, for good, since results.json
is append-only. A message whose id or URL is not valid Unicode is refused, and
salvage() names no id it could not write faithfully (docs/security.md).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

# The limits a producer's message must keep are the client's to publish.
from image_result_client.protocol import (
    ITEM_SIZES,
    MAX_DIMENSION,
    MAX_ID_LENGTH,
    MAX_REQUEST_IMAGES,
    MAX_URL_LENGTH,
    SEGMENT_NAME,
    SUPPORTED_DTYPES,
    is_unicode,
)

ENVELOPE_MAGIC = b"irw2 "
# The old producer form: shm_info was a bare segment name of a 1024x1024 BGR frame.
LEGACY_SHAPE = (1024, 1024, 3)
LEGACY_DTYPE = "uint8"
# Task ids are made by our claim script; one read back from Redis is checked all the same,
# because it becomes part of a file name.
TASK_ID = re.compile(r"[A-Za-z0-9-]{1,64}")


class InvalidMessage(ValueError):
    """The message can never succeed; the reason goes into the failed record."""


@dataclass(frozen=True, slots=True)
class Envelope:
    task_id: str
    deliveries: int
    body: bytes
    truncated: bool
    raw: bytes  # the exact bytes in the processing list, needed to acknowledge


@dataclass(frozen=True, slots=True)
class SegmentRef:
    name: str
    shape: tuple[int, ...]
    dtype: str
    legacy: bool = False

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * ITEM_SIZES[self.dtype]


@dataclass(frozen=True, slots=True)
class Task:
    request_id: str
    image_id: str
    segment: SegmentRef | None
    image_url: str | None
    # Why shm_info was unusable when a URL fallback exists; reported if the URL fails too.
    segment_error: str | None = None
    # How many distinct images its request has (None: not counted as a request).
    request_images: int | None = None
    # Unix seconds after which nobody wants the result (the message's `deadline`); None: never.
    deadline: float | None = None

    @property
    def source(self) -> str:
        return "shm" if self.segment is not None else "url"


def parse_envelope(raw: bytes) -> Envelope:
    """Split an envelope written by the claim script. Raises InvalidMessage."""
    header, sep, body = raw.partition(b"\n")
    fields = header.split(b" ")  # magic, task id, deliveries, length, origin
    if not raw.startswith(ENVELOPE_MAGIC) or not sep or len(fields) != 5:
        raise InvalidMessage("processing list holds an entry that is not an envelope")
    try:
        task_id = fields[1].decode("ascii")
        deliveries = int(fields[2])
        original_length = int(fields[3])
    except (UnicodeDecodeError, ValueError):
        raise InvalidMessage("envelope header is malformed") from None
    if not TASK_ID.fullmatch(task_id) or deliveries < 1:
        raise InvalidMessage("envelope header is malformed")
    return Envelope(task_id, deliveries, body, len(body) < original_length, raw)


def parse_task(envelope: Envelope, *, max_pixels: int) -> Task:
    """Validate a task message. Raises InvalidMessage, nothing else."""
    if envelope.truncated:
        raise InvalidMessage(f"message is larger than MAX_MESSAGE_BYTES ({len(envelope.body)} bytes kept)")
    try:
        message = json.loads(envelope.body)
    except ValueError as exc:  # also huge integers, which json refuses with a plain ValueError
        raise InvalidMessage(f"message is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidMessage("message is not valid JSON: nested too deeply") from None
    if not isinstance(message, dict):
        raise InvalidMessage(f"message is a JSON {type(message).__name__}, expected an object")
    request_id = _identifier(message, "request_id")
    image_id = _identifier(message, "image_id")
    image_url = _image_url(message)
    request_images = _request_images(message.get("request_images"), present="request_images" in message)
    deadline = message.get("deadline")
    if deadline is not None:  # absent or null: none, as for image_url
        deadline = _deadline(deadline)
    segment, segment_error = None, None
    if "shm_info" in message:
        try:
            segment = _segment_ref(message["shm_info"], max_pixels=max_pixels)
        except InvalidMessage as exc:
            if image_url is None:
                raise
            segment_error = str(exc)
    elif image_url is None:
        raise InvalidMessage("message has neither shm_info nor image_url")
    return Task(request_id, image_id, segment, image_url, segment_error, request_images, deadline)


@dataclass(frozen=True, slots=True)
class Salvage:
    """What can still be read from a message that failed validation."""

    request_id: str | None = None
    image_id: str | None = None
    segment_name: str | None = None
    request_images: int | None = None  # only a valid one: the failed image still counts for its request


def salvage(body: bytes) -> Salvage:
    """Best-effort ids for the failed record, and the segment the producer handed
    over, which must be unlinked even though the message was unusable."""
    try:
        message = json.loads(body)
    except (ValueError, RecursionError):
        return _salvage_text(body)
    if not isinstance(message, dict):
        return Salvage()
    ids = []
    for key in ("request_id", "image_id"):
        value = message.get(key)
        ids.append(_salvaged_id(value) if isinstance(value, str | int) and not isinstance(value, bool) else None)
    info = message.get("shm_info")
    raw_name = info.get("shm_name") if isinstance(info, dict) else info
    try:
        name = segment_name(raw_name) if raw_name is not None else None
    except InvalidMessage:
        name = None
    return Salvage(ids[0], ids[1], name, _valid_request_images(message.get("request_images")))


# A message cut at MAX_MESSAGE_BYTES, or broken by a stray byte, is not JSON,
# yet usually still names its ids and its segment in plain text. The ids let the
# producer find its failed record; the segment was handed over with the message,
# so it is ours to unlink, or it would stay in /dev/shm until the host reboots.
_STRING_OR_INT = rb'"((?:[^"\\\x00-\x1f]|\\.)*)"|(-?[0-9]+)'
_TEXT_FIELDS = {
    key: re.compile(rb'"%s"\s*:\s*(?:%s)' % (key.encode(), _STRING_OR_INT))
    for key in ("request_id", "image_id", "shm_name", "shm_info", "request_images")
}


def _salvage_text(body: bytes) -> Salvage:
    """Salvage from a body that is not JSON: a field counts only when the text
    gives it exactly one value, so a guess never names another task's segment."""
    request_id, image_id, shm_name, shm_info, request_images = (_one_text_value(body, key) for key in _TEXT_FIELDS)
    raw_name = shm_name if shm_name is not None else shm_info
    try:
        name = segment_name(raw_name) if raw_name is not None else None
    except InvalidMessage:  # also a number where a name should be
        name = None
    ids = [_salvaged_id(value) if value not in (None, "") else None for value in (request_id, image_id)]
    return Salvage(ids[0], ids[1], name, _valid_request_images(request_images))


def _salvaged_id(value: str | int) -> str | None:
    """An id for a failed record, or None where it is not valid Unicode: a
    record names only what it can write as the producer sent it."""
    text = str(value)[:MAX_ID_LENGTH]
    return text if text.isascii() or is_unicode(text) else None


def _one_text_value(body: bytes, key: str) -> str | int | None:
    values: set[str | int] = set()
    for match in _TEXT_FIELDS[key].finditer(body):
        quoted, number = match.groups()
        try:
            values.add(json.loads(b'"%s"' % quoted) if quoted is not None else int(number))
        except ValueError:  # a bad escape, bytes that are not UTF-8, a number too long
            return None
    return values.pop() if len(values) == 1 else None


def _identifier(message: dict, key: str) -> str:
    if key not in message:
        raise InvalidMessage(f"message is missing {key!r}")
    value = message[key]
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise InvalidMessage(f"{key} must be a string, got {type(value).__name__}")
    text = str(value)
    if not text or len(text) > MAX_ID_LENGTH:
        raise InvalidMessage(f"{key} must be 1..{MAX_ID_LENGTH} characters long")
    return _unicode(text, key)


def _request_images(value: object, *, present: bool) -> int | None:
    """The request's declared image count; absent is None (a task of no counted
    request, as before), anything but an integer 1..MAX_REQUEST_IMAGES is refused."""
    if not present:
        return None
    count = _valid_request_images(value)
    if count is None:
        shown = repr(value)[:40] if isinstance(value, int) and not isinstance(value, bool) else type(value).__name__
        raise InvalidMessage(f"request_images must be an integer 1..{MAX_REQUEST_IMAGES}, got {shown}")
    return count


def _valid_request_images(value: object) -> int | None:
    # bool is an int to Python, not to a producer: `true` is refused.
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_REQUEST_IMAGES:
        return value
    return None


def _image_url(message: dict) -> str | None:
    url = message.get("image_url")
    if url is None:
        return None
    if not isinstance(url, str) or not url or len(url) > MAX_URL_LENGTH:
        raise InvalidMessage(f"image_url must be a string of 1..{MAX_URL_LENGTH} characters")
    return _unicode(url, "image_url")


def _unicode(text: str, key: str) -> str:
    """`text` if UTF-8 can hold it. Refused, not repaired: a replacement character
    in its place could be another request's id, and the producer matches its
    record by this id."""
    if not text.isascii() and not is_unicode(text):
        position = next(i for i, char in enumerate(text) if "\ud800" <= char <= "\udfff")
        raise InvalidMessage(
            f"{key} is not valid Unicode: a lone surrogate {text[position]!r} at character {position + 1}"
        )
    return text



def _deadline(value: object) -> float:
    """A message's `deadline` as Unix seconds. json.loads reads NaN and
    Infinity, which no comparison treats as a time, and a bool is an int to
    Python: all refused."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidMessage(f"deadline must be a number (Unix seconds), got {type(value).__name__}")
    try:
        deadline = float(value)
    except OverflowError:  # an integer too large for a float
        raise InvalidMessage("deadline must be a finite number of Unix seconds") from None
    if not math.isfinite(deadline):
        raise InvalidMessage(f"deadline must be a finite number of Unix seconds, got {value!r}")
    return deadline


# How the error of every task failed for its deadline starts: the ledger counts
# such failures as expired by it (shared.ipc.records.CompletionRecord.expired).
EXPIRED_PREFIX = "expired:"


def expired_reason(deadline: float, now: float) -> str:
    """The failed record's error for a task that was not started by its deadline."""
    return f"{EXPIRED_PREFIX} its deadline {deadline:.3f} passed {now - deadline:.3f}s before it could start"


def expired_before_retry_reason(deadline: float, retry_at: float, error: object) -> str:
    """The failed record's error for a task whose retry would come due after its deadline."""
    return (
        f"{EXPIRED_PREFIX} its deadline {deadline:.3f} comes {retry_at - deadline:.3f}s "
        f"before its retry is due; last error: {error}"
    )


def _segment_ref(info: object, *, max_pixels: int) -> SegmentRef:
    if isinstance(info, str):
        return SegmentRef(segment_name(info), LEGACY_SHAPE, LEGACY_DTYPE, legacy=True)
    if not isinstance(info, dict):
        raise InvalidMessage("shm_info must be an object (or, from old producers, a segment name)")
    name = segment_name(info.get("shm_name"))
    shape = _shape(info.get("shape"), max_pixels=max_pixels)
    dtype = info.get("dtype")
    if dtype not in SUPPORTED_DTYPES:
        raise InvalidMessage(f"shm_info.dtype {dtype!r} is not supported; expected one of {', '.join(SUPPORTED_DTYPES)}")
    ref = SegmentRef(name, shape, dtype)
    size = info.get("size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size != ref.nbytes):
        raise InvalidMessage(f"shm_info.size {size!r} does not match shape {list(shape)} of {dtype} ({ref.nbytes} bytes)")
    return ref


def segment_name(value: object) -> str:
    """The segment's name without its optional leading '/'; anything odd is refused."""
    if not isinstance(value, str):
        raise InvalidMessage("shm_info.shm_name must be a string")
    name = value[1:] if value.startswith("/") else value
    if not SEGMENT_NAME.fullmatch(name):
        raise InvalidMessage(f"shm_info.shm_name {value[:80]!r} is not a valid segment name")
    return name


def _shape(value: object, *, max_pixels: int) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) not in (2, 3):
        raise InvalidMessage("shm_info.shape must be [height, width] or [height, width, channels]")
    if not all(isinstance(d, int) and not isinstance(d, bool) for d in value):
        raise InvalidMessage("shm_info.shape must hold integers")
    height, width = value[0], value[1]
    if not (0 < height <= MAX_DIMENSION and 0 < width <= MAX_DIMENSION):
        raise InvalidMessage(f"shm_info.shape {value} has a dimension outside 1..{MAX_DIMENSION}")
    if height * width > max_pixels:
        raise InvalidMessage(f"shm_info.shape {value} has more than MAX_PIXELS={max_pixels} pixels")
    if len(value) == 3 and value[2] not in (1, 3, 4):
        raise InvalidMessage(f"shm_info.shape {value} has {value[2]} channels; expected 1, 3 or 4")
    return tuple(value)
