"""The heartbeat that keeps a running job's lease, reads its cancel flag, and the SIGTERM that stops it.

Both only set the run's stop flags; the engine sees them at its next step (`should_cancel`).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
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
from service.models import FINISHED_STATES, Job, JobState
from service.state import IllegalTransitionError
from worker.job_run import JobRun, StopFlags
from worker.process import in_pool_child, worker_stopping

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
        renewed_at = started_at = time.monotonic()  # the claim set the first lease
        while not self._stopped.wait(poll):
            now = time.monotonic()
            watch(job_run, now - started_at)
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


def watch(job_run: JobRun, running_s: float) -> None:
    """The watchdog: a job over its wall-clock limit or without a step for too long is failed; one that
    does not stop within `stop_grace_seconds` of being told to (a step that never ends) loses its
    process, in a pool child, after its row says how it ended."""
    settings, flags = job_run.settings, job_run.flags
    now = time.monotonic()
    if not flags.stop.is_set():
        if running_s > settings.max_job_seconds:
            flags.fail("resource_limit", "the job ran longer than its wall-clock limit of "
                       f"{settings.max_job_seconds:.0f} s (max_job_seconds, set by DISTILLERY_MAX_JOB_SECONDS); "
                       "use fewer epochs or less data")
        elif now - flags.last_activity > settings.job_stall_seconds:
            flags.fail("stalled", f"the job made no step for {settings.job_stall_seconds:.0f} s (job_stall_seconds, "
                       "set by DISTILLERY_JOB_STALL_SECONDS); a student or data this slow needs a smaller size")
        if flags.failure is not None:
            logger.warning("%s; stopping at the next step", flags.failure[1])
    elif flags.halted_at is not None and now - flags.halted_at > settings.stop_grace_seconds and in_pool_child():
        _end_stuck_attempt(job_run)


def _end_stuck_attempt(job_run: JobRun) -> None:
    flags = job_run.flags
    logger.error("the job did not stop within %.0f s of being told to (%s); ending its process",
                 job_run.settings.stop_grace_seconds, flags.reason)

    def change(session: Session) -> bool:
        try:
            if flags.failure is not None:
                state.finish(session, job_run.job_id, job_run.worker_id, state=JobState.FAILED,
                             error_code=flags.failure[0], error_message=flags.failure[1])
            elif flags.cancel_requested:
                state.finish(session, job_run.job_id, job_run.worker_id, state=JobState.CANCELLED,
                             error_message="cancelled")
            elif flags.shutdown:
                return state.hand_back(session, job_run.job_id, job_run.worker_id, refund_attempt=True)
        except IllegalTransitionError:
            return False
        return True

    if not flags.lost:
        job_run.write(change, what="the end of a stuck attempt")
    # The pool sees its child gone; the message goes back and finds the job no longer queued.
    os._exit(70)


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
