"""Uploads: teachers and datasets, streamed to storage and checked without torch."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import StreamingResponse

from api.deps import CurrentUser, OwnedFile, SessionDep, SettingsDep, StorageDep, current_user
from api.limits import rate_limited
from api.routers import download_headers, errors
from api.schemas import FileList, FileOut
from api.uploads import receive_file
from service import files
from service.models import FilePurpose

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
    responses=errors(400, 413, 422, 429),
    dependencies=[Depends(rate_limited("uploads", current_user))],
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
    row = await receive_file(request, owner_id=user.id, session=session, settings=settings, storage=storage)
    response.headers["Location"] = f"/v1/files/{row.id}"
    return FileOut.of(row)


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
