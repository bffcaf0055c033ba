"""Fixtures for the API tests: real PostgreSQL and SQLite databases, migrated by Alembic.

PostgreSQL: one fresh database per test session (created through the `postgres` role on
127.0.0.1:5432), and each test runs inside a transaction that is rolled back at its end (the
SQLAlchemy 2.0 "join a session into an external transaction" recipe). SQLite: each test gets a
copy of a migrated template file. `client` talks to the app through Starlette's TestClient.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from api.main import create_app
from service.db import create_db_engine
from service.migrate import upgrade_to_head
from service.models import User
from service.settings import Settings
from service.storage import Storage
from tests.api import factories
from tests.support import postgres_database


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    with postgres_database("test") as url:
        yield url


@pytest.fixture(scope="session")
def pg_engine(pg_url: str) -> Iterator[Engine]:
    upgrade_to_head(Settings(database_url=pg_url))
    engine = create_db_engine(pg_url)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sqlite-template") / "distillery.db"
    upgrade_to_head(Settings(database_url=f"sqlite:///{path}"))
    return path


@dataclass
class Db:
    kind: str
    url: str
    session_factory: sessionmaker[Session]


@pytest.fixture
def pg_db(request: pytest.FixtureRequest) -> Iterator[Db]:
    engine: Engine = request.getfixturevalue("pg_engine")
    connection = engine.connect()
    outer = connection.begin()
    # Every session the app opens joins this transaction through a savepoint, so its commits
    # are real (and visible to later queries in the test) yet vanish at the rollback below.
    factory = sessionmaker(bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False)
    try:
        yield Db("postgresql", str(engine.url), factory)
    finally:
        outer.rollback()
        connection.close()


@pytest.fixture
def sqlite_db(sqlite_template: Path, tmp_path: Path) -> Iterator[Db]:
    path = tmp_path / "distillery.db"
    shutil.copyfile(sqlite_template, path)
    url = f"sqlite:///{path}"
    engine = create_db_engine(url)
    try:
        yield Db("sqlite", url, sessionmaker(bind=engine, expire_on_commit=False))
    finally:
        engine.dispose()


@pytest.fixture
def db(pg_db: Db) -> Db:
    """The default database of the API tests: PostgreSQL, rolled back per test."""
    return pg_db


@pytest.fixture(params=["postgresql", "sqlite"])
def any_db(request: pytest.FixtureRequest) -> Db:
    """For tests where the database matters: run them on both."""
    db: Db = request.getfixturevalue("pg_db" if request.param == "postgresql" else "sqlite_db")
    return db


@pytest.fixture
def session(db: Db) -> Iterator[Session]:
    with db.session_factory() as session:
        yield session


@pytest.fixture
def settings(tmp_path: Path, db: Db) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        database_url=db.url,
        broker_url="memory://",
        environment="test",
        max_upload_bytes=1_000_000,
        user_quota_bytes=3_000_000,
        max_concurrent_jobs=3,
    )


@pytest.fixture
def storage(settings: Settings) -> Storage:
    return Storage(settings.storage_url)


@pytest.fixture
def app(settings: Settings, db: Db, storage: Storage) -> FastAPI:
    return create_app(settings, session_factory=db.session_factory, storage=storage)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


@dataclass
class Account:
    user: User
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


@pytest.fixture
def alice(session: Session) -> Account:
    return Account(*factories.make_user(session, "alice"))


@pytest.fixture
def mallory(session: Session) -> Account:
    return Account(*factories.make_user(session, "mallory"))
