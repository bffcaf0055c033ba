"""A tuned job on the cluster setup (PostgreSQL, Redis, `distillery api`, two workers): its trials run in
parallel, and a worker SIGKILLed in the middle of the search costs no trial."""

from __future__ import annotations

import signal
from datetime import datetime
from typing import Any

from tests.e2e.stack import Stack, wait_until
from tests.e2e.test_cluster import _worker_running
from tests.worker.support import JobFiles

GRID = {"method.temperature": [2.0, 4.0], "method.alpha": [0.5, 0.9]}


def _trials(stack: Stack, job_id: str) -> list[dict[str, Any]]:
    return list(stack.job(job_id)["search"]["trials"])


def _overlap(a: dict[str, Any], b: dict[str, Any]) -> bool:
    start_a, end_a, start_b, end_b = (datetime.fromisoformat(a["started_at"]), datetime.fromisoformat(a["finished_at"]),
                                      datetime.fromisoformat(b["started_at"]), datetime.fromisoformat(b["finished_at"]))
    return start_a < end_b and start_b < end_a


def test_tuned_job_trials_run_in_parallel_and_survive_a_sigkilled_worker(cluster: Stack,
                                                                         long_job_files: JobFiles) -> None:
    teacher_id = cluster.upload(long_job_files.teacher, "teacher")
    data_id = cluster.upload(long_job_files.data, "dataset")
    spec = long_job_files.spec(teacher_id, data_id, epochs=40,
                               tune={"trials": 4, "space": GRID, "budget": 0.5, "prune": False})
    job_id = cluster.submit(spec)

    both_running = wait_until(
        lambda: (trials := [t for t in _trials(cluster, job_id) if t["state"] == "running"]) and len(trials) >= 2
        and trials, timeout=300, what="two trials running at once", on_timeout=cluster.log_tails)
    victim_trial = cluster.job(both_running[0]["job_id"])
    cluster.wait_for_epoch(victim_trial["id"], 2)
    victim = _worker_running(cluster, victim_trial)
    cluster.kill_group(victim, signal.SIGKILL)  # the worker and the child running the trial, at once
    cluster.start_worker(f"{victim}-after-kill")

    parent = cluster.wait_for_state(job_id, "succeeded", timeout=300)

    trials = parent["search"]["trials"]
    assert [t["number"] for t in trials] == [0, 1, 2, 3]  # no trial lost, none run twice
    assert all(t["state"] == "succeeded" and t["value"] is not None for t in trials)
    killed = cluster.job(victim_trial["id"])
    assert killed["attempts"] == 2
    assert any(event["kind"] == "resume" for event in cluster.events(killed["id"]))
    assert any(_overlap(a, b) for i, a in enumerate(trials) for b in trials[i + 1:])
    assert parent["search"]["best"] == parent["metrics"]["tune"]["best"]
    assert "baseline" in parent["metrics"] and parent["spec"]["tune"]["trials"] == 4
