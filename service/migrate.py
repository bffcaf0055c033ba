"""Bring a database to the newest schema: the only way the service's tables are made.

`alembic.ini` and the revisions in `migrations/` are package data of `service`, found through
`importlib.resources`, so an installed wheel migrates exactly as a source checkout does. For a
new revision from a checkout: `alembic -c service/alembic.ini revision --autogenerate -m "..."`.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.resources import files
from pathlib import Path

from alembic import command
from alembic.config import Config

from service.db import create_db_engine
from service.settings import Settings

PACKAGE_DIR = Path(str(files("service")))
ALEMBIC_INI = PACKAGE_DIR / "alembic.ini"
MIGRATIONS_DIR = PACKAGE_DIR / "migrations"


def alembic_config(database_url: str) -> Config:
    config = Config(str(ALEMBIC_INI))
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser interpolation would read a '%' in a password as a reference.
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    config.attributes["configure_logger"] = False
    return config


def upgrade_to_head(settings: Settings) -> None:
    _run(settings, command.upgrade, "head")


def downgrade_to_base(settings: Settings) -> None:
    _run(settings, command.downgrade, "base")


def _run(settings: Settings, step: Callable[[Config, str], None], revision: str) -> None:
    """One Alembic command in one transaction on the settings' database."""
    engine = create_db_engine(settings.database_url)
    try:
        with engine.begin() as connection:
            config = alembic_config(settings.database_url)
            config.attributes["connection"] = connection
            step(config, revision)
    finally:
        engine.dispose()
