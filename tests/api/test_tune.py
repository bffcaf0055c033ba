"""Tuned jobs over HTTP: the spec's tune block validated by field, the search shown on the parent, limits, cancel."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service import state, tuning
from service.models import File, FilePurpose, Job, JobState
from service.settings import Settings
from service.storage import Storage
from tests.api import factories
from tests.api.conftest import Account

GRID = {"method.temperature": [2, 4, 8], "method.alpha": [0.5, 0.9]}


@pytest.fixture
def spec(session: Session, storage: Storage, alice: Account) -> dict[str, Any]:
    teacher = factories.make_file(session, storage, alice.user, FilePurpose.TEACHER)
    train = factories.make_file(session, storage, alice.user, FilePurpose.DATASET)
    return factories.spec_for(teacher, train)


def _tuned(spec: dict[str, Any], **tune: Any) -> dict[str, Any]:
    return {**spec, "tune": {"trials": 6, "space": GRID, **tune}}


def _start_search(session: Session, settings: Settings, job_id: str) -> list[Job]:
    """What the preparing worker does once the inputs are checked: hand the parent to its search."""
    assert state.claim(session, job_id, "host:1", lease_seconds=60)
    assert tuning.start_search(session=session, settings=settings, parent_id=job_id, worker_id="host:1",
                               teacher_cache_key=None) is not None
    session.commit()
    return tuning.trials_of(session, job_id)


@pytest.mark.parametrize(("space", "field", "reason"), [
    ({"method.temprature": [1, 2]}, "tune.space.method.temprature", "does not exist"),
    ({"method.alpha": ["high"]}, "tune.space.method.alpha", "valid number"),
    ({"method.alpha": [0.5, 1.5]}, "tune.space.method.alpha", "less than or equal to 1"),
    ({"student.arch_args.depth": [8]}, "tune.space.student.arch_args.depth", "Extra inputs"),
    ({"teacher.file": ["file_x"]}, "tune.space.teacher.file", "must not change"),
    ({"optim.lr": {"low": 0.1, "high": 0.01}}, "tune.space.optim.lr", "high must be at least low"),
])
def test_create_tuned_job_bad_space_422_names_the_path(client: TestClient, alice: Account, spec: dict[str, Any],
                                                        space: dict[str, Any], field: str, reason: str) -> None:
    response = client.post("/v1/jobs", headers=alice.headers, json=_tuned(spec, space=space))
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == field and reason in error["message"], error


def test_create_tuned_job_without_a_validation_split_422(client: TestClient, alice: Account,
                                                         spec: dict[str, Any]) -> None:
    tuned = _tuned({**spec, "data": {**spec["data"], "val_fraction": 0.0}})
    response = client.post("/v1/jobs", headers=alice.headers, json=tuned)
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "data.val_fraction"


def test_tuned_job_lists_its_trials_and_they_count_against_the_limit(
    client: TestClient, alice: Account, spec: dict[str, Any], session: Session, settings: Settings
) -> None:
    created = client.post("/v1/jobs", headers=alice.headers, json=_tuned(spec))
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]
    prepared = client.get(f"/v1/jobs/{job_id}", headers=alice.headers).json()
    assert prepared["search"] == {**prepared["search"], "phase": "prepare", "trials": []}

    trials = _start_search(session, settings, job_id)

    assert len(trials) == settings.max_concurrent_jobs - 1  # the parent and its trials fill the limit of 3
    body = client.get(f"/v1/jobs/{job_id}", headers=alice.headers).json()
    assert (body["state"], body["stage"], body["search"]["phase"]) == ("running", "search", "search")
    listed = body["search"]["trials"]
    assert [t["job_id"] for t in listed] == [t.id for t in trials]
    assert listed[0]["params"] == {"method.temperature": 4.0, "method.alpha": 0.9}  # the spec's own first
    assert all(t["state"] == "queued" and t["value"] is None and t["pruned"] is False for t in listed)
    trial = client.get(f"/v1/jobs/{trials[1].id}", headers=alice.headers).json()
    assert trial["parent_id"] == job_id and trial["trial"]["number"] == 1
    assert trial["spec"]["tune"] is None and trial["spec"]["stages"]["baseline"] is False

    refused = client.post("/v1/jobs", headers=alice.headers, json=spec)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_jobs"


def test_tuned_job_needs_room_for_a_trial(client: TestClient, alice: Account, spec: dict[str, Any]) -> None:
    for _ in range(2):
        assert client.post("/v1/jobs", headers=alice.headers, json=spec).status_code == 201

    response = client.post("/v1/jobs", headers=alice.headers, json=_tuned(spec))

    assert response.status_code == 429 and "needs room for itself and a trial" in response.json()["error"]["message"]


def test_cancel_tuned_job_cancels_its_trials(client: TestClient, alice: Account, spec: dict[str, Any],
                                             session: Session, settings: Settings) -> None:
    job_id = client.post("/v1/jobs", headers=alice.headers, json=_tuned(spec)).json()["id"]
    trials = _start_search(session, settings, job_id)
    assert state.claim(session, trials[0].id, "host:2", lease_seconds=60)  # one trial running
    session.commit()

    response = client.post(f"/v1/jobs/{job_id}/cancel", headers=alice.headers)

    assert response.status_code == 200 and response.json()["state"] == "cancelled"
    session.expire_all()
    running, queued = (session.get_one(Job, t.id) for t in trials)
    assert running.state == JobState.RUNNING and running.cancel_requested  # stops at its next step
    assert queued.state == JobState.CANCELLED
    with session.begin_nested():
        assert tuning.advance(session=session, settings=settings, parent_id=job_id).to_enqueue == []


def test_delete_tuned_job_removes_its_trials(client: TestClient, alice: Account, spec: dict[str, Any],
                                             session: Session, settings: Settings, storage: Storage) -> None:
    job_id = client.post("/v1/jobs", headers=alice.headers, json=_tuned(spec)).json()["id"]
    trial_ids = [t.id for t in _start_search(session, settings, job_id)]
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=alice.headers).status_code == 200

    assert client.delete(f"/v1/jobs/{job_id}", headers=alice.headers).status_code == 204

    session.expunge_all()
    assert session.scalar(select(func.count()).select_from(Job).where(Job.id.in_(trial_ids))) == 0
    assert session.get(File, spec["teacher"]["file"]) is not None


def test_tpe_search_asks_fresh_settings_within_the_ranges(
    client: TestClient, alice: Account, spec: dict[str, Any], session: Session, settings: Settings
) -> None:
    space = {"optim.lr": {"low": 1e-4, "high": 1e-1, "log": True}, "method.temperature": {"low": 1, "high": 8}}
    job_id = client.post("/v1/jobs", headers=alice.headers,
                         json=_tuned(spec, space=space, trials=5, parallel=1, prune=False)).json()["id"]
    trials = _start_search(session, settings, job_id)
    for number in range(5):
        assert len(trials) == number + 1
        latest = trials[-1]
        assert state.claim(session, latest.id, "host:3", lease_seconds=60)
        # A trial that reports better validation accuracy the smaller its learning rate.
        value = 1.0 - latest.trial["params"]["optim.lr"]
        assert not tuning.should_prune(session=session, job_id=latest.id, worker_id="host:3", step=1, value=value)
        state.finish(session, latest.id, "host:3", state=JobState.SUCCEEDED)
        tuning.advance(session=session, settings=settings, parent_id=job_id)
        session.commit()
        trials = tuning.trials_of(session, job_id)

    params = [t.trial["params"] for t in trials]
    assert params[0] == {"optim.lr": 0.003, "method.temperature": 4.0}  # the spec's own (default) settings
    assert all(1e-4 <= p["optim.lr"] <= 1e-1 and p["method.temperature"] in range(1, 9) for p in params[1:])
    assert len({tuple(p.values()) for p in params}) == 5  # TPE never asked the same twice
    parent = session.get_one(Job, job_id)
    session.refresh(parent)
    best = min(params, key=lambda p: p["optim.lr"])
    assert parent.state == JobState.QUEUED and parent.tune["best"] == best
