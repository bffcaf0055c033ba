"""Jobs: submit (validate, record, enqueue), list, read, cancel, delete."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Row, bindparam, delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from kdcore.archive import ArchiveLimits
from kdcore.errors import KDError
from kdcore.limits import (
    ResourceLimits,
    check_dataset_bytes,
    check_parameters,
    dataset_bytes,
    hf_student_parameters_floor,
    model_input_shape,
    student_parameters,
)
from kdcore.spec import JobSpec
from service import keys, state, tuning
from service.artifacts import delete_checkpoints
from service.errors import ServiceError
from service.files import resolve_file
from service.ids import new_id
from service.lm_checks import check_lm_memory, check_lm_student
from service.models import ACTIVE_STATES, FINISHED_STATES, File, FilePurpose, Job, JobFile, JobState
from service.queue import enqueue_job
from service.quota import lock_owner
from service.settings import Settings
from service.state import IllegalTransitionError
from service.storage import Storage
from service.text_checks import check_datasets, resolve_spec

logger = logging.getLogger("distillery.api")

CODE_TEACHER_FORMATS = ("torchscript", "exported")
WEIGHTS_ONLY_FORMATS = ("safetensors", "state_dict")


@dataclass(frozen=True)
class Submission:
    job: Job
    created: bool  # False when an Idempotency-Key replayed an earlier submission


def spec_digest(spec: JobSpec) -> str:
    canonical = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def submit_job(
    *, session: Session, settings: Settings, owner_id: str, spec: JobSpec, idempotency_key: str | None
) -> Submission:
    """Check the spec against the caller's files and limits, then record the job as queued (not enqueued)."""
    digest = spec_digest(spec)
    if idempotency_key is not None and (earlier := _replay(session, owner_id, idempotency_key, digest)):
        return Submission(earlier, created=False)
    check_spec_lists(spec.model_dump(mode="json"), settings.max_spec_list_length)
    check_distributed(spec, settings)
    inputs = _resolve_inputs(session=session, owner_id=owner_id, spec=spec)
    spec = resolve_spec(spec, inputs["teacher"])
    check_datasets(spec, inputs["teacher"], {role: inputs[role] for role in ("train", "test") if role in inputs})
    check_resources(settings=settings, spec=spec, teacher=inputs["teacher"],
                    datasets={role: inputs[role] for role in ("train", "test") if role in inputs})
    if spec.task == "causal_lm":
        check_lm_student(inputs["teacher"], inputs.get("student"))
        check_lm_memory(spec, inputs["teacher"], inputs.get("student"), resource_limits(settings))
    _check_teacher(
        settings=settings,
        spec=spec,
        teacher=inputs["teacher"],
        datasets=[inputs[role] for role in ("train", "test") if role in inputs],
    )
    _check_concurrency(session=session, settings=settings, owner_id=owner_id, needed=2 if spec.tune else 1)

    job = Job(
        id=new_id("job"),
        owner_id=owner_id,
        name=spec.name,
        spec=spec.model_dump(mode="json"),
        spec_sha256=digest,
        idempotency_key=idempotency_key,
        queue=queue_for(spec, settings),
        state=JobState.QUEUED,
        max_attempts=settings.max_attempts,
        progress={"fraction": 0.0},
        tune=tuning.initial_state() if spec.tune else None,
    )
    session.add(job)
    session.add_all(JobFile(job_id=job.id, role=role, file_id=file.id) for role, file in inputs.items())
    state.append_event(session, job.id, "state", {"state": JobState.QUEUED.value})
    try:
        session.commit()
    except IntegrityError:
        # Two requests with the same Idempotency-Key raced; the other one's job is the answer.
        session.rollback()
        if idempotency_key is not None and (earlier := _replay(session, owner_id, idempotency_key, digest)):
            return Submission(earlier, created=False)
        raise
    return Submission(job, created=True)


def queue_for(spec: JobSpec, settings: Settings) -> str:
    """CPU-only jobs go to the `cpu` queue so they never wait for (or occupy) a GPU worker."""
    return sized_queue("cpu" if spec.device == "cpu" else settings.default_queue, spec.distributed.nproc)


def _replay(session: Session, owner_id: str, key: str, digest: str) -> Job | None:
    earlier = session.scalar(select(Job).where(Job.owner_id == owner_id, Job.idempotency_key == key))
    if earlier is not None and earlier.spec_sha256 != digest:
        raise ServiceError(
            409,
            "idempotency_key_reused",
            "this Idempotency-Key was used for a different spec; use a new key for a new job",
            field="Idempotency-Key",
        )
    return earlier


def _resolve_inputs(*, session: Session, owner_id: str, spec: JobSpec) -> dict[str, File]:
    references = {
        "teacher": (spec.teacher.file, FilePurpose.TEACHER, "teacher.file"),
        "train": (spec.data.train, FilePurpose.DATASET, "data.train"),
    }
    if spec.student.file is not None:
        references["student"] = (spec.student.file, FilePurpose.TEACHER, "student.file")
    if spec.data.test is not None:
        references["test"] = (spec.data.test, FilePurpose.DATASET, "data.test")
    return {
        role: resolve_file(session=session, owner_id=owner_id, file_id=file_id, purpose=purpose, field=field)
        for role, (file_id, purpose, field) in references.items()
    }


def _check_teacher(*, settings: Settings, spec: JobSpec, teacher: File, datasets: list[File]) -> None:
    """What can be told from the sniffed metadata alone; the worker's deep check does the rest."""
    sniffed = teacher.info.get("format")
    declared = spec.teacher.format
    if declared != "auto" and sniffed and declared != sniffed:
        raise ServiceError(
            422,
            "teacher_format_mismatch",
            f"the teacher file is {sniffed}, not {declared}; use format auto or {sniffed}",
            field="teacher.format",
        )
    effective = sniffed if declared == "auto" else declared
    if effective in CODE_TEACHER_FORMATS and not settings.allow_code_teachers:
        raise ServiceError(
            422,
            "unsafe_format",
            f"{effective} teachers carry executable code and this server does not accept them; "
            "export the teacher as safetensors (with its registry arch) or ONNX",
            field="teacher.format",
        )
    if effective in WEIGHTS_ONLY_FORMATS and spec.teacher.arch is None:
        raise ServiceError(
            422,
            "teacher_arch_required",
            f"a {effective} teacher holds weights only: name its registry architecture",
            field="teacher.arch",
        )
    output_size = teacher.info.get("output_size")
    for dataset, field in zip(datasets, ("data.train", "data.test"), strict=False):
        num_classes = dataset.info.get("num_classes")
        if output_size and num_classes and output_size != num_classes:
            raise ServiceError(
                422,
                "teacher_data_mismatch",
                f"the teacher has {output_size} outputs but {field} has {num_classes} classes",
                field="teacher.file",
            )


def check_spec_lists(value: Any, max_length: int, path: str = "") -> None:
    """No list anywhere in a spec (arch_args included) longer than the operator's limit."""
    if isinstance(value, list):
        if len(value) > max_length:
            raise ServiceError(
                422, "invalid_spec",
                f"has {len(value)} entries, more than the limit of {max_length} (DISTILLERY_MAX_SPEC_LIST_LENGTH)",
                field=path or "spec",
            )
        for index, item in enumerate(value):
            check_spec_lists(item, max_length, f"{path}.{index}" if path else str(index))
    elif isinstance(value, dict):
        for key, item in value.items():
            check_spec_lists(item, max_length, f"{path}.{key}" if path else str(key))


def resource_limits(settings: Settings) -> ResourceLimits:
    """The engine's limits from the operator's settings (the worker passes the same to the engine)."""
    return ResourceLimits(
        archive=ArchiveLimits(
            max_decoded_bytes=settings.max_dataset_bytes,
            max_central_directory_bytes=settings.max_zip_central_directory_bytes,
        ),
        max_model_parameters=settings.max_model_parameters,
        max_train_memory_bytes=settings.max_train_memory_bytes,
        onnx_arena_bytes=settings.onnx_arena_bytes,
    )


def check_resources(*, settings: Settings, spec: JobSpec, teacher: File, datasets: dict[str, File]) -> None:
    """What the sniffed files tell of a job's size, before it is queued; the worker checks the rest."""
    limits = resource_limits(settings)
    train = datasets["train"].info
    try:
        for role, dataset in datasets.items():
            check_dataset_bytes(dataset_bytes(dataset.info, spec.data.image_size), limits, field=f"data.{role}")
        num_classes = int(teacher.info.get("output_size") or train.get("num_classes") or 2)
        input_shape = model_input_shape(train, spec.data.image_size)
        parameters = _student_parameters(spec, teacher, input_shape, num_classes)
        if parameters is not None:
            check_parameters(parameters, limits)
    except KDError as exc:
        raise ServiceError(422, exc.code, exc.message, field=exc.field) from None


def _student_parameters(spec: JobSpec, teacher: File, input_shape: list[int], num_classes: int) -> int | None:
    """The student's size where a torch-free formula tells it (mlp, cnn, resnet_small exactly; hf as a
    floor); None for the rest (torchvision, text_bilstm, pretrained students), which the worker counts
    on the meta device at its check stage, within seconds."""
    if spec.student.file is not None:
        return None
    if spec.student.arch == "hf":
        return hf_student_parameters_floor(teacher.info.get("hf") or {}, spec.student.arch_args)
    if not input_shape:
        return None
    return student_parameters(spec.student.arch or "mlp", spec.student.arch_args, input_shape, num_classes)


def _check_concurrency(*, session: Session, settings: Settings, owner_id: str, needed: int = 1) -> None:
    # One check of this user at a time, on PostgreSQL and SQLite alike: two submissions cannot
    # both squeeze under the limit.
    lock_owner(session, owner_id)
    active = session.scalar(
        select(func.count()).select_from(Job).where(Job.owner_id == owner_id, Job.state.in_(ACTIVE_STATES))
    )
    # A tuned job needs room for itself and one trial at least: its trials count against the limit too.
    if (active or 0) + needed > settings.max_concurrent_jobs:
        raise ServiceError(
            429,
            "too_many_jobs",
            f"you have {active} queued or running jobs, the limit is {settings.max_concurrent_jobs}"
            + (" (a tuned job needs room for itself and a trial)" if needed > 1 else "")
            + "; wait for one to finish or cancel one",
            headers={"Retry-After": "30"},
        )


def list_jobs(
    *,
    session: Session,
    owner_id: str,
    limit: int,
    cursor: str | None = None,
    state_filter: JobState | None = None,
) -> tuple[list[Job], str | None]:
    query = select(Job).where(Job.owner_id == owner_id)
    if cursor is not None:
        query = query.where(Job.id < cursor)
    if state_filter is not None:
        query = query.where(Job.state == state_filter)
    rows = list(session.scalars(query.order_by(Job.id.desc()).limit(limit + 1)))
    return rows[:limit], (rows[limit - 1].id if len(rows) > limit else None)


def get_job(*, session: Session, owner_id: str, job_id: str) -> Job | None:
    return session.scalar(select(Job).where(Job.id == job_id, Job.owner_id == owner_id))


# The status poll (`GET /v1/jobs/{id}`) is the API's hottest read: a Core SELECT of the columns
# JobOut shows, on the table rather than the mapped class (no ORM compile, identity map or instance
# state for a row that is only serialised), built once so that SQLAlchemy's compiled cache is hit
# straight away. The owner is a condition in SQL, as everywhere.
_job = Job.__table__.c
_STATUS_COLUMNS = (
    "id", "name", "state", "stage", "queue", "progress", "metrics", "error_code", "error_message", "attempts",
    "max_attempts", "cancel_requested", "spec", "created_at", "started_at", "finished_at", "updated_at",
    "parent_id", "trial", "tune",
)  # fmt: skip
_STATUS_QUERY = select(*(_job[name] for name in _STATUS_COLUMNS)).where(
    _job.id == bindparam("job_id"), _job.owner_id == bindparam("owner_id")
)


def read_job_status(*, connection: Connection, owner_id: str, job_id: str) -> Row[Any] | None:
    """The caller's job as a row with JobOut's fields (attribute access like a Job), or None."""
    return connection.execute(_STATUS_QUERY, {"job_id": job_id, "owner_id": owner_id}).first()


_TRIAL_COLUMNS = ("id", "state", "trial", "error_code", "started_at", "finished_at")
_TRIALS_QUERY = select(*(_job[name] for name in _TRIAL_COLUMNS)).where(_job.parent_id == bindparam("parent_id"))


def read_search(*, connection: Connection, job: Row[Any]) -> dict[str, Any] | None:
    """A tuned job's search as the API shows it (trials with their settings, state and metric), else None."""
    if job.tune is None:
        return None
    trials = connection.execute(_TRIALS_QUERY, {"parent_id": job.id}).all()
    return tuning.search_summary(job, sorted(trials, key=lambda row: int((row.trial or {}).get("number", 0))))


def cancel_job(*, session: Session, storage: Storage, job: Job) -> Job:
    try:
        now = state.request_cancel(session, job.id)
    except IllegalTransitionError as exc:
        raise ServiceError(409, exc.code, f"job {job.id} is {exc.current} and can no longer be cancelled") from None
    session.commit()
    if now == JobState.CANCELLED:
        # Cancelled while queued: no worker will clean up, and a handed-back job has checkpoints.
        delete_checkpoints(storage, job.id)
    if job.tune is not None:
        # A tuned job's cancel is its trials' too, and ends a parent that only its search holds.
        for trial_id in tuning.cancel_search(session=session, parent_id=job.id):
            delete_checkpoints(storage, trial_id)
        session.commit()
    session.refresh(job)
    return job


def delete_job(*, session: Session, storage: Storage, job: Job) -> None:
    """Delete a finished job, its log, artifacts and checkpoints."""
    trial_ids = list(session.scalars(select(Job.id).where(Job.parent_id == job.id)))
    if trial_ids and session.scalar(select(func.count()).select_from(Job).where(
            Job.parent_id == job.id, Job.state.in_(ACTIVE_STATES))):
        raise ServiceError(409, "job_not_finished", f"job {job.id} still has trials running; cancel it first")
    # Conditional, like every state-dependent write: a job requeued a moment ago is not finished.
    result = session.execute(
        delete(Job).where(Job.id == job.id, Job.state.in_(FINISHED_STATES)).execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        session.rollback()
        raise ServiceError(409, "job_not_finished", f"job {job.id} is {job.state}; cancel it and wait until it stops")
    session.commit()
    # The trials' rows go with the parent's (ON DELETE CASCADE); their stored files are removed here.
    for job_id in [job.id, *trial_ids]:
        storage.delete_prefix(keys.job_prefix(job_id))


def enqueue(*, session: Session, settings: Settings, job: Job) -> None:
    """Hand a committed job to the broker; a failure is logged and left to the worker's reaper."""
    try:
        enqueue_job(job.id, settings=settings, queue=job.queue)
    except Exception:
        logger.exception("could not enqueue job %s; it stays queued for the reaper to re-send", job.id)
        return
    state.mark_enqueued(session, [job.id])
    session.commit()


def check_distributed(spec: JobSpec, settings: Settings) -> None:
    """A job asking for more processes than any worker runs is refused now, not left queued forever."""
    nproc = spec.distributed.nproc
    if nproc > settings.max_job_processes:
        raise ServiceError(
            422, "bad_input",
            f"distributed.nproc is {nproc}, but this service's largest worker runs {settings.max_job_processes} "
            "process(es) per job (DISTILLERY_MAX_JOB_PROCESSES, a worker started with --gpus N); ask for fewer",
            field="distributed.nproc",
        )
    if nproc > 1 and spec.tune is not None:
        raise ServiceError(422, "bad_input", "a tuned job's trials run on one process each; set distributed.nproc "
                           "to 1 or leave tune out", field="distributed.nproc")


def sized_queue(queue: str, nproc: int) -> str:
    """Jobs of `nproc` processes have their own queue, taken only by workers with that many devices."""
    return queue if nproc <= 1 else f"{queue}-x{nproc}"
