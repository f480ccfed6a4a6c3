"""Output file names from untrusted image_ids, durable partial files and publication."""

from __future__ import annotations

import os
import re
from datetime import datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.storage.files import final_name, publish, safe_stem, write_durably

pytestmark = pytest.mark.fast  # in-process: make test-fast

WHEN = datetime(2024, 3, 5, 14, 7, 9)
HOSTILE_IDS = ["../x", "/abs/path", "a/b", "x\0y", "i" * 1000, "이미지_001", "📷🐈", "..", "", ".", "..." + "é" * 200]


def assert_safe(image_id: str, out_dir: Path) -> None:
    stem = safe_stem(image_id)
    assert stem
    assert "/" not in stem and "\0" not in stem
    assert not stem.startswith(".")
    assert len(stem.encode("utf-8")) <= 160
    assert (out_dir / final_name(image_id, WHEN)).resolve().parent == out_dir.resolve()


@pytest.mark.parametrize("image_id", HOSTILE_IDS, ids=range(len(HOSTILE_IDS)))
def test_safe_stem_stays_one_visible_component(image_id: str, tmp_path: Path) -> None:
    assert_safe(image_id, tmp_path)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_any_image_id_gives_a_safe_name(image_id: str) -> None:
    assert_safe(image_id, Path("/srv/out"))


def test_readable_ids_are_kept() -> None:
    assert safe_stem("이미지_001") == "이미지_001"
    assert safe_stem("photo-1.v2") == "photo-1.v2"


def test_final_name_format() -> None:
    assert final_name("img-1", WHEN) == "img-1_20240305_140709.jpg"
    assert re.fullmatch(r"image_\d{8}_\d{6}\.jpg", final_name("..", WHEN))


def test_final_name_collision_suffix() -> None:
    assert final_name("img-1", WHEN, collision=2) == "img-1_20240305_140709_2.jpg"


# ---------------------------------------------------------------- write and publish


def test_publish_moves_durable_partial_to_final(tmp_path: Path) -> None:
    partial, final = tmp_path / "t.1.jpg", tmp_path / "img_20240305_140709.jpg"
    write_durably(partial, b"jpeg bytes")
    publish(partial, final)
    assert final.read_bytes() == b"jpeg bytes"
    assert not partial.exists()


def test_write_durably_replaces_an_old_partial(tmp_path: Path) -> None:
    partial = tmp_path / "t.1.jpg"
    write_durably(partial, b"old")
    write_durably(partial, b"new")
    assert partial.read_bytes() == b"new"


def test_publish_never_overwrites_an_existing_file(tmp_path: Path) -> None:
    partial, final = tmp_path / "t.1.jpg", tmp_path / "final.jpg"
    final.write_bytes(b"earlier result")
    write_durably(partial, b"new")
    with pytest.raises(FileExistsError):
        publish(partial, final)
    assert final.read_bytes() == b"earlier result"


def test_publish_refuses_a_planted_symlink(tmp_path: Path) -> None:
    """A symlink at the final name must not let us write through it to its target."""
    target = tmp_path / "victim.txt"
    target.write_bytes(b"precious")
    partial, final = tmp_path / "t.1.jpg", tmp_path / "final.jpg"
    final.symlink_to(target)
    write_durably(partial, b"new")
    with pytest.raises(FileExistsError):
        publish(partial, final)
    assert target.read_bytes() == b"precious"
    assert os.readlink(final) == str(target)
