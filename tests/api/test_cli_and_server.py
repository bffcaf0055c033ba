"""The `distillery` command and a real uvicorn process: admin, migrate-then-serve, health, auth, uploads."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.api import factories
from tests.support import free_port

DISTILLERY = [sys.executable, "-c", "from distillery.cli import app; app()"]


def _env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILLERY_")}
    return {**env, "DISTILLERY_DATA_DIR": str(data_dir), "DISTILLERY_LOG_JSON": "true"}


def _cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*DISTILLERY, *args], env=_env(data_dir), capture_output=True, text=True, timeout=120)



def test_admin_migrate_makes_the_schema(tmp_path: Path) -> None:
    import sqlite3

    result = _cli(tmp_path, "admin", "migrate")
    assert result.returncode == 0, result.stderr
    with sqlite3.connect(tmp_path / "distillery.db") as connection:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        (revision,) = connection.execute("SELECT version_num FROM alembic_version").fetchone()
    assert {"user", "job", "file", "artifact", "job_event"} <= tables
    assert revision
    assert _cli(tmp_path, "admin", "migrate").returncode == 0  # a second run changes nothing


def test_admin_create_user_prints_key_last(tmp_path: Path) -> None:
    result = _cli(tmp_path, "admin", "create-user", "carol")
    assert result.returncode == 0, result.stderr
    key = result.stdout.split()[-1]
    assert key.startswith("dk_") and len(key) > 40
    assert (tmp_path / "distillery.db").exists()  # migrated on the way

    again = _cli(tmp_path, "admin", "create-user", "carol")
    assert again.returncode == 1 and "exists" in again.stderr


def test_admin_revoke_key(tmp_path: Path) -> None:
    key = _cli(tmp_path, "admin", "create-user", "dave").stdout.split()[-1]
    assert _cli(tmp_path, "admin", "revoke-key", key).returncode == 0
    assert _cli(tmp_path, "admin", "revoke-key", key).returncode == 1


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, Path]]:
    """`distillery api` on a free port, on the embedded defaults in a fresh data folder."""
    data_dir = tmp_path_factory.mktemp("served")
    key = _cli(data_dir, "admin", "create-user", "erin").stdout.split()[-1]
    port = free_port()
    log = (data_dir / "server.log").open("w")
    process = subprocess.Popen(
        [*DISTILLERY, "api", "--port", str(port)], env=_env(data_dir), stdout=log, stderr=subprocess.STDOUT
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/livez", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
            assert process.poll() is None, (data_dir / "server.log").read_text()
        yield base, key, data_dir
    finally:
        process.terminate()
        process.wait(timeout=20)
        log.close()


def test_live_server_health(server: tuple[str, str, Path]) -> None:
    base, _, _ = server
    assert httpx.get(f"{base}/livez").json() == {"status": "ok", "checks": {}}
    ready = httpx.get(f"{base}/readyz", timeout=10)
    assert ready.status_code == 200, ready.text
    assert "distillery_jobs" in httpx.get(f"{base}/metrics").text


def test_live_server_auth(server: tuple[str, str, Path]) -> None:
    base, key, _ = server
    assert httpx.get(f"{base}/v1/jobs").status_code == 401
    assert httpx.get(f"{base}/v1/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 200


def test_live_server_upload_download_round_trip(server: tuple[str, str, Path]) -> None:
    base, key, data_dir = server
    headers = {"Authorization": f"Bearer {key}"}
    content = factories.npz_bytes(num=2000)  # ~1.6 MB: several chunks on the wire
    created = httpx.post(
        f"{base}/v1/files",
        headers=headers,
        data={"purpose": "dataset"},
        files={"file": ("train.npz", content)},
        timeout=30,
    )
    assert created.status_code == 201, created.text
    assert created.json()["sha256"] == hashlib.sha256(content).hexdigest()
    downloaded = httpx.get(f"{base}/v1/files/{created.json()['id']}/content", headers=headers)
    assert downloaded.content == content
    assert downloaded.headers["x-checksum-sha256"] == created.json()["sha256"]
    log_lines = (data_dir / "server.log").read_text().splitlines()
    assert any('"route": "/v1/files"' in line and '"request_id"' in line for line in log_lines)
