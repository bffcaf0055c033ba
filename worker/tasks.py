"""The one task: run a job by id. Everything it does lives in `worker.runner`."""

from __future__ import annotations

from celery import shared_task
from celery.exceptions import Reject

from service.queue import TASK_NAME
from worker.process import worker_stopping


@shared_task(name=TASK_NAME, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_job(job_id: str) -> str:
    """Claim the job and run it; returns what became of it (a duplicate delivery returns `skipped`)."""
    if worker_stopping():
        # Delivered in the moment between the shutdown signal and the consumer's stop: back to
        # the queue for a worker that stays.
        raise Reject("this worker is shutting down", requeue=True)
    from service.settings import get_settings
    from worker.runner import run

    return run(job_id, get_settings()).value
