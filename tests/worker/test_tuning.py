"""A tuned job through worker.runner against real databases, storage, Optuna and the real engine."""

from __future__ import annotations

import json
import threading
from typing import Any

from sqlalchemy import select

from service import state, tuning
from service.db import session_scope
from service.jobs import cancel_job
from service.models import Artifact, Job, JobEvent, JobState
from tests.worker.conftest import Service
from tests.worker.test_runner import _wait_for
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


def test_hopeless_trial_is_pruned_at_an_epoch_boundary(service: Service) -> None:
    # Trial 0 (the spec's lr 0.005) learns; trial 1's lr cannot, and is behind it after one epoch.
    parent_id = service.submit(epochs=6, tune={"trials": 2, "space": {"optim.lr": [0.005, 1e-7]}, "budget": 1.0,
                                                "parallel": 1})
    assert run(parent_id, service.settings) == Outcome.SEARCHING
    assert len(_trials(service, parent_id)) == 1  # parallel 1: one at a time

    assert _run_queued_trials(service, parent_id) == [Outcome.SUCCEEDED, Outcome.CANCELLED]

    first, hopeless = _trials(service, parent_id)
    assert hopeless.trial["params"] == {"optim.lr": 1e-7}
    assert (hopeless.state, hopeless.error_code) == (JobState.CANCELLED, "pruned")
    assert hopeless.trial["pruned"] is True and len(hopeless.trial["intermediate"]) < 6  # stopped early
    assert len(first.trial["intermediate"]) == 6 and first.trial["pruned"] is False
    parent = service.job(parent_id)
    assert parent.tune["best"] == {"optim.lr": 0.005} and parent.state == JobState.QUEUED


def test_failed_trial_is_recorded_and_the_search_goes_on(service: Service) -> None:
    parent_id = _submit_tuned(service, parallel=2)
    assert run(parent_id, service.settings) == Outcome.SEARCHING
    doomed, healthy = _trials(service, parent_id)
    with session_scope(service.session_factory) as session:  # a trial that failed on its worker
        assert state.claim(session, doomed.id, "w:1", lease_seconds=60)
    with session_scope(service.session_factory) as session:
        state.finish(session, doomed.id, "w:1", state=JobState.FAILED, error_code="internal", error_message="boom")
    with session_scope(service.session_factory) as session:
        tuning.advance(session=session, settings=service.settings, parent_id=parent_id)

    assert run(healthy.id, service.settings) == Outcome.SUCCEEDED  # advances the search itself
    assert _run_queued_trials(service, parent_id) == [Outcome.SUCCEEDED] * 2
    trials = _trials(service, parent_id)
    assert len(trials) == 4
    assert trials[0].trial["state"] == "failed" and trials[0].trial["value"] is None
    parent = service.job(parent_id)
    assert parent.state == JobState.QUEUED and parent.tune["best_trial"] != 0
    assert parent.tune["gain_over_defaults"] is None  # the defaults' trial failed: nothing to compare with


def test_cancel_of_the_parent_cancels_its_trials(service: Service) -> None:
    parent_id = service.submit(epochs=400, tune={"trials": 3, "space": GRID, "parallel": 3, "budget": 1.0})
    assert run(parent_id, service.settings) == Outcome.SEARCHING
    running_trial, *queued = _trials(service, parent_id)
    outcomes: list[Outcome] = []
    thread = threading.Thread(target=lambda: outcomes.append(run(running_trial.id, service.settings)), daemon=True)
    thread.start()
    _wait_for(lambda: service.job(running_trial.id).stage == "distill", what="the trial training")

    with service.session_factory() as session:
        owned = session.get(Job, parent_id)
        assert owned is not None
        parent = cancel_job(session=session, storage=service.storage, job=owned)
    assert parent.state == JobState.CANCELLED
    assert all(service.job(t.id).state == JobState.CANCELLED for t in queued)
    thread.join(timeout=60)
    assert outcomes == [Outcome.CANCELLED]
    assert service.job(running_trial.id).state == JobState.CANCELLED
    assert len(_trials(service, parent_id)) == 3  # no trial was started after the cancel


def test_trials_count_against_the_owners_job_limit(service: Service) -> None:
    service.settings = service.settings.model_copy(update={"max_concurrent_jobs": 3})
    parent_id = _submit_tuned(service)
    assert run(parent_id, service.settings) == Outcome.SEARCHING
    assert len(_trials(service, parent_id)) == 2  # the parent and two trials fill the limit of 3
    assert _run_queued_trials(service, parent_id) == [Outcome.SUCCEEDED] * 4
    assert service.job(parent_id).state == JobState.QUEUED


def test_budget_driven_search_never_picks_a_student_over_its_latency_budget(service: Service) -> None:
    budget_ms = 0.5
    # The big student reads 128 MiB of weights per sample: milliseconds on any CPU, even one whose
    # caches and AMX units make a 2048-wide MLP a quarter of a millisecond.
    space = {"student.arch_args.hidden": [[4], [4096, 4096, 4096], [16]]}
    parent_id = service.submit(epochs=2, tune={"trials": 3, "space": space, "budget": 1.0, "prune": False,
                                                "objective": {"max_latency_ms": budget_ms}})
    assert run(parent_id, service.settings) == Outcome.SEARCHING
    assert _run_queued_trials(service, parent_id) == [Outcome.SUCCEEDED] * 3

    trials = {json.dumps(t.trial["params"]["student.arch_args.hidden"]): t.trial for t in _trials(service, parent_id)}
    big = trials["[4096, 4096, 4096]"]
    assert big["latency_ms"] > budget_ms and big["feasible"] is False  # measured over the budget
    parent = service.job(parent_id)
    chosen = trials[json.dumps(parent.tune["best"]["student.arch_args.hidden"])]
    assert chosen["feasible"] is True and chosen["latency_ms"] <= budget_ms
    assert chosen["value"] == max(t["value"] for t in trials.values() if t["feasible"])

    assert run(parent_id, service.settings) == Outcome.SUCCEEDED
    parent = service.job(parent_id)
    assert parent.spec["tune"]["objective"]["max_latency_ms"] == budget_ms
    with service.session_factory() as session:
        names = set(session.scalars(select(Artifact.name).where(Artifact.job_id == parent_id)))
    assert "pareto.png" in names
