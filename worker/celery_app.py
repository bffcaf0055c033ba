"""The workers' Celery app, configured for long GPU jobs whose truth lives in the database.

No result backend: the job's row says how it went. Late acks with prefetch 1, so a message is
taken only by a process that is free to run it and is settled when the run ends; a fresh child
per task, so a job's memory, CUDA context and threads die with it. The parent never touches CUDA.
"""

from __future__ import annotations

from typing import Any

from celery import Celery, signals

from service.queue import TASK_NAME, broker_kind, set_polling_interval, transport_options
from service.settings import Settings, get_settings
from worker.process import mark_pool_child


def celery_config(settings: Settings) -> dict[str, Any]:
    redis = broker_kind(settings.broker_url) == "redis"
    return {
        "broker_url": settings.broker_url,
        "broker_transport_options": transport_options(
            settings, visibility_timeout_s=settings.visibility_timeout_seconds
        ),
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,  # a broker restart must not end the worker
        "result_backend": None,
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_default_queue": "default",
        "task_queues": None,  # declared from task_default_queue and the worker's -Q
        "task_create_missing_queues": True,
        "task_routes": {TASK_NAME: {"queue": "default"}},
        "worker_prefetch_multiplier": 1,
        "worker_max_tasks_per_child": 1,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "worker_soft_shutdown_timeout": settings.soft_shutdown_seconds,
        "worker_enable_soft_shutdown_on_idle": False,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        # Remote control, events and mingle need fanout exchanges, which the SQLite broker lacks;
        # nothing here needs them (cancellation is a database flag).
        "worker_enable_remote_control": redis,
        "worker_send_task_events": False,
        "worker_deduplicate_successful_tasks": False,
    }


def create_celery_app(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    set_polling_interval(settings, settings.broker_polling_seconds)
    app = Celery("distillery", set_as_current=True)
    app.conf.update(celery_config(settings))
    # The task module is light (no torch); the runner is imported in the child that runs a job.
    app.conf.include = ["worker.tasks"]
    signals.worker_process_init.connect(_pool_child_started, weak=False)
    return app


def _pool_child_started(**_kwargs: Any) -> None:
    mark_pool_child()


def __getattr__(name: str) -> Any:
    # `celery -A worker.celery_app worker` works too; the app is built when asked for.
    if name == "app":
        return create_celery_app()
    raise AttributeError(name)
