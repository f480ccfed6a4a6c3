"""What producers and the pool agree on, kept here once: the pool's shared/
modules import it from this module, and producers get it with the client.

    producer --RPUSH JSON--> {queue} or {queue}:host:<HOST_ID>   (QueueKeys)
      pool --record--> OUTPUT_DIR/results.json (RESULTS_NAME), and the JPEG named
                       in it, which stays under .partial/ for a moment after its
                       record is written (awaiting_publication)

- Names: the default queue, results stream and segment prefix, and every key
  of one queue (the pool's own keys too, so there is one list of them).
- Limits a message must keep: id and URL lengths, frame dimensions and dtypes,
  segment names.
- PUSH_FOR_HOST_SCRIPT (push_for_host.lua), the one script a producer runs.

Only the standard library: the pool imports this module in every process.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

DEFAULT_REDIS_URL = "redis://localhost:6379"
DEFAULT_QUEUE = "hosting_tasks"
DEFAULT_RESULTS_STREAM = "hosting_results"
DEFAULT_OUTPUT_DIR = Path("./output/translated")
DEFAULT_SEGMENT_PREFIX = "img_shm_"
# Where POSIX shared memory segments live: a segment named N is the file SHM_DIR/N.
SHM_DIR = Path("/dev/shm")

MAX_ID_LENGTH = 512
MAX_URL_LENGTH = 8192
MAX_DIMENSION = 65_535
ITEM_SIZES = {"uint8": 1, "uint16": 2, "float32": 4, "float64": 8}
SUPPORTED_DTYPES = tuple(ITEM_SIZES)
# POSIX shm names are file names in /dev/shm; this keeps them from being anything else.
SEGMENT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,254}")
HOST_ID = re.compile(r"[A-Za-z0-9_.\-]{1,100}")
MAX_LIST_NAME = 200
# The most images one request may declare (`request_images`): its request
# record lists every image, and must stay a reasonable line and stream entry.
MAX_REQUEST_IMAGES = 10_000

RESULTS_NAME = "results.json"
# One record per request that declared request_images, appended when it ends.
REQUESTS_NAME = "requests.json"
PARTIAL_DIR = ".partial"

# Stats buckets are this many seconds wide; `status` sums the last minute's.
STATS_BUCKET_SECONDS = 10

# The one script a producer runs; its header names its KEYS and ARGV.
PUSH_FOR_HOST_SCRIPT = resources.files(__package__).joinpath("push_for_host.lua").read_text()


def has_hash_tag(key: str) -> bool:
    """Whether Redis Cluster hashes `key` on a tag: the text between its first
    "{" and the first "}" after it, when that text is not empty."""
    start = key.find("{")
    return start >= 0 and key.find("}", start + 1) > start + 1


def check_list_name(name: str) -> None:
    """ValueError unless the pool accepts `name` for its queue or results stream."""
    if not 1 <= len(name) <= MAX_LIST_NAME or any(c.isspace() for c in name):
        raise ValueError(f"not a valid list name; expected 1..{MAX_LIST_NAME} characters, no spaces")
    if ("{" in name or "}" in name) and not has_hash_tag(name):
        raise ValueError("braces must form one Redis Cluster hash tag, like {hosting_tasks}")


@dataclass(frozen=True, slots=True)
class QueueKeys:
    """Every key of one queue. They share the queue's Redis Cluster hash slot:
    `{hosting_tasks}:dead` hashes on `hosting_tasks`, as the bare queue key
    `hosting_tasks` does, so each Lua script touches one slot."""

    queue: str

    @property
    def prefix(self) -> str:
        # A queue name that carries its own hash tag already picks the slot.
        return self.queue if has_hash_tag(self.queue) else "{" + self.queue + "}"

    @property
    def registry(self) -> str:
        """The set of every processing list in use, so orphans can be found without SCAN."""
        return f"{self.prefix}:processing"

    @property
    def wait_sources(self) -> str:
        """Hash: processing list -> "<the list its worker's BLMOVE waits on> <its host's queue>",
        where a requeue sends a message that was never wrapped, and host-queue tasks."""
        return f"{self.prefix}:wait_sources"

    @property
    def redelivery(self) -> str:
        """Hash: "<list> <sha1 of a message>" -> the identities ("<task id>:<deliveries>")
        of the copies of that message that went back to that list (see the pool's shared/state/lua/envelopes.lua)."""
        return f"{self.prefix}:redelivery"

    @property
    def dead(self) -> str:
        return f"{self.prefix}:dead"

    @property
    def dead_junk(self) -> str:
        """Dead letters of junk (messages without a request_id), capped apart from the others."""
        return f"{self.prefix}:dead:junk"

    @property
    def dead_trimmed(self) -> str:
        """How many dead letters each cap has pushed out, by kind."""
        return f"{self.prefix}:dead:trimmed"

    @property
    def announced(self) -> str:
        """Sorted set of task ids whose outcome was announced (dead letter,
        results stream), so each is announced once."""
        return f"{self.prefix}:announced"

    def stats(self, epoch_seconds: float) -> str:
        """Hash of counts for one STATS_BUCKET_SECONDS-wide slice of time."""
        return f"{self.prefix}:stats:{int(epoch_seconds) // STATS_BUCKET_SECONDS}"

    @property
    def delayed(self) -> str:
        """Sorted set of envelopes waiting for a retry, scored by when they are due."""
        return f"{self.prefix}:delayed"

    def processing(self, instance: str, worker: str) -> str:
        return f"{self.prefix}:processing:{instance}:{worker}"

    def incoming(self, processing_key: str) -> str:
        """Where a worker's blocking wait moves one message, before it is wrapped
        into `processing_key`: a list of producers' bytes only."""
        return processing_key.replace(":processing:", ":incoming:", 1)

    def lease(self, instance: str) -> str:
        return f"{self.prefix}:lease:{instance}"

    def host(self, host_id: str) -> str:
        """The queue of tasks meant for one host: shared-memory tasks, and tasks
        whose record that host's ledger may hold."""
        return f"{self.prefix}:host:{host_id}"

    def live_host(self, host_id: str) -> str:
        """A key that exists while a supervisor serving `host_id`'s queue
        (HOST_QUEUE=true) renews its lease; producers look at it. Not under
        `:host:`, where host_queues() finds the host queues."""
        return f"{self.prefix}:live_host:{host_id}"

    @property
    def committing(self) -> str:
        """Hash: task id -> the host queue of the ledger committing its record,
        from just before the commit until the acknowledgement."""
        return f"{self.prefix}:committing"

    def request(self, request_id_json: str) -> str:
        """Hash of one open request: its distinct images recorded so far. Named
        by the request id as a JSON string (ASCII) without its quotes: one key
        per id, whatever characters the id holds."""
        return f"{self.prefix}:request:{request_id_json[1:-1]}"

    @property
    def open_requests(self) -> str:
        """Sorted set: request id as a JSON string -> when its REQUEST_TTL runs out."""
        return f"{self.prefix}:requests"

    @property
    def ended_requests(self) -> str:
        """Sorted set: request id as a JSON string -> when it ended; kept for REQUEST_TTL."""
        return f"{self.prefix}:requests_ended"

    def unwritten_requests(self, writer: str) -> str:
        """List of the request records a pool ended and has not yet written to
        its requests.json; `writer` is "<HOST_ID>:<a digest of its OUTPUT_DIR>"."""
        return f"{self.prefix}:requests_unwritten:{writer}"

    def is_producers_list(self, key: str) -> bool:
        """The queue or one host's queue: the lists producers push onto."""
        host_prefix = self.host("")
        return key == self.queue or (key.startswith(host_prefix) and HOST_ID.fullmatch(key[len(host_prefix):]) is not None)

    def instance_of(self, processing_key: str) -> str | None:
        prefix = f"{self.prefix}:processing:"
        if not processing_key.startswith(prefix):
            return None
        return processing_key[len(prefix):].split(":", 1)[0]


def partial_name(task_id: str, delivery: int) -> str:
    """The file name, within PARTIAL_DIR, of the JPEG of one delivery of a task."""
    return f"{task_id}.{delivery}.jpg"


def partial_path(output_dir: Path, task_id: str, delivery: int) -> Path:
    """Where a worker writes the JPEG of one delivery of a task, before the ledger publishes it."""
    return output_dir / PARTIAL_DIR / partial_name(task_id, delivery)


def awaiting_publication(output_dir: Path, record: Mapping[str, Any]) -> bool:
    """Whether a completed record's JPEG is still under .partial/: the ledger
    names the file before it appends the record, but after a power cut (or a
    ledger of an older version killed in between) the record can come first,
    and the next ledger names the file at start. A reader of results.json that
    opens file_path waits while this holds."""
    if record.get("status") != "completed":
        return False
    try:
        partial = partial_path(output_dir, str(record["task_id"]), int(record["attempts"]))
    except (KeyError, TypeError, ValueError):
        return False
    return partial.exists()


def is_unicode(text: str) -> bool:
    """Whether `text` holds no lone surrogate, so that UTF-8 and strict JSON
    parsers (jq, serde_json) take it: what the pool writes must be."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
