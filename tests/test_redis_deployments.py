"""Redis as people deploy it: TLS with a private CA and client certificates, an
ACL user with a password, a database number. A real redis-server with a TLS
port and certificates made here with openssl."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import redis

from tests.helpers import push, wait_for_records, wait_until
from tests.test_reliability import push_photos
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


def test_unreadable_tls_file_is_a_configuration_error(pool_factory, tmp_path):
    pool = pool_factory(workers=1, env={"REDIS_URL": "rediss://127.0.0.1:1", "REDIS_TLS_CA_FILE": str(tmp_path / "no")})
    assert pool.wait_exit(timeout=20) == 2
    (line,) = pool.stderr_text().strip().splitlines()
    assert "REDIS_TLS_CA_FILE" in line
