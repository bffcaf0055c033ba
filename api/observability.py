"""Structured logs with a request id, and Prometheus metrics.

One pure-ASGI middleware does the per-request work (request id, access log, request metrics,
the 500 for an unexpected error) so a request pays for one wrapper, not a stack of them.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.logs import request_id_var
from service.models import Job, JobState

access_logger = logging.getLogger("distillery.access")
logger = logging.getLogger("distillery.api")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
class JobCollector(Collector):
    """Job gauges read from the database at scrape time (the row is the truth, and the API is stateless).

    Cached briefly so a tight scrape interval cannot load the database.
    """

    DURATION_BUCKETS = (10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 4 * 3600.0, 12 * 3600.0)

    def __init__(self, session_factory: sessionmaker[Session], *, cache_seconds: float = 5.0) -> None:
        self._session_factory = session_factory
        self._cache_seconds = cache_seconds
        self._cached: tuple[float, list[Metric]] | None = None

    def collect(self) -> Iterator[Metric]:
        now = time.monotonic()
        if self._cached is None or now - self._cached[0] > self._cache_seconds:
            self._cached = (now, self._read())
        yield from self._cached[1]

    def _read(self) -> list[Metric]:
        with self._session_factory() as session:
            by_state = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).tuples().all())
            depth = dict(
                session.execute(select(Job.queue, func.count()).where(Job.state == JobState.QUEUED).group_by(Job.queue))
                .tuples()
                .all()
            )
            finished = Job.duration_s.is_not(None)
            counts = [func.count().filter(finished, Job.duration_s <= bound) for bound in self.DURATION_BUCKETS]
            row = session.execute(
                select(func.count().filter(finished), func.coalesce(func.sum(Job.duration_s), 0.0), *counts)
            ).one()
        jobs = GaugeMetricFamily("distillery_jobs", "Jobs in the database by state.", labels=["state"])
        for job_state in JobState:
            jobs.add_metric([job_state.value], by_state.get(job_state.value, 0))
        queue = GaugeMetricFamily("distillery_queue_depth", "Queued jobs per queue.", labels=["queue"])
        for name in sorted({"default", "cpu", *depth}):
            queue.add_metric([name], depth.get(name, 0))
        return [jobs, queue, self._durations(int(row[0]), float(row[1] or 0.0), [int(c) for c in row[2:]])]

    def _durations(self, total: int, seconds: float, cumulative: list[int]) -> HistogramMetricFamily:
        buckets = [(repr(bound), count) for bound, count in zip(self.DURATION_BUCKETS, cumulative, strict=True)]
        buckets.append(("+Inf", total))
        histogram = HistogramMetricFamily(
            "distillery_job_duration_seconds", "Run time of finished jobs still in the database."
        )
        histogram.add_metric([], buckets, sum_value=seconds)
        return histogram


class Metrics:
    """The app's own registry (not the global one), so several apps can live in one process (tests)."""

    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "distillery_http_requests",
            "HTTP requests by route template and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "distillery_http_request_duration_seconds",
            "HTTP request latency by route template.",
            ["method", "route"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0),
        )
        self.registry.register(JobCollector(session_factory))


class ObservabilityMiddleware:
    def __init__(self, app: ASGIApp, *, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        # Label children by (method, route, status): what `.labels()` looks up, under a lock, on
        # every call. Bounded like the labels themselves.
        self._children: dict[tuple[str, str, str], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = _header(scope, b"x-request-id")
        request_id = incoming if incoming and _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        status = 500
        response_started = False
        encoded_id = request_id.encode("latin-1")

        async def send_with_request_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status, response_started = message["status"], True
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", encoded_id)]
            await send(message)

        try:
            await self.app(scope, receive, send_with_request_id)
        except Exception:
            logger.exception("unhandled error on %s %s", scope["method"], scope["path"])
            if not response_started:
                await _send_internal_error(send_with_request_id)
        finally:
            elapsed = time.perf_counter() - started
            route = _route_template(scope)
            method = scope["method"]
            key = (method, route, str(status))
            children = self._children.get(key)
            if children is None:
                children = self._children[key] = (
                    self.metrics.requests.labels(*key),
                    self.metrics.latency.labels(method, route),
                )
            children[0].inc()
            children[1].observe(elapsed)
            if access_logger.isEnabledFor(logging.INFO):
                state = scope.get("state") or {}
                _log_access(
                    (method, scope["path"], status),
                    {
                        "method": method,
                        "path": scope["path"],
                        "route": route,
                        "status": status,
                        "duration_ms": round(elapsed * 1000, 2),
                        "user_id": state.get("user_id"),
                    },
                )
            request_id_var.reset(token)


def _log_access(args: tuple[Any, ...], extra: dict[str, Any]) -> None:
    # What `access_logger.info("%s %s %s", *args, extra=extra)` does, less the stack walk that finds
    # the caller's file and line (one access log line per request; the JSON lines do not show them).
    record = access_logger.makeRecord(
        access_logger.name, logging.INFO, __file__, 0, "%s %s %s", args, None, "access_log", extra
    )
    access_logger.handle(record)


def _route_template(scope: Scope) -> str:
    """`/v1/jobs/{job_id}` for `/v1/jobs/job_01...`: a bounded metric label.

    Rebuilt from the path and its parameters because an included router's route knows only its
    own part of the path.
    """
    if scope.get("route") is None:
        return "unmatched"
    path: str = scope["path"]
    for name, value in reversed(list(scope.get("path_params", {}).items())):
        head, found, tail = path.rpartition(f"/{value}")
        if found:
            path = f"{head}/{{{name}}}{tail}"
    return path


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


async def _send_internal_error(send: Send) -> None:
    body = json.dumps({"error": {"code": "internal", "message": "internal error; quote the X-Request-ID"}}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 500,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
