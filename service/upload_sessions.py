"""Resumable uploads: a file of many gigabytes sent in parts that survive a dropped connection.

The protocol follows tus's core (https://tus.io/protocols/resumable-upload): create a session with
the file's size, name and purpose; send parts with the offset they start at (`Upload-Offset`); after
a dropped connection ask the session for its offset and go on from there. The part that completes
the size assembles the file, which then takes the one upload path's check and record
(`files.sniff_upload`, `files.store_upload`): same limits, same quota, same sniffing.

Each part is its own storage object, so parts work on every store (a folder or S3) and several API
processes can take the parts of one upload. A part is counted only once its bytes are stored and
the session's offset moved from exactly where the part started (a compare-and-set), so a part cut
off halfway, or two racing requests for one offset, leave the offset where it was and nothing
half-written behind.
"""

from __future__ import annotations

import secrets
from datetime import datetime, timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from service import files, quota
from service.errors import ServiceError
from service.ids import new_id
from service.keys import upload_key, upload_part_key, upload_part_prefix
from service.models import File, FilePurpose, UploadReservation, UploadSession, utcnow
from service.settings import Settings
from service.storage import ObjectWriter, Storage


def create_session(*, session: Session, settings: Settings, owner_id: str, name: str, purpose: FilePurpose,
                   size: int) -> UploadSession:
    """Hold the quota for the whole file now, so a long upload cannot find the quota gone at its end."""
    if size > settings.max_upload_bytes:
        raise files.file_too_large(settings)
    upload_id = new_id("file")  # the file's id once it is complete
    held = quota.reserve_upload(session=session, settings=settings, owner_id=owner_id, file_id=upload_id,
                                declared=size)
    if held < size:
        quota.release_upload(session=session, file_id=upload_id)
        raise quota.quota_exceeded(settings)
    row = UploadSession(id=upload_id, owner_id=owner_id, name=files.clean_filename(name), purpose=purpose,
                        size=size, received=0, parts=[])
    session.add(row)
    session.commit()
    return row


def get_session(*, session: Session, settings: Settings, storage: Storage, owner_id: str,
                upload_id: str) -> UploadSession:
    """The caller's live session; 404 for another user's or an unknown id, 410 once it lapsed."""
    row = session.get(UploadSession, upload_id)
    if row is None or row.owner_id != owner_id:
        raise ServiceError(404, "not_found", f"no upload {upload_id}")
    if expires_at(row, settings) <= utcnow():
        abort(session=session, storage=storage, row=row)
        raise ServiceError(410, "upload_expired", f"upload {upload_id} lapsed after "
                           f"{settings.upload_reservation_seconds:.0f} s without a part; start it again")
    return row


def expires_at(row: UploadSession, settings: Settings) -> datetime:
    return _aware(row.updated_at) + timedelta(seconds=settings.upload_reservation_seconds)


def part_writer(*, storage: Storage, row: UploadSession, offset: int) -> ObjectWriter:
    """Where a part's bytes go while they stream; it may not run past the declared size."""
    if offset != row.received:
        raise ServiceError(409, "offset_mismatch", f"the upload is at byte {row.received}, this part starts at "
                           f"{offset}; send the part from Upload-Offset {row.received}", field="Upload-Offset")
    if row.received >= row.size:
        raise ServiceError(409, "upload_complete", "every byte of this upload was received")
    key = upload_part_key(row.owner_id, row.id, offset, secrets.token_hex(4))
    return storage.writer(key, max_bytes=row.size - offset)


def add_part(*, session: Session, storage: Storage, row: UploadSession, offset: int, writer: ObjectWriter) -> bool:
    """Count a fully received part; False when another request moved the offset first (the part is dropped)."""
    if writer.size == 0:
        writer.discard()
        return True
    stored = writer.commit()
    parts = [*row.parts, [offset, stored.key, stored.size]]
    now = utcnow()
    result = session.execute(
        update(UploadSession)
        .where(UploadSession.id == row.id, UploadSession.received == offset)
        .values(received=offset + stored.size, parts=parts, updated_at=now)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        session.rollback()
        storage.delete(stored.key)
        return False
    # Every part renews the quota held for the file: an upload that keeps going never lapses.
    session.execute(update(UploadReservation).where(UploadReservation.id == row.id).values(created_at=now))
    session.commit()
    session.refresh(row)
    return True


def assemble(*, session: Session, settings: Settings, storage: Storage, row: UploadSession) -> File:
    """Join the parts into the file, check it as any upload is checked, record it; the parts are then gone.

    A file the check refuses is a 422 and nothing of it is kept: not the parts, not the session.
    """
    try:
        with storage.writer(upload_key(row.owner_id, row.id), max_bytes=row.size,
                            suffix=_suffix(row.name)) as writer:
            for _, key, _ in sorted(row.parts):
                for chunk in storage.iter_chunks(key):
                    writer.write(chunk)
            writer.close_file()
            purpose = FilePurpose(row.purpose)
            info = files.sniff_upload(path=str(writer.local_path), purpose=purpose)
            stored = files.store_upload(session=session, settings=settings, storage=storage, owner_id=row.owner_id,
                                        file_id=row.id, writer=writer, purpose=purpose, name=row.name, info=info)
    except BaseException:
        abort(session=session, storage=storage, row=row)
        raise
    _forget(session=session, storage=storage, upload_id=row.id, owner_id=row.owner_id)
    return stored


def abort(*, session: Session, storage: Storage, row: UploadSession) -> None:
    """Drop the session, its parts and the quota it held."""
    upload_id, owner_id = row.id, row.owner_id
    session.rollback()
    session.execute(delete(UploadReservation).where(UploadReservation.id == upload_id))
    _forget(session=session, storage=storage, upload_id=upload_id, owner_id=owner_id)


def _forget(*, session: Session, storage: Storage, upload_id: str, owner_id: str) -> None:
    session.execute(delete(UploadSession).where(UploadSession.id == upload_id))
    session.commit()
    storage.delete_prefix(upload_part_prefix(owner_id, upload_id))


def live_sessions(*, session: Session, owner_id: str) -> list[UploadSession]:
    return list(session.scalars(select(UploadSession).where(UploadSession.owner_id == owner_id)
                                .order_by(UploadSession.created_at.desc())))


def _suffix(name: str) -> str:
    # The sniffers read some formats by their suffix (.npz, .zip, .onnx, ...).
    dot = name.rfind(".")
    return name[dot:].lower() if dot > 0 else ""


def _aware(moment: datetime) -> datetime:
    from datetime import UTC

    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
