"""Submit images to image-result-worker from Python (`image_result_client.Producer`)
or the shell (`image-result-client enqueue`, or `python -m image_result_client`).

Installs on its own (`pip install /path/to/image-result-worker`): redis and numpy,
no OpenCV; the `cli` extra adds what the command needs to read image files and a
`.env`. The pool imports the producer-facing contract from here
(image_result_client.protocol), and reports this package's version as its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

__all__ = ["FlowLimits", "Producer", "PushRefused", "Submission", "WaitTimeout", "__version__", "shm_budget_room"]

if TYPE_CHECKING:
    from image_result_client.flow import FlowLimits, PushRefused, shm_budget_room
    from image_result_client.producer import Producer, Submission, WaitTimeout

_PRODUCER_NAMES = frozenset({"Producer", "Submission", "WaitTimeout"})
_FLOW_NAMES = frozenset({"FlowLimits", "PushRefused", "shm_budget_room"})


def __getattr__(name: str) -> object:
    # Loaded on first use: the pool imports image_result_client.protocol in every
    # process, and that should not load numpy and redis-py with it.
    if name in _PRODUCER_NAMES:
        from image_result_client import producer

        return getattr(producer, name)
    if name in _FLOW_NAMES:
        from image_result_client import flow

        return getattr(flow, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
