"""The distribution as users install it: the wheel, into fresh virtual environments.

`pip install distillery` is the client alone: no torch, FastAPI, SQLAlchemy or Celery, and its
commands work against a running server. `distillery[server]` runs the API (migrations included,
found inside the installed package) with no torch at all.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVER_STACK = ("torch", "fastapi", "sqlalchemy", "celery")

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Venv:
    path: Path

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    @property
    def distillery(self) -> Path:
        return self.path / "bin" / "distillery"

    def importable(self, module: str) -> bool:
        probe = subprocess.run([str(self.python), "-c", f"import {module}"], capture_output=True, check=False)
        return probe.returncode == 0


def _run(
    *args: str | Path, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(arg) for arg in args], capture_output=True, text=True, env=env, timeout=timeout,
                          check=False)


def _make_venv(folder: Path, requirement: str) -> Venv:
    created = _run(sys.executable, "-m", "venv", folder)
    assert created.returncode == 0, created.stderr
    venv = Venv(folder)
    installed = _run(venv.python, "-m", "pip", "install", "-q", "--disable-pip-version-check", requirement)
    assert installed.returncode == 0, installed.stderr[-3000:]
    return venv


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    built = _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--disable-pip-version-check",
                 "--wheel-dir", out, ROOT)
    assert built.returncode == 0, built.stderr[-3000:]
    (path,) = out.glob("distillery-*.whl")
    return path


@pytest.fixture(scope="module")
def client_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Venv:
    return _make_venv(tmp_path_factory.mktemp("client-venv"), str(wheel))


@pytest.fixture(scope="module")
def server_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Venv:
    return _make_venv(tmp_path_factory.mktemp("server-venv"), f"{wheel}[server]")


@dataclass(frozen=True)
class RunningApi:
    url: str
    api_key: str


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _clean_env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISTILLERY_", "PYTHON", "VIRTUAL_ENV"))}
    return {**env, **values}


@pytest.fixture(scope="module")
def running_api(server_venv: Venv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningApi]:
    """`distillery api` from the [server] install, on an embedded data folder, run from outside the checkout."""
    data_dir = tmp_path_factory.mktemp("server-data")
    env = _clean_env(DISTILLERY_DATA_DIR=str(data_dir), DISTILLERY_LOG_JSON="false")
    # What the cluster's one-shot migrate service runs: the revisions come from inside the wheel.
    migrated = subprocess.run([str(server_venv.distillery), "admin", "migrate"], capture_output=True, text=True,
                              env=env, cwd=data_dir, timeout=120, check=False)
    assert migrated.returncode == 0, migrated.stderr[-3000:]
    created = subprocess.run([str(server_venv.distillery), "admin", "create-user", "ada"], capture_output=True,
                             text=True, env=env, cwd=data_dir, timeout=120, check=False)
    assert created.returncode == 0, created.stderr[-3000:]
    port = _free_port()
    log = (data_dir / "api.log").open("wb")
    process = subprocess.Popen([str(server_venv.distillery), "api", "--port", str(port)], env=env, cwd=data_dir,
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, (data_dir / "api.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, (data_dir / "api.log").read_text()[-3000:]
            time.sleep(0.3)
        yield RunningApi(url=url, api_key=created.stdout.split()[-1])
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
        log.close()


def test_the_plain_install_is_the_client_alone(client_venv: Venv) -> None:
    present = [module for module in SERVER_STACK if client_venv.importable(module)]
    assert present == [], f"pip install distillery pulled in {present}"
    assert client_venv.importable("client")


def test_the_client_commands_work_against_a_running_server(
    client_venv: Venv, running_api: RunningApi, tmp_path: Path
) -> None:
    env = _clean_env(XDG_CONFIG_HOME=str(tmp_path / "config"), HOME=str(tmp_path))
    shown = _run(client_venv.distillery, "--help", env=env)
    assert shown.returncode == 0, shown.stderr
    assert "login" in shown.stdout and "submit" in shown.stdout

    logged_in = _run(client_venv.distillery, "login", running_api.url, "--api-key", running_api.api_key, env=env)
    assert logged_in.returncode == 0, logged_in.stderr
    listed = _run(client_venv.distillery, "list", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.strip().startswith("[") and listed.stdout.strip().endswith("]")

    refused = _run(client_venv.distillery, "list", "--api-key", "dk_not_a_real_key", env=env)
    assert refused.returncode == 4, refused.stderr  # the server, not the client, refused the key


def test_a_server_command_on_the_client_install_names_the_extra(client_venv: Venv, tmp_path: Path) -> None:
    env = _clean_env(DISTILLERY_DATA_DIR=str(tmp_path))
    for command, extra in ((["serve"], "all"), (["admin", "create-user", "bob"], "service"), (["worker"], "worker")):
        result = _run(client_venv.distillery, *command, env=env)
        assert result.returncode == 2, (command, result.stderr)
        assert f"pip install 'distillery[{extra}]'" in result.stderr and "Traceback" not in result.stderr, command


def test_the_server_install_runs_the_api_without_torch(server_venv: Venv, running_api: RunningApi) -> None:
    assert not server_venv.importable("torch")
    assert server_venv.importable("fastapi") and server_venv.importable("sqlalchemy")
    ready = httpx.get(f"{running_api.url}/readyz", timeout=5).json()
    assert ready["status"] == "ok" and set(ready["checks"]) >= {"database", "broker", "storage"}
    architectures = httpx.get(f"{running_api.url}/v1/architectures",
                              headers={"Authorization": f"Bearer {running_api.api_key}"}, timeout=5)
    assert architectures.status_code == 200
    assert "mlp" in {entry["name"] for entry in architectures.json()}
