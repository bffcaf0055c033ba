"""The one error the service's functions raise for a request they refuse.

It carries what the API renders (`{"error": {"code", "message", "field"?, "details"?}}` with
`status`), so a service function decides what went wrong once and every caller (the /v1 routes,
the web pages, the CLI) shows the same code and message. The service itself knows nothing of
HTTP beyond that number.
"""

from __future__ import annotations

from collections.abc import Sequence


class ServiceError(Exception):
    """A refused request: `status` (an HTTP status), a stable `code`, a `message` that says what to do."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        field: str | None = None,
        details: Sequence[dict[str, str]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field
        self.details = list(details) if details else None
        self.headers = headers


def not_found(what: str, ident: str) -> ServiceError:
    return ServiceError(404, "not_found", f"no {what} {ident!r} (it does not exist or is not yours)")
