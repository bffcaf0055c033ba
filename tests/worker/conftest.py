"""Fixtures for the worker tests: the runner and the reaper in this process, against real
PostgreSQL and SQLite databases, real storage folders and the real engine."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from kdcore.spec import parse_spec
from service import users
from service.db import create_db_engine, create_session_factory
from service.files import sniff_upload
from service.ids import new_id
from service.jobs import submit_job
from service.keys import upload_key
from service.migrate import upgrade_to_head
from service.models import File, FilePurpose, Job, JobEvent, User
from service.settings import Settings
from service.storage import Storage
from tests.support import postgres_database
from tests.worker.support import FAST_SERVICE_ENV, JobFiles, make_job_files


@pytest.fixture(scope="session")
def job_files(tmp_path_factory: pytest.TempPathFactory) -> JobFiles:
    return make_job_files(tmp_path_factory.mktemp("job-files"))


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    with postgres_database("worker") as url:
        upgrade_to_head(Settings(database_url=url))
        yield url


@dataclass
class Service:
    """The worker's view of one service: settings, database, storage and a user with uploads."""

    settings: Settings
    engine: Engine
    session_factory: sessionmaker[Session]
    storage: Storage
    owner: User
    teacher: File
    data: File
    job_files: JobFiles

    def submit(self, *, epochs: int = 3, **overrides: Any) -> str:
        """A queued job, recorded exactly as `POST /v1/jobs` records it (not sent to any broker)."""
        spec = parse_spec(self.job_files.spec(self.teacher.id, self.data.id, epochs=epochs, **overrides))
        with self.session_factory() as session:
            submission = submit_job(session=session, settings=self.settings, owner_id=self.owner.id, spec=spec,
                                    idempotency_key=None)
            return submission.job.id

    def job(self, job_id: str) -> Job:
        with self.session_factory() as session:
            job = session.get(Job, job_id)
            assert job is not None
            return job

    def events(self, job_id: str) -> list[JobEvent]:
        with self.session_factory() as session:
            return list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))


@pytest.fixture(params=["postgresql", "sqlite"])
def service(request: pytest.FixtureRequest, tmp_path: Path, job_files: JobFiles) -> Iterator[Service]:
    """A service on each database the product supports."""
    if request.param == "postgresql":
        yield from _service_on(request.getfixturevalue("pg_url"), tmp_path, job_files)
    else:
        url = f"sqlite:///{tmp_path / 'distillery.db'}"
        upgrade_to_head(Settings(database_url=url))
        yield from _service_on(url, tmp_path, job_files)


@pytest.fixture
def sqlite_service(tmp_path: Path, job_files: JobFiles) -> Iterator[Service]:
    """A service on its own SQLite file: nothing else's jobs in it (the reaper counts them all)."""
    url = f"sqlite:///{tmp_path / 'distillery.db'}"
    upgrade_to_head(Settings(database_url=url))
    yield from _service_on(url, tmp_path, job_files)


@pytest.fixture
def pg_service(pg_url: str, tmp_path: Path, job_files: JobFiles) -> Iterator[Service]:
    """A service on PostgreSQL only, for tests where the database does not matter."""
    yield from _service_on(pg_url, tmp_path, job_files)


def _service_on(database_url: str, tmp_path: Path, job_files: JobFiles) -> Iterator[Service]:
    settings = fast_settings(data_dir=tmp_path, database_url=database_url, max_attempts=2)
    engine = create_db_engine(settings.database_url)
    session_factory = create_session_factory(engine)
    storage = Storage(settings.storage_url)
    with session_factory() as session:
        owner, _key = users.create_user(session=session, name=new_id("name"))
    teacher = _upload(session_factory, storage, owner, job_files.teacher, FilePurpose.TEACHER)
    data = _upload(session_factory, storage, owner, job_files.data, FilePurpose.DATASET)
    yield Service(settings, engine, session_factory, storage, owner, teacher, data, job_files)
    engine.dispose()


def fast_settings(**values: Any) -> Settings:
    """Worker settings with the tests' short leases and intervals (FAST_SERVICE_ENV), plus `values`."""
    fields = {key.removeprefix("DISTILLERY_").lower(): value for key, value in FAST_SERVICE_ENV.items()
              if key.startswith("DISTILLERY_")}
    return Settings(**{**fields, **values})


def _upload(session_factory: sessionmaker[Session], storage: Storage, owner: User, path: Path,
            purpose: FilePurpose) -> File:
    file_id = new_id("file")
    stored = storage.put_file(upload_key(owner.id, file_id), path)
    row = File(id=file_id, owner_id=owner.id, name=path.name, purpose=purpose, size=stored.size,
               sha256=stored.sha256, storage_key=stored.key, info=sniff_upload(path=str(path), purpose=purpose))
    with session_factory() as session:
        session.add(row)
        session.commit()
    return row
