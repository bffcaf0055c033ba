"""Limits and hardening at the API: each attack of the hardening issue reproduced, and refused clearly.

The races run real threads against real PostgreSQL and SQLite databases, each thread with its own
connection and real commits (not the rolled-back test transaction, which is one connection).
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session, sessionmaker

from api.main import create_app
from kdcore.spec import parse_spec
from service import quota, users
from service.db import create_db_engine, create_session_factory
from service.errors import ServiceError
from service.ids import new_id
from service.jobs import submit_job
from service.models import ACTIVE_STATES, FilePurpose, Job, UploadReservation, User
from service.settings import Settings
from service.storage import Storage
from tests.api import factories
from tests.api.conftest import Account
from tests.web.conftest import sign_in

MB = 1_000_000


@pytest.fixture(params=["postgresql", "sqlite"])
def real_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    """A session factory with a pool of real connections and real commits."""
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_url")
        request.getfixturevalue("pg_engine")  # migrated
    else:
        url = f"sqlite:///{tmp_path / 'race.db'}"
        shutil.copyfile(request.getfixturevalue("sqlite_template"), tmp_path / "race.db")
    engine = create_db_engine(url)
    factory = create_session_factory(engine)
    yield factory
    # The shared PostgreSQL test database must not keep these rows (other tests count all jobs).
    with factory() as session:
        session.execute(delete(User).where(User.name.like("race-%")))
        session.commit()
    engine.dispose()


def _race(count: int, action: Callable[[int], Any]) -> list[Any]:
    """Run `action(i)` in `count` threads released together; each result or the ServiceError it raised."""
    barrier = threading.Barrier(count)
    results: list[Any] = [None] * count

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = action(i)
        except ServiceError as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return results


def test_parallel_uploads_cannot_exceed_the_quota(real_db: sessionmaker[Session], tmp_path: Path) -> None:
    # The race: three 25 MB uploads against a 60 MB quota stored 68 MB.
    settings = Settings(data_dir=tmp_path, user_quota_bytes=60 * MB, max_upload_bytes=30 * MB, environment="test")
    with real_db() as session:
        owner, _key = users.create_user(session=session, name=f"race-{new_id('name')}")

    def reserve(_i: int) -> int:
        with real_db() as session:
            return quota.reserve_upload(session=session, settings=settings, owner_id=owner.id,
                                        file_id=new_id("file"), declared=25 * MB)

    results = _race(3, reserve)
    granted = [r for r in results if isinstance(r, int)]
    refused = [r for r in results if isinstance(r, ServiceError)]
    assert len(granted) == 2 and len(refused) == 1, results
    assert refused[0].status == 413 and refused[0].code == "quota_exceeded"
    assert "you use 50,000,000 of your 60,000,000 bytes" in refused[0].message
    assert "DELETE /v1/files/{id}" in refused[0].message
    with real_db() as session:
        assert quota.used_bytes(session=session, owner_id=owner.id) == 50 * MB


def test_parallel_submissions_respect_the_job_limit(real_db: sessionmaker[Session], tmp_path: Path) -> None:
    # The race on SQLite: 8 parallel submissions left 5 jobs active against a limit of 4.
    settings = Settings(data_dir=tmp_path, max_concurrent_jobs=4, environment="test", broker_url="memory://")
    storage = Storage(settings.storage_url)
    with real_db() as session:
        owner, _key = users.create_user(session=session, name=f"race-{new_id('name')}")
        teacher = factories.make_file(session, storage, owner, FilePurpose.TEACHER)
        train = factories.make_file(session, storage, owner, FilePurpose.DATASET)
    spec = parse_spec(factories.spec_for(teacher, train))

    def submit(_i: int) -> str:
        with real_db() as session:
            return submit_job(session=session, settings=settings, owner_id=owner.id, spec=spec,
                              idempotency_key=None).job.id

    results = _race(8, submit)
    assert sum(isinstance(r, str) for r in results) == 4, results
    assert all(r.status == 429 and r.code == "too_many_jobs" for r in results if isinstance(r, ServiceError))
    with real_db() as session:
        active = session.scalar(select(func.count()).select_from(Job).where(
            Job.owner_id == owner.id, Job.state.in_(ACTIVE_STATES)))
    assert active == 4


def test_artifacts_count_against_the_quota(client: TestClient, session: Session, storage: Storage,
                                           alice: Account, settings: Settings) -> None:
    job = factories.make_job(session, storage, alice.user)
    factories.make_artifact(session, storage, job, content=b"x" * (settings.user_quota_bytes - 100))
    assert quota.used_bytes(session=session, owner_id=alice.user.id) >= settings.user_quota_bytes - 100
    response = client.post("/v1/files", headers=alice.headers, data={"purpose": "dataset"},
                           files={"file": ("d.npz", factories.npz_bytes(), "application/octet-stream")})
    assert response.status_code == 413
    error = response.json()["error"]
    assert error["code"] == "quota_exceeded" and "job artifacts" in error["message"]
    assert "DELETE /v1/jobs/{id}" in error["message"]


def test_a_refused_upload_releases_its_reservation(client: TestClient, session: Session, alice: Account) -> None:
    response = client.post("/v1/files", headers=alice.headers, data={"purpose": "dataset"},
                           files={"file": ("d.npz", b"not a zip at all", "application/octet-stream")})
    assert response.status_code == 422
    assert session.scalar(select(func.count()).select_from(UploadReservation)
                          .where(UploadReservation.owner_id == alice.user.id)) == 0
    assert quota.used_bytes(session=session, owner_id=alice.user.id) == 0


def _inputs(session: Session, storage: Storage, alice: Account, **info: Any) -> tuple[Any, Any]:
    teacher = factories.make_file(session, storage, alice.user, FilePurpose.TEACHER)
    train = factories.make_file(session, storage, alice.user, FilePurpose.DATASET,
                                info={**factories.DATASET_INFO, "dtype": "uint8", "layout": "nhw", **info})
    return teacher, train


@pytest.mark.parametrize(
    "student",
    [{"arch": "mlp", "arch_args": {"hidden": [65536, 65536]}},  # 4e9 parameters
     {"arch": "cnn", "arch_args": {"widths": [4096] * 200}},  # 3e10
     {"arch": "resnet_small", "arch_args": {"depth": 56, "width": 256}}],  # 2.2e8
)
def test_giant_student_is_refused_at_submission(client: TestClient, session: Session, storage: Storage,
                                                alice: Account, student: dict[str, Any]) -> None:
    teacher, train = _inputs(session, storage, alice)
    spec = factories.spec_for(teacher, train, student=student)
    response = client.post("/v1/jobs", headers=alice.headers, json=spec)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "resource_limit" and error["field"] == "student.arch_args"
    assert "DISTILLERY_MAX_MODEL_PARAMETERS" in error["message"]


def test_upscaling_past_the_dataset_limit_is_refused_at_submission(
    client: TestClient, session: Session, storage: Storage, alice: Account, app: Any
) -> None:
    app.state.settings.max_dataset_bytes = 100 * MB
    teacher, train = _inputs(session, storage, alice, num_train=200, num_test=0, sample_shape=[8, 8])
    spec = factories.spec_for(teacher, train, data={"train": train.id, "image_size": 1024})
    response = client.post("/v1/jobs", headers=alice.headers, json=spec)
    assert response.status_code == 422
    error = response.json()["error"]
    assert (error["code"], error["field"]) == ("resource_limit", "data.train")
    assert "209,715,200" in error["message"] and "data.image_size" in error["message"]


def test_huge_spec_body_is_refused_before_it_is_parsed(client: TestClient, alice: Account) -> None:
    body = b'{"name": "x", "teacher": {"file": "' + b"a" * (14 * MB) + b'"}}'
    response = client.post("/v1/jobs", headers={**alice.headers, "Content-Type": "application/json"}, content=body)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "body_too_large"
    assert "DISTILLERY_MAX_SPEC_BYTES" in response.json()["error"]["message"]


def test_long_lists_in_a_spec_are_refused_naming_the_field(client: TestClient, session: Session, storage: Storage,
                                                           alice: Account) -> None:
    teacher, train = _inputs(session, storage, alice)
    spec = factories.spec_for(teacher, train, data={"train": train.id, "normalize": {"mean": [0.0] * 1000}})
    response = client.post("/v1/jobs", headers=alice.headers, json=spec)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["field"] == "data.normalize.mean" and "limit of 256" in error["message"]


def test_deeply_nested_json_is_a_client_error_not_a_500(client: TestClient, alice: Account) -> None:
    body = b"[" * 30_000 + b"]" * 30_000  # under the body limit, 30 times deeper than Python parses
    response = client.post("/v1/jobs", headers={**alice.headers, "Content-Type": "application/json"}, content=body)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "bad_request"


@pytest.mark.parametrize("param", ["after=9223372036854775808", "after=99999999999999999999999"])
def test_huge_event_cursor_is_a_422(client: TestClient, session: Session, storage: Storage, alice: Account,
                                    param: str) -> None:
    job = factories.make_job(session, storage, alice.user)
    response = client.get(f"/v1/jobs/{job.id}/events?{param}", headers=alice.headers)
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "after"


def test_submissions_are_rate_limited_per_user_with_retry_after(settings: Settings, session: Session,
                                                                storage: Storage, alice: Account,
                                                                mallory: Account, db: Any) -> None:
    settings.rate_limit_submissions = "2/minute"
    app = create_app(settings, session_factory=db.session_factory, storage=storage)
    teacher, train = _inputs(session, storage, alice)
    with TestClient(app) as client:
        statuses = [client.post("/v1/jobs", headers=alice.headers, json=factories.spec_for(teacher, train)).status_code
                    for _ in range(3)]
        assert statuses == [201, 201, 429]
        limited = client.post("/v1/jobs", headers=alice.headers, json=factories.spec_for(teacher, train))
        assert limited.json()["error"]["code"] == "rate_limited"
        assert 1 <= int(limited.headers["Retry-After"]) <= 60
        # Another user has a budget of their own.
        other = client.post("/v1/jobs", headers=mallory.headers, json={})
        assert other.status_code == 422


def test_sign_out_ends_the_session_on_the_server(client: TestClient, alice: Account) -> None:
    sign_in(client, alice.key)
    stolen = client.cookies.get("distillery_session")
    token = factories_csrf(client)
    response = client.post("/web/logout", data={"csrf_token": token}, follow_redirects=False)
    assert response.status_code == 303
    # The old cookie, replayed, is signed and unexpired but no longer a session.
    client.cookies.clear()
    client.cookies.set("distillery_session", stolen)
    replay = client.get("/web/jobs", follow_redirects=False)
    assert replay.status_code in (302, 303) and "/web/login" in replay.headers["location"]


def factories_csrf(client: TestClient) -> str:
    from tests.web.conftest import csrf_from

    return csrf_from(client.get("/web/jobs").text)


def test_revoked_key_ends_its_browser_sessions(client: TestClient, session: Session, alice: Account,
                                               app: Any) -> None:
    sign_in(client, alice.key)
    assert client.get("/web/jobs", follow_redirects=False).status_code == 200
    from service.security import parse_key

    key_id = parse_key(alice.key)
    assert key_id is not None and users.revoke_key(session=session, key_id=key_id)
    session.commit()
    assert client.get("/web/jobs", follow_redirects=False).status_code in (302, 303)
