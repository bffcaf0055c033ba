"""worker.reaper: expired leases and lost messages, on a real database and real brokers."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest

from service import state
from service.db import session_scope
from service.keys import checkpoint_prefix
from service.models import JobState
from service.queue import enqueue_job, queue_sizes
from tests.worker.conftest import Service, fast_settings
from tests.worker.support import redis_database
from worker.reaper import Reaper, reap_once


def _reap(service: Service, *, waiting: int = 0, requeue_after_s: float = 3600) -> list[tuple[str, str]]:
    sent: list[tuple[str, str]] = []
    reap_once(
        service.session_factory,
        requeue_after=timedelta(seconds=requeue_after_s),
        send=lambda job_id, queue: sent.append((job_id, queue)),
        sizes=lambda queues: dict.fromkeys(queues, waiting),
    )
    return sent


def _claim_and_let_lapse(service: Service, job_id: str) -> None:
    with session_scope(service.session_factory) as session:
        assert state.claim(session, job_id, "dead-worker", lease_seconds=5)
        assert state.renew_lease(session, job_id, "dead-worker", lease_seconds=-1)


def test_reap_once_requeues_an_expired_lease_and_sends_it(sqlite_service: Service) -> None:
    job_id = sqlite_service.submit()
    _claim_and_let_lapse(sqlite_service, job_id)

    # Even with messages waiting: the dead run consumed this job's message, so it needs a new one.
    assert _reap(sqlite_service, waiting=5) == [(job_id, "default")]

    job = sqlite_service.job(job_id)
    assert (job.state, job.worker_id, job.attempts) == (JobState.QUEUED, None, 1)
    assert job.enqueued_at is not None


def test_reap_once_fails_a_job_out_of_attempts_as_worker_lost(sqlite_service: Service) -> None:
    job_id = sqlite_service.submit()
    for _attempt in range(sqlite_service.settings.max_attempts):
        _claim_and_let_lapse(sqlite_service, job_id)
        _reap(sqlite_service)

    job = sqlite_service.job(job_id)
    assert (job.state, job.error_code) == (JobState.FAILED, "worker_lost")


def test_reaper_removes_the_checkpoints_of_jobs_it_ends(sqlite_service: Service) -> None:
    service = sqlite_service
    cancelled_id, requeued_id = service.submit(), service.submit()
    for job_id in (cancelled_id, requeued_id):
        service.storage.put_bytes(checkpoint_prefix(job_id) + "checkpoint.pt", b"weights")
        _claim_and_let_lapse(service, job_id)
    with session_scope(service.session_factory) as session:
        state.request_cancel(session, cancelled_id)

    report = Reaper(service.settings).run_once()

    assert (report.ended, report.requeued) == ([cancelled_id], [requeued_id])
    assert service.job(cancelled_id).state == JobState.CANCELLED
    assert service.storage.list(checkpoint_prefix(cancelled_id)) == []
    # a requeued job resumes from its checkpoint, so that one stays
    assert service.storage.list(checkpoint_prefix(requeued_id)) == [checkpoint_prefix(requeued_id) + "checkpoint.pt"]


def test_reap_once_resends_stale_jobs_only_while_their_queue_is_short(sqlite_service: Service) -> None:
    first, second = sqlite_service.submit(), sqlite_service.submit()
    time.sleep(0.05)

    assert _reap(sqlite_service, waiting=2, requeue_after_s=0.01) == []  # both messages still wait
    assert _reap(sqlite_service, waiting=1, requeue_after_s=0.01) == [(first, "default")]  # oldest first
    time.sleep(0.05)
    # Longest unsent first: the second job, then the first (sent again a moment ago).
    assert _reap(sqlite_service, waiting=0, requeue_after_s=0.01) == [(second, "default"), (first, "default")]
    assert _reap(sqlite_service, waiting=0, requeue_after_s=3600) == []  # just sent: not stale yet


def test_queue_sizes_counts_waiting_messages_in_the_embedded_broker(tmp_path: Path) -> None:
    settings = fast_settings(data_dir=tmp_path)
    assert settings.broker_url.startswith("sqla+sqlite:///")
    for job_id in ("job_a", "job_b"):
        enqueue_job(job_id, settings=settings, queue="default")
    assert queue_sizes(settings, ["default", "cpu"]) == {"default": 2, "cpu": 0}


def test_queue_sizes_counts_waiting_messages_in_redis(tmp_path: Path) -> None:
    with redis_database() as url:
        settings = fast_settings(data_dir=tmp_path, broker_url=url)
        assert queue_sizes(settings, ["default"]) == {"default": 0}  # Redis forgets empty queues
        for job_id in ("job_a", "job_b", "job_c"):
            enqueue_job(job_id, settings=settings, queue="cpu")
        assert queue_sizes(settings, ["default", "cpu"]) == {"default": 0, "cpu": 3}


def test_reaper_thread_outlives_a_database_outage(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = fast_settings(
        data_dir=tmp_path, database_url="postgresql+psycopg://postgres@127.0.0.1:1/nowhere", reaper_interval_seconds=0.2
    )
    reaper = Reaper(settings)
    thread = threading.Thread(target=reaper.run_forever, daemon=True)
    thread.start()
    try:
        time.sleep(3.0)
        assert thread.is_alive()
    finally:
        reaper.stop()
        thread.join(timeout=10)
    assert not thread.is_alive()
    assert any("reaper pass failed" in record.getMessage() for record in caplog.records)
