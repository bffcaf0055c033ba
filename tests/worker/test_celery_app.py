"""The Celery app's settings for long jobs, per broker, and the worker's own settings."""

from __future__ import annotations

from pathlib import Path

import pytest
from kombu.transport.sqlalchemy import Transport as SqlTransport
from pydantic import ValidationError

from service.queue import TASK_NAME, transport_options
from service.settings import Settings
from worker.celery_app import create_celery_app
from worker.threads import job_threads


def test_celery_app_is_set_up_for_long_jobs(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, broker_url="redis://127.0.0.1:6379/3", soft_shutdown_seconds=45)
    conf = create_celery_app(settings).conf

    assert (conf.task_serializer, conf.accept_content) == ("json", ["json"])
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert conf.worker_max_tasks_per_child == 1
    assert conf.worker_cancel_long_running_tasks_on_connection_loss
    assert conf.worker_soft_shutdown_timeout == 45
    assert conf.result_backend is None and conf.task_ignore_result
    # Longer than any job, or Redis would hand a running task to a second worker.
    assert conf.broker_transport_options["visibility_timeout"] == 7 * 24 * 3600


def test_celery_app_registers_the_task_by_name(tmp_path: Path) -> None:
    app = create_celery_app(Settings(data_dir=tmp_path))
    app.loader.import_default_modules()
    task = app.tasks[TASK_NAME]
    assert task.acks_late and task.reject_on_worker_lost


def test_sqlite_broker_gets_engine_arguments_only_and_a_class_polling_interval(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, broker_polling_seconds=0.15)
    options = create_celery_app(settings).conf.broker_transport_options

    # kombu passes these to create_engine: a polling_interval or visibility_timeout there crashes it.
    assert set(options) == {"connect_args"}
    assert SqlTransport.polling_interval == 0.15
    assert transport_options(settings) == options


def test_worker_settings_refuse_a_heartbeat_too_slow_for_the_lease() -> None:
    with pytest.raises(ValidationError, match="heartbeat_seconds"):
        Settings(lease_seconds=30, heartbeat_seconds=15)


def test_worker_settings_default_lease_lets_a_dead_worker_be_replaced_within_two_minutes() -> None:
    settings = Settings()
    assert settings.lease_seconds + settings.reaper_interval_seconds * 1.2 < 100  # leaves time to start the job


def test_one_settings_object_carries_the_worker_and_web_fields(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTILLERY_HEARTBEAT_SECONDS", "3")
    monkeypatch.setenv("DISTILLERY_WEB_JOBS_PAGE_SIZE", "7")
    settings = Settings(data_dir=tmp_path, max_attempts=5)
    assert (settings.data_dir, settings.max_attempts) == (tmp_path.resolve(), 5)
    assert (settings.heartbeat_seconds, settings.web_jobs_page_size) == (3.0, 7)
    assert settings.broker_url == f"sqla+sqlite:///{tmp_path.resolve() / 'broker.sqlite'}"


def test_job_threads_leave_a_core_for_the_service(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(16)))
    assert job_threads(Settings(), concurrency=1) == 15
    assert job_threads(Settings(), concurrency=4) == 3
    assert job_threads(Settings(worker_threads=2), concurrency=4) == 2
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: {0})
    assert job_threads(Settings(), concurrency=2) == 1
