"""The `distillery` command: the client commands, the service (serve, api, worker), accounts (admin)
and the local run (distill).

Imports stay light (no torch, no FastAPI, no SQLAlchemy until a server command runs) so
`distillery --help` is instant, and a client-only install (`pip install distillery`) has every
client command; a server command there says which extra it needs instead of a traceback.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated

import typer

from client.cli import register as register_client_commands

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

app = typer.Typer(name="distillery", help="Knowledge distillation as a service.", no_args_is_help=True)
admin = typer.Typer(help="Accounts: users and API keys.", no_args_is_help=True)
app.add_typer(admin, name="admin")

Host = Annotated[str, typer.Option(help="Interface to listen on.")]
Port = Annotated[int, typer.Option(help="TCP port.")]


# The extra each server command needs, and a module that only that extra brings.
_EXTRAS = {"server": ("fastapi", "uvicorn"), "worker": ("torch", "celery"), "service": ("sqlalchemy", "alembic"),
           "engine": ("torch",), "all": ("fastapi", "torch")}


def _require(extra: str) -> None:
    """Exit with one line naming the extra to install when a server command's packages are missing."""
    # find_spec, not an import: the worker must set its thread counts before anything loads torch.
    for module in _EXTRAS[extra]:
        if importlib.util.find_spec(module) is None:
            typer.echo(f"error: this command needs the {extra} part of Distillery ({module} is not installed); "
                       f"install it with: pip install 'distillery[{extra}]'", err=True)
            raise typer.Exit(2)


@app.command()
def api(host: Host = "127.0.0.1", port: Port = 8000, workers: int = 1) -> None:
    """Migrate the database, then run the API alone (a cluster's front)."""
    _require("server")
    _migrate_and_serve(host, port, workers)


@app.command()
def serve(
    host: Host = "127.0.0.1",
    port: Port = 8000,
    concurrency: Annotated[int, typer.Option(min=1, help="Jobs the worker runs at once.")] = 1,
) -> None:
    """Migrate, then run the API and a worker together on the embedded defaults (Ctrl-C stops both)."""
    _require("all")
    from service.settings import get_settings
    from worker.supervisor import serve as serve_api_and_worker

    raise typer.Exit(serve_api_and_worker(host, port, get_settings(), concurrency=concurrency))


@app.command()
def worker(
    queue: Annotated[list[str] | None, typer.Option(
        "--queue", "-Q", help="Queue to take jobs from; repeat for several: default (any device), cpu.")] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="Jobs at once; run one worker per GPU.")] = 1,
    pool: Annotated[str, typer.Option(help="prefork: a fresh child process per job; solo: in this process.")] = (
        "prefork"),
    gpus: Annotated[int, typer.Option(min=1, max=64, help="Devices one job may use here (GPUs; processes on a "
                                      "CPU): also take jobs of distributed.nproc up to N.")] = 1,
) -> None:
    """Run a worker alone (a cluster node; choose its GPU with CUDA_VISIBLE_DEVICES)."""
    _require("worker")
    from worker.cli import worker_command

    worker_command(queue=queue, concurrency=concurrency, pool=pool, gpus=gpus)


def _migrate_and_serve(host: str, port: int, workers: int) -> None:
    import uvicorn

    from service.logs import configure_logging
    from service.migrate import upgrade_to_head
    from service.settings import get_settings

    settings = get_settings()
    configure_logging(settings.log_level, json_lines=settings.log_json)
    upgrade_to_head(settings)
    uvicorn.run(
        "api.main:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_config=None,
        access_log=False,
        proxy_headers=True,
        timeout_graceful_shutdown=10,
    )


@admin.command("migrate")
def migrate() -> None:
    """Bring the database to the newest schema, then exit (a cluster runs this once per release)."""
    _require("service")
    from service.migrate import upgrade_to_head
    from service.settings import get_settings

    upgrade_to_head(get_settings())
    typer.echo("the database is at the newest revision")


@admin.command("create-user")
def create_user(name: Annotated[str, typer.Argument(help="A unique user name.")]) -> None:
    """Create a user and print its API key (last on the line; shown once, never stored)."""
    _require("service")
    from service import users

    with _session() as session:
        try:
            user, key = users.create_user(session=session, name=name)
        except users.UserExistsError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
    typer.echo(f"created user {user.name} ({user.id}); API key: {key}")


@admin.command("create-key")
def create_key(name: Annotated[str, typer.Argument(help="The user's name.")]) -> None:
    """Give an existing user another API key (printed last on the line)."""
    _require("service")
    from service import users

    with _session() as session:
        user = users.get_user_by_name(session=session, name=name)
        if user is None:
            typer.echo(f"error: no user {name!r}", err=True)
            raise typer.Exit(1)
        api_key, key = users.create_key(session=session, user_id=user.id)
        session.commit()
    typer.echo(f"new key {api_key.id} for {user.name}; API key: {key}")


@admin.command("revoke-key")
def revoke_key(key: Annotated[str, typer.Argument(help="The key, or its lookup id (the part after dk_).")]) -> None:
    """Revoke an API key at once."""
    _require("service")
    from service import users

    with _session() as session:
        revoked = users.revoke_key(session=session, key_id=key)
    if not revoked:
        typer.echo("error: no such active key", err=True)
        raise typer.Exit(1)
    typer.echo("revoked")


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
def distill(ctx: typer.Context) -> None:
    """Run one job on this machine without the service: distillery distill SPEC --out DIR."""
    # kdcore's command imports torch; it is loaded only when asked for.
    _require("engine")
    from kdcore.cli import distill_command  # type: ignore[import-not-found,unused-ignore]

    local = typer.Typer(add_completion=False)
    local.command()(distill_command)
    local(args=ctx.args, prog_name="distillery distill")


@contextmanager
def _session() -> Iterator[Session]:
    """A session on the migrated database; the engine is disposed of when the command ends."""
    _require("service")
    from service.db import create_db_engine, create_session_factory
    from service.migrate import upgrade_to_head
    from service.settings import get_settings

    settings = get_settings()
    upgrade_to_head(settings)
    engine = create_db_engine(settings.database_url)
    try:
        with create_session_factory(engine)() as session:
            yield session
    finally:
        engine.dispose()


# The client commands (login, upload, submit, status, list, logs, cancel, download, ...) talk to a
# server over HTTP and import nothing of the server's.
register_client_commands(app)

if __name__ == "__main__":
    app()
