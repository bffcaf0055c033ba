"""`distillery serve`: the whole service on one machine, as one command.

Migrates the database, then runs the API and one worker as two child processes (each in its
own process group, so a terminal's Ctrl-C reaches only this supervisor) and stops both on
Ctrl-C, SIGTERM or SIGHUP: SIGTERM to each group, then SIGKILL to whatever is left after
`shutdown_timeout_seconds`. A worker told to stop hands its running job back at the next step;
the job resumes from its checkpoint when the service runs again. A worker that dies is started
again; if the API dies, the service stops. Children get SIGTERM if this process is killed, so
none is left behind.

The API process never imports torch; the worker's jobs use all cores but one (`worker.threads.
job_threads`), which is left to the API and the worker's own bookkeeping.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Annotated

import typer

from service.settings import Settings, get_settings
from worker.process import die_with_parent

logger = logging.getLogger("distillery.serve")

API_MAIN = "from distillery.cli import app; app()"
WORKER_RESTART_DELAY_S = 2.0


@dataclass
class Child:
    name: str
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


def serve(host: str = "127.0.0.1", port: int = 8000, settings: Settings | None = None, *, concurrency: int = 1) -> int:
    """Run the API and a worker until a stop signal; returns the exit code."""
    from service.migrate import upgrade_to_head
    from worker.logs import configure_worker_logging

    settings = settings or get_settings()
    configure_worker_logging(settings.log_level, json_lines=settings.log_json)
    upgrade_to_head(settings)

    env = child_environment(settings)
    api = Child("api", [sys.executable, "-c", API_MAIN, "api", "--host", host, "--port", str(port)])
    worker = Child(
        "worker",
        [sys.executable, "-m", "worker.cli", "--queue", "default", "--queue", "cpu", "--concurrency",
         str(concurrency)],
    )
    stop = threading.Event()

    def on_stop(signum: int) -> None:
        logger.info("stopping (signal %d)", signum)
        stop.set()

    restore = _on_stop_signals(on_stop)
    exit_code = 0
    try:
        for child in (api, worker):
            _start(child, env)
        logger.info("serving on http://%s:%d (API pid %s, worker pid %s)", host, port,
                    _pid(api), _pid(worker))
        while not stop.wait(0.5):
            if not api.running:
                exit_code = _returncode(api) or 1
                logger.error("the API exited with %s; stopping the service", _returncode(api))
                break
            if not worker.running:
                logger.error("the worker exited with %s; starting it again", _returncode(worker))
                if stop.wait(WORKER_RESTART_DELAY_S):
                    break
                _start(worker, env)
    finally:
        _stop_all([worker, api], timeout_s=settings.shutdown_timeout_seconds)
        restore()
    return exit_code


def child_environment(settings: Settings) -> dict[str, str]:
    """The children read the same settings: the URLs are passed explicitly, derived ones included."""
    env = dict(os.environ)
    env.update(
        DISTILLERY_DATA_DIR=str(settings.data_dir),
        DISTILLERY_DATABASE_URL=settings.database_url,
        DISTILLERY_BROKER_URL=settings.broker_url,
        DISTILLERY_STORAGE_URL=settings.storage_url,
        DISTILLERY_STORAGE_OPTIONS=json.dumps(settings.storage_options),
        # Ctrl-C must not wait for a long job to finish: it stops at its next step and resumes later.
        DISTILLERY_STOP_JOBS_ON_SHUTDOWN="true",
    )
    return env


def _start(child: Child, env: dict[str, str]) -> None:
    child.process = subprocess.Popen(child.argv, env=env, start_new_session=True, preexec_fn=die_with_parent)
    logger.info("started the %s (pid %d)", child.name, child.process.pid)


def _stop_all(children: list[Child], *, timeout_s: float) -> None:
    """SIGTERM every child, wait, then SIGKILL their process groups (whatever is left in them)."""
    groups = {child.name: child.process.pid for child in children if child.process is not None}
    for child in children:
        if child.running and child.process is not None:
            # The worker passes it on to the processes that run a job (stop_jobs_on_shutdown).
            with contextlib.suppress(ProcessLookupError):
                child.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for child in children:
        if child.process is None:
            continue
        try:
            child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            logger.info("the %s stopped (exit code %s)", child.name, child.process.returncode)
        except subprocess.TimeoutExpired:
            logger.warning("the %s did not stop within %.0f s; killing it", child.name, timeout_s)
    # Whatever is left in the groups (a job's process, a stuck child) goes now.
    for child in children:
        if child.process is not None:
            _signal_group(groups[child.name], signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.process.wait(timeout=5)


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def _on_stop_signals(callback: Callable[[int], None]) -> Callable[[], None]:
    signums = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def handler(signum: int, _frame: FrameType | None) -> None:
        callback(signum)

    previous = {signum: signal.signal(signum, handler) for signum in signums}

    def restore() -> None:
        for signum, old in previous.items():
            signal.signal(signum, old)

    return restore


def _pid(child: Child) -> int | None:
    return child.process.pid if child.process is not None else None


def _returncode(child: Child) -> int | None:
    return child.process.returncode if child.process is not None else None


def serve_command(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    concurrency: Annotated[int, typer.Option(min=1, help="Jobs the worker runs at once.")] = 1,
) -> None:
    """Migrate, then run the API and a worker together on the embedded defaults."""
    raise typer.Exit(serve(host, port, get_settings(), concurrency=concurrency))


if __name__ == "__main__":
    typer.run(serve_command)
