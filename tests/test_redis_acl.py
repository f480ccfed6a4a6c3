"""configs/redis-acl.conf: the pool and its producers as restricted Redis users.

A private redis-server loads the file as shipped (only the passwords filled in)
with `--aclfile`. The real pool runs as `image-result-worker`, the real
producer client as `hosting-producer`, through everything that talks to Redis:
claims, a worker killed with tasks in flight (requeue), a retry, a bad message,
a host's own queue and its live key, the results stream, every operator
command. Redis 7 checks every command a Lua script runs against the caller's
ACL, keys included, so `ACL LOG` names any command or key the file forgot, and
the test fails on the first entry. A command added to the code later is caught
here when the pool uses it, or sooner by the static checks below, which read
the commands out of the code (Lua scripts and client calls).

Then the defence itself: as either user, a key outside its patterns, a command
outside its list, and a script that reaches for either are refused (NOPERM).

Scripts: a producer that could load its own could freeze Redis for everyone
(a loop after a write cannot be killed; Lua's memory is outside maxmemory). So
producers may only EVALSHA what is cached: the pool loads their one script
(push_for_host.lua) with every lease renewal, and a producer that meets
NOSCRIPT sends the task by URL instead of loading it. The pool's own cached
scripts, run by a producer, stop at their first command (none is granted).
"""

from __future__ import annotations

import ast
import fnmatch
import inspect
import json
import os
import re
import secrets
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import redis

import shared.state.redis_queue
from harness import REPO_ROOT
from harness.photos import photo_of_size
from harness.results import read_results
from image_result_client import Producer
from image_result_client.producer import PUSH_FOR_HOST_SHA
from image_result_client.protocol import PUSH_FOR_HOST_SCRIPT, QueueKeys, has_hash_tag
from tests.helpers import assert_exactly_once, command, wait_for_queue_drained, wait_until, worker_pids
from tools.local_redis import LocalRedis

ACL_FILE = REPO_ROOT / "configs" / "redis-acl.conf"
POOL_USER, PRODUCER_USER = "image-result-worker", "hosting-producer"
# The file's patterns are for the default names.
QUEUE, STREAM = "hosting_tasks", "hosting_results"
HOST = "acl-host"
WAIT = 60.0
# The red team's script, with a loop short enough not to hang the suite should it ever run.
FREEZER = "redis.call('RPUSH', KEYS[1], 'x') for i = 1, 1e6 do end"
# A command or key inside a script that the caller's ACL lacks (Redis 7.0; 7.2 and later).
SCRIPT_REFUSED = r"user executing the script can't|[Nn]o permissions"

# What the pool's processes and its operator commands run (pool user), and
# what producers run (producer user); read by the static checks.
POOL_SOURCES = ("supervisor.py", "workers", "shared", "control")
PRODUCER_MODULE = sys.modules[Producer.__module__]
PRODUCER_SOURCES = (str(Path(PRODUCER_MODULE.__file__).parent.relative_to(REPO_ROOT)),)
# redis-py methods whose command is not their upper-cased name.
METHOD_COMMANDS = {
    "delete": ("del",),
    "scan_iter": ("scan",),
    "register_script": ("evalsha", "script|load"),  # EVALSHA, SCRIPT LOAD once on NOSCRIPT
    "script_load": ("script|load",),
    "pipeline": ("multi", "exec"),  # every pipeline of ours is transaction=True
}
# Methods on a client that send nothing; shared/ipc/channel.py names its socket client.
NOT_COMMANDS = frozenset({"close", "execute", "setsockopt", "connect"})


# ---------------------------------------------------------------- the file


def acl_lines() -> dict[str, str]:
    """User name -> that user's line of the shipped file."""
    lines = [line for line in ACL_FILE.read_text().splitlines() if line.strip()]
    return {line.split()[1]: line for line in lines}


def granted(user: str) -> set[str]:
    """Commands `user` may run, at its root or in a selector (on the keys each allows), lower case."""
    rules = acl_lines()[user].replace("(", " ").replace(")", " ").split()
    return {rule[1:].lower() for rule in rules if rule.startswith("+") and not rule.startswith("+@")}


def key_patterns(user: str) -> list[str]:
    """Every key pattern of `user`'s root, whatever its read/write flags."""
    root = re.sub(r"\(.*?\)", " ", acl_lines()[user])
    return [rule.split("~", 1)[1] for rule in root.split() if re.match(r"^(%[RW]+)?~", rule)]


def server_acl_file(version: tuple[int, ...], passwords: dict[str, str]) -> str:
    """The shipped lines with real passwords, plus a default user for the test's own look-ups.

    On Redis 7.2 and later redis-py names itself with CLIENT SETINFO on every
    connection; docs/security.md says to allow it there, and so does this.
    """
    lines = ["user default on nopass ~* &* +@all"]
    for user, line in acl_lines().items():
        line = line.replace(">CHANGE_ME", ">" + passwords[user])
        if version >= (7, 2):
            line = re.sub(r"^(user \S+ [^(]*?)( \(|$)", r"\1 +client|setinfo\2", line)
        lines.append(line)
    return "\n".join(lines) + "\n"


@pytest.mark.fast
def test_the_shipped_file_holds_no_password_and_limits_both_users() -> None:
    lines = acl_lines()
    assert sorted(lines) == sorted([POOL_USER, PRODUCER_USER])
    for user, line in lines.items():
        assert line.count(">CHANGE_ME") == 1 and "#" not in line and "nopass" not in line, user
        rules = line.split()
        # reset first, so ACL SETUSER on an existing user drops what it had.
        assert rules[2:4] == ["reset", "on"] and "-@all" in rules and "resetchannels" in rules, user
        assert not any(rule in ("~*", "allkeys", "+@all", "allcommands", "&*") for rule in rules), user


def pool_key_names(queue: str) -> list[str]:
    """The queue and each key QueueKeys names, called with a processing list
    (or a time, or an instance and a worker) where it takes arguments."""
    keys = QueueKeys(queue)
    processing = keys.processing("instance", "worker")
    names = [keys.queue]
    for attribute, member in vars(QueueKeys).items():
        function = member.fget if isinstance(member, property) else member
        if attribute.startswith("_") or attribute == "prefix":
            continue
        if getattr(function, "__annotations__", {}).get("return") != "str":
            continue
        value = getattr(keys, attribute)
        if callable(value):
            arity = len(inspect.signature(value).parameters)
            value = value(0.0) if attribute == "stats" else value(*([processing] if arity == 1 else ["instance", "worker"]))
        names.append(value)
    assert {keys.dead, processing, keys.host(processing), keys.stats(0)} <= set(names), names
    return names


def patterns_for(queue: str, stream: str) -> list[str]:
    """The pool user's key patterns for other names, as docs/security.md gives the rule."""
    prefix = queue if has_hash_tag(queue) else "{" + queue + "}"
    return [queue, prefix + ":*", stream]


@pytest.mark.fast
def test_every_key_the_pool_names_is_under_the_pool_users_patterns() -> None:
    patterns = key_patterns(POOL_USER)
    assert patterns == patterns_for(QUEUE, STREAM)
    for name in [*pool_key_names(QUEUE), STREAM]:
        assert any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns), f"{name} is outside {patterns}"
    assert not any(fnmatch.fnmatchcase("other_app:x", pattern) for pattern in patterns)


@pytest.mark.fast
@pytest.mark.parametrize("queue", ["jobs", "{jobs}", "tasks{eu}"])
def test_the_documented_rule_for_other_queue_names_covers_their_keys(queue: str) -> None:
    patterns = patterns_for(queue, "results")
    for name in pool_key_names(queue):
        assert any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns), f"{name} is outside {patterns}"
    assert not any(fnmatch.fnmatchcase(name, pattern) for name in pool_key_names(QUEUE) for pattern in patterns)


def lua_commands(script: str) -> set[str]:
    return {name.lower() for name in re.findall(r"redis\.p?call\(\s*['\"]([A-Za-z]+)['\"]", script)}


def lua_files(directory: str) -> dict[str, str]:
    return {str(path.relative_to(REPO_ROOT)): path.read_text() for path in (REPO_ROOT / directory).rglob("*.lua")}


@pytest.mark.fast
def test_every_command_in_the_lua_scripts_is_granted() -> None:
    """The pool's: what shared.state.redis_queue runs, and any .lua file under shared/.
    The producer's: what its module registers, and any .lua file beside it."""
    scripts = {name: value for name, value in vars(shared.state.redis_queue).items() if name.endswith("_SCRIPT")}
    assert len(scripts) >= 7 and all(lua_commands(script) for script in scripts.values())
    for name, script in {**scripts, **lua_files("shared")}.items():
        missing = lua_commands(script) - granted(POOL_USER)
        assert not missing, f"{name} runs {sorted(missing)}, which configs/redis-acl.conf does not grant {POOL_USER}"
    producer_scripts = {name: value for name, value in vars(PRODUCER_MODULE).items() if name.endswith("_SCRIPT")}
    assert producer_scripts and all(lua_commands(script) for script in producer_scripts.values())
    for name, script in {**producer_scripts, **lua_files(PRODUCER_SOURCES[0])}.items():
        missing = lua_commands(script) - granted(PRODUCER_USER)
        assert not missing, f"{name} runs {sorted(missing)}, which configs/redis-acl.conf does not grant {PRODUCER_USER}"


def client_commands(paths: tuple[str, ...]) -> dict[str, set[str]]:
    """Command -> where in `paths` a Redis client sends it: a method called on
    something named client or pipe (`self.client.llen`, `queue.client.lrange`,
    `pipe.hset`), by the redis-py method's name."""
    found: dict[str, set[str]] = {}
    files = [p for path in paths for p in ([REPO_ROOT / path] if path.endswith(".py") else (REPO_ROOT / path).rglob("*.py"))]
    for file in files:
        for node in ast.walk(ast.parse(file.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            receiver = ast.unparse(node.func.value)
            if not re.search(r"(^|\.)(client|pipe)$", receiver) or node.func.attr in NOT_COMMANDS:
                continue
            if node.func.attr == "execute_command" and node.args and isinstance(node.args[0], ast.Constant):
                names: tuple[str, ...] = (str(node.args[0].value).lower(),)
            else:
                names = METHOD_COMMANDS.get(node.func.attr, (node.func.attr,))
            for name in names:
                found.setdefault(name, set()).add(f"{file.relative_to(REPO_ROOT)}:{node.lineno}")
    return found


@pytest.mark.fast
def test_every_command_the_code_sends_is_granted() -> None:
    """A quick net: a command added anywhere fails here before the slow test runs it."""
    pool = client_commands(POOL_SOURCES)
    producer = client_commands(PRODUCER_SOURCES)
    assert {"blmove", "evalsha", "llen"} <= set(pool) and {"rpush", "xread"} <= set(producer)
    missing = {name: sorted(where) for name, where in pool.items() if name not in granted(POOL_USER)}
    assert not missing, f"configs/redis-acl.conf does not grant {POOL_USER}: {missing}"
    missing = {name: sorted(where) for name, where in producer.items() if name not in granted(PRODUCER_USER)}
    assert not missing, f"configs/redis-acl.conf does not grant {PRODUCER_USER}: {missing}"



@pytest.mark.fast
def test_only_the_state_owners_send_commands() -> None:
    """Each key has one owner (docs/development.md, "A new Redis key"): outside
    shared/state/, the pool's code asks the owners and sends nothing itself."""
    pool = client_commands(POOL_SOURCES)
    elsewhere = sorted(where for places in pool.values() for where in places if not where.startswith("shared/state/"))
    assert pool and not elsewhere, f"Redis commands sent outside shared/state/: {elsewhere}"

# Every way to put code into Redis: a producer that had one could run any loop there.
LOADS_CODE = frozenset({"script", "script|load", "eval", "eval_ro", "function", "function|load", "function|restore"})


@pytest.mark.fast
def test_producers_have_no_way_to_load_a_script() -> None:
    """They may EVALSHA (what the pool loaded), never load; and their client
    never tries: not through redis-py's Script either, which loads on NOSCRIPT."""
    line = acl_lines()[PRODUCER_USER]
    assert "+@" not in line and "allcommands" not in line
    assert not granted(PRODUCER_USER) & LOADS_CODE
    assert "evalsha" in granted(PRODUCER_USER) and "evalsha" in client_commands(PRODUCER_SOURCES)
    assert not set(client_commands(PRODUCER_SOURCES)) & LOADS_CODE
    # The script producers run may only look at a key and push, as they could without it.
    assert lua_commands(PUSH_FOR_HOST_SCRIPT) == {"exists", "rpush"}
    assert "script|load" in granted(POOL_USER) and not granted(POOL_USER) & (LOADS_CODE - {"script|load"})


@pytest.mark.fast
def test_nothing_is_granted_that_the_code_does_not_send() -> None:
    """The other direction: a grant the code no longer needs is taken away.
    SELECT is redis-py's, on connecting to a database other than 0."""
    pool = set(client_commands(POOL_SOURCES))
    for script in [*scripts_of(vars(shared.state.redis_queue)), *lua_files("shared").values()]:
        pool |= lua_commands(script)
    producer = set(client_commands(PRODUCER_SOURCES))
    for script in [*scripts_of(vars(PRODUCER_MODULE)), *lua_files(PRODUCER_SOURCES[0]).values()]:
        producer |= lua_commands(script)
    assert granted(POOL_USER) - pool == {"select"}
    assert granted(PRODUCER_USER) - producer == {"select"}


def scripts_of(namespace: dict) -> list[str]:
    return [value for name, value in namespace.items() if name.endswith("_SCRIPT") and isinstance(value, str)]


# ---------------------------------------------------------------- a server with the ACL


class AclRedis(LocalRedis):
    """LocalRedis that loads its users from an ACL file."""

    def __init__(self, *, data_dir: Path, acl_file: Path) -> None:
        super().__init__(data_dir=data_dir)
        self.acl_file = acl_file

    def _command(self) -> list[str]:
        return [*super()._command(), "--aclfile", str(self.acl_file)]


class Users:
    """The private server, its admin client (the default user) and a URL per restricted user."""

    def __init__(self, server: AclRedis, admin: redis.Redis, passwords: dict[str, str]) -> None:
        self.server, self.admin, self.passwords = server, admin, passwords

    def url(self, user: str) -> str:
        return f"redis://{user}:{self.passwords[user]}@127.0.0.1:{self.server.port}/0"

    def client(self, user: str) -> redis.Redis:
        return redis.Redis.from_url(self.url(user))

    def denials(self) -> list[dict]:
        """ACL LOG, newest first, without the client details."""
        return [{k: entry[k] for k in ("reason", "context", "object", "username", "count")}
                for entry in self.admin.acl_log()]


@pytest.fixture
def users(tmp_path: Path) -> Iterator[Users]:
    passwords = {POOL_USER: secrets.token_hex(16), PRODUCER_USER: secrets.token_hex(16)}
    acl_file = tmp_path / "users.acl"
    # A first start without the file tells the version (7.2 adds CLIENT SETINFO).
    acl_file.write_text("user default on nopass ~* &* +@all\n")
    server = AclRedis(data_dir=tmp_path / "redis", acl_file=acl_file)
    server.start()
    admin = redis.Redis(port=server.port)
    try:
        version = tuple(int(part) for part in admin.info("server")["redis_version"].split("."))
        acl_file.write_text(server_acl_file(version, passwords))
        admin.acl_load()
        admin.acl_log_reset()
        yield Users(server, admin, passwords)
    finally:
        admin.close()
        server.stop()


def png(image: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", image)
    assert ok
    return data.tobytes()


def kill_worker_holding(pool, admin: redis.Redis, marker: bytes) -> bool:
    """SIGKILL the worker whose processing list holds a task with `marker`, as its supervisor's lease tells."""
    alive = set(worker_pids(pool))
    for lease in admin.keys(QueueKeys(QUEUE).lease("*")):
        for worker in json.loads(admin.get(lease) or b"{}").get("workers", []):
            if worker["pid"] in alive and any(marker in task for task in admin.lrange(worker["processing_list"], 0, -1)):
                os.kill(worker["pid"], signal.SIGKILL)
                return True
    return False


def operator(pool, users: Users, *args: str) -> str:
    done = command(pool, *args, redis_url=users.url(POOL_USER))
    assert done.returncode == 0 and "Traceback" not in done.stderr, (args, done.stdout, done.stderr)
    return done.stdout


# ---------------------------------------------------------------- the pool under the ACL


def test_pool_and_producers_do_everything_as_restricted_users(
    pool_factory, users: Users, http_server, shm_prefix: str
) -> None:
    admin, keys = users.admin, QueueKeys(QUEUE)
    frame = photo_of_size(384, 384)
    http_server.add("/photo.png", png(frame), content_type="image/png")
    flaky_url = http_server.add("/flaky.png", b"busy", status=503)
    slow_url = http_server.trickle("/slow.png", interval=0.2)
    shared_queue = Producer.from_url(users.url(PRODUCER_USER), queue=QUEUE)
    for_host = Producer.from_url(users.url(PRODUCER_USER), queue=QUEUE, host_id=HOST)
    for_gone_host = Producer.from_url(users.url(PRODUCER_USER), queue=QUEUE, host_id="gone-host")
    try:
        # Queued before the pool starts, so that workers claim many at a time: a
        # few from the host's queue, then from the shared queue, where a download
        # that never ends comes first and holds its worker with tasks claimed.
        sent = [shared_queue.submit_url(slow_url, image_id="slow")]
        sent += [for_host.submit_array(frame, image_id=f"host_{i:03d}", prefix=shm_prefix) for i in range(8)]
        sent += [shared_queue.submit_array(frame, image_id=f"shared_{i:03d}", prefix=shm_prefix) for i in range(60)]
        flaky = shared_queue.submit_url(flaky_url, image_id="flaky")
        sent.append(flaky)
        # A message the pool refuses: no image source. Pushed raw, as any holder of RPUSH could.
        shared_queue.client.rpush(QUEUE, json.dumps({"request_id": "bad-1", "image_id": "bad"}))
        # A task for a host no pool serves, without a URL: it waits in that host's queue for `host drain`.
        stranded = for_gone_host.submit_array(frame, image_id="stranded", prefix=shm_prefix)
        assert stranded.queue == keys.host("gone-host")

        env = {"REDIS_URL": users.url(POOL_USER), "HOST_QUEUE": "true", "HOST_ID": HOST,
               "URL_ALLOW_LOOPBACK": "true", "LEASE_TTL": "3"}
        pool = pool_factory(workers=2, queue=QUEUE, env=env)
        pool.wait_ready()

        # A requeue: kill the worker stuck in the download, with the tasks it claimed.
        wait_until(lambda: kill_worker_holding(pool, admin, b"/slow.png"), 20, "no worker holds the slow task")
        http_server.add("/slow.png", png(frame), content_type="image/png")
        wait_until(lambda: pool.events("tasks_requeued"), 20, "the killed worker's tasks were not requeued")
        # A retry: the 503 is retried through the delayed set; then the server answers.
        wait_until(lambda: pool.events("task_retry_scheduled"), 20, "no retry was scheduled")
        http_server.add("/flaky.png", png(frame), content_type="image/png")

        # The producers' script, both ways: a served host's queue, and the shared queue by URL.
        assert for_host.host_is_served() and not for_gone_host.host_is_served()
        fallback = http_server.url("/photo.png")
        to_host = for_host.submit_array(frame, image_id="to_host", prefix=shm_prefix, fallback_url=fallback)
        by_url = for_gone_host.submit_array(frame, image_id="by_url", prefix=shm_prefix, fallback_url=fallback)
        assert (to_host.queue, by_url.queue, by_url.source) == (keys.host(HOST), QUEUE, "url")
        sent += [to_host, by_url]

        expected = [s.request_id for s in sent] + ["bad-1"]
        try:
            # The results stream, read as the producer user.
            streamed = shared_queue.wait(sent, timeout=WAIT)
            wait_until(lambda: len(read_results(pool.output_dir)) >= len(expected), WAIT, "records missing")
            wait_for_queue_drained(admin, QUEUE)
        except (AssertionError, TimeoutError) as exc:  # a refused command stalls the pool: say which
            raise AssertionError(f"{exc}\nACL LOG: {users.denials()}\n{pool.stderr_tail()}") from None
        assert users.denials() == []
        records = assert_exactly_once(pool.output_dir, expected, admin, QUEUE)
        by_request = {record["request_id"]: record for record in records}
        assert by_request["bad-1"]["status"] == "failed"
        assert by_request[flaky.request_id]["status"] == "completed" and by_request[flaky.request_id]["attempts"] >= 2
        assert all(by_request[s.request_id]["status"] == "completed" for s in sent)
        assert [r["request_id"] for r in streamed] == [s.request_id for s in sent]

        # The operator commands, as the pool user.
        report = json.loads(operator(pool, users, "status", "--json"))
        assert report["queue_depth"] == 0 and report["dead_letters"] == 1 and len(report["supervisors"]) == 1
        assert report["host_queues"] == {"gone-host": 1}
        assert "healthy" in wait_until(lambda: command(pool, "check", redis_url=users.url(POOL_USER)).stdout, 10,
                                       "check never said healthy")
        assert "bad-1" in operator(pool, users, "dead", "list")
        assert "1 shared-memory tasks to the dead letters" in operator(pool, users, "host", "drain", "gone-host")
        # Oldest first: bad-1, which fails again and is dead-lettered again.
        assert "requeued 1 dead letters" in operator(pool, users, "dead", "requeue", "--limit", "1")
        wait_until(lambda: len(read_results(pool.output_dir)) == len(expected) + 1, WAIT, "requeued letter not redone")
        wait_until(lambda: admin.llen(keys.dead) == 2, 10, "bad-1 not dead-lettered again")
        assert "purged 2 dead letters" in operator(pool, users, "dead", "purge", "--yes")
        assert pool.stop() == 0
    finally:
        for producer in (shared_queue, for_host, for_gone_host):
            producer.close()
    assert users.denials() == []
    assert users.passwords[POOL_USER] not in pool.stderr_text()
    assert len(pool.events("child_died")) == 1


# ---------------------------------------------------------------- the producers' script


def test_producers_push_by_url_until_a_pool_loads_their_script(
    pool_factory, users: Users, http_server, shm_prefix: str
) -> None:
    """The script is there only while a pool renews its lease: without it (no
    pool yet, or Redis lost its scripts) a frame with a fallback URL goes to
    the shared queue as a URL task, and the producer never tries to load it."""
    admin, keys = users.admin, QueueKeys(QUEUE)
    frame = photo_of_size(256, 256)
    fallback = http_server.add("/photo.png", png(frame), content_type="image/png")
    producer = Producer.from_url(users.url(PRODUCER_USER), queue=QUEUE, host_id=HOST)

    def submit(image_id: str):
        return producer.submit_array(frame, image_id=image_id, prefix=shm_prefix, fallback_url=fallback)

    def submit_after_script_flush():
        """SCRIPT FLUSH, then submit; whether the pool renewed its lease in
        between (the lease's PTTL went up), which puts the script back."""
        [lease] = admin.keys(keys.lease("*"))
        wait_until(lambda: admin.pttl(lease) > 2500, 10, "the lease was not renewed")  # next renewal ~1 s away
        before = admin.pttl(lease)
        admin.script_flush()
        submission = submit(f"flushed_{len(sent)}")
        return submission, admin.pttl(lease) >= before

    sent = []
    try:
        # No pool has loaded it since Redis started: nobody serves the host.
        assert admin.script_exists(PUSH_FOR_HOST_SHA) == [False]
        before_pool = submit("before_pool")
        assert (before_pool.source, before_pool.segment, before_pool.queue) == ("url", None, QUEUE)
        assert json.loads(admin.lindex(QUEUE, 0)) == {
            "request_id": before_pool.request_id, "image_id": "before_pool", "image_url": fallback}
        sent.append(before_pool)

        env = {"REDIS_URL": users.url(POOL_USER), "HOST_QUEUE": "true", "HOST_ID": HOST,
               "URL_ALLOW_LOOPBACK": "true", "LEASE_TTL": "3"}
        pool = pool_factory(workers=1, queue=QUEUE, env=env)
        pool.wait_ready()
        assert admin.script_exists(PUSH_FOR_HOST_SHA) == [True] and producer.host_is_served()
        served = submit("served")
        assert (served.source, served.queue) == ("shm", keys.host(HOST))
        sent.append(served)

        # Redis loses its scripts while the host's live key stands.
        for _ in range(5):
            flushed, renewed_meanwhile = submit_after_script_flush()
            sent.append(flushed)
            if not renewed_meanwhile:
                break
        assert not renewed_meanwhile, "the lease was renewed between every SCRIPT FLUSH and its submission"
        assert producer.host_is_served()
        assert (flushed.source, flushed.segment, flushed.queue) == ("url", None, QUEUE)

        # The next renewal (within LEASE_TTL/3) loads it again.
        wait_until(lambda: admin.script_exists(PUSH_FOR_HOST_SHA) == [True], 5, "the pool did not load the script again")
        served_again = submit("served_again")
        assert (served_again.source, served_again.queue) == ("shm", keys.host(HOST))
        sent.append(served_again)

        records = producer.wait(sent, timeout=WAIT)
        assert [(r["status"], r["source"]) for r in records] == [
            ("completed", "url" if s.source == "url" else "shm") for s in sent], records
        assert pool.stop() == 0
    finally:
        producer.close()
    # Neither the producer (no SCRIPT LOAD) nor the pool (its own scripts, reloaded) was refused.
    assert users.denials() == []


# The pool's scripts, each with keys the producer's selector allows and arguments
# that would take or remove messages, and the first command each runs.
POOL_SCRIPTS_AS_PRODUCER = {
    "CLAIM_SCRIPT": (["Q", "H:x", "H:h", "H:r"], [10, 65536, 0, 4, "a", "b"], "lpop"),  # LLEN is the producers' too
    "STAMP_INCOMING_SCRIPT": (["Q", "H:x", "H:r", "H:h"], ["a", 65536, "s"], "lpop"),
    "ACK_SCRIPT": (["H:d", "H:a", "H:y", "H:s", "H:d", "H:c", "H:j", "H:t", "Q"], [10, 0, 0, 0, 0, 0, 10, 0, "m1", "ack", "", 0, "t", ""],
                   "lrem"),
    "REQUEUE_SCRIPT": (["Q", "H:h", "H:r", "H:c", "H:w", "H:h", "H:h", "H:h", "H:r"], [0], "rpop"),
    "PROMOTE_SCRIPT": (["L:h", "Q", "H:r"], [1e12, 10], "zrangebyscore"),
    "REQUEUE_DEAD_SCRIPT": (["Q", "H:x"], ["m1", "m1"], "lrem"),
    "DRAIN_ENTRY_SCRIPT": (["H:h", "H:x", "H:c", "H:r"], ["m2", "m2", 0, "1"], "lrem"),
}


def test_a_producer_cannot_run_the_pools_scripts(users: Users) -> None:
    """Every script of the pool is in the cache, where EVALSHA reaches it. Run
    by a producer on keys it may name, each stops at its first command, before
    it changed anything: the script runs with the producer's permissions."""
    admin, keys = users.admin, QueueKeys(QUEUE)
    pool_user, producer = users.client(POOL_USER), users.client(PRODUCER_USER)
    names = {"Q": QUEUE, "H": keys.host("")[:-1], "L": keys.live_host("")[:-1]}
    admin.rpush(QUEUE, "m1")
    admin.rpush(keys.host("h"), "m2")
    admin.set(keys.live_host("h"), "instance")
    before = {key: admin.dump(key) for key in admin.keys("*")}
    try:
        assert set(POOL_SCRIPTS_AS_PRODUCER) == {name for name in vars(shared.state.redis_queue) if name.endswith("_SCRIPT")
                                                  and name != "PUSH_FOR_HOST_SCRIPT"}
        for name, (script_keys, args, first_command) in POOL_SCRIPTS_AS_PRODUCER.items():
            sha = pool_user.script_load(getattr(shared.state.redis_queue, name))  # as the pool's register_script does
            script_keys = [names[key[0]] + key[1:] for key in script_keys]
            with pytest.raises(redis.exceptions.ResponseError, match=SCRIPT_REFUSED):
                producer.evalsha(sha, len(script_keys), *script_keys, *args)
            assert users.denials()[0] | {"count": 1} == {
                "reason": "command", "context": "lua", "object": first_command, "username": PRODUCER_USER, "count": 1,
            }, name
        assert {key: admin.dump(key) for key in admin.keys("*")} == before
    finally:
        pool_user.close()
        producer.close()


# ---------------------------------------------------------------- the defence


def test_outside_their_keys_and_commands_both_users_are_refused(users: Users) -> None:
    pool_user, producer = users.client(POOL_USER), users.client(PRODUCER_USER)
    try:
        refused = [
            lambda: pool_user.set("other_app:x", 1),
            lambda: pool_user.rpush("other_app:x", 1),
            lambda: pool_user.flushall(),
            lambda: pool_user.config_get("*"),
            lambda: pool_user.keys("*"),
            lambda: pool_user.eval("return 1", 0),
            # A script that names the key in KEYS is refused before it runs.
            lambda: pool_user.register_script("return redis.call('SET', KEYS[1], 1)")(keys=["other_app:x"]),
            # The producers' only way in: their list, but not the pool's keys or the results.
            lambda: producer.lrange(QUEUE, 0, -1),
            lambda: producer.lpop(QUEUE),
            lambda: producer.delete(QUEUE),
            lambda: producer.rpush(QueueKeys(QUEUE).dead, "x"),
            lambda: producer.rpush(QueueKeys(QUEUE).processing("i", "w"), "x"),
            lambda: producer.xadd(STREAM, {"record": "{}"}),
            # A live key of its own making would send other producers' frames to a host nobody serves.
            lambda: producer.set(QueueKeys(QUEUE).live_host("h"), "x"),
            lambda: producer.rpush(QueueKeys(QUEUE).live_host("h"), "x"),
            # No code of its own: what it runs, the pool loaded.
            lambda: producer.script_load(FREEZER),
            lambda: producer.eval(FREEZER, 1, QUEUE),
            lambda: producer.execute_command("EVAL_RO", "return 1", 0),
            lambda: producer.function_load("#!lua name=mine\nredis.register_function('f', function() return 1 end)"),
            lambda: producer.fcall("f", 0),
            lambda: producer.script_flush(),  # would send every host's frames by URL
            lambda: producer.execute_command("SCRIPT", "KILL"),
        ]
        for attempt in refused:
            with pytest.raises(redis.exceptions.NoPermissionError):
                attempt()
        # A script that reaches a key or command it was not given, by name from ARGV, is
        # stopped at that call: Redis checks each call against the caller's ACL. The
        # producer's are scripts someone else cached (it cannot load one), run by EVALSHA.
        in_scripts = [
            (pool_user, "return redis.call('SET', ARGV[1], 1)", [], ["other_app:x"]),
            (pool_user, "return redis.call('FLUSHALL')", [], []),
            (producer, "return redis.call('LRANGE', KEYS[1], 0, -1)", [QUEUE], []),
            (producer, "return redis.call('RPUSH', KEYS[1], 'x')", [QueueKeys(QUEUE).live_host("h")], []),
            (producer, "return redis.call('RPUSH', ARGV[1], 'x')", [], ["other_app:x"]),
        ]
        for client, source, script_keys, args in in_scripts:
            with pytest.raises(redis.exceptions.ResponseError, match=SCRIPT_REFUSED):
                if client is producer:
                    producer.evalsha(users.admin.script_load(source), len(script_keys), *script_keys, *args)
                else:
                    client.register_script(source)(keys=script_keys, args=args)
        assert users.admin.keys("*") == []
        assert {entry["username"] for entry in users.denials()} == {POOL_USER, PRODUCER_USER}
        # What they may do still works.
        assert producer.rpush(QUEUE, "{}") == 1 and pool_user.lpop(QUEUE) == b"{}"
    finally:
        pool_user.close()
        producer.close()
