"""`Client`: the REST API from Python, for scripts and notebooks.

    from client import Client

    with Client("http://127.0.0.1:8000", api_key="dk_...") as client:
        job = client.submit("examples/mnist/job.yaml")      # uploads the local files the spec names
        job = client.wait(job.id, on_progress=lambda j: print(j.stage, j.progress.fraction))
        client.download_all(job.id, "out/")                  # sha256-checked

Failures raise the classes of `client.errors`. Calls that are safe to repeat (GET, DELETE,
and `POST /v1/jobs`, which carries an Idempotency-Key) are retried with exponential backoff and
jitter when the connection fails or the server answers 502/503/504; every other call is retried
only when the connection could not even be opened (the request never left). Imports stay light:
httpx, httpx-sse, tenacity and pydantic; no torch, no server code.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Literal, TypeVar, cast

import httpx
import httpx_sse
from pydantic import BaseModel
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from client import errors
from client.models import (
    Architecture,
    Artifact,
    ArtifactList,
    File,
    FilePage,
    Health,
    Job,
    JobEvent,
    JobPage,
    Purpose,
)

__all__ = ["Client"]

RETRY_STATUSES = frozenset({502, 503, 504})
CHUNK_BYTES = 1 << 20
# Files above this go in resumable parts (POST /v1/uploads); each part is one request of PART_BYTES.
RESUMABLE_BYTES = 64 << 20
PART_BYTES = 16 << 20
UPLOAD_PART_TYPE = "application/offset+octet-stream"
FILE_FIELDS: tuple[tuple[str, str, Purpose], ...] = (
    ("teacher", "file", "teacher"),
    ("data", "train", "dataset"),
    ("data", "test", "dataset"),
)
FILE_ID_PREFIX = "file_"

Retry = Literal["idempotent", "connect"]
ModelT = TypeVar("ModelT", bound=BaseModel)
BytesCallback = Callable[[int], None]


class Client:
    """A session with one Distillery server.

    `timeout` is seconds per network operation (connect, each read, each write), not per call: a
    long download does not time out while bytes keep coming. `retries` is how many times a failed
    call is repeated (0: never); the waits grow from `backoff` seconds, doubled each time, with
    jitter, up to `max_backoff`.
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 8.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.retries = max(0, retries)
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.timeout = timeout
        headers = {"User-Agent": "distillery-client/1", "Accept": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport)

    # -- lifecycle ------------------------------------------------------------------------------

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- health ---------------------------------------------------------------------------------

    def livez(self) -> Health:
        return self._get_model("/livez", Health)

    def readyz(self) -> Health:
        """Readiness of the database, broker and storage; a 503 is returned, not raised."""
        response = self._send("GET", "/readyz", retry="idempotent", ok=(200, 503))
        return Health.model_validate(response.json())

    # -- files ----------------------------------------------------------------------------------

    def upload(
        self,
        path: str | os.PathLike[str],
        purpose: Purpose,
        *,
        name: str | None = None,
        on_bytes: BytesCallback | None = None,
        resumable: bool | None = None,
    ) -> File:
        """Stream a teacher or dataset file to the server; its sha256 must match what the server stored.

        `on_bytes(n)` is called as chunks go out (for a progress bar). On a checksum mismatch the
        upload is deleted again and ChecksumError raised. `resumable` (default: files over
        RESUMABLE_BYTES) sends the file in parts that survive a dropped connection: after one, the
        upload goes on from the last part the server stored, not from the start.
        """
        path = Path(path)
        if not path.is_file():
            raise errors.BadRequest(f"no such file: {path}", code="no_such_file")
        if resumable or (resumable is None and path.stat().st_size > RESUMABLE_BYTES):
            return self.upload_resumable(path, purpose, name=name, on_bytes=on_bytes)

        def build() -> httpx.Request:
            # A fresh reader per attempt: a retry starts the file (and its hash) from the top.
            reader = _HashingReader(path.open("rb"), on_bytes)
            attempt_readers.append(reader)
            return self._http.build_request(
                "POST",
                "/v1/files",
                data={"purpose": purpose},
                files={"file": (name or path.name, cast(IO[bytes], reader), "application/octet-stream")},
            )

        attempt_readers: list[_HashingReader] = []
        try:
            response = self._send_built(build, retry="connect")
        finally:
            for reader in attempt_readers:
                reader.close()
        uploaded = File.model_validate(response.json())
        local = attempt_readers[-1].hexdigest()
        if uploaded.sha256 != local:
            self._forget_file(uploaded.id)
            raise errors.ChecksumError(
                f"{path.name} arrived as sha256 {uploaded.sha256} but is {local} here; upload it again",
                request_id=response.headers.get("x-request-id"),
            )
        return uploaded

    def upload_resumable(
        self,
        path: str | os.PathLike[str],
        purpose: Purpose,
        *,
        name: str | None = None,
        on_bytes: BytesCallback | None = None,
        part_bytes: int = PART_BYTES,
    ) -> File:
        """Send a file in parts (`POST /v1/uploads`, then `PATCH` each part at its offset).

        A part cut off by a dropped connection is not counted by the server; the upload asks it for
        its offset and goes on from there. `retries` bounds the failures in a row without progress.
        """
        path = Path(path)
        size = path.stat().st_size
        created = self._send("POST", "/v1/uploads", retry="connect",
                             json={"name": name or path.name, "size": size, "purpose": purpose})
        upload_id, offset = created.json()["id"], 0
        failures = 0
        with path.open("rb") as handle:
            while True:
                handle.seek(offset)
                part = handle.read(part_bytes)
                try:
                    response = self._send("PATCH", f"/v1/uploads/{upload_id}", retry="connect", content=part,
                                          headers={"Content-Type": UPLOAD_PART_TYPE, "Upload-Offset": str(offset)})
                except (errors.ConnectionError, errors.Conflict) as exc:
                    failures += 1
                    if failures > self.retries:
                        raise
                    if isinstance(exc, errors.ConnectionError):
                        time.sleep(self._backoff_seconds(failures))
                    try:
                        offset = self._send("GET", f"/v1/uploads/{upload_id}", retry="idempotent").json()["offset"]
                    except errors.NotFound:
                        # The last part arrived but its answer was lost: the upload is the file now (same id).
                        uploaded = self.get_file(upload_id)
                        break
                    continue
                body = response.json()
                if on_bytes is not None:
                    on_bytes(body["offset"] - offset)
                failures, offset = 0, body["offset"]
                if body.get("file") is not None:
                    uploaded = File.model_validate(body["file"])
                    break
        local = _sha256_file(path)
        if uploaded.sha256 != local:
            self._forget_file(uploaded.id)
            raise errors.ChecksumError(
                f"{path.name} arrived as sha256 {uploaded.sha256} but is {local} here; upload it again",
            )
        return uploaded

    def get_file(self, file_id: str) -> File:
        return self._get_model(f"/v1/files/{file_id}", File)

    def list_files(self, *, purpose: Purpose | None = None, page_size: int = 50) -> Iterator[File]:
        """Every upload of yours, newest first, fetched a page at a time."""
        params = {"purpose": purpose} if purpose else {}
        yield from self._pages("/v1/files", FilePage, params, page_size)

    def delete_file(self, file_id: str) -> None:
        self._send("DELETE", f"/v1/files/{file_id}", retry="idempotent", ok=(204, 404), missing_ok_after_retry=True)

    def find_upload(self, path: str | os.PathLike[str], purpose: Purpose) -> File | None:
        """An earlier upload with the same bytes and purpose, so `submit` need not send a file twice."""
        path = Path(path)
        size, digest = path.stat().st_size, _sha256_file(path)
        for uploaded in self.list_files(purpose=purpose, page_size=200):
            if uploaded.sha256 == digest and uploaded.size == size:
                return uploaded
        return None

    # -- jobs -----------------------------------------------------------------------------------

    def submit(
        self,
        spec: Mapping[str, Any] | BaseModel | str | os.PathLike[str],
        *,
        base_dir: str | os.PathLike[str] | None = None,
        upload_local_files: bool = True,
        reuse_uploads: bool = True,
        idempotency_key: str | None = None,
        on_upload: Callable[[str, Path], None] | None = None,
        on_bytes: BytesCallback | None = None,
    ) -> Job:
        """Upload the local files a spec names, then submit it; returns the queued job.

        `spec` is a dict, a `kdcore.spec.JobSpec`, or the path of a YAML/JSON spec file. Relative
        paths in `teacher.file`, `data.train` and `data.test` are taken relative to `base_dir`
        (default: the spec file's folder, else the current one); a value that names an existing
        file is uploaded (or an identical earlier upload reused) and replaced by its file id, a
        `file_...` id is passed on as it is. The POST carries an Idempotency-Key (one is made up
        unless given), so a retried submission never creates a second job.
        """
        body, base = _spec_body(spec, base_dir)
        if upload_local_files:
            body = self.upload_spec_files(
                body, base, reuse_uploads=reuse_uploads, on_upload=on_upload, on_bytes=on_bytes
            )
        return self.create_job(body, idempotency_key=idempotency_key or str(uuid.uuid4()))

    def upload_spec_files(
        self,
        body: dict[str, Any],
        base: Path,
        *,
        reuse_uploads: bool = True,
        on_upload: Callable[[str, Path], None] | None = None,
        on_bytes: BytesCallback | None = None,
    ) -> dict[str, Any]:
        """The spec with every local file it names uploaded and replaced by its file id.

        Every value is resolved before anything is sent, so a missing file fails at once.
        """
        body = {**body, **{section: dict(body.get(section) or {}) for section in ("teacher", "data")}}
        local: list[tuple[str, str, Purpose, Path]] = []
        for section, key, purpose in FILE_FIELDS:
            value = body[section].get(key)
            if not isinstance(value, str) or not value:
                continue
            path = local_path(value, base)
            if path is not None:
                local.append((section, key, purpose, path))
            elif not value.startswith(FILE_ID_PREFIX):
                raise errors.BadRequest(
                    f"{section}.{key}: no such file {value!r} (relative paths are read from {base})",
                    code="no_such_file",
                    field=f"{section}.{key}",
                )
        uploaded: dict[tuple[Path, str], str] = {}
        for section, key, purpose, path in local:
            if (path, purpose) not in uploaded:
                if on_upload is not None:
                    on_upload(f"{section}.{key}", path)
                earlier = self.find_upload(path, purpose) if reuse_uploads else None
                uploaded[(path, purpose)] = (earlier or self.upload(path, purpose, on_bytes=on_bytes)).id
            body[section][key] = uploaded[(path, purpose)]
        return body

    def create_job(self, spec: Mapping[str, Any], *, idempotency_key: str | None = None) -> Job:
        """`POST /v1/jobs` with a spec whose files are already file ids."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        response = self._send(
            "POST", "/v1/jobs", json=dict(spec), headers=headers, retry="idempotent" if idempotency_key else "connect"
        )
        return Job.model_validate(response.json())

    def get_job(self, job_id: str) -> Job:
        return self._get_model(f"/v1/jobs/{job_id}", Job)

    def list_jobs(self, *, state: str | None = None, page_size: int = 50) -> Iterator[Job]:
        """Your jobs, newest first, optionally in one state, fetched a page at a time."""
        params = {"state": state} if state else {}
        yield from self._pages("/v1/jobs", JobPage, params, page_size)

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued job at once, or ask a running one to stop at its next step."""
        try:
            response = self._send("POST", f"/v1/jobs/{job_id}/cancel", retry="connect")
        except errors.Conflict:
            # Already finished; a cancelled (or cancelling) job is what was asked for.
            job = self.get_job(job_id)
            if job.state == "cancelled" or job.cancel_requested:
                return job
            raise
        return Job.model_validate(response.json())

    def delete_job(self, job_id: str) -> None:
        """Delete a finished job with its artifacts and checkpoints."""
        self._send("DELETE", f"/v1/jobs/{job_id}", retry="idempotent", ok=(204, 404), missing_ok_after_retry=True)

    def events(
        self, job_id: str, *, after: int = 0, follow: bool = True, idle_timeout: float = 60.0
    ) -> Iterator[JobEvent]:
        """A job's event log from `after` on, as server-sent events.

        With `follow` the stream lasts until the job has finished and its last event was sent (a
        broken connection is resumed from the last event seen); without it, it stops once the
        log is drained (nothing more arrives for a moment). `idle_timeout` is the longest silence
        accepted while following (the server pings every 15 s by default).
        """
        last_id = after
        failures = 0
        while True:
            try:
                for event in self._event_stream(job_id, last_id, read_timeout=idle_timeout if follow else 2.0):
                    last_id = event.id
                    failures = 0
                    yield event
                return
            except errors.Timeout:
                if not follow:
                    return
                failures += 1
                if failures > self.retries:
                    raise
            except errors.ConnectionError:
                failures += 1
                if failures > self.retries:
                    raise
            time.sleep(self._backoff_seconds(failures))

    def wait(
        self,
        job_id: str,
        *,
        on_progress: Callable[[Job], None] | None = None,
        on_event: Callable[[JobEvent], None] | None = None,
        timeout: float | None = None,
        poll_interval: float = 2.0,
    ) -> Job:
        """Follow a job until it succeeded, failed or was cancelled, and return it as it ended.

        Follows the server-sent events (`on_progress(job)` on every change of state, stage,
        progress or metrics; `on_event(event)` for every event, logs included) and falls back to
        polling `GET /v1/jobs/{id}` every `poll_interval` seconds when the stream cannot be used
        (a proxy that buffers or strips it, a broken stream that keeps breaking). Raises
        WaitTimeout after `timeout` seconds; the job itself goes on.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        job = self.get_job(job_id)
        if on_progress is not None:
            on_progress(job)
        last_id, stream_failures = 0, 0
        while not job.finished:
            _check_deadline(deadline, job)
            if stream_failures <= self.retries:
                try:
                    idle = 60.0 if deadline is None else max(1.0, min(60.0, deadline - time.monotonic()))
                    for event in self._event_stream(job_id, last_id, read_timeout=idle):
                        last_id, stream_failures = event.id, 0
                        if on_event is not None:
                            on_event(event)
                        updated = job.apply(event)
                        if updated is not job:
                            job = updated
                            if on_progress is not None:
                                on_progress(job)
                        _check_deadline(deadline, job)
                except (errors.ConnectionError, errors.ServerError):
                    stream_failures += 1
                    time.sleep(self._backoff_seconds(stream_failures))
                except httpx_sse.SSEError:
                    stream_failures = self.retries + 1  # not an event stream at all: poll from now on
            else:
                left = poll_interval if deadline is None else deadline - time.monotonic()
                time.sleep(max(0.0, min(poll_interval, left)))
            # The stream ends when the job has ended; the row is the truth either way.
            fresh = self.get_job(job_id)
            if fresh != job:
                job = fresh
                if on_progress is not None:
                    on_progress(job)
        return job

    # -- artifacts ------------------------------------------------------------------------------

    def artifacts(self, job_id: str) -> list[Artifact]:
        return self._get_model(f"/v1/jobs/{job_id}/artifacts", ArtifactList).items

    def download(
        self,
        job_id: str,
        name: str,
        dest: str | os.PathLike[str],
        *,
        sha256: str | None = None,
        on_bytes: BytesCallback | None = None,
    ) -> Path:
        """Stream one artifact to `dest` (a file, or a folder to put it in); returns the file's path.

        The bytes go to a temporary file beside the destination, are checked against the sha256 the
        server sends (`X-Checksum-Sha256`, and `sha256` when given, e.g. from `artifacts()`), and
        only then renamed into place: a failed or corrupted download never leaves a file that looks
        complete. A broken connection starts the download again (bounded by `retries`).
        """
        target = Path(dest)
        if target.is_dir() or str(dest).endswith(os.sep):
            target = target / name
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.part")

        def attempt() -> Path:
            with self._stream("GET", f"/v1/jobs/{job_id}/artifacts/{name}") as response:
                expected = {value for value in (sha256, response.headers.get("x-checksum-sha256")) if value}
                digest = hashlib.sha256()
                with partial.open("wb") as out:
                    for chunk in response.iter_bytes(CHUNK_BYTES):
                        out.write(chunk)
                        digest.update(chunk)
                        if on_bytes is not None:
                            on_bytes(len(chunk))
            actual = digest.hexdigest()
            if expected and expected != {actual}:
                partial.unlink(missing_ok=True)
                raise errors.ChecksumError(
                    f"{name} arrived with sha256 {actual}, expected {' or '.join(sorted(expected))}; download again",
                    request_id=response.headers.get("x-request-id"),
                )
            os.replace(partial, target)
            return target

        try:
            return self._retrying("idempotent", attempt)
        finally:
            partial.unlink(missing_ok=True)

    def download_all(
        self,
        job_id: str,
        dest_dir: str | os.PathLike[str],
        *,
        names: list[str] | None = None,
        on_artifact: Callable[[Artifact], None] | None = None,
        on_bytes: BytesCallback | None = None,
    ) -> list[Path]:
        """Every artifact of a job (or those in `names`) into `dest_dir`, keeping their relative paths.

        A file already there with the right sha256 is not fetched again, so a rerun resumes.
        """
        folder = Path(dest_dir)
        listed = self.artifacts(job_id)
        if names:
            unknown = sorted(set(names) - {artifact.name for artifact in listed})
            if unknown:
                raise errors.NotFound(f"job {job_id} has no artifact {unknown[0]!r}", code="not_found", field="name")
            listed = [artifact for artifact in listed if artifact.name in names]
        paths = []
        for artifact in listed:
            target = _inside(folder, artifact.name)
            if on_artifact is not None:
                on_artifact(artifact)
            if target.is_file() and target.stat().st_size == artifact.size and _sha256_file(target) == artifact.sha256:
                if on_bytes is not None:
                    on_bytes(artifact.size)
            else:
                self.download(job_id, artifact.name, target, sha256=artifact.sha256, on_bytes=on_bytes)
            paths.append(target)
        return paths

    def architectures(self) -> list[Architecture]:
        response = self._send("GET", "/v1/architectures", retry="idempotent")
        return [Architecture.model_validate(entry) for entry in response.json()]

    # -- plumbing -------------------------------------------------------------------------------

    def _get_model(self, path: str, model: type[ModelT], params: dict[str, Any] | None = None) -> ModelT:
        response = self._send("GET", path, params=params, retry="idempotent")
        return model.model_validate(response.json())

    def _pages(
        self, path: str, page_model: type[FilePage] | type[JobPage], params: dict[str, Any], page_size: int
    ) -> Iterator[Any]:
        cursor: str | None = None
        while True:
            query = {**params, "limit": page_size, **({"cursor": cursor} if cursor else {})}
            page = self._get_model(path, page_model, query)
            yield from page.items
            cursor = page.next_cursor
            if not cursor:
                return

    def _send(
        self,
        method: str,
        path: str,
        *,
        retry: Retry,
        ok: tuple[int, ...] = (),
        missing_ok_after_retry: bool = False,
        **kwargs: Any,
    ) -> httpx.Response:
        attempts = 0

        def build() -> httpx.Request:
            nonlocal attempts
            attempts += 1
            return self._http.build_request(method, path, **kwargs)

        try:
            return self._send_built(build, retry=retry, ok=ok)
        except errors.NotFound:
            # A DELETE whose first try went through but whose answer was lost finds nothing the second time.
            if missing_ok_after_retry and attempts > 1:
                return httpx.Response(204)
            raise

    def _send_built(
        self, build: Callable[[], httpx.Request], *, retry: Retry, ok: tuple[int, ...] = ()
    ) -> httpx.Response:
        def attempt() -> httpx.Response:
            request = build()
            try:
                response = self._http.send(request)
            except httpx.TransportError as exc:
                raise errors.from_transport(exc, self.url) from exc
            if response.is_success or response.status_code in ok:
                return response
            raise errors.from_response(response)

        return self._retrying(retry, attempt)

    @contextmanager
    def _stream(self, method: str, path: str, **kwargs: Any) -> Iterator[httpx.Response]:
        """A streamed response whose errors are ours; transport errors mid-body become ConnectionError."""
        try:
            with self._http.stream(method, path, **kwargs) as response:
                if not response.is_success:
                    response.read()
                    raise errors.from_response(response)
                yield response
        except httpx.TransportError as exc:
            raise errors.from_transport(exc, self.url) from exc

    def _event_stream(self, job_id: str, after: int, *, read_timeout: float) -> Iterator[JobEvent]:
        timeout = httpx.Timeout(self.timeout, read=read_timeout)
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-store"}
        if after:
            headers["Last-Event-ID"] = str(after)
        try:
            with httpx_sse.connect_sse(
                self._http, "GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=timeout
            ) as source:
                if not source.response.is_success:
                    source.response.read()
                    raise errors.from_response(source.response)
                for sse in source.iter_sse():
                    if not sse.id or not sse.data:
                        continue
                    data = sse.json()
                    yield JobEvent(id=int(sse.id), kind=sse.event, data=data, created_at=data.get("created_at"))
        except httpx.TransportError as exc:
            raise errors.from_transport(exc, self.url) from exc

    def _retrying(self, retry: Retry, attempt: Callable[[], _T]) -> _T:
        def retryable(exc: BaseException) -> bool:
            if isinstance(exc, errors.ConnectionError):
                return retry == "idempotent" or not exc.sent
            return retry == "idempotent" and isinstance(exc, errors.ServerError) and exc.status in RETRY_STATUSES

        retrying = Retrying(
            stop=stop_after_attempt(self.retries + 1),
            wait=wait_exponential_jitter(initial=self.backoff, max=self.max_backoff, jitter=self.backoff),
            retry=retry_if_exception(retryable),
            reraise=True,
        )
        return retrying(attempt)

    def _backoff_seconds(self, failures: int) -> float:
        return float(min(self.max_backoff, self.backoff * 2 ** max(0, failures - 1)))

    def _forget_file(self, file_id: str) -> None:
        with contextlib.suppress(errors.DistilleryError):  # the checksum error is the one to report
            self.delete_file(file_id)


_T = TypeVar("_T")


def local_path(value: str, base: Path) -> Path | None:
    """The existing local file a spec value names (relative to `base`), or None."""
    if value.startswith(FILE_ID_PREFIX) and "/" not in value and not (base / value).exists():
        return None
    candidate = Path(value).expanduser()
    candidate = candidate if candidate.is_absolute() else base / candidate
    return candidate.resolve() if candidate.is_file() else None


def _spec_body(
    spec: Mapping[str, Any] | BaseModel | str | os.PathLike[str], base_dir: str | os.PathLike[str] | None
) -> tuple[dict[str, Any], Path]:
    if isinstance(spec, BaseModel):
        body = spec.model_dump(mode="json", exclude_unset=True)
        return body, Path(base_dir or ".").resolve()
    if isinstance(spec, Mapping):
        return dict(spec), Path(base_dir or ".").resolve()
    path = Path(spec)
    return read_spec_file(path), Path(base_dir or path.parent).resolve()


def read_spec_file(path: Path) -> dict[str, Any]:
    """A YAML or JSON spec file as a dict (validation is the server's, or `kdcore.spec`'s)."""
    import json

    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise errors.BadRequest(f"cannot read {path}: {exc.strerror}", code="no_such_file", field="spec") from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        detail = " ".join(str(exc).split())
        raise errors.ValidationError(
            f"{path} is not valid YAML/JSON: {detail}", code="invalid_spec", field="spec"
        ) from None
    if not isinstance(data, dict):
        raise errors.ValidationError(f"{path} must hold a mapping of fields", code="invalid_spec", field="spec")
    return data


def _check_deadline(deadline: float | None, job: Job) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        raise errors.WaitTimeout(f"job {job.id} is still {job.state} (stage {job.stage or '-'}); it goes on")


def _inside(folder: Path, name: str) -> Path:
    """`folder / name`, refusing names that would land outside the folder."""
    target = (folder / name).resolve()
    if not target.is_relative_to(folder.resolve()):
        raise errors.BadRequest(f"artifact name {name!r} points outside {folder}", code="unsafe_name")
    return target


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


class _HashingReader:
    """A file object for httpx's multipart encoder that hashes and counts the bytes it hands out."""

    def __init__(self, handle: IO[bytes], on_bytes: BytesCallback | None) -> None:
        self._handle = handle
        self._on_bytes = on_bytes
        self._digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        chunk = self._handle.read(size)
        self._digest.update(chunk)
        if chunk and self._on_bytes is not None:
            self._on_bytes(len(chunk))
        return chunk

    def seek(self, offset: int, whence: int = 0) -> int:
        position = self._handle.seek(offset, whence)
        if position == 0:
            self._digest = hashlib.sha256()  # the encoder rewinds before sending: start the hash over
        return position

    def tell(self) -> int:
        return self._handle.tell()

    def fileno(self) -> int:
        return self._handle.fileno()

    def hexdigest(self) -> str:
        return self._digest.hexdigest()

    def close(self) -> None:
        self._handle.close()
