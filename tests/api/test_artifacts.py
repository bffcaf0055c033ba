"""Artifacts: listed with size and sha256, downloaded as a stream with checksum headers."""

from __future__ import annotations

import base64
import hashlib

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from service.models import JobState
from service.storage import Storage
from tests.api import factories
from tests.api.conftest import Account


def test_list_artifacts_200(client: TestClient, alice: Account, session: Session, storage: Storage) -> None:
    job = factories.make_job(session, storage, alice.user, job_state=JobState.SUCCEEDED)
    factories.make_artifact(session, storage, job, "student.onnx", b"o" * 10)
    factories.make_artifact(session, storage, job, "metrics.json", b"{}")
    items = client.get(f"/v1/jobs/{job.id}/artifacts", headers=alice.headers).json()["items"]
    assert [(a["name"], a["size"]) for a in items] == [("metrics.json", 2), ("student.onnx", 10)]
    assert items[0]["sha256"] == hashlib.sha256(b"{}").hexdigest()
    assert items[0]["content_type"] == "application/json"


def test_download_artifact_streams_with_checksum(
    client: TestClient, alice: Account, session: Session, storage: Storage
) -> None:
    job = factories.make_job(session, storage, alice.user, job_state=JobState.SUCCEEDED)
    content = bytes(range(256)) * 9000  # > 2 MiB: several storage chunks
    factories.make_artifact(session, storage, job, "student.safetensors", content)
    response = client.get(f"/v1/jobs/{job.id}/artifacts/student.safetensors", headers=alice.headers)
    assert response.status_code == 200 and response.content == content
    digest = hashlib.sha256(content)
    assert response.headers["x-checksum-sha256"] == digest.hexdigest()
    assert response.headers["digest"] == "sha-256=" + base64.b64encode(digest.digest()).decode()
    assert response.headers["content-length"] == str(len(content))
    assert response.headers["content-type"] == "application/octet-stream"
    assert "filename*=UTF-8" in response.headers["content-disposition"]


def test_download_artifact_in_subfolder(client: TestClient, alice: Account, session: Session, storage: Storage) -> None:
    job = factories.make_job(session, storage, alice.user, job_state=JobState.SUCCEEDED)
    factories.make_artifact(session, storage, job, "tensorboard/events.out.tfevents.1", b"tb")
    response = client.get(f"/v1/jobs/{job.id}/artifacts/tensorboard/events.out.tfevents.1", headers=alice.headers)
    assert response.status_code == 200 and response.content == b"tb"


def test_download_artifact_missing_404(client: TestClient, alice: Account, session: Session, storage: Storage) -> None:
    job = factories.make_job(session, storage, alice.user, job_state=JobState.SUCCEEDED)
    response = client.get(f"/v1/jobs/{job.id}/artifacts/nope.onnx", headers=alice.headers)
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
