"""Settings: DISTILLERY_* variables, derived embedded defaults, production guard."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.settings import Settings


def test_settings_defaults_live_in_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTILLERY_DATA_DIR", str(tmp_path))
    settings = Settings()
    assert settings.database_url == f"sqlite:///{tmp_path}/distillery.db"
    assert settings.broker_url == f"sqla+sqlite:///{tmp_path}/broker.sqlite"
    assert settings.storage_url == f"file://{tmp_path}/storage"
    assert not settings.allow_code_teachers and settings.default_queue == "default"


def test_settings_env_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTILLERY_DATABASE_URL", "postgresql+psycopg://db/distillery")
    monkeypatch.setenv("DISTILLERY_STORAGE_OPTIONS", '{"endpoint_url": "http://minio:9000"}')
    monkeypatch.setenv("DISTILLERY_ALLOW_CODE_TEACHERS", "true")
    settings = Settings()
    assert settings.database_url == "postgresql+psycopg://db/distillery"
    assert settings.storage_options == {"endpoint_url": "http://minio:9000"}
    assert settings.allow_code_teachers


def test_settings_production_needs_explicit_database(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="DISTILLERY_DATABASE_URL"):
        Settings(environment="production", data_dir=tmp_path)
    Settings(environment="production", database_url="postgresql+psycopg://db/x")


def test_settings_unknown_queue_refused() -> None:
    with pytest.raises(ValidationError):
        Settings(default_queue="gpu-fast")
