"""What the client commands print, from the job the server returned (no server needed)."""

from __future__ import annotations

from datetime import UTC, datetime

from client.cli import _attempts_text
from client.models import Job


def _job(state: str, attempts: int) -> Job:
    now = datetime.now(UTC)
    return Job(id="job_x", state=state, attempts=attempts, max_attempts=3, created_at=now, updated_at=now)


def test_a_running_job_handed_back_by_a_restart_is_on_its_first_attempt() -> None:
    # The stopped worker refunded its run, so the row says 0 attempts while it still reads running.
    assert _attempts_text(_job("running", 0)) == "1 of 3"
    assert _attempts_text(_job("running", 2)) == "2 of 3"
    assert _attempts_text(_job("queued", 0)) == "0 of 3"
    assert _attempts_text(_job("failed", 3)) == "3 of 3"
