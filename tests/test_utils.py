"""utils.atomic_path: the one way flowdiff writes a file (checkpoints, samples, metrics)."""

import os

import pytest

from flowdiff.utils import atomic_path


def test_atomic_path_replaces_the_file_whole(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_text("new")
        assert target.read_text() == "old"  # untouched until the block ends
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_an_error_mid_write_keeps_the_old_file_and_removes_the_partial_one(tmp_path):
    target = tmp_path / "last.ckpt"
    target.write_bytes(b"good checkpoint")
    with pytest.raises(OSError, match="disk full"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half a")
            raise OSError("disk full")
    assert target.read_bytes() == b"good checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_the_file_gets_the_permissions_open_would_give(tmp_path, umask):
    old = os.umask(umask)
    try:
        with atomic_path(tmp_path / "samples.png") as tmp:
            tmp.write_bytes(b"png")
    finally:
        os.umask(old)
    assert (tmp_path / "samples.png").stat().st_mode & 0o777 == 0o666 & ~umask
