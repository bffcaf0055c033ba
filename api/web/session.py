"""The browser's session: a signed, HttpOnly, SameSite=Lax cookie, and CSRF tokens for every form.

The cookie never holds the API key. Signing in checks the key once with the API's own
`service.users.authenticate`; the cookie then keeps the key's lookup id, the user and a random CSRF
token, signed with itsdangerous (timestamped, so it expires). Every request re-reads the key's
row, so revoking the key (or disabling the user) ends the browser session at once, as it ends
API access.

CSRF: every state-changing request must echo the session's token, as a hidden `csrf_token`
form field or an `X-CSRF-Token` header (uploads and htmx requests). An anonymous visitor gets a
session with a token too, so the sign-in form is protected the same way. A cross-site `Origin`
is refused outright as a second line of defence.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request, Response
from itsdangerous import BadSignature, URLSafeTimedSerializer
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.deps import SessionDep
from service.models import ApiKey
from service.settings import Settings
from service.users import Principal

logger = logging.getLogger("distillery.web")

COOKIE_NAME = "distillery_session"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
_SALT = "distillery.web.session"
SECRET_FILE = "web-secret-key"  # noqa: S105 - a file name, not a secret


def load_secret_key(settings: Settings) -> str:
    """The configured key, else one generated once and kept (mode 0600) in the data folder."""
    if settings.web_secret_key is not None:
        return settings.web_secret_key.get_secret_value()
    path = Path(settings.data_dir) / SECRET_FILE
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    if settings.environment == "production":
        logger.warning("DISTILLERY_WEB_SECRET_KEY is not set; using a key kept in %s", path)
    key = secrets.token_urlsafe(48)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first: use theirs
        return path.read_text().strip()
    except OSError as exc:
        logger.warning("cannot keep a session key in %s (%s): sign-ins last until this process stops; "
                       "set DISTILLERY_WEB_SECRET_KEY", path, exc)
        return key
    with os.fdopen(descriptor, "w") as handle:
        handle.write(key)
    return key


@dataclass
class WebSession:
    """What the cookie holds. `user_id` and `key_id` are set once signed in."""

    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    user_id: str | None = None
    user_name: str | None = None
    key_id: str | None = None
    generation: int = 0  # the user's session generation at sign-in; signing out moves it on
    fresh: bool = False  # made on this request: the response must set the cookie

    def payload(self) -> dict[str, Any]:
        return {"c": self.csrf, "u": self.user_id, "n": self.user_name, "k": self.key_id, "g": self.generation}


class SessionCodec:
    def __init__(self, secret_key: str, max_age_seconds: int) -> None:
        self.serializer = URLSafeTimedSerializer(secret_key, salt=_SALT)
        self.max_age_seconds = max_age_seconds

    def load(self, cookie: str | None) -> WebSession | None:
        if not cookie:
            return None
        try:
            data = self.serializer.loads(cookie, max_age=self.max_age_seconds)
        except BadSignature:
            return None
        if not isinstance(data, dict) or not isinstance(data.get("c"), str):
            return None
        generation = data.get("g", 0)
        return WebSession(csrf=data["c"], user_id=data.get("u"), user_name=data.get("n"), key_id=data.get("k"),
                          generation=generation if isinstance(generation, int) else -1)

    def dump(self, web_session: WebSession) -> str:
        return self.serializer.dumps(web_session.payload())


def codec(request: Request) -> SessionCodec:
    session_codec: SessionCodec = request.app.state.web_session_codec
    return session_codec


def current_session(request: Request) -> WebSession:
    """The request's session, made (anonymous, with a new CSRF token) when there is none or it is invalid."""
    cached = getattr(request.state, "web_session", None)
    if cached is not None:
        return cached
    web_session = codec(request).load(request.cookies.get(COOKIE_NAME))
    if web_session is None:
        web_session = WebSession(fresh=True)
    request.state.web_session = web_session
    return web_session


def write_session(request: Request, response: Response, web_session: WebSession) -> None:
    response.set_cookie(
        COOKIE_NAME,
        codec(request).dump(web_session),
        max_age=codec(request).max_age_seconds,
        path="/",
        httponly=True,
        samesite="lax",
        secure=request.url.scheme == "https",
    )


def clear_session(request: Request, response: Response) -> None:
    response.delete_cookie(COOKIE_NAME, path="/", httponly=True, samesite="lax", secure=request.url.scheme == "https")


def start_session(
    request: Request, response: Response, principal: Principal, key_id: str, *, generation: int = 0
) -> WebSession:
    """Sign in: a new session (and a new CSRF token, so a token seen before sign-in is worthless)."""
    web_session = WebSession(user_id=principal.id, user_name=principal.name, key_id=key_id, generation=generation)
    request.state.web_session = web_session
    write_session(request, response, web_session)
    return web_session


class LoginRequiredError(Exception):
    """No valid session: pages redirect to the sign-in form, XHR gets a 401."""

    def __init__(self, message: str = "sign in first") -> None:
        super().__init__(message)
        self.message = message


class CsrfError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _active_principal(session: Session, web_session: WebSession) -> Principal | None:
    if not (web_session.user_id and web_session.key_id):
        return None
    api_key = session.get(ApiKey, web_session.key_id)
    valid = (
        api_key is not None
        and api_key.user_id == web_session.user_id
        and api_key.revoked_at is None
        and api_key.user.disabled_at is None
        # Signed out since (on any device): the cookie is still signed but no longer a session.
        and api_key.user.session_generation == web_session.generation
    )
    session.commit()  # end the read transaction: SSE views keep the request open for long
    return Principal(id=api_key.user.id, name=api_key.user.name) if valid and api_key else None


async def optional_user(request: Request, session: SessionDep) -> Principal | None:
    web_session = current_session(request)
    if web_session.user_id is None:
        return None
    principal = await run_in_threadpool(_active_principal, session, web_session)
    if principal is not None:
        request.state.user_id = principal.id  # for the access log
    return principal


async def web_user(principal: Annotated[Principal | None, Depends(optional_user)]) -> Principal:
    if principal is None:
        raise LoginRequiredError()
    return principal


def check_csrf(request: Request, supplied: str | None) -> None:
    """Refuse a state-changing request without the session's token, or from another origin."""
    origin = request.headers.get("origin")
    if origin and origin != "null" and not _same_origin(origin, request):
        raise CsrfError("the request came from another site")
    expected = current_session(request).csrf
    if not supplied or not hmac.compare_digest(supplied.encode(), expected.encode()):
        raise CsrfError("the form has expired or was not sent by this site; reload the page and try again")


def _same_origin(origin: str, request: Request) -> bool:
    host = request.headers.get("host", "")
    return origin.rstrip("/") in (f"{request.url.scheme}://{host}", f"http://{host}", f"https://{host}")


async def csrf_header(request: Request) -> None:
    """For XHR, htmx and streamed uploads: the token travels in `X-CSRF-Token`."""
    check_csrf(request, request.headers.get(CSRF_HEADER))


async def csrf_form(request: Request) -> None:
    """For plain form posts: the hidden `csrf_token` field (the header is accepted too)."""
    supplied = request.headers.get(CSRF_HEADER)
    if supplied is None:
        form = await request.form()
        value = form.get(CSRF_FIELD)
        supplied = value if isinstance(value, str) else None
    check_csrf(request, supplied)


WebUser = Annotated[Principal, Depends(web_user)]
OptionalWebUser = Annotated[Principal | None, Depends(optional_user)]
CsrfForm = Depends(csrf_form)
CsrfHeader = Depends(csrf_header)
