"""The browser interface's pages and the few endpoints their scripts call.

Thin views over the same service functions the /v1 routes use (`service.jobs`, `files`,
`artifacts`, `events`, `users.authenticate`); uploads go through the API's own upload path
(`api.uploads.receive_file`), so quotas, limits and file checks are the API's exactly. Every
page on `router` needs a signed-in session, checked at the router; the open pages (sign-in,
sign-out, the home redirect) are on `open_router`. Every POST checks the session's CSRF token.
"""

from __future__ import annotations

import json
import secrets
import shlex
from collections.abc import AsyncIterator
from typing import Annotated, Any
from urllib.parse import urlencode

import yaml
from fastapi import APIRouter, Depends, Form, Header, Query, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse, StreamingResponse
from sqlalchemy.orm import Session, sessionmaker
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.concurrency import run_in_threadpool

from api.deps import SessionDep, SettingsDep, StorageDep, release_connection
from api.event_stream import follow_events
from api.limits import rate_limited
from api.routers import download_headers
from api.routers.jobs import MAX_EVENT_ID
from api.schemas import ArtifactOut, FileOut, JobOut
from api.uploads import receive_file
from api.web import compare, lm_report, report
from api.web.forms import FILE_FIELDS, FormValues, SpecForm, spec_form
from api.web.rendering import render, secure
from api.web.search_chart import search_points
from api.web.session import (
    CsrfForm,
    CsrfHeader,
    OptionalWebUser,
    WebUser,
    clear_session,
    start_session,
    web_user,
)
from api.web.timeline import STAGE_LABELS, Timeline, load_timeline, stage_before, stage_label
from kdcore.spec import JobSpec, parse_spec
from service import artifacts, events, files, jobs, tuning, users
from service.errors import ServiceError
from service.models import ACTIVE_STATES, FINISHED_STATES, FilePurpose, Job, JobState
from service.security import parse_key
from service.users import Principal

# Authenticated by default: every page under `router` needs a signed-in session, checked at the
# router; a view takes `WebUser` only to read who it is (FastAPI resolves it once per request).
# The few open pages (home, sign-in, sign-out) are on `open_router`, mounted apart.
open_router = APIRouter(include_in_schema=False)
router = APIRouter(prefix="/web", include_in_schema=False, dependencies=[Depends(web_user)])

STATES = [state.value for state in JobState]
UPLOAD_CHOICES = 50


class PageNotFoundError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _redirect(url: str) -> RedirectResponse:
    return secure(RedirectResponse(url, status_code=303))


def _safe_next(target: str | None) -> str:
    """Only a path on this site: `//evil.example` and `https://...` are open redirects."""
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/web/jobs"


def _is_htmx(request: Request) -> bool:
    return request.headers.get("hx-request") == "true"


def _owned_job(session: Session, user: Principal, job_id: str) -> Job:
    job = jobs.get_job(session=session, owner_id=user.id, job_id=job_id) if len(job_id) <= 64 else None
    session.commit()  # end the read transaction; the row stays loaded
    if job is None:
        raise PageNotFoundError(f"There is no job {job_id} of yours.")
    return job


# ------------------------------------------------------------------------------------ sign-in


@open_router.get("/")
@open_router.get("/web")
async def home(user: OptionalWebUser) -> RedirectResponse:
    return _redirect("/web/jobs" if user else "/web/login")


@open_router.get("/web/login", response_class=HTMLResponse)
async def login_page(request: Request, user: OptionalWebUser, next: str | None = None) -> Response:
    if user is not None:
        return _redirect(_safe_next(next))
    return render(request, "login.html", {"next": _safe_next(next), "error": None})


@open_router.post("/web/login", response_class=HTMLResponse, dependencies=[CsrfForm])
async def login(
    request: Request,
    session: SessionDep,
    api_key: Annotated[str, Form(max_length=200)] = "",
    next: Annotated[str, Form(max_length=2000)] = "",
) -> Response:
    key = api_key.strip()
    try:
        principal = await run_in_threadpool(users.authenticate, session=session, plaintext=key)
    except ServiceError as exc:
        message = exc.message if exc.status == 403 else "That API key is not valid. Check it and try again."
        # 200, not 401: the browser shows the page either way, but would log an error for a 4xx document.
        return render(request, "login.html", {"next": _safe_next(next), "error": message})
    response = _redirect(_safe_next(next))
    generation = await run_in_threadpool(users.session_generation, session=session, user_id=principal.id)
    start_session(request, response, principal, parse_key(key) or "", generation=generation)
    return response


@open_router.post("/web/logout", dependencies=[CsrfForm])
async def logout(request: Request, session: SessionDep, user: OptionalWebUser) -> RedirectResponse:
    response = _redirect("/web/login")
    if user is not None:
        # Ended on the server, not only in this browser: a copy of the cookie is worthless now.
        await run_in_threadpool(users.end_web_sessions, session=session, user_id=user.id)
    clear_session(request, response)
    return response


# ------------------------------------------------------------------------------------- jobs list


def _list_jobs(session: Session, user: Principal, state: JobState | None, cursor: str | None,
               limit: int) -> tuple[list[JobOut], str | None]:
    rows, next_cursor = jobs.list_jobs(session=session, owner_id=user.id, limit=limit, cursor=cursor,
                                       state_filter=state)
    return [JobOut.of(row) for row in rows], next_cursor


@router.get("/jobs", response_class=HTMLResponse)
def jobs_page(
    request: Request,
    user: WebUser,
    session: SessionDep,
    settings: SettingsDep,
    state: Annotated[str | None, Query(max_length=20)] = None,
    cursor: Annotated[str | None, Query(max_length=64)] = None,
) -> Response:
    chosen = JobState(state) if state in STATES else None
    items, next_cursor = _list_jobs(session, user, chosen, cursor or None, settings.web_jobs_page_size)
    query = urlencode({k: v for k, v in {"state": chosen.value if chosen else None, "cursor": cursor}.items() if v})
    context = {
        "user": user,
        "jobs": items,
        "state": chosen.value if chosen else "",
        "states": STATES,
        "cursor": cursor or "",
        "next_cursor": next_cursor,
        "live": any(job.state in ACTIVE_STATES for job in items),
        "page_url": f"/web/jobs?{query}" if query else "/web/jobs",
    }
    template = "_jobs_table.html" if _is_htmx(request) and request.headers.get("hx-target") == "jobs-table" else (
        "jobs.html"
    )
    return render(request, template, context)


# ------------------------------------------------------------------------------------- compare


def _compare_ids(raw: list[str]) -> list[str]:
    """`?ids=a,b` or `?ids=a&ids=b` (the jobs list's checkboxes): distinct ids, in the order given."""
    return list(dict.fromkeys(part.strip() for value in raw for part in value.split(",") if part.strip()))


def _compare_context(session: Session, user: Principal, ids: list[str]) -> dict[str, Any]:
    outs = [JobOut.of(_owned_job(session, user, job_id)) for job_id in ids]
    specs = [out.spec for out in outs]
    names = {}
    for file_id in compare.file_ids(specs):
        row = files.get_file(session=session, owner_id=user.id, file_id=file_id)
        if row is not None:
            names[file_id] = row.name
    labels = compare.labels_for(outs)
    curves = compare.curve_data([(label, load_timeline(session, out.id).points) for label, out in zip(
        labels, outs, strict=True)])
    session.commit()
    return {
        "user": user,
        "jobs": outs,
        "labels": labels,
        "differences": compare.spec_differences(specs, names),
        "figures": compare.figure_rows([out.metrics for out in outs]),
        "warnings": [compare.warnings_of(out.metrics) for out in outs],
        "curves": curves,
        "stage_labels": STAGE_LABELS,
    }


@router.get("/compare", response_class=HTMLResponse)
def compare_page(
    request: Request,
    user: WebUser,
    session: SessionDep,
    ids: Annotated[list[str], Query(max_length=compare.MAX_JOBS * 2)] = [],  # noqa: B006 (FastAPI copies it)
) -> Response:
    chosen = _compare_ids(ids)
    if not compare.MIN_JOBS <= len(chosen) <= compare.MAX_JOBS:
        message = (f"Choose between {compare.MIN_JOBS} and {compare.MAX_JOBS} jobs to compare: tick them in the "
                   f"jobs list, then press Compare ({len(chosen)} chosen).")
        return render(request, "error.html", {"user": user, "title": "Nothing to compare", "message": message},
                      status_code=400)
    return render(request, "compare.html", _compare_context(session, user, chosen))


# ------------------------------------------------------------------------------------- new job


def _uploads(session: Session, user: Principal, values: FormValues) -> dict[str, list[FileOut]]:
    """Earlier uploads to choose from, per purpose, including any the form refers to.

    The same bytes uploaded again are one choice (the newest, or the one the form refers to):
    a picker listing `blobs.npz` three times only makes the user wonder which is which.
    """
    referred = {value for name in FILE_FIELDS if isinstance(value := values.get(name), str) and value}
    choices: dict[str, list[FileOut]] = {}
    for purpose in FilePurpose:
        rows, _ = files.list_files(session=session, owner_id=user.id, limit=UPLOAD_CHOICES, purpose=purpose)
        choices[purpose.value] = [FileOut.of(row) for row in rows]
    for name, purpose_name in FILE_FIELDS.items():
        file_id = values.get(name)
        if isinstance(file_id, str) and file_id and all(f.id != file_id for f in choices[purpose_name]):
            row = files.get_file(session=session, owner_id=user.id, file_id=file_id)
            if row is not None and row.purpose == purpose_name:
                choices[purpose_name].append(FileOut.of(row))
    session.commit()
    return {purpose: _distinct(listed, referred) for purpose, listed in choices.items()}


def _distinct(listed: list[FileOut], referred: set[str]) -> list[FileOut]:
    """One upload per content (sha256), in the listed order; a referred-to upload wins its content's place."""
    keep = {f.sha256: f.id for f in reversed(listed)}  # reversed: the first listed (the newest) is kept
    keep.update({f.sha256: f.id for f in listed if f.id in referred})
    return [f for f in listed if keep[f.sha256] == f.id]


def _form_page(request: Request, session: Session, user: Principal, values: FormValues, *,
               errors: dict[str, list[str]] | None = None, general: list[str] | None = None,
               source_job: str | None = None, status_code: int = 200) -> Response:
    form = spec_form()
    context = {
        "user": user,
        "form": form,
        "values": values,
        "errors": errors or {},
        "general_errors": general or [],
        "uploads": _uploads(session, user, values),
        "source_job": source_job,
        "idempotency_key": secrets.token_urlsafe(16),
        "architectures": {info.name: info for info in form.architectures},
    }
    return render(request, "new_job.html", context, status_code=status_code)


@router.get("/jobs/new", response_class=HTMLResponse)
def new_job_page(
    request: Request,
    user: WebUser,
    session: SessionDep,
    from_job: Annotated[str | None, Query(alias="from", max_length=64)] = None,
) -> Response:
    form = spec_form()
    values = form.defaults()
    if from_job:
        source = _owned_job(session, user, from_job)
        values = form.values_from_spec(source.spec)
    return _form_page(request, session, user, values, source_job=from_job)


def _submit(session: Session, settings: Any, user: Principal, spec: JobSpec, idempotency_key: str | None) -> Job:
    submission = jobs.submit_job(
        session=session, settings=settings, owner_id=user.id, spec=spec, idempotency_key=idempotency_key
    )
    if submission.created:
        jobs.enqueue(session=session, settings=settings, job=submission.job)
    return submission.job


@router.post("/jobs", response_class=HTMLResponse,
             dependencies=[CsrfForm, Depends(rate_limited("submissions", web_user))])
async def create_job(request: Request, user: WebUser, session: SessionDep, settings: SettingsDep) -> Response:
    form = spec_form()
    submitted = await request.form()
    values = form.values_from_form(submitted)
    raw_key = submitted.get("idempotency_key")
    idempotency_key = raw_key[:255] if isinstance(raw_key, str) and raw_key else None
    raw_source = submitted.get("source_job")
    source_job = raw_source if isinstance(raw_source, str) and raw_source else None
    checked = form.validate(values)
    if checked.spec is None:
        # Re-rendered with 200 (not 422) for the same reason as a failed sign-in: no console error.
        return await run_in_threadpool(_form_page, request, session, user, values, errors=checked.errors,
                                       general=checked.general, source_job=source_job)
    # Fields left at the schema's defaults are left unset, so that the task's own defaults apply (a text job).
    spec = parse_spec(checked.spec.model_dump(mode="json", exclude_defaults=True))
    try:
        job = await run_in_threadpool(_submit, session, settings, user, spec, idempotency_key)
    except ServiceError as exc:
        session.rollback()
        errors: dict[str, list[str]] = {}
        general: list[str] = []
        control = form.control_for(exc.field, values)[0] if exc.field else None
        if control is None:
            general.append(exc.message)
        else:
            errors[control] = [exc.message]
        return await run_in_threadpool(_form_page, request, session, user, values, errors=errors, general=general,
                                       source_job=source_job)
    return _redirect(f"/web/jobs/{job.id}")


def _minimal_spec(form: SpecForm, values: FormValues) -> tuple[dict[str, Any], bool]:
    """The spec for the YAML / curl view: without the fields left at their defaults when it is valid."""
    checked = form.validate(values)
    if checked.spec is None:
        return form.to_spec(values), False
    data = checked.spec.model_dump(mode="json", exclude_defaults=True)
    for owner in ("teacher", "student"):
        part = data.get(owner) or {}
        info = form.arch_info(form.selected_arch(values, owner) or "")
        if info is not None and isinstance(part.get("arch_args"), dict):
            part["arch_args"] = {k: v for k, v in part["arch_args"].items() if info.defaults.get(k) != v}
            if not part["arch_args"]:
                del part["arch_args"]
    return data, True


@router.post("/jobs/preview", response_class=HTMLResponse, dependencies=[CsrfForm])
async def preview_spec(request: Request, user: WebUser) -> Response:
    form = spec_form()
    values = form.values_from_form(await request.form())
    data, valid = _minimal_spec(form, values)
    base = str(request.base_url).rstrip("/")
    body = json.dumps(data, indent=2)
    curl = (
        f"curl -X POST {shlex.quote(base + '/v1/jobs')} \\\n"
        '  -H "Authorization: Bearer $DISTILLERY_API_KEY" \\\n'
        "  -H 'Content-Type: application/json' \\\n"
        f"  --data-binary @- <<'JSON'\n{body}\nJSON"
    )
    context = {"user": user, "yaml_text": yaml.safe_dump(data, sort_keys=False, allow_unicode=True),
               "curl_text": curl, "valid": valid}
    return render(request, "_spec_preview.html", context)


@router.post("/files", response_model=FileOut, status_code=201,
             dependencies=[CsrfHeader, Depends(rate_limited("uploads", web_user))])
async def upload_file(
    request: Request,
    response: Response,
    user: WebUser,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
) -> FileOut:
    """The API's own upload path (`POST /v1/files`), authenticated by the browser session instead of a bearer key."""
    row = await receive_file(request, owner_id=user.id, session=session, settings=settings, storage=storage)
    response.headers["Location"] = f"/v1/files/{row.id}"
    return FileOut.of(row)


# --------------------------------------------------------------------------------------- one job


def _search_context(session: Session, job: Job) -> dict[str, Any]:
    """A tuned job's trials for the page's search card (table and chart); empty for other jobs."""
    if job.tune is None:
        return {"search": None}
    search = tuning.search_summary(job, tuning.trials_of(session, job.id))
    return {"search": search, "chart": search_points(search),
            "search_paths": list(dict.fromkeys(path for t in search["trials"] for path in t["params"]))}


def _job_context(session: Session, user: Principal, job: Job) -> dict[str, Any]:
    out = JobOut.of(job)
    lm = (out.metrics or {}).get("task") == "causal_lm"
    search = _search_context(session, job)
    timeline = load_timeline(session, job.id)
    rows = artifacts.list_artifacts(session=session, job_id=job.id) if job.state == JobState.SUCCEEDED else []
    session.commit()
    return {
        "user": user,
        "job": out,
        "timeline": timeline,
        "curves": timeline.points,
        # A causal LM's loss is in nats per token and its gain in nats: its own table, not the classifiers'.
        "comparison": report.comparison(out.metrics) if out.state == JobState.SUCCEEDED and not lm else None,
        "lm_results": lm_report.lm_results(out.metrics) if out.state == JobState.SUCCEEDED else None,
        "artifacts": [ArtifactOut.of(row) for row in rows],
        "spec_yaml": yaml.safe_dump(out.spec, sort_keys=False, allow_unicode=True),
        "finished": out.state in FINISHED_STATES,
        "stage_labels": STAGE_LABELS,
        **search,
    }


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(request: Request, job_id: str, user: WebUser, session: SessionDep) -> Response:
    job = _owned_job(session, user, job_id)
    return render(request, "job.html", _job_context(session, user, job))


@router.get("/jobs/{job_id}/search", response_class=HTMLResponse)
def job_search(request: Request, job_id: str, user: WebUser, session: SessionDep) -> Response:
    """A tuned job's search card, fetched every few seconds by the page while the job runs."""
    job = _owned_job(session, user, job_id)
    if job.tune is None:
        raise PageNotFoundError(f"Job {job.id} is not a tuned job.")
    context = {"job": JobOut.of(job), "finished": job.state in FINISHED_STATES, **_search_context(session, job)}
    return render(request, "_job_search.html", context)


@router.get("/jobs/{job_id}/results", response_class=HTMLResponse)
def job_results(request: Request, job_id: str, user: WebUser, session: SessionDep) -> Response:
    """What changes when a job ends (results, actions, error), fetched by the page without a reload."""
    job = _owned_job(session, user, job_id)
    return render(request, "_job_results.html", {**_job_context(session, user, job), "oob": True})


@router.post("/jobs/{job_id}/cancel", response_class=HTMLResponse, dependencies=[CsrfForm])
def cancel_job(request: Request, job_id: str, user: WebUser, session: SessionDep, storage: StorageDep) -> Response:
    job = _owned_job(session, user, job_id)
    message = None
    try:
        job = jobs.cancel_job(session=session, storage=storage, job=job)
    except ServiceError as exc:
        session.rollback()
        message = exc.message
    if not _is_htmx(request):
        return _redirect(f"/web/jobs/{job.id}")
    return render(request, "_job_actions.html", {"user": user, "job": JobOut.of(job), "action_error": message,
                                                 "finished": job.state in FINISHED_STATES})


@router.post("/jobs/{job_id}/delete", response_class=HTMLResponse, dependencies=[CsrfForm])
def delete_job(request: Request, job_id: str, user: WebUser, session: SessionDep, storage: StorageDep) -> Response:
    job = _owned_job(session, user, job_id)
    try:
        jobs.delete_job(session=session, storage=storage, job=job)
    except ServiceError as exc:
        session.rollback()
        return render(request, "error.html", {"user": user, "title": "Cannot delete this job",
                                              "message": exc.message}, status_code=exc.status)
    return _redirect("/web/jobs")


@router.get("/jobs/{job_id}/artifacts/{name:path}")
def download_artifact(job_id: str, name: str, user: WebUser, session: SessionDep,
                      storage: StorageDep) -> StreamingResponse:
    job = _owned_job(session, user, job_id)
    artifact = artifacts.get_artifact(session=session, job_id=job.id, name=name)
    release_connection(session)
    if artifact is None:
        raise PageNotFoundError(f"Job {job.id} has no artifact {name}.")
    headers = {**download_headers(artifact.name, artifact.size, artifact.sha256), "Cache-Control": "private"}
    return StreamingResponse(storage.iter_chunks(artifact.storage_key), media_type=artifact.content_type,
                             headers=headers)


@router.get("/jobs/{job_id}/events", dependencies=[Depends(rate_limited("streams", web_user))])
async def job_events(
    request: Request,
    job_id: str,
    user: WebUser,
    session: SessionDep,
    settings: SettingsDep,
    after: Annotated[int | None, Query(ge=0, le=MAX_EVENT_ID, description="Send the events after this id.")] = None,
    last_event_id: Annotated[int | None, Header(ge=0, le=MAX_EVENT_ID)] = None,
) -> EventSourceResponse:
    """The job's events as server-sent events, each with its log line and curve point ready to show."""
    job = await run_in_threadpool(_owned_job, session, user, job_id)
    start = max(after or 0, last_event_id or 0)
    return EventSourceResponse(
        _page_events(request.app.state.session_factory, job.id, start, settings.events_poll_seconds, request),
        ping=settings.events_ping_seconds,
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


async def _page_events(session_factory: sessionmaker[Session], job_id: str, after_id: int, poll_seconds: float,
                       request: Request) -> AsyncIterator[ServerSentEvent]:
    timeline = Timeline()

    first = True

    def read(after: int) -> tuple[bool, list[ServerSentEvent]]:
        nonlocal first
        with session_factory() as session:
            if first and after:
                timeline.stage = stage_before(session, job_id, after)
            first = False
            finished = events.job_finished(session=session, job_id=job_id)
            rows = events.events_after(session=session, job_id=job_id, after_id=after)
        batch = []
        for row in rows:
            data = row.data or {}
            line, point = timeline.feed(row.id, row.kind, data, row.created_at)
            payload = {
                "kind": row.kind,
                "at": row.created_at.isoformat(),
                "data": data,
                "stage_label": stage_label(timeline.stage),
                "line": {"text": line.text, "level": line.level} if line else None,
                "point": point or None,
            }
            batch.append(ServerSentEvent(id=str(row.id), event=row.kind, data=json.dumps(payload)))
        return finished, batch

    async for event in follow_events(read, after_id=after_id, poll_seconds=poll_seconds, request=request):
        yield event


__all__ = ["PageNotFoundError", "open_router", "router"]
