"""A Redis restart (this test's own server, on its own port, keeping nothing on disk) loses no job:
not one whose message waited in the queue, nor one that was running."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.stack import Stack, running, wait_until
from tests.support import free_port, postgres_database
from tests.worker.support import JobFiles


class OwnedRedis:
    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.folder = folder
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        log = (self.folder / "redis.log").open("ab")
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--daemonize", "no", "--dir", str(self.folder)],
            stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        wait_until(self._answers, timeout=20, what="redis-server")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=20)

    def restart(self) -> None:
        self.stop()
        self.start()

    def _answers(self) -> bool:
        import redis

        with contextlib.suppress(redis.RedisError):
            return bool(redis.Redis(port=self.port, socket_connect_timeout=1).ping())
        return False


@pytest.fixture
def owned_redis(tmp_path: Path) -> Iterator[OwnedRedis]:
    try:
        subprocess.run(["redis-server", "--version"], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("redis-server is not installed")
    server = OwnedRedis(tmp_path)
    server.start()
    yield server
    server.stop()


def _succeeded_once(stack: Stack, job_id: str) -> list[dict]:
    events = stack.events(job_id)
    assert [event["state"] for event in events if event["kind"] == "state"].count("succeeded") == 1
    return events


def test_redis_restart_loses_neither_a_queued_nor_a_running_job(
    owned_redis: OwnedRedis, tmp_path: Path, job_files: JobFiles, long_job_files: JobFiles
) -> None:
    with postgres_database("redis_restart") as database_url:
        stack = Stack(tmp_path / "service", database_url=database_url, broker_url=owned_redis.url)
        with running(stack):
            stack.create_user()
            stack.start_api()

            # Queued: the message lives only in Redis's memory when Redis restarts.
            data_id = stack.upload(job_files.data, "dataset")
            queued = stack.submit(job_files.spec(stack.upload(job_files.teacher, "teacher"), data_id, epochs=2))
            owned_redis.restart()
            stack.start_worker("worker")
            assert stack.wait_for_state(queued, "succeeded", timeout=90)["attempts"] == 1
            _succeeded_once(stack, queued)

            # Running: the worker loses its broker mid-job; Celery cancels the task, which hands the
            # job back, and it continues from its checkpoint once Redis is back.
            epochs = 60
            long_data = stack.upload(long_job_files.data, "dataset")
            running_id = stack.submit(
                long_job_files.spec(stack.upload(long_job_files.teacher, "teacher"), long_data, epochs=epochs)
            )
            stack.wait_for_epoch(running_id, 3)
            owned_redis.restart()
            job = stack.wait_for_state(running_id, "succeeded", timeout=120)
            events = _succeeded_once(stack, running_id)
            # Whenever the job was handed back it resumed from its checkpoint rather than starting over.
            # A stopped worker's hand-back uses up no attempt; one after an error ("retrying") does.
            messages = [event["message"] for event in events if event["kind"] == "log"]
            stopped = [m for m in messages if "worker was stopped" in m]
            retried = [m for m in messages if "retrying" in m]
            resumes = [event for event in events if event["kind"] == "resume"]
            assert len(resumes) == len(stopped) + len(retried) <= 1
            assert all(resume["epoch"] >= 3 for resume in resumes)
            assert job["attempts"] == 1 + len(retried)
