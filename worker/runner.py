"""Run one job: claim it, fetch its inputs, run the engine, store what it made, record how it went.

The job's row is the truth. `claim` is one conditional UPDATE (only a queued job can be taken),
so a duplicate delivery finds the job taken and returns. While the engine runs, a heartbeat
thread (`worker.heartbeat`) renews the lease and reads the cancel flag; the engine reports through
`worker.callbacks.JobCallbacks` and asks `should_cancel` before every step, which reads a
threading.Event of the attempt (`worker.job_run`). Three things can stop a run early:

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

import logging
import os
import re
import socket
import tempfile
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from service import state, tuning
from service.artifacts import delete_checkpoints, record_artifact
from service.db import create_db_engine, create_session_factory, session_scope
from service.jobs import resource_limits
from service.keys import CHECKPOINT_NAME, teacher_cache_key
from service.models import FINISHED_STATES, File, Job, JobFile, JobState
from service.quota import QuotaExceededError, check_artifacts_fit
from service.settings import Settings
from service.state import IllegalTransitionError
from service.storage import StorageError, StoredObject, check_key
from worker import lm_cache
from worker.callbacks import JobCallbacks, TrialCallbacks
from worker.heartbeat import Heartbeat, stop_on_sigterm
from worker.job_run import JobRun, Outcome
from worker.limits import capped_threads, memory_limit, memory_limit_message
from worker.logs import job_logging
from worker.scratch import attempt_prefix

if TYPE_CHECKING:
    from kdcore.pipeline import JobInputs, RunResult
    from kdcore.spec import JobSpec

logger = logging.getLogger("distillery.worker")

# The engine's deliberate errors are deterministic: running the job again fails the same way.
RETRYABLE_ENGINE_CODES = frozenset({"internal"})
# metrics.json keys too big for the job row (they stay in the artifact and the report).
METRICS_KEPT_OUT_OF_ROW = ("student_confusion",)
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9._-]")


class InputMissingError(Exception):
    code = "input_missing"


class _Halted(Exception):
    """Raised between phases when a stop was asked for (the engine raises CancelledError inside)."""


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def run(job_id: str, settings: Settings, *, worker_id: str | None = None) -> Outcome:
    """Claim and run one job. Never raises for the job's own failures: they are recorded on its row."""
    engine = create_db_engine(settings.database_url)
    try:
        return _claim_and_run(job_id, settings, create_session_factory(engine), worker_id or default_worker_id())
    finally:
        engine.dispose()


def _claim_and_run(
    job_id: str, settings: Settings, session_factory: sessionmaker[Session], worker_id: str
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
            select(JobFile.role, File.storage_key, File.name, File.sha256).join(File, File.id == JobFile.file_id)
            .where(JobFile.job_id == job_id)
        ).all()
        inputs: dict[str, tuple[str, str] | None] = {role: (key, name) for role, key, name, _ in rows}
        job_run = JobRun(
            job_id=job_id,
            worker_id=worker_id,
            attempt=job.attempts,
            max_attempts=job.max_attempts,
            spec=dict(job.spec),
            input_keys=inputs,
            settings=settings,
            session_factory=session_factory,
            owner_id=job.owner_id,
            input_sha256={role: sha256 for role, _, _, sha256 in rows},
        )
        _tune_part(session, job, job_run)
    with job_logging(job_id, job_run.attempt):
        logger.info("running job %s (attempt %d of %d)", job_id, job_run.attempt, job_run.max_attempts)
        heartbeat = Heartbeat(job_run)
        heartbeat.start()
        try:
            with stop_on_sigterm(job_run.flags):
                outcome = _attempt(job_run)
        finally:
            heartbeat.stop()
        logger.info("job %s: %s", job_id, outcome.value)
        if job_run.parent_id is not None and outcome.value in {str(s) for s in FINISHED_STATES}:
            _advance_search(job_run, job_run.parent_id)
        return outcome


# A tuned job (service.tuning) ----------------------------------------------------------------


def _tune_part(session: Session, job: Job, job_run: JobRun) -> None:
    """What a tuned job's parent or trial needs beyond a plain job: its phase, its spec, the shared cache."""
    if job.parent_id is not None:
        parent = session.get(Job, job.parent_id)
        job_run.parent_id = job.parent_id
        if parent is not None and tuning.shares_teacher_cache(parent.spec):
            job_run.teacher_cache_key = (parent.tune or {}).get("teacher_cache_key")
        return
    if job.tune is None:
        return
    job_run.tune_phase = job.tune.get("phase")
    if tuning.shares_teacher_cache(job.spec):
        job_run.teacher_cache_key = teacher_cache_key(job.id)
    if job_run.tune_phase == tuning.FINAL:
        job_run.spec = tuning.final_spec(job.spec, job.tune["best"])
        job_run.search = tuning.search_summary(job, tuning.trials_of(session, job.id))


def _prepare_search(job_run: JobRun, work: Path) -> Outcome:
    """A tuned job's first run: the deep check and the teacher's logits once, then its search starts."""
    from kdcore.pipeline import RunOptions, prepare_teacher_cache
    from kdcore.spec import parse_spec

    inputs = _download_inputs(job_run, work / "inputs")
    spec = parse_spec(job_run.spec)
    spec = spec.model_copy(update={"threads": capped_threads(job_run.settings, spec.threads)})
    cache_file = work / "teacher_cache.pt" if job_run.teacher_cache_key else None
    options = RunOptions(out_dir=work / "out", allow_code_teachers=job_run.settings.allow_code_teachers,
                         teacher_cache=cache_file, limits=resource_limits(job_run.settings))
    written = prepare_teacher_cache(spec, inputs, options, JobCallbacks(job_run))
    if written is not None and job_run.teacher_cache_key is not None:
        job_run.storage.put_file(job_run.teacher_cache_key, written)
    if job_run.flags.stop.is_set():
        raise _Halted(job_run.flags.reason)
    to_enqueue: list[str] = []

    def hand_to_search(session: Session) -> bool:
        advance = tuning.start_search(session=session, settings=job_run.settings, parent_id=job_run.job_id,
                                      worker_id=job_run.worker_id,
                                      teacher_cache_key=job_run.teacher_cache_key if written else None)
        if advance is None:
            return False  # the job is no longer this worker's
        to_enqueue.extend(advance.to_enqueue)
        return True

    if not job_run.write(hand_to_search, what="the search's start"):
        return Outcome.LOST
    _send(job_run.settings, job_run.session_factory, to_enqueue)
    return Outcome.SEARCHING


def _advance_search(job_run: JobRun, parent_id: str) -> None:
    """A trial ended: its parent's search records it and moves on (the reaper does it too, if this fails)."""
    to_enqueue: list[str] = []
    try:
        with session_scope(job_run.session_factory) as session:
            to_enqueue = tuning.advance(session=session, settings=job_run.settings, parent_id=parent_id).to_enqueue
    except SQLAlchemyError as exc:
        logger.warning("could not advance the search of %s (the reaper will): %s", parent_id, exc)
        return
    _send(job_run.settings, job_run.session_factory, to_enqueue)


def _send(settings: Settings, session_factory: sessionmaker[Session], job_ids: list[str]) -> None:
    from service.queue import enqueue_job

    sent = []
    for job_id in job_ids:
        with session_scope(session_factory) as session:
            queue = session.scalar(select(Job.queue).where(Job.id == job_id))
        try:
            enqueue_job(job_id, settings=settings, queue=queue or settings.default_queue)
        except Exception as exc:  # the reaper re-sends a queued job whose message is missing
            logger.warning("could not send job %s (the reaper will): %s", job_id, exc)
            continue
        sent.append(job_id)
    with session_scope(session_factory) as session:
        state.mark_enqueued(session, sent)


def _attempt(job_run: JobRun) -> Outcome:
    scratch = job_run.settings.work_dir
    if scratch is not None:
        scratch.mkdir(parents=True, exist_ok=True)
    device = str(job_run.spec.get("device") or "auto")
    with (
        tempfile.TemporaryDirectory(prefix=attempt_prefix(job_run.job_id), dir=scratch) as work,
        memory_limit(job_run.settings.job_memory_bytes, device=device) as limited,
    ):
        job_run.memory_limited = limited
        try:
            if job_run.tune_phase == tuning.PREPARE:
                return _prepare_search(job_run, Path(work))
            out_dir, result = _distill(job_run, Path(work))
            if job_run.flags.stop.is_set():
                raise _Halted(job_run.flags.reason)
            return _succeed(job_run, out_dir, result)
        except Exception as exc:
            return _settle_failure(job_run, _without_paths(exc, Path(work), job_run))


# The run ------------------------------------------------------------------------------------


def _distill(job_run: JobRun, work: Path) -> tuple[Path, RunResult]:
    from kdcore.spec import parse_spec

    inputs = _download_inputs(job_run, work / "inputs")
    checkpoint_dir = work / "checkpoints"
    resumable = _download_checkpoint(job_run, checkpoint_dir / CHECKPOINT_NAME)
    teacher_cache = _download_teacher_cache(job_run, work / "teacher_cache.pt")
    if job_run.flags.stop.is_set():
        raise _Halted(job_run.flags.reason)

    spec = parse_spec(job_run.spec)
    # The operator's cap, not the spec, decides: 64 threads on a 2-core host starve everything else.
    spec = spec.model_copy(update={"threads": capped_threads(job_run.settings, spec.threads)})
    lent = lm_cache.lend(job_run.storage, spec, owner_id=job_run.owner_id or "", sha256=job_run.input_sha256,
                         folder=work / "lm_cache") if job_run.owner_id else None
    try:
        return _run_engine(job_run, spec, inputs, work, resumable=resumable, teacher_cache=teacher_cache,
                           lm_cache_dir=lent.folder if lent else None)
    finally:
        # Kept even when the job fails later on: its retry, and the owner's next job, skip the teacher.
        lm_cache.keep(job_run.storage, lent)


def _run_engine(job_run: JobRun, spec: JobSpec, inputs: JobInputs, work: Path, *, resumable: bool,
                teacher_cache: Path | None, lm_cache_dir: Path | None) -> tuple[Path, RunResult]:
    from kdcore.errors import KDError
    from kdcore.pipeline import RunOptions, run_job

    checkpoint_dir = work / "checkpoints"
    options = RunOptions(
        out_dir=work / "out",
        checkpoint_dir=checkpoint_dir,
        resume=True,
        allow_code_teachers=job_run.settings.allow_code_teachers,
        progress_interval_s=min(1.0, job_run.settings.progress_write_seconds or 1.0),
        latency_runs=job_run.settings.latency_runs,
        limits=resource_limits(job_run.settings),
        teacher_cache=teacher_cache,
        lm_cache_dir=lm_cache_dir,
        job_id=job_run.job_id,
    )
    callbacks = _callbacks(job_run)
    if spec.distributed.nproc > 1:
        from worker.launched import run_launched

        return options.out_dir, run_launched(spec=spec, inputs=inputs, out_dir=options.out_dir,
                                             checkpoint_dir=checkpoint_dir, limits=options.limits,
                                             job_id=job_run.job_id, callbacks=callbacks, flags=job_run.flags,
                                             work=work)
    try:
        return options.out_dir, _with_search_report(job_run, options.out_dir, run_job(spec, inputs, options,
                                                                                      callbacks))
    except KDError as exc:
        if exc.code != "bad_checkpoint" or not resumable:
            raise
    # A checkpoint this engine cannot read (another version, a damaged upload): start over.
    logger.warning("the stored checkpoint is unusable; starting the job from the beginning")
    job_run.event("log", {"message": "the checkpoint of an earlier attempt is unusable; starting over"})
    (checkpoint_dir / CHECKPOINT_NAME).unlink(missing_ok=True)
    job_run.storage.delete(job_run.checkpoint_key)
    return options.out_dir, _with_search_report(job_run, options.out_dir,
                                                run_job(spec, inputs, options, _callbacks(job_run)))


def _callbacks(job_run: JobRun) -> JobCallbacks:
    if job_run.parent_id is None:
        return JobCallbacks(job_run)
    with session_scope(job_run.session_factory) as session:
        parent_spec = session.scalar(select(Job.spec).where(Job.id == job_run.parent_id)) or {}
    return TrialCallbacks(job_run, metric=tuning.tune_of(parent_spec).metric) if parent_spec else JobCallbacks(job_run)


def _with_search_report(job_run: JobRun, out_dir: Path, result: RunResult) -> RunResult:
    """A tuned job's full run: its report shows the search (table, plots), its metrics the outcome."""
    if job_run.search is None:
        return result
    from kdcore.tune_report import write_search_report

    written = write_search_report(job_run.search, out_dir)
    result.artifacts += [path for path in written if path not in result.artifacts]
    result.metrics["tune"] = {k: v for k, v in job_run.search.items() if k != "trials"}
    return result


def _download_teacher_cache(job_run: JobRun, path: Path) -> Path | None:
    """The tuned job's shared teacher logits, where its parent computed them; None: compute as usual."""
    if job_run.teacher_cache_key is None:
        return None
    try:
        job_run.storage.get_file(job_run.teacher_cache_key, path)
    except FileNotFoundError:
        return None
    return path


def _download_inputs(job_run: JobRun, folder: Path) -> JobInputs:
    from kdcore.pipeline import JobInputs

    paths: dict[str, Path] = {}
    optional = {"test": (job_run.spec.get("data") or {}).get("test"),
                "student": (job_run.spec.get("student") or {}).get("file")}
    for role in ("teacher", "train", "test", "student"):
        entry = job_run.input_keys.get(role)
        if entry is None:
            if role in optional and not optional[role]:
                continue  # no separate test set, no pretrained student
            raise InputMissingError(f"the job's {_ROLES[role]} ({_FIELDS[role]}) was deleted; upload it again "
                                    "and submit a new job")
        key, name = entry
        path = _input_path(folder, role, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            job_run.storage.get_file(key, path)
        except FileNotFoundError:
            raise InputMissingError(
                f"the {_ROLES[role]} {name} ({_FIELDS[role]}) is missing from storage; upload it again and "
                "submit a new job"
            ) from None
        paths[role] = path
    return JobInputs(teacher=paths["teacher"], train=paths["train"], test=paths.get("test"),
                     student=paths.get("student"))


_ROLES = {"teacher": "teacher file", "train": "training data", "test": "test data", "student": "pretrained student"}
_FIELDS = {"teacher": "teacher.file", "train": "data.train", "test": "data.test", "student": "student.file"}


def _input_path(folder: Path, role: str, name: str) -> Path:
    """`inputs/train/blobs.npz`: the upload's own name, so the report's Data line names the user's file
    (not `train.npz`); a folder per role keeps a teacher and a dataset of the same name apart."""
    safe = name if name not in ("", ".", "..") and not re.search(r"[/\\\x00]", name) else f"{role}{_suffix(name)}"
    return folder / role / safe


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
            owner_id = session.scalar(select(Job.owner_id).where(Job.id == job_run.job_id))
            if owner_id is not None:  # artifacts count against the owner's quota, like uploads
                check_artifacts_fit(session=session, settings=job_run.settings, owner_id=owner_id,
                                    adding=sum(stored.size for _, stored in uploaded))
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
    if flags.failure is not None:
        logger.info("job failed [%s]: %s", *flags.failure)
        return _finish(job_run, JobState.FAILED, flags.failure[0], flags.failure[1], remove_checkpoints=True)
    if isinstance(exc, QuotaExceededError):
        return _finish(job_run, JobState.FAILED, exc.code, str(exc), remove_checkpoints=True)
    if job_run.memory_limited and (
        isinstance(exc, MemoryError) or _is_out_of_memory(exc) or "can't allocate memory" in str(exc)
    ):
        # The operator's limit, not a sick machine: running it again would fail the same way.
        message = memory_limit_message(job_run.settings, exc)
        logger.info("job failed [resource_limit]: %s", message)
        return _finish(job_run, JobState.FAILED, "resource_limit", message, remove_checkpoints=True)
    if flags.pruned and not flags.cancel_requested:
        return _finish(job_run, JobState.CANCELLED, "pruned", flags.reason, remove_checkpoints=True)
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


def _without_paths(exc: Exception, work: Path, job_run: JobRun) -> Exception:
    """The same error with the worker's scratch paths replaced by the user's own names for the files:
    a message is shown to the user, the worker's folders are none of their business."""
    names = {str(_input_path(work / "inputs", role, entry[1])): entry[1]
             for role, entry in job_run.input_keys.items() if entry is not None}
    text = str(exc)
    for path, name in names.items():
        text = text.replace(path, name)
    if str(work) not in text:
        return exc if text == str(exc) else _rewritten(exc, text)
    return _rewritten(exc, text.replace(str(work), "<job folder>"))


def _rewritten(exc: Exception, text: str) -> Exception:
    from kdcore.errors import KDError

    if isinstance(exc, KDError):
        exc.message = text.removeprefix(f"{exc.field}: ") if exc.field else text
        exc.args = (exc.message,)
        return exc
    try:
        clean = type(exc)(text)
    except Exception:
        return RuntimeError(text)
    clean.__cause__ = exc.__cause__
    return clean


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
