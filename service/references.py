"""Files by reference: a model already in the cluster's storage is named, not sent again.

The operator lists the prefixes users may name (`DISTILLERY_REFERENCE_PREFIXES`, e.g.
`["s3://models/"]`). A named file is copied into the service's own store by the API (no client
bytes on the wire) and then takes the one upload path's check and record: the same size limit,
quota, sniffing and refusal of a bad file. Copying, not pointing, keeps a job's inputs immutable
and deletable with the user's data, whatever later happens at the source.
"""

from __future__ import annotations

import os
import posixpath
from pathlib import PurePosixPath

import fsspec
from sqlalchemy.orm import Session

from service import files, quota
from service.errors import ServiceError
from service.ids import new_id
from service.keys import upload_key
from service.models import File, FilePurpose
from service.settings import Settings
from service.storage import ObjectTooLargeError, Storage

_COPY_CHUNK = 8 << 20


def allowed_url(url: str, settings: Settings) -> str:
    """The URL normalised, if it lies under one of the operator's prefixes; a 422 naming them otherwise."""
    if not settings.reference_prefixes:
        raise ServiceError(422, "references_disabled", "this service takes no files by reference; upload the file "
                           "(POST /v1/files or /v1/uploads)", field="url")
    normal = _normalise(url)
    for prefix in settings.reference_prefixes:
        base = _normalise(prefix).rstrip("/") + "/"
        if normal.startswith(base) and len(normal) > len(base):
            return normal
    raise ServiceError(422, "reference_not_allowed", f"{url!r} is not under a prefix this service allows: "
                       f"{', '.join(settings.reference_prefixes)}", field="url")


def copy_in(*, session: Session, settings: Settings, storage: Storage, owner_id: str, url: str,
            purpose: FilePurpose, name: str | None = None) -> File:
    source = allowed_url(url, settings)
    fs, path = fsspec.core.url_to_fs(source, **settings.reference_options)
    try:
        size = int(fs.size(path))
    except (FileNotFoundError, IsADirectoryError):
        raise ServiceError(422, "no_such_file", f"nothing at {url!r}", field="url") from None
    except OSError as exc:
        raise ServiceError(422, "unreadable_reference", f"cannot read {url!r}: {exc}", field="url") from None
    if size > settings.max_upload_bytes:
        raise files.file_too_large(settings)
    file_id = new_id("file")
    held = quota.reserve_upload(session=session, settings=settings, owner_id=owner_id, file_id=file_id,
                                declared=size)
    clean = files.clean_filename(name or PurePosixPath(path).name)
    try:
        if held < size:
            raise quota.quota_exceeded(settings)
        with storage.writer(upload_key(owner_id, file_id), max_bytes=size,
                            suffix=PurePosixPath(clean).suffix.lower()) as writer:
            with fs.open(path, "rb") as handle:
                while chunk := handle.read(_COPY_CHUNK):
                    writer.write(chunk)
            writer.close_file()
            info = files.sniff_upload(path=str(writer.local_path), purpose=purpose)
            return files.store_upload(session=session, settings=settings, storage=storage, owner_id=owner_id,
                                      file_id=file_id, writer=writer, purpose=purpose, name=clean, info=info)
    except ObjectTooLargeError:
        quota.release_upload(session=session, file_id=file_id)
        raise ServiceError(422, "reference_changed", f"{url!r} grew while it was copied; try again",
                           field="url") from None
    except BaseException:
        quota.release_upload(session=session, file_id=file_id)
        raise


def _normalise(url: str) -> str:
    """One spelling per location: a scheme, no `..` or `.` segments, and local paths with symlinks resolved."""
    protocol, _, rest = url.partition("://")
    if not rest:
        protocol, rest = "file", url
    if protocol == "file":
        return "file://" + os.path.realpath(rest) + ("/" if url.endswith("/") else "")
    if any(part in ("..", ".") for part in rest.split("/")):
        raise ServiceError(422, "reference_not_allowed", f"{url!r} has '.' or '..' segments", field="url")
    return f"{protocol}://{posixpath.normpath(rest)}" + ("/" if url.endswith("/") else "")
