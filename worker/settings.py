"""The worker's settings: the service's `Settings` plus the knobs only workers read.

Same `DISTILLERY_*` environment variables, so one environment configures the API and its workers.
The fields here could move into `api.settings.Settings` as they are; until they do, the worker
reads them through this subclass.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from pydantic import Field, model_validator

from api.settings import Settings

DAY_S = 24 * 3600


class WorkerSettings(Settings):
    # Recovery budget after a worker dies: lease_seconds + reaper_interval_seconds + a worker's start.
    # 60 + 15 + a few seconds keeps a SIGKILLed job running again well within two minutes.
    lease_seconds: int = Field(default=60, ge=5, description="A claim's life without heartbeat.")
    heartbeat_seconds: float = Field(default=10.0, gt=0, description="How often a running job renews its lease.")
    cancel_poll_seconds: float = Field(
        default=2.0, gt=0, description="How often a running job reads its cancel flag (a cheap SELECT)."
    )
    progress_write_seconds: float = Field(
        default=1.0, ge=0, description="At most one progress write per this interval (plus every epoch end)."
    )
    reaper_interval_seconds: float = Field(
        default=15.0, gt=0, description="How often each worker requeues expired leases and re-sends lost messages."
    )
    requeue_after_seconds: float = Field(
        default=60.0, gt=0, description="A queued job's message counts as lost after this long without a worker."
    )
    visibility_timeout_seconds: int = Field(
        default=7 * DAY_S,
        ge=60,
        description="Redis redelivers an unacknowledged task after this; longer than any job.",
    )
    soft_shutdown_seconds: float = Field(
        default=30.0, ge=0, description="Celery's soft-shutdown window before running tasks are terminated."
    )
    broker_polling_seconds: float = Field(
        default=0.25, gt=0, description="Polling interval of the embedded (SQLite/filesystem) brokers."
    )
    worker_threads: int | None = Field(
        default=None, ge=1, description="torch threads per running job; default: the worker's share of the cores."
    )
    preload_engine: bool = Field(
        default=True,
        description="Import torch and the engine once in the worker's parent (no CUDA), so each fresh child "
        "starts in milliseconds instead of seconds.",
    )
    stop_jobs_on_shutdown: bool = Field(
        default=False,
        description="On a warm shutdown, stop running jobs at their next step and hand them back "
        "(serve does); otherwise they run to the end, as Celery's warm shutdown does.",
    )
    shutdown_timeout_seconds: float = Field(
        default=30.0, gt=0, description="serve: how long the API and worker get to stop before they are killed."
    )
    latency_runs: int = Field(default=50, ge=1, description="Batch-1 CPU latency measurements per model.")
    work_dir: Path | None = Field(default=None, description="Scratch folder for running jobs (default: the temp dir).")

    @model_validator(mode="after")
    def _heartbeat_fits_lease(self) -> WorkerSettings:
        # Three missed beats before the lease runs out: one slow database write must not cost the job.
        if self.heartbeat_seconds * 3 > self.lease_seconds:
            raise ValueError(
                f"heartbeat_seconds ({self.heartbeat_seconds}) must be at most a third of "
                f"lease_seconds ({self.lease_seconds})"
            )
        return self


def job_threads(settings: WorkerSettings, *, concurrency: int = 1) -> int:
    """torch threads per job: the setting, else this worker's share of its cores less one.

    The spare core is for the worker's parent, the heartbeats and (under serve) the API: OpenMP
    threads spin-waiting on every core stall whenever another thread runs (measured on 2 cores:
    2 threads beside an idle worker parent ran an epoch 20-150x slower than 1 thread).
    """
    if settings.worker_threads:
        return settings.worker_threads
    return max(1, (len(os.sched_getaffinity(0)) - 1) // concurrency)


def worker_settings(settings: Settings | None = None) -> WorkerSettings:
    """Worker settings from the environment, or widened from a given `Settings` object."""
    if settings is None:
        return get_worker_settings()
    if isinstance(settings, WorkerSettings):
        return settings
    explicit = {name: getattr(settings, name) for name in settings.model_fields_set}
    return WorkerSettings(**explicit)


@lru_cache
def get_worker_settings() -> WorkerSettings:
    return WorkerSettings()
