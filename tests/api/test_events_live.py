"""An event stream that follows a job while another connection (the worker) writes to it.

Runs on SQLite: the PostgreSQL fixture shares one connection per test, which a second thread
must not use concurrently.
"""

from __future__ import annotations

import threading
import time

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from service import state
from service.models import JobState
from service.settings import Settings
from service.storage import Storage
from tests.api import factories
from tests.api.conftest import Account, Db
from tests.api.test_jobs import _events


@pytest.fixture
def db(sqlite_db: Db) -> Db:
    return sqlite_db


def test_stream_job_events_follows_running_job(
    client: TestClient, alice: Account, session: Session, storage: Storage, settings: Settings, db: Db
) -> None:
    settings.events_poll_seconds = 0.05
    job = factories.make_job(session, storage, alice.user, job_state=JobState.RUNNING)

    def worker() -> None:
        time.sleep(0.3)
        with db.session_factory() as worker_session:
            state.record_progress(worker_session, job.id, "worker-1", progress={"fraction": 0.5})
            state.finish(worker_session, job.id, "worker-1", state=JobState.SUCCEEDED)
            worker_session.commit()

    thread = threading.Thread(target=worker)
    thread.start()
    response = client.get(f"/v1/jobs/{job.id}/events", headers=alice.headers)
    thread.join()
    kinds = [e["event"] for e in _events(response.text)]
    assert kinds == ["state", "state", "progress", "state"]
