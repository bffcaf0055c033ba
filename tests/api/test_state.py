"""Job state transitions: conditional updates, refused when illegal, each with its event."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from service import state
from service.models import Job, JobEvent, JobState, utcnow
from service.state import IllegalTransitionError
from service.storage import Storage
from tests.api import factories
from tests.api.conftest import Db


@pytest.fixture
def db_session(any_db: Db) -> Session:
    return any_db.session_factory()


@pytest.fixture
def job(db_session: Session, tmp_path) -> Job:  # type: ignore[no-untyped-def]
    storage = Storage(f"file://{tmp_path / 'store'}")
    owner, _ = factories.make_user(db_session, "owner")
    return factories.make_job(db_session, storage, owner)


def _kinds(session: Session, job_id: str) -> list[tuple[str, dict]]:  # type: ignore[type-arg]
    rows = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id))
    return [(row.kind, row.data) for row in rows]


def _reload(session: Session, job: Job) -> Job:
    session.expire_all()
    return session.get_one(Job, job.id)


def test_claim_job_queued_becomes_running(db_session: Session, job: Job) -> None:
    assert state.claim(db_session, job.id, "w1", lease_seconds=30)
    db_session.commit()
    job = _reload(db_session, job)
    assert (job.state, job.worker_id, job.attempts) == ("running", "w1", 1)
    assert job.lease_expires_at is not None and job.lease_expires_at > utcnow()
    assert job.started_at is not None
    assert _kinds(db_session, job.id)[-1] == ("state", {"state": "running", "attempt": 1, "worker_id": "w1"})


def test_claim_job_twice_second_refused(db_session: Session, job: Job) -> None:
    assert state.claim(db_session, job.id, "w1", lease_seconds=30)
    assert not state.claim(db_session, job.id, "w2", lease_seconds=30)
    db_session.commit()
    assert _reload(db_session, job).worker_id == "w1"


def test_claim_job_cancel_requested_refused(db_session: Session, job: Job) -> None:
    state.request_cancel(db_session, job.id)
    assert not state.claim(db_session, job.id, "w1", lease_seconds=30)


def test_renew_lease_only_by_holder(db_session: Session, job: Job) -> None:
    state.claim(db_session, job.id, "w1", lease_seconds=30)
    later = utcnow() + timedelta(seconds=20)
    assert state.renew_lease(db_session, job.id, "w1", lease_seconds=30, now=later)
    assert not state.renew_lease(db_session, job.id, "w2", lease_seconds=30)
    db_session.commit()
    assert _reload(db_session, job).lease_expires_at == later + timedelta(seconds=30)


def test_record_progress_stores_and_logs(db_session: Session, job: Job) -> None:
    state.claim(db_session, job.id, "w1", lease_seconds=30)
    progress = {"fraction": 0.25, "epoch": 1, "epochs": 4, "eta_s": 12.5, "junk": 1}
    assert state.record_progress(
        db_session, job.id, "w1", stage="distill", progress=progress, metrics={"distill": {"val_accuracy": 0.9}}
    )
    assert state.record_progress(db_session, job.id, "w1", metrics={"baseline": {"val_accuracy": 0.8}})
    assert not state.record_progress(db_session, job.id, "w2", progress={"fraction": 0.5})
    db_session.commit()
    job = _reload(db_session, job)
    assert job.stage == "distill"
    assert job.progress == {"fraction": 0.25, "epoch": 1, "epochs": 4, "eta_s": 12.5}
    assert job.metrics == {"distill": {"val_accuracy": 0.9}, "baseline": {"val_accuracy": 0.8}}
    assert [kind for kind, _ in _kinds(db_session, job.id)][-2:] == ["progress", "progress"]


def test_finish_job_succeeded(db_session: Session, job: Job) -> None:
    state.claim(db_session, job.id, "w1", lease_seconds=30)
    state.finish(db_session, job.id, "w1", state=JobState.SUCCEEDED, now=utcnow() + timedelta(seconds=3))
    db_session.commit()
    job = _reload(db_session, job)
    assert job.state == "succeeded" and job.finished_at is not None and job.lease_expires_at is None
    assert job.progress["fraction"] == 1.0
    assert job.duration_s is not None and job.duration_s >= 3


def test_finish_job_failed_records_error(db_session: Session, job: Job) -> None:
    state.claim(db_session, job.id, "w1", lease_seconds=30)
    state.finish(db_session, job.id, "w1", state=JobState.FAILED, error_code="diverged", error_message="NaN loss")
    db_session.commit()
    job = _reload(db_session, job)
    assert (job.state, job.error_code, job.error_message) == ("failed", "diverged", "NaN loss")
    assert _kinds(db_session, job.id)[-1][1]["error"] == {"code": "diverged", "message": "NaN loss"}


def test_finish_job_not_holder_refused(db_session: Session, job: Job) -> None:
    state.claim(db_session, job.id, "w1", lease_seconds=30)
    with pytest.raises(IllegalTransitionError, match="running"):
        state.finish(db_session, job.id, "w2", state=JobState.SUCCEEDED)


def test_finish_job_queued_refused(db_session: Session, job: Job) -> None:
    with pytest.raises(IllegalTransitionError, match="it is queued"):
        state.finish(db_session, job.id, "w1", state=JobState.SUCCEEDED)


def test_finish_job_failed_without_code_refused(db_session: Session, job: Job) -> None:
    state.claim(db_session, job.id, "w1", lease_seconds=30)
    with pytest.raises(ValueError, match="error_code"):
        state.finish(db_session, job.id, "w1", state=JobState.FAILED)


def test_request_cancel_queued_cancels_at_once(db_session: Session, job: Job) -> None:
    assert state.request_cancel(db_session, job.id) == JobState.CANCELLED
    db_session.commit()
    assert _reload(db_session, job).state == "cancelled"


def test_request_cancel_running_sets_flag(db_session: Session, job: Job) -> None:
    state.claim(db_session, job.id, "w1", lease_seconds=30)
    assert state.request_cancel(db_session, job.id) == JobState.RUNNING
    assert state.request_cancel(db_session, job.id) == JobState.RUNNING  # asking twice is fine
    assert state.is_cancel_requested(db_session, job.id)
    state.finish(db_session, job.id, "w1", state=JobState.CANCELLED)
    db_session.commit()
    assert _reload(db_session, job).state == "cancelled"
    assert [kind for kind, _ in _kinds(db_session, job.id)].count("cancel_requested") == 1


def test_request_cancel_finished_refused(db_session: Session, job: Job) -> None:
    state.claim(db_session, job.id, "w1", lease_seconds=30)
    state.finish(db_session, job.id, "w1", state=JobState.SUCCEEDED)
    with pytest.raises(IllegalTransitionError) as caught:
        state.request_cancel(db_session, job.id)
    assert caught.value.code == "job_finished"


def test_requeue_expired_requeues_then_fails_after_max_attempts(db_session: Session, job: Job) -> None:
    job.max_attempts = 2
    db_session.commit()
    now = utcnow()
    for attempt in (1, 2):
        assert state.claim(db_session, job.id, f"w{attempt}", lease_seconds=10, now=now)
        assert state.requeue_expired(db_session, now=now + timedelta(seconds=5)) == state.ExpiredLeases()
        expired = state.requeue_expired(db_session, now=now + timedelta(seconds=11))
        db_session.commit()
        if attempt == 1:
            assert (expired.requeued, expired.ended) == ([job.id], [])
            assert _reload(db_session, job).state == "queued"
        else:
            assert (expired.requeued, expired.ended) == ([], [job.id])
    job = _reload(db_session, job)
    assert (job.state, job.error_code, job.attempts) == ("failed", "worker_lost", 2)


def test_requeue_expired_cancel_requested_becomes_cancelled(db_session: Session, job: Job) -> None:
    now = utcnow()
    state.claim(db_session, job.id, "w1", lease_seconds=10, now=now)
    state.request_cancel(db_session, job.id)
    assert state.requeue_expired(db_session, now=now + timedelta(seconds=11)) == state.ExpiredLeases(ended=[job.id])
    db_session.commit()
    assert _reload(db_session, job).state == "cancelled"


def test_requeue_expired_renewed_lease_kept(db_session: Session, job: Job) -> None:
    now = utcnow()
    state.claim(db_session, job.id, "w1", lease_seconds=10, now=now)
    state.renew_lease(db_session, job.id, "w1", lease_seconds=10, now=now + timedelta(seconds=8))
    assert state.requeue_expired(db_session, now=now + timedelta(seconds=11)) == state.ExpiredLeases()
    assert _reload(db_session, job).state == "running"


def test_stale_queued_and_mark_enqueued(db_session: Session, job: Job) -> None:
    later = utcnow() + timedelta(minutes=10)
    assert state.stale_queued(db_session, older_than=timedelta(minutes=5), now=later) == [job.id]
    state.mark_enqueued(db_session, [job.id], now=later)
    assert state.stale_queued(db_session, older_than=timedelta(minutes=5), now=later) == []


def test_events_ids_increase_in_order(db_session: Session, job: Job) -> None:
    state.claim(db_session, job.id, "w1", lease_seconds=30)
    state.record_progress(db_session, job.id, "w1", progress={"fraction": 0.5})
    state.append_event(db_session, job.id, "log", {"line": "epoch 1 done"})
    db_session.commit()
    ids = list(db_session.scalars(select(JobEvent.id).where(JobEvent.job_id == job.id).order_by(JobEvent.id)))
    assert ids == sorted(ids) and len(set(ids)) == 4
    assert [kind for kind, _ in _kinds(db_session, job.id)] == ["state", "state", "progress", "log"]


@pytest.mark.parametrize(("refund", "attempts_after"), [(True, 0), (False, 1)])
def test_hand_back_ends_the_lease_and_refunds_only_a_stop(
    db_session: Session, job: Job, refund: bool, attempts_after: int
) -> None:
    assert state.claim(db_session, job.id, "w1", lease_seconds=300)
    assert not state.hand_back(db_session, job.id, "w2", refund_attempt=refund)  # not w2's to give back
    assert state.hand_back(db_session, job.id, "w1", refund_attempt=refund)
    db_session.commit()
    job = _reload(db_session, job)
    assert (job.state, job.attempts) == ("running", attempts_after)
    assert job.lease_expires_at is not None and job.lease_expires_at <= utcnow()
    # the reaper's next pass requeues it
    assert state.requeue_expired(db_session, now=utcnow() + timedelta(seconds=1)).requeued == [job.id]
    db_session.commit()
    assert _reload(db_session, job).state == "queued"
