"""Another user's job, file or artifact is a 404 on every route, exactly like a missing one."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from service.models import File, Job, JobState
from service.storage import Storage
from tests.api import factories
from tests.api.conftest import Account

ROUTES = [
    ("GET", "/v1/jobs/{job}"),
    ("GET", "/v1/jobs/{job}/events"),
    ("POST", "/v1/jobs/{job}/cancel"),
    ("DELETE", "/v1/jobs/{job}"),
    ("GET", "/v1/jobs/{job}/artifacts"),
    ("GET", "/v1/jobs/{job}/artifacts/student.onnx"),
    ("GET", "/v1/files/{file}"),
    ("GET", "/v1/files/{file}/content"),
    ("DELETE", "/v1/files/{file}"),
]


@pytest.fixture
def alices_job(session: Session, storage: Storage, alice: Account) -> Job:
    job = factories.make_job(session, storage, alice.user, job_state=JobState.SUCCEEDED)
    factories.make_artifact(session, storage, job, "student.onnx")
    return job


@pytest.mark.parametrize(("method", "route"), ROUTES)
def test_get_other_users_resource_404(
    client: TestClient, alice: Account, mallory: Account, alices_job: Job, session: Session, method: str, route: str
) -> None:
    alices_file = session.get_one(File, alices_job.spec["teacher"]["file"])
    url = route.format(job=alices_job.id, file=alices_file.id)
    response = client.request(method, url, headers=mallory.headers)
    assert response.status_code == 404, f"{method} {url}: {response.status_code}"
    assert response.json()["error"]["code"] == "not_found"
    # The owner still sees it (and the 404 above was not a broken route).
    assert client.request("GET", url.replace("/cancel", ""), headers=alice.headers).status_code in (200, 204)


def test_list_jobs_and_files_only_own(client: TestClient, alice: Account, mallory: Account, alices_job: Job) -> None:
    assert client.get("/v1/jobs", headers=mallory.headers).json()["items"] == []
    assert client.get("/v1/files", headers=mallory.headers).json()["items"] == []
    assert len(client.get("/v1/jobs", headers=alice.headers).json()["items"]) == 1
