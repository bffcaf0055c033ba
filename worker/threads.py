"""How many torch threads a job gets on this worker."""

from __future__ import annotations

import os

from service.settings import Settings


def job_threads(settings: Settings, *, concurrency: int = 1) -> int:
    """torch threads per job: the setting, else this worker's share of its cores less one.

    The spare core is for the worker's parent, the heartbeats and (under serve) the API: OpenMP
    threads spin-waiting on every core stall whenever another thread runs (measured on 2 cores:
    2 threads beside an idle worker parent ran an epoch 20-150x slower than 1 thread).
    """
    if settings.worker_threads:
        return settings.worker_threads
    return max(1, (len(os.sched_getaffinity(0)) - 1) // concurrency)
