"""Shared-memory segments made the way producers make them, and the tracker
that unlinks whichever the pool left behind.

Every name make_segment creates is remembered process-wide until a tracker's
cleanup() forgets it, so a segment made by a plain make_segment() call is
still found by the tracker that was live when it was made (the tests' autouse
fixture relies on this). The name is remembered before the segment exists: a
failure half-way must not leave one that cleanup cannot find.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

import numpy as np

from image_result_client.producer import DEFAULT_PREFIX, write_segment
from image_result_client.producer import unlink_segment as unlink_by_name
from image_result_client.protocol import SHM_DIR

_made: set[str] = set()  # set.add and set copies are atomic under the GIL: producer threads may make too


def make_segment(array: np.ndarray, *, label: str = "") -> str:
    """A new segment holding array; returns its name, DEFAULT_PREFIX + label + a
    random part (the pipeline's names, which the pool's SHM_NAME_PREFIX accepts)."""
    name = f"{DEFAULT_PREFIX}{label}{uuid.uuid4().hex}"
    _made.add(name)
    write_segment(name, array)
    return name


def shm_message(request_id: str, image_id: str, array: np.ndarray, *, label: str = "") -> dict[str, Any]:
    """A task message for array, with its segment already made."""
    return {
        "request_id": request_id,
        "image_id": image_id,
        "shm_info": {
            "shm_name": make_segment(array, label=label),
            "shape": list(array.shape),
            "dtype": str(array.dtype),
            "size": int(array.nbytes),
        },
    }


def segment_exists(name: str) -> bool:
    return (SHM_DIR / name.lstrip("/")).exists()


def still_present(names: Iterable[str]) -> list[str]:
    """Those of names still in /dev/shm, sorted: the segments the pool did not unlink."""
    return sorted(name for name in names if segment_exists(name))


def unlink_segment(name: str) -> bool:
    """Remove a segment if it is still there; False when it was gone."""
    return unlink_by_name(name.lstrip("/"))


def read_segment(name: str, shape: Iterable[int], dtype: str | np.dtype) -> np.ndarray:
    """Copy a segment's contents without attaching SharedMemory (which, on 3.11,
    would register it with our resource tracker and unlink it at exit)."""
    data = (SHM_DIR / name.lstrip("/")).read_bytes()
    count = int(np.prod(tuple(shape)))
    return np.frombuffer(data, dtype=dtype, count=count).reshape(tuple(shape)).copy()


class SegmentTracker:
    """The segments made since it was created, by it or by make_segment; cleanup()
    unlinks whichever are left. `label` goes into the names it makes itself."""

    def __init__(self, *, label: str = "") -> None:
        self._label = label
        self._before = set(_made)

    @property
    def names(self) -> set[str]:
        return _made - self._before

    def make(self, array: np.ndarray) -> str:
        return make_segment(array, label=self._label)

    def message(self, request_id: str, image_id: str, array: np.ndarray) -> dict[str, Any]:
        return shm_message(request_id, image_id, array, label=self._label)

    def leftovers(self) -> list[str]:
        """Names still in /dev/shm (the pool did not unlink them), sorted."""
        return still_present(self.names)

    def cleanup(self) -> None:
        names = self.names
        for name in names:
            unlink_segment(name)
        _made.difference_update(names)
