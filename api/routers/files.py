"""Uploads: teachers and datasets, streamed to storage and checked without torch."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from api.deps import CurrentUser, OwnedFile, SessionDep, SettingsDep, StorageDep
from api.errors import ApiError
from api.ids import new_id
from api.models import FilePurpose
from api.routers import download_headers, errors
from api.schemas import FileList, FileOut
from api.services import files
from api.storage import ObjectTooLargeError
from api.uploads import MULTIPART_OVERHEAD, receive_upload

router = APIRouter(prefix="/files", tags=["files"])

_UPLOAD_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file", "purpose"],
                "properties": {
                    "file": {"type": "string", "format": "binary", "description": "The teacher or dataset file."},
                    "purpose": {"type": "string", "enum": ["teacher", "dataset"]},
                },
            },
            "encoding": {"file": {"contentType": "application/octet-stream"}},
        }
    },
}
Cursor = Annotated[str | None, Query(max_length=64, description="`next_cursor` of the previous page.")]
Limit = Annotated[int, Query(ge=1, le=200, description="Page size.")]


@router.post(
    "",
    status_code=201,
    response_model=FileOut,
    summary="Upload a teacher or a dataset",
    openapi_extra={"requestBody": _UPLOAD_BODY},
    responses=errors(400, 413, 422),
)
async def create_file(
    request: Request,
    response: Response,
    user: CurrentUser,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
) -> FileOut:
    """Multipart `file` + `purpose`. Teachers: safetensors, ONNX, a state_dict (`torch.save`), and, where the
    operator allows, TorchScript / torch.export. Datasets: `.npz` (x_train, y_train[, x_test, y_test]) or
    an ImageFolder `.zip`. The file is checked cheaply on arrival; a bad one is a 422 and nothing is kept."""
    used = await run_in_threadpool(files.used_bytes, session=session, owner_id=user.id)
    room = settings.user_quota_bytes - used
    limit = min(settings.max_upload_bytes, room)
    declared = int(request.headers.get("content-length") or 0)
    if room <= 0 or declared > room + MULTIPART_OVERHEAD:
        raise files.quota_exceeded(settings)
    if declared > settings.max_upload_bytes + MULTIPART_OVERHEAD:
        raise files.file_too_large(settings)

    file_id = new_id("file")
    try:
        upload = await receive_upload(request, storage=storage, key=files.file_key(user.id, file_id), max_bytes=limit)
    except ObjectTooLargeError:
        raise (
            files.file_too_large(settings) if limit == settings.max_upload_bytes else files.quota_exceeded(settings)
        ) from None
    with upload.writer:  # discarded unless store_upload commits it
        purpose = _purpose(upload.purpose)
        info = await run_in_threadpool(files.sniff_upload, path=str(upload.writer.local_path), purpose=purpose)
        row = await run_in_threadpool(
            files.store_upload,
            session=session,
            settings=settings,
            storage=storage,
            owner_id=user.id,
            file_id=file_id,
            writer=upload.writer,
            purpose=purpose,
            name=files.clean_filename(upload.filename),
            info=info,
        )
    response.headers["Location"] = f"/v1/files/{row.id}"
    return FileOut.of(row)


def _purpose(value: str | None) -> FilePurpose:
    if value is None:
        raise ApiError(422, "invalid_request", "the `purpose` field is missing: teacher or dataset", field="purpose")
    try:
        return FilePurpose(value.strip())
    except ValueError:
        raise ApiError(
            422, "invalid_request", f"purpose must be teacher or dataset, not {value!r}", field="purpose"
        ) from None


@router.get("", response_model=FileList, summary="List your uploads, newest first", responses=errors(422))
def list_files(
    user: CurrentUser,
    session: SessionDep,
    cursor: Cursor = None,
    limit: Limit = 50,
    purpose: Annotated[FilePurpose | None, Query(description="Only teachers or only datasets.")] = None,
) -> FileList:
    rows, next_cursor = files.list_files(session=session, owner_id=user.id, limit=limit, cursor=cursor, purpose=purpose)
    return FileList(items=[FileOut.of(row) for row in rows], next_cursor=next_cursor)


@router.get("/{file_id}", response_model=FileOut, summary="One upload", responses=errors(404, 422))
async def get_file(file: OwnedFile) -> FileOut:
    return FileOut.of(file)


@router.get(
    "/{file_id}/content",
    summary="Download an upload",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "The bytes as uploaded."},
        **errors(404, 422),
    },
)
async def download_file(file: OwnedFile, storage: StorageDep) -> StreamingResponse:
    return StreamingResponse(
        storage.iter_chunks(file.storage_key),
        media_type="application/octet-stream",
        headers=download_headers(file.name, file.size, file.sha256),
    )


@router.delete("/{file_id}", status_code=204, summary="Delete an upload", responses=errors(404, 409, 422))
def delete_file(file: OwnedFile, session: SessionDep, storage: StorageDep) -> Response:
    """Refused (409) while a queued or running job reads the file."""
    files.delete_file(session=session, storage=storage, file=file)
    return Response(status_code=204)
