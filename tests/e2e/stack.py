"""A real service for end-to-end tests: `distillery api` and `distillery worker` processes (or
`distillery serve`) on real databases and brokers, driven over HTTP like a user would.

The commands run as `python -c "from distillery.cli import app; app()" ...`, which is what the
`distillery` script does, with this interpreter (so no installed entry point is needed)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from service import users
from service.db import create_db_engine, create_session_factory
from service.ids import new_id
from service.migrate import upgrade_to_head
from service.settings import Settings
from tests.support import free_port
from tests.worker.support import FAST_SERVICE_ENV
from worker.process import die_with_parent
from worker.supervisor import API_MAIN

REPO_ROOT = Path(__file__).resolve().parents[2]
FINISHED = ("succeeded", "failed", "cancelled")


class Stack:
    """One service's processes, settings and a user's API key; `stop` ends every process it started."""

    def __init__(self, root: Path, *, database_url: str | None = None, broker_url: str | None = None,
                 fast: bool = True, **env: str) -> None:
        """`fast`: the tests' short leases and intervals (FAST_SERVICE_ENV); else the defaults."""
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, **(FAST_SERVICE_ENV if fast else {}), "DISTILLERY_DATA_DIR": str(root), **env}
        for name, value in (("DISTILLERY_DATABASE_URL", database_url), ("DISTILLERY_BROKER_URL", broker_url)):
            if value is None:
                self.env.pop(name, None)
            else:
                self.env[name] = value
        self.settings = Settings(data_dir=root, database_url=database_url or "", broker_url=broker_url or "")
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.port: int | None = None
        self._client: httpx.Client | None = None
        self.api_key = ""

    # Processes -------------------------------------------------------------------------------

    def create_user(self) -> str:
        """Migrate (as `distillery api` would) and make a user; returns its API key."""
        upgrade_to_head(self.settings)
        engine = create_db_engine(self.settings.database_url)
        try:
            with create_session_factory(engine)() as session:
                _user, self.api_key = users.create_user(session=session, name=new_id("name"))
        finally:
            engine.dispose()
        return self.api_key

    def use(self, api_key: str) -> None:
        """Speak as another user from now on (`create_user` returns each key)."""
        if self._client is not None:
            self._client.close()
            self._client = None
        self.api_key = api_key

    def start_api(self) -> None:
        self.port = free_port()
        self.spawn("api", [sys.executable, "-c", API_MAIN, "api", "--host", "127.0.0.1", "--port", str(self.port)])
        self.wait_for_http("/livez")

    def start_serve(self) -> subprocess.Popen[bytes]:
        self.port = self.port or free_port()
        process = self.spawn("serve", [sys.executable, "-c", API_MAIN, "serve", "--port", str(self.port)])
        self.wait_for_http("/readyz", timeout=90)
        return process

    def start_worker(self, name: str, *queues: str) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-c", API_MAIN, "worker"]  # `distillery worker`
        for queue in queues or ("default",):
            argv += ["--queue", queue]
        process = self.spawn(name, argv)
        self.wait_for_log(name, " ready.", timeout=90)
        return process

    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = (self.root / f"{name}.log").open("ab")
        process = subprocess.Popen(argv, cwd=REPO_ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True, preexec_fn=die_with_parent)
        log.close()
        self.processes[name] = process
        return process

    def kill_group(self, name: str, signum: int = signal.SIGKILL) -> None:
        process = self.processes[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signum)
        process.wait(timeout=60)

    def stop(self) -> None:
        if self._client is not None:
            self._client.close()
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        for process in self.processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
        for process in self.processes.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def log_tails(self, lines: int = 40) -> str:
        # The polling GETs would push every line worth reading out of the tail.
        def tail(name: str) -> str:
            kept = [line for line in self.log(name).splitlines() if "distillery.access GET" not in line]
            return "\n".join(kept[-lines:])

        return "\n".join(f"----- {name}.log -----\n{tail(name)}" for name in self.processes)

    def wait_for_log(self, name: str, text: str, *, timeout: float = 60) -> None:
        def found() -> bool:
            if self.processes[name].poll() is not None:
                raise AssertionError(f"{name} exited with {self.processes[name].returncode}:\n{self.log(name)}")
            return text in self.log(name)

        wait_until(found, timeout=timeout, what=f"{text!r} in {name}.log")

    def wait_for_http(self, path: str, *, timeout: float = 60) -> None:
        def answers() -> bool:
            for process in self.processes.values():
                if process.poll() is not None:
                    raise AssertionError(f"a process exited with {process.returncode}:\n{self.log_tails()}")
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(f"{self.url}{path}", timeout=2).status_code == 200
            return False

        wait_until(answers, timeout=timeout, what=f"GET {path}")

    # HTTP ------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def http(self) -> httpx.Client:
        if self._client is None:
            self._client = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.api_key}"},
                                        timeout=30)
        return self._client

    def upload(self, path: Path, purpose: str) -> str:
        with path.open("rb") as handle:
            response = self.http.post("/v1/files", data={"purpose": purpose}, files={"file": (path.name, handle)})
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    def submit(self, spec: dict[str, Any]) -> str:
        response = self.http.post("/v1/jobs", json=spec)
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    def job(self, job_id: str) -> dict[str, Any]:
        response = self.http.get(f"/v1/jobs/{job_id}")
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result

    def cancel(self, job_id: str) -> dict[str, Any]:
        response = self.http.post(f"/v1/jobs/{job_id}/cancel")
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result

    def wait_for_state(self, job_id: str, *states: str, timeout: float = 120) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            job = self.job(job_id)
            if job["state"] in states:
                return job
            if job["state"] in FINISHED:
                raise AssertionError(f"job {job_id} is {job['state']}, not {states}: {job['error']}\n"
                                     f"{self.log_tails()}")
            return None

        job: dict[str, Any] = wait_until(reached, timeout=timeout, what=f"job {job_id} {states}",
                                         on_timeout=self.log_tails)
        return job

    def wait_for_epoch(self, job_id: str, epoch: int, *, timeout: float = 90) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            job = self.job(job_id)
            if job["state"] in FINISHED:
                raise AssertionError(f"job {job_id} finished ({job['state']}) before epoch {epoch}")
            progress = job["progress"] or {}
            return job if job["stage"] == "distill" and (progress.get("epoch") or 0) >= epoch else None

        job: dict[str, Any] = wait_until(reached, timeout=timeout, what=f"job {job_id} at epoch {epoch}",
                                         on_timeout=self.log_tails)
        return job

    def events(self, job_id: str) -> list[dict[str, Any]]:
        """The job's whole event log through the server-sent events route (it ends once the job finished)."""
        events = []
        with self.http.stream("GET", f"/v1/jobs/{job_id}/events", timeout=30) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data:"):
                    events.append(json.loads(line.removeprefix("data:").strip()))
        return events

    def download(self, job_id: str, name: str, folder: Path) -> Path:
        response = self.http.get(f"/v1/jobs/{job_id}/artifacts/{name}")
        assert response.status_code == 200, response.text
        checksum = response.headers.get("X-Checksum-Sha256")
        if checksum:
            assert hashlib.sha256(response.content).hexdigest() == checksum
        path = folder / Path(name).name
        path.write_bytes(response.content)
        return path


def wait_until(condition: Callable[[], Any], *, timeout: float, what: str, interval: float = 0.2,
               on_timeout: Callable[[], str] | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    detail = f"\n{on_timeout()}" if on_timeout is not None else ""
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{detail}")


@contextlib.contextmanager
def running(stack: Stack) -> Iterator[Stack]:
    try:
        yield stack
    finally:
        stack.stop()
        print(stack.log_tails())  # shown by pytest when a test failed


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (entry / "stat").read_text()
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
