"""The heartbeat that keeps a running job's lease, reads its cancel flag, and the SIGTERM that stops it.

Both only set the run's stop flags; the engine sees them at its next step (`should_cancel`).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import signal
import threading
import time
from collections.abc import Iterator
from types import FrameType
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from service import state
from service.db import session_scope
from service.models import FINISHED_STATES, Job
from worker.job_run import JobRun, StopFlags
from worker.process import worker_stopping

logger = logging.getLogger("distillery.worker")


class Heartbeat:
    """Renews the lease every `heartbeat_seconds` and reads the cancel flag every `cancel_poll_seconds`."""

    def __init__(self, job_run: JobRun) -> None:
        self.job_run = job_run
        self._stopped = threading.Event()
        context = contextvars.copy_context()
        self._thread = threading.Thread(
            target=context.run, args=(self._loop,), name=f"heartbeat-{job_run.job_id}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        settings, job_run, flags = self.job_run.settings, self.job_run, self.job_run.flags
        poll = min(settings.cancel_poll_seconds, settings.heartbeat_seconds)
        renewed_at = time.monotonic()  # the claim set the first lease
        while not self._stopped.wait(poll):
            now = time.monotonic()
            try:
                with session_scope(job_run.session_factory) as session:
                    if now - renewed_at >= settings.heartbeat_seconds:
                        if not state.renew_lease(
                            session, job_run.job_id, job_run.worker_id, lease_seconds=settings.lease_seconds
                        ):
                            if not _finished_by(session, job_run):  # else the run has just finished it
                                flags.halt("the job's lease went to another worker", lost=True)
                                logger.warning("lost the lease of job %s; stopping at the next step", job_run.job_id)
                            return
                        renewed_at = now
                    if not flags.cancel_requested and state.is_cancel_requested(session, job_run.job_id):
                        logger.info("cancel requested; stopping at the next step")
                        flags.halt("cancel requested", cancel=True)
                if settings.stop_jobs_on_shutdown and worker_stopping() and not flags.shutdown:
                    logger.info("the worker is shutting down; stopping at the next step")
                    flags.halt("the worker was told to stop", shutdown=True)
            except SQLAlchemyError as exc:
                logger.warning("heartbeat failed: %s", exc)
                if time.monotonic() - renewed_at > settings.lease_seconds:
                    # Nobody can tell this worker still runs the job: the reaper may give it away.
                    flags.halt("the lease could not be renewed in time", lost=True)
                    return


def _finished_by(session: Session, job_run: JobRun) -> bool:
    row = session.execute(select(Job.state, Job.worker_id).where(Job.id == job_run.job_id)).one_or_none()
    return row is not None and row[1] == job_run.worker_id and row[0] in FINISHED_STATES


@contextlib.contextmanager
def stop_on_sigterm(flags: StopFlags) -> Iterator[None]:
    """SIGTERM (a shutdown, or Celery cancelling tasks on broker loss) stops the run at the next step.

    In a prefork child the default would end the process mid-step; here the run checkpoints
    nothing more, hands the job back and returns. Elsewhere (the solo pool, a plain call) the
    signal is passed on to the previous handler once the job is handed back.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def handler(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)
        flags.halt("the worker was told to stop", shutdown=True)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        if received and not _is_pool_child_handler(previous):
            signal.raise_signal(signal.SIGTERM)


def _is_pool_child_handler(handler: Any) -> bool:
    return getattr(handler, "__module__", "").startswith("billiard")
