"""The queue: broker URLs, their transport options, and sending a job to the workers by task name.

The API and the reaper send `distillery.run_job(job_id)` through a bare Celery app that knows
only the task's name, so nothing that enqueues imports the worker's task code (nor torch). The
database row is the truth; a message lost here is re-sent by the worker's reaper, so callers log
a failed send and carry on.

Two kinds of broker, one task code:

* `redis://` (a cluster): a visibility timeout longer than any job, or Redis would hand a long
  task to a second worker while the first still runs it.
* `sqla+sqlite:///<data_dir>/broker.sqlite` (the embedded default): kombu's SQLAlchemy transport
  over a SQLite file, so one machine needs no broker server. Its transport options go straight
  to `create_engine`, so only engine arguments may be put there (a `polling_interval` or a
  `visibility_timeout` there crashes it); the polling interval is set on the transport class.
(kombu's `filesystem://` transport also carries tasks between processes, but its consumers move
message files through the temp folder, a copy that two consumers can both win when the temp folder
is on another filesystem; SQLite's `BEGIN IMMEDIATE` hands each message to exactly one.)

The embedded transport never redelivers the message of a worker that was SIGKILLed, and a Redis
without persistence loses its queue on restart; the database lease and the reaper
(`worker.reaper`) make every one of them safe.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import make_url

if TYPE_CHECKING:
    from celery import Celery

    from service.settings import Settings

TASK_NAME = "distillery.run_job"
SQLITE_BUSY_TIMEOUT_S = 30


def broker_kind(broker_url: str) -> str:
    """redis | sqlalchemy | other."""
    scheme = broker_url.split("://", 1)[0].lower()
    if scheme in ("redis", "rediss", "redis+socket"):
        return "redis"
    if scheme.startswith(("sqla+", "sqlalchemy+")):
        return "sqlalchemy"
    return "other"


def transport_options(settings: Settings, *, visibility_timeout_s: int | None = None) -> dict[str, Any]:
    """The `broker_transport_options` for this broker; the sender and the workers use the same."""
    kind = broker_kind(settings.broker_url)
    if kind == "redis":
        options: dict[str, Any] = {
            "socket_connect_timeout": 5,
            "socket_timeout": 30,
            "socket_keepalive": True,
            "retry_on_timeout": True,
        }
        if visibility_timeout_s is not None:
            options["visibility_timeout"] = visibility_timeout_s
        return options
    if kind == "sqlalchemy" and _sqlite_path(settings.broker_url) is not None:
        # Engine arguments only (see the module docstring): wait for a busy database instead of failing.
        return {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}
    return {}


def prepare_embedded_broker(settings: Settings) -> None:
    """Create the embedded broker's folder and put its SQLite file in WAL mode (which persists)."""
    path = _sqlite_path(settings.broker_url) if broker_kind(settings.broker_url) == "sqlalchemy" else None
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    # WAL lets the consumers' polls read while the API writes a message. Best effort: switching
    # needs a moment without other connections, and a rollback journal works too, only slower.
    with contextlib.suppress(sqlite3.Error), contextlib.closing(sqlite3.connect(path, timeout=5)) as connection:
        connection.execute("PRAGMA journal_mode=WAL")


def set_polling_interval(settings: Settings, seconds: float) -> None:
    """The embedded transport polls; its interval is set on the transport class (see above)."""
    if broker_kind(settings.broker_url) == "sqlalchemy":
        from kombu.transport.sqlalchemy import Transport as SqlTransport

        SqlTransport.polling_interval = seconds


def _sqlite_path(broker_url: str) -> Path | None:
    url = make_url(broker_url.split("+", 1)[1])
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    return Path(url.database)


# Sending ---------------------------------------------------------------------------------
# Fail fast: the caller has already committed the job and only logs a failed send.
_RETRY_POLICY = {"max_retries": 2, "interval_start": 0.0, "interval_step": 0.2, "interval_max": 0.5}
_lock = threading.Lock()


def enqueue_job(job_id: str, *, settings: Settings, queue: str) -> None:
    """Publish `distillery.run_job(job_id)` on `queue`; raises when the broker cannot be reached."""
    send_task(TASK_NAME, [job_id], settings=settings, queue=queue)


def send_task(name: str, args: list[Any], *, settings: Settings, queue: str) -> None:
    """Publish a task by its registered name; the sender needs none of the task's code."""
    sender_app(settings).send_task(name, args=args, queue=queue, retry=True, retry_policy=_RETRY_POLICY)


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
