"""A job's artifacts: the student, its exports, metrics, report, curves."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from api.deps import OwnedJob, SessionDep, StorageDep, release_connection
from api.routers import download_headers, errors
from api.schemas import ArtifactList, ArtifactOut
from service import artifacts
from service.errors import not_found

router = APIRouter(prefix="/jobs/{job_id}/artifacts", tags=["artifacts"])


@router.get("", response_model=ArtifactList, summary="List a job's artifacts", responses=errors(404, 422))
def list_artifacts(job: OwnedJob, session: SessionDep) -> ArtifactList:
    rows = artifacts.list_artifacts(session=session, job_id=job.id)
    return ArtifactList(items=[ArtifactOut.of(row) for row in rows])


@router.get(
    "/{name:path}",
    summary="Download one artifact",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"application/octet-stream": {}},
            "description": "The artifact, streamed; `X-Checksum-Sha256` carries its sha256.",
        },
        **errors(404, 422),
    },
)
def download_artifact(job: OwnedJob, name: str, session: SessionDep, storage: StorageDep) -> StreamingResponse:
    artifact = artifacts.get_artifact(session=session, job_id=job.id, name=name)
    if artifact is None:
        raise not_found("artifact", name)
    response = StreamingResponse(
        storage.iter_chunks(artifact.storage_key),
        media_type=artifact.content_type,
        headers=download_headers(artifact.name, artifact.size, artifact.sha256),
    )
    release_connection(session)  # a slow download must not hold a pooled connection for its whole length
    return response
