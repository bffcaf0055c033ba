"""A job's event log, read in id order for the server-sent event stream."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.models import FINISHED_STATES, Job, JobEvent


def events_after(*, session: Session, job_id: str, after_id: int, limit: int = 200) -> list[JobEvent]:
    query = select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after_id).order_by(JobEvent.id).limit(limit)
    return list(session.scalars(query))


def job_finished(*, session: Session, job_id: str) -> bool:
    """True when the job has ended (or was deleted): its stream may close once the log is drained."""
    current = session.scalar(select(Job.state).where(Job.id == job_id))
    return current is None or current in FINISHED_STATES
