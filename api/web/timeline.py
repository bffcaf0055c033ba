"""A job's event log as the job page shows it: readable log lines and the per-epoch curve points.

The page renders what happened so far from the database, then follows the same events live
through `/web/jobs/{id}/events`; both go through `Timeline.feed`, so a line reads the same
whether it was there at load time or arrived a second ago.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from service import events
from service.models import JobEvent, JobState

STAGE_LABELS = {
    "check": "Checking the inputs",
    "teacher_finetune": "Teacher fine-tune",
    "teacher_cache": "Caching the teacher's outputs",
    "distill": "Distillation",
    "finetune": "Student fine-tune",
    "baseline": "Baseline (no teacher)",
    "evaluate": "Evaluation",
    "export": "Export",
    "report": "Report",
    "search": "Searching (trials on the queue)",
    "final": "Full run with the best settings",
}
CURVE_KEYS = ("train_loss", "val_loss", "train_accuracy", "val_accuracy")
PAGE_LOG_LINES = 300
_BATCH = 500


def stage_label(stage: str | None) -> str:
    if not stage:
        return "Waiting"
    return STAGE_LABELS.get(stage, stage.replace("_", " ").capitalize())


@dataclass
class LogLine:
    id: int
    at: datetime | str
    kind: str
    text: str
    level: str = "info"  # info | success | warning | error


@dataclass
class Timeline:
    stage: str | None = None
    lines: list[LogLine] = field(default_factory=list)
    points: list[dict[str, Any]] = field(default_factory=list)
    last_id: int = 0
    dropped_lines: int = 0

    def feed(self, event_id: int, kind: str, data: dict[str, Any], at: datetime | str) -> tuple[LogLine | None, dict]:
        """Take one event; return its log line (if it deserves one) and its curve point (or {})."""
        self.last_id = max(self.last_id, event_id)
        point = _training_point(data) if kind == "progress" else {}
        text, level = self._describe(kind, data)
        if kind == "progress" and data.get("stage"):
            self.stage = data["stage"]
        line = LogLine(event_id, at, kind, text, level) if text else None
        if line is not None:
            self.lines.append(line)
            if len(self.lines) > PAGE_LOG_LINES:
                self.lines.pop(0)
                self.dropped_lines += 1
        if point:
            self.points.append(point)
        return line, point

    def _describe(self, kind: str, data: dict[str, Any]) -> tuple[str | None, str]:
        if kind == "state":
            return _describe_state(data)
        if kind == "log":
            return str(data.get("message") or ""), "info"
        if kind == "cancel_requested":
            return "Cancel requested: the job stops at its next step", "warning"
        if kind == "trial":
            return _describe_trial(data), "info"
        if kind == "progress":
            training = (data.get("metrics") or {}).get("training")
            if isinstance(training, dict):
                return _describe_epoch(training), "info"
            stage = data.get("stage")
            if stage and stage != self.stage:
                return f"Stage: {stage_label(stage)}", "info"
        return None, "info"  # resume repeats its log line; plain progress ticks are the bar's business


def _describe_trial(data: dict[str, Any]) -> str:
    settings = ", ".join(f"{path} = {value}" for path, value in (data.get("params") or {}).items())
    if data.get("state") == "queued":
        return f"Trial {data.get('number')} queued: {settings}"
    outcome = "pruned" if data.get("pruned") else str(data.get("state"))
    value = data.get("value")
    return f"Trial {data.get('number')} {outcome}" + (f": {value:.4f}" if isinstance(value, int | float) else "")


def _describe_state(data: dict[str, Any]) -> tuple[str, str]:
    state = str(data.get("state"))
    if state == JobState.QUEUED:
        if data.get("reason") == "lease_expired":
            return "Back in the queue: the worker stopped answering", "warning"
        return "Queued", "info"
    if state == JobState.RUNNING:
        attempt = data.get("attempt")
        return (f"Running (attempt {attempt})" if attempt and attempt > 1 else "Running"), "info"
    if state == JobState.SUCCEEDED:
        return "Succeeded", "success"
    if state == JobState.FAILED:
        error = data.get("error") or {}
        return f"Failed [{error.get('code', 'error')}]: {error.get('message') or ''}".rstrip(": "), "error"
    if state == JobState.CANCELLED:
        reason = str(data.get("reason") or "").removeprefix("cancelled: ")
        return (f"Cancelled ({reason})" if reason else "Cancelled"), "warning"
    return state.capitalize(), "info"


def _training_point(data: dict[str, Any]) -> dict[str, Any]:
    training = (data.get("metrics") or {}).get("training")
    if not isinstance(training, dict) or not training.get("stage") or training.get("epoch") is None:
        return {}
    point = {"stage": training["stage"], "epoch": training["epoch"], "epochs": training.get("epochs")}
    point.update({key: training[key] for key in CURVE_KEYS if isinstance(training.get(key), int | float)})
    return point


def _describe_epoch(training: dict[str, Any]) -> str:
    parts = []
    for key, label in (("train_loss", "train loss"), ("val_loss", "val loss")):
        if isinstance(training.get(key), int | float):
            parts.append(f"{label} {training[key]:.4f}")
    for key, label in (("train_accuracy", "train acc"), ("val_accuracy", "val acc")):
        if isinstance(training.get(key), int | float):
            parts.append(f"{label} {training[key] * 100:.1f}%")
    where = f"{stage_label(training.get('stage'))} epoch {training.get('epoch')}/{training.get('epochs')}"
    return f"{where}: {', '.join(parts)}" if parts else where


def iter_events(session: Session, job_id: str, after_id: int = 0) -> Iterator[JobEvent]:
    while True:
        batch = events.events_after(session=session, job_id=job_id, after_id=after_id, limit=_BATCH)
        yield from batch
        if len(batch) < _BATCH:
            return
        after_id = batch[-1].id


def load_timeline(session: Session, job_id: str) -> Timeline:
    timeline = Timeline()
    for event in iter_events(session, job_id):
        timeline.feed(event.id, event.kind, event.data or {}, event.created_at)
    return timeline


def stage_before(session: Session, job_id: str, event_id: int) -> str | None:
    """The stage the job was in at `event_id`, so a resumed stream names stage changes correctly."""
    rows = session.scalars(
        select(JobEvent.data)
        .where(JobEvent.job_id == job_id, JobEvent.id <= event_id, JobEvent.kind == "progress")
        .order_by(JobEvent.id.desc())
        .limit(20)
    )
    return next((data["stage"] for data in rows if isinstance(data, dict) and data.get("stage")), None)
