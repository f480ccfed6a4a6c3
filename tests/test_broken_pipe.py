"""`make run 2>&1 | tee log`, then Ctrl-C: the terminal's SIGINT ends tee too,
and the pool's stdout and stderr become a pipe nobody reads. Every log line
of the drain then meets EPIPE; the drain must still finish: records durable,
tasks not done put back, the lease dropped, exit 0.
"""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass

import pytest

from harness import REPO_ROOT
from harness.notify import NotifySocket
from harness.pool import Pool
from harness.results import read_results
from image_result_client.protocol import QueueKeys
from tests.helpers import assert_exactly_once, push_photos, wait_for_records


@dataclass
class PipedPool(Pool):
    """A pool whose stdout and stderr are one pipe, read by the test until it closes its end."""

    reader: int = -1

    def start(self) -> PipedPool:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._notify = NotifySocket(self.workdir)
        self.reader, writer = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [self.python, str(REPO_ROOT / self.script), *self._worker_args()],
                cwd=REPO_ROOT,
                env=self._child_env(),
                stdin=subprocess.DEVNULL,
                stdout=writer,
                stderr=writer,
                start_new_session=True,
            )
        finally:
            os.close(writer)
        return self

    def reader_exits(self) -> None:
        os.close(self.reader)


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_a_pool_whose_log_pipe_broke_still_drains_cleanly(
    tmp_path, redis_server, redis_client, queue_name, segments, signal_name
) -> None:
    request_ids = push_photos(redis_client, queue_name, segments, 12, size=(1080, 1920))
    pool = PipedPool(
        workdir=tmp_path / "pool", output_dir=tmp_path / "out", redis_url=redis_server.url, queue=queue_name
    ).start()
    try:
        pool.wait_ready()
        wait_for_records(pool.output_dir, 1, pool=pool)
        pool.reader_exits()

        assert pool.stop(getattr(signal, signal_name)) == 0

        assert redis_client.keys(QueueKeys(queue_name).lease("*")) == []  # no "(stopping)" lease left
        done = {record["request_id"] for record in read_results(pool.output_dir)}
        assert redis_client.llen(queue_name) == len(request_ids) - len(done), "a task is neither done nor queued"
        assert pool.child_pids() == []
    finally:
        pool.kill_all()
    # What the drain put back, a new pool finishes, and nothing is done twice.
    second = Pool(workdir=tmp_path / "pool2", output_dir=tmp_path / "out", redis_url=redis_server.url, queue=queue_name)
    second.start()
    try:
        wait_for_records(second.output_dir, len(request_ids), pool=second)
        assert second.stop() == 0
    finally:
        second.kill_all()
    assert_exactly_once(tmp_path / "out", request_ids, redis_client, queue_name)
