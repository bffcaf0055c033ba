"""Accounts: users and their API keys."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.errors import ServiceError
from service.ids import new_id
from service.models import ApiKey, User, utcnow
from service.security import generate_key, hash_key, key_matches, parse_key

# last_used_at is a hint for humans; writing it on every request would make every read a write.
LAST_USED_RESOLUTION = timedelta(minutes=1)
_UNAUTHENTICATED_HEADERS = {"WWW-Authenticate": "Bearer"}


class UserExistsError(Exception):
    pass


@dataclass(frozen=True)
class Principal:
    """Who a request acts for: plain values, safe to cache and to share between threads."""

    id: str
    name: str


class AuthCache:
    """Keys verified in the last `ttl_seconds`, so a polling client costs no auth query per request.

    The price: a revoked key keeps working for up to `ttl_seconds` in each API process.
    """

    def __init__(self, ttl_seconds: float, *, max_entries: int = 10_000) -> None:
        self.ttl_seconds = ttl_seconds
        self.max_entries = max_entries
        self._entries: dict[str, tuple[float, Principal]] = {}

    def get(self, plaintext: str) -> Principal | None:
        if self.ttl_seconds <= 0:
            return None
        entry = self._entries.get(hash_key(plaintext))
        if entry is None or time.monotonic() - entry[0] > self.ttl_seconds:
            return None
        return entry[1]

    def put(self, plaintext: str, principal: Principal) -> None:
        if self.ttl_seconds <= 0:
            return
        if len(self._entries) >= self.max_entries:
            self._entries.clear()  # crude but bounded; the next requests refill it
        self._entries[hash_key(plaintext)] = (time.monotonic(), principal)


def create_user(*, session: Session, name: str) -> tuple[User, str]:
    """A new user with one API key; returns the user and the key's plaintext (shown once, never stored)."""
    user = User(id=new_id("user"), name=name)
    session.add(user)
    try:
        session.flush()
    except IntegrityError:
        session.rollback()
        raise UserExistsError(f"a user named {name!r} exists already") from None
    _, plaintext = create_key(session=session, user_id=user.id)
    session.commit()
    return user, plaintext


def create_key(*, session: Session, user_id: str, name: str = "default") -> tuple[ApiKey, str]:
    new_key = generate_key()
    api_key = ApiKey(id=new_key.lookup_id, user_id=user_id, name=name, secret_hash=new_key.secret_hash)
    session.add(api_key)
    session.flush()
    return api_key, new_key.plaintext


def revoke_key(*, session: Session, key_id: str) -> bool:
    """Revoke a key by its lookup id (or the whole key); False if there is no such active key."""
    lookup_id = parse_key(key_id) or key_id
    result = session.execute(
        update(ApiKey).where(ApiKey.id == lookup_id, ApiKey.revoked_at.is_(None)).values(revoked_at=utcnow())
    )
    session.commit()
    return bool(result.rowcount)  # type: ignore[attr-defined]


def authenticate(*, session: Session, plaintext: str, now: datetime | None = None) -> Principal:
    """The user a bearer key belongs to, or a 401 that says why not (without telling which part was wrong)."""
    lookup_id = parse_key(plaintext)
    api_key = session.get(ApiKey, lookup_id) if lookup_id else None
    if api_key is None or not key_matches(plaintext, api_key.secret_hash):
        raise ServiceError(401, "invalid_api_key", "the API key is not valid", headers=_UNAUTHENTICATED_HEADERS)
    if api_key.revoked_at is not None:
        raise ServiceError(
            401, "api_key_revoked", "this API key was revoked; ask for a new one", headers=_UNAUTHENTICATED_HEADERS
        )
    if api_key.user.disabled_at is not None:
        raise ServiceError(403, "user_disabled", "this account is disabled")
    now = now or utcnow()
    if api_key.last_used_at is None or now - api_key.last_used_at > LAST_USED_RESOLUTION:
        session.execute(update(ApiKey).where(ApiKey.id == api_key.id).values(last_used_at=now))
        session.commit()
    return Principal(id=api_key.user.id, name=api_key.user.name)


def get_user_by_name(*, session: Session, name: str) -> User | None:
    return session.scalar(select(User).where(User.name == name))


def session_generation(*, session: Session, user_id: str) -> int:
    """The generation a new browser session of `user_id` carries; older ones are ended."""
    generation = session.scalar(select(User.session_generation).where(User.id == user_id))
    session.commit()
    return int(generation or 0)


def end_web_sessions(*, session: Session, user_id: str) -> None:
    """Sign out on the server: every browser session of the user made before now stops working."""
    session.execute(
        update(User).where(User.id == user_id).values(session_generation=User.session_generation + 1)
    )
    session.commit()
