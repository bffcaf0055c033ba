"""The client commands of `distillery`, run as a user runs them, against a real `distillery serve`."""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import subprocess
import time
from pathlib import Path

import pytest

from tests.client.conftest import DISTILLERY, JobFiles, Service, free_port, run_cli

pytestmark = pytest.mark.slow


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _one_error_line(stderr: str) -> str:
    """Every failure is exactly one line on stderr, `error: <code>: <message>`, and never a traceback."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_submit_wait_then_download_checks_sha256(service: Service, job_files: JobFiles, tmp_path: Path) -> None:
    spec = job_files.write_spec("job.yaml")

    submitted = service.cli("submit", str(spec), "--wait", "--json", timeout=300)

    assert submitted.returncode == 0, submitted.stderr
    job = json.loads(submitted.stdout)
    assert job["state"] == "succeeded"
    assert job["spec"]["teacher"]["file"].startswith("file_")  # the local file was uploaded
    assert job["metrics"]["student"]["accuracy"] > 0.5

    out = tmp_path / "artifacts"
    downloaded = service.cli("download", job["id"], "--out", str(out), "--json")
    assert downloaded.returncode == 0, downloaded.stderr
    entries = json.loads(downloaded.stdout)
    names = {entry["name"] for entry in entries}
    assert {"student.safetensors", "student.onnx", "metrics.json", "report.md"} <= names
    with service.client() as client:
        listed = {artifact.name: artifact.sha256 for artifact in client.artifacts(job["id"])}
    for entry in entries:
        path = Path(entry["path"])
        assert path.is_relative_to(out)
        assert _sha256(path) == entry["sha256"] == listed[entry["name"]]
    assert json.loads((out / "metrics.json").read_text())["student"]["accuracy"] == pytest.approx(
        job["metrics"]["student"]["accuracy"]
    )
    assert not list(out.rglob(".*.part"))

    again = service.cli("download", job["id"], "--out", str(out), "--name", "metrics.json")
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == str(out / "metrics.json")


def test_submit_without_wait_prints_the_job_id_and_reuses_uploads(service: Service, job_files: JobFiles) -> None:
    spec = job_files.write_spec("job-nowait.yaml", name="no-wait")
    with service.client() as client:
        client.submit(spec)  # uploads (or reuses) the two files
        files_before = len(list(client.list_files()))

        submitted = service.cli("submit", str(spec))

        assert submitted.returncode == 0, submitted.stderr
        job_id = submitted.stdout.strip()
        assert job_id.startswith("job_")
        assert len(list(client.list_files())) == files_before  # same bytes: nothing uploaded again
        assert client.wait(job_id, timeout=240).state == "succeeded"

    status = service.cli("status", job_id)
    assert status.returncode == 0, status.stderr
    assert "succeeded" in status.stdout and "student accuracy" in status.stdout

    waited = service.cli("wait", job_id)
    assert waited.returncode == 0
    assert waited.stdout.startswith(f"{job_id} succeeded")

    listed = service.cli("list", "--state", "succeeded", "--json")
    assert job_id in {job["id"] for job in json.loads(listed.stdout)}

    logs = service.cli("logs", job_id)
    assert logs.returncode == 0, logs.stderr
    kinds = [line.split()[2] for line in logs.stdout.splitlines()]
    assert kinds[0] == "state" and "queued" in logs.stdout.splitlines()[0]
    assert "progress" in kinds and "succeeded" in logs.stdout.splitlines()[-1]
    events = [json.loads(line) for line in service.cli("logs", job_id, "--json").stdout.splitlines()]
    assert [event["id"] for event in events] == sorted(event["id"] for event in events)


def test_cancel_running_job_then_wait_exits_3(service: Service, job_files: JobFiles) -> None:
    spec = job_files.write_spec("long.yaml", name="long", stages={"distill_epochs": 2000})
    job_id = service.cli("submit", str(spec)).stdout.strip()
    with service.client() as client:
        deadline = time.monotonic() + 120
        while client.get_job(job_id).state == "queued" and time.monotonic() < deadline:
            time.sleep(0.3)

    cancelled = service.cli("cancel", job_id)

    assert cancelled.returncode == 0, cancelled.stderr
    assert job_id in cancelled.stdout
    waited = service.cli("wait", job_id, "--json", timeout=120)
    assert waited.returncode == 3, waited.stderr
    assert json.loads(waited.stdout)["state"] == "cancelled"

    again = service.cli("cancel", job_id)  # cancelling a cancelled job is what was asked: no error
    assert again.returncode == 0, again.stderr


def test_logs_into_a_closed_pipe_stop_quietly_and_status_counts_the_running_attempt(
    service: Service, job_files: JobFiles
) -> None:
    spec = job_files.write_spec("piped.yaml", name="piped", stages={"distill_epochs": 2000})
    job_id = service.cli("submit", str(spec)).stdout.strip()
    try:
        with service.client() as client:
            deadline = time.monotonic() + 120
            while client.get_job(job_id).state == "queued" and time.monotonic() < deadline:
                time.sleep(0.3)
        status = service.cli("status", job_id)
        assert re.search(r"^attempts\s+1 of \d+$", status.stdout, re.MULTILINE), status.stdout

        # `distillery logs JOB --follow | head -n 3`: the reader leaves while the log still streams.
        follow = subprocess.Popen([*DISTILLERY, "logs", job_id, "--follow", "--all"], env=service.cli_env(),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert follow.stdout is not None and follow.stderr is not None
        lines = [follow.stdout.readline() for _ in range(3)]
        follow.stdout.close()
        returncode = follow.wait(timeout=60)
        stderr = follow.stderr.read()
        assert all(line.strip() for line in lines), lines
        assert returncode == 141, stderr
        assert stderr == "", stderr  # no "error: Broken pipe", no "Exception ignored"
    finally:
        service.cli("cancel", job_id)


def test_submit_wait_exits_1_when_the_job_fails(service: Service, job_files: JobFiles) -> None:
    # The spec is valid and the files are fine, but the teacher does not have the architecture named:
    # the worker's deep check fails the job in its first stage.
    spec = job_files.write_spec("mismatch.yaml", teacher={"arch_args": {"hidden": [32]}})

    submitted = service.cli("submit", str(spec), "--wait", timeout=240)

    assert submitted.returncode == 1, submitted.stdout + submitted.stderr
    assert " failed: " in submitted.stderr


def test_architectures_lists_the_registry(service: Service) -> None:
    result = service.cli("architectures", "--json")
    assert result.returncode == 0, result.stderr
    names = {entry["name"] for entry in json.loads(result.stdout)}
    assert {"mlp", "cnn"} <= names
    text = service.cli("architectures")
    assert any(line.startswith("mlp ") for line in text.stdout.splitlines())


def test_upload_prints_the_file_id(service: Service, job_files: JobFiles) -> None:
    result = service.cli("upload", str(job_files.data), "--purpose", "dataset", "--json")
    assert result.returncode == 0, result.stderr
    uploaded = json.loads(result.stdout)
    assert uploaded["sha256"] == _sha256(job_files.data)
    assert uploaded["info"]  # the server sniffed it


def test_login_stores_the_key_0600_and_commands_use_it(service: Service, tmp_path: Path) -> None:
    env = {**service.env, "XDG_CONFIG_HOME": str(tmp_path / "config")}

    logged_in = run_cli("login", service.url, "--api-key", service.api_key, env=env)

    assert logged_in.returncode == 0, logged_in.stderr
    config = tmp_path / "config" / "distillery" / "config.json"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert json.loads(config.read_text()) == {"url": service.url, "api_key": service.api_key}
    listed = run_cli("list", "--json", env=env)  # no DISTILLERY_URL / DISTILLERY_API_KEY in env
    assert listed.returncode == 0, listed.stderr

    bad = run_cli("login", service.url, "--api-key", "dk_wrong", env=env)
    assert bad.returncode == 4
    assert _one_error_line(bad.stderr).startswith("error: ")
    assert json.loads(config.read_text())["api_key"] == service.api_key  # a refused key is not stored

    # The environment overrides the stored login.
    overridden = run_cli("list", env={**env, "DISTILLERY_API_KEY": "dk_wrong"})
    assert overridden.returncode == 4


# -- every error path: one line on stderr, a non-zero exit that says what kind of failure ----------


def test_bad_api_key_is_one_line_exit_4(service: Service) -> None:
    result = service.cli("list", DISTILLERY_API_KEY="dk_not_a_real_key")
    assert result.returncode == 4
    assert _one_error_line(result.stderr).startswith("error: invalid_api_key: ")


def test_no_api_key_at_all_is_one_line_exit_4(service: Service, tmp_path: Path) -> None:
    env = {**service.env, "XDG_CONFIG_HOME": str(tmp_path / "empty"), "DISTILLERY_URL": service.url}
    result = run_cli("status", "job_x", env=env)
    assert result.returncode == 4
    assert "distillery login" in _one_error_line(result.stderr)


def test_unknown_job_is_one_line_exit_5(service: Service) -> None:
    for command in (["status"], ["logs"], ["cancel"], ["download"], ["wait"]):
        result = service.cli(*command, "job_00000000000000000000000000")
        assert result.returncode == 5, (command, result.stderr)
        assert _one_error_line(result.stderr).startswith("error: not_found: no job ")


def test_invalid_spec_is_one_line_naming_the_field_exit_2(service: Service, job_files: JobFiles) -> None:
    spec = job_files.write_spec("bad.yaml", method={"temperature": -1})

    result = service.cli("submit", str(spec))

    assert result.returncode == 2
    line = _one_error_line(result.stderr)
    assert "method.temperature" in line and line.startswith("error: invalid_spec: ")


def test_spec_the_server_refuses_is_one_line_naming_the_field_exit_2(service: Service, job_files: JobFiles) -> None:
    # Valid for the spec model, refused by the server's checks against the uploaded file.
    spec = job_files.write_spec("onnx.yaml", teacher={"format": "onnx"})

    result = service.cli("submit", str(spec))

    assert result.returncode == 2
    line = _one_error_line(result.stderr)
    assert line.startswith("error: teacher_format_mismatch: ") and "teacher.format" in line


def test_missing_local_file_and_unreadable_spec_exit_2(service: Service, job_files: JobFiles, tmp_path: Path) -> None:
    spec = job_files.write_spec("missing.yaml", data={"train": "nowhere.npz"})
    result = service.cli("submit", str(spec))
    assert result.returncode == 2
    assert "data.train" in _one_error_line(result.stderr)

    broken = tmp_path / "broken.yaml"
    broken.write_text("teacher: [unclosed\n")
    result = service.cli("submit", str(broken))
    assert result.returncode == 2
    assert _one_error_line(result.stderr).startswith("error: invalid_spec: ")

    result = service.cli("submit", str(tmp_path / "absent.yaml"))
    assert result.returncode == 2
    _one_error_line(result.stderr)

    result = service.cli("upload", str(job_files.data), "--purpose", "weights")
    assert result.returncode == 2
    assert "purpose" in _one_error_line(result.stderr)


def test_server_down_is_one_line_exit_6(service: Service) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()

    result = service.cli("status", "job_00000000000000000000000000", DISTILLERY_URL=down)

    assert result.returncode == 6
    line = _one_error_line(result.stderr)
    assert line.startswith("error: connection_error: cannot reach the server at ") and down in line
    assert time.monotonic() - started < 60  # retried with backoff, but bounded


def test_json_errors_are_json_on_stdout(service: Service) -> None:
    result = service.cli("status", "job_00000000000000000000000000", "--json")
    assert result.returncode == 5
    body = json.loads(result.stdout)["error"]
    assert body["code"] == "not_found" and body["status"] == 404 and body["request_id"]
    _one_error_line(result.stderr)


def test_download_unknown_artifact_exit_5(service: Service, job_files: JobFiles, tmp_path: Path) -> None:
    with service.client() as client:
        finished = next(client.list_jobs(state="succeeded"), None)
        if finished is None:
            finished = client.wait(client.submit(job_files.spec(), base_dir=job_files.folder).id, timeout=240)
    result = service.cli("download", finished.id, "--out", str(tmp_path), "--name", "nope.bin")
    assert result.returncode == 5
    _one_error_line(result.stderr)
    assert not any(tmp_path.iterdir())


def test_help_lists_the_client_commands() -> None:
    result = run_cli("--help", env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    for command in ("login", "submit", "status", "list", "logs", "cancel", "download", "architectures"):
        assert f" {command} " in result.stdout, command
