"""The service's one settings object, read from `DISTILLERY_*` environment variables.

Unset, everything lives in the data folder: a SQLite database, a broker that needs no server
and a storage folder. A cluster sets the three URLs instead. The object is built once per app
(`get_settings` caches the environment's) and injected into views through `SettingsDep`.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

GIB = 2**30
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

    max_upload_bytes: int = Field(default=2 * GIB, ge=1, description="Largest single upload.")
    user_quota_bytes: int = Field(default=20 * GIB, ge=1, description="Stored uploads per user.")
    max_concurrent_jobs: int = Field(default=4, ge=1, description="Queued plus running jobs per user.")
    allow_code_teachers: bool = Field(
        default=False, description="Accept TorchScript and torch.export teachers (they carry code)."
    )
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

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


@lru_cache
def get_settings() -> Settings:
    """The environment's settings, read once per process."""
    return Settings()
