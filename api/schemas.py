"""Response bodies (requests are kdcore's JobSpec and plain parameters)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Row

from service.models import Artifact, File, FilePurpose, Job, JobState


class FileOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str = Field(examples=["file_01j9z3m8k2q4x7v5t6r8s0w1ya"])
    name: str = Field(examples=["teacher.safetensors"])
    purpose: FilePurpose
    size: int = Field(description="Bytes.", examples=[1_234_567])
    sha256: str = Field(examples=["9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"])
    info: dict[str, Any] = Field(
        description="What the upload check found: a teacher's format and output size, a dataset's shapes.",
        examples=[{"format": "safetensors", "output_size": 10, "num_tensors": 6}],
    )
    created_at: datetime

    @classmethod
    def of(cls, row: File) -> FileOut:
        return cls.model_validate(row)


class FileList(BaseModel):
    items: list[FileOut]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page.")


class Progress(BaseModel):
    fraction: float = Field(default=0.0, ge=0.0, le=1.0, description="Share of the job's work done.")
    epoch: int | None = Field(default=None, description="Current epoch of the current stage.")
    epochs: int | None = Field(default=None, description="Epochs of the current stage.")
    eta_s: float | None = Field(default=None, description="Estimated seconds left.")
    step: int | None = None
    steps: int | None = None


class JobError(BaseModel):
    code: str = Field(examples=["bad_input"])
    message: str | None = Field(examples=["teacher.file: not a teacher model: empty file"])


class TrialOut(BaseModel):
    number: int = Field(description="0 is the spec's own settings (the defaults).")
    job_id: str = Field(description="The trial's own job: its state, progress, events and artifacts.")
    state: JobState
    params: dict[str, Any] = Field(description="The settings this trial tried, by dotted spec path.",
                                   examples=[{"method.temperature": 2.0, "method.alpha": 0.5}])
    value: float | None = Field(description="Its validation metric (the last epoch's, or where it was pruned).")
    pruned: bool
    epochs_run: int
    latency_ms: float | None = Field(default=None, description="The student's CPU latency at batch 1, as measured.")
    params_count: int | None = Field(default=None, description="The student's parameters.")
    feasible: bool | None = Field(default=None, description="Within the objective's budget (null: not measured).")
    started_at: datetime | None = None
    finished_at: datetime | None = None


class SearchOut(BaseModel):
    """A tuned job's search (spec.tune): its trials and, once it ended, the winner."""

    phase: str | None = Field(description="prepare | search | final | failed.", examples=["search"])
    metric: str = Field(examples=["val_accuracy"])
    planned: int | None = Field(default=None, description="Trials the search runs.")
    objective: dict[str, Any] | None = None
    best: dict[str, Any] | None = Field(default=None, description="The settings the full run uses.")
    best_trial: int | None = None
    best_value: float | None = None
    defaults_value: float | None = Field(default=None, description="The metric of trial 0 (the spec's own settings).")
    gain_over_defaults: float | None = Field(default=None, description="best_value - defaults_value, on validation.")
    trials: list[TrialOut]


class JobOut(BaseModel):
    id: str = Field(examples=["job_01j9z3m8k2q4x7v5t6r8s0w1yb"])
    name: str | None
    state: JobState
    stage: str | None = Field(description="Pipeline stage while running, e.g. distill.", examples=["distill"])
    queue: str
    progress: Progress
    metrics: dict[str, Any] = Field(description="Latest metrics the worker reported.")
    error: JobError | None
    attempts: int
    max_attempts: int
    cancel_requested: bool
    spec: dict[str, Any] = Field(description="The job spec as submitted, defaults filled in.")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    parent_id: str | None = Field(default=None, description="For a trial: the tuned job it belongs to.")
    trial: dict[str, Any] | None = Field(default=None, description="For a trial: its number, settings and metric.")
    search: SearchOut | None = Field(
        default=None, description="For a tuned job, in `GET /v1/jobs/{id}`: its trials (ids, settings, state, metric)."
    )

    @classmethod
    def of(cls, job: Job | Row[Any], *, search: dict[str, Any] | None = None) -> JobOut:
        """From a Job, or a row of the job table's columns (the status read's, service.jobs)."""
        error = JobError(code=job.error_code, message=job.error_message) if job.error_code else None
        return cls(
            id=job.id,
            name=job.name,
            state=JobState(job.state),
            stage=job.stage,
            queue=job.queue,
            progress=Progress.model_validate(_clamped(job.progress or {})),
            metrics=job.metrics or {},
            error=error,
            attempts=job.attempts,
            max_attempts=job.max_attempts,
            cancel_requested=job.cancel_requested,
            spec=job.spec,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            updated_at=job.updated_at,
            parent_id=getattr(job, "parent_id", None),
            trial=getattr(job, "trial", None),
            search=SearchOut.model_validate(search) if search is not None else None,
        )


def _clamped(progress: dict[str, Any]) -> dict[str, Any]:
    # A worker's rounding must not turn a status read into a validation error.
    fraction = progress.get("fraction")
    if isinstance(fraction, int | float):
        progress = {**progress, "fraction": min(max(float(fraction), 0.0), 1.0)}
    return progress


class JobList(BaseModel):
    items: list[JobOut]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page.")


class ArtifactOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    name: str = Field(examples=["student.onnx"])
    size: int
    sha256: str
    content_type: str = Field(examples=["application/octet-stream"])
    created_at: datetime

    @classmethod
    def of(cls, row: Artifact) -> ArtifactOut:
        return cls.model_validate(row)


class ArtifactList(BaseModel):
    items: list[ArtifactOut]


class HealthOut(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = Field(default_factory=dict, examples=[{"database": "ok", "broker": "ok"}])
