"""One exception class per kind of failure, each carrying what the server said.

Every error the server returns has the shape `{"error": {"code", "message", "field"?, "details"?}}`
(see `api/errors.py`) and an `X-Request-ID` header; the classes below keep all of it, so a script
can branch on the class or on the stable `code`, and a bug report can quote the request id.

    DistilleryError
    ├── BadRequest          400 and other 4xx (Conflict 409, TooLarge 413 below it)
    ├── AuthError           401 missing or bad API key, 403 account disabled
    ├── NotFound            404 no such resource, or not yours
    ├── ValidationError     422 a field is wrong; `field` names it (dotted: method.temperature)
    ├── RateLimited         429 a per-user limit; `retry_after` in seconds when the server said
    ├── ServerError         5xx
    ├── ConnectionError     the server could not be reached, or the connection broke (Timeout below it)
    ├── ChecksumError       a transfer's sha256 differs from the server's
    └── WaitTimeout         `Client.wait(timeout=...)` ran out before the job finished
"""

from __future__ import annotations

from typing import Any

import httpx


class DistilleryError(Exception):
    """Base class. `code` is stable and machine-readable; `message` says what to do."""

    default_code = "error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status: int | None = None,
        field: str | None = None,
        details: list[dict[str, str]] | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.status = status
        self.field = field
        self.details = details or []
        self.request_id = request_id

    def one_line(self) -> str:
        """`<code>: <message> (field <field>)`, what the CLI prints after `error: `."""
        line = f"{self.code}: {self.message}"
        if self.field and self.field not in self.message:
            line += f" (field {self.field})"
        return line

    def __str__(self) -> str:
        suffix = f" [request {self.request_id}]" if self.request_id else ""
        return self.one_line() + suffix

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, status={self.status}, message={self.message!r})"


class BadRequest(DistilleryError):
    default_code = "bad_request"


class Conflict(BadRequest):
    """409: the resource's state forbids it (cancel a finished job, delete a file a job reads)."""

    default_code = "conflict"


class TooLarge(BadRequest):
    """413: upload larger than the server's limit, or the user's storage quota is used up."""

    default_code = "too_large"


class AuthError(DistilleryError):
    default_code = "unauthenticated"


class NotFound(DistilleryError):
    default_code = "not_found"


class ValidationError(DistilleryError):
    """422: `field` names the first bad field, `details` lists every {field, message}."""

    default_code = "invalid_request"


class RateLimited(DistilleryError):
    default_code = "too_many_requests"

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class ServerError(DistilleryError):
    default_code = "server_error"


class ConnectionError(DistilleryError):
    """The request could not be completed: refused, reset, DNS, TLS or a broken stream.

    `sent` is False when the request certainly never reached the server (safe to retry anything).
    It shadows the builtin of the same name inside this package only; `builtins.ConnectionError`
    is not a base, so `except ConnectionError` in user code catches exactly one of the two.
    """

    default_code = "connection_error"

    def __init__(self, message: str, *, sent: bool = True, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.sent = sent


class Timeout(ConnectionError):
    default_code = "timeout"


class ChecksumError(DistilleryError):
    default_code = "checksum_mismatch"


class WaitTimeout(DistilleryError):
    default_code = "wait_timeout"


_BY_STATUS: dict[int, type[DistilleryError]] = {
    400: BadRequest,
    401: AuthError,
    403: AuthError,
    404: NotFound,
    409: Conflict,
    413: TooLarge,
    422: ValidationError,
    429: RateLimited,
}


def from_response(response: httpx.Response) -> DistilleryError:
    """The error a non-2xx response stands for. The body must have been read (or not be streamed)."""
    status = response.status_code
    request_id = response.headers.get("x-request-id")
    code, message, field, details = _error_body(response)
    cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else BadRequest)
    kwargs: dict[str, Any] = {
        "code": code or cls.default_code,
        "status": status,
        "field": field,
        "details": details,
        "request_id": request_id,
    }
    if cls is RateLimited:
        kwargs["retry_after"] = _retry_after(response.headers.get("retry-after"))
    return cls(message, **kwargs)


def from_transport(exc: httpx.TransportError, url: str) -> ConnectionError:
    """Map httpx's transport failures; connect-phase ones mean the request was never sent."""
    sent = not isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)
    reason = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        return Timeout(f"no answer from {url} in time ({reason})", sent=sent)
    if isinstance(exc, httpx.ConnectError):
        return ConnectionError(f"cannot reach the server at {url}: {reason}", sent=False)
    return ConnectionError(f"the connection to {url} broke: {reason}", sent=sent)


def _error_body(response: httpx.Response) -> tuple[str | None, str, str | None, list[dict[str, str]]]:
    try:
        body = response.json()
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        details = error.get("details")
        return (
            error.get("code"),
            error["message"],
            error.get("field"),
            details if isinstance(details, list) else [],
        )
    # Not our error shape: a proxy's page, a load balancer's 502. Say what came back, briefly.
    text = " ".join(response.text.split())[:200] if response.content else ""
    reason = response.reason_phrase or f"HTTP {response.status_code}"
    message = f"{reason} from {response.request.url.host}" + (f": {text}" if text else "")
    return f"http_{response.status_code}", message, None, []


def _retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None

