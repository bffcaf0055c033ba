"""Send a job to the workers: the one point where the API talks to the queue.

Deliberately tiny: a bare Celery app per broker URL that only *sends* the task by name, so the
API never imports the worker's task code (nor torch). The database row is the truth; a message
lost here is re-sent by the worker's reaper, so callers log a failure and carry on.
"""

from __future__ import annotations

import json
import threading
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from worker.broker import broker_kind, transport_options

if TYPE_CHECKING:
    from celery import Celery

    from api.settings import Settings

TASK_NAME = "distillery.run_job"
# Fail fast: the caller has already committed the job and only logs a failed send.
_RETRY_POLICY = {"max_retries": 2, "interval_start": 0.0, "interval_step": 0.2, "interval_max": 0.5}
_lock = threading.Lock()


def enqueue_job(job_id: str, *, settings: Settings, queue: str) -> None:
    """Publish `distillery.run_job(job_id)` on `queue`; raises when the broker cannot be reached."""
    app = sender_app(settings)
    app.send_task(TASK_NAME, args=[job_id], queue=queue, retry=True, retry_policy=_RETRY_POLICY)


def queue_sizes(settings: Settings, queues: list[str]) -> dict[str, int]:
    """Messages waiting in each queue (not counting those a worker holds); raises if the broker is down.

    The reaper compares them with the queued jobs to tell a lost message from one still waiting.
    """
    from kombu.exceptions import ChannelError

    sizes = {}
    with sender_app(settings).connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, timeout=5)
        channel = connection.default_channel
        for queue in queues:
            try:
                sizes[queue] = int(channel.queue_declare(queue=queue, passive=True).message_count)
            except ChannelError:  # Redis forgets an empty queue: nothing waits in it
                sizes[queue] = 0
    return sizes


def sender_app(settings: Settings) -> Celery:
    options = transport_options(settings)
    with _lock:  # Celery app creation is not thread-safe, and views run in a thread pool
        return _sender_app(settings.broker_url, json.dumps(options, sort_keys=True))


@lru_cache(maxsize=8)
def _sender_app(broker_url: str, options_json: str) -> Celery:
    from celery import Celery

    app = Celery("distillery-enqueue", broker=broker_url, set_as_current=False)
    options: dict[str, Any] = json.loads(options_json)
    if broker_kind(broker_url) == "redis":
        options["socket_timeout"] = 5  # a sender never blocks on a read
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        broker_connection_timeout=2,
        broker_transport_options=options,
    )
    return app
