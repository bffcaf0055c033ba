"""Request ids, JSON logs, Prometheus metrics and readiness."""

from __future__ import annotations

import json
import logging

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from service.logs import JsonFormatter
from service.models import JobState
from service.settings import Settings
from service.storage import Storage
from tests.api import factories
from tests.api.conftest import Account


def test_get_livez_echoes_request_id(client: TestClient) -> None:
    assert client.get("/livez", headers={"X-Request-ID": "abc-1"}).headers["x-request-id"] == "abc-1"
    generated = client.get("/livez").headers["x-request-id"]
    assert len(generated) == 32
    assert client.get("/livez", headers={"X-Request-ID": "bad id\n"}).headers["x-request-id"] != "bad id\n"


def test_access_log_is_json_with_request_id(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="distillery.access"):
        client.get("/livez", headers={"X-Request-ID": "log-1"})
    record = next(r for r in caplog.records if r.name == "distillery.access")
    # The middleware resets the id after the response; formatting a record later uses its own fields.
    entry = json.loads(JsonFormatter().format(record))
    assert entry["route"] == "/livez" and entry["status"] == 200 and entry["logger"] == "distillery.access"
    assert entry["message"] == "GET /livez 200" and "duration_ms" in entry


def test_get_metrics_counts_requests_and_jobs(
    client: TestClient, alice: Account, session: Session, storage: Storage
) -> None:
    factories.make_job(session, storage, alice.user)
    factories.make_job(session, storage, alice.user, job_state=JobState.SUCCEEDED)
    job = factories.make_job(session, storage, alice.user)
    client.get(f"/v1/jobs/{job.id}", headers=alice.headers)
    text = client.get("/metrics").text
    assert 'distillery_http_requests_total{method="GET",route="/v1/jobs/{job_id}",status="200"} 1.0' in text
    assert 'distillery_jobs{state="queued"} 2.0' in text
    assert 'distillery_jobs{state="succeeded"} 1.0' in text
    assert 'distillery_queue_depth{queue="default"} 2.0' in text
    assert "distillery_job_duration_seconds_count 1.0" in text


def test_get_readyz_all_ok(client: TestClient) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "checks": {"database": "ok", "broker": "ok", "storage": "ok"}}


def test_get_readyz_broker_down_503(app: FastAPI, settings: Settings) -> None:
    settings.broker_url = "redis://127.0.0.1:1/0"
    with TestClient(app) as client:
        response = client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable" and body["checks"]["broker"].startswith("error")
    assert body["checks"]["database"] == "ok"
