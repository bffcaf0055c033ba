"""The client's response models (client/models.py) against the server's schemas (api/schemas.py).

The client keeps its own copies so it installs without the server; this is the drift test that
keeps the copies honest: the same fields, the same job states and purposes, and the server's real
responses parse into the client's models with every value kept.
"""

from __future__ import annotations

from typing import Any, get_args

import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel
from sqlalchemy.orm import Session

import client.models as wire
from api import schemas
from kdcore.architectures import ArchInfo
from service.models import FINISHED_STATES, FilePurpose, JobState
from service.storage import Storage
from tests.api import factories
from tests.api.conftest import Account

PAIRS: list[tuple[type[BaseModel], type[BaseModel]]] = [
    (wire.File, schemas.FileOut),
    (wire.FilePage, schemas.FileList),
    (wire.Progress, schemas.Progress),
    (wire.JobError, schemas.JobError),
    (wire.Job, schemas.JobOut),
    (wire.JobPage, schemas.JobList),
    (wire.Artifact, schemas.ArtifactOut),
    (wire.ArtifactList, schemas.ArtifactList),
    (wire.Architecture, ArchInfo),
]


@pytest.mark.parametrize(("client_model", "server_model"), PAIRS, ids=lambda model: model.__name__)
def test_client_model_has_the_server_schemas_fields(
    client_model: type[BaseModel], server_model: type[BaseModel]
) -> None:
    assert set(client_model.model_fields) == set(server_model.model_fields)


def test_health_reads_what_the_server_sends() -> None:
    assert set(wire.Health.model_fields) <= set(schemas.HealthOut.model_fields)
    assert get_args(wire.Health.model_fields["status"].annotation) == get_args(
        schemas.HealthOut.model_fields["status"].annotation
    )


def test_client_spells_the_job_states_and_purposes_as_the_server_defines_them() -> None:
    assert set(get_args(wire.JobState)) == {state.value for state in JobState}
    assert {state.value for state in FINISHED_STATES} == wire.FINISHED_STATES
    assert set(get_args(wire.Purpose)) == {purpose.value for purpose in FilePurpose}


def _same_values(parsed: BaseModel, sent: dict[str, Any]) -> None:
    """Every field the server sent comes back out of the client's model unchanged."""
    dumped = parsed.model_dump(mode="json")
    for name, value in sent.items():
        if isinstance(value, str) and name.endswith("_at"):
            assert parsed.__dict__[name] is not None
            continue
        assert dumped[name] == value, name


@pytest.mark.parametrize("job_state", [JobState.QUEUED, JobState.RUNNING, JobState.SUCCEEDED, JobState.FAILED])
def test_real_responses_parse_into_the_client_models(
    client: TestClient, alice: Account, session: Session, storage: Storage, job_state: JobState
) -> None:
    job = factories.make_job(session, storage, alice.user, job_state=job_state)
    factories.make_artifact(session, storage, job, "metrics.json", b"{}")

    sent_job = client.get(f"/v1/jobs/{job.id}", headers=alice.headers).json()
    parsed_job = wire.Job.model_validate(sent_job)
    assert parsed_job.state == job_state.value and parsed_job.finished == (job_state in FINISHED_STATES)
    _same_values(parsed_job, {k: v for k, v in sent_job.items() if k not in ("progress", "error")})
    _same_values(parsed_job.progress, sent_job["progress"])

    jobs_page = wire.JobPage.model_validate(client.get("/v1/jobs", headers=alice.headers).json())
    assert [item.id for item in jobs_page.items] == [job.id]

    sent_files = client.get("/v1/files", headers=alice.headers).json()
    files_page = wire.FilePage.model_validate(sent_files)
    assert {file.purpose for file in files_page.items} == {"teacher", "dataset"}
    for parsed_file, sent_file in zip(files_page.items, sent_files["items"], strict=True):
        _same_values(parsed_file, sent_file)

    sent_artifacts = client.get(f"/v1/jobs/{job.id}/artifacts", headers=alice.headers).json()
    artifacts = wire.ArtifactList.model_validate(sent_artifacts)
    _same_values(artifacts.items[0], sent_artifacts["items"][0])

    sent_architectures = client.get("/v1/architectures", headers=alice.headers).json()
    for entry in sent_architectures:
        _same_values(wire.Architecture.model_validate(entry), entry)


def test_a_failed_jobs_error_reaches_the_client(
    client: TestClient, alice: Account, session: Session, storage: Storage
) -> None:
    job = factories.make_job(session, storage, alice.user, job_state=JobState.FAILED)
    sent = client.get(f"/v1/jobs/{job.id}", headers=alice.headers).json()
    parsed = wire.Job.model_validate(sent)
    assert parsed.error is not None and parsed.error.model_dump() == sent["error"]
