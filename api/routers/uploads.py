"""Resumable uploads (service.upload_sessions): a big file in parts, each resumable after a dropped connection."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from api.deps import CurrentUser, SessionDep, SettingsDep, StorageDep, current_user
from api.limits import UPLOAD_PART_TYPE, rate_limited
from api.routers import errors
from api.schemas import FileOut
from api.uploads import BATCH_BYTES
from service import upload_sessions
from service.errors import ServiceError
from service.models import FilePurpose, UploadSession
from service.settings import Settings
from service.storage import ObjectTooLargeError, ObjectWriter

router = APIRouter(prefix="/uploads", tags=["files"])


class UploadCreate(BaseModel):
    name: str = Field(min_length=1, max_length=255, description="The file's name (its suffix tells its format).")
    size: int = Field(ge=1, description="The whole file's bytes.")
    purpose: FilePurpose


class UploadOut(BaseModel):
    id: str = Field(description="The upload's id; also the file's id once it is complete.")
    name: str
    purpose: FilePurpose
    size: int
    offset: int = Field(description="Bytes received: the next part starts here (Upload-Offset).")
    expires_at: datetime = Field(description="Without a part before then, the upload lapses and its quota frees.")
    file: FileOut | None = Field(default=None, description="The checked file, once every byte arrived.")

    @classmethod
    def of(cls, row: UploadSession, settings: Settings, file: FileOut | None = None) -> UploadOut:
        return cls(id=row.id, name=row.name, purpose=FilePurpose(row.purpose), size=row.size, offset=row.received,
                   expires_at=upload_sessions.expires_at(row, settings), file=file)


Offset = Annotated[int, Header(alias="Upload-Offset", ge=0, description="Where this part starts in the file.")]


@router.post("", status_code=201, response_model=UploadOut, summary="Start a resumable upload",
             responses=errors(400, 413, 422, 429), dependencies=[Depends(rate_limited("uploads", current_user))])
def create_upload(body: UploadCreate, response: Response, user: CurrentUser, session: SessionDep,
                  settings: SettingsDep) -> UploadOut:
    """For files too big to send in one request: declare the size, then PATCH the bytes in parts. The whole
    size is held against your quota from now on, so the upload cannot fail at its end for lack of room."""
    row = upload_sessions.create_session(session=session, settings=settings, owner_id=user.id, name=body.name,
                                         purpose=body.purpose, size=body.size)
    response.headers["Location"] = f"/v1/uploads/{row.id}"
    response.headers["Upload-Offset"] = "0"
    return UploadOut.of(row, settings)


@router.get("/{upload_id}", response_model=UploadOut, summary="Where an upload stands",
            responses=errors(404, 410))
def get_upload(upload_id: str, response: Response, user: CurrentUser, session: SessionDep, settings: SettingsDep,
               storage: StorageDep) -> UploadOut:
    """After a dropped connection: `offset` is where the next part must start."""
    row = upload_sessions.get_session(session=session, settings=settings, storage=storage, owner_id=user.id,
                                      upload_id=upload_id)
    response.headers["Upload-Offset"] = str(row.received)
    return UploadOut.of(row, settings)


@router.patch(
    "/{upload_id}", response_model=UploadOut, summary="Send a part of an upload",
    responses={201: {"model": UploadOut, "description": "The last part: the file is checked and recorded."},
               **errors(400, 404, 409, 410, 413, 415, 422)},
    openapi_extra={"requestBody": {"required": True, "content": {UPLOAD_PART_TYPE: {
        "schema": {"type": "string", "format": "binary"}}}}},
)
async def send_part(upload_id: str, request: Request, response: Response, offset: Offset, user: CurrentUser,
                    session: SessionDep, settings: SettingsDep, storage: StorageDep) -> UploadOut:
    """Body: the bytes from `Upload-Offset` on (`Content-Type: application/offset+octet-stream`), any length
    up to the rest of the file. A part cut off by a dropped connection is not counted: ask `GET` for the
    offset and send again from there. The part that reaches the declared size completes the upload: the
    file is checked as any upload is (a bad one is a 422 and nothing is kept) and answered with 201."""
    if not request.headers.get("content-type", "").lower().startswith(UPLOAD_PART_TYPE):
        raise ServiceError(415, "invalid_request", f"send the part as {UPLOAD_PART_TYPE}", field="Content-Type")
    row = await run_in_threadpool(upload_sessions.get_session, session=session, settings=settings, storage=storage,
                                  owner_id=user.id, upload_id=upload_id)
    writer = await run_in_threadpool(upload_sessions.part_writer, storage=storage, row=row, offset=offset)
    await _stream_part(request, writer)
    counted = await run_in_threadpool(upload_sessions.add_part, session=session, storage=storage, row=row,
                                      offset=offset, writer=writer)
    if not counted:
        raise ServiceError(409, "offset_mismatch", "another request sent this part first; GET the upload for "
                           "its offset", field="Upload-Offset")
    response.headers["Upload-Offset"] = str(row.received)
    if row.received < row.size:
        return UploadOut.of(row, settings)
    out = UploadOut.of(row, settings)
    stored = await run_in_threadpool(upload_sessions.assemble, session=session, settings=settings, storage=storage,
                                     row=row)
    response.status_code = 201
    response.headers["Location"] = f"/v1/files/{stored.id}"
    return out.model_copy(update={"file": FileOut.of(stored)})


@router.delete("/{upload_id}", status_code=204, summary="Abandon an upload", responses=errors(404, 410))
def delete_upload(upload_id: str, user: CurrentUser, session: SessionDep, settings: SettingsDep,
                  storage: StorageDep) -> Response:
    """Its parts are deleted and the quota it held is free again."""
    row = upload_sessions.get_session(session=session, settings=settings, storage=storage, owner_id=user.id,
                                      upload_id=upload_id)
    upload_sessions.abort(session=session, storage=storage, row=row)
    return Response(status_code=204)


async def _stream_part(request: Request, writer: ObjectWriter) -> None:
    batch = bytearray()
    try:
        async for chunk in request.stream():
            batch += chunk
            if len(batch) >= BATCH_BYTES:
                await run_in_threadpool(writer.write, bytes(batch))
                batch.clear()
        if batch:
            await run_in_threadpool(writer.write, bytes(batch))
        writer.close_file()
    except ObjectTooLargeError:
        writer.discard()
        raise ServiceError(413, "part_too_large", "the part runs past the upload's declared size",
                           field="Upload-Offset") from None
    except ClientDisconnect:
        writer.discard()
        raise ServiceError(400, "bad_request", "the connection dropped during the part; it was not counted: GET "
                           "the upload for its offset and send again from there") from None
    except BaseException:
        writer.discard()
        raise
