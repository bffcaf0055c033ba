"""Jobs: submit, list, read, follow (server-sent events), cancel, delete."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Body, Depends, Header, Query, Request, Response
from sqlalchemy.orm import Session, sessionmaker
from sse_starlette import EventSourceResponse, ServerSentEvent

from api.deps import CurrentUser, JobId, OwnedJob, SessionDep, SettingsDep, StorageDep, current_user
from api.event_stream import follow_events
from api.limits import rate_limited
from api.routers import errors
from api.schemas import JobList, JobOut
from kdcore.spec import JobSpec
from service import events, jobs
from service.db import read_connection
from service.errors import not_found
from service.models import JobState

router = APIRouter(prefix="/jobs", tags=["jobs"])
MAX_EVENT_ID = 2**63 - 1  # event ids are BIGINT: a larger cursor cannot name an event

SPEC_EXAMPLE = {
    "name": "mnist-mlp",
    "teacher": {
        "file": "file_01j9z3m8k2q4x7v5t6r8s0w1ya",
        "format": "auto",
        "arch": "mlp",
        "arch_args": {"hidden": [1200, 1200]},
    },
    "student": {"arch": "mlp", "arch_args": {"hidden": [800, 800]}},
    "data": {"train": "file_01j9z3m8k2q4x7v5t6r8s0w1yc", "normalize": {"mean": [0.1307], "std": [0.3081]}},
    "method": {"name": "kd", "temperature": 4.0, "alpha": 0.9},
    "stages": {"distill_epochs": 10, "baseline": True},
    "export": ["safetensors", "onnx"],
}
IdempotencyKey = Annotated[
    str | None,
    Header(max_length=255, description="Retrying a POST with the same key returns the same job, not a second one."),
]


@router.post(
    "",
    status_code=201,
    response_model=JobOut,
    summary="Submit a distillation job",
    responses={
        200: {
            "model": JobOut,
            "description": "Replayed: the job an earlier request with this Idempotency-Key created.",
        },
        **errors(400, 409, 413, 422, 429),
    },
    dependencies=[Depends(rate_limited("submissions", current_user))],
)
def create_job(
    spec: Annotated[JobSpec, Body(openapi_examples={"mnist": {"summary": "MLP on MNIST", "value": SPEC_EXAMPLE}})],
    response: Response,
    user: CurrentUser,
    session: SessionDep,
    settings: SettingsDep,
    idempotency_key: IdempotencyKey = None,
) -> JobOut:
    """Validate the spec against your uploads and limits, record the job, then queue it.

    `teacher.file`, `data.train` and `data.test` are ids from `POST /v1/files`. A bad spec is a 422
    whose `error.field` names the field; nothing is queued then.
    """
    submission = jobs.submit_job(
        session=session, settings=settings, owner_id=user.id, spec=spec, idempotency_key=idempotency_key
    )
    if submission.created:
        jobs.enqueue(session=session, settings=settings, job=submission.job)
    else:
        response.status_code = 200
        response.headers["Idempotent-Replayed"] = "true"
    response.headers["Location"] = f"/v1/jobs/{submission.job.id}"
    return JobOut.of(submission.job)


@router.get("", response_model=JobList, summary="List your jobs, newest first", responses=errors(422))
def list_jobs(
    user: CurrentUser,
    session: SessionDep,
    state: Annotated[JobState | None, Query(description="Only jobs in this state.")] = None,
    cursor: Annotated[str | None, Query(max_length=64, description="`next_cursor` of the previous page.")] = None,
    limit: Annotated[int, Query(ge=1, le=200, description="Page size.")] = 50,
) -> JobList:
    rows, next_cursor = jobs.list_jobs(
        session=session, owner_id=user.id, limit=limit, cursor=cursor, state_filter=state
    )
    return JobList(items=[JobOut.of(job) for job in rows], next_cursor=next_cursor)


@router.get(
    "/{job_id}", response_model=JobOut, summary="A job's state, progress and metrics", responses=errors(404, 422)
)
def get_job(job_id: JobId, user: CurrentUser, request: Request) -> Response:
    # The route clients poll, so it is kept lean: one Core read on a pooled connection (released
    # before serialising), JobOut built and validated as everywhere, and its JSON handed back as
    # is (response_model still documents it; FastAPI would only validate the JobOut again).
    with read_connection(request.app.state.session_factory) as connection:
        row = jobs.read_job_status(connection=connection, owner_id=user.id, job_id=job_id)
        search = jobs.read_search(connection=connection, job=row) if row is not None else None
    if row is None:
        raise not_found("job", job_id)
    return Response(JobOut.of(row, search=search).model_dump_json(), media_type="application/json")


@router.get(
    "/{job_id}/events",
    summary="Follow a job as server-sent events",
    response_class=EventSourceResponse,
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "`event:` state | progress | log | resume | cancel_requested; "
            "`id:` resumable with Last-Event-ID; `data:` JSON.",
        },
        **errors(404, 422, 429),
    },
    dependencies=[Depends(rate_limited("streams", current_user))],
)
async def stream_job_events(
    job: OwnedJob,
    request: Request,
    settings: SettingsDep,
    last_event_id: Annotated[
        int | None, Header(ge=0, le=MAX_EVENT_ID, description="Resume after this event id.")
    ] = None,
    after: Annotated[
        int | None,
        Query(ge=0, le=MAX_EVENT_ID, description="Same as Last-Event-ID, for clients that cannot set headers."),
    ] = None,
) -> EventSourceResponse:
    """Every event of the job's log after `Last-Event-ID`, then new ones as they happen; the stream ends
    once the job has finished and its last event was sent."""
    session_factory = request.app.state.session_factory
    start = max(last_event_id or 0, after or 0)
    return EventSourceResponse(
        _job_events(session_factory, job.id, start, settings.events_poll_seconds, request),
        ping=settings.events_ping_seconds,
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


async def _job_events(
    session_factory: sessionmaker[Session], job_id: str, after_id: int, poll_seconds: float, request: Request
) -> AsyncIterator[ServerSentEvent]:
    def read(after: int) -> tuple[bool, list[ServerSentEvent]]:
        with session_factory() as session:
            # Finished is read before the events: every event of a finished job is committed by then.
            finished = events.job_finished(session=session, job_id=job_id)
            rows = events.events_after(session=session, job_id=job_id, after_id=after)
        return finished, [
            ServerSentEvent(
                id=str(row.id),
                event=row.kind,
                data=json.dumps(
                    {"job_id": job_id, "kind": row.kind, "created_at": row.created_at.isoformat(), **row.data}
                ),
            )
            for row in rows
        ]

    async for event in follow_events(read, after_id=after_id, poll_seconds=poll_seconds, request=request):
        yield event


@router.post(
    "/{job_id}/cancel", response_model=JobOut, summary="Cancel a queued or running job", responses=errors(404, 409, 422)
)
def cancel_job(job: OwnedJob, session: SessionDep, storage: StorageDep) -> JobOut:
    """A queued job is cancelled at once; a running one stops at its next step (`cancel_requested`)."""
    return JobOut.of(jobs.cancel_job(session=session, storage=storage, job=job))


@router.delete(
    "/{job_id}", status_code=204, summary="Delete a finished job with its artifacts", responses=errors(404, 409, 422)
)
def delete_job(job: OwnedJob, session: SessionDep, storage: StorageDep) -> Response:
    jobs.delete_job(session=session, storage=storage, job=job)
    return Response(status_code=204)
