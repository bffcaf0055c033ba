"""The Python client against a real `distillery serve`: uploads, pagination, submit, wait, download, errors."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from client import (
    AuthError,
    ChecksumError,
    Client,
    ConnectionError,
    Job,
    NotFound,
    ValidationError,
    WaitTimeout,
)
from tests.client.conftest import JobFiles, Service, free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_job(service: Service, job_files: JobFiles) -> Job:
    with service.client() as client:
        seen: list[Job] = []
        job = client.submit(job_files.spec(name="finished"), base_dir=job_files.folder)
        done = client.wait(job.id, on_progress=seen.append, timeout=240)
    assert done.state == "succeeded", done.error
    assert seen[0].state in ("queued", "running") and seen[-1].state == "succeeded"
    fractions = [update.progress.fraction for update in seen]
    assert fractions == sorted(fractions)  # progress only moves forward
    assert any(update.stage == "distill" for update in seen)
    return done


def test_upload_checks_sha256_and_files_page(service: Service, job_files: JobFiles, tmp_path: Path) -> None:
    with service.client() as client:
        sent: list[int] = []
        uploaded = [
            client.upload(job_files.data, "dataset", name=f"copy-{i}.npz", on_bytes=sent.append) for i in range(3)
        ]
        assert all(u.sha256 == hashlib.sha256(job_files.data.read_bytes()).hexdigest() for u in uploaded)
        assert sum(sent) == 3 * job_files.data.stat().st_size

        listed = list(client.list_files(purpose="dataset", page_size=1))  # one request per file
        assert [u.id for u in uploaded][::-1] == [f.id for f in listed][:3]  # newest first
        assert client.get_file(uploaded[0].id).name == "copy-0.npz"

        client.delete_file(uploaded[0].id)
        with pytest.raises(NotFound) as missing:
            client.get_file(uploaded[0].id)
        assert missing.value.code == "not_found" and missing.value.status == 404
        assert missing.value.request_id  # X-Request-ID, for a bug report

        with pytest.raises(ValidationError) as refused:
            client.upload(job_files.teacher, "dataset")  # not a dataset
        assert refused.value.status == 422


def test_wait_download_and_checksums(service: Service, finished_job: Job, tmp_path: Path) -> None:
    with service.client() as client:
        artifacts = {artifact.name: artifact for artifact in client.artifacts(finished_job.id)}
        paths = client.download_all(finished_job.id, tmp_path / "all")
        assert {path.name for path in paths} >= {"student.safetensors", "student.onnx", "metrics.json"}
        for path in paths:
            name = path.relative_to((tmp_path / "all").resolve()).as_posix()
            assert hashlib.sha256(path.read_bytes()).hexdigest() == artifacts[name].sha256

        # A checksum that does not match leaves nothing behind that looks complete.
        with pytest.raises(ChecksumError):
            client.download(finished_job.id, "metrics.json", tmp_path / "bad", sha256="0" * 64)
        assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())

        single = client.download(finished_job.id, "metrics.json", tmp_path / "one" / "m.json")
        assert single.read_bytes() == (tmp_path / "all" / "metrics.json").read_bytes()


def test_events_without_follow_return_the_log(service: Service, finished_job: Job) -> None:
    with service.client() as client:
        events = list(client.events(finished_job.id, follow=False))
        assert [e.data.get("state") for e in events if e.kind == "state"] == ["queued", "running", "succeeded"]
        later = list(client.events(finished_job.id, after=events[-2].id, follow=False))
        assert [e.id for e in later] == [events[-1].id]


def test_list_jobs_pages_and_filters(service: Service, finished_job: Job) -> None:
    with service.client() as client:
        succeeded = list(client.list_jobs(state="succeeded", page_size=1))
        assert finished_job.id in {job.id for job in succeeded}
        assert all(job.state == "succeeded" for job in succeeded)
        ids = [job.id for job in client.list_jobs(page_size=2)]
        assert ids == sorted(ids, reverse=True) and len(ids) == len(set(ids))


def test_create_job_with_the_same_idempotency_key_returns_the_same_job(service: Service, finished_job: Job) -> None:
    with service.client() as client:
        spec = {**finished_job.spec, "name": "idempotent", "stages": {"distill_epochs": 1}}
        first = client.create_job(spec, idempotency_key="key-1")
        second = client.create_job(spec, idempotency_key="key-1")
        assert first.id == second.id
        client.cancel(first.id)


def test_wait_timeout_leaves_the_job_running(service: Service, job_files: JobFiles) -> None:
    with service.client() as client:
        job = client.submit(job_files.spec(name="slow", stages={"distill_epochs": 2000}), base_dir=job_files.folder)
        with pytest.raises(WaitTimeout):
            client.wait(job.id, timeout=1.0)
        assert client.cancel(job.id).id == job.id
        assert client.wait(job.id, timeout=60).state == "cancelled"


def test_errors_carry_code_message_field_and_request_id(service: Service, job_files: JobFiles) -> None:
    with service.client() as client:
        with pytest.raises(ValidationError) as invalid:
            client.create_job(job_files.spec(method={"temperature": 0}))
        assert invalid.value.field == "method.temperature"
        assert invalid.value.code == "invalid_request" and invalid.value.request_id
        assert any(problem["field"] == "method.temperature" for problem in invalid.value.details)

    with Client(service.url, "dk_wrong") as stranger, pytest.raises(AuthError) as denied:
        stranger.get_job("job_00000000000000000000000000")
    assert denied.value.status == 401

    with Client(f"http://127.0.0.1:{free_port()}", "dk_x", retries=1, backoff=0.05) as nowhere:
        with pytest.raises(ConnectionError) as down:
            nowhere.architectures()
        assert down.value.code == "connection_error" and not down.value.sent


def test_another_users_job_is_not_found(service: Service, finished_job: Job) -> None:
    from tests.client.conftest import run_cli

    created = run_cli("admin", "create-user", "grace", env=service.env)
    other_key = created.stdout.split()[-1]
    with Client(service.url, other_key) as other, pytest.raises(NotFound):
        other.get_job(finished_job.id)
