"""Receiving an upload: streamed multipart parsing, the limits, the cheap check, and the record.

`receive_file` is the one upload path: `POST /v1/files` and the web page's upload both call it,
so quotas, limits and file checks are the same for both. Bytes go to storage as they arrive,
hashed on the way.

FastAPI's `UploadFile` would spool the whole body first; here the request stream is fed to
streaming-form-data's parser, whose `file` target writes into a storage ObjectWriter. The parser
and the writes run in the thread pool in batches, so the event loop never waits on the disk.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath

from fastapi import Request
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from streaming_form_data import StreamingFormDataParser
from streaming_form_data.parser import ParseFailedException
from streaming_form_data.targets import BaseTarget

from service import files, quota
from service.errors import ServiceError
from service.ids import new_id
from service.keys import upload_key
from service.models import File, FilePurpose
from service.settings import Settings
from service.storage import ObjectTooLargeError, ObjectWriter, Storage

BATCH_BYTES = 1024 * 1024
MAX_FIELD_BYTES = 256
# Multipart framing around the file: boundaries, part headers, the purpose field.
MULTIPART_OVERHEAD = 64 * 1024


class _WriterTarget(BaseTarget):
    """The `file` part: opens an ObjectWriter when the part starts (its filename known), then writes."""

    def __init__(self, open_writer: Callable[[str], ObjectWriter]) -> None:
        super().__init__()
        self._open_writer = open_writer
        self.writer: ObjectWriter | None = None
        self.finished = False

    def on_start(self) -> None:
        if self.writer is not None:
            raise ServiceError(422, "invalid_request", "send exactly one `file` part", field="file")
        self.writer = self._open_writer(PurePosixPath(self.multipart_filename or "").suffix.lower())

    def on_data_received(self, chunk: bytes) -> None:
        assert self.writer is not None
        self.writer.write(chunk)

    def on_finish(self) -> None:
        self.finished = True


class _SmallValueTarget(BaseTarget):
    """A plain form field, bounded so a huge 'purpose' cannot fill the memory."""

    def __init__(self) -> None:
        super().__init__()
        self._value = bytearray()

    def on_data_received(self, chunk: bytes) -> None:
        self._value += chunk
        if len(self._value) > MAX_FIELD_BYTES:
            raise ServiceError(
                422, "invalid_request", f"form field longer than {MAX_FIELD_BYTES} bytes", field="purpose"
            )

    @property
    def value(self) -> str | None:
        return self._value.decode("utf-8", errors="replace") if self._started else None


@dataclass
class ReceivedUpload:
    writer: ObjectWriter  # holds the bytes, not yet committed: discard it on any later error
    filename: str | None
    purpose: str | None


async def receive_file(
    request: Request, *, owner_id: str, session: Session, settings: Settings, storage: Storage
) -> File:
    """Stream a multipart `file` + `purpose` into storage, check it cheaply and record it for `owner_id`.

    Raises ServiceError (400/413/422); nothing is kept of a refused upload.
    """
    try:
        declared = int(request.headers.get("content-length") or 0)
    except ValueError:
        raise ServiceError(400, "bad_request", "the Content-Length header is not a number") from None
    if declared > settings.max_upload_bytes + MULTIPART_OVERHEAD:
        raise files.file_too_large(settings)
    file_id = new_id("file")
    # The bytes are reserved before the body streams, so parallel uploads cannot all fit one quota.
    limit = await run_in_threadpool(
        quota.reserve_upload, session=session, settings=settings, owner_id=owner_id, file_id=file_id,
        declared=declared,
    )
    try:
        return await _receive_reserved(
            request, owner_id=owner_id, session=session, settings=settings, storage=storage, file_id=file_id,
            limit=limit,
        )
    except BaseException:
        await run_in_threadpool(quota.release_upload, session=session, file_id=file_id)
        raise


async def _receive_reserved(
    request: Request, *, owner_id: str, session: Session, settings: Settings, storage: Storage, file_id: str,
    limit: int,
) -> File:
    try:
        upload = await receive_upload(request, storage=storage, key=upload_key(owner_id, file_id), max_bytes=limit)
    except ObjectTooLargeError:
        raise (
            files.file_too_large(settings) if limit == settings.max_upload_bytes else files.quota_exceeded(settings)
        ) from None
    with upload.writer:  # discarded unless store_upload commits it
        purpose = _purpose(upload.purpose)
        info = await run_in_threadpool(files.sniff_upload, path=str(upload.writer.local_path), purpose=purpose)
        return await run_in_threadpool(
            files.store_upload,
            session=session,
            settings=settings,
            storage=storage,
            owner_id=owner_id,
            file_id=file_id,
            writer=upload.writer,
            purpose=purpose,
            name=files.clean_filename(upload.filename),
            info=info,
        )


def _purpose(value: str | None) -> FilePurpose:
    if value is None:
        raise ServiceError(
            422, "invalid_request", "the `purpose` field is missing: teacher or dataset", field="purpose"
        )
    try:
        return FilePurpose(value.strip())
    except ValueError:
        raise ServiceError(
            422, "invalid_request", f"purpose must be teacher or dataset, not {value!r}", field="purpose"
        ) from None


async def receive_upload(request: Request, *, storage: Storage, key: str, max_bytes: int) -> ReceivedUpload:
    """Parse `file` and `purpose` from a multipart request into an uncommitted ObjectWriter.

    Raises ServiceError (400/413/422); the partial bytes are discarded then. `ObjectTooLargeError`
    propagates for the caller to tell the upload limit from the quota.
    """
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise ServiceError(
            422, "invalid_request", "send multipart/form-data with fields `file` and `purpose`", field="file"
        )
    try:
        parser = StreamingFormDataParser(headers=dict(request.headers))
    except Exception:
        raise ServiceError(400, "bad_request", "the multipart body has no valid boundary") from None
    file_target = _WriterTarget(lambda suffix: storage.writer(key, max_bytes=max_bytes, suffix=suffix))
    purpose_target = _SmallValueTarget()
    parser.register("file", file_target)
    parser.register("purpose", purpose_target)
    try:
        await _feed(request, parser)
        if file_target.writer is None:
            raise ServiceError(422, "invalid_request", "the `file` part is missing", field="file")
        if not file_target.finished:
            raise ServiceError(400, "bad_request", "the multipart body ended before the file did", field="file")
        file_target.writer.close_file()
    except BaseException:
        if file_target.writer is not None:
            file_target.writer.discard()
        raise
    return ReceivedUpload(file_target.writer, file_target.multipart_filename, purpose_target.value)


async def _feed(request: Request, parser: StreamingFormDataParser) -> None:
    batch = bytearray()
    try:
        async for chunk in request.stream():
            batch += chunk
            if len(batch) >= BATCH_BYTES:
                await run_in_threadpool(_parse, parser, bytes(batch))
                batch.clear()
        if batch:
            await run_in_threadpool(_parse, parser, bytes(batch))
    except ClientDisconnect:
        raise ServiceError(400, "bad_request", "the client went away during the upload") from None


def _parse(parser: StreamingFormDataParser, data: bytes) -> None:
    # Errors raised by the targets (ServiceError, ObjectTooLargeError) come through unchanged.
    try:
        parser.data_received(data)
    except ParseFailedException as exc:
        raise ServiceError(400, "bad_request", f"malformed multipart body: {exc}") from None
