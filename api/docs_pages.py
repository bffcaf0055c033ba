"""The API docs (`/docs`, Swagger UI; `/redoc`, ReDoc) served from bundled assets.

FastAPI's own pages load their scripts, styles, fonts and favicon from CDNs, so an air-gapped
server showed a blank page. The assets come from the `fastapi-offline` package (Swagger UI and
ReDoc's standalone bundles, MIT licensed), served under /docs-assets; the pages are FastAPI's
HTML generators pointed at them, with the Google fonts and the online spec validator switched
off. ReDoc's bundle draws its footer logo from Redocly's CDN: that one URL is pointed at our
own icon as the bundle is served. A content security policy keeps every request on this server,
so a future asset that reaches out fails loudly in the browser test instead of leaking silently.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, Response
from starlette.staticfiles import StaticFiles

ASSETS_URL = "/docs-assets"
ASSETS_DIR = Path(str(files("fastapi_offline") / "static"))
# Swagger UI's and ReDoc's pages carry an inline start-up script and inline styles; nothing else
# may come from anywhere but here (ReDoc renders in a blob: web worker).
DOCS_CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)

REDOC_BUNDLE = "redoc.standalone.js"
REDOC_CDN_LOGO = b"https://cdn.redoc.ly/redoc/logo-mini.svg"
LOCAL_LOGO = b"/static/favicon.svg"

router = APIRouter(include_in_schema=False)


def _title(request: Request) -> str:
    return str(request.app.title)


def _secured(response: HTMLResponse) -> HTMLResponse:
    response.headers["Content-Security-Policy"] = DOCS_CONTENT_SECURITY_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    return _secured(get_swagger_ui_html(
        openapi_url=request.app.openapi_url,
        title=f"{_title(request)} · API docs",
        swagger_js_url=f"{ASSETS_URL}/swagger-ui-bundle.js",
        swagger_css_url=f"{ASSETS_URL}/swagger-ui.css",
        swagger_favicon_url=f"{ASSETS_URL}/favicon.png",
        oauth2_redirect_url=None,
        # The badge would send the spec's URL to validator.swagger.io.
        swagger_ui_parameters={"validatorUrl": None},
    ))


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    return _secured(get_redoc_html(
        openapi_url=request.app.openapi_url,
        title=f"{_title(request)} · API reference",
        redoc_js_url=f"{ASSETS_URL}/redoc.standalone.js",
        redoc_favicon_url=f"{ASSETS_URL}/favicon.png",
        with_google_fonts=False,
    ))


@cache
def _redoc_bundle() -> bytes:
    return (ASSETS_DIR / REDOC_BUNDLE).read_bytes().replace(REDOC_CDN_LOGO, LOCAL_LOGO)


# Declared before the assets' mount, so it answers for this one file.
@router.get(f"{ASSETS_URL}/{REDOC_BUNDLE}")
def redoc_bundle() -> Response:
    return Response(_redoc_bundle(), media_type="text/javascript",
                    headers={"Cache-Control": "public, max-age=86400", "X-Content-Type-Options": "nosniff"})


def mount_docs(app: FastAPI) -> None:
    """Add /docs, /redoc and their assets to an app built with `docs_url=None, redoc_url=None`."""
    app.include_router(router)
    app.mount(ASSETS_URL, StaticFiles(directory=ASSETS_DIR), name="docs-assets")


__all__ = ["ASSETS_URL", "mount_docs"]
