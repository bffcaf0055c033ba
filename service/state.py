"""Every job state transition, each one conditional UPDATE plus one event in the job's log.

    queued ──claim──► running ──finish──► succeeded | failed | cancelled
      ▲                  │
      └─ requeue_expired ┘  (lease lost; after max_attempts the job fails as worker_lost)
    queued ──request_cancel──► cancelled      running ──request_cancel──► cancel_requested flag

A transition is `UPDATE job SET ... WHERE id = :id AND state IN (...) [AND worker_id = :w]`,
so two processes racing for the same job cannot both win: the loser sees rowcount 0. None of
these functions commits; the caller's transaction makes the new state and its event visible
together (`with session.begin(): claim(...)`, or `session.commit()` after).

Worker-facing calls (claim, renew_lease, record_progress) return False when the caller does
not (or no longer) hold the job, which is normal after a duplicate delivery or a lost lease;
`finish` and `request_cancel` raise IllegalTransitionError.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, func, insert, select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.util import identity_key

from service.models import FINISHED_STATES, Job, JobEvent, JobState, utcnow

PROGRESS_KEYS = ("fraction", "epoch", "epochs", "eta_s", "step", "steps")


class IllegalTransitionError(Exception):
    """A transition the job's current state does not allow; `code` is the API's error code."""

    def __init__(self, job_id: str, target: str, current: str | None, *, code: str = "illegal_transition") -> None:
        self.job_id, self.target, self.current, self.code = job_id, target, current, code
        where = f"it is {current}" if current else "it does not exist"
        super().__init__(f"job {job_id} cannot become {target}: {where}")


def append_event(
    session: Session, job_id: str, kind: str, data: dict[str, Any], *, now: datetime | None = None
) -> None:
    """Add one entry to the job's event log (the server-sent events' source)."""
    session.execute(insert(JobEvent).values(job_id=job_id, kind=kind, data=data, created_at=now or utcnow()))


def claim(session: Session, job_id: str, worker_id: str, *, lease_seconds: int, now: datetime | None = None) -> bool:
    """queued → running for `worker_id`, with a lease; False if the job is not queued (someone has it)."""
    now = now or utcnow()
    claimed = _update(
        session,
        job_id,
        from_states=(JobState.QUEUED,),
        where=[Job.cancel_requested.is_(False)],
        values={
            "state": JobState.RUNNING,
            "worker_id": worker_id,
            "attempts": Job.attempts + 1,
            "lease_expires_at": now + timedelta(seconds=lease_seconds),
            "heartbeat_at": now,
            "started_at": func.coalesce(Job.started_at, now),
            "error_code": None,
            "error_message": None,
        },
        now=now,
    )
    if claimed:
        attempts = session.scalar(select(Job.attempts).where(Job.id == job_id))
        append_event(
            session,
            job_id,
            "state",
            {"state": JobState.RUNNING.value, "attempt": attempts, "worker_id": worker_id},
            now=now,
        )
    return claimed


def renew_lease(
    session: Session, job_id: str, worker_id: str, *, lease_seconds: int, now: datetime | None = None
) -> bool:
    """Heartbeat: extend the lease; False means the worker lost the job and must stop working on it."""
    now = now or utcnow()
    return _update(
        session,
        job_id,
        from_states=(JobState.RUNNING,),
        where=[Job.worker_id == worker_id],
        values={"lease_expires_at": now + timedelta(seconds=lease_seconds), "heartbeat_at": now},
        now=now,
    )


def hand_back(
    session: Session, job_id: str, worker_id: str, *, refund_attempt: bool, now: datetime | None = None
) -> bool:
    """The worker gives the job up: its lease ends now, so the reaper's next pass requeues it.

    `refund_attempt` is for a worker that was told to stop (shutdown, deploy, broker loss): the
    job did nothing wrong, so that run does not count against `max_attempts`.
    """
    now = now or utcnow()
    values: dict[str, Any] = {"lease_expires_at": now, "heartbeat_at": now}
    if refund_attempt:
        values["attempts"] = Job.attempts - 1
    return _update(session, job_id, from_states=(JobState.RUNNING,), where=[Job.worker_id == worker_id],
                   values=values, now=now)


def record_progress(
    session: Session,
    job_id: str,
    worker_id: str,
    *,
    stage: str | None = None,
    progress: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> bool:
    """Store the latest stage, progress {fraction, epoch, epochs, eta_s, step} and metrics; log an event.

    `progress` replaces the stored one (pass the whole picture each time); `metrics` are merged
    into the stored ones, so per-stage metrics accumulate. Throttling is the caller's business.
    """
    now = now or utcnow()
    values: dict[str, Any] = {}
    if stage is not None:
        values["stage"] = stage
    if progress is not None:
        values["progress"] = {key: progress[key] for key in PROGRESS_KEYS if key in progress}
    if metrics is not None:
        current = session.scalar(select(Job.metrics).where(Job.id == job_id)) or {}
        values["metrics"] = {**current, **metrics}
    if not _update(
        session,
        job_id,
        from_states=(JobState.RUNNING,),
        where=[Job.worker_id == worker_id],
        values=values,
        now=now,
    ):
        return False
    event = {"stage": stage, "progress": values.get("progress"), "metrics": metrics}
    append_event(session, job_id, "progress", {k: v for k, v in event.items() if v is not None}, now=now)
    return True


def finish(
    session: Session,
    job_id: str,
    worker_id: str,
    *,
    state: JobState,
    error_code: str | None = None,
    error_message: str | None = None,
    now: datetime | None = None,
) -> None:
    """running → succeeded | failed | cancelled by the worker that holds the job."""
    if state not in FINISHED_STATES:
        raise ValueError(f"finish() needs a final state, not {state}")
    if state == JobState.FAILED and not error_code:
        raise ValueError("a failed job needs an error_code")
    now = now or utcnow()
    row = session.execute(select(Job.started_at, Job.progress).where(Job.id == job_id)).one_or_none()
    started_at, progress = row if row is not None else (None, {})
    values: dict[str, Any] = {
        **_final_values(state, now, started_at),
        "error_code": error_code,
        "error_message": error_message,
    }
    if state == JobState.SUCCEEDED:
        values["progress"] = {**(progress or {}), "fraction": 1.0, "eta_s": 0.0}
    if not _update(
        session,
        job_id,
        from_states=(JobState.RUNNING,),
        where=[Job.worker_id == worker_id],
        values=values,
        now=now,
    ):
        raise IllegalTransitionError(job_id, state, _current_state(session, job_id), code="not_job_holder")
    append_event(session, job_id, "state", _state_event(state, error_code, error_message), now=now)


def request_cancel(session: Session, job_id: str, *, now: datetime | None = None) -> JobState:
    """Cancel a queued job at once; flag a running one for its worker to stop at the next step.

    Returns the state the job is in afterwards. A finished job cannot be cancelled.
    """
    now = now or utcnow()
    if _update(
        session,
        job_id,
        from_states=(JobState.QUEUED,),
        values=_final_values(JobState.CANCELLED, now, None),
        now=now,
    ):
        append_event(
            session,
            job_id,
            "state",
            _state_event(JobState.CANCELLED, None, "cancelled before it started"),
            now=now,
        )
        return JobState.CANCELLED
    if _update(
        session,
        job_id,
        from_states=(JobState.RUNNING,),
        where=[Job.cancel_requested.is_(False)],
        values={"cancel_requested": True},
        now=now,
    ):
        append_event(session, job_id, "cancel_requested", {}, now=now)
        return JobState.RUNNING
    current = _current_state(session, job_id)
    if current == JobState.RUNNING:  # already flagged: asking twice is fine
        return JobState.RUNNING
    raise IllegalTransitionError(job_id, JobState.CANCELLED, current, code="job_finished")


@dataclass
class ExpiredLeases:
    requeued: list[str] = field(default_factory=list)  # back to queued: send them again
    ended: list[str] = field(default_factory=list)  # cancelled or failed here: their checkpoints can go


def requeue_expired(session: Session, *, now: datetime | None = None) -> ExpiredLeases:
    """The reaper: running jobs whose lease expired go back to queued, to be enqueued again.

    A job that already used `max_attempts` fails with `worker_lost` instead, and one whose
    cancellation was requested becomes cancelled: nobody is left to do either.
    """
    now = now or utcnow()
    expired = session.execute(
        select(Job.id, Job.worker_id, Job.attempts, Job.max_attempts, Job.cancel_requested, Job.started_at)
        .where(Job.state == JobState.RUNNING, Job.lease_expires_at < now)
        .order_by(Job.lease_expires_at)
    ).all()
    result = ExpiredLeases()
    for job_id, worker_id, attempts, max_attempts, cancel_requested, started_at in expired:
        # Conditions repeated from the SELECT: the worker may have renewed or finished meanwhile.
        still_expired = [Job.worker_id == worker_id, Job.lease_expires_at < now]
        if cancel_requested:
            if _update(
                session,
                job_id,
                from_states=(JobState.RUNNING,),
                where=still_expired,
                values=_final_values(JobState.CANCELLED, now, started_at),
                now=now,
            ):
                append_event(
                    session,
                    job_id,
                    "state",
                    _state_event(JobState.CANCELLED, None, "worker lost after cancel"),
                    now=now,
                )
                result.ended.append(job_id)
        elif attempts >= max_attempts:
            message = f"the worker stopped responding on each of {attempts} attempts"
            if _update(
                session,
                job_id,
                from_states=(JobState.RUNNING,),
                where=still_expired,
                values={
                    **_final_values(JobState.FAILED, now, started_at),
                    "error_code": "worker_lost",
                    "error_message": message,
                },
                now=now,
            ):
                append_event(session, job_id, "state", _state_event(JobState.FAILED, "worker_lost", message), now=now)
                result.ended.append(job_id)
        elif _update(
            session,
            job_id,
            from_states=(JobState.RUNNING,),
            where=still_expired,
            values={"state": JobState.QUEUED, "worker_id": None, "lease_expires_at": None},
            now=now,
        ):
            append_event(
                session,
                job_id,
                "state",
                {"state": JobState.QUEUED.value, "reason": "lease_expired", "lost_worker_id": worker_id},
                now=now,
            )
            result.requeued.append(job_id)
    return result


def stale_queued(session: Session, *, older_than: timedelta, now: datetime | None = None) -> list[str]:
    """Queued jobs not (re-)sent to the broker for `older_than`: candidates for the reaper to re-enqueue.

    A message can be lost between commit and send, or with a broker restart; a duplicate is
    harmless because only one claim can win.
    """
    cutoff = (now or utcnow()) - older_than
    sent_long_ago = and_(Job.enqueued_at.is_not(None), Job.enqueued_at < cutoff)
    never_sent = and_(Job.enqueued_at.is_(None), Job.created_at < cutoff)
    rows = session.scalars(
        select(Job.id).where(Job.state == JobState.QUEUED, sent_long_ago | never_sent).order_by(Job.id)
    )
    return list(rows)


def mark_enqueued(session: Session, job_ids: Iterable[str], *, now: datetime | None = None) -> None:
    """Remember when a job's message was last handed to the broker."""
    ids = list(job_ids)
    if ids:
        session.execute(
            update(Job).where(Job.id.in_(ids), Job.state == JobState.QUEUED).values(enqueued_at=now or utcnow()),
            execution_options={"synchronize_session": False},
        )


def is_cancel_requested(session: Session, job_id: str) -> bool:
    return bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


def _update(
    session: Session,
    job_id: str,
    *,
    from_states: Sequence[JobState],
    values: dict[str, Any],
    now: datetime,
    where: Sequence[ColumnElement[bool]] = (),
) -> bool:
    statement = (
        update(Job)
        .where(Job.id == job_id, Job.state.in_(from_states), *where)
        .values(**values, updated_at=now)
        # The conditional UPDATE is the point; never let the ORM evaluate it in Python.
        .execution_options(synchronize_session=False)
    )
    result = session.execute(statement)
    changed = result.rowcount == 1  # type: ignore[attr-defined]
    if changed:
        # Rows already loaded in this session must not keep showing the old state.
        loaded = session.identity_map.get(identity_key(Job, job_id))
        if loaded is not None:
            session.expire(loaded)
    return changed


def _final_values(state: JobState, now: datetime, started_at: datetime | None) -> dict[str, Any]:
    duration = (now - started_at).total_seconds() if started_at is not None else None
    return {"state": state, "finished_at": now, "duration_s": duration, "lease_expires_at": None}


def _state_event(state: JobState, error_code: str | None, message: str | None) -> dict[str, Any]:
    event: dict[str, Any] = {"state": str(state)}
    if error_code:
        event["error"] = {"code": error_code, "message": message}
    elif message:
        event["reason"] = message
    return event


def _current_state(session: Session, job_id: str) -> str | None:
    return session.scalar(select(Job.state).where(Job.id == job_id))


# A tuned job's parent (service.tuning) --------------------------------------------------------
# While its trials run, a parent is `running` with no worker and no lease (worker_id SEARCH_HOLDER):
# the reaper never requeues it, and only the search itself moves it on.
SEARCH_HOLDER = "search"


def hold_for_search(session: Session, job_id: str, worker_id: str, *, now: datetime | None = None) -> bool:
    """The worker that prepared a tuned job hands it to its search: no lease, stage `search`."""
    now = now or utcnow()
    return _update(session, job_id, from_states=(JobState.RUNNING,), where=[Job.worker_id == worker_id],
                   values={"worker_id": SEARCH_HOLDER, "lease_expires_at": None, "stage": "search"}, now=now)


def queue_final_run(session: Session, job_id: str, *, now: datetime | None = None) -> bool:
    """The search ended: the parent goes back to the queue for its full run (a fresh count of attempts)."""
    now = now or utcnow()
    if not _update(session, job_id, from_states=(JobState.RUNNING,), where=[Job.worker_id == SEARCH_HOLDER],
                   values={"state": JobState.QUEUED, "worker_id": None, "stage": "final", "attempts": 0,
                           "enqueued_at": None}, now=now):
        return False
    append_event(session, job_id, "state", {"state": JobState.QUEUED.value, "reason": "search finished"}, now=now)
    return True


def finish_search(session: Session, job_id: str, *, state: JobState, error_code: str | None = None,
                  error_message: str | None = None, now: datetime | None = None) -> bool:
    """End a parent while its search holds it (cancelled, or failed when every trial failed)."""
    now = now or utcnow()
    started_at = session.scalar(select(Job.started_at).where(Job.id == job_id))
    if not _update(session, job_id, from_states=(JobState.RUNNING,), where=[Job.worker_id == SEARCH_HOLDER],
                   values={**_final_values(state, now, started_at), "error_code": error_code,
                           "error_message": error_message}, now=now):
        return False
    append_event(session, job_id, "state", _state_event(state, error_code, error_message), now=now)
    return True
