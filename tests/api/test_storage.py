"""Storage over fsspec: atomic writes, limits, listing, deleting; a local folder and memory://."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.storage import ObjectTooLargeError, Storage, StorageError


@pytest.fixture(params=["file", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "file":
        return Storage(f"file://{tmp_path / 'store'}")
    return Storage(f"memory://bucket-{tmp_path.name}/prefix", spool_dir=tmp_path / "spool")


def test_put_stream_hashes_and_lists(store: Storage) -> None:
    stored = store.put_stream("jobs/j1/artifacts/a.bin", [b"ab", b"cd"])
    assert (stored.size, stored.sha256) == (4, hashlib.sha256(b"abcd").hexdigest())
    assert store.list("jobs/j1/") == ["jobs/j1/artifacts/a.bin"]
    assert b"".join(store.iter_chunks("jobs/j1/artifacts/a.bin", chunk_size=3)) == b"abcd"
    assert store.size("jobs/j1/artifacts/a.bin") == 4


def test_put_stream_too_large_leaves_nothing(store: Storage) -> None:
    with pytest.raises(ObjectTooLargeError):
        store.put_stream("users/u/files/f", [b"x" * 10, b"y" * 10], max_bytes=15)
    assert store.list() == [] and not any(store.spool_dir.iterdir())


def test_put_stream_failing_source_leaves_nothing(store: Storage) -> None:
    def chunks() -> Iterator[bytes]:
        yield b"partial"
        raise ConnectionError("client went away")

    with pytest.raises(ConnectionError):
        store.put_stream("users/u/files/f", chunks())
    assert store.list() == [] and not any(store.spool_dir.iterdir())


def test_writer_not_visible_before_commit(store: Storage) -> None:
    with store.writer("jobs/j/artifacts/big") as writer:
        writer.write(b"1234")
        assert store.list() == []
        writer.commit()
    assert store.list() == ["jobs/j/artifacts/big"]


def test_put_file_and_get_file_round_trip(store: Storage, tmp_path: Path) -> None:
    source = tmp_path / "student.onnx"
    source.write_bytes(b"\x00\x01" * 1000)
    store.put_file("jobs/j/artifacts/student.onnx", source)
    store.get_file("jobs/j/artifacts/student.onnx", tmp_path / "copy" / "student.onnx")
    assert (tmp_path / "copy" / "student.onnx").read_bytes() == source.read_bytes()


def test_delete_prefix_removes_only_that_job(store: Storage) -> None:
    for key in ("jobs/j1/artifacts/a", "jobs/j1/checkpoints/e1", "jobs/j2/artifacts/a"):
        store.put_bytes(key, b"x")
    assert store.delete_prefix("jobs/j1/") == 2
    assert store.list() == ["jobs/j2/artifacts/a"]
    store.delete("jobs/j2/artifacts/a")
    store.delete("jobs/j2/artifacts/a")  # deleting twice is fine
    assert store.list() == []


@pytest.mark.parametrize("key", ["", "../etc/passwd", "/abs", "a//b", ".spool/x", "a/../b", "a/ b"])
def test_put_bytes_bad_key_refused(store: Storage, key: str) -> None:
    with pytest.raises(StorageError):
        store.put_bytes(key, b"x")


def test_delete_prefix_root_refused(store: Storage) -> None:
    with pytest.raises(StorageError):
        store.delete_prefix("/")
