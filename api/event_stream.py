"""Following a job's event log as server-sent events: shared by the API's stream and the web pages'."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import anyio
from sse_starlette import ServerSentEvent
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

# read(after_id) -> (job finished, the events after that id); it runs in the thread pool.
EventReader = Callable[[int], tuple[bool, list[ServerSentEvent]]]


async def follow_events(
    read: EventReader, *, after_id: int, poll_seconds: float, request: Request
) -> AsyncIterator[ServerSentEvent]:
    """Send every event after `after_id`, then new ones as they come, until the job has finished and
    its last event is out, or the client goes away."""
    while True:
        finished, batch = await run_in_threadpool(read, after_id)
        for event in batch:
            yield event
            after_id = int(event.id or after_id)
        if finished and not batch:
            return
        if not batch:
            if await request.is_disconnected():
                return
            await anyio.sleep(poll_seconds)
