"""Fixtures for the browser interface's tests.

* In-process: the real app (`create_app`, which mounts the web pages) on a migrated SQLite file,
  driven by Starlette's TestClient: sign-in, sessions, CSRF, rendering of every page.
* End to end: a real service in a subprocess (`distillery serve`), driven by Debian's
  Chromium through Playwright. Screenshots go to `test-artifacts/screenshots/`.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from api.main import create_app
from service.db import create_db_engine
from service.migrate import upgrade_to_head
from service.models import User
from service.settings import Settings
from service.storage import Storage
from tests.api import factories
from tests.support import free_port

REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO / "test-artifacts" / "screenshots"
CHROMIUM = os.environ.get("DISTILLERY_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
DISTILLERY = [sys.executable, "-c", "from distillery.cli import app; app()"]
# Fast leases, progress written twice a second, one torch thread: the job is small and the machine shared.
SERVICE_ENV = {
    "DISTILLERY_ENVIRONMENT": "test",
    "DISTILLERY_LOG_JSON": "false",
    "DISTILLERY_LEASE_SECONDS": "10",
    "DISTILLERY_HEARTBEAT_SECONDS": "1",
    "DISTILLERY_CANCEL_POLL_SECONDS": "0.3",
    "DISTILLERY_PROGRESS_WRITE_SECONDS": "0.3",
    "DISTILLERY_REAPER_INTERVAL_SECONDS": "2",
    "DISTILLERY_BROKER_POLLING_SECONDS": "0.1",
    "DISTILLERY_EVENTS_POLL_SECONDS": "0.2",
    "DISTILLERY_WORKER_THREADS": "1",
    "DISTILLERY_LATENCY_RUNS": "3",
    "DISTILLERY_MAX_CONCURRENT_JOBS": "10",
    "DISTILLERY_SHUTDOWN_TIMEOUT_SECONDS": "10",
    "OMP_NUM_THREADS": "1",
}


# ------------------------------------------------------------------------------------- in-process


@dataclass
class WebApp:
    app: FastAPI
    client: TestClient
    settings: Settings
    session_factory: sessionmaker[Session]
    storage: Storage


@pytest.fixture(scope="session")
def web_sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("web-sqlite") / "distillery.db"
    upgrade_to_head(Settings(database_url=f"sqlite:///{path}"))
    return path


@pytest.fixture
def web(tmp_path: Path, web_sqlite_template: Path) -> Iterator[WebApp]:
    database = tmp_path / "distillery.db"
    database.write_bytes(web_sqlite_template.read_bytes())
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=f"sqlite:///{database}",
        broker_url="memory://",
        environment="test",
        max_concurrent_jobs=5,
    )
    engine: Engine = create_db_engine(settings.database_url)
    session_factory = sessionmaker(bind=engine, expire_on_commit=False)
    storage = Storage(settings.storage_url)
    app = create_app(settings, session_factory=session_factory, storage=storage)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield WebApp(app, client, settings, session_factory, storage)
    engine.dispose()


@dataclass
class Person:
    user: User
    key: str


def make_person(web: WebApp, name: str) -> Person:
    with web.session_factory() as session:
        user, key = factories.make_user(session, name)
    return Person(user, key)


CSRF_INPUT = re.compile(r'name="csrf_token" value="([^"]+)"')


def csrf_from(html: str) -> str:
    match = CSRF_INPUT.search(html)
    assert match, "the page has no CSRF field"
    return match.group(1)


def sign_in(client: TestClient, key: str) -> str:
    """Sign in through the form; returns the session's CSRF token."""
    token = csrf_from(client.get("/web/login").text)
    response = client.post("/web/login", data={"api_key": key, "csrf_token": token, "next": "/web/jobs"},
                           follow_redirects=False)
    assert response.status_code == 303, response.text
    return csrf_from(client.get("/web/jobs").text)


# ----------------------------------------------------------------------------------- end to end



@dataclass
class Service:
    base_url: str
    api_key: str
    data_dir: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def api(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers={"Authorization": f"Bearer {self.api_key}"}, timeout=30)

    def logs(self) -> str:
        return "\n".join(
            f"--- {path.name} ---\n{path.read_text(errors='replace')[-6000:]}"
            for path in sorted(self.data_dir.glob("*.log"))
        )


def _service_env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILLERY_")}
    return {**env, **SERVICE_ENV, "DISTILLERY_DATA_DIR": str(data_dir), "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="session")
def chromium() -> str:
    if not Path(CHROMIUM).exists():
        message = f"no Chromium at {CHROMIUM}: run scripts/ensure_browser.sh"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI must run the browser tests, not skip them
        pytest.skip(message)
    return CHROMIUM


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory, chromium: str) -> Iterator[Service]:
    data_dir = tmp_path_factory.mktemp("web-service")
    env = _service_env(data_dir)
    created = subprocess.run([*DISTILLERY, "admin", "create-user", "web-tester"], env=env, cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    assert created.returncode == 0, created.stderr
    key = created.stdout.split()[-1]
    port = free_port()
    commands = {"serve": [*DISTILLERY, "serve", "--port", str(port)]}
    service = Service(f"http://127.0.0.1:{port}", key, data_dir)
    logs = []
    try:
        for name, command in commands.items():
            log = (data_dir / f"{name}.log").open("wb")
            logs.append(log)
            service.processes.append(subprocess.Popen(command, env=env, cwd=REPO, stdout=log,
                                                      stderr=subprocess.STDOUT, start_new_session=True))
        _wait_until_up(service)
        yield service
    finally:
        for process in service.processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, 15)
        for process in service.processes:
            try:
                process.wait(timeout=25)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, 9)
                process.wait(timeout=5)
        for log in logs:
            log.close()


def _wait_until_up(service: Service) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        for process in service.processes:
            assert process.poll() is None, f"the service exited early:\n{service.logs()}"
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{service.base_url}/web/login", timeout=2).status_code == 200:
                return
        time.sleep(0.25)
    raise AssertionError(f"the service did not come up in 90 s:\n{service.logs()}")


@dataclass(frozen=True)
class JobFiles:
    teacher: Path
    data: Path


@pytest.fixture(scope="session")
def job_files(tmp_path_factory: pytest.TempPathFactory) -> JobFiles:
    """8x8 blob images (4 classes, enough samples that training takes a few seconds) and an MLP teacher."""
    import torch

    from tests.kdcore.helpers import make_blob_images, save_safetensors_teacher, train_teacher

    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("web-job-files")
    data = make_blob_images(folder / "blobs.npz", num_train=3000, num_test=200)
    teacher = save_safetensors_teacher(train_teacher("mlp", {"hidden": [64, 64]}, data, epochs=3),
                                       folder / "teacher.safetensors")
    return JobFiles(teacher=teacher, data=data)


# pytest-playwright: Debian's Chromium, never a downloaded browser.
@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args: dict[str, Any], chromium: str) -> dict[str, Any]:
    return {**browser_type_launch_args, "executable_path": chromium, "headless": True, "args": CHROMIUM_ARGS}


@pytest.fixture(scope="session")
def screenshots() -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS
