"""Worker logging: every line written while a job runs carries the job id and the attempt."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from service.logs import configure_logging

job_context: ContextVar[tuple[str, int] | None] = ContextVar("job_context", default=None)


class JobContextFilter(logging.Filter):
    """Adds `job_id` and `attempt` to records (JSON lines show them as fields) and `job_tag` for text."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = job_context.get()
        if context is not None and not hasattr(record, "job_id"):
            record.job_id, record.attempt = context
        record.job_tag = f"[{context[0]} attempt {context[1]}] " if context is not None else ""
        return True


class _TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(job_tag)s%(message)s")


class _JsonWithoutTag(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.__dict__.pop("job_tag", None)
        return True


def configure_worker_logging(level: str, *, json_lines: bool) -> None:
    """The service's log setup (one stderr handler, JSON lines by default) plus the job context."""
    configure_logging(level, json_lines=json_lines)
    for handler in logging.getLogger().handlers:
        handler.addFilter(JobContextFilter())
        if json_lines:
            handler.addFilter(_JsonWithoutTag())
        else:
            handler.setFormatter(_TextFormatter())


@contextmanager
def job_logging(job_id: str, attempt: int) -> Iterator[None]:
    token = job_context.set((job_id, attempt))
    try:
        yield
    finally:
        job_context.reset(token)
