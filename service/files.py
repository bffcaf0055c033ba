"""Uploads: list, read, delete, and store a received upload after its cheap check."""

from __future__ import annotations

import logging
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

from sqlalchemy import delete, exists, select
from sqlalchemy.orm import Session

from kdcore.errors import BadInputError
from service import quota
from service.errors import ServiceError
from service.ids import is_id
from service.models import ACTIVE_STATES, File, FilePurpose, Job, JobFile, UploadReservation
from service.settings import Settings
from service.storage import ObjectWriter, Storage

logger = logging.getLogger("distillery.api")


def list_files(
    *,
    session: Session,
    owner_id: str,
    limit: int,
    cursor: str | None = None,
    purpose: FilePurpose | None = None,
) -> tuple[list[File], str | None]:
    query = select(File).where(File.owner_id == owner_id)
    if cursor is not None:
        query = query.where(File.id < cursor)
    if purpose is not None:
        query = query.where(File.purpose == purpose)
    rows = list(session.scalars(query.order_by(File.id.desc()).limit(limit + 1)))
    return rows[:limit], (rows[limit - 1].id if len(rows) > limit else None)


def get_file(*, session: Session, owner_id: str, file_id: str) -> File | None:
    return session.scalar(select(File).where(File.id == file_id, File.owner_id == owner_id))


def used_bytes(*, session: Session, owner_id: str) -> int:
    return quota.used_bytes(session=session, owner_id=owner_id)


def delete_file(*, session: Session, storage: Storage, file: File) -> None:
    """Delete an upload unless a queued or running job reads it (409)."""
    in_use = session.scalar(
        select(exists().where(JobFile.file_id == file.id, JobFile.job_id == Job.id, Job.state.in_(ACTIVE_STATES)))
    )
    if in_use:
        raise ServiceError(409, "file_in_use", f"file {file.id} is used by a queued or running job; cancel it first")
    session.delete(file)
    session.commit()
    # After the commit: a failed storage delete leaves an orphan object, never a row without bytes.
    storage.delete(file.storage_key)


def clean_filename(raw: str | None) -> str:
    """The upload's own name without any folder part, bounded; 'upload' when there is none."""
    name = PureWindowsPath(PurePosixPath(raw or "").name).name.strip().replace("\x00", "")
    return name[-255:] or "upload"


def sniff_upload(*, path: str, purpose: FilePurpose) -> dict[str, Any]:
    """The cheap, torch-free check; a bad file is a 422 naming the problem."""
    # Imported here: the sniffers pull in numpy and onnx, which only uploads need.
    from kdcore.data_sniff import sniff_dataset
    from kdcore.teacher_sniff import sniff_teacher

    try:
        info = sniff_teacher(path) if purpose == FilePurpose.TEACHER else sniff_dataset(path)
    except BadInputError as exc:
        what = "teacher model" if purpose == FilePurpose.TEACHER else "dataset"
        raise ServiceError(422, "bad_file", f"not a usable {what}: {exc.message}", field="file") from None
    return info.model_dump(mode="json")


def store_upload(
    *,
    session: Session,
    settings: Settings,
    storage: Storage,
    owner_id: str,
    file_id: str,
    writer: ObjectWriter,
    purpose: FilePurpose,
    name: str,
    info: dict[str, Any],
) -> File:
    """Record a received, checked upload and make its bytes visible; the writer is discarded on any error.

    Its reservation (made by `quota.reserve_upload`) becomes the file row in the same transaction.
    """
    quota.lock_owner(session, owner_id)
    session.execute(delete(UploadReservation).where(UploadReservation.id == file_id))
    used = quota.used_bytes(session=session, owner_id=owner_id, settings=settings)
    if used + writer.size > settings.user_quota_bytes:  # only when the reservation lapsed meanwhile
        session.rollback()
        raise quota.quota_exceeded(settings, used)
    row = File(
        id=file_id,
        owner_id=owner_id,
        name=name,
        purpose=purpose,
        size=writer.size,
        sha256=writer.sha256,
        storage_key=writer.key,
        info=info,
    )
    session.add(row)
    session.flush()
    writer.commit()
    try:
        session.commit()
    except Exception:
        storage.delete(writer.key)
        raise
    return row


def quota_exceeded(settings: Settings, used: int | None = None) -> ServiceError:
    return quota.quota_exceeded(settings, used)


def file_too_large(settings: Settings) -> ServiceError:
    return ServiceError(
        413,
        "file_too_large",
        f"the upload is larger than the limit of {settings.max_upload_bytes} bytes",
        field="file",
    )


def resolve_file(*, session: Session, owner_id: str, file_id: str, purpose: FilePurpose, field: str) -> File:
    """A file a spec references: the caller's, of the right purpose; else a 422 naming the spec field."""
    row = get_file(session=session, owner_id=owner_id, file_id=file_id) if is_id("file", file_id) else None
    if row is None:
        raise ServiceError(
            422,
            "file_not_found",
            f"no uploaded file {file_id!r} of yours; upload it with POST /v1/files",
            field=field,
        )
    if row.purpose != purpose:
        raise ServiceError(
            422,
            "wrong_file_purpose",
            f"file {file_id} was uploaded as a {row.purpose}, not a {purpose}",
            field=field,
        )
    return row
