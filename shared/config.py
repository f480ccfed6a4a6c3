"""Settings: read once from the environment and `.env`, validated, frozen.

The environment wins over `.env` in the working directory. Every problem is a
`ConfigError` whose message names the variable and what it accepts, so the
supervisor can print one line and exit 2 (systemd's RestartPreventExitStatus).
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

# The producers' flow control (image_result_client/flow.py): the pool reports
# against the same budget, and the client refuses the same values.
from image_result_client.flow import (
    DEFAULT_MAX_QUEUE_LENGTH,
    DEFAULT_PUSH_WAIT,
    MAX_COUNT,
    MAX_PUSH_WAIT,
    default_shm_budget,
)

# What producers must agree on (names, defaults, the queue-name rule) is the client's.
from image_result_client.protocol import (
    DEFAULT_OUTPUT_DIR,
    DEFAULT_QUEUE,
    DEFAULT_REDIS_URL,
    DEFAULT_RESULTS_STREAM,
    DEFAULT_SEGMENT_PREFIX,
    HOST_ID,
    check_list_name,
)
from image_result_client.redact import redact_url
from image_result_client.settings_file import SettingsFileError, UnknownSetting, unknown_settings
from image_result_client.settings_file import read_dotenv as read_settings_file

T = TypeVar("T")

REDIS_SCHEMES = ("redis", "rediss", "unix")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("auto", "json", "console")
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")
# Chroma subsampling of the written JPEGs: 4:4:4 keeps coloured text sharp.
JPEG_SUBSAMPLINGS = ("444", "422", "420")
NAMED_COLOURS = {"white": (255, 255, 255), "black": (0, 0, 0)}


class ConfigError(ValueError):
    """A setting is invalid; the message is the one line shown to the operator."""


@dataclass(frozen=True, slots=True)
class Settings:
    redis_url: str = DEFAULT_REDIS_URL
    queue: str = DEFAULT_QUEUE
    output_dir: Path = DEFAULT_OUTPUT_DIR
    output_dir_allow_shared: bool = False  # OUTPUT_DIR may be writable by others without the sticky bit
    jpeg_quality: int = 80
    jpeg_subsampling: str = "420"  # the seed's output
    jpeg_progressive: bool = False
    alpha_background: tuple[int, int, int] = (255, 255, 255)  # RGB, white
    log_level: str = "INFO"
    log_format: str = "auto"
    workers: int = 1
    host_id: str = "localhost"  # the real default, the host name, is set in _parse
    host_queue: bool = False
    shutdown_grace: float = 30.0
    unlink_shm: bool = True
    shm_name_prefix: str = DEFAULT_SEGMENT_PREFIX  # empty: any segment name
    shm_owner_uids: tuple[int, ...] = ()  # empty: only the pool's own uid
    shm_budget_bytes: int = 0  # the real default, half the size of /dev/shm, is set in _parse; 0: none
    push_wait: float = DEFAULT_PUSH_WAIT  # the client's; read here so one .env is checked whole
    max_queue_length: int = DEFAULT_MAX_QUEUE_LENGTH  # the client's, as PUSH_WAIT; 0: none
    max_attempts: int = 5
    task_timeout: float = 300.0
    dead_letter_max: int = 10_000
    max_message_bytes: int = 65_536
    max_pixels: int = 25_000_000
    decode_cpu_seconds: float = 30.0  # a URL image's decode; TASK_TIMEOUT / 2 when that is less
    url_connect_timeout: float = 5.0
    url_read_timeout: float = 30.0
    url_max_bytes: int = 50 * 1024 * 1024
    url_max_redirects: int = 3
    url_allowed_hosts: tuple[str, ...] = ()  # empty: any host
    url_allow_loopback: bool = False
    url_allow_private: bool = True
    lease_ttl: float = 15.0
    progress_seconds: float = 30.0  # 0: no progress lines
    redis_sentinels: tuple[tuple[str, int], ...] = ()  # empty: REDIS_URL names the server
    redis_sentinel_master: str = "mymaster"
    claim_min_replicas: int = 0  # 0: wait for the replicas that are connected, if any
    redis_tls_ca_file: Path | None = None
    redis_tls_cert_file: Path | None = None
    redis_tls_key_file: Path | None = None
    results_stream: str = DEFAULT_RESULTS_STREAM
    results_stream_maxlen: int = 100_000  # 0: no stream
    request_ttl: float = 3600.0  # a request with no image recorded for this long ends "incomplete"
    metrics_port: int | None = None  # off unless set
    metrics_address: str = "0.0.0.0"
    dashboard_port: int = 8090
    dashboard_address: str = "127.0.0.1"  # it can change the queue: loopback unless chosen
    dashboard_token: str | None = field(default=None, repr=False)  # None: the dashboard is read-only

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        dotenv_path: Path | None = Path(".env"),
        workers_override: int | None = None,
    ) -> Settings:
        """Build settings from `.env` overlaid by `environ` (default: os.environ)."""
        merged: dict[str, str] = {} if dotenv_path is None else read_dotenv(dotenv_path)
        merged.update(os.environ if environ is None else environ)
        return _parse(merged, workers_override)

    def redacted_redis_url(self) -> str:
        return redact_url(self.redis_url)


DEFAULTS = Settings()


def read_dotenv(path: Path) -> dict[str, str]:
    """The settings a `.env` file holds (none without one); ConfigError naming
    the file when it is there but cannot be read."""
    try:
        return read_settings_file(path)
    except SettingsFileError as exc:
        raise ConfigError(str(exc)) from None


def misspelt_settings(
    environ: Mapping[str, str] | None = None, *, dotenv_path: Path | None = Path(".env")
) -> list[UnknownSetting]:
    """Names in `.env` and the environment that look like settings but are not
    (WORKER=3, JPEG_QUALTY=95), each with the setting probably meant: the pool
    warns about them at start, as systemd does about an unknown key."""
    dotenv = {} if dotenv_path is None else read_dotenv(dotenv_path)
    return unknown_settings(
        dotenv, os.environ if environ is None else environ, setting_names(), dotenv_source=str(dotenv_path)
    )


def setting_names() -> tuple[str, ...]:
    """Every environment variable the settings are read from, as _parse reads
    them: what a launcher must clear so that none leaks in from its own shell."""
    asked: list[str] = []

    class Recorder(dict):
        def get(self, name: str, default: object = None) -> object:
            asked.append(name)
            return default

    _parse(Recorder(), workers_override=None)
    return tuple(asked)


def _parse(env: Mapping[str, str], workers_override: int | None) -> Settings:
    def get(name: str, parse: Callable[[str, str], T], default: T) -> T:
        raw = env.get(name, "").strip()
        return default if raw == "" else parse(name, raw)

    if workers_override is not None:
        workers = _int_in(1, 256)("--workers", str(workers_override))
    else:
        workers = get("WORKERS", _int_in(1, 256), os.cpu_count() or 1)
    return Settings(
        redis_url=get("REDIS_URL", _redis_url, DEFAULTS.redis_url),
        queue=get("HOSTING_TASKS_QUEUE", _queue_name, DEFAULTS.queue),
        output_dir=get("OUTPUT_DIR", _path, DEFAULTS.output_dir).resolve(),
        output_dir_allow_shared=get("OUTPUT_DIR_ALLOW_SHARED", _bool, DEFAULTS.output_dir_allow_shared),
        jpeg_quality=get("JPEG_QUALITY", _int_in(1, 100), DEFAULTS.jpeg_quality),
        jpeg_subsampling=get("JPEG_SUBSAMPLING", _choice(JPEG_SUBSAMPLINGS), DEFAULTS.jpeg_subsampling),
        jpeg_progressive=get("JPEG_PROGRESSIVE", _bool, DEFAULTS.jpeg_progressive),
        alpha_background=get("ALPHA_BACKGROUND", _rgb_colour, DEFAULTS.alpha_background),
        log_level=get("LOG_LEVEL", _choice(LOG_LEVELS, upper=True), DEFAULTS.log_level),
        log_format=get("LOG_FORMAT", _choice(LOG_FORMATS), DEFAULTS.log_format),
        workers=workers,
        host_id=get("HOST_ID", _host_id, socket.gethostname() or "localhost"),
        host_queue=get("HOST_QUEUE", _bool, DEFAULTS.host_queue),
        shutdown_grace=get("SHUTDOWN_GRACE", _float_in(0, 3600), DEFAULTS.shutdown_grace),
        unlink_shm=get("UNLINK_SHM", _bool, DEFAULTS.unlink_shm),
        shm_name_prefix=_shm_name_prefix(env.get("SHM_NAME_PREFIX")),
        shm_owner_uids=get("SHM_OWNER_UIDS", _uid_list, DEFAULTS.shm_owner_uids),
        shm_budget_bytes=get("SHM_BUDGET_BYTES", _int_in(0, MAX_COUNT), default_shm_budget()),
        push_wait=get("PUSH_WAIT", _float_in(0, MAX_PUSH_WAIT), DEFAULTS.push_wait),
        max_queue_length=get("MAX_QUEUE_LENGTH", _int_in(0, MAX_COUNT), DEFAULTS.max_queue_length),
        max_attempts=get("MAX_ATTEMPTS", _int_in(1, 100), DEFAULTS.max_attempts),
        task_timeout=get("TASK_TIMEOUT", _float_in(1, 86_400), DEFAULTS.task_timeout),
        dead_letter_max=get("DEAD_LETTER_MAX", _int_in(1, 10_000_000), DEFAULTS.dead_letter_max),
        max_message_bytes=get("MAX_MESSAGE_BYTES", _int_in(1024, 131_072), DEFAULTS.max_message_bytes),
        max_pixels=get("MAX_PIXELS", _int_in(1, 1_000_000_000), DEFAULTS.max_pixels),
        decode_cpu_seconds=get("DECODE_CPU_SECONDS", _float_in(0.01, 3600), DEFAULTS.decode_cpu_seconds),
        url_connect_timeout=get("URL_CONNECT_TIMEOUT", _float_in(0.1, 600), DEFAULTS.url_connect_timeout),
        url_read_timeout=get("URL_READ_TIMEOUT", _float_in(0.1, 3600), DEFAULTS.url_read_timeout),
        url_max_bytes=get("URL_MAX_BYTES", _int_in(1, 2**31), DEFAULTS.url_max_bytes),
        url_max_redirects=get("URL_MAX_REDIRECTS", _int_in(0, 20), DEFAULTS.url_max_redirects),
        url_allowed_hosts=get("URL_ALLOWED_HOSTS", _host_list, DEFAULTS.url_allowed_hosts),
        url_allow_loopback=get("URL_ALLOW_LOOPBACK", _bool, DEFAULTS.url_allow_loopback),
        url_allow_private=get("URL_ALLOW_PRIVATE", _bool, DEFAULTS.url_allow_private),
        lease_ttl=get("LEASE_TTL", _float_in(2, 3600), DEFAULTS.lease_ttl),
        progress_seconds=get("PROGRESS_SECONDS", _float_in(0, 3600), DEFAULTS.progress_seconds),
        redis_sentinels=get("REDIS_SENTINELS", _address_list, DEFAULTS.redis_sentinels),
        redis_sentinel_master=get("REDIS_SENTINEL_MASTER", _queue_name, DEFAULTS.redis_sentinel_master),
        claim_min_replicas=get("CLAIM_MIN_REPLICAS", _int_in(0, 16), DEFAULTS.claim_min_replicas),
        redis_tls_ca_file=get("REDIS_TLS_CA_FILE", _readable_file, DEFAULTS.redis_tls_ca_file),
        redis_tls_cert_file=get("REDIS_TLS_CERT_FILE", _readable_file, DEFAULTS.redis_tls_cert_file),
        redis_tls_key_file=get("REDIS_TLS_KEY_FILE", _readable_file, DEFAULTS.redis_tls_key_file),
        results_stream=get("RESULTS_STREAM", _queue_name, DEFAULTS.results_stream),
        results_stream_maxlen=get("RESULTS_STREAM_MAXLEN", _int_in(0, 100_000_000), DEFAULTS.results_stream_maxlen),
        request_ttl=get("REQUEST_TTL", _float_in(1, 30 * 86_400), DEFAULTS.request_ttl),
        metrics_port=get("METRICS_PORT", _int_in(1, 65535), DEFAULTS.metrics_port),
        metrics_address=get("METRICS_ADDRESS", _address, DEFAULTS.metrics_address),
        dashboard_port=get("DASHBOARD_PORT", _int_in(1, 65535), DEFAULTS.dashboard_port),
        dashboard_address=get("DASHBOARD_ADDRESS", _address, DEFAULTS.dashboard_address),
        dashboard_token=get("DASHBOARD_TOKEN", _token, DEFAULTS.dashboard_token),
    )


def _int_in(low: int, high: int) -> Callable[[str, str], int]:
    def parse(name: str, raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r} is not an integer; expected {low}..{high}") from None
        if not low <= value <= high:
            raise ConfigError(f"{name}={value} is out of range; expected {low}..{high}")
        return value

    return parse


def _float_in(low: float, high: float) -> Callable[[str, str], float]:
    def parse(name: str, raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r} is not a number; expected {low:g}..{high:g} seconds") from None
        if not low <= value <= high:
            raise ConfigError(f"{name}={value:g} is out of range; expected {low:g}..{high:g} seconds")
        return value

    return parse


def _choice(choices: tuple[str, ...], *, upper: bool = False) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        value = raw.upper() if upper else raw.lower()
        if value not in choices:
            raise ConfigError(f"{name}={raw!r} is not one of {', '.join(choices)}")
        return value

    return parse


def _bool(name: str, raw: str) -> bool:
    word = raw.lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean; expected true or false")


def _rgb_colour(name: str, raw: str) -> tuple[int, int, int]:
    word = raw.lower()
    if word in NAMED_COLOURS:
        return NAMED_COLOURS[word]
    hex_digits = word.removeprefix("#")
    if not re.fullmatch(r"[0-9a-f]{6}", hex_digits):
        raise ConfigError(f"{name}={raw!r} is not a colour; expected #RRGGBB (e.g. #ffffff), white or black")
    red, green, blue = bytes.fromhex(hex_digits)
    return red, green, blue


def _path(name: str, raw: str) -> Path:
    if "\0" in raw:
        raise ConfigError(f"{name} contains a NUL byte; expected a directory path")
    return Path(raw).expanduser()


def _address_list(name: str, raw: str) -> tuple[tuple[str, int], ...]:
    addresses = []
    for item in (part.strip() for part in raw.split(",")):
        host, _, port = item.rpartition(":")
        if not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
            raise ConfigError(f"{name}={raw!r} is not a comma-separated list of host:port")
        addresses.append((host.strip("[]"), int(port)))
    return tuple(addresses)


def _readable_file(name: str, raw: str) -> Path:
    path = _path(name, raw).resolve()
    if not os.access(path, os.R_OK) or not path.is_file():
        raise ConfigError(f"{name}={raw!r} is not a readable file")
    return path


def _host_list(name: str, raw: str) -> tuple[str, ...]:
    hosts = tuple(h.strip().lower() for h in raw.split(",") if h.strip())
    if any(not re.fullmatch(r"[a-z0-9.\-:\[\]]{1,253}", h) for h in hosts):
        raise ConfigError(f"{name}={raw!r} is not a comma-separated list of host names")
    return hosts


def _shm_name_prefix(raw: str | None) -> str:
    """Unlike other settings, set-but-empty means something: accept any name."""
    if raw is None:
        return DEFAULTS.shm_name_prefix
    prefix = raw.strip()
    if prefix and not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,99}", prefix):
        raise ConfigError(
            f"SHM_NAME_PREFIX={raw!r} is not a segment name prefix; expected 1..100 letters, digits, "
            "'_', '.' or '-' (not starting with '.' or '-'), or empty for any name"
        )
    return prefix


def _uid_list(name: str, raw: str) -> tuple[int, ...]:
    items = [item.strip() for item in raw.split(",") if item.strip()]
    if not items or not all(item.isascii() and item.isdigit() and int(item) < 2**32 - 1 for item in items):
        raise ConfigError(f"{name}={raw!r} is not a comma-separated list of numeric user ids")
    return tuple(int(item) for item in items)


def _host_id(name: str, raw: str) -> str:
    if not HOST_ID.fullmatch(raw):
        raise ConfigError(f"{name}={raw!r} is not a host id; expected 1..100 letters, digits, '.', '_' or '-'")
    return raw


def _address(name: str, raw: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9.:\-]{1,253}", raw):
        raise ConfigError(f"{name}={raw!r} is not an address to listen on; expected e.g. 0.0.0.0 or 127.0.0.1")
    return raw


def _token(name: str, raw: str) -> str:
    """A shared secret typed by people: long enough not to be guessed, and
    printable ASCII, so that it passes unchanged through an HTTP header."""
    if not re.fullmatch(r"[!-~]{16,256}", raw):
        raise ConfigError(
            f"{name} is not a usable token; expected 16..256 printable ASCII characters without spaces "
            "(e.g. from `openssl rand -hex 24`)"
        )
    return raw


def _queue_name(name: str, raw: str) -> str:
    try:
        check_list_name(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}={raw!r}: {exc}") from None
    return raw


def _redis_url(name: str, raw: str) -> str:
    try:
        parts = urlsplit(raw)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise ConfigError(f"{name}={redact_url(raw)!r} is not a valid URL; expected redis://host:port/db") from None
    if parts.scheme not in REDIS_SCHEMES:
        raise ConfigError(
            f"{name}={redact_url(raw)!r} has an unknown scheme; expected one of "
            + ", ".join(f"{s}://" for s in REDIS_SCHEMES)
        )
    if parts.scheme != "unix" and not parts.hostname:
        raise ConfigError(f"{name}={redact_url(raw)!r} has no host; expected redis://host:port/db")
    return raw
