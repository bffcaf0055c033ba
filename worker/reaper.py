"""The reaper: what makes a dead worker or a lost message cost minutes, not a job.

Every `distillery worker` runs one beside it, as a process of its own (no Celery beat needed).
Not a thread in Celery's parent: that parent forks a fresh child for every job, and a fork taken
while a thread holds a lock (an import of the database driver, a connection pool) leaves the
child waiting on that lock forever (seen here: a job's child stuck before its claim). Each pass:

1. requeues running jobs whose lease expired (their worker died or handed them back) and sends
   them again; a job out of attempts fails as `worker_lost` and a job whose cancel was asked is
   cancelled, and their checkpoints are removed (`service.state.requeue_expired`);
2. re-sends queued jobs whose message was probably lost (a crash between commit and send, a
   Redis restart, the embedded broker's missing redelivery): a job counts as lost when it was
   sent longer than `requeue_after_seconds` ago *and* its queue holds fewer messages than it has
   queued jobs, so jobs merely waiting behind busy workers are not sent twice.

Several reapers may run at once: a duplicate message is harmless, because only one claim wins.
"""

from __future__ import annotations

import logging
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from functools import cached_property

from sqlalchemy import Engine, MetaData, Table, delete, func, select
from sqlalchemy.orm import Session, sessionmaker

from service import state, tuning
from service.artifacts import delete_checkpoints
from service.db import create_db_engine, create_session_factory, session_scope
from service.models import Job, JobState
from service.queue import broker_kind, enqueue_job, queue_sizes
from service.settings import Settings
from service.storage import Storage
from worker.process import die_with_parent
from worker.scratch import sweep_scratch

logger = logging.getLogger("distillery.reaper")

Sender = Callable[[str, str], None]  # (job_id, queue)
CheckpointRemover = Callable[[str], None]  # (job_id)
QueueSizes = Callable[[list[str]], dict[str, int]]


@dataclass
class ReapReport:
    requeued: list[str] = field(default_factory=list)
    ended: list[str] = field(default_factory=list)
    resent: list[str] = field(default_factory=list)
    failed_to_send: list[str] = field(default_factory=list)


def reap_once(
    session_factory: sessionmaker[Session],
    *,
    requeue_after: timedelta,
    send: Sender,
    sizes: QueueSizes,
    remove_checkpoints: CheckpointRemover | None = None,
) -> ReapReport:
    report = ReapReport()
    with session_scope(session_factory) as session:
        expired = state.requeue_expired(session)
    report.requeued, report.ended = expired.requeued, expired.ended
    for job_id in report.requeued:
        logger.warning("job %s: its worker stopped renewing the lease; requeued", job_id)
    for job_id in report.ended:
        logger.warning("job %s: its worker was lost and the job ended (cancelled or out of attempts)", job_id)
        if remove_checkpoints is not None:
            remove_checkpoints(job_id)

    with session_scope(session_factory) as session:
        stale = set(state.stale_queued(session, older_than=requeue_after)) | set(report.requeued)
        candidates = session.execute(
            select(Job.id, Job.queue)
            .where(Job.id.in_(stale), Job.state == JobState.QUEUED)
            .order_by(func.coalesce(Job.enqueued_at, Job.created_at), Job.id)
        ).all() if stale else []
        queued_per_queue: Counter[str] = Counter()
        for queue, count in session.execute(
            select(Job.queue, func.count()).where(Job.state == JobState.QUEUED).group_by(Job.queue)
        ):
            queued_per_queue[queue] = count
    if not candidates:
        return report

    waiting = sizes(sorted({queue for _, queue in candidates}))
    requeued = set(report.requeued)
    # Messages missing per queue. A requeued job's message was consumed by its dead run, so it
    # always gets a new one; stale jobs get one only while their queue is short of messages.
    deficit = {queue: queued_per_queue[queue] - count for queue, count in waiting.items()}
    to_send: list[tuple[str, str]] = []
    for job_id, queue in sorted(candidates, key=lambda row: row[0] not in requeued):
        if job_id in requeued or deficit[queue] > 0:
            to_send.append((job_id, queue))
            deficit[queue] -= 1

    sent = []
    for job_id, queue in to_send:
        try:
            send(job_id, queue)
        except Exception as exc:
            logger.warning("could not send job %s to %s (will try again): %s", job_id, queue, exc)
            report.failed_to_send.append(job_id)
            continue
        sent.append(job_id)
    if sent:
        with session_scope(session_factory) as session:
            state.mark_enqueued(session, sent)
    report.resent = [job_id for job_id in sent if job_id not in requeued]
    for job_id in report.resent:
        logger.warning("job %s: its message was probably lost; sent again", job_id)
    return report


class Reaper:
    """Runs `reap_once` every `reaper_interval_seconds` until stopped."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._engine: Engine | None = None
        self._broker_engine: Engine | None = None
        self._stopped = threading.Event()
        self._next_sweep = 0.0

    def run_forever(self) -> None:
        # The first pass soon (a restarted service picks up its handed-back jobs at once), the
        # others spread over the interval so many workers do not all reap at the same moment.
        delay = random.uniform(0.5, 2.0)  # noqa: S311
        try:
            while not self._stopped.wait(delay):
                try:
                    self.run_once()
                except Exception as exc:  # a database or broker outage must not end the reaper
                    logger.warning("reaper pass failed (next one in %.0f s): %s",
                                   self.settings.reaper_interval_seconds, exc)
                delay = self.settings.reaper_interval_seconds * random.uniform(0.8, 1.2)  # noqa: S311
        finally:
            for engine in (self._engine, self._broker_engine):
                if engine is not None:
                    engine.dispose()

    def stop(self) -> None:
        self._stopped.set()

    def run_once(self) -> ReapReport:
        if self._engine is None:
            self._engine = create_db_engine(self.settings.database_url)
        settings = self.settings
        report = reap_once(
            create_session_factory(self._engine),
            requeue_after=timedelta(seconds=settings.requeue_after_seconds),
            send=lambda job_id, queue: enqueue_job(job_id, settings=settings, queue=queue),
            sizes=lambda queues: queue_sizes(settings, queues),
            remove_checkpoints=lambda job_id: delete_checkpoints(self.storage, job_id),
        )
        self._advance_searches()
        self._purge_delivered_messages()
        if time.monotonic() >= self._next_sweep:
            # At start-up (the first pass) and every scratch_sweep_seconds after.
            sweep_scratch(settings, create_session_factory(self._engine))
            self._next_sweep = time.monotonic() + settings.scratch_sweep_seconds
        return report

    def _advance_searches(self) -> None:
        """Tuned jobs' searches move on here too: a trial may have ended with no one left to advance it."""
        assert self._engine is not None
        session_factory = create_session_factory(self._engine)
        with session_scope(session_factory) as session:
            to_enqueue = tuning.advance_all(session=session, settings=self.settings)
        sent = []
        for job_id in to_enqueue:
            with session_scope(session_factory) as session:
                queue = session.scalar(select(Job.queue).where(Job.id == job_id)) or self.settings.default_queue
            try:
                enqueue_job(job_id, settings=self.settings, queue=queue)
            except Exception as exc:  # still queued: the next pass's lost-message check re-sends it
                logger.warning("could not send job %s (will try again): %s", job_id, exc)
                continue
            sent.append(job_id)
        if sent:
            with session_scope(session_factory) as session:
                state.mark_enqueued(session, sent)

    @cached_property
    def storage(self) -> Storage:
        return Storage.from_settings(self.settings)

    def _purge_delivered_messages(self) -> None:
        """kombu's SQLAlchemy transport keeps delivered messages (visible=false) forever; drop them."""
        if broker_kind(self.settings.broker_url) != "sqlalchemy":
            return
        if self._broker_engine is None:
            self._broker_engine = create_db_engine(self.settings.broker_url.split("+", 1)[1])
        metadata = MetaData()
        try:
            messages = Table("kombu_message", metadata, autoload_with=self._broker_engine)
        except Exception:  # no message was ever sent
            return
        with self._broker_engine.begin() as connection:
            connection.execute(delete(messages).where(messages.c.visible.is_(False)))


def start_reaper_process() -> subprocess.Popen[bytes]:
    """The reaper beside a worker: same environment, dies with its parent."""
    return subprocess.Popen([sys.executable, "-m", "worker.reaper"], preexec_fn=die_with_parent)


def main() -> None:
    from service.settings import get_settings
    from worker.logs import configure_worker_logging

    settings = get_settings()
    configure_worker_logging(settings.log_level, json_lines=settings.log_json)
    reaper = Reaper(settings)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda _signum, _frame: reaper.stop())
    logger.info("reaper running every %.0f s", settings.reaper_interval_seconds)
    reaper.run_forever()


if __name__ == "__main__":
    main()
