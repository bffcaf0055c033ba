"""The FastAPI application: `create_app(settings)` wires settings, database, storage and routers.

Run it with `distillery api` (migrates first) or `uvicorn --factory api.main:create_app`.
Open routes (health, metrics, docs) are mounted apart; everything under /v1 carries the auth
dependency at the router, so a new route is authenticated unless someone moves it out on purpose.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from alembic.script import ScriptDirectory
from fastapi import APIRouter, Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.routing import APIRoute
from sqlalchemy.orm import Session, sessionmaker

from api.deps import current_user, reject_unknown_query
from api.docs_pages import mount_docs
from api.errors import install_error_handlers
from api.limits import BodyLimitMiddleware, RateLimiter
from api.observability import Metrics, ObservabilityMiddleware
from api.routers import architectures, artifacts, errors, files, health, jobs, references, uploads
from api.web import mount_web
from service.db import create_db_engine, create_session_factory
from service.migrate import alembic_config
from service.settings import Settings, get_settings
from service.storage import Storage
from service.users import AuthCache

API_VERSION = "1.0.0"
DESCRIPTION = """\
Knowledge distillation as a service: upload a trained **teacher** and a dataset, name a smaller
**student** architecture, and get back the distilled student with a report.

1. `POST /v1/files` the teacher (`purpose=teacher`) and the data (`purpose=dataset`).
2. `POST /v1/jobs` a job spec naming those file ids.
3. Follow `GET /v1/jobs/{id}` or its `/events` stream; download `/artifacts` when it succeeded.

Every /v1 call needs `Authorization: Bearer <api key>` (`distillery admin create-user NAME` makes one).
Errors are `{"error": {"code", "message", "field"?}}`.
"""


def create_app(
    settings: Settings | None = None,
    *,
    session_factory: sessionmaker[Session] | None = None,
    storage: Storage | None = None,
) -> FastAPI:
    """Build the app; tests pass their own session factory (bound to a rolled-back connection)."""
    settings = settings or get_settings()
    engine = None
    if session_factory is None:
        engine = create_db_engine(settings.database_url)
        session_factory = create_session_factory(engine)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        if engine is not None:
            engine.dispose()

    app = FastAPI(
        title="Distillery",
        version=API_VERSION,
        description=DESCRIPTION,
        lifespan=lifespan,
        # Served by api.docs_pages from bundled assets: FastAPI's own pages load them from CDNs.
        docs_url=None,
        redoc_url=None,
        generate_unique_id_function=_operation_id,
        dependencies=[Depends(reject_unknown_query)],
        openapi_tags=[
            {"name": "files", "description": "Uploads: teachers and datasets."},
            {"name": "jobs", "description": "Distillation jobs."},
            {"name": "artifacts", "description": "What a job produced."},
            {"name": "architectures", "description": "Student architectures."},
            {"name": "health", "description": "Liveness, readiness, metrics (no auth)."},
        ],
    )
    app.state.settings = settings
    app.state.session_factory = session_factory
    app.state.storage = storage or Storage.from_settings(settings)
    app.state.metrics = Metrics(session_factory)
    app.state.auth_cache = AuthCache(settings.auth_cache_seconds)
    app.state.rate_limiter = RateLimiter(settings)
    app.state.schema_revision = ScriptDirectory.from_config(alembic_config(settings.database_url)).get_current_head()

    install_error_handlers(app)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "Last-Event-ID"],
            expose_headers=["Location", "X-Request-ID", "X-Checksum-Sha256"],
        )
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_spec_bytes)
    app.add_middleware(ObservabilityMiddleware, metrics=app.state.metrics)

    app.include_router(health.router)
    mount_docs(app)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(current_user)], responses=errors(401, 403))
    routers = (references.router, files.router, uploads.router, jobs.router, artifacts.router, architectures.router)
    for router in routers:
        v1.include_router(router)
    app.include_router(v1)
    mount_web(app)
    return app


def _operation_id(route: APIRoute) -> str:
    # The view's name: create_job, list_jobs, ... (FastAPI's default appends path and method).
    return route.name


def __getattr__(name: str) -> Any:
    # `uvicorn api.main:app` works too, without building an app on every import of this module.
    if name == "app":
        return create_app()
    raise AttributeError(name)
