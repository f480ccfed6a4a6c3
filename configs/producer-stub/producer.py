"""A stand-in for an upstream stage, for configs/docker-compose.yml.

    synthetic BGR frame --> /dev/shm/img_shm_<hex> --RPUSH--> HOSTING_TASKS_QUEUE

Pushes STUB_FRAMES frames (STUB_INTERVAL seconds apart), prints one JSON line per
frame, then stays up until SIGTERM: in compose the pool joins this container's IPC
namespace (ipc: "service:producer"), which must outlive the segments it hands over.

Hazards handled here: Python's resource tracker would unlink our segments when we
exit, before the pool has read them (unregistered right after creation); as PID 1 in
a container SIGTERM is ignored unless we install a handler (we do).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import uuid
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory

import numpy as np
import redis

HEIGHT, WIDTH = 480, 640


def synthetic_frame(index: int) -> np.ndarray:
    """A BGR uint8 gradient, different for each index."""
    ys, xs = np.mgrid[0:HEIGHT, 0:WIDTH]
    blue = (xs * 255 // WIDTH).astype(np.uint8)
    green = (ys * 255 // HEIGHT).astype(np.uint8)
    red = np.full((HEIGHT, WIDTH), (index * 40) % 256, dtype=np.uint8)
    return np.dstack([blue, green, red])


def put_in_shared_memory(frame: np.ndarray) -> str:
    shm = SharedMemory(create=True, size=frame.nbytes, name="img_shm_" + uuid.uuid4().hex)
    try:
        shm.buf[: frame.nbytes] = frame.tobytes()
        # The pool unlinks the segment once its record is durable; not us at exit.
        resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
    finally:
        shm.close()
    return shm.name


def connect(url: str, attempts: int = 30) -> redis.Redis:
    client = redis.Redis.from_url(url)
    for attempt in range(1, attempts + 1):
        try:
            client.ping()
            return client
        except redis.ConnectionError:
            if attempt == attempts:
                raise
            time.sleep(1.0)
    return client


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    queue = os.environ.get("HOSTING_TASKS_QUEUE", "hosting_tasks")
    frames = int(os.environ.get("STUB_FRAMES", "5"))
    interval = float(os.environ.get("STUB_INTERVAL", "2"))
    client = connect(os.environ.get("REDIS_URL", "redis://localhost:6379"))
    for index in range(frames):
        frame = synthetic_frame(index)
        name = put_in_shared_memory(frame)
        message = {
            "request_id": f"stub_{uuid.uuid4().hex[:8]}",
            "image_id": f"stub_{index:03d}",
            "shm_info": {"shm_name": name, "shape": list(frame.shape), "dtype": str(frame.dtype), "size": frame.nbytes},
        }
        client.rpush(queue, json.dumps(message))
        print(json.dumps({"event": "task_pushed", "queue": queue, **message}), flush=True)
        if index + 1 < frames:
            time.sleep(interval)
    while True:
        signal.pause()


if __name__ == "__main__":
    sys.exit(main())
