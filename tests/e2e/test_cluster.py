"""The cluster setup end to end: real PostgreSQL, Redis, `distillery api` and two workers.

Tests share one service (module scope) and leave it as they found it: two idle workers.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from service.db import create_db_engine, create_session_factory
from service.models import File
from service.queue import enqueue_job
from tests.e2e.stack import Stack, wait_until
from tests.worker.support import JobFiles, claimed_accuracy, onnx_accuracy, torchscript_accuracy

RECOVERY_LIMIT_S = 120


def _files(stack: Stack, files: JobFiles) -> tuple[str, str]:
    return stack.upload(files.teacher, "teacher"), stack.upload(files.data, "dataset")


def _worker_running(stack: Stack, job: dict[str, Any]) -> str:
    """The name of the worker process whose child runs the job (its worker_id is host:child pid)."""
    child_pid = int(str(_worker_id(stack, job["id"])).rsplit(":", 1)[1])
    for name, process in stack.processes.items():
        if name.startswith("worker") and process.poll() is None and _parent_of(child_pid) == process.pid:
            return name
    raise AssertionError(f"no worker process is the parent of {child_pid}")


def _worker_id(stack: Stack, job_id: str) -> str:
    from service.models import Job

    engine = create_db_engine(stack.settings.database_url)
    try:
        with create_session_factory(engine)() as session:
            return str(session.scalar(select(Job.worker_id).where(Job.id == job_id)))
    finally:
        engine.dispose()


def _parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def test_job_succeeds_and_its_exports_score_what_metrics_claim(cluster: Stack, job_files: JobFiles,
                                                              tmp_path: Path) -> None:
    teacher_id, data_id = _files(cluster, job_files)
    job_id = cluster.submit(job_files.spec(teacher_id, data_id, epochs=3))

    job = cluster.wait_for_state(job_id, "succeeded")

    assert (job["attempts"], job["error"], job["progress"]["fraction"]) == (1, None, 1.0)
    listed = {item["name"] for item in cluster.http.get(f"/v1/jobs/{job_id}/artifacts").json()["items"]}
    assert {"student.safetensors", "student.ts", "student.onnx", "metrics.json", "report.md", "history.csv",
            "curves.png"} <= listed
    assert any(name.startswith("tensorboard/") for name in listed)
    claimed = claimed_accuracy(cluster.download(job_id, "metrics.json", tmp_path).read_bytes())
    assert claimed == job["metrics"]["student"]["accuracy"] > 0.9
    assert onnx_accuracy(cluster.download(job_id, "student.onnx", tmp_path), job_files.data) == pytest.approx(claimed)
    assert torchscript_accuracy(cluster.download(job_id, "student.ts", tmp_path), job_files.data) == pytest.approx(
        claimed
    )
    states = [event["state"] for event in cluster.events(job_id) if event["kind"] == "state"]
    assert states == ["queued", "running", "succeeded"]


def test_sigkilled_worker_job_resumes_on_the_other_worker(cluster: Stack, long_job_files: JobFiles) -> None:
    epochs = 60
    teacher_id, data_id = _files(cluster, long_job_files)
    job_id = cluster.submit(long_job_files.spec(teacher_id, data_id, epochs=epochs))
    job = cluster.wait_for_epoch(job_id, 3)
    victim = _worker_running(cluster, job)

    cluster.kill_group(victim, signal.SIGKILL)  # the worker and the child running the job, at once
    killed_at = time.monotonic()
    wait_until(lambda: cluster.job(job_id)["attempts"] == 2, timeout=RECOVERY_LIMIT_S, what="the job running again")
    recovery_s = time.monotonic() - killed_at
    cluster.start_worker(f"{victim}-after-kill")  # the next tests find two workers again

    job = cluster.wait_for_state(job_id, "succeeded")
    assert job["attempts"] == 2
    assert recovery_s < RECOVERY_LIMIT_S
    events = cluster.events(job_id)
    resumes = [event for event in events if event["kind"] == "resume"]
    assert len(resumes) == 1 and resumes[0]["stage"] == "distill" and resumes[0]["attempt"] == 2
    resumed_after = resumes[0]["epoch"]
    assert resumed_after >= 3
    after_resume = events[events.index(resumes[0]):]
    retrained = [event["progress"]["epoch"] for event in after_resume
                 if event["kind"] == "progress" and "training" in (event.get("metrics") or {})]
    assert retrained == list(range(resumed_after + 1, epochs + 1))  # fewer than a restart from scratch
    states = [event["state"] for event in events if event["kind"] == "state"]
    assert states == ["queued", "running", "queued", "running", "succeeded"]


def test_duplicate_message_for_a_running_job_does_nothing(cluster: Stack, long_job_files: JobFiles) -> None:
    teacher_id, data_id = _files(cluster, long_job_files)
    job_id = cluster.submit(long_job_files.spec(teacher_id, data_id, epochs=30))
    job = cluster.wait_for_epoch(job_id, 2)
    runner = _worker_running(cluster, job)
    idle = next(name for name, process in cluster.processes.items()
                if name.startswith("worker") and name != runner and process.poll() is None)

    enqueue_job(job_id, settings=cluster.settings, queue="default")  # as a redelivery or a reaper would
    cluster.wait_for_log(idle, f"job {job_id} is not queued", timeout=30)

    job = cluster.wait_for_state(job_id, "succeeded")
    assert job["attempts"] == 1
    states = [event["state"] for event in cluster.events(job_id) if event["kind"] == "state"]
    assert states == ["queued", "running", "succeeded"]


def test_cancel_queued_and_running_jobs(cluster: Stack, long_job_files: JobFiles) -> None:
    teacher_id, data_id = _files(cluster, long_job_files)
    spec = long_job_files.spec(teacher_id, data_id, epochs=400)
    running_ids = [cluster.submit(spec), cluster.submit(spec)]  # both workers busy
    for job_id in running_ids:
        cluster.wait_for_epoch(job_id, 1)
    queued_id = cluster.submit(spec)

    cancelled = cluster.cancel(queued_id)
    assert (cancelled["state"], cancelled["attempts"]) == ("cancelled", 0)

    first = cluster.cancel(running_ids[0])
    assert first["state"] == "running" and first["cancel_requested"]
    job = cluster.wait_for_state(running_ids[0], "cancelled", timeout=30)
    assert job["progress"]["epoch"] < 400
    storage = Path(cluster.root / "storage")
    assert not list((storage / "jobs" / running_ids[0]).rglob("checkpoint*"))
    assert cluster.http.get(f"/v1/jobs/{running_ids[0]}/artifacts").json()["items"] == []

    # The freed worker now gets the cancelled job's message: it must not run it.
    time.sleep(2)
    assert cluster.job(queued_id)["state"] == "cancelled" and cluster.job(queued_id)["attempts"] == 0

    cluster.cancel(running_ids[1])
    cluster.wait_for_state(running_ids[1], "cancelled", timeout=30)


def test_poisoned_job_fails_clearly_and_the_next_job_runs(cluster: Stack, job_files: JobFiles) -> None:
    teacher_id, data_id = _files(cluster, job_files)
    engine = create_db_engine(cluster.settings.database_url)
    try:
        with create_session_factory(engine)() as session:
            key = session.scalar(select(File.storage_key).where(File.id == teacher_id))
    finally:
        engine.dispose()
    (cluster.root / "storage" / str(key)).unlink()  # the teacher's bytes are gone from storage

    poisoned = cluster.submit(job_files.spec(teacher_id, data_id, epochs=2))
    good_teacher = cluster.upload(job_files.teacher, "teacher")
    healthy = cluster.submit(job_files.spec(good_teacher, data_id, epochs=2))

    failed = cluster.wait_for_state(poisoned, "failed")
    assert failed["error"]["code"] == "input_missing"
    assert "teacher" in failed["error"]["message"] and failed["attempts"] == 1
    assert cluster.wait_for_state(healthy, "succeeded")["attempts"] == 1
