"""`distillery serve` on the embedded defaults: SQLite, the SQLite broker, a storage folder, and
nothing but the data folder set. Ctrl-C stops the API and the worker, leaving no process behind;
a job stopped that way continues from its checkpoint when the service runs again."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.e2e.stack import Stack, alive, descendants, running, wait_until
from tests.worker.support import JobFiles, claimed_accuracy, onnx_accuracy


def _ctrl_c(stack: Stack) -> None:
    """Ctrl-C as a terminal sends it (to the supervisor); it must stop everything it started."""
    serve = stack.processes["serve"]
    family = descendants(serve.pid)
    assert len(family) >= 3  # the API, the worker, its reaper and its pool child
    serve.send_signal(signal.SIGINT)
    assert serve.wait(timeout=60) == 0
    wait_until(lambda: not any(alive(pid) for pid in family), timeout=15, what="every child of serve to exit")


def test_serve_runs_jobs_on_the_embedded_defaults_and_stops_cleanly(
    tmp_path: Path, job_files: JobFiles, long_job_files: JobFiles
) -> None:
    stack = Stack(tmp_path / "data")  # no database, broker or storage URL: the embedded defaults
    assert stack.settings.database_url.startswith("sqlite:///")
    assert stack.settings.broker_url.startswith("sqla+sqlite:///")
    with running(stack):
        stack.start_serve()
        stack.create_user()  # `distillery admin create-user` does this against the same database

        data_id = stack.upload(job_files.data, "dataset")
        job_id = stack.submit(job_files.spec(stack.upload(job_files.teacher, "teacher"), data_id, epochs=3))
        job = stack.wait_for_state(job_id, "succeeded", timeout=120)
        claimed = claimed_accuracy(stack.download(job_id, "metrics.json", tmp_path).read_bytes())
        assert claimed == job["metrics"]["student"]["accuracy"]
        assert onnx_accuracy(stack.download(job_id, "student.onnx", tmp_path), job_files.data) == pytest.approx(
            claimed
        )

        # Stop the service in the middle of a job, then start it again.
        epochs = 60
        long_data = stack.upload(long_job_files.data, "dataset")
        long_id = stack.submit(
            long_job_files.spec(stack.upload(long_job_files.teacher, "teacher"), long_data, epochs=epochs)
        )
        stack.wait_for_epoch(long_id, 3)
        _ctrl_c(stack)

        stack.start_serve()
        job = stack.wait_for_state(long_id, "succeeded", timeout=120)
        assert job["attempts"] == 1  # a stopped service hands its job back without using up an attempt
        events = stack.events(long_id)
        stopped = [event for event in events if event["kind"] == "log" and "worker was stopped" in event["message"]]
        resumes = [event for event in events if event["kind"] == "resume"]
        assert len(stopped) == 1 and len(resumes) == 1 and resumes[0]["epoch"] >= 3
        _ctrl_c(stack)
