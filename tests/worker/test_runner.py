"""worker.runner against real databases, storage and the real engine, in this process."""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from service import state
from service.db import session_scope
from service.keys import checkpoint_prefix
from service.models import Artifact, Job, JobState, utcnow
from service.storage import Storage
from tests.worker.conftest import Service
from tests.worker.support import claimed_accuracy, onnx_accuracy, torchscript_accuracy
from worker.job_run import Outcome
from worker.reaper import reap_once
from worker.runner import run

LONG_EPOCHS = 400  # far more than a test waits for: the job is stopped long before its end


def _wait_for(condition: Callable[[], Any], *, timeout: float = 60.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _distill_epoch(service: Service, job_id: str) -> int:
    job = service.job(job_id)
    return int(job.progress.get("epoch") or 0) if job.stage == "distill" else 0


def _run_in_thread(service: Service, job_id: str) -> tuple[threading.Thread, list[Outcome]]:
    outcomes: list[Outcome] = []
    thread = threading.Thread(target=lambda: outcomes.append(run(job_id, service.settings)), daemon=True)
    thread.start()
    return thread, outcomes


def _reap(service: Service) -> list[tuple[str, str]]:
    sent: list[tuple[str, str]] = []
    reap_once(
        service.session_factory,
        requeue_after=timedelta(seconds=3600),
        send=lambda job_id, queue: sent.append((job_id, queue)),
        sizes=lambda queues: dict.fromkeys(queues, 0),
    )
    return sent


def _checkpoints(service: Service, job_id: str) -> list[str]:
    return service.storage.list(checkpoint_prefix(job_id))


def test_run_job_succeeds_records_artifacts_and_metrics(service: Service, tmp_path_factory) -> None:
    job_id = service.submit(epochs=3)

    assert run(job_id, service.settings) == Outcome.SUCCEEDED

    job = service.job(job_id)
    assert (job.state, job.attempts, job.error_code) == (JobState.SUCCEEDED, 1, None)
    assert job.progress["fraction"] == 1.0
    assert job.metrics["student"]["accuracy"] > 0.9
    assert "student_confusion" not in job.metrics  # kept in metrics.json only
    with service.session_factory() as session:
        artifacts = {row.name: row for row in session.scalars(select(Artifact).where(Artifact.job_id == job_id))}
    expected = {"student.safetensors", "student.ts", "student.onnx", "metrics.json", "history.csv", "curves.png",
                "report.md"}
    assert expected <= set(artifacts)
    assert any(name.startswith("tensorboard/events.out.tfevents.") for name in artifacts)
    for name, row in artifacts.items():
        body = b"".join(service.storage.iter_chunks(row.storage_key))
        assert (len(body), hashlib.sha256(body).hexdigest()) == (row.size, row.sha256), name
        assert row.storage_key == f"jobs/{job_id}/artifacts/attempt-1/{name}"
    assert _checkpoints(service, job_id) == []

    folder = tmp_path_factory.mktemp("downloads")
    for name in ("student.onnx", "student.ts", "metrics.json"):
        (folder / name).write_bytes(b"".join(service.storage.iter_chunks(artifacts[name].storage_key)))
    report = b"".join(service.storage.iter_chunks(artifacts["report.md"].storage_key)).decode()
    data_line = report.split("## Data", 1)[1].strip().splitlines()[0]
    assert "blobs.npz" in data_line and "train.npz" not in data_line  # the user's file, by its own name
    claimed = claimed_accuracy((folder / "metrics.json").read_bytes())
    assert claimed == job.metrics["student"]["accuracy"]
    assert onnx_accuracy(folder / "student.onnx", service.job_files.data) == pytest.approx(claimed)
    assert torchscript_accuracy(folder / "student.ts", service.job_files.data) == pytest.approx(claimed)

    kinds = [(event.kind, event.data.get("state")) for event in service.events(job_id)]
    assert kinds[0] == ("state", "queued") and kinds[1] == ("state", "running")
    assert kinds[-1] == ("state", "succeeded")
    assert sum(kind == "progress" for kind, _ in kinds) >= 3  # at least every epoch end


def test_run_job_duplicate_delivery_does_nothing(pg_service: Service) -> None:
    job_id = pg_service.submit()
    with session_scope(pg_service.session_factory) as session:
        assert state.claim(session, job_id, "other-worker", lease_seconds=60)

    assert run(job_id, pg_service.settings) == Outcome.SKIPPED

    job = pg_service.job(job_id)
    assert (job.state, job.worker_id, job.attempts) == (JobState.RUNNING, "other-worker", 1)


def test_run_job_cancelled_before_start_is_skipped(pg_service: Service) -> None:
    job_id = pg_service.submit()
    with session_scope(pg_service.session_factory) as session:
        assert state.request_cancel(session, job_id) == JobState.CANCELLED

    assert run(job_id, pg_service.settings) == Outcome.SKIPPED
    assert (pg_service.job(job_id).state, pg_service.job(job_id).attempts) == (JobState.CANCELLED, 0)


def test_run_job_teacher_not_matching_its_arch_fails_permanently(pg_service: Service) -> None:
    # The API's cheap sniff cannot see this; the worker's deep check (load the teacher) can.
    job_id = pg_service.submit(teacher={"file": pg_service.teacher.id, "arch": "mlp", "arch_args": {"hidden": [32]}})

    assert run(job_id, pg_service.settings) == Outcome.FAILED

    job = pg_service.job(job_id)
    assert job.state == JobState.FAILED
    assert job.error_code in ("bad_input", "teacher_data_mismatch")
    assert job.error_message
    assert job.attempts == 1
    assert _reap(pg_service) == []  # a permanent failure is never retried


def test_run_job_input_missing_from_storage_fails_with_input_missing(pg_service: Service) -> None:
    job_id = pg_service.submit()
    pg_service.storage.delete(pg_service.teacher.storage_key)

    assert run(job_id, pg_service.settings) == Outcome.FAILED

    job = pg_service.job(job_id)
    assert (job.state, job.error_code, job.attempts) == (JobState.FAILED, "input_missing", 1)
    assert "teacher.file" in (job.error_message or "")


def test_run_job_storage_hiccup_is_retried_then_fails(sqlite_service: Service,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    service = sqlite_service  # max_attempts is 2 in these tests
    job_id = service.submit()

    def unreachable(self: Storage, key: str, path: Any) -> None:
        raise ConnectionResetError("connection reset by peer")

    monkeypatch.setattr(Storage, "get_file", unreachable)
    assert run(job_id, service.settings) == Outcome.RETRY
    job = service.job(job_id)
    assert job.state == JobState.RUNNING and job.lease_expires_at is not None
    assert job.lease_expires_at <= utcnow()  # handed back: the next reaper pass requeues it
    assert _reap(service) == [(job_id, "default")]
    assert service.job(job_id).state == JobState.QUEUED

    assert run(job_id, service.settings) == Outcome.FAILED
    job = service.job(job_id)
    assert (job.state, job.error_code, job.attempts) == (JobState.FAILED, "storage_unavailable", 2)
    logs = [event.data.get("message", "") for event in service.events(job_id) if event.kind == "log"]
    assert any("attempt 1 failed [storage_unavailable]" in message for message in logs)


def test_run_job_cancelled_while_running_stops_and_removes_checkpoints(pg_service: Service) -> None:
    job_id = pg_service.submit(epochs=LONG_EPOCHS)
    thread, outcomes = _run_in_thread(pg_service, job_id)
    _wait_for(lambda: _distill_epoch(pg_service, job_id) >= 2, what="two epochs")
    assert _checkpoints(pg_service, job_id)  # every epoch end stores one

    with session_scope(pg_service.session_factory) as session:
        assert state.request_cancel(session, job_id) == JobState.RUNNING
    thread.join(timeout=30)

    assert outcomes == [Outcome.CANCELLED]
    job = pg_service.job(job_id)
    assert job.state == JobState.CANCELLED
    assert _distill_epoch(pg_service, job_id) < LONG_EPOCHS
    assert _checkpoints(pg_service, job_id) == []
    with pg_service.session_factory() as session:
        assert session.scalars(select(Artifact).where(Artifact.job_id == job_id)).all() == []


def test_run_job_lost_lease_stops_and_writes_nothing(pg_service: Service) -> None:
    job_id = pg_service.submit(epochs=LONG_EPOCHS)
    thread, outcomes = _run_in_thread(pg_service, job_id)
    _wait_for(lambda: _distill_epoch(pg_service, job_id) >= 2, what="two epochs")

    # What the reaper and a second worker do to a job whose heartbeat they stopped seeing.
    with session_scope(pg_service.session_factory) as session:
        session.execute(update(Job).where(Job.id == job_id).values(worker_id="second-worker"))
    thread.join(timeout=30)

    assert outcomes == [Outcome.LOST]
    job = pg_service.job(job_id)
    assert (job.state, job.worker_id) == (JobState.RUNNING, "second-worker")
    assert not any(event.data.get("state") in ("succeeded", "failed", "cancelled")
                   for event in pg_service.events(job_id))


def test_sigterm_hands_the_job_back_and_the_next_attempt_resumes(pg_service: Service) -> None:
    epochs = 60
    job_id = pg_service.submit(epochs=epochs)
    received: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, _frame: received.append(signum))

    def stop_worker_mid_run() -> None:
        _wait_for(lambda: _distill_epoch(pg_service, job_id) >= 3, what="three epochs")
        os.kill(os.getpid(), signal.SIGTERM)

    killer = threading.Thread(target=stop_worker_mid_run, daemon=True)
    killer.start()
    try:
        outcome = run(job_id, pg_service.settings)  # in the main thread, where signals arrive
    finally:
        killer.join(timeout=60)
        signal.signal(signal.SIGTERM, previous)

    assert outcome == Outcome.STOPPED
    assert received == [signal.SIGTERM]  # passed on to the handler that was there before
    assert _checkpoints(pg_service, job_id)
    assert _reap(pg_service) == [(job_id, "default")]

    # A stopped worker refunds the attempt: shutdowns and deploys do not use up max_attempts.
    assert pg_service.job(job_id).attempts == 0
    assert run(job_id, pg_service.settings) == Outcome.SUCCEEDED
    job = pg_service.job(job_id)
    assert (job.state, job.attempts) == (JobState.SUCCEEDED, 1)
    events = pg_service.events(job_id)
    resumes = [event.data for event in events if event.kind == "resume"]
    assert len(resumes) == 1 and resumes[0]["stage"] == "distill" and resumes[0]["attempt"] == 1
    resumed_after = resumes[0]["epoch"]
    assert 3 <= resumed_after < epochs
    second_run = events[[event.kind for event in events].index("resume"):]
    retrained = [event.data["progress"]["epoch"] for event in second_run
                 if event.kind == "progress" and "training" in (event.data.get("metrics") or {})]
    assert retrained == list(range(resumed_after + 1, epochs + 1))  # only the epochs after the checkpoint


def test_unreadable_checkpoint_starts_the_job_over(pg_service: Service) -> None:
    job_id = pg_service.submit()
    pg_service.storage.put_bytes(checkpoint_prefix(job_id) + "checkpoint.pt", b"not a checkpoint")

    assert run(job_id, pg_service.settings) == Outcome.SUCCEEDED

    logs = [event.data.get("message", "") for event in pg_service.events(job_id) if event.kind == "log"]
    assert any("unusable" in message for message in logs)
    assert _checkpoints(pg_service, job_id) == []
