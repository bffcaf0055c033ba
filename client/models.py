"""Typed responses of the REST API, mirroring `api/schemas.py` without its server imports.

The server's models build from database rows (SQLAlchemy), so the client keeps its own copies
(and its own spelling of the job states, which the server defines once in `service.models`).
They ignore fields they do not know (`extra="ignore"`): a newer server may add fields without
breaking an older client. `tests/api/test_client_models.py` checks them against the server's
schemas and parses the server's real responses with them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
FINISHED_STATES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
Purpose = Literal["teacher", "dataset"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class File(_Model):
    id: str
    name: str
    purpose: Purpose
    size: int
    sha256: str
    info: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime


class FilePage(_Model):
    items: list[File]
    next_cursor: str | None = None


class Progress(_Model):
    fraction: float = 0.0
    epoch: int | None = None
    epochs: int | None = None
    eta_s: float | None = None
    step: int | None = None
    steps: int | None = None


class JobError(_Model):
    code: str
    message: str | None = None


class Job(_Model):
    id: str
    name: str | None = None
    state: JobState
    stage: str | None = None
    queue: str = "default"
    progress: Progress = Field(default_factory=Progress)
    metrics: dict[str, Any] = Field(default_factory=dict)
    error: JobError | None = None
    attempts: int = 0
    max_attempts: int = 1
    cancel_requested: bool = False
    spec: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    updated_at: datetime
    parent_id: str | None = None
    trial: dict[str, Any] | None = None
    search: dict[str, Any] | None = None  # a tuned job's trials and winner (GET /v1/jobs/{id})

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_STATES

    @property
    def latest_accuracy(self) -> float | None:
        """The newest accuracy the job reported: the final student's, else the last epoch's validation."""
        student = self.metrics.get("student")
        if isinstance(student, dict) and isinstance(student.get("accuracy"), int | float):
            return float(student["accuracy"])
        training = self.metrics.get("training")
        if isinstance(training, dict) and isinstance(training.get("val_accuracy"), int | float):
            return float(training["val_accuracy"])
        return None

    def apply(self, event: JobEvent) -> Job:
        """This job as it is after `event` (events older than this snapshot change nothing)."""
        if _aware(event.created_at) < _aware(self.updated_at):
            return self
        data = event.data
        changes: dict[str, Any] = {"updated_at": event.created_at}
        if event.kind == "state" and isinstance(data.get("state"), str):
            changes["state"] = data["state"]
            error = data.get("error")
            changes["error"] = JobError.model_validate(error) if isinstance(error, dict) else None
        elif event.kind == "progress":
            if data.get("stage"):
                changes["stage"] = data["stage"]
            if isinstance(data.get("progress"), dict):
                changes["progress"] = Progress.model_validate(data["progress"])
            if isinstance(data.get("metrics"), dict):
                changes["metrics"] = {**self.metrics, **data["metrics"]}
        elif event.kind == "cancel_requested":
            changes["cancel_requested"] = True
        else:
            return self
        return self.model_copy(update=changes)


class JobPage(_Model):
    items: list[Job]
    next_cursor: str | None = None


class JobEvent(_Model):
    """One entry of a job's event log: `kind` is state, progress, log, resume or cancel_requested."""

    id: int
    kind: str
    data: dict[str, Any]
    created_at: datetime

    @property
    def message(self) -> str | None:
        value = self.data.get("message")
        return value if isinstance(value, str) else None


class Artifact(_Model):
    name: str
    size: int
    sha256: str
    content_type: str = "application/octet-stream"
    created_at: datetime | None = None


class ArtifactList(_Model):
    items: list[Artifact]


class Architecture(_Model):
    name: str
    family: str
    task: str = "image_classification"
    tasks: list[str] = Field(default_factory=list)  # every task it is a student for (servers before: `task` alone)
    description: str
    args_schema: dict[str, Any] = Field(default_factory=dict)
    defaults: dict[str, Any] = Field(default_factory=dict)


class Health(_Model):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = Field(default_factory=dict)


def _aware(moment: datetime) -> datetime:
    # The server writes UTC; SQLite hands timestamps back without a zone.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
