"""The operator's bounds on the process that runs a job: its memory and its threads."""

from __future__ import annotations

import contextlib
import logging
import resource
from collections.abc import Iterator
from pathlib import Path

from service.settings import Settings
from worker.threads import job_threads

logger = logging.getLogger("distillery.worker")

MEMORY_SETTING = "DISTILLERY_JOB_MEMORY_BYTES"


def capped_threads(settings: Settings, requested: int | None) -> int:
    """The spec may ask for fewer threads than the operator allows, never more."""
    cap = settings.max_job_threads or job_threads(settings)
    return min(requested or cap, cap)


def _uses_gpu(device: str) -> bool:
    # CUDA maps (and writes) far more address space than it uses: a data limit would break it.
    return device.startswith("cuda") or (device == "auto" and Path("/dev/nvidiactl").exists())


@contextlib.contextmanager
def memory_limit(limit_bytes: int | None, *, device: str) -> Iterator[bool]:
    """Run the body under RLIMIT_DATA (heap and private writable mappings: what tensors take).

    An allocation past it fails in that allocation (MemoryError, or torch's "can't allocate
    memory"), so the job fails and the worker lives on. Only the soft limit moves, and it is put
    back after, so a solo-pool worker that runs many jobs in one process keeps its own.
    Yields whether a limit is in force.
    """
    if limit_bytes is None or _uses_gpu(device):
        yield False
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    new = limit_bytes if hard == resource.RLIM_INFINITY else min(limit_bytes, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (new, hard))
    try:
        yield True
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


def memory_limit_message(settings: Settings, exc: BaseException) -> str:
    return (
        f"the job ran out of its memory limit of {settings.job_memory_bytes:,} bytes (job_memory_bytes, set by "
        f"{MEMORY_SETTING}); lower batch_size, use a smaller student or less data ({type(exc).__name__})"
    )
