"""One error shape for every failure: `{"error": {"code", "message", "field"?, "details"?}}`.

`code` is stable and machine-readable, `message` says what to do, `field` names the request
field at fault (dotted, e.g. `method.temperature`), `details` lists every problem of a 422.
FastAPI's own validation errors and Starlette's 404/405 are rewritten into the same shape.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

from service.errors import ServiceError

logger = logging.getLogger("distillery.api")


class FieldProblem(BaseModel):
    field: str
    message: str


class ErrorDetail(BaseModel):
    code: str = Field(examples=["invalid_request"])
    message: str = Field(examples=["method.temperature: Input should be greater than 0"])
    field: str | None = Field(default=None, examples=["method.temperature"])
    details: list[FieldProblem] | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    field: str | None = None,
    details: Sequence[dict[str, str]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    error: dict[str, Any] = {"code": code, "message": message}
    if field is not None:
        error["field"] = field
    if details:
        error["details"] = list(details)
    return JSONResponse({"error": error}, status_code=status, headers=headers)


def field_path(loc: Sequence[int | str]) -> str:
    """FastAPI's ("body", "method", "temperature") → "method.temperature"; ("query", "limit") → "limit"."""
    parts = [str(part) for part in loc]
    if parts and parts[0] in ("body", "query", "path", "header", "cookie"):
        parts = parts[1:] or parts[:1]
    return ".".join(parts) or "body"


def validation_details(errors: Sequence[Any]) -> list[dict[str, str]]:
    details = []
    for error in errors:
        message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
        # A check over several fields of the spec names the one at fault itself (tune.space.<path>).
        field = (error.get("ctx") or {}).get("field") or field_path(error.get("loc", ()))
        details.append({"field": str(field), "message": message})
    return details


_STATUS_CODES = {
    400: "bad_request",
    401: "unauthenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    429: "too_many_requests",
}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(_request: Request, exc: ServiceError) -> JSONResponse:
        return error_response(
            exc.status, exc.code, exc.message, field=exc.field, details=exc.details, headers=exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        details = validation_details(exc.errors())
        first = details[0] if details else {"field": "body", "message": "invalid request"}
        message = "; ".join(f"{d['field']}: {d['message']}" for d in details[:5])
        return error_response(422, "invalid_request", message, field=first["field"], details=details)

    @app.exception_handler(RecursionError)
    async def _too_deep(_request: Request, _exc: RecursionError) -> JSONResponse:
        # JSON nested thousands deep (a body or a file's header): a malformed input, not a server fault.
        return error_response(422, "invalid_request", "the input nests too deeply to be valid", field="body")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, "http_error")
        message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            # Starlette lists only the first route's methods; a path served by several routes
            # (GET and DELETE /v1/files/{id}) must announce them all.
            headers["Allow"] = ", ".join(_allowed_methods(request))
        return error_response(exc.status_code, code, message, headers=headers or None)


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _allowed_methods(request: Request) -> list[str]:
    """The methods the OpenAPI schema declares for the request's path. A literal path
    (/v1/files/by-reference) is its own resource: the methods of a parameterised sibling that also
    matches it (GET /v1/files/{file_id}) are not announced for it."""
    paths: dict[str, dict[str, Any]] = request.app.openapi().get("paths", {})
    path = request.scope["path"]
    matching = [template for template in paths if compile_path(template)[0].match(path)]
    chosen = [template for template in matching if "{" not in template] or matching
    declared = {method.upper() for template in chosen for method in paths[template]}
    if "GET" in declared:
        declared.add("HEAD")
    return [method for method in _METHODS if method in declared]
