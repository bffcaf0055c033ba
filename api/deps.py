"""Dependencies as named types, so a view's signature reads like a sentence."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from service import files, jobs, users
from service.errors import ServiceError, not_found
from service.models import File, Job
from service.settings import Settings
from service.storage import Storage
from service.users import Principal

_BEARER_DESCRIPTION = "An API key: `Authorization: Bearer dk_...`."


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_storage(request: Request) -> Storage:
    storage: Storage = request.app.state.storage
    return storage


async def get_session(request: Request) -> AsyncIterator[Session]:
    # async on purpose: opening a session does no I/O, and a sync generator dependency would cost
    # every request a thread hop; the queries themselves run in the views' thread pool.
    session: Session = request.app.state.session_factory()
    try:
        yield session
    finally:
        session.close()


async def reject_unknown_query(request: Request) -> None:
    """A misspelt query parameter (`?stat=running`) is a 422 naming it, not silently ignored."""
    if not request.query_params:
        return
    route: APIRoute = request.scope["route"]
    known = getattr(route, "_known_query_params", None)
    if known is None:
        known = _known_query_params(route)
        route._known_query_params = known  # type: ignore[attr-defined]  # computed once per route
    for name in request.query_params:
        if name not in known:
            expected = ", ".join(sorted(known)) or "none"
            raise ServiceError(
                422, "invalid_request", f"unknown query parameter {name!r}; expected: {expected}", field=name
            )


def _known_query_params(route: APIRoute) -> frozenset[str]:
    def walk(dependant: Dependant) -> Iterator[str]:
        yield from (param.alias for param in dependant.query_params)
        for sub in dependant.dependencies:
            yield from walk(sub)

    return frozenset(walk(route.dependant))


SettingsDep = Annotated[Settings, Depends(get_settings)]
StorageDep = Annotated[Storage, Depends(get_storage)]
SessionDep = Annotated[Session, Depends(get_session)]


class ApiKeyBearer(HTTPBearer):
    """`Authorization: Bearer dk_...` resolved to its Principal, as one dependency.

    An HTTPBearer (named as before), so OpenAPI documents the same security scheme on every /v1
    operation; resolving the key in the scheme itself, rather than in a dependency on the scheme,
    spares each request a level of FastAPI's dependency solving (the costliest step of a poll).
    """

    async def __call__(self, request: Request) -> Principal:  # type: ignore[override]
        credentials = await super().__call__(request)
        if credentials is None:
            raise ServiceError(
                401,
                "unauthenticated",
                "send your API key as `Authorization: Bearer dk_...`",
                headers={"WWW-Authenticate": "Bearer"},
            )
        cache: users.AuthCache = request.app.state.auth_cache
        principal = cache.get(credentials.credentials)
        if principal is None:
            # A cache miss (once per key per auth_cache_seconds): its own short session, so that a
            # cache hit, nearly every request, needs no session at all.
            principal = await run_in_threadpool(
                _authenticate, request.app.state.session_factory, credentials.credentials
            )
            cache.put(credentials.credentials, principal)
        request.state.user_id = principal.id  # for the access log
        return principal


current_user = ApiKeyBearer(auto_error=False, scheme_name="HTTPBearer", description=_BEARER_DESCRIPTION)


def _authenticate(session_factory: sessionmaker[Session], plaintext: str) -> Principal:
    with session_factory() as session:
        return users.authenticate(session=session, plaintext=plaintext)


CurrentUser = Annotated[Principal, Depends(current_user)]

JobId = Annotated[str, Path(max_length=64, description="A job id.", examples=["job_01j9z3m8k2q4x7v5t6r8s0w1yb"])]
FileId = Annotated[str, Path(max_length=64, description="A file id.", examples=["file_01j9z3m8k2q4x7v5t6r8s0w1ya"])]


def owned_job(job_id: JobId, user: CurrentUser, session: SessionDep) -> Job:
    """The caller's job; another user's is a 404 exactly like a missing one."""
    job = jobs.get_job(session=session, owner_id=user.id, job_id=job_id)
    release_connection(session)
    if job is None:
        raise not_found("job", job_id)
    return job


def owned_file(file_id: FileId, user: CurrentUser, session: SessionDep) -> File:
    row = files.get_file(session=session, owner_id=user.id, file_id=file_id)
    release_connection(session)
    if row is None:
        raise not_found("file", file_id)
    return row


def release_connection(session: Session) -> None:
    # End the read transaction now: the session would otherwise hold its pooled connection until
    # the request is over (after the response is serialised and sent), and under load the pool
    # runs dry while connections sit idle in finished views. Rows stay loaded (expire_on_commit
    # is off); a view that queries again simply starts a new transaction.
    session.commit()


OwnedJob = Annotated[Job, Depends(owned_job)]
OwnedFile = Annotated[File, Depends(owned_file)]

__all__ = ["CurrentUser", "OwnedFile", "OwnedJob", "SessionDep", "SettingsDep", "StorageDep"]
