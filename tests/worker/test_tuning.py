"""A tuned job through worker.runner against real databases, storage, Optuna and the real engine."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from service import tuning
from service.db import session_scope
from service.models import Artifact, Job, JobEvent, JobState
from tests.worker.conftest import Service
from worker.job_run import Outcome
from worker.runner import run

GRID = {"method.temperature": [2.0, 4.0], "method.alpha": [0.5, 0.9]}


def _submit_tuned(service: Service, *, epochs: int = 4, **tune: Any) -> str:
    return service.submit(epochs=epochs, tune={"trials": 4, "space": GRID, "budget": 0.5, **tune})


def _trials(service: Service, parent_id: str) -> list[Job]:
    with service.session_factory() as session:
        return tuning.trials_of(session, parent_id)


def _run_queued_trials(service: Service, parent_id: str) -> list[Outcome]:
    outcomes = []
    while queued := [t for t in _trials(service, parent_id) if t.state == JobState.QUEUED]:
        outcomes += [run(trial.id, service.settings) for trial in queued]
    return outcomes


def test_tuned_job_runs_its_trials_then_the_full_run_with_the_best(service: Service) -> None:
    parent_id = _submit_tuned(service)

    assert run(parent_id, service.settings) == Outcome.SEARCHING
    parent = service.job(parent_id)
    assert (parent.state, parent.stage, parent.tune["phase"]) == (JobState.RUNNING, "search", "search")
    assert len(_trials(service, parent_id)) == 4  # parallel 4: all queued at once

    assert _run_queued_trials(service, parent_id) == [Outcome.SUCCEEDED] * 4
    trials = _trials(service, parent_id)
    assert [t.trial["number"] for t in trials] == [0, 1, 2, 3]
    assert trials[0].trial["params"] == {"method.temperature": 4.0, "method.alpha": 0.9}  # the defaults first
    assert {tuple(t.trial["params"].values()) for t in trials} == {(2.0, 0.5), (2.0, 0.9), (4.0, 0.5), (4.0, 0.9)}
    assert all(t.spec["stages"]["distill_epochs"] == 2 and t.spec["export"] == [] for t in trials)
    # The trials read the teacher logits the parent computed, instead of computing them again.
    with service.session_factory() as session:
        messages = [e.data.get("message", "") for e in session.scalars(
            select(JobEvent).where(JobEvent.job_id.in_([t.id for t in trials]), JobEvent.kind == "log"))]
    assert sum("read from the shared cache" in m for m in messages) == 4

    parent = service.job(parent_id)
    assert (parent.state, parent.stage, parent.tune["phase"]) == (JobState.QUEUED, "final", "final")
    values = {t.trial["number"]: t.trial["value"] for t in trials}
    assert parent.tune["best_value"] == max(values.values())
    assert parent.tune["gain_over_defaults"] == parent.tune["best_value"] - values[0]

    assert run(parent_id, service.settings) == Outcome.SUCCEEDED
    parent = service.job(parent_id)
    assert parent.state == JobState.SUCCEEDED
    assert parent.metrics["baseline"]["accuracy"] > 0  # the baseline, once, in the full run
    assert parent.metrics["tune"]["best"] == parent.tune["best"]
    with service.session_factory() as session:
        names = set(session.scalars(select(Artifact.name).where(Artifact.job_id == parent_id)))
        report_key = session.scalar(select(Artifact.storage_key).where(Artifact.job_id == parent_id,
                                                                       Artifact.name == "report.md"))
    assert {"search.json", "search.png", "report.md", "student.onnx"} <= names
    assert report_key is not None
    with service.storage.open(report_key) as handle:
        report = handle.read().decode()
    assert "## Search" in report and "| trial | method.temperature | method.alpha |" in report
