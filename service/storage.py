"""Artifact and upload storage: one small interface over fsspec.

`file://...` (the default, a folder in the data dir) or any fsspec URL, e.g. `s3://bucket/prefix`
with `storage_options` such as `{"endpoint_url": ..., "key": ..., "secret": ...}` for MinIO.

Writes are atomic: bytes go to a spool file first and appear under their key only when complete
(a rename on a local folder, one upload call on object stores), so a half-written object is
never listed and a failed write leaves nothing behind. Keys are relative, `/`-separated paths;
`service.keys` says which object lives under which.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

if TYPE_CHECKING:
    from service.settings import Settings

CHUNK_SIZE = 1024 * 1024
_SPOOL_DIR = ".spool"
_KEY_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class StorageError(Exception):
    """The store failed or a key is not acceptable."""


class ObjectTooLargeError(StorageError):
    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(f"object larger than {limit} bytes")


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    sha256: str


def check_key(key: str) -> str:
    """Refuse keys that could escape the store's root or collide with the spool folder."""
    parts = key.split("/")
    if not key or any(not _KEY_PART.match(part) for part in parts):
        raise StorageError(f"invalid storage key {key!r}")
    return key


class ObjectWriter:
    """Receives an object's bytes, hashing and counting them; `commit` makes it visible, `discard` drops it.

    `local_path` is the spool file, so the bytes can be inspected (sniffed) before they are
    committed. Used as a context manager it discards on error and on exit without commit.
    """

    def __init__(self, storage: Storage, key: str, *, max_bytes: int | None, suffix: str = "") -> None:
        self._storage = storage
        self.key = check_key(key)
        self.max_bytes = max_bytes
        self.size = 0
        self._hash = hashlib.sha256()
        descriptor, name = tempfile.mkstemp(prefix="upload-", suffix=_safe_suffix(suffix), dir=storage.spool_dir)
        self.local_path = Path(name)
        self._file: IO[bytes] | None = os.fdopen(descriptor, "wb")
        self._done = False

    def write(self, chunk: bytes) -> None:
        if self._file is None:
            raise StorageError("writer already closed")
        self.size += len(chunk)
        if self.max_bytes is not None and self.size > self.max_bytes:
            raise ObjectTooLargeError(self.max_bytes)
        self._hash.update(chunk)
        self._file.write(chunk)

    def close_file(self) -> None:
        """Flush the spool file (call before reading `local_path`)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def commit(self) -> StoredObject:
        self.close_file()
        self._storage._publish(self.local_path, self.key)
        self._done = True
        return StoredObject(key=self.key, size=self.size, sha256=self.sha256)

    def discard(self) -> None:
        self.close_file()
        self.local_path.unlink(missing_ok=True)
        self._done = True

    def __enter__(self) -> ObjectWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._done:
            self.discard()


class Storage:
    def __init__(self, url: str, options: dict[str, Any] | None = None, *, spool_dir: Path | None = None) -> None:
        self.url = url
        self.fs, root = fsspec.core.url_to_fs(url, **(options or {}))
        self.root = root.rstrip("/")
        self.is_local = isinstance(self.fs, LocalFileSystem)
        if self.is_local:
            Path(self.root).mkdir(parents=True, exist_ok=True)
            # Spool inside the root so committing is a rename on the same filesystem.
            spool = Path(self.root) / _SPOOL_DIR
        else:
            spool = spool_dir or Path(tempfile.gettempdir()) / "distillery-spool"
        spool.mkdir(parents=True, exist_ok=True)
        self.spool_dir = spool

    @classmethod
    def from_settings(cls, settings: Settings) -> Storage:
        """The store a service's settings name (the API, every worker and the reaper share it)."""
        return cls(settings.storage_url, settings.storage_options, spool_dir=settings.data_dir / "spool")

    # Writing ---------------------------------------------------------------------------

    def writer(self, key: str, *, max_bytes: int | None = None, suffix: str = "") -> ObjectWriter:
        return ObjectWriter(self, key, max_bytes=max_bytes, suffix=suffix)

    def put_stream(self, key: str, chunks: Iterable[bytes], *, max_bytes: int | None = None) -> StoredObject:
        with self.writer(key, max_bytes=max_bytes) as writer:
            for chunk in chunks:
                writer.write(chunk)
            return writer.commit()

    def put_file(self, key: str, path: str | Path, *, max_bytes: int | None = None) -> StoredObject:
        """Store a local file (the worker's artifacts and checkpoints)."""
        with Path(path).open("rb") as source:
            return self.put_stream(key, iter(lambda: source.read(CHUNK_SIZE), b""), max_bytes=max_bytes)

    def put_bytes(self, key: str, data: bytes) -> StoredObject:
        return self.put_stream(key, [data])

    def _publish(self, local_path: Path, key: str) -> None:
        target = self._path(key)
        try:
            if self.is_local:
                Path(target).parent.mkdir(parents=True, exist_ok=True)
                os.replace(local_path, target)
            else:
                # One upload call: object stores make the object visible only once it is complete.
                self.fs.put_file(str(local_path), target)
        except OSError as exc:
            raise StorageError(f"cannot store {key}: {exc}") from exc
        finally:
            local_path.unlink(missing_ok=True)

    # Reading ---------------------------------------------------------------------------

    def open(self, key: str) -> IO[bytes]:
        handle: IO[bytes] = self.fs.open(self._path(key), "rb")
        return handle

    def iter_chunks(self, key: str, *, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        """Stream an object without loading it whole (a download's body).

        The object is opened now, not at the first chunk, so a missing one fails before a
        response has started.
        """
        return _read_chunks(self.open(key), chunk_size)

    def get_file(self, key: str, path: str | Path) -> None:
        """Copy an object to a local file (the worker fetching a teacher or a dataset)."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        partial = Path(f"{path}.part-{uuid.uuid4().hex}")
        try:
            with self.open(key) as source, partial.open("wb") as target:
                shutil.copyfileobj(source, target, CHUNK_SIZE)
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        return bool(self.fs.exists(self._path(key)))

    def size(self, key: str) -> int:
        return int(self.fs.size(self._path(key)))

    def list(self, prefix: str = "") -> list[str]:
        """Keys under `prefix` (a folder-like prefix such as `jobs/<jid>/`), sorted."""
        base = self._path(prefix.rstrip("/")) if prefix else self.root
        if not self.fs.exists(base):
            return []
        paths = self.fs.find(base)
        keys = [self._key(path) for path in paths]
        return sorted(key for key in keys if not key.startswith(_SPOOL_DIR + "/"))

    # Removing --------------------------------------------------------------------------

    def delete(self, key: str) -> None:
        """Remove one object; a missing one is not an error (deletes are retried)."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._path(key))

    def delete_prefix(self, prefix: str) -> int:
        """Remove every object under `prefix` (e.g. `jobs/<jid>/`); returns how many."""
        if not prefix.strip("/"):
            raise StorageError("refusing to delete the whole store")
        keys = self.list(prefix)
        for key in keys:
            self.delete(key)
        base = self._path(prefix.rstrip("/"))
        if self.is_local and Path(base).is_dir():
            shutil.rmtree(base, ignore_errors=True)
        return len(keys)

    def check(self) -> None:
        """Readiness: the root can be listed."""
        self.fs.ls(self.root, detail=False)

    # Paths -----------------------------------------------------------------------------

    def _path(self, key: str) -> str:
        return f"{self.root}/{check_key(key)}"

    def _key(self, path: str) -> str:
        path = str(path)
        root = self.root.lstrip("/") if not path.startswith("/") else self.root
        return path[len(root) :].lstrip("/")


def _safe_suffix(suffix: str) -> str:
    # The upload's extension is kept on the spool file (some tools look at it), nothing else.
    return suffix if re.fullmatch(r"\.[A-Za-z0-9]{1,16}", suffix) else ""


def _read_chunks(handle: IO[bytes], chunk_size: int) -> Iterator[bytes]:
    with handle:
        while chunk := handle.read(chunk_size):
            yield chunk
