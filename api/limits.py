"""Per-user rate limits (the `limits` library) and the bound on request bodies other than uploads."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from fastapi import Depends, Request
from limits import RateLimitItem, parse, storage, strategies
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import ServiceError
from service.settings import Settings
from service.users import Principal

Action = Literal["uploads", "submissions", "streams"]


class RateLimiter:
    """A moving window per user and action; the counters live where the operator says (memory, Redis)."""

    def __init__(self, settings: Settings) -> None:
        counters = storage.storage_from_string(settings.rate_limit_storage_url)
        self._strategy = strategies.MovingWindowRateLimiter(counters)
        self._rules: dict[Action, RateLimitItem] = {
            "uploads": parse(settings.rate_limit_uploads),
            "submissions": parse(settings.rate_limit_submissions),
            "streams": parse(settings.rate_limit_streams),
        }

    def hit(self, action: Action, user_id: str) -> None:
        rule = self._rules[action]
        if self._strategy.hit(rule, action, user_id):
            return
        reset_at, _remaining = self._strategy.get_window_stats(rule, action, user_id)
        retry_after = max(1, math.ceil(reset_at - time.time()))
        raise ServiceError(
            429,
            "rate_limited",
            f"too many {action}: the limit is {rule.amount} per {rule.multiples if rule.multiples > 1 else ''}"
            f"{rule.GRANULARITY.name}; try again in {retry_after} s",
            headers={"Retry-After": str(retry_after)},
        )


def rate_limited(
    action: Action, user_dependency: Callable[..., Any]
) -> Callable[[Request, Principal], Awaitable[None]]:
    """A dependency that counts one `action` of the signed-in user (API key or web session)."""

    async def dependency(request: Request, user: Principal = Depends(user_dependency)) -> None:  # noqa: B008
        limiter: RateLimiter = request.app.state.rate_limiter
        limiter.hit(action, user.id)

    return dependency


# A resumable upload's part (tus's media type): streams to storage under the upload's own limits.
UPLOAD_PART_TYPE = "application/offset+octet-stream"


class BodyLimitMiddleware:
    """Refuse request bodies over `max_bytes` (413) unless they are uploads (multipart, or a resumable
    upload's part), which stream to storage under their own limits. A job spec is a few KB; a 14 MB
    one is stored, listed and parsed for nothing. Counted as the body arrives, so a missing or false
    Content-Length does not help."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        content_type = headers.get("content-type", "").lower()
        if content_type.startswith(("multipart/form-data", UPLOAD_PART_TYPE)):
            await self.app(scope, receive, send)
            return
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        received = 0
        refused = False

        async def counting_receive() -> Message:
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    refused = True
                    # The app sees the client leave; the 413 below is the answer.
                    return {"type": "http.disconnect"}
            return message

        response_started = False

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if refused and not response_started:
                return
            response_started = response_started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not refused:
                raise
        if refused and not response_started:
            await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps({"error": {
            "code": "body_too_large",
            "message": f"the request body is larger than the limit of {self.max_bytes} bytes "
            "(DISTILLERY_MAX_SPEC_BYTES); a job spec is a few kilobytes",
            "field": "body",
        }}).encode()
        await send({"type": "http.response.start", "status": 413, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        ]})
        await send({"type": "http.response.body", "body": body})
