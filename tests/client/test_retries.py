"""Retries against real failures: an API process killed and started again on the same port while the
client is mid-call. The API here is a second `distillery api` on the service's data folder, so its
jobs run on the service's worker while this process comes and goes."""

from __future__ import annotations

import threading
import time

import pytest

from client import Client, ConnectionError, Job, NotFound
from tests.client.conftest import JobFiles, Server, Service

pytestmark = pytest.mark.slow


def _restart_later(server: Server, delay: float) -> threading.Thread:
    def restart() -> None:
        time.sleep(delay)
        server.start()

    thread = threading.Thread(target=restart, daemon=True)
    thread.start()
    return thread


def test_get_succeeds_once_the_restarted_server_is_back(service: Service, second_api: Server) -> None:
    with Client(second_api.url, service.api_key, retries=8, backoff=0.3, max_backoff=2.0) as client:
        assert client.architectures()  # connected once: a keep-alive connection is in the pool
        second_api.stop(kill=True)
        restart = _restart_later(second_api, 2.0)
        started = time.monotonic()

        jobs = list(client.list_jobs())  # the first tries fail (refused), a later one gets through

        elapsed = time.monotonic() - started
        restart.join()
    assert isinstance(jobs, list)
    assert elapsed >= 2.0  # it really waited for the server to come back


def test_wait_follows_a_job_through_an_api_restart(service: Service, second_api: Server, job_files: JobFiles) -> None:
    """The event stream breaks when the API dies; wait() reconnects from the last event it saw."""
    with Client(second_api.url, service.api_key, retries=8, backoff=0.3, max_backoff=2.0) as client:
        spec = job_files.spec(name="through-restart", stages={"distill_epochs": 25})
        job = client.submit(spec, base_dir=job_files.folder)
        running = threading.Event()
        updates: list[Job] = []

        def on_progress(update: Job) -> None:
            updates.append(update)
            if update.state == "running" and update.progress.epoch:
                running.set()

        result: dict[str, Job | BaseException] = {}

        def follow() -> None:
            try:
                result["job"] = client.wait(job.id, on_progress=on_progress, timeout=240)
            except BaseException as exc:
                result["job"] = exc

        follower = threading.Thread(target=follow, daemon=True)
        follower.start()
        assert running.wait(180), "the job never started running"
        starts_before, updates_before = second_api.starts, len(updates)
        second_api.stop(kill=True)  # mid-stream: the SSE connection is open now
        time.sleep(1.0)
        second_api.start()
        follower.join(240)

    finished = result.get("job")
    assert isinstance(finished, Job), finished
    assert finished.state == "succeeded", finished.error
    assert second_api.starts == starts_before + 1
    assert len(updates) > updates_before  # it kept reporting after the restart


def test_retries_are_bounded_when_the_server_stays_down(service: Service, second_api: Server) -> None:
    second_api.stop(kill=True)
    try:
        with Client(second_api.url, service.api_key, retries=2, backoff=0.2, max_backoff=0.4) as client:
            started = time.monotonic()
            with pytest.raises(ConnectionError) as down:
                client.get_job("job_00000000000000000000000000")
            assert time.monotonic() - started < 10
        assert down.value.code == "connection_error"
    finally:
        second_api.start()


def test_a_post_that_reached_the_server_is_not_repeated(service: Service, second_api: Server) -> None:
    """cancel is not idempotent at the HTTP level: it is sent once; a refused connection is retried."""
    with Client(second_api.url, service.api_key, retries=5, backoff=0.3, max_backoff=1.0) as client:
        second_api.stop(kill=True)
        restart = _restart_later(second_api, 1.0)
        with pytest.raises(NotFound):  # an answer: the refused connections were retried until it came back
            client.cancel("job_00000000000000000000000000")
        restart.join()
