"""`distillery serve` under the issue-13 faults, as real processes on the embedded defaults:
SIGKILLed, it leaves no child behind; stopped in the middle of a step that outlasts the grace
period, its worker takes no new job; a job over the memory limit fails while the same worker
process lives on and runs the next job."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

from service.db import create_db_engine, create_session_factory
from service.models import Job, JobState
from tests.e2e.stack import Stack, alive, descendants, running, wait_until
from tests.worker.support import JobFiles

MiB = 2**20


def _processes_of(root: Path) -> set[int]:
    """Every live process started for this test's data folder, wherever it was reparented to:
    each child of serve carries DISTILLERY_DATA_DIR in its environment."""
    marker = f"DISTILLERY_DATA_DIR={root}".encode()
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if marker in (entry / "environ").read_bytes().split(b"\0") and alive(int(entry.name)):
                    found.add(int(entry.name))
    return found


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")


def _job_row(stack: Stack, job_id: str) -> tuple[JobState, int]:
    """The job as the database has it once serve (and its API) stopped."""
    engine = create_db_engine(stack.settings.database_url)
    try:
        with create_session_factory(engine)() as session:
            job = session.get(Job, job_id)
            assert job is not None
            return job.state, job.attempts
    finally:
        engine.dispose()


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _worker_pid(stack: Stack) -> int:
    """The worker that serve started (`python -m worker.cli`), not its reaper or its pool children
    (forked, so with the same command line): the one whose parent is serve."""
    serve = stack.processes["serve"].pid
    workers = [pid for pid in descendants(serve) if "worker.cli" in _cmdline(pid) and _parent(pid) == serve]
    assert len(workers) == 1, workers
    return workers[0]


def test_sigkilled_serve_leaves_no_process_behind(tmp_path: Path, long_job_files: JobFiles) -> None:
    stack = Stack(tmp_path / "data", DISTILLERY_STOP_GRACE_SECONDS="3")
    with running(stack):
        serve = stack.start_serve()
        stack.create_user()
        files = long_job_files
        job_id = stack.submit(files.spec(stack.upload(files.teacher, "teacher"), stack.upload(files.data, "dataset"),
                                         epochs=60))
        stack.wait_for_epoch(job_id, 1)  # the API, the worker, its reaper and the job's pool child all run
        family = descendants(serve.pid)
        assert len(family) >= 4 and family <= _processes_of(stack.root)

        os.kill(serve.pid, signal.SIGKILL)  # no handler runs: only the children's parent-death signal tells them
        serve.wait(timeout=10)
        try:
            wait_until(lambda: not _processes_of(stack.root), timeout=20,
                       what="every process of the SIGKILLed serve to exit",
                       on_timeout=lambda: "\n".join(_cmdline(pid) for pid in _processes_of(stack.root)))
        finally:
            for pid in _processes_of(stack.root):  # orphans (each in its own session) if the test failed
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def test_a_stopping_worker_takes_no_new_job(tmp_path: Path, long_job_files: JobFiles) -> None:
    # One step of a 4096-wide MLP on the whole training set takes seconds on one thread: longer than
    # the grace period, so the job's pool child hands the job back and ends itself mid-step, and
    # Celery puts the message back on the queue (reject_on_worker_lost) while the worker stops.
    stack = Stack(tmp_path / "data", DISTILLERY_STOP_GRACE_SECONDS="1", DISTILLERY_SHUTDOWN_TIMEOUT_SECONDS="60")
    with running(stack):
        serve = stack.start_serve()
        stack.create_user()
        files = long_job_files
        spec = files.spec(stack.upload(files.teacher, "teacher"), stack.upload(files.data, "dataset"), epochs=1,
                          batch_size=3200, student={"arch": "mlp", "arch_args": {"hidden": [4096, 4096]}})
        job_id = stack.submit(spec)
        stack.wait_for_state(job_id, "running")
        wait_until(lambda: stack.job(job_id)["stage"] == "distill", timeout=120, what="the distill stage")

        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=90) == 0
        state, attempts = _job_row(stack, job_id)
        # Handed back with its lease ended and its attempt refunded; the stopping worker did not run it
        # again, and the broker keeps its message for the next start.
        assert (state, attempts) == (JobState.RUNNING, 0), stack.log_tails()
        log = stack.log("serve")
        assert "did not stop within 1 s" in log, stack.log_tails()  # the grace period ran out before a step ended
        assert log.count(f"running job {job_id} ") == 1, stack.log_tails()

        stack.start_serve()  # the next start takes it, as its first attempt again
        first_attempt = f"running job {job_id} (attempt 1 of 3)"
        wait_until(lambda: stack.log("serve").count(first_attempt) == 2, timeout=120,
                   what="the job to run again after the restart", on_timeout=stack.log_tails)
        assert f"running job {job_id} (attempt 2" not in stack.log("serve")


def test_job_over_the_memory_limit_fails_and_the_same_worker_runs_the_next(
    tmp_path: Path, job_files: JobFiles
) -> None:
    # A worker's pool child with torch loaded uses about 850 MiB of data segment; 1.75 GiB leaves a small
    # job room and not a 67M-parameter student with its gradients and Adam's two moments (over 1 GiB).
    limit = 1792 * MiB
    stack = Stack(tmp_path / "data", DISTILLERY_JOB_MEMORY_BYTES=str(limit))
    with running(stack):
        stack.start_serve()
        stack.create_user()
        teacher, data = stack.upload(job_files.teacher, "teacher"), stack.upload(job_files.data, "dataset")
        worker = _worker_pid(stack)

        big = stack.submit(job_files.spec(teacher, data, epochs=1,
                                          student={"arch": "mlp", "arch_args": {"hidden": [8192, 8192]}}))
        job = stack.wait_for_state(big, "failed", timeout=180)
        assert job["error"]["code"] == "resource_limit", job["error"]
        assert f"{limit:,} bytes" in job["error"]["message"]
        assert "DISTILLERY_JOB_MEMORY_BYTES" in job["error"]["message"]
        assert job["attempts"] == 1  # not retried: it would fail the same way

        small = stack.submit(job_files.spec(teacher, data, epochs=1))
        assert stack.wait_for_state(small, "succeeded", timeout=180)["state"] == "succeeded"
        assert _worker_pid(stack) == worker and alive(worker)  # the same worker process, never restarted
        assert stack.log("serve").count("started the worker") == 1
