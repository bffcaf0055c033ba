"""A distributed job through the service: PostgreSQL, Redis, `distillery api` and a `distillery worker
--gpus 2` that runs the job's two gloo ranks under the elastic launcher, as real processes."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.stack import Stack, running, wait_until
from tests.support import postgres_database
from tests.worker.support import JobFiles, redis_database
from worker.supervisor import API_MAIN


@pytest.fixture(scope="module")
def two_process_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with postgres_database("e2e_ddp") as database_url, redis_database() as broker_url:
        stack = Stack(tmp_path_factory.mktemp("ddp"), database_url=database_url, broker_url=broker_url,
                      DISTILLERY_MAX_JOB_PROCESSES="2")
        with running(stack):
            stack.create_user()
            stack.start_api()
            stack.spawn("worker", [sys.executable, "-c", API_MAIN, "worker", "--queue", "cpu", "--gpus", "2"])
            stack.wait_for_log("worker", " ready.", timeout=90)
            yield stack


def _ranks() -> list[int]:
    """Processes of any launched group alive now (torchrun's agent sets TORCHELASTIC_RUN_ID in every rank)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue
            if b"TORCHELASTIC_RUN_ID=" in environ and b"\0RANK=" in b"\0" + environ:
                found.append(int(entry.name))
    return found


def test_a_two_process_job_runs_through_the_worker_and_reports_like_any_job(two_process_service: Stack,
                                                                              job_files: JobFiles) -> None:
    stack = two_process_service
    spec = job_files.spec(stack.upload(job_files.teacher, "teacher"), stack.upload(job_files.data, "dataset"),
                          epochs=3, device="cpu", distributed={"nproc": 2})
    job_id = stack.submit(spec)
    job = stack.wait_for_state(job_id, "succeeded", "failed", timeout=240)
    assert job["state"] == "succeeded", (job.get("error"), stack.log_tails())
    assert job["metrics"]["distributed"]["world_size"] == 2
    assert job["metrics"]["student"]["accuracy"] > 0.5
    # Rank 0's progress reached the row through the relay: an epoch_end per distill epoch.
    trained = [e["metrics"]["training"] for e in stack.events(job_id)
               if e["kind"] == "progress" and "training" in (e.get("metrics") or {})]
    assert [(t["stage"], t["epoch"]) for t in trained if t["stage"] == "distill"] == [("distill", e) for e in (1, 2, 3)]
    names = {item["name"] for item in stack.http.get(f"/v1/jobs/{job_id}/artifacts").json()["items"]}
    assert {"student.onnx", "metrics.json", "report.md"} <= names


def test_cancel_stops_every_rank(two_process_service: Stack, long_job_files: JobFiles) -> None:
    stack = two_process_service
    spec = long_job_files.spec(stack.upload(long_job_files.teacher, "teacher"),
                               stack.upload(long_job_files.data, "dataset"), epochs=60, device="cpu",
                               distributed={"nproc": 2})
    job_id = stack.submit(spec)
    stack.wait_for_epoch(job_id, 1, timeout=180)
    assert len(_ranks()) >= 2
    stack.cancel(job_id)
    job = stack.wait_for_state(job_id, "cancelled", "failed", "succeeded", timeout=90)
    assert job["state"] == "cancelled", job.get("error")
    wait_until(lambda: not _ranks(), timeout=30, what="every rank to end")


def test_a_job_larger_than_every_worker_is_refused(two_process_service: Stack, job_files: JobFiles) -> None:
    stack = two_process_service
    spec = job_files.spec(stack.upload(job_files.teacher, "teacher"), stack.upload(job_files.data, "dataset"),
                          device="cpu", distributed={"nproc": 3})
    response = stack.http.post("/v1/jobs", json=spec)
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "distributed.nproc"
    assert "largest worker runs 2" in response.json()["error"]["message"]
