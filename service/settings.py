"""The service's one settings object, read from `DISTILLERY_*` environment variables.

The API, the workers, the reaper and the web pages all read this one class, so one environment
configures them all. Unset, everything lives in the data folder: a SQLite database, a broker that
needs no server and a storage folder. A cluster sets the three URLs instead. The object is built
once per process (`get_settings` caches the environment's) and injected into views through
`SettingsDep`, into a worker's run through its arguments.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

GIB = 2**30
DAY_S = 24 * 3600
QUEUES = ("default", "cpu")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DISTILLERY_", extra="ignore")

    environment: Literal["development", "test", "production"] = Field(
        default="development", description="production turns on the checks that refuse unsafe defaults."
    )
    data_dir: Path = Field(default=Path("~/.distillery"), description="Embedded DB, broker, storage.")
    # Empty means "derive from data_dir" (filled in by _derive_urls), so the types stay plain str.
    database_url: str = Field(default="", description="SQLAlchemy URL; default SQLite in data_dir.")
    broker_url: str = Field(default="", description="Celery broker; default SQLite-backed.")
    storage_url: str = Field(default="", description="fsspec URL of the store.")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description='fsspec options as JSON, e.g. {"endpoint_url": "http://minio:9000"}.'
    )

    reference_prefixes: list[str] = Field(
        default_factory=list,
        description='Where users may name files instead of uploading them, as fsspec URL prefixes (JSON), '
        'e.g. ["s3://models/", "/mnt/models/"]; empty: nowhere. The file is copied in and checked like an upload.',
    )
    reference_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for reading those prefixes (JSON), e.g. S3 credentials."
    )
    max_upload_bytes: int = Field(default=2 * GIB, ge=1, description="Largest single upload.")
    max_job_processes: int = Field(
        default=1, ge=1, le=64, description="The most processes (GPUs) one job may ask for (distributed.nproc): "
        "what the largest worker offers (`distillery worker --gpus N`)."
    )
    user_quota_bytes: int = Field(default=20 * GIB, ge=1, description="Stored uploads per user.")
    max_concurrent_jobs: int = Field(default=4, ge=1, description="Queued plus running jobs per user.")
    allow_code_teachers: bool = Field(
        default=False, description="Accept TorchScript and torch.export teachers (they carry code)."
    )
    # Recovery budget after a worker dies: lease_seconds + reaper_interval_seconds + a worker's start.
    # 60 + 15 + a few seconds keeps a SIGKILLed job running again well within two minutes.
    lease_seconds: int = Field(default=60, ge=5, description="A claim's life without heartbeat.")
    max_attempts: int = Field(default=3, ge=1, description="Runs of a job before a lost worker fails it.")
    default_queue: str = Field(default="default", description="Queue a job goes to unless its spec says cpu.")

    auth_cache_seconds: float = Field(
        default=5.0, ge=0, description="Reuse a verified API key this long (a revocation waits as long)."
    )
    cors_origins: list[str] = Field(default_factory=list, description="Origins allowed to call the API.")
    log_level: str = Field(default="INFO")
    log_json: bool = Field(default=True, description="One JSON object per log line.")
    events_poll_seconds: float = Field(default=0.5, gt=0, description="Event stream poll interval.")
    events_ping_seconds: float = Field(default=15.0, gt=0, description="Stream keep-alive interval.")

    # The browser interface (DISTILLERY_WEB_*).
    web_secret_key: SecretStr | None = Field(
        default=None,
        description="Signs the session cookie. Unset: a random key kept in the data folder "
        "(set it when several API processes on different hosts serve one site).",
    )
    web_session_max_age_seconds: int = Field(default=7 * DAY_S, ge=60, description="A sign-in lasts this long.")
    web_jobs_page_size: int = Field(default=20, ge=1, le=200, description="Jobs per page in the jobs list.")

    # Workers: running jobs, heartbeats and the reaper.
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

    # Resource limits: what one job or one user may consume (docs/security.md lists them all).
    max_dataset_bytes: int = Field(
        default=4 * GIB, ge=1, description="Decoded (and resized) dataset bytes one job may hold in memory."
    )
    max_model_parameters: int = Field(
        default=200_000_000, ge=1, description="Parameters of the student a job may build."
    )
    max_train_memory_bytes: int = Field(
        default=12 * GIB, ge=1,
        description="Estimated peak training memory of the student (weights, gradients, optimiser, activations).",
    )
    job_memory_bytes: int | None = Field(
        default=20 * GIB, ge=2**28,
        description="Data-segment limit (RLIMIT_DATA) of the process that runs a job; None: no limit.",
    )
    onnx_arena_bytes: int = Field(default=4 * GIB, ge=2**24, description="onnxruntime's memory arena limit.")
    max_job_seconds: float = Field(
        default=2 * DAY_S, gt=0, description="Wall-clock limit of one attempt at a job (the worker stops it)."
    )
    job_stall_seconds: float = Field(
        default=1800.0, gt=0, description="A running job that reports no step or stage this long fails as stalled."
    )
    stop_grace_seconds: float = Field(
        default=30.0, gt=0,
        description="How long a job told to stop (shutdown, limit, stall) gets before its process is ended.",
    )
    max_job_threads: int | None = Field(
        default=None, ge=1, description="Most torch threads a spec may ask for; default: the worker's share."
    )
    max_spec_bytes: int = Field(default=64 * 1024, ge=1024, description="Largest job spec (JSON body).")
    max_spec_list_length: int = Field(default=256, ge=1, description="Longest list anywhere in a job spec.")
    max_zip_central_directory_bytes: int = Field(
        default=64 * 2**20, ge=1024, description="Largest zip central directory (read before any member)."
    )
    upload_reservation_seconds: float = Field(
        default=3600.0, gt=0, description="A reservation of quota for an upload lapses after this (a crashed API)."
    )
    scratch_sweep_seconds: float = Field(
        default=600.0, gt=0, description="How often a worker removes the scratch folders of jobs no longer running."
    )
    rate_limit_storage_url: str = Field(
        default="memory://", description="Where rate-limit counters live (limits library URL, e.g. redis://...)."
    )
    rate_limit_uploads: str = Field(default="120/minute", description="Uploads per user.")
    rate_limit_submissions: str = Field(default="120/minute", description="Job submissions per user.")
    rate_limit_streams: str = Field(default="240/minute", description="Event streams opened per user.")

    @field_validator("data_dir")
    @classmethod
    def _expand_data_dir(cls, data_dir: Path) -> Path:
        return data_dir.expanduser().resolve()

    @field_validator("default_queue")
    @classmethod
    def _known_queue(cls, queue: str) -> str:
        if queue not in QUEUES:
            raise ValueError(f"must be one of {', '.join(QUEUES)}")
        return queue

    @model_validator(mode="after")
    def _derive_urls(self) -> Settings:
        # The embedded defaults are for one machine; a production deployment that forgot to set
        # its database would silently keep its data in a home folder.
        if self.environment == "production" and not self.database_url:
            raise ValueError("production needs DISTILLERY_DATABASE_URL set explicitly")
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'distillery.db'}"
        if not self.broker_url:
            self.broker_url = f"sqla+sqlite:///{self.data_dir / 'broker.sqlite'}"
        if not self.storage_url:
            self.storage_url = f"file://{self.data_dir / 'storage'}"
        return self

    @model_validator(mode="after")
    def _heartbeat_fits_lease(self) -> Settings:
        # Three missed beats before the lease runs out: one slow database write must not cost the job.
        if self.heartbeat_seconds * 3 > self.lease_seconds:
            raise ValueError(
                f"heartbeat_seconds ({self.heartbeat_seconds}) must be at most a third of "
                f"lease_seconds ({self.lease_seconds})"
            )
        return self

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


@lru_cache
def get_settings() -> Settings:
    """The environment's settings, read once per process."""
    return Settings()
