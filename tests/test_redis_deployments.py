"""Redis as people deploy it: TLS with a private CA and client certificates, an
ACL user with a password, a database number. A real redis-server with a TLS
port and certificates made here with openssl."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
import redis.sentinel

from harness.photos import photo_of_size
from harness.results import read_results
from tests.helpers import push, push_photos, wait_for_records, wait_until
from tools.local_redis import find_redis_server, free_port

PASSWORD = "s3cret-tls-pw"


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certificates(directory: Path) -> None:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by it."""
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
            "-days", "2", "-subj", "/CN=image-result-worker test CA", cwd=directory)
    (directory / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}", cwd=directory)
        extra = ["-extfile", "server.ext"] if name == "server" else []
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.crt", "-days", "2", *extra, cwd=directory)


@pytest.fixture
def tls_redis(tmp_path: Path):
    """redis-server on a TLS port only, client certificates required, the default
    user off and a user `pool` with a password."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    certs = tmp_path / "certs"
    certs.mkdir()
    make_certificates(certs)
    port = free_port()
    server = subprocess.Popen(
        [find_redis_server(), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", str(certs / "server.crt"), "--tls-key-file", str(certs / "server.key"),
         "--tls-ca-cert-file", str(certs / "ca.crt"), "--tls-auth-clients", "yes",
         "--user", "default", "off", "--user", "pool", "on", f">{PASSWORD}", "~*", "&*", "+@all",
         "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"rediss://pool:{PASSWORD}@127.0.0.1:{port}/2"
    client = redis.Redis.from_url(url, ssl_ca_certs=str(certs / "ca.crt"), ssl_certfile=str(certs / "client.crt"),
                                  ssl_keyfile=str(certs / "client.key"))
    try:
        wait_until(lambda: _pings(client), 10, "TLS redis-server did not start")
        yield url, certs, client
    finally:
        client.close()
        server.kill()
        server.wait(timeout=10)


def _pings(client: redis.Redis) -> bool:
    try:
        return client.ping()
    except redis.exceptions.ConnectionError:
        return False


def test_pool_over_tls_with_acl_user_and_database(pool_factory, tls_redis, queue_name, segments):
    url, certs, client = tls_redis
    env = {
        "REDIS_URL": url,
        "REDIS_TLS_CA_FILE": str(certs / "ca.crt"),
        "REDIS_TLS_CERT_FILE": str(certs / "client.crt"),
        "REDIS_TLS_KEY_FILE": str(certs / "client.key"),
    }
    pool = pool_factory(workers=1, env=env)
    pool.wait_ready()
    request_ids = push_photos(client, queue_name, segments, 3, size=(256, 256))
    records = wait_for_records(pool.output_dir, 3, pool=pool)
    assert pool.stop() == 0
    assert sorted(r["request_id"] for r in records) == request_ids
    assert all(r["status"] == "completed" for r in records)
    assert client.llen(queue_name) == 0 and client.connection_pool.connection_kwargs["db"] == 2
    assert PASSWORD not in pool.stderr_text()


def test_pool_refuses_a_server_it_cannot_verify(pool_factory, tls_redis, queue_name):
    """Without our CA the server's certificate does not verify: the pool waits and
    says why, never talking to an unverified server."""
    url, certs, client = tls_redis
    push(client, queue_name, {"request_id": "r", "image_id": "i", "image_url": "http://127.0.0.1:1/x.png"})
    env = {"REDIS_URL": url, "REDIS_TLS_CERT_FILE": str(certs / "client.crt"),
           "REDIS_TLS_KEY_FILE": str(certs / "client.key")}
    pool = pool_factory(workers=1, env=env)
    event = wait_until(lambda: pool.events("redis_unavailable"), 20, "no redis_unavailable")[0]
    assert "certificate verify failed" in event["error"]
    assert not any("READY=1" in n for n in pool.notifications())
    assert client.llen(queue_name) == 1
    assert PASSWORD not in pool.stderr_text()


@pytest.fixture
def unix_redis(tmp_path: Path):
    """redis-server on a Unix socket only, with a password."""
    socket_path = tmp_path / "redis.sock"
    server = subprocess.Popen(
        [find_redis_server(), "--port", "0", "--unixsocket", str(socket_path), "--unixsocketperm", "700",
         "--requirepass", PASSWORD, "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(unix_socket_path=str(socket_path), password=PASSWORD)
    try:
        wait_until(lambda: _pings(client), 10, "unix-socket redis-server did not start")
        yield f"unix://:{PASSWORD}@{socket_path}?db=3", client
    finally:
        client.close()
        server.kill()
        server.wait(timeout=10)


def test_pool_over_a_unix_socket(pool_factory, unix_redis, queue_name, segments):
    """REDIS_URL=unix://... as docs/operations.md allows: the pool and `status` work over it."""
    url, client = unix_redis
    client.execute_command("SELECT", 3)
    pool = pool_factory(workers=1, env={"REDIS_URL": url})
    pool.wait_ready()
    db3 = redis.Redis(unix_socket_path=url.split("@", 1)[1].split("?")[0], password=PASSWORD, db=3)
    push(db3, queue_name, segments.message("unix", "unix", photo_of_size(64, 64)))
    (record,) = wait_for_records(pool.output_dir, 1, 30, pool=pool)
    assert record["status"] == "completed"
    status = subprocess.run([sys.executable, "supervisor.py", "status"], capture_output=True, text=True, timeout=30,
                            env={**os.environ, "REDIS_URL": url, "HOSTING_TASKS_QUEUE": queue_name})
    assert status.returncode == 0 and "Traceback" not in status.stderr, status.stderr
    assert PASSWORD not in status.stdout + status.stderr
    assert pool.stop() == 0
    db3.close()


def test_unreadable_tls_file_is_a_configuration_error(pool_factory, tmp_path):
    pool = pool_factory(workers=1, env={"REDIS_URL": "rediss://127.0.0.1:1", "REDIS_TLS_CA_FILE": str(tmp_path / "no")})
    assert pool.wait_exit(timeout=20) == 2
    (line,) = pool.stderr_text().strip().splitlines()
    assert "REDIS_TLS_CA_FILE" in line


@pytest.fixture
def sentinel_setup(tmp_path: Path):
    """A master, a replica and one sentinel watching them, on free ports."""
    binary = find_redis_server()
    master_port, replica_port, sentinel_port = free_port(), free_port(), free_port()
    common = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"port {sentinel_port}\nbind 127.0.0.1\ndir {tmp_path}\n"
        f"sentinel monitor mymaster 127.0.0.1 {master_port} 1\n"
        "sentinel down-after-milliseconds mymaster 2000\nsentinel failover-timeout mymaster 10000\n"
    )
    processes = [
        subprocess.Popen([binary, "--port", str(master_port), "--dir", str(tmp_path), *common],
                         stdout=subprocess.DEVNULL),
        subprocess.Popen([binary, "--port", str(replica_port), "--dir", str(tmp_path), *common,
                          "--replicaof", "127.0.0.1", str(master_port)], stdout=subprocess.DEVNULL),
        subprocess.Popen([binary, str(conf), "--sentinel"], stdout=subprocess.DEVNULL),
    ]
    sentinel = redis.sentinel.Sentinel([("127.0.0.1", sentinel_port)], socket_timeout=2)
    try:
        wait_until(lambda: _sentinel_sees_replica(sentinel), 30, "the sentinel never saw the replica")
        yield sentinel, sentinel_port, replica_port, processes[0]
    finally:
        for process in processes:
            process.kill()
            process.wait(timeout=10)


def _sentinel_sees_replica(sentinel: redis.sentinel.Sentinel) -> bool:
    try:
        replicas = sentinel.sentinels[0].sentinel_slaves("mymaster")
    except redis.exceptions.ConnectionError:
        return False
    return any(r.get("master-link-status") == "ok" for r in replicas)


def push_replicated(master: redis.Redis, queue: str, segments, prefix: str, count: int) -> list[str]:
    """Push tasks and wait until the replica has them (WAIT): what Redis itself
    could lose in a failover is then out of the picture."""
    frame = photo_of_size(256, 256)
    request_ids = [f"{prefix}_{index}" for index in range(count)]
    for request_id in request_ids:
        push(master, queue, segments.message(request_id, request_id, frame))
    assert master.execute_command("WAIT", 1, 10_000) >= 1
    return request_ids


def sentinel_env(sentinel_port: int, **extra: str) -> dict[str, str]:
    return {"REDIS_SENTINELS": f"127.0.0.1:{sentinel_port}", "REDIS_SENTINEL_MASTER": "mymaster",
            "REDIS_URL": "redis://sentinel-decides:6379/0", **extra}


def kill_master_and_wait_for_failover(sentinel, master_process, replica_port: int) -> redis.Redis:
    """The master dies for good; the sentinel promotes the one replica, which
    then has no replica of its own."""
    master_process.kill()
    master_process.wait(timeout=10)
    wait_until(lambda: _discovered_port(sentinel) == replica_port, 60, "no failover happened")
    new_master = sentinel.master_for("mymaster", socket_timeout=15)
    wait_until(lambda: new_master.execute_command("ROLE")[0] == b"master", 30, "the replica was not promoted")
    return new_master


def _discovered_port(sentinel) -> int | None:
    try:
        return sentinel.discover_master("mymaster")[1]
    except redis.exceptions.RedisError:
        return None


def test_pool_keeps_serving_after_a_failover_leaves_no_replica(pool_factory, sentinel_setup, queue_name, segments):
    """One replica, the master killed and never back: the pool goes on, with
    claims unreplicated, and says so; every task pushed after the failover
    completes exactly once."""
    sentinel, sentinel_port, replica_port, master_process = sentinel_setup
    master = sentinel.master_for("mymaster", socket_timeout=15)
    pool = pool_factory(workers=2, env=sentinel_env(sentinel_port))
    pool.wait_ready()
    before = push_replicated(master, queue_name, segments, "before", 40)
    wait_for_records(pool.output_dir, len(before), timeout=60, pool=pool)
    new_master = kill_master_and_wait_for_failover(sentinel, master_process, replica_port)
    after = [f"after_{n}" for n in range(30)]
    for request_id in after:
        push(new_master, queue_name, segments.message(request_id, request_id, photo_of_size(128, 128)))
    records = wait_for_records(pool.output_dir, len(before) + len(after), timeout=90, pool=pool)
    wait_until(lambda: pool.events("claims_unreplicated"), 20, "the pool never said claims are unreplicated")
    assert any("no replica connected" in n for n in pool.notifications())
    assert pool.stop() == 0
    recorded = [r["request_id"] for r in records]
    assert sorted(r for r in recorded if r.startswith("after_")) == sorted(after), "a later task was lost or doubled"
    assert all(r["status"] == "completed" for r in records)


def test_claim_min_replicas_pauses_until_a_replica_is_back(pool_factory, sentinel_setup, queue_name, segments, tmp_path):
    """A deployment that would rather pause than claim unreplicated sets
    CLAIM_MIN_REPLICAS; the pool resumes once a replica of the new master is up."""
    sentinel, sentinel_port, replica_port, master_process = sentinel_setup
    pool = pool_factory(workers=1, env=sentinel_env(sentinel_port, CLAIM_MIN_REPLICAS="1"))
    pool.wait_ready()
    new_master = kill_master_and_wait_for_failover(sentinel, master_process, replica_port)
    push(new_master, queue_name, segments.message("paused", "paused", photo_of_size(64, 64)))
    wait_until(lambda: pool.events("claims_paused"), 30, "the pool never said it pauses")
    time.sleep(2)
    assert not read_results(pool.output_dir), "a task was done while no replica could copy its claim"
    replica = subprocess.Popen(
        [find_redis_server(), "--port", str(free_port()), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path), "--replicaof", "127.0.0.1", str(replica_port)], stdout=subprocess.DEVNULL,
    )
    try:
        (record,) = wait_for_records(pool.output_dir, 1, timeout=60, pool=pool)
        assert record["request_id"] == "paused" and record["status"] == "completed"
        assert pool.stop() == 0
    finally:
        replica.kill()
        replica.wait(timeout=10)


def test_pool_follows_a_sentinel_failover_without_losing_acknowledged_work(
    pool_factory, sentinel_setup, queue_name, segments
):
    sentinel, sentinel_port, replica_port, _ = sentinel_setup
    master = sentinel.master_for("mymaster", socket_timeout=15)
    env = sentinel_env(sentinel_port)
    pool = pool_factory(workers=2, env=env)
    pool.wait_ready()
    before = push_replicated(master, queue_name, segments, "before", 150)
    wait_for_records(pool.output_dir, 20, pool=pool)
    sentinel.sentinels[0].execute_command("SENTINEL", "FAILOVER", "mymaster")
    wait_until(lambda: sentinel.discover_master("mymaster")[1] == replica_port, 30, "no failover happened")
    new_master = sentinel.master_for("mymaster", socket_timeout=15)
    # The old master comes back as the new one's replica once the sentinel reconfigures it.
    wait_until(lambda: new_master.info("replication")["connected_slaves"] >= 1, 30, "old master never rejoined")
    after = push_replicated(new_master, queue_name, segments, "after", 20)
    records = wait_for_records(pool.output_dir, len(before) + len(after), timeout=90, pool=pool)
    assert pool.stop() == 0
    recorded = [r["request_id"] for r in records]
    assert sorted(recorded) == sorted(before + after), "a task was lost or doubled across the failover"
    assert all(r["status"] == "completed" for r in records)
    assert pool.events("redis_reconnected"), "nobody noticed the failover"
