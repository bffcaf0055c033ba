"""Files by reference (service.references): name a file under an operator-allowed prefix instead of sending it."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from api.deps import CurrentUser, SessionDep, SettingsDep, StorageDep, current_user
from api.limits import rate_limited
from api.routers import errors
from api.schemas import FileOut
from service import references
from service.models import FilePurpose

router = APIRouter(prefix="/files", tags=["files"])


class ReferenceIn(BaseModel):
    url: str = Field(min_length=1, max_length=2048, examples=["s3://models/llama-3-8b/teacher.zip"],
                     description="Under one of the prefixes the operator allows (DISTILLERY_REFERENCE_PREFIXES).")
    purpose: FilePurpose
    name: str | None = Field(default=None, max_length=255, description="Default: the URL's last segment.")


@router.post("/by-reference", status_code=201, response_model=FileOut, summary="Add a file from the cluster's storage",
             responses=errors(400, 413, 422, 429), dependencies=[Depends(rate_limited("uploads", current_user))])
async def create_file_by_reference(body: ReferenceIn, response: Response, user: CurrentUser, session: SessionDep,
                                   settings: SettingsDep, storage: StorageDep) -> FileOut:
    """The server copies the file in and checks it as any upload (size limit, quota, format); nothing
    crosses the client's connection. Only prefixes the operator named are readable."""
    row = await run_in_threadpool(references.copy_in, session=session, settings=settings, storage=storage,
                                  owner_id=user.id, url=body.url, purpose=body.purpose, name=body.name)
    response.headers["Location"] = f"/v1/files/{row.id}"
    return FileOut.of(row)
