"""Engine and session factory for the settings' database.

SQLite is the embedded default, so it gets the pragmas that make it a fair server database
for one machine: WAL (readers never block the writer), a busy timeout (writers wait for each
other instead of failing at once) and foreign keys (off by default in SQLite).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 30_000
# At most 30 connections (PostgreSQL's cap before: 10 + 20 overflow; SQLite's was 5 + 10), all of
# them kept once opened. A QueuePool closes each connection returned beyond `pool_size`, and sync
# views and dependencies run in AnyIO's thread pool (40 threads), each holding one: under load the
# overflow churned, 50 polling clients made a new PostgreSQL connection (a server process fork,
# milliseconds of CPU) every four or five requests, and a new SQLite one (with its pragmas) often.
# A thread past the cap waits for a connection, as it did before. Connections open lazily: a
# quiet API holds only the few it needed.
POOL_SIZE = 30
MAX_OVERFLOW = 0


def create_db_engine(database_url: str, **kwargs: Any) -> Engine:
    url = make_url(database_url)
    options: dict[str, Any] = {} if "poolclass" in kwargs else {"pool_size": POOL_SIZE, "max_overflow": MAX_OVERFLOW}
    if url.get_backend_name() != "sqlite":
        return create_engine(url, **{"pool_pre_ping": True, **options, **kwargs})
    if url.database and url.database != ":memory:":
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    else:
        options = {}  # an in-memory database lives in one connection (SingletonThreadPool)
    engine = create_engine(
        url,
        connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
        **{**options, **kwargs},
    )
    event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    # With WAL, NORMAL only risks the last commits on power loss, never corruption.
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def create_session_factory(engine: Engine) -> sessionmaker[Session]:
    # expire_on_commit=False: a view returns rows after its service committed them.
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextmanager
def read_connection(factory: sessionmaker[Session]) -> Iterator[Connection]:
    """A connection for a one-statement Core read, straight from the factory's engine (a session's
    bookkeeping costs more than a one-row SELECT); through a session where the factory is bound to
    a connection (the tests' rolled-back transaction)."""
    bind = factory.kw.get("bind")
    if isinstance(bind, Engine):
        with _read_engine(bind).connect() as connection:
            yield connection
    else:
        with factory() as session:
            yield session.connection()


@lru_cache(maxsize=16)
def _read_engine(engine: Engine) -> Engine:
    # One statement needs no transaction around it: on PostgreSQL that would be BEGIN and ROLLBACK,
    # two more round trips (and statements for the server) than the SELECT itself. SQLite's driver
    # begins no transaction for a SELECT anyway, and resetting its isolation level costs a PRAGMA.
    if engine.dialect.name == "sqlite":
        return engine
    return engine.execution_options(isolation_level="AUTOCOMMIT")


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session that commits on success and rolls back on error (for the worker and the CLI)."""
    with factory() as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
