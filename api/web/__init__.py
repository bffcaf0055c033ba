"""The browser interface: server-rendered pages over the same services as the REST API.

`mount_web(app)` is the one call that adds it to the FastAPI app built by `api.main.create_app`:
the pages under /web (and / redirecting there), the static assets under /static (htmx and uPlot
vendored: no CDN, no build step), and the handlers that turn a missing sign-in into a redirect.
"""

from __future__ import annotations

import os

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from starlette.staticfiles import PathLike, StaticFiles
from starlette.types import Scope

from api.web import views
from api.web.rendering import STATIC_DIR, render, secure
from api.web.session import CSRF_HEADER, CsrfError, LoginRequiredError, SessionCodec, load_secret_key
from service.settings import Settings

__all__ = ["mount_web"]

SCRIPT_ENDPOINTS = frozenset({"/web/files"})


class _StaticFiles(StaticFiles):
    """Assets are referenced as `?v=<content hash>`, so a browser may keep them for good."""

    def file_response(
        self, full_path: PathLike, stat_result: os.stat_result, scope: Scope, status_code: int = 200
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers["Cache-Control"] = "public, max-age=31536000, immutable"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response


def mount_web(app: FastAPI) -> None:
    """Add the browser interface to `app` (call once, after the API's routers)."""
    settings: Settings = app.state.settings
    app.state.web_session_codec = SessionCodec(load_secret_key(settings), settings.web_session_max_age_seconds)
    app.include_router(views.open_router)  # open: the home redirect, sign-in and sign-out
    app.include_router(views.router)  # everything else: a signed-in session, checked at the router
    app.mount("/static", _StaticFiles(directory=STATIC_DIR), name="static")
    app.add_exception_handler(LoginRequiredError, _login_required)  # type: ignore[arg-type]
    app.add_exception_handler(CsrfError, _csrf_failed)  # type: ignore[arg-type]
    app.add_exception_handler(views.PageNotFoundError, _page_not_found)  # type: ignore[arg-type]


def _wants_json(request: Request) -> bool:
    # Scripts (uploads, the event stream, htmx) cannot follow a redirect to a sign-in page.
    return (
        request.headers.get("hx-request") == "true"
        or "application/json" in request.headers.get("accept", "")
        or "text/event-stream" in request.headers.get("accept", "")
        or CSRF_HEADER.lower() in request.headers
        or request.url.path in SCRIPT_ENDPOINTS
        or request.url.path.endswith("/events")
    )


async def _login_required(request: Request, exc: LoginRequiredError) -> Response:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    login = f"/web/login?next={_quote(target)}"
    if _wants_json(request):
        response: Response = JSONResponse(
            {"error": {"code": "unauthenticated", "message": "your session has ended; sign in again"}},
            status_code=401,
            headers={"HX-Redirect": login},
        )
        return secure(response)
    return secure(RedirectResponse(login, status_code=303))


async def _csrf_failed(request: Request, exc: CsrfError) -> Response:
    if _wants_json(request) and request.headers.get("hx-request") != "true":
        return secure(JSONResponse({"error": {"code": "csrf_failed", "message": exc.message}}, status_code=403))
    return render(request, "error.html", {"title": "Please try again", "message": exc.message}, status_code=403)


async def _page_not_found(request: Request, exc: views.PageNotFoundError) -> Response:
    return render(request, "error.html", {"title": "Not found", "message": exc.message}, status_code=404)


def _quote(target: str) -> str:
    from urllib.parse import quote

    return quote(target, safe="/")
