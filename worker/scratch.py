"""The workers' scratch folder: each attempt unpacks its inputs there; what a killed attempt left is swept."""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.models import Job, JobState
from service.settings import Settings

logger = logging.getLogger("distillery.worker")

PREFIX = "distillery-"
# A folder younger than this may belong to an attempt that has not claimed its row yet.
MIN_AGE_S = 120.0


def scratch_root(settings: Settings) -> Path:
    return settings.work_dir or Path(tempfile.gettempdir())


def attempt_prefix(job_id: str) -> str:
    return f"{PREFIX}{job_id}-"


def sweep_scratch(
    settings: Settings, session_factory: sessionmaker[Session], *, min_age_s: float = MIN_AGE_S
) -> list[Path]:
    """Remove the scratch folders of jobs that are not running (a SIGKILLed attempt leaves the user's
    teacher and data behind, which nobody else would delete); returns what was removed."""
    root = scratch_root(settings)
    removed: list[Path] = []
    now = time.time()
    for path in root.glob(f"{PREFIX}job_*"):
        job_id = path.name.removeprefix(PREFIX).rsplit("-", 1)[0]
        try:
            if not path.is_dir() or now - path.stat().st_mtime < min_age_s:
                continue
        except OSError:
            continue
        with session_factory() as session:
            job_state = session.scalar(select(Job.state).where(Job.id == job_id))
        if job_state == JobState.RUNNING:
            continue  # perhaps on this host in another worker; its attempt removes it
        if job_state is None:
            # Not this database's job: another service (or test run) shares the temporary folder,
            # and its jobs may well be running.
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    if removed:
        logger.info("removed %d scratch folder(s) of jobs no longer running", len(removed))
    return removed
