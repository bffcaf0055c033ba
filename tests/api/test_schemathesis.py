"""Property-based checks of every route from the OpenAPI schema, authenticated: no 5xx, and every
response (status, headers, body) matches what the schema declares."""

from __future__ import annotations

import tempfile
from pathlib import Path

import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, settings

from api.main import create_app
from service import users
from service.db import create_db_engine, create_session_factory
from service.migrate import upgrade_to_head
from service.models import FilePurpose, JobState
from service.settings import Settings
from service.storage import Storage
from tests.api import factories


def _build_app(data_dir: Path) -> tuple[FastAPI, str]:
    """A migrated SQLite app with a user and some real rows, so not every generated id is a 404."""
    config = Settings(
        data_dir=data_dir,
        broker_url="memory://",
        environment="test",
        max_concurrent_jobs=1000,
        max_upload_bytes=100_000,
        events_poll_seconds=0.01,
    )
    upgrade_to_head(config)
    factory = create_session_factory(create_db_engine(config.database_url))
    storage = Storage(config.storage_url)
    with factory() as session:
        user, key = users.create_user(session=session, name="schemathesis")
        job = factories.make_job(session, storage, user, job_state=JobState.SUCCEEDED)
        factories.make_artifact(session, storage, job)
        factories.make_file(session, storage, user, FilePurpose.DATASET)
    return create_app(config, session_factory=factory, storage=storage), key


# Built at import: schemathesis parametrizes at collection time (its lazy fixture loader does not
# work with this pytest). The folder goes away with the process.
_DATA_DIR = tempfile.TemporaryDirectory(prefix="distillery-schemathesis-")
APP, _KEY = _build_app(Path(_DATA_DIR.name))
AUTH = {"Authorization": f"Bearer {_KEY}"}
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)
# A resumable upload's part is raw bytes under tus's media type: send it as any binary body.
schemathesis.serializer.alias("application/offset+octet-stream", "application/octet-stream")


# derandomize: the same examples every run, so CI cannot go red by chance. With random seeds a
# negative case that drops the Authorization header (which AUTH below puts back) and adds an
# undeclared query parameter that serialises to nothing was now and then reported as "accepted"
# (schemathesis 4.32.5; upstream's false positives of negative_data_rejection, e.g. #4762).
@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_api_conforms_to_schema(case: schemathesis.Case) -> None:
    # positive_data_acceptance is left out: a schema-valid spec still names file ids that must
    # exist (422), which no schema can express.
    case.call_and_validate(headers=AUTH, excluded_checks=[schemathesis.checks.positive_data_acceptance])
