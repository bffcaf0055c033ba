"""Liveness, readiness and metrics: open routes, mounted apart from the authenticated /v1."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from api.deps import SettingsDep, StorageDep
from api.schemas import HealthOut

router = APIRouter(tags=["health"])
logger = logging.getLogger("distillery.api")
CHECK_TIMEOUT_S = 3.0


@router.get("/livez", response_model=HealthOut, summary="The process is up")
async def livez() -> HealthOut:
    return HealthOut(status="ok")


@router.get(
    "/readyz",
    response_model=HealthOut,
    summary="Database, broker and storage answer",
    responses={503: {"model": HealthOut, "description": "A dependency is down; `checks` says which."}},
)
async def readyz(request: Request, settings: SettingsDep, storage: StorageDep) -> JSONResponse:
    session_factory = request.app.state.session_factory
    expected_revision: str | None = request.app.state.schema_revision

    def database() -> None:
        with session_factory() as session:
            revision = session.execute(text("SELECT version_num FROM alembic_version")).scalar()
        if expected_revision is not None and revision != expected_revision:
            raise RuntimeError(f"schema at {revision}, code expects {expected_revision}: run the migrations")

    def broker() -> None:
        from kombu import Connection

        with Connection(settings.broker_url, connect_timeout=CHECK_TIMEOUT_S) as connection:
            connection.ensure_connection(max_retries=1, timeout=CHECK_TIMEOUT_S)

    checks = {"database": database, "broker": broker, "storage": storage.check}
    results = await asyncio.gather(*(_run_check(name, check) for name, check in checks.items()))
    outcome = dict(zip(checks, results, strict=True))
    ready = all(result == "ok" for result in outcome.values())
    body = HealthOut(status="ok" if ready else "unavailable", checks=outcome)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


async def _run_check(name: str, check: Callable[[], None]) -> str:
    try:
        await asyncio.wait_for(run_in_threadpool(check), timeout=CHECK_TIMEOUT_S + 1)
    except Exception as exc:
        logger.warning("readiness check %s failed: %s", name, exc)
        return f"error: {type(exc).__name__}: {exc}"[:300]
    return "ok"


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format."}},
)
async def metrics(request: Request) -> Response:
    registry = request.app.state.metrics.registry
    body = await run_in_threadpool(generate_latest, registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
