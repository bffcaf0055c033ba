"""Jobs over HTTP: submit (validation, idempotency, limits, enqueue), list, read, events, cancel, delete."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient
from kombu import Connection
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service import state
from service.keys import checkpoint_prefix
from service.models import File, FilePurpose, Job, JobState, User
from service.settings import Settings
from service.storage import Storage
from tests.api import factories
from tests.api.conftest import Account


@pytest.fixture
def inputs(session: Session, storage: Storage, alice: Account) -> tuple[File, File]:
    teacher = factories.make_file(session, storage, alice.user, FilePurpose.TEACHER)
    train = factories.make_file(session, storage, alice.user, FilePurpose.DATASET)
    return teacher, train


@pytest.fixture
def spec(inputs: tuple[File, File]) -> dict[str, Any]:
    return factories.spec_for(*inputs)


def _submit(client: TestClient, account: Account, spec: dict[str, Any], **headers: str):  # type: ignore[no-untyped-def]
    return client.post("/v1/jobs", headers={**account.headers, **headers}, json=spec)


def _error(response) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    body: dict[str, Any] = response.json()["error"]
    return body


def test_create_job_201_queued_with_location(
    client: TestClient, alice: Account, spec: dict[str, Any], session: Session
) -> None:
    response = _submit(client, alice, spec)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["state"] == "queued" and body["attempts"] == 0 and body["progress"]["fraction"] == 0.0
    method = body["spec"]["method"]  # the defaults, filled in
    assert (method["name"], method["temperature"], method["alpha"], method["top_k"]) == ("kd", 4.0, 0.9, 0)
    assert body["spec"]["task"] == "image_classification"  # resolved from the teacher at submission
    assert response.headers["location"] == f"/v1/jobs/{body['id']}"
    job = session.get_one(Job, body["id"])
    assert job.owner_id == alice.user.id and job.enqueued_at is not None


def test_create_job_sends_task_to_broker(client: TestClient, alice: Account, spec: dict[str, Any]) -> None:
    job_id = _submit(client, alice, {**spec, "device": "cpu"}).json()["id"]
    with Connection("memory://") as connection:
        queue = connection.SimpleQueue("cpu")
        messages = []
        while True:
            try:
                message = queue.get(timeout=0.2)
            except queue.Empty:
                break
            messages.append(message)
            message.ack()
        queue.close()
    sent = [
        (m.headers["task"], json.loads(m.body)[0] if isinstance(m.body, (str, bytes)) else m.payload[0])
        for m in messages
    ]
    assert ("distillery.run_job", [job_id]) in sent


def test_create_job_idempotency_key_replays(
    client: TestClient, alice: Account, spec: dict[str, Any], session: Session
) -> None:
    first = _submit(client, alice, spec, **{"Idempotency-Key": "abc"})
    again = _submit(client, alice, spec, **{"Idempotency-Key": "abc"})
    assert first.status_code == 201 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"] and again.headers["idempotent-replayed"] == "true"
    assert session.scalar(select(func.count()).select_from(Job)) == 1


def test_create_job_idempotency_key_other_spec_409(client: TestClient, alice: Account, spec: dict[str, Any]) -> None:
    _submit(client, alice, spec, **{"Idempotency-Key": "abc"})
    response = _submit(client, alice, {**spec, "seed": 7}, **{"Idempotency-Key": "abc"})
    assert response.status_code == 409 and _error(response)["code"] == "idempotency_key_reused"


def test_create_job_bad_spec_422_names_field(
    client: TestClient, alice: Account, spec: dict[str, Any], session: Session
) -> None:
    response = _submit(client, alice, {**spec, "method": {"temperature": 0}})
    assert response.status_code == 422
    assert _error(response)["field"] == "method.temperature"
    assert session.scalar(select(func.count()).select_from(Job)) == 0


def test_create_job_unknown_field_422(client: TestClient, alice: Account, spec: dict[str, Any]) -> None:
    response = _submit(client, alice, {**spec, "method": {"temprature": 2}})
    assert response.status_code == 422 and _error(response)["field"] == "method.temprature"


def test_create_job_unknown_arch_422(client: TestClient, alice: Account, spec: dict[str, Any]) -> None:
    response = _submit(client, alice, {**spec, "student": {"arch": "nope"}})
    assert response.status_code == 422 and _error(response)["field"] == "student.arch"


def test_create_job_missing_teacher_file_422(client: TestClient, alice: Account, spec: dict[str, Any]) -> None:
    spec["teacher"]["file"] = "file_01j9z3m8k2q4x7v5t6r8s0w1ya"
    response = _submit(client, alice, spec)
    assert response.status_code == 422
    assert _error(response) | {"message": ""} == {"code": "file_not_found", "field": "teacher.file", "message": ""}


def test_create_job_other_users_file_422(
    client: TestClient, alice: Account, mallory: Account, spec: dict[str, Any]
) -> None:
    response = _submit(client, mallory, spec)
    assert response.status_code == 422 and _error(response)["field"] == "teacher.file"


def test_create_job_wrong_purpose_422(
    client: TestClient, alice: Account, spec: dict[str, Any], inputs: tuple[File, File]
) -> None:
    spec["data"]["train"] = inputs[0].id  # the teacher
    response = _submit(client, alice, spec)
    assert response.status_code == 422
    assert (_error(response)["code"], _error(response)["field"]) == ("wrong_file_purpose", "data.train")


def test_create_job_torchscript_teacher_refused_422(
    client: TestClient, alice: Account, session: Session, storage: Storage, inputs: tuple[File, File]
) -> None:
    upload = client.post(
        "/v1/files",
        headers=alice.headers,
        data={"purpose": "teacher"},
        files={"file": ("t.pt", factories.torchscript_bytes())},
    )
    assert upload.json()["info"]["format"] == "torchscript"
    spec = factories.spec_for(session.get_one(File, upload.json()["id"]), inputs[1])
    spec["teacher"] = {"file": upload.json()["id"]}
    response = _submit(client, alice, spec)
    assert response.status_code == 422
    assert (_error(response)["code"], _error(response)["field"]) == ("unsafe_format", "teacher.format")


def test_create_job_torchscript_teacher_allowed_when_configured(
    client: TestClient,
    alice: Account,
    session: Session,
    storage: Storage,
    inputs: tuple[File, File],
    settings: Settings,
) -> None:
    settings.allow_code_teachers = True
    teacher = factories.make_file(session, storage, alice.user, FilePurpose.TEACHER, info={"format": "torchscript"})
    response = _submit(client, alice, {**factories.spec_for(teacher, inputs[1]), "teacher": {"file": teacher.id}})
    assert response.status_code == 201, response.text


def test_create_job_weights_without_arch_422(client: TestClient, alice: Account, spec: dict[str, Any]) -> None:
    spec["teacher"] = {"file": spec["teacher"]["file"]}  # sniffed safetensors, no arch
    response = _submit(client, alice, spec)
    assert response.status_code == 422 and _error(response)["field"] == "teacher.arch"


def test_create_job_declared_format_mismatch_422(client: TestClient, alice: Account, spec: dict[str, Any]) -> None:
    spec["teacher"]["format"] = "onnx"
    response = _submit(client, alice, spec)
    assert response.status_code == 422 and _error(response)["field"] == "teacher.format"


def test_create_job_class_count_mismatch_422(
    client: TestClient, alice: Account, session: Session, storage: Storage, inputs: tuple[File, File]
) -> None:
    teacher = factories.make_file(
        session, storage, alice.user, FilePurpose.TEACHER, info={**factories.TEACHER_INFO, "output_size": 100}
    )
    response = _submit(client, alice, factories.spec_for(teacher, inputs[1]))
    assert response.status_code == 422
    assert _error(response)["code"] == "teacher_data_mismatch" and "100" in _error(response)["message"]


def test_create_job_over_concurrency_limit_429(
    client: TestClient, alice: Account, spec: dict[str, Any], settings: Settings
) -> None:
    for _ in range(settings.max_concurrent_jobs):
        assert _submit(client, alice, spec).status_code == 201
    response = _submit(client, alice, spec)
    assert response.status_code == 429 and _error(response)["code"] == "too_many_jobs"
    assert response.headers["retry-after"]


def test_create_job_broker_down_still_201_and_queued(
    client: TestClient, alice: Account, spec: dict[str, Any], settings: Settings, session: Session
) -> None:
    settings.broker_url = "redis://127.0.0.1:1/0"  # nothing listens on port 1
    response = _submit(client, alice, spec)
    assert response.status_code == 201
    job = session.get_one(Job, response.json()["id"])
    assert job.state == "queued" and job.enqueued_at is None  # left for the reaper


def test_list_jobs_newest_first_paginated_and_filtered(
    client: TestClient, alice: Account, session: Session, storage: Storage
) -> None:
    jobs = [factories.make_job(session, storage, alice.user) for _ in range(3)]
    done = factories.make_job(session, storage, alice.user, job_state=JobState.SUCCEEDED)
    page = client.get("/v1/jobs", headers=alice.headers, params={"limit": 3}).json()
    assert [item["id"] for item in page["items"]] == [done.id, jobs[2].id, jobs[1].id]
    rest = client.get("/v1/jobs", headers=alice.headers, params={"limit": 3, "cursor": page["next_cursor"]}).json()
    assert [item["id"] for item in rest["items"]] == [jobs[0].id] and rest["next_cursor"] is None
    succeeded = client.get("/v1/jobs", headers=alice.headers, params={"state": "succeeded"}).json()
    assert [item["id"] for item in succeeded["items"]] == [done.id]


def test_list_jobs_bad_state_422(client: TestClient, alice: Account) -> None:
    response = client.get("/v1/jobs", headers=alice.headers, params={"state": "sleeping"})
    assert response.status_code == 422 and _error(response)["field"] == "state"


def test_get_job_shows_progress_metrics_and_error(
    client: TestClient, alice: Account, session: Session, storage: Storage
) -> None:
    job = factories.make_job(session, storage, alice.user, job_state=JobState.RUNNING)
    state.record_progress(
        session,
        job.id,
        "worker-1",
        stage="distill",
        progress={"fraction": 0.5, "epoch": 2, "epochs": 4, "eta_s": 30.0},
        metrics={"distill": {"val_accuracy": 0.91}},
    )
    session.commit()
    body = client.get(f"/v1/jobs/{job.id}", headers=alice.headers).json()
    assert (body["state"], body["stage"], body["attempts"]) == ("running", "distill", 1)
    assert body["progress"] | {} == {
        "fraction": 0.5,
        "epoch": 2,
        "epochs": 4,
        "eta_s": 30.0,
        "step": None,
        "steps": None,
    }
    assert body["metrics"] == {"distill": {"val_accuracy": 0.91}} and body["started_at"]
    failed = factories.make_job(session, storage, alice.user, job_state=JobState.FAILED)
    assert client.get(f"/v1/jobs/{failed.id}", headers=alice.headers).json()["error"] == {
        "code": "bad_input",
        "message": "broken teacher",
    }


def _events(text: str) -> list[dict[str, Any]]:
    events = []
    for block in text.replace("\r\n", "\n").strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "data" in fields:
            events.append({"id": int(fields["id"]), "event": fields["event"], **json.loads(fields["data"])})
    return events


def test_stream_job_events_replays_and_ends(
    client: TestClient, alice: Account, session: Session, storage: Storage
) -> None:
    job = factories.make_job(session, storage, alice.user, job_state=JobState.SUCCEEDED)
    response = client.get(f"/v1/jobs/{job.id}/events", headers=alice.headers)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = _events(response.text)
    assert [(e["event"], e["state"]) for e in events] == [
        ("state", "queued"),
        ("state", "running"),
        ("state", "succeeded"),
    ]
    resumed = client.get(f"/v1/jobs/{job.id}/events", headers={**alice.headers, "Last-Event-ID": str(events[0]["id"])})
    assert [e["id"] for e in _events(resumed.text)] == [e["id"] for e in events[1:]]


def test_cancel_job_queued_cancelled(client: TestClient, alice: Account, session: Session, storage: Storage) -> None:
    job = factories.make_job(session, storage, alice.user)
    # a job handed back by a stopped worker waits in the queue with its checkpoint
    storage.put_bytes(checkpoint_prefix(job.id) + "checkpoint.pt", b"weights")
    response = client.post(f"/v1/jobs/{job.id}/cancel", headers=alice.headers)
    assert response.status_code == 200 and response.json()["state"] == "cancelled"
    assert storage.list(checkpoint_prefix(job.id)) == []


def test_cancel_job_running_keeps_its_checkpoint_for_the_worker(
    client: TestClient, alice: Account, session: Session, storage: Storage
) -> None:
    job = factories.make_job(session, storage, alice.user, job_state=JobState.RUNNING)
    storage.put_bytes(checkpoint_prefix(job.id) + "checkpoint.pt", b"weights")
    client.post(f"/v1/jobs/{job.id}/cancel", headers=alice.headers)
    assert storage.list(checkpoint_prefix(job.id)) == [checkpoint_prefix(job.id) + "checkpoint.pt"]


def test_cancel_job_running_flags_it(client: TestClient, alice: Account, session: Session, storage: Storage) -> None:
    job = factories.make_job(session, storage, alice.user, job_state=JobState.RUNNING)
    body = client.post(f"/v1/jobs/{job.id}/cancel", headers=alice.headers).json()
    assert (body["state"], body["cancel_requested"]) == ("running", True)


def test_cancel_job_finished_409(client: TestClient, alice: Account, session: Session, storage: Storage) -> None:
    job = factories.make_job(session, storage, alice.user, job_state=JobState.SUCCEEDED)
    response = client.post(f"/v1/jobs/{job.id}/cancel", headers=alice.headers)
    assert response.status_code == 409 and _error(response)["code"] == "job_finished"


def test_delete_job_finished_removes_everything(
    client: TestClient, alice: Account, session: Session, storage: Storage
) -> None:
    job = factories.make_job(session, storage, alice.user, job_state=JobState.SUCCEEDED)
    factories.make_artifact(session, storage, job)
    storage.put_bytes(f"jobs/{job.id}/checkpoints/epoch-1.pt", b"ckpt")
    assert client.delete(f"/v1/jobs/{job.id}", headers=alice.headers).status_code == 204
    assert client.get(f"/v1/jobs/{job.id}", headers=alice.headers).status_code == 404
    assert storage.list(f"jobs/{job.id}/") == []


def test_delete_job_running_409(client: TestClient, alice: Account, session: Session, storage: Storage) -> None:
    job = factories.make_job(session, storage, alice.user, job_state=JobState.RUNNING)
    response = client.delete(f"/v1/jobs/{job.id}", headers=alice.headers)
    assert response.status_code == 409 and _error(response)["code"] == "job_not_finished"


def test_create_job_user_row_unchanged(session: Session, alice: Account) -> None:
    # The concurrency check locks the user's row; it must not write to it.
    assert session.get_one(User, alice.user.id).name == "alice"
