"""A real service for the client tests: `distillery serve` (API + worker) on a free port, in a fresh
data folder, with a user made by `distillery admin create-user`, plus a second, restartable
`distillery api` process on the same data folder (same database, broker and storage) for the
retry tests, which kill and restart it while the client is mid-call.

The command under test is this environment's `distillery` entry point; set DISTILLERY_CLI to test
another one (an installed wheel, a container's).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from client import Client
from tests.support import free_port

DISTILLERY = shlex.split(os.environ.get("DISTILLERY_CLI", "")) or [str(Path(sys.executable).with_name("distillery"))]

# Quick leases and polling so jobs start and end in seconds; one torch thread per job, because the
# tests, the API and the worker share two cores (OpenMP spinning makes oversubscription 5-20x slower).
FAST_SERVICE_ENV = {
    "DISTILLERY_ENVIRONMENT": "test",
    "DISTILLERY_LOG_JSON": "true",
    "DISTILLERY_LEASE_SECONDS": "10",
    "DISTILLERY_HEARTBEAT_SECONDS": "1",
    "DISTILLERY_CANCEL_POLL_SECONDS": "0.3",
    "DISTILLERY_PROGRESS_WRITE_SECONDS": "0.3",
    "DISTILLERY_REAPER_INTERVAL_SECONDS": "2",
    "DISTILLERY_BROKER_POLLING_SECONDS": "0.1",
    "DISTILLERY_EVENTS_POLL_SECONDS": "0.2",
    "DISTILLERY_WORKER_THREADS": "1",
    "DISTILLERY_LATENCY_RUNS": "3",
    "DISTILLERY_MAX_CONCURRENT_JOBS": "100",
    "DISTILLERY_SHUTDOWN_TIMEOUT_SECONDS": "15",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}



def base_env(data_dir: Path, config_home: Path) -> dict[str, str]:
    """This environment without anyone's DISTILLERY_* settings, pointed at `data_dir`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILLERY_")}
    return {
        **env,
        **FAST_SERVICE_ENV,
        "DISTILLERY_DATA_DIR": str(data_dir),
        "XDG_CONFIG_HOME": str(config_home),  # where `distillery login` writes
        "COLUMNS": "200",
    }


def run_cli(
    *args: str, env: dict[str, str], timeout: float = 180, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*DISTILLERY, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd, check=False
    )


def wait_until_live(url: str, process: subprocess.Popen[bytes], log: Path, *, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/livez", timeout=1).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"the server did not come up in {timeout} s:\n{log.read_text()[-4000:]}")


def stop_process(process: subprocess.Popen[bytes], *, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
    """Signal the process group (the process started it with start_new_session), then make sure it is gone."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    # Whatever the group still holds (a job's process) goes too.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


@dataclass
class Server:
    """One server process the test owns: started, stopped, killed and started again on the same port."""

    argv: list[str]
    env: dict[str, str]
    port: int
    log: Path
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, wait: bool = True) -> None:
        self.starts += 1
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [*self.argv, "--host", "127.0.0.1", "--port", str(self.port)],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if wait:
            wait_until_live(self.url, self.process, self.log)

    def stop(self, *, kill: bool = False) -> None:
        if self.process is not None:
            stop_process(self.process, sig=signal.SIGKILL if kill else signal.SIGTERM)


@dataclass
class Service:
    """`distillery serve` and what a test needs to talk to it."""

    server: Server
    api_key: str
    data_dir: Path
    config_home: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.server.url

    def cli_env(self, **overrides: str) -> dict[str, str]:
        """The environment a logged-in user's shell would have: DISTILLERY_URL and DISTILLERY_API_KEY set."""
        return {**self.env, "DISTILLERY_URL": self.url, "DISTILLERY_API_KEY": self.api_key, **overrides}

    def cli(self, *args: str, timeout: float = 180, **env_overrides: str) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, env=self.cli_env(**env_overrides), timeout=timeout)

    def client(self, **options: Any) -> Client:
        return Client(self.url, self.api_key, **options)


@dataclass(frozen=True)
class JobFiles:
    """A small real job: blob images (npz with a test split), an MLP teacher, and spec files naming them."""

    folder: Path
    data: Path
    teacher: Path

    def spec(self, *, epochs: int = 2, **overrides: Any) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "name": "client-test",
            "teacher": {
                "file": self.teacher.name,
                "format": "safetensors",
                "arch": "mlp",
                "arch_args": {"hidden": [64]},
            },
            "student": {"arch": "mlp", "arch_args": {"hidden": [16]}},
            "data": {"train": self.data.name, "val_fraction": 0.2},
            # No baseline (on by default): these tests count the distillation's epochs and time the job.
            "stages": {"distill_epochs": epochs, "baseline": False},
            "batch_size": 32,
            "optim": {"lr": 0.005},
            "device": "cpu",
            "export": ["safetensors", "onnx"],
        }
        for key, value in overrides.items():
            spec[key] = {**spec[key], **value} if isinstance(value, dict) and isinstance(spec.get(key), dict) else value
        return spec

    def write_spec(self, filename: str, /, **overrides: Any) -> Path:
        """A YAML spec beside the files, naming them by relative path (as a user writes one)."""
        path = self.folder / filename
        path.write_text(yaml.safe_dump(self.spec(**overrides), sort_keys=False))
        return path


@pytest.fixture(scope="session")
def job_files(tmp_path_factory: pytest.TempPathFactory) -> JobFiles:
    import torch

    from tests.kdcore.helpers import make_blob_images, save_safetensors_teacher, train_teacher

    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("job-files")
    data = make_blob_images(folder / "blobs.npz", num_train=400, num_test=100)
    model = train_teacher("mlp", {"hidden": [64]}, data, epochs=3)
    teacher = save_safetensors_teacher(model, folder / "teacher.safetensors")
    return JobFiles(folder=folder, data=data, teacher=teacher)


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """`distillery serve` (the API and a worker) on a free port, and a user's API key."""
    data_dir = tmp_path_factory.mktemp("service")
    config_home = tmp_path_factory.mktemp("config")
    env = base_env(data_dir, config_home)
    created = run_cli("admin", "create-user", "ada", env=env)
    assert created.returncode == 0, created.stderr
    api_key = created.stdout.split()[-1]
    server = Server([*DISTILLERY, "serve"], env, free_port(), data_dir / "serve.log")
    server.start()
    try:
        yield Service(server=server, api_key=api_key, data_dir=data_dir, config_home=config_home, env=env)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def second_api(service: Service) -> Iterator[Server]:
    """`distillery api` alone on another port, on the service's data folder: jobs sent here run on the
    service's worker, and the tests may kill and restart this process as they like."""
    server = Server([*DISTILLERY, "api"], service.env, free_port(), service.data_dir / "second-api.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()
