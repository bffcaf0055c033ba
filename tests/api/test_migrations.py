"""The schema is made by Alembic alone, matches the models, and goes down to base and up again."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import make_url

from service.db import create_db_engine
from service.migrate import downgrade_to_base, upgrade_to_head
from service.models import Base
from service.settings import Settings
from tests.support import PG_ADMIN_URL

TABLES = {"user", "api_key", "file", "job", "job_file", "artifact", "job_event"}


@pytest.fixture(params=["postgresql", "sqlite"])
def empty_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'migrate.db'}"
    # A database of its own: the shared test database must stay at head for the other tests.
    pg_url: str = request.getfixturevalue("pg_url")
    name = make_url(pg_url).database + "_m"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    request.addfinalizer(lambda: _drop(admin, name))
    return make_url(pg_url).set(database=name).render_as_string(hide_password=False)


def _drop(admin, name: str) -> None:  # type: ignore[no-untyped-def]
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def test_upgrade_head_matches_models(empty_database_url: str) -> None:
    settings = Settings(database_url=empty_database_url)
    upgrade_to_head(settings)
    engine = create_db_engine(empty_database_url)
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        diffs = compare_metadata(context, Base.metadata)
    engine.dispose()
    assert diffs == [], f"models and migrations drifted: {diffs}"


def test_downgrade_base_then_upgrade_again(empty_database_url: str) -> None:
    settings = Settings(database_url=empty_database_url)
    upgrade_to_head(settings)
    engine = create_db_engine(empty_database_url)
    assert set(inspect(engine).get_table_names()) >= TABLES

    downgrade_to_base(settings)
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}

    upgrade_to_head(settings)
    assert set(inspect(engine).get_table_names()) >= TABLES
    engine.dispose()


def test_upgrade_head_twice_is_a_no_op(tmp_path: Path) -> None:
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'twice.db'}")
    upgrade_to_head(settings)
    upgrade_to_head(settings)
