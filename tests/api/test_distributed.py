"""A distributed job over HTTP: refused at submission while no worker runs more than one process per job."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.models import FilePurpose, Job
from service.storage import Storage
from tests.api import factories
from tests.api.conftest import Account


def test_a_job_asking_for_more_processes_than_a_worker_runs_is_refused(
        client: TestClient, session: Session, storage: Storage, alice: Account) -> None:
    teacher = factories.make_file(session, storage, alice.user, FilePurpose.TEACHER)
    train = factories.make_file(session, storage, alice.user, FilePurpose.DATASET)
    spec = {**factories.spec_for(teacher, train), "distributed": {"nproc": 2}}

    response = client.post("/v1/jobs", headers=alice.headers, json=spec)

    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == "distributed.nproc" and "largest worker runs 1 process(es)" in error["message"], error
    assert session.scalar(select(func.count()).select_from(Job)) == 0  # nothing queued
    one = client.post("/v1/jobs", headers=alice.headers, json={**spec, "distributed": {"nproc": 1}})
    assert one.status_code == 201, one.text
