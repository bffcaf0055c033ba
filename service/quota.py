"""Each user's storage quota, exact under concurrency: uploads, artifacts and reservations, under one lock.

A check-then-insert lets parallel uploads all pass the check. Here every change to what a user
stores runs after `lock_owner` in the same transaction: a write to the user's row, which is a row
lock on PostgreSQL and the database's write lock on SQLite (a transaction's first write waits for
any other writer), so two checks of one user never overlap. An upload reserves its bytes before
it streams and trades the reservation for its file row when it is stored (or drops it on failure).
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from service.errors import ServiceError
from service.models import Artifact, File, Job, UploadReservation, User, utcnow
from service.settings import Settings


def lock_owner(session: Session, owner_id: str) -> None:
    """Serialise this transaction with every other quota or job-limit check of `owner_id`.

    Must be the transaction's first statement on SQLite (a read first would pin an older snapshot),
    so it commits whatever the session had read before.
    """
    session.commit()
    session.execute(update(User).where(User.id == owner_id).values(id=User.id))


def used_bytes(*, session: Session, owner_id: str, settings: Settings | None = None) -> int:
    """Uploads, job artifacts and live upload reservations of `owner_id`."""
    uploads = session.scalar(select(func.coalesce(func.sum(File.size), 0)).where(File.owner_id == owner_id))
    artifacts = session.scalar(
        select(func.coalesce(func.sum(Artifact.size), 0)).join(Job, Job.id == Artifact.job_id)
        .where(Job.owner_id == owner_id)
    )
    reservations = select(func.coalesce(func.sum(UploadReservation.size), 0)).where(
        UploadReservation.owner_id == owner_id
    )
    if settings is not None:
        lapsed = utcnow() - timedelta(seconds=settings.upload_reservation_seconds)
        reservations = reservations.where(UploadReservation.created_at > lapsed)
    return int(uploads or 0) + int(artifacts or 0) + int(session.scalar(reservations) or 0)


def reserve_upload(*, session: Session, settings: Settings, owner_id: str, file_id: str, declared: int) -> int:
    """Hold quota for an upload about to stream; returns the bytes it may write. 413 when there is no room."""
    lock_owner(session, owner_id)
    used = used_bytes(session=session, owner_id=owner_id, settings=settings)
    room = settings.user_quota_bytes - used
    if room <= 0 or declared > room + settings_overhead():
        session.rollback()
        raise quota_exceeded(settings, used)
    size = min(settings.max_upload_bytes, room, declared or settings.max_upload_bytes)
    session.add(UploadReservation(id=file_id, owner_id=owner_id, size=size))
    session.commit()
    return size


def release_upload(*, session: Session, file_id: str) -> None:
    session.rollback()
    session.execute(delete(UploadReservation).where(UploadReservation.id == file_id))
    session.commit()


def settings_overhead() -> int:
    # Multipart framing around the file (boundaries, part headers, the purpose field): the declared
    # Content-Length counts it, the stored file does not.
    return 64 * 1024


def quota_exceeded(settings: Settings, used: int | None = None) -> ServiceError:
    usage = f"you use {used:,} of your {settings.user_quota_bytes:,} bytes" if used is not None else (
        f"your quota is {settings.user_quota_bytes:,} bytes"
    )
    return ServiceError(
        413,
        "quota_exceeded",
        f"this would exceed your storage quota: {usage} (uploads and job artifacts); free space by deleting "
        "files (DELETE /v1/files/{id}) or finished jobs with their artifacts (DELETE /v1/jobs/{id})",
        field="file",
    )


def check_artifacts_fit(*, session: Session, settings: Settings, owner_id: str, adding: int) -> None:
    """A job's artifacts count against its owner's quota; raises QuotaExceededError when they do not fit."""
    lock_owner(session, owner_id)
    used = used_bytes(session=session, owner_id=owner_id, settings=settings)
    if used + adding > settings.user_quota_bytes:
        raise QuotaExceededError(
            f"the job's artifacts ({adding:,} bytes) would exceed your storage quota: you use {used:,} of "
            f"{settings.user_quota_bytes:,} bytes; delete files or finished jobs and submit the job again"
        )


class QuotaExceededError(Exception):
    code = "quota_exceeded"
