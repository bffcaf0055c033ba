"""Limits in the worker: memory, wall clock, stalls, threads, scratch folders and messages, on real jobs."""

from __future__ import annotations

import os
import time
from pathlib import Path

from sqlalchemy.orm import sessionmaker

from kdcore.errors import BadInputError
from service.models import JobState
from tests.worker.conftest import Service
from worker.heartbeat import watch
from worker.job_run import JobRun, Outcome
from worker.limits import capped_threads
from worker.runner import _without_paths, run
from worker.scratch import attempt_prefix, sweep_scratch

GiB = 2**30


def _data_segment_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmData:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmData")


def test_job_over_the_memory_limit_fails_and_the_worker_takes_the_next_job(pg_service: Service) -> None:
    # Room for the engine's own working set, not for a 67M-parameter student with Adam (over 1 GiB).
    limit = _data_segment_bytes() + 768 * 2**20
    settings = pg_service.settings.model_copy(update={"job_memory_bytes": limit})
    big = pg_service.submit(epochs=1, student={"arch": "mlp", "arch_args": {"hidden": [8192, 8192]}})
    assert run(big, settings) == Outcome.FAILED
    job = pg_service.job(big)
    assert job.error_code == "resource_limit"
    assert "memory limit" in (job.error_message or "") and "DISTILLERY_JOB_MEMORY_BYTES" in (job.error_message or "")
    assert job.attempts == 1  # not retried: it would fail the same way
    # The same process (the worker) is fine and runs the next job under the same limit.
    small = pg_service.submit(epochs=1)
    assert run(small, settings) == Outcome.SUCCEEDED


def test_job_over_its_wall_clock_limit_fails_with_resource_limit(pg_service: Service) -> None:
    settings = pg_service.settings.model_copy(update={"max_job_seconds": 2.0})
    job_id = pg_service.submit(epochs=200)
    started = time.monotonic()
    assert run(job_id, settings) == Outcome.FAILED
    job = pg_service.job(job_id)
    assert job.error_code == "resource_limit" and "DISTILLERY_MAX_JOB_SECONDS" in (job.error_message or "")
    assert time.monotonic() - started < 60


def _job_run(service: Service, **settings: object) -> JobRun:
    return JobRun(job_id="job_x", worker_id="w", attempt=1, max_attempts=1, spec={}, input_keys={},
                  settings=service.settings.model_copy(update=settings),
                  session_factory=sessionmaker())


def test_watchdog_fails_a_job_without_a_step_as_stalled(pg_service: Service) -> None:
    job_run = _job_run(pg_service, job_stall_seconds=5.0)
    watch(job_run, running_s=1.0)
    assert job_run.flags.failure is None
    job_run.flags.last_activity = time.monotonic() - 6.0  # the engine's last step, six seconds ago
    watch(job_run, running_s=7.0)
    assert job_run.flags.failure is not None and job_run.flags.failure[0] == "stalled"
    assert job_run.flags.stop.is_set() and "DISTILLERY_JOB_STALL_SECONDS" in job_run.flags.failure[1]


def test_the_spec_cannot_ask_for_more_threads_than_the_operator_allows(pg_service: Service) -> None:
    settings = pg_service.settings.model_copy(update={"max_job_threads": 2})
    assert capped_threads(settings, 64) == 2
    assert capped_threads(settings, 1) == 1
    assert capped_threads(settings, None) == 2


def test_sweep_removes_scratch_of_jobs_no_longer_running(pg_service: Service, tmp_path: Path) -> None:
    settings = pg_service.settings.model_copy(update={"work_dir": tmp_path / "scratch"})
    finished = pg_service.submit(epochs=1)
    assert run(finished, pg_service.settings) == Outcome.SUCCEEDED
    queued = pg_service.submit(epochs=1)
    from service import state
    with pg_service.session_factory() as session:
        assert state.claim(session, queued, "other-worker", lease_seconds=60)
        session.commit()
    leftovers = {}
    for job_id in (finished, queued):
        folder = settings.work_dir / f"{attempt_prefix(job_id)}abcd1234"  # type: ignore[operator]
        (folder / "inputs").mkdir(parents=True)
        (folder / "inputs" / "teacher.safetensors").write_bytes(b"user's teacher")
        os.utime(folder, (time.time() - 600, time.time() - 600))
        leftovers[job_id] = folder
    removed = sweep_scratch(settings, pg_service.session_factory)
    assert removed == [leftovers[finished]]
    assert not leftovers[finished].exists() and leftovers[queued].exists()
    assert pg_service.job(queued).state == JobState.RUNNING


def test_sweep_keeps_scratch_of_jobs_this_database_does_not_know(pg_service: Service, tmp_path: Path) -> None:
    # Workers of other services (another deployment, a parallel test run) share /tmp: a job id this
    # database has never seen may be running there, so its folder stays.
    settings = pg_service.settings.model_copy(update={"work_dir": tmp_path / "scratch"})
    folder = settings.work_dir / f"{attempt_prefix('job_01notthisdatabase0000000000')}abcd1234"  # type: ignore[operator]
    (folder / "inputs").mkdir(parents=True)
    os.utime(folder, (time.time() - 600, time.time() - 600))
    assert sweep_scratch(settings, pg_service.session_factory) == []
    assert folder.exists()


def test_error_messages_name_the_users_file_not_the_scratch_path(pg_service: Service, tmp_path: Path) -> None:
    job_run = _job_run(pg_service)
    job_run.input_keys = {"teacher": ("key", "my-teacher.onnx")}
    work = tmp_path / "distillery-job_x-1234"
    error = BadInputError(f"cannot parse {work}/inputs/teacher/my-teacher.onnx next to {work}/out",
                          field="teacher.file")
    clean = _without_paths(error, work, job_run)
    assert str(tmp_path) not in str(clean)
    assert "my-teacher.onnx" in str(clean) and clean.field == "teacher.file"  # type: ignore[attr-defined]
