"""Alembic environment: the target is service.models' metadata, the URL the service's settings.

`service.migrate.upgrade_to_head` passes the URL in the config; the `alembic` command line falls
back to the environment's settings. SQLite cannot ALTER most things, so migrations render in
batch mode there (copy the table, then swap).
"""

from __future__ import annotations

import logging.config
from typing import Any, Literal

from alembic import context
from sqlalchemy import Connection, pool, text

from service.db import create_db_engine
from service.models import Base, UTCDateTime
from service.settings import Settings

config = context.config
# upgrade_to_head sets this False: the service has already configured logging.
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    logging.config.fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata
# Any int works; it only has to be the same for every process that migrates this database.
PG_MIGRATION_LOCK = 0x6469_7374  # "dist"


def database_url() -> str:
    return config.get_main_option("sqlalchemy.url") or Settings().database_url


def render_item(type_: str, obj: Any, autogen_context: Any) -> str | Literal[False]:
    """Render the models' UTC type as the plain column type, so revisions never import service.models."""
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def configure(connection: Connection | None = None, url: str | None = None) -> None:
    dialect = connection.dialect.name if connection is not None else (url or "").split(":")[0]
    context.configure(
        connection=connection,
        url=url,
        target_metadata=target_metadata,
        render_as_batch=dialect.startswith("sqlite"),
        compare_type=True,
        render_item=render_item,
        literal_binds=connection is None,
    )


def run_migrations_offline() -> None:
    configure(url=database_url())
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = create_db_engine(database_url(), poolclass=pool.NullPool)
    with engine.connect() as connection:
        _run(connection)
    engine.dispose()


def _run(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        # An API and a `serve` starting together must not both run the same revision; the lock
        # is released when this transaction ends.
        connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": PG_MIGRATION_LOCK})
    try:
        configure(connection)
        with context.begin_transaction():
            context.run_migrations()
    finally:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": PG_MIGRATION_LOCK})
            connection.commit()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
