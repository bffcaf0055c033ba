"""The client commands of `distillery`: login, upload, submit, wait, status, list, logs, cancel,
delete, download, architectures.

`distillery/cli.py` adds them with `register(app)`. Every command takes `--url` and `--api-key` (or
`DISTILLERY_URL` / `DISTILLERY_API_KEY`, or what `distillery login` stored) and `--json` for
scripts. A failure prints one line, `error: <code>: <message> (field <field>)`, on stderr and
exits with a code that says what kind of failure it was:

    0  done; for submit --wait / wait: the job succeeded
    1  the job failed, or another error (a checksum mismatch, a local file that cannot be written)
    2  bad input: usage, an invalid spec (the field is named), a request the server refused (400/409/413/422)
    3  the job was cancelled
    4  no API key, or the server refused it (401/403)
    5  no such job, file or artifact (404)
    6  the server cannot be reached, broke the connection, or failed (5xx); worth retrying later
    7  a per-user limit (429): wait for a job to finish, or cancel one
    124  --timeout ran out before the job finished (the job goes on)
    141  the reader of stdout went away (`distillery logs JOB | head`): stops quietly, as `yes | head` does
    130  interrupted (Ctrl-C); a submitted job goes on
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn, ParamSpec, TypeVar

import typer

from client import errors
from client.client import Client, read_spec_file
from client.config import API_KEY_ENV, URL_ENV, ConfigError, resolve_login, save_login
from client.models import Job, JobEvent

EXIT_OK, EXIT_FAILED, EXIT_INPUT, EXIT_CANCELLED = 0, 1, 2, 3
EXIT_AUTH, EXIT_NOT_FOUND, EXIT_UNAVAILABLE, EXIT_LIMITED = 4, 5, 6, 7
EXIT_TIMEOUT, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 124, 130, 141  # 141: 128 + SIGPIPE, as a shell reports it
JOB_EXIT = {"succeeded": EXIT_OK, "failed": EXIT_FAILED, "cancelled": EXIT_CANCELLED}

_EXIT_BY_ERROR: tuple[tuple[type[errors.DistilleryError], int], ...] = (
    (errors.WaitTimeout, EXIT_TIMEOUT),
    (errors.AuthError, EXIT_AUTH),
    (errors.NotFound, EXIT_NOT_FOUND),
    (errors.RateLimited, EXIT_LIMITED),
    (errors.BadRequest, EXIT_INPUT),
    (errors.ValidationError, EXIT_INPUT),
    (errors.ConnectionError, EXIT_UNAVAILABLE),
    (errors.ServerError, EXIT_UNAVAILABLE),
)

UrlOption = Annotated[
    str | None,
    typer.Option("--url", envvar=URL_ENV, show_envvar=True, help="Server URL; default: the one `login` stored."),
]
ApiKeyOption = Annotated[
    str | None,
    typer.Option("--api-key", envvar=API_KEY_ENV, show_envvar=True, help="API key; default: the one `login` stored."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON on stdout (for scripts) instead of text.")]
JobArgument = Annotated[str, typer.Argument(metavar="JOB", help="A job id (job_...).")]
TimeoutOption = Annotated[
    float | None, typer.Option("--timeout", min=0, help="Give up waiting after this many seconds (exit 124).")
]

P = ParamSpec("P")
R = TypeVar("R")


def register(app: typer.Typer) -> None:
    """Add the client commands to the `distillery` Typer app."""
    panel = "Client (talks to a server)"
    for name, command in (
        ("login", login),
        ("upload", upload),
        ("submit", submit),
        ("wait", wait),
        ("status", status),
        ("list", list_jobs),
        ("logs", logs),
        ("cancel", cancel),
        ("delete", delete),
        ("download", download),
        ("architectures", architectures),
    ):
        app.command(name, rich_help_panel=panel)(command)


# -- error handling -------------------------------------------------------------------------------


def _one_line_errors(command: Callable[P, R]) -> Callable[P, R]:
    """Turn every expected failure into one line on stderr and an exit code; never a traceback."""

    @functools.wraps(command)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        as_json = bool(kwargs.get("as_json"))
        try:
            return command(*args, **kwargs)
        except errors.DistilleryError as exc:
            _fail(exc, as_json=as_json)
        except BrokenPipeError:
            _stdout_closed()
        except ConfigError as exc:
            _fail(errors.DistilleryError(str(exc), code="bad_config"), as_json=as_json)
        except OSError as exc:
            message = f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc)
            _fail(errors.DistilleryError(message, code="os_error"), as_json=as_json)
        except KeyboardInterrupt:
            typer.echo("\ninterrupted; a submitted job goes on (`distillery cancel JOB` stops it)", err=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return run


def _stdout_closed() -> NoReturn:
    # Python's recipe for SIGPIPE: the rest of the output goes nowhere, so the final flush at exit
    # cannot raise a second BrokenPipeError ("Exception ignored ...") on the user's terminal.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    raise typer.Exit(EXIT_BROKEN_PIPE)


def _fail(exc: errors.DistilleryError, *, as_json: bool) -> NoReturn:
    code = next((code for cls, code in _EXIT_BY_ERROR if isinstance(exc, cls)), EXIT_FAILED)
    if as_json:
        body = {"code": exc.code, "message": exc.message, "field": exc.field, "status": exc.status,
                "request_id": exc.request_id}
        typer.echo(json.dumps({"error": body}))
    typer.echo(f"error: {exc.one_line()}", err=True)
    raise typer.Exit(code)


@contextmanager
def _client(url: str | None, api_key: str | None, *, need_key: bool = True) -> Iterator[Client]:
    login_ = resolve_login(url, api_key)
    if need_key and not login_.api_key:
        raise errors.AuthError(
            f"no API key for {login_.url}: run `distillery login URL --api-key KEY` or set {API_KEY_ENV}",
            code="not_logged_in",
        )
    with Client(login_.url, login_.api_key) as client:
        yield client


def _print_json(value: Any) -> None:
    if hasattr(value, "model_dump"):
        value = value.model_dump(mode="json")
    elif isinstance(value, list):
        value = [item.model_dump(mode="json") if hasattr(item, "model_dump") else item for item in value]
    typer.echo(json.dumps(value, indent=2, default=str))


# -- commands -------------------------------------------------------------------------------------


@_one_line_errors
def login(
    url: Annotated[str, typer.Argument(help="The server, e.g. http://127.0.0.1:8000.")],
    api_key: Annotated[
        str,
        typer.Option("--api-key", prompt=True, hide_input=True, help="Your API key (dk_...); asked for if left out."),
    ],
    verify: Annotated[bool, typer.Option(help="Check the key against the server before storing it.")] = True,
    as_json: JsonOption = False,
) -> None:
    """Remember a server and API key for the other client commands (stored 0600 in your config folder)."""
    url = url.rstrip("/")
    if verify:
        with Client(url, api_key, retries=1) as client:
            next(client.list_jobs(page_size=1), None)
    path = save_login(url, api_key)
    if as_json:
        _print_json({"url": url, "config": str(path)})
    else:
        typer.echo(f"logged in to {url}; stored in {path}")


@_one_line_errors
def upload(
    file: Annotated[Path, typer.Argument(help="A teacher model or a dataset (.npz, ImageFolder .zip).")],
    purpose: Annotated[str, typer.Option(help="teacher or dataset.")],
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Upload a teacher or a dataset; prints its file id (use it in a spec's teacher.file / data.train)."""
    if purpose not in ("teacher", "dataset"):
        raise errors.ValidationError(f"--purpose must be teacher or dataset, not {purpose!r}", field="purpose")
    with _client(url, api_key) as client, _ByteBar(f"upload {file.name}", _size(file), as_json) as bar:
        uploaded = client.upload(file, purpose, on_bytes=bar.advance)  # type: ignore[arg-type]  # checked above
    if as_json:
        _print_json(uploaded)
    else:
        typer.echo(uploaded.id)


@_one_line_errors
def submit(
    spec: Annotated[Path, typer.Argument(metavar="SPEC", help="Job spec, YAML or JSON; local paths are uploaded.")],
    wait_: Annotated[
        bool, typer.Option("--wait", help="Follow the job to its end; the exit code says how it ended.")
    ] = False,
    out: Annotated[
        Path | None, typer.Option("--out", help="After success, download the artifacts here (implies --wait).")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Label the job (overrides the spec's name).")] = None,
    timeout: TimeoutOption = None,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Upload the local files a spec names, submit the job and print its id; --wait follows it with a progress bar.

    Relative paths in the spec are read from the spec file's folder. A file uploaded before with
    the same bytes is reused, not sent again.
    """
    body = read_spec_file(spec)
    if name is not None:
        body["name"] = name
    _validate_locally(body)
    with _client(url, api_key) as client:
        def note_upload(field: str, path: Path) -> None:
            if not as_json and sys.stderr.isatty():
                typer.echo(f"{field}: uploading {path} ({_size(path) / 1e6:.1f} MB) unless sent before", err=True)

        body = client.upload_spec_files(body, spec.parent.resolve(), on_upload=note_upload)
        job = client.create_job(body, idempotency_key=str(uuid.uuid4()))
        if not (wait_ or out):
            if as_json:
                _print_json(job)
            else:
                typer.echo(job.id)
            return
        if not as_json and sys.stderr.isatty():
            typer.echo(f"submitted {job.id}", err=True)
        job = _follow(client, job.id, timeout=timeout, as_json=as_json)
        if out is not None and job.state == "succeeded":
            _download_into(client, job.id, out, names=None, as_json=as_json)
    _finish(job, as_json=as_json)


@_one_line_errors
def wait(
    job_id: JobArgument,
    timeout: TimeoutOption = None,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Follow a job to its end with a progress bar; exit 0 succeeded, 1 failed, 3 cancelled."""
    with _client(url, api_key) as client:
        job = _follow(client, job_id, timeout=timeout, as_json=as_json)
    _finish(job, as_json=as_json)


@_one_line_errors
def status(
    job_id: JobArgument,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """A job's state, stage, progress, metrics and error."""
    with _client(url, api_key) as client:
        job = client.get_job(job_id)
    if as_json:
        _print_json(job)
        return
    rows = [
        ("job", job.id + (f"  ({job.name})" if job.name else "")),
        ("state", job.state + (" (cancel requested)" if job.cancel_requested and not job.finished else "")),
        ("stage", job.stage or "-"),
        ("progress", _progress_text(job)),
        ("attempts", _attempts_text(job)),
        ("created", _when(job.created_at)),
        ("started", _when(job.started_at)),
        ("finished", _when(job.finished_at)),
    ]
    if job.error:
        rows.append(("error", f"{job.error.code}: {job.error.message or ''}".strip()))
    summary = _result_summary(job)
    if summary:
        rows.append(("result", summary))
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        typer.echo(f"{label:<{width}}  {value}")


def _attempts_text(job: Job) -> str:
    # A worker told to stop (a restart) hands its run back uncounted, so a job can read running with
    # no attempt used until the reaper requeues it; the run it is on is still its first.
    used = max(job.attempts, 1) if job.state == "running" else job.attempts
    return f"{used} of {job.max_attempts}"


@_one_line_errors
def list_jobs(
    state: Annotated[
        str | None, typer.Option(help="Only jobs in this state: queued, running, succeeded, failed, cancelled.")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="Show at most this many (newest first).")] = 20,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Your jobs, newest first."""
    with _client(url, api_key) as client:
        newest = client.list_jobs(state=state, page_size=min(limit, 200))
        jobs = list(itertools.islice(newest, limit))
    if as_json:
        _print_json(jobs)
        return
    if not jobs:
        typer.echo("no jobs" + (f" in state {state}" if state else ""), err=True)
        return
    header = f"{'JOB':<31} {'STATE':<10} {'STAGE':<16} {'PROGRESS':>8}  {'CREATED':<19}  NAME"
    typer.echo(header)
    for job in jobs:
        typer.echo(
            f"{job.id:<31} {job.state:<10} {(job.stage or '-'):<16} {job.progress.fraction:>8.0%}  "
            f"{_when(job.created_at):<19}  {job.name or ''}"
        )


@_one_line_errors
def logs(
    job_id: JobArgument,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing until the job has ended.")] = False,
    every: Annotated[bool, typer.Option("--all", help="Every progress event too, not only epoch ends.")] = False,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """A job's event log: state changes, log messages, epoch results (--json: one event per line)."""
    with _client(url, api_key) as client:
        for event in client.events(job_id, follow=follow):
            if as_json:
                typer.echo(event.model_dump_json())
            elif every or not _is_step_progress(event):
                typer.echo(_event_line(event))


@_one_line_errors
def cancel(
    job_id: JobArgument,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Cancel a queued job, or ask a running one to stop at its next step."""
    with _client(url, api_key) as client:
        job = client.cancel(job_id)
    if as_json:
        _print_json(job)
    elif job.state == "cancelled":
        typer.echo(f"{job.id} cancelled")
    else:
        typer.echo(f"{job.id} is stopping at its next step (cancel requested)")


@_one_line_errors
def delete(
    job_id: JobArgument,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Delete a finished job with its artifacts and checkpoints."""
    with _client(url, api_key) as client:
        client.delete_job(job_id)
    if as_json:
        _print_json({"id": job_id, "deleted": True})
    else:
        typer.echo(f"{job_id} deleted")


@_one_line_errors
def download(
    job_id: JobArgument,
    out: Annotated[Path | None, typer.Option("--out", help="Folder for the artifacts; default ./JOB.")] = None,
    names: Annotated[
        list[str] | None, typer.Option("--name", help="Only this artifact (repeat for several); default: all.")
    ] = None,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Download a job's artifacts, each checked against its sha256; files already there are kept."""
    with _client(url, api_key) as client:
        paths = _download_into(client, job_id, out or Path(job_id), names=names, as_json=as_json)
    if as_json:
        _print_json(paths)
    else:
        for entry in paths:
            typer.echo(entry["path"])


@_one_line_errors
def architectures(
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """The student architectures the server offers (student.arch) with their default arguments."""
    with _client(url, api_key) as client:
        entries = client.architectures()
    if as_json:
        _print_json(entries)
        return
    width = max((len(entry.name) for entry in entries), default=4)
    for entry in entries:
        defaults = json.dumps(entry.defaults, separators=(", ", ": ")) if entry.defaults else ""
        line = f"{entry.name:<{width}}  {entry.family:<12} {entry.description}"
        typer.echo(f"{line}  {defaults}" if defaults else line)


# -- helpers --------------------------------------------------------------------------------------


def _validate_locally(body: dict[str, Any]) -> None:
    """The spec checked by the same model the server uses, before any upload; the server checks it again."""
    try:
        from kdcore.errors import SpecError
        from kdcore.spec import parse_spec
    except ImportError:  # a client-only install: the server's 422 will say it instead
        return
    try:
        parse_spec(body)
    except SpecError as exc:
        problems = exc.errors
        first = problems[0] if problems else {"field": "spec", "message": "invalid"}
        message = "; ".join(f"{p['field']}: {p['message']}" for p in problems[:5])
        raise errors.ValidationError(message, code="invalid_spec", field=first["field"], details=problems) from None


def _follow(client: Client, job_id: str, *, timeout: float | None, as_json: bool) -> Job:
    with _JobBar(enabled=not as_json) as bar:
        return client.wait(job_id, on_progress=bar.update, on_event=bar.event, timeout=timeout)


def _finish(job: Job, *, as_json: bool) -> None:
    if as_json:
        _print_json(job)
    else:
        line = f"{job.id} {job.state}"
        if job.error:
            line += f": {job.error.code}: {job.error.message or ''}".rstrip(": ")
        summary = _result_summary(job)
        if summary:
            line += f"; {summary}"
        typer.echo(line, err=job.state != "succeeded")
    raise typer.Exit(JOB_EXIT.get(job.state, EXIT_FAILED))


def _download_into(
    client: Client, job_id: str, folder: Path, *, names: list[str] | None, as_json: bool
) -> list[dict[str, Any]]:
    listed = client.artifacts(job_id)
    wanted = [artifact for artifact in listed if not names or artifact.name in names]
    total = sum(artifact.size for artifact in wanted)
    with _ByteBar(f"download {job_id}", total, as_json) as bar:
        paths = client.download_all(job_id, folder, names=names, on_bytes=bar.advance)
    return [
        {"name": artifact.name, "path": str(path), "size": artifact.size, "sha256": artifact.sha256}
        for artifact, path in zip(wanted, paths, strict=True)
    ]


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _when(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    aware = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return aware.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _progress_text(job: Job) -> str:
    progress = job.progress
    parts = [f"{progress.fraction:.0%}"]
    if progress.epochs:
        parts.append(f"epoch {progress.epoch or 0}/{progress.epochs}")
    if progress.eta_s is not None and not job.finished:
        parts.append(f"ETA {_duration(progress.eta_s)}")
    accuracy = job.latest_accuracy
    if accuracy is not None:
        parts.append(f"acc {accuracy:.4f}")
    return ", ".join(parts)


def _result_summary(job: Job) -> str:
    return _metrics_summary(job.metrics)


def _metrics_summary(metrics: dict[str, Any]) -> str:
    """`student accuracy 0.97 (teacher 0.98, baseline 0.96), 5.1x smaller, 3.2x faster`, or "" before the end;
    for a causal LM `student loss 1.5000 nats/token, perplexity 4.48 (teacher 1.2345, ...)`."""
    student, teacher, baseline = (metrics.get(key) for key in ("student", "teacher", "baseline"))
    # A language model is judged by its loss (nats per token, lower is better), a classifier by accuracy.
    measure = "loss" if metrics.get("task") == "causal_lm" else "accuracy"
    if not isinstance(student, dict) or measure not in student:
        return ""
    text = f"student {measure} {student[measure]:.4f}"
    if measure == "loss":
        text += " nats/token" + (f", perplexity {student['perplexity']:.2f}" if "perplexity" in student else "")
    others = [
        f"{label} {value[measure]:.4f}"
        for label, value in (("teacher", teacher), ("baseline", baseline))
        if isinstance(value, dict) and measure in value
    ]
    if others:
        text += f" ({', '.join(others)})"
    if isinstance(metrics.get("compression"), int | float):
        text += f", {metrics['compression']:.1f}x smaller"
    if isinstance(metrics.get("speedup"), int | float):
        text += f", {metrics['speedup']:.1f}x faster"
    return text


def _is_step_progress(event: JobEvent) -> bool:
    return event.kind == "progress" and "metrics" not in event.data


def _event_line(event: JobEvent) -> str:
    when = _when(event.created_at)
    data = event.data
    if event.kind == "state":
        text = str(data.get("state"))
        error = data.get("error")
        if isinstance(error, dict):
            text += f": {error.get('code')}: {error.get('message') or ''}".rstrip(": ")
        elif data.get("reason"):
            text += f" ({data['reason']})"
        if data.get("attempt"):
            text += f" (attempt {data['attempt']})"
    elif event.kind == "progress":
        progress = data.get("progress") or {}
        text = f"{data.get('stage') or ''} {progress.get('epoch') or 0}/{progress.get('epochs') or '?'}".strip()
        training = (data.get("metrics") or {}).get("training")
        summary = _metrics_summary(data.get("metrics") or {})
        if summary:
            text = summary
        elif isinstance(training, dict):
            values = [f"{k} {v:.4f}" for k, v in training.items() if isinstance(v, float) and k != "lr"]
            text += "  " + "  ".join(values)
        elif isinstance(progress.get("fraction"), int | float):
            text += f"  {progress['fraction']:.0%}"
    else:
        text = event.message or json.dumps({k: v for k, v in data.items() if k not in ("job_id", "kind", "created_at")})
    return f"{when}  {event.kind:<16} {text}"


class _JobBar:
    """A live bar on stderr (stage, epoch, ETA, accuracy), or one line per change where stderr is no terminal."""

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self.live = enabled and sys.stderr.isatty()
        self.last_line = ""
        self.progress: Any = None
        self.task: Any = None

    def __enter__(self) -> _JobBar:
        if self.live:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TaskProgressColumn(),
                TextColumn("{task.fields[eta]}"),
                TimeElapsedColumn(),
                TextColumn("{task.fields[accuracy]}"),
                console=Console(stderr=True),
                transient=False,
            )
            self.progress.start()
            self.task = self.progress.add_task("queued", total=1.0, eta="", accuracy="")
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def update(self, job: Job) -> None:
        if not self.enabled:
            return
        progress = job.progress
        stage = job.stage if job.state == "running" and job.stage else ""
        epoch = f" {progress.epoch or 0}/{progress.epochs}" if stage and progress.epochs else ""
        description = f"{job.state} {stage}{epoch}".strip()
        eta = f"ETA {_duration(progress.eta_s)}" if progress.eta_s is not None and not job.finished else ""
        accuracy = ""
        if job.latest_accuracy is not None:
            label = "student acc" if "student" in job.metrics else "val acc"
            accuracy = f"{label} {job.latest_accuracy:.4f}"
        if self.progress is not None:
            self.progress.update(self.task, completed=progress.fraction, description=description, eta=eta,
                                 accuracy=accuracy)
            return
        line = "  ".join(part for part in (description, f"{progress.fraction:.0%}", eta, accuracy) if part)
        key = (job.state, stage, progress.epoch)
        if key != getattr(self, "_last_key", None):
            self._last_key = key
            typer.echo(line, err=True)

    def event(self, event: JobEvent) -> None:
        if not self.enabled or event.kind not in ("log", "resume", "trial"):
            return
        message = event.message or (_trial_line(event.data) if event.kind == "trial" else "")
        if self.progress is not None:
            self.progress.console.print(message, markup=False, highlight=False)
        else:
            typer.echo(message, err=True)


def _trial_line(data: dict[str, Any]) -> str:
    """A tuned job's search progress: one line as each trial is queued and ends."""
    settings = ", ".join(f"{path}={value}" for path, value in (data.get("params") or {}).items())
    outcome = "pruned" if data.get("pruned") else str(data.get("state"))
    value = data.get("value")
    metric = f" {value:.4f}" if isinstance(value, int | float) else ""
    return f"trial {data.get('number')} {outcome}{metric} ({settings})"


class _ByteBar:
    """A transfer bar on stderr (bytes, speed); silent for --json or where stderr is no terminal."""

    def __init__(self, label: str, total: int, quiet: bool) -> None:
        self.label, self.total = label, total
        self.live = not quiet and sys.stderr.isatty()
        self.progress: Any = None
        self.task: Any = None
        self.started = time.monotonic()

    def __enter__(self) -> _ByteBar:
        if self.live:
            from rich.console import Console
            from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                console=Console(stderr=True),
            )
            self.progress.start()
            self.task = self.progress.add_task(self.label, total=self.total or None)
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def advance(self, count: int) -> None:
        if self.progress is not None:
            self.progress.advance(self.task, count)
