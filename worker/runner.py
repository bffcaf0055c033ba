"""Run one job: claim it, fetch its inputs, run the engine, store what it made, record how it went.

The job's row is the truth. `claim` is one conditional UPDATE (only a queued job can be taken),
so a duplicate delivery finds the job taken and returns. While the engine runs, a heartbeat
thread renews the lease and reads the cancel flag; the engine asks `should_cancel` before every
step, which reads a threading.Event. Three things can stop a run early:

* the user cancels: the job becomes `cancelled` and its checkpoints are removed;
* the worker is told to stop (SIGTERM: shutdown, or Celery's cancel on broker loss): the job is
  handed back (its lease ended at once) and the reaper requeues it; it resumes from its checkpoint;
* the lease is lost (the reaper gave the job to another worker): this run writes nothing more.

Failures are classified: the engine's deliberate errors (bad input, teacher/data mismatch,
divergence, ...) and a missing input are permanent and fail the job at once; infrastructure
errors (storage, database, out of memory, anything unexpected) hand the job back for another
attempt until `max_attempts`, then fail it with their code.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import re
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property
from pathlib import Path, PurePosixPath
from types import FrameType
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from api.db import create_db_engine, create_session_factory, session_scope
from api.jobs import state
from api.jobs.state import IllegalTransitionError
from api.models import FINISHED_STATES, File, Job, JobFile, JobState
from api.services.artifacts import checkpoint_prefix, delete_checkpoints, record_artifact
from api.storage import Storage, StorageError, StoredObject, check_key
from kdcore.callbacks import Callbacks
from worker.logs import job_logging
from worker.process import worker_stopping
from worker.settings import WorkerSettings, job_threads

if TYPE_CHECKING:
    from kdcore.callbacks import Progress
    from kdcore.pipeline import JobInputs, RunResult

logger = logging.getLogger("distillery.worker")

CHECKPOINT_NAME = "checkpoint.pt"
# The engine's deliberate errors are deterministic: running the job again fails the same way.
RETRYABLE_ENGINE_CODES = frozenset({"internal"})
# metrics.json keys too big for the job row (they stay in the artifact and the report).
METRICS_KEPT_OUT_OF_ROW = ("student_confusion",)
_RESUME_MESSAGE = re.compile(r"resuming from the checkpoint after (?P<stage>\w+) epoch (?P<epoch>\d+)")
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9._-]")


class Outcome(StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    RETRY = "retry"  # handed back after an infrastructure error; the reaper requeues it
    STOPPED = "stopped"  # handed back because the worker was told to stop
    LOST = "lost"  # the lease went to someone else; nothing was written
    SKIPPED = "skipped"  # not queued when the message came: a duplicate, or cancelled before it started


class InputMissingError(Exception):
    code = "input_missing"


class _Halted(Exception):
    """Raised between phases when a stop was asked for (the engine raises CancelledError inside)."""


@dataclass
class StopFlags:
    """Why a run should stop; `stop` is the Event the engine's `should_cancel` reads."""

    stop: threading.Event = field(default_factory=threading.Event)
    cancel_requested: bool = False
    shutdown: bool = False
    lost: bool = False
    reason: str = ""

    def halt(self, reason: str, *, cancel: bool = False, shutdown: bool = False, lost: bool = False) -> None:
        self.cancel_requested |= cancel
        self.shutdown |= shutdown
        self.lost |= lost
        self.reason = self.reason or reason
        self.stop.set()


@dataclass
class JobRun:
    """One attempt at one job, as this worker holds it."""

    job_id: str
    worker_id: str
    attempt: int
    max_attempts: int
    spec: dict[str, Any]
    input_keys: dict[str, tuple[str, str] | None]  # role -> (storage key, original file name)
    settings: WorkerSettings
    session_factory: sessionmaker[Session]
    flags: StopFlags = field(default_factory=StopFlags)

    @cached_property
    def storage(self) -> Storage:
        # Made on first use, inside the run: a store that cannot be reached is then an
        # infrastructure failure of this attempt, recorded on the job, not a crashed task.
        return Storage.from_settings(self.settings)

    @property
    def checkpoint_key(self) -> str:
        return checkpoint_prefix(self.job_id) + CHECKPOINT_NAME

    @property
    def artifact_prefix(self) -> str:
        # Per attempt, so two runs of one job never write the same object; the rows say which is current.
        return f"jobs/{self.job_id}/artifacts/attempt-{self.attempt}/"

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


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def run(job_id: str, settings: WorkerSettings, *, worker_id: str | None = None) -> Outcome:
    """Claim and run one job. Never raises for the job's own failures: they are recorded on its row."""
    engine = create_db_engine(settings.database_url)
    try:
        return _claim_and_run(job_id, settings, create_session_factory(engine), worker_id or default_worker_id())
    finally:
        engine.dispose()


def _claim_and_run(
    job_id: str, settings: WorkerSettings, session_factory: sessionmaker[Session], worker_id: str
) -> Outcome:
    with session_scope(session_factory) as session:
        claimed = state.claim(session, job_id, worker_id, lease_seconds=settings.lease_seconds)
    if not claimed:
        logger.info("job %s is not queued (taken, finished or cancelled); nothing to do", job_id)
        return Outcome.SKIPPED
    with session_scope(session_factory) as session:
        job = session.get(Job, job_id)
        if job is None:  # deleted between the claim and this read
            return Outcome.SKIPPED
        rows = session.execute(
            select(JobFile.role, File.storage_key, File.name).join(File, File.id == JobFile.file_id)
            .where(JobFile.job_id == job_id)
        ).all()
        inputs: dict[str, tuple[str, str] | None] = {role: (key, name) for role, key, name in rows}
        job_run = JobRun(
            job_id=job_id,
            worker_id=worker_id,
            attempt=job.attempts,
            max_attempts=job.max_attempts,
            spec=dict(job.spec),
            input_keys=inputs,
            settings=settings,
            session_factory=session_factory,
        )
    with job_logging(job_id, job_run.attempt):
        logger.info("running job %s (attempt %d of %d)", job_id, job_run.attempt, job_run.max_attempts)
        heartbeat = Heartbeat(job_run)
        heartbeat.start()
        try:
            with _stop_on_sigterm(job_run.flags):
                outcome = _attempt(job_run)
        finally:
            heartbeat.stop()
        logger.info("job %s: %s", job_id, outcome.value)
        return outcome


def _attempt(job_run: JobRun) -> Outcome:
    scratch = job_run.settings.work_dir
    if scratch is not None:
        scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"distillery-{job_run.job_id}-", dir=scratch) as work:
        try:
            out_dir, result = _distill(job_run, Path(work))
            if job_run.flags.stop.is_set():
                raise _Halted(job_run.flags.reason)
            return _succeed(job_run, out_dir, result)
        except Exception as exc:
            return _settle_failure(job_run, exc)


# The run ------------------------------------------------------------------------------------


def _distill(job_run: JobRun, work: Path) -> tuple[Path, RunResult]:
    from kdcore.errors import KDError
    from kdcore.pipeline import RunOptions, run_job
    from kdcore.spec import parse_spec

    inputs = _download_inputs(job_run, work / "inputs")
    checkpoint_dir = work / "checkpoints"
    resumable = _download_checkpoint(job_run, checkpoint_dir / CHECKPOINT_NAME)
    if job_run.flags.stop.is_set():
        raise _Halted(job_run.flags.reason)

    spec = parse_spec(job_run.spec)
    if spec.threads is None:
        spec = spec.model_copy(update={"threads": job_threads(job_run.settings)})
    options = RunOptions(
        out_dir=work / "out",
        checkpoint_dir=checkpoint_dir,
        resume=True,
        allow_code_teachers=job_run.settings.allow_code_teachers,
        progress_interval_s=min(1.0, job_run.settings.progress_write_seconds or 1.0),
        latency_runs=job_run.settings.latency_runs,
    )
    callbacks = JobCallbacks(job_run)
    try:
        return options.out_dir, run_job(spec, inputs, options, callbacks)
    except KDError as exc:
        if exc.code != "bad_checkpoint" or not resumable:
            raise
    # A checkpoint this engine cannot read (another version, a damaged upload): start over.
    logger.warning("the stored checkpoint is unusable; starting the job from the beginning")
    job_run.event("log", {"message": "the checkpoint of an earlier attempt is unusable; starting over"})
    (checkpoint_dir / CHECKPOINT_NAME).unlink(missing_ok=True)
    job_run.storage.delete(job_run.checkpoint_key)
    return options.out_dir, run_job(spec, inputs, options, JobCallbacks(job_run))


def _download_inputs(job_run: JobRun, folder: Path) -> JobInputs:
    from kdcore.pipeline import JobInputs

    paths: dict[str, Path] = {}
    for role in ("teacher", "train", "test"):
        entry = job_run.input_keys.get(role)
        if entry is None:
            if role == "test" and not (job_run.spec.get("data") or {}).get("test"):
                continue  # no separate test set
            raise InputMissingError(f"the job's {_ROLES[role]} ({_FIELDS[role]}) was deleted; upload it again "
                                    "and submit a new job")
        key, name = entry
        path = folder / f"{role}{_suffix(name)}"
        try:
            job_run.storage.get_file(key, path)
        except FileNotFoundError:
            raise InputMissingError(
                f"the {_ROLES[role]} {name} ({_FIELDS[role]}) is missing from storage; upload it again and "
                "submit a new job"
            ) from None
        paths[role] = path
    return JobInputs(teacher=paths["teacher"], train=paths["train"], test=paths.get("test"))


_ROLES = {"teacher": "teacher file", "train": "training data", "test": "test data"}
_FIELDS = {"teacher": "teacher.file", "train": "data.train", "test": "data.test"}


def _suffix(name: str) -> str:
    suffix = PurePosixPath(name).suffix.lower()
    return suffix if re.fullmatch(r"\.[a-z0-9]{1,12}", suffix) else ""


def _download_checkpoint(job_run: JobRun, path: Path) -> bool:
    """Fetch the latest checkpoint of an earlier attempt, if there is one; the engine resumes from it."""
    try:
        if not job_run.storage.exists(job_run.checkpoint_key):
            return False
        job_run.storage.get_file(job_run.checkpoint_key, path)
    except FileNotFoundError:  # removed in the meantime
        return False
    logger.info("found the checkpoint of an earlier attempt (%d bytes)", path.stat().st_size)
    return True


class JobCallbacks(Callbacks):
    """The engine's window onto the job's row: progress (throttled), events, checkpoints, cancel."""

    def __init__(self, job_run: JobRun) -> None:
        self.job_run = job_run
        self.stop = job_run.flags.stop
        self.min_interval = job_run.settings.progress_write_seconds
        self.last_write = 0.0
        self.written_stage: str | None = None

    # Called before every optimiser step: an Event read, nothing more.
    def should_cancel(self) -> bool:
        return self.stop.is_set()

    def on_stage_start(self, stage: str, epochs: int) -> None:
        self.written_stage = stage
        self.job_run.write(self._record(stage=stage), what="the stage")

    def on_progress(self, progress: Progress) -> None:
        now = time.monotonic()
        if progress.stage == self.written_stage and now - self.last_write < self.min_interval:
            return
        self._write_progress(progress, None)

    def on_epoch_end(self, progress: Progress) -> None:
        training = {"stage": progress.stage, "epoch": progress.epoch, "epochs": progress.epochs, **progress.metrics}
        self._write_progress(progress, {"training": training})

    def on_checkpoint(self, path: Path) -> None:
        if self.job_run.flags.stop.is_set():
            return  # a lost run must not overwrite the new holder's checkpoint
        try:
            self.job_run.storage.put_file(self.job_run.checkpoint_key, path)
        except (OSError, StorageError) as exc:
            logger.warning("could not store the checkpoint (the next epoch's will be tried): %s", exc)

    def on_log(self, message: str) -> None:
        logger.info("%s", message)
        self.job_run.event("log", {"message": message})
        resumed = _RESUME_MESSAGE.search(message)
        if resumed:
            self.job_run.event(
                "resume",
                {
                    "stage": resumed["stage"],
                    "epoch": int(resumed["epoch"]),
                    "attempt": self.job_run.attempt,
                    "message": message,
                },
            )

    def _write_progress(self, progress: Progress, metrics: dict[str, Any] | None) -> None:
        self.last_write = time.monotonic()
        self.written_stage = progress.stage
        values = {
            "fraction": round(progress.fraction, 6),
            "epoch": progress.epoch,
            "epochs": progress.epochs,
            "step": progress.step,
            "steps": progress.steps,
            "eta_s": None if progress.eta_s is None else round(progress.eta_s, 1),
        }
        self.job_run.write(self._record(stage=progress.stage, progress=values, metrics=metrics), what="progress")

    def _record(self, **changes: Any) -> Callable[[Session], bool]:
        job_run = self.job_run
        return lambda session: state.record_progress(session, job_run.job_id, job_run.worker_id, **changes)


# Endings ------------------------------------------------------------------------------------


def _succeed(job_run: JobRun, out_dir: Path, result: RunResult) -> Outcome:
    uploaded: list[tuple[str, StoredObject]] = []
    try:
        for path in result.artifacts:
            name = _artifact_name(path, out_dir)
            uploaded.append((name, job_run.storage.put_file(job_run.artifact_prefix + name, path)))
        if job_run.flags.stop.is_set():
            raise _Halted(job_run.flags.reason)
        metrics = {k: v for k, v in result.metrics.items() if k not in METRICS_KEPT_OUT_OF_ROW}
        # The artifacts, the final metrics and the new state become visible together, or not at all.
        with session_scope(job_run.session_factory) as session:
            if not state.record_progress(session, job_run.job_id, job_run.worker_id, metrics=metrics):
                raise IllegalTransitionError(job_run.job_id, JobState.SUCCEEDED, None, code="not_job_holder")
            for name, stored in uploaded:
                record_artifact(session=session, job_id=job_run.job_id, name=name, stored=stored)
            state.finish(session, job_run.job_id, job_run.worker_id, state=JobState.SUCCEEDED)
    except IllegalTransitionError:
        job_run.flags.halt("the job's lease went to another worker", lost=True)
        _forget_uploads(job_run)
        return Outcome.LOST
    except BaseException:
        _forget_uploads(job_run)
        raise
    delete_checkpoints(job_run.storage, job_run.job_id)
    return Outcome.SUCCEEDED


def _artifact_name(path: Path, out_dir: Path) -> str:
    parts = path.relative_to(out_dir).parts
    name = "/".join(_UNSAFE_KEY_CHARS.sub("_", part).lstrip("._-") or "file" for part in parts)
    check_key(name)
    return name


def _settle_failure(job_run: JobRun, exc: Exception) -> Outcome:
    from kdcore.errors import CancelledError, KDError

    flags = job_run.flags
    if flags.lost:
        logger.warning("stopped: %s; the other holder carries on", flags.reason)
        return Outcome.LOST
    if isinstance(exc, CancelledError | _Halted) or flags.stop.is_set():
        if flags.cancel_requested:
            return _finish(job_run, JobState.CANCELLED, None, f"cancelled: {exc}", remove_checkpoints=True)
        if flags.shutdown:
            return _hand_back(job_run, Outcome.STOPPED, "the worker was stopped; the job goes back to the queue "
                              "and continues from its last checkpoint")
    if isinstance(exc, InputMissingError):
        return _finish(job_run, JobState.FAILED, exc.code, str(exc), remove_checkpoints=True)
    if isinstance(exc, KDError) and exc.code not in RETRYABLE_ENGINE_CODES:
        logger.info("job failed permanently [%s]: %s", exc.code, exc)
        return _finish(job_run, JobState.FAILED, exc.code, str(exc), remove_checkpoints=True)
    code, message = _infrastructure_error(exc)
    logger.error("attempt %d failed [%s]: %s", job_run.attempt, code, message, exc_info=exc)
    if job_run.attempt >= job_run.max_attempts:
        return _finish(
            job_run,
            JobState.FAILED,
            code,
            f"{message} (attempt {job_run.attempt} of {job_run.max_attempts}; not retried again)",
            remove_checkpoints=True,
        )
    return _hand_back(job_run, Outcome.RETRY, f"attempt {job_run.attempt} failed [{code}]: {message}; retrying")


def _infrastructure_error(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, MemoryError) or _is_out_of_memory(exc):
        return "out_of_memory", f"out of memory: {exc}; lower batch_size or use a larger machine"
    if isinstance(exc, SQLAlchemyError):
        return "database_unavailable", f"the database failed: {type(exc).__name__}: {exc}"
    if isinstance(exc, StorageError | OSError):
        return "storage_unavailable", f"storage failed: {type(exc).__name__}: {exc}"
    return "internal", f"internal error: {type(exc).__name__}: {exc}"


def _is_out_of_memory(exc: BaseException) -> bool:
    return type(exc).__name__ == "OutOfMemoryError" or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


def _finish(
    job_run: JobRun, final: JobState, code: str | None, message: str, *, remove_checkpoints: bool
) -> Outcome:
    def change(session: Session) -> bool:
        try:
            state.finish(session, job_run.job_id, job_run.worker_id, state=final, error_code=code,
                         error_message=message)
        except IllegalTransitionError:
            return False
        return True

    if not job_run.write(change, what=f"the final state {final}"):
        return Outcome.LOST
    if remove_checkpoints:
        delete_checkpoints(job_run.storage, job_run.job_id)
    return Outcome(str(final))


def _hand_back(job_run: JobRun, outcome: Outcome, message: str) -> Outcome:
    """Give the job back: end the lease now, so the next reaper pass requeues it for any worker.

    A worker that was told to stop refunds the attempt; one that hit an error does not, so a job
    that keeps failing still ends after `max_attempts`.
    """
    logger.info("%s", message)

    def change(session: Session) -> bool:
        state.append_event(session, job_run.job_id, "log", {"message": message})
        return state.hand_back(session, job_run.job_id, job_run.worker_id,
                               refund_attempt=outcome == Outcome.STOPPED)

    return outcome if job_run.write(change, what="the hand-back") else Outcome.LOST


def _forget_uploads(job_run: JobRun) -> None:
    try:
        job_run.storage.delete_prefix(job_run.artifact_prefix)
    except Exception as exc:  # orphans under the job's prefix; deleting the job removes them
        logger.warning("could not remove this attempt's uploads: %s", exc)


# The heartbeat and the stop signal ----------------------------------------------------------


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
def _stop_on_sigterm(flags: StopFlags) -> Iterator[None]:
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
