"""`distillery worker`: one Celery worker (with its reaper) taking jobs from the named queues.

On a GPU node run one per GPU, each with its own `CUDA_VISIBLE_DEVICES` and `--concurrency 1`;
on a CPU-only node, `--queue cpu`. Every job runs in a fresh child process; the parent only
takes messages and reaps, and never touches CUDA. `distillery/cli.py` mounts `worker_command` as
`distillery worker`; `python -m worker.cli` runs the same.

Stopping: SIGTERM or Ctrl-C to the worker is Celery's warm shutdown: it takes no new job, and
running jobs finish first (a second Ctrl-C stops them at their next step and hands them back).
With `DISTILLERY_STOP_JOBS_ON_SHUTDOWN=true` (what `distillery serve` sets) the first signal
already stops them. A job killed with its worker is requeued by the reaper once its lease runs
out, and resumes from its checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
from typing import Annotated, Any

import typer

from service.settings import QUEUES

logger = logging.getLogger("distillery.worker")

QueueOption = Annotated[
    list[str] | None,
    typer.Option(
        "--queue",
        "-Q",
        help="Queue to take jobs from; repeat for several. default: jobs for any device; cpu: CPU-only jobs.",
    ),
]
ConcurrencyOption = Annotated[
    int,
    typer.Option(
        "--concurrency",
        "-c",
        min=1,
        help="Jobs at once. One per GPU (run one worker per GPU); on CPU the cores are shared among them.",
    ),
]
GpusOption = Annotated[
    int,
    typer.Option(
        "--gpus",
        min=1,
        max=64,
        help="Devices this worker gives one job (GPUs, or processes on a CPU): it also takes the jobs of "
        "distributed.nproc 2..N from their own queues.",
    ),
]
PoolOption = Annotated[
    str, typer.Option(help="prefork: a fresh child process per job (the default); solo: jobs in this process.")
]


def worker_command(
    queue: QueueOption = None,
    concurrency: ConcurrencyOption = 1,
    pool: PoolOption = "prefork",
    gpus: GpusOption = 1,
) -> None:
    """Run a worker: take jobs from the queues, run each in a fresh process, requeue lost ones."""
    from service.jobs import sized_queue

    queues = list(dict.fromkeys(queue or ["default"]))
    unknown = [name for name in queues if name not in QUEUES]
    if unknown:
        raise typer.BadParameter(f"unknown queue {unknown[0]!r}; choose from {', '.join(QUEUES)}", param_hint="--queue")
    queues += [sized_queue(name, nproc) for name in list(queues) for nproc in range(2, gpus + 1)]
    if pool not in ("prefork", "solo"):
        raise typer.BadParameter("choose prefork or solo", param_hint="--pool")
    raise typer.Exit(run_worker(queues, concurrency=concurrency, pool=pool))


def run_worker(queues: list[str], *, concurrency: int = 1, pool: str = "prefork") -> int:
    from service.settings import get_settings
    from worker.threads import job_threads

    settings = get_settings()
    # Set before anything imports torch, so OpenMP in the children never starts more threads.
    threads = job_threads(settings, concurrency=concurrency)
    os.environ["DISTILLERY_WORKER_THREADS"] = str(threads)
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(variable, str(threads))
    get_settings.cache_clear()
    settings = get_settings()

    from service.queue import prepare_embedded_broker
    from worker.celery_app import create_celery_app
    from worker.logs import configure_worker_logging
    from worker.reaper import start_reaper_process

    configure_worker_logging(settings.log_level, json_lines=settings.log_json)
    prepare_embedded_broker(settings)
    if settings.preload_engine:
        _preload_engine()
    app = create_celery_app(settings)
    reaper = start_reaper_process()
    _on_warm_shutdown(reaper)
    logger.info(
        "worker starting: queues %s, concurrency %d, %d torch thread(s) per job, pool %s",
        ",".join(queues), concurrency, threads, pool,
    )
    try:
        exit_code = app.start(
            [
                "worker",
                f"--queues={','.join(queues)}",
                f"--concurrency={concurrency}",
                f"--pool={pool}",
                f"--loglevel={settings.log_level}",
                f"--hostname=distillery-{os.getpid()}@%h",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ]
        )
    finally:
        reaper.terminate()
        try:
            reaper.wait(timeout=10)
        except subprocess.TimeoutExpired:
            reaper.kill()
    return int(exit_code or 0)


def _preload_engine() -> None:
    """Import torch and what every job imports once here, so each fresh child starts without paying
    for it (measured on this machine: 5-10 s of imports a job, mostly torch._dynamo, which the first
    optimiser pulls in, matplotlib and TensorBoard).

    Importing does not initialise CUDA; nothing in this process may call into it (a forked child
    cannot use a CUDA context its parent created). onnxruntime is left to the children: importing
    it starts a thread, and a process should not fork with threads running.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot
    import onnx  # noqa: F401
    import torch
    import torch._dynamo
    import torch.onnx
    import torch.utils.tensorboard

    import kdcore.pipeline  # noqa: F401

    if torch.cuda.is_initialized():  # pragma: no cover - a guard against a future import doing it
        raise RuntimeError("CUDA was initialised in the worker's parent process; children could not use it")
    if threading.active_count() > 1 or len(os.listdir("/proc/self/task")) > 2:
        logger.warning("the worker's parent runs threads after preloading; forked children may hang")


def _on_warm_shutdown(reaper: subprocess.Popen[bytes]) -> None:
    """When the worker starts to shut down: tell its pool children (a shared flag), so none starts a
    new job and, with stop_jobs_on_shutdown, running jobs stop at their next step and are handed
    back; and stop the reaper, which would otherwise requeue those jobs to this very worker."""
    from celery import signals

    from worker.process import mark_worker_stopping

    @signals.worker_shutting_down.connect(weak=False)
    def stopping(**_kwargs: Any) -> None:
        mark_worker_stopping()
        with contextlib.suppress(ProcessLookupError):
            reaper.send_signal(signal.SIGTERM)


def main() -> None:
    typer.run(worker_command)


if __name__ == "__main__":
    main()
