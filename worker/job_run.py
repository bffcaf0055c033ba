"""One attempt at one job, as this worker holds it: its inputs, its stop flags, its writes to the row."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from service import keys, state
from service.db import session_scope
from service.settings import Settings
from service.storage import Storage

logger = logging.getLogger("distillery.worker")


class Outcome(StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    RETRY = "retry"  # handed back after an infrastructure error; the reaper requeues it
    STOPPED = "stopped"  # handed back because the worker was told to stop
    LOST = "lost"  # the lease went to someone else; nothing was written
    SKIPPED = "skipped"  # not queued when the message came: a duplicate, or cancelled before it started
    SEARCHING = "searching"  # a tuned job, prepared and handed to its search (service.tuning)


@dataclass
class StopFlags:
    """Why a run should stop; `stop` is the Event the engine's `should_cancel` reads."""

    stop: threading.Event = field(default_factory=threading.Event)
    cancel_requested: bool = False
    shutdown: bool = False
    lost: bool = False
    pruned: bool = False  # a trial its search called hopeless
    reason: str = ""
    failure: tuple[str, str] | None = None  # (code, message) when a limit or the watchdog ended the run
    halted_at: float | None = None  # monotonic time of the first halt
    # Monotonic time of the engine's last sign of life (a step, a stage, progress): the stall watchdog's clock.
    last_activity: float = field(default_factory=time.monotonic)

    def halt(self, reason: str, *, cancel: bool = False, shutdown: bool = False, lost: bool = False,
             pruned: bool = False) -> None:
        self.cancel_requested |= cancel
        self.shutdown |= shutdown
        self.lost |= lost
        self.pruned |= pruned
        self.reason = self.reason or reason
        self.halted_at = self.halted_at or time.monotonic()
        self.stop.set()

    def fail(self, code: str, message: str) -> None:
        """Stop the run and fail the job with `code` (a resource limit, a stall): not retried."""
        if self.failure is None:
            self.failure = (code, message)
        self.halt(message)


@dataclass
class JobRun:
    """One attempt at one job, as this worker holds it."""

    job_id: str
    worker_id: str
    attempt: int
    max_attempts: int
    spec: dict[str, Any]
    input_keys: dict[str, tuple[str, str] | None]  # role -> (storage key, original file name)
    settings: Settings
    session_factory: sessionmaker[Session]
    flags: StopFlags = field(default_factory=StopFlags)
    memory_limited: bool = False  # the attempt runs under the operator's memory limit
    # A tuned job's part (service.tuning): the trial's parent, or the parent's phase and its search.
    parent_id: str | None = None
    tune_phase: str | None = None
    search: dict[str, Any] | None = None
    teacher_cache_key: str | None = None  # the logits a tuned job's runs share
    owner_id: str | None = None
    input_sha256: dict[str, str] = field(default_factory=dict)  # role -> the upload's sha256

    @cached_property
    def storage(self) -> Storage:
        # Made on first use, inside the run: a store that cannot be reached is then an
        # infrastructure failure of this attempt, recorded on the job, not a crashed task.
        return Storage.from_settings(self.settings)

    @property
    def checkpoint_key(self) -> str:
        return keys.checkpoint_key(self.job_id)

    @property
    def artifact_prefix(self) -> str:
        return keys.artifact_prefix(self.job_id, self.attempt)

    def write(self, change: Callable[[Session], bool | None], *, what: str) -> bool:
        """One short transaction from this run; False (and the run halts) when the job is no longer ours.

        A database hiccup here is logged and skipped: progress is rewritten soon, and the
        heartbeat is what decides whether the job is still held.
        """
        if self.flags.lost:
            return False
        try:
            with session_scope(self.session_factory) as session:
                held = change(session)
        except SQLAlchemyError as exc:
            logger.warning("could not write %s: %s", what, exc)
            return True
        if held is False:
            self.flags.halt("the job's lease went to another worker", lost=True)
            logger.warning("job %s is no longer held by this worker; stopping without writing more", self.job_id)
            return False
        return True

    def event(self, kind: str, data: dict[str, Any]) -> None:
        self.write(lambda session: state.append_event(session, self.job_id, kind, data), what=f"a {kind} event")
